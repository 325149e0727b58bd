"""The real API's JSON shapes, built from the emulator's state.

Shapes follow DigitalOcean's OpenAPI specification (the excerpt in `../shared/do-openapi`,
checked by the emulator's tests) and its published examples: a reserved IP carries the
whole region object and the whole droplet object (or null), and an action carries its
region object and `region_slug`. Keeping every shape here means the HTTP layer never
invents JSON of its own.
"""

from __future__ import annotations

import datetime
import ipaddress
import uuid
from typing import Any
from urllib.parse import urlencode

from .state import Action, Droplet, ReservedIP

REGION_NAMES = {
    "ams3": "Amsterdam 3",
    "blr1": "Bangalore 1",
    "fra1": "Frankfurt 1",
    "lon1": "London 1",
    "nyc1": "New York 1",
    "nyc2": "New York 2",
    "nyc3": "New York 3",
    "sfo2": "San Francisco 2",
    "sfo3": "San Francisco 3",
    "sgp1": "Singapore 1",
    "syd1": "Sydney 1",
    "tor1": "Toronto 1",
}
SIZES = ["s-1vcpu-1gb", "s-1vcpu-2gb", "s-2vcpu-2gb", "s-2vcpu-4gb", "s-4vcpu-8gb"]
FEATURES = ["backups", "ipv6", "metadata", "install_agent", "storage", "image_transfer"]


def iso8601(epoch: float) -> str:
    """The API's timestamp format: UTC, whole seconds, `Z` suffix."""
    moment = datetime.datetime.fromtimestamp(int(epoch), tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def iso8601_precise(epoch: float) -> str:
    """Sub-second ISO 8601 for the admin history, where tests compare moments."""
    return datetime.datetime.fromtimestamp(epoch, tz=datetime.UTC).isoformat()


def region(slug: str) -> dict[str, Any]:
    return {
        "name": REGION_NAMES.get(slug, slug.upper()),
        "slug": slug,
        "features": list(FEATURES),
        "available": True,
        "sizes": list(SIZES),
    }


def droplet_public_ipv4(droplet_id: int) -> str:
    """A stable stand-in public address from the benchmark range 198.18.0.0/15."""
    return str(ipaddress.IPv4Address("198.18.0.0") + (droplet_id % 131_070) + 1)


def droplet(d: Droplet) -> dict[str, Any]:
    """The droplet object as the real API embeds it in a reserved IP."""
    size = {
        "slug": "s-1vcpu-1gb",
        "memory": 1024,
        "vcpus": 1,
        "disk": 25,
        "transfer": 1.0,
        "price_monthly": 6.0,
        "price_hourly": 0.00893,
        "regions": [d.region],
        "available": True,
        "description": "Basic",
    }
    image = {
        "id": 63663980,
        "name": "22.04 (LTS) x64",
        "type": "base",
        "distribution": "Ubuntu",
        "slug": "ubuntu-22-04-x64",
        "public": True,
        "regions": [d.region],
        "created_at": "2022-04-21T00:00:00Z",
        "min_disk_size": 7,
        "size_gigabytes": 2.36,
        "description": "",
        "tags": [],
        "status": "available",
        "error_message": "",
    }
    return {
        "id": d.id,
        "name": d.name,
        "memory": 1024,
        "vcpus": 1,
        "disk": 25,
        "locked": False,
        "status": "active",
        "kernel": None,
        "created_at": iso8601(d.created_epoch),
        "features": ["ipv6", "metadata"],
        "backup_ids": [],
        "next_backup_window": None,
        "snapshot_ids": [],
        "image": image,
        "volume_ids": [],
        "size": size,
        "size_slug": "s-1vcpu-1gb",
        "networks": {
            "v4": [
                {
                    "ip_address": droplet_public_ipv4(d.id),
                    "netmask": "255.254.0.0",
                    "gateway": "198.18.0.1",
                    "type": "public",
                }
            ],
            "v6": [],
        },
        "region": region(d.region),
        "tags": [],
        "vpc_uuid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"fip-emulator-vpc:{d.region}")),
    }


def reserved_ip(r: ReservedIP, holder: Droplet | None, *, locked: bool) -> dict[str, Any]:
    return {
        "ip": r.ip,
        "region": region(r.region),
        "droplet": droplet(holder) if holder is not None else None,
        "locked": locked,
        "project_id": r.project_id,
    }


def action(a: Action, *, with_project_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": a.id,
        "status": a.status,
        "type": a.api_type,
        "started_at": iso8601(a.started_epoch),
        "completed_at": iso8601(a.completed_epoch) if a.status != "in-progress" else None,
        "resource_id": a.resource_id,
        "resource_type": a.resource_type,
        "region": region(a.region),
        "region_slug": a.region,
    }
    if with_project_id is not None:
        body["project_id"] = with_project_id
    return body


def error(error_id: str, message: str) -> dict[str, Any]:
    return {"id": error_id, "message": message, "request_id": str(uuid.uuid4())}


def page_links(base_url: str, page: int, per_page: int, total: int) -> dict[str, Any]:
    """The `links` object of a list response: `pages` only when there is another page."""
    last = max(1, -(-total // per_page))

    def url(n: int) -> str:
        return f"{base_url}?{urlencode({'page': n, 'per_page': per_page})}"

    pages: dict[str, str] = {}
    if page > 1:
        pages["first"] = url(1)
        pages["prev"] = url(min(page - 1, last))
    if page < last:
        pages["last"] = url(last)
        pages["next"] = url(page + 1)
    return {"pages": pages} if pages else {}
