"""The droplet metadata service, one per emulated droplet.

On a real droplet it lives at `http://169.254.169.254/metadata/v1/...`, needs no token
and answers plain text (or JSON for `v1.json`). Here each droplet gets its own prefix,
`/metadata/droplets/{id}`, so a node configured with
`metadata_url = "http://HOST:PORT/metadata/droplets/1001"` appends the same paths it would
append on a droplet. Values come from the settled state, so `reserved_ip/ipv4/active`
turns true when the assign action completes, as on the real platform.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from . import render
from .emulator import Emulator

PREFIX = "/metadata/droplets/{droplet_id:int}/metadata"


def not_found() -> Response:
    return PlainTextResponse("not found", status_code=404)


def metadata_routes(emulator: Emulator) -> list[BaseRoute]:
    state = emulator.state

    def held_ip(request: Request) -> tuple[int, str | None] | None:
        droplet_id: int = request.path_params["droplet_id"]
        if droplet_id not in state.droplets:
            return None
        reserved = state.ip_of_droplet(droplet_id)
        return droplet_id, reserved.ip if reserved is not None else None

    async def droplet_id(request: Request) -> Response:
        found = held_ip(request)
        return PlainTextResponse(str(found[0])) if found else not_found()

    async def hostname(request: Request) -> Response:
        found = held_ip(request)
        return PlainTextResponse(state.droplets[found[0]].name) if found else not_found()

    async def region(request: Request) -> Response:
        found = held_ip(request)
        return PlainTextResponse(state.droplets[found[0]].region) if found else not_found()

    async def ip_active(request: Request) -> Response:
        found = held_ip(request)
        if not found:
            return not_found()
        return PlainTextResponse("true" if found[1] is not None else "false")

    async def ip_address(request: Request) -> Response:
        found = held_ip(request)
        if not found or found[1] is None:
            return not_found()
        return PlainTextResponse(found[1])

    async def everything(request: Request) -> Response:
        found = held_ip(request)
        if not found:
            return not_found()
        ident, ip = found
        droplet = state.droplets[ident]
        reserved: dict[str, Any] = {"ipv4": {"active": ip is not None}}
        if ip is not None:
            reserved["ipv4"]["ip_address"] = ip
        public = render.droplet_public_ipv4(ident)
        return JSONResponse(
            {
                "droplet_id": ident,
                "hostname": droplet.name,
                "vendor_data": "",
                "public_keys": [],
                "auth_key": "",
                "region": droplet.region,
                "interfaces": {
                    "public": [
                        {
                            "ipv4": {
                                "ip_address": public,
                                "netmask": "255.254.0.0",
                                "gateway": "198.18.0.1",
                            },
                            "mac": f"02:00:00:{ident >> 16 & 255:02x}:"
                            f"{ident >> 8 & 255:02x}:{ident & 255:02x}",
                            "type": "public",
                        }
                    ]
                },
                "floating_ip": reserved,
                "reserved_ip": reserved,
                "dns": {"nameservers": ["198.18.0.53"]},
                "features": {"dhcp_enabled": False},
                "tags": [],
            }
        )

    routes: list[BaseRoute] = [
        Route(PREFIX + "/v1/id", droplet_id, methods=["GET"]),
        Route(PREFIX + "/v1/hostname", hostname, methods=["GET"]),
        Route(PREFIX + "/v1/region", region, methods=["GET"]),
        Route(PREFIX + "/v1.json", everything, methods=["GET"]),
    ]
    for name in ("reserved_ip", "floating_ip"):
        routes.append(Route(f"{PREFIX}/v1/{name}/ipv4/active", ip_active, methods=["GET"]))
        routes.append(Route(f"{PREFIX}/v1/{name}/ipv4/ip_address", ip_address, methods=["GET"]))
    return routes
