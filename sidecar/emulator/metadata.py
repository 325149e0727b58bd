"""The droplet metadata service, as each emulated droplet sees it.

On a real droplet it lives at `http://169.254.169.254/metadata/v1/...`, needs no token and
answers plain text (or JSON for `v1.json`) about the droplet that asks. The emulator serves
it two ways:

- `/metadata/droplets/{id}/metadata/v1/...` on the API port: the droplet is named in the
  path, so a node on loopback configured with
  `metadata_url = "http://HOST:PORT/metadata/droplets/1001"` appends the paths it would
  append on a droplet;
- `/metadata/v1/...` (`build_metadata_app`, the `--metadata-listen` port): the droplet is
  the one whose public or private address the request comes from, as on the platform, so
  a droplet stand-in (a network namespace) runs with the default `metadata_url` once its
  traffic for 169.254.169.254 reaches this port.

Values come from the settled state, so `reserved_ip/ipv4/active` turns true when the assign
action completes, as on the real platform.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from . import render
from .emulator import Emulator
from .state import Droplet

PREFIX = "/metadata/droplets/{droplet_id:int}/metadata"

Locate = Callable[[Request], Droplet | None]


def not_found() -> Response:
    return PlainTextResponse("not found", status_code=404)


def metadata_document(emulator: Emulator, droplet: Droplet) -> dict[str, Any]:
    """`/metadata/v1.json` for one droplet."""
    reserved = emulator.state.ip_of_droplet(droplet.id)
    ip: dict[str, Any] = {"ipv4": {"active": reserved is not None}}
    if reserved is not None:
        ip["ipv4"]["ip_address"] = reserved.ip
    mac = f"02:00:00:{droplet.id >> 16 & 255:02x}:{droplet.id >> 8 & 255:02x}:"
    interfaces: dict[str, Any] = {
        "public": [
            {
                "ipv4": {
                    "ip_address": droplet.public_ipv4,
                    "netmask": render.PUBLIC_NETMASK,
                    "gateway": render.PUBLIC_GATEWAY,
                },
                "mac": f"{mac}{droplet.id & 255:02x}",
                "type": "public",
            }
        ]
    }
    if droplet.private_ipv4 is not None:
        interfaces["private"] = [
            {
                "ipv4": {
                    "ip_address": droplet.private_ipv4,
                    "netmask": render.PRIVATE_NETMASK,
                    "gateway": "",
                },
                "mac": f"{mac}{droplet.id + 1 & 255:02x}",
                "type": "private",
            }
        ]
    return {
        "droplet_id": droplet.id,
        "hostname": droplet.name,
        "vendor_data": "",
        "public_keys": [],
        "auth_key": "",
        "region": droplet.region,
        "interfaces": interfaces,
        "floating_ip": ip,
        "reserved_ip": ip,
        "dns": {"nameservers": ["198.18.0.53"]},
        "features": {"dhcp_enabled": False},
        "tags": list(droplet.tags),
    }


def _routes(emulator: Emulator, prefix: str, locate: Locate) -> list[BaseRoute]:
    state = emulator.state

    def text(value: Callable[[Droplet], str | None]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            droplet = locate(request)
            answer = value(droplet) if droplet is not None else None
            return PlainTextResponse(answer) if answer is not None else not_found()

        return endpoint

    def held(droplet: Droplet) -> str | None:
        reserved = state.ip_of_droplet(droplet.id)
        return reserved.ip if reserved is not None else None

    async def everything(request: Request) -> Response:
        droplet = locate(request)
        return JSONResponse(metadata_document(emulator, droplet)) if droplet else not_found()

    routes: list[BaseRoute] = [
        Route(prefix + "/v1/id", text(lambda d: str(d.id)), methods=["GET"]),
        Route(prefix + "/v1/hostname", text(lambda d: d.name), methods=["GET"]),
        Route(prefix + "/v1/region", text(lambda d: d.region), methods=["GET"]),
        Route(
            prefix + "/v1/tags", text(lambda d: "".join(f"{t}\n" for t in d.tags)), methods=["GET"]
        ),
        Route(prefix + "/v1.json", everything, methods=["GET"]),
    ]
    for name in ("reserved_ip", "floating_ip"):
        routes.append(
            Route(
                f"{prefix}/v1/{name}/ipv4/active",
                text(lambda d: "true" if held(d) is not None else "false"),
                methods=["GET"],
            )
        )
        routes.append(Route(f"{prefix}/v1/{name}/ipv4/ip_address", text(held), methods=["GET"]))
    return routes


def metadata_routes(emulator: Emulator) -> list[BaseRoute]:
    """The per-droplet prefixed routes (the droplet id is in the path)."""

    def by_path(request: Request) -> Droplet | None:
        return emulator.state.droplets.get(request.path_params["droplet_id"])

    return _routes(emulator, PREFIX, by_path)


def caller_metadata_routes(emulator: Emulator) -> list[BaseRoute]:
    """`/metadata/v1/...` about the droplet whose address the request comes from."""

    def by_caller(request: Request) -> Droplet | None:
        client = request.client
        return emulator.state.droplet_at_address(client.host) if client is not None else None

    return _routes(emulator, "/metadata", by_caller)


def build_metadata_app(emulator: Emulator) -> Starlette:
    """What a droplet finds at 169.254.169.254: its own metadata and nothing else."""
    return Starlette(routes=caller_metadata_routes(emulator))
