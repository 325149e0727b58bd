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


PUBLIC_NETMASK = "255.254.0.0"
PUBLIC_GATEWAY = "198.18.0.1"
PRIVATE_NETMASK = "255.255.0.0"
PRIVATE_GATEWAY = "nil"
"""The spec's own example: "For private interfaces, a gateway is not provided. This is
denoted by returning `nil` as its value." """


def networks_v4(d: Droplet) -> list[dict[str, Any]]:
    """The droplet's IPv4 networks, private first as in the API's examples."""
    networks = []
    if d.private_ipv4 is not None:
        networks.append(
            {
                "ip_address": d.private_ipv4,
                "netmask": PRIVATE_NETMASK,
                "gateway": PRIVATE_GATEWAY,
                "type": "private",
            }
        )
    networks.append(
        {
            "ip_address": d.public_ipv4,
            "netmask": PUBLIC_NETMASK,
            "gateway": PUBLIC_GATEWAY,
            "type": "public",
        }
    )
    return networks


PUBLIC_IPV6_PREFIX = 64


def networks_v6(d: Droplet) -> list[dict[str, Any]]:
    """The droplet's public IPv6 network, when IPv6 is enabled (the API's example shape)."""
    if d.public_ipv6 is None:
        return []
    network = ipaddress.IPv6Network(f"{d.public_ipv6}/{PUBLIC_IPV6_PREFIX}", strict=False)
    gateway = str(network[1])
    return [
        {
            "ip_address": d.public_ipv6,
            "netmask": PUBLIC_IPV6_PREFIX,
            "gateway": gateway,
            "type": "public",
        }
    ]


def droplet(d: Droplet, *, booting: bool = False) -> dict[str, Any]:
    """The droplet object (`GET /v2/droplets/{id}`, and embedded in a reserved IP).

    A droplet still booting (its `create` event runs) is `new` and has no addresses yet,
    as on the real platform, where they appear once it is provisioned.
    """
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
        "status": "new" if booting else "active",
        "kernel": None,
        "created_at": iso8601(d.created_epoch),
        "features": (["ipv6"] if d.ipv6 else [])
        + ["metadata"]
        + (["private_networking"] if d.private_ipv4 else []),
        "backup_ids": [],
        "next_backup_window": None,
        "snapshot_ids": [],
        "image": image,
        "volume_ids": [],
        "size": size,
        "size_slug": "s-1vcpu-1gb",
        "networks": {
            "v4": [] if booting else networks_v4(d),
            "v6": [] if booting else networks_v6(d),
        },
        "region": region(d.region),
        "tags": list(d.tags),
        "vpc_uuid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"fip-emulator-vpc:{d.region}")),
    }


def reserved_ip(r: ReservedIP, holder: Droplet | None, *, locked: bool) -> dict[str, Any]:
    """The reserved IP object; a droplet that holds an IP has booted, so it is `active`."""
    return {
        "ip": r.ip,
        "region": region(r.region),
        "droplet": droplet(holder) if holder is not None else None,
        "locked": locked,
        "project_id": r.project_id,
    }


def reserved_ipv6(r: ReservedIP, holder: Droplet | None) -> dict[str, Any]:
    """The reserved IPv6 object: no `locked` field and a `region_slug` instead of a region
    object, as the spec has it."""
    return {
        "ip": r.ip,
        "reserved_at": iso8601(r.reserved_epoch),
        "region_slug": r.region,
        "droplet": droplet(holder) if holder is not None else None,
    }


def action(
    a: Action, *, with_project_id: str | None = None, completed_status: str = "completed"
) -> dict[str, Any]:
    """The action object; `completed_status` respells `completed` (a fault, see faults.py)."""
    body: dict[str, Any] = {
        "id": a.id,
        "status": completed_status if a.status == "completed" else a.status,
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


def page_links(
    base_url: str,
    page: int,
    per_page: int,
    total: int,
    kept: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The `links` object of a list response: `pages` only when there is another page.

    `kept` are query parameters every link repeats (a filter such as `tag_name`).
    """
    last = max(1, -(-total // per_page))

    def url(n: int) -> str:
        return f"{base_url}?{urlencode({'page': n, 'per_page': per_page, **(kept or {})})}"

    pages: dict[str, str] = {}
    if page > 1:
        pages["first"] = url(1)
        pages["prev"] = url(min(page - 1, last))
    if page < last:
        pages["last"] = url(last)
        pages["next"] = url(page + 1)
    return {"pages": pages} if pages else {}
