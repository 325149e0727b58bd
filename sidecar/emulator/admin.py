"""Admin endpoints under `/_emulator/`: what tests and operators use to watch and steer.

No DigitalOcean token here: these stand for the test harness and the human at the
console, not for an API client. They are never rate-limited and never fault-injected,
so a test can always read the history or switch a fault off.

`completed_monotonic` values are the emulator's clock (`time.monotonic()` when it runs as
a process); CLOCK_MONOTONIC is shared by every process on one Linux machine, so tests
can compare them with the monotonic timestamps in the nodes' logs.
"""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from . import render
from .emulator import Emulator
from .faults import FaultUpdate
from .specs import decode_droplet
from .state import Assignment, EmulatorError


class ManualAssign(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """`POST /_emulator/assign`: `droplet_id` null unassigns; `reserved_ip` defaults to
    the only (or first) reserved IP."""

    droplet_id: int | None
    reserved_ip: str | None = None


class TokenGrant(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """`POST /_emulator/tokens`: accept `token`, with full access or only `scopes`."""

    token: str
    scopes: list[str] | None = None


class TokenRevoke(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """`POST /_emulator/tokens/revoke`: stop accepting `token` (401 from then on)."""

    token: str


def history_entry(entry: Assignment) -> dict[str, Any]:
    return {
        "reserved_ip": entry.reserved_ip,
        "droplet_id": entry.droplet_id,
        "previous_droplet_id": entry.previous_droplet_id,
        "action_id": entry.action_id,
        "source": entry.source,
        "requested_wall": render.iso8601_precise(entry.requested_epoch),
        "requested_epoch": entry.requested_epoch,
        "requested_monotonic": entry.requested_clock,
        "completed_wall": render.iso8601_precise(entry.completed_epoch),
        "completed_epoch": entry.completed_epoch,
        "completed_monotonic": entry.completed_clock,
    }


def bad_request(message: str) -> Response:
    return JSONResponse({"id": "bad_request", "message": message}, status_code=400)


def error_response(error: EmulatorError) -> Response:
    return JSONResponse({"id": error.error_id, "message": error.message}, status_code=error.status)


def admin_routes(emulator: Emulator) -> list[BaseRoute]:
    state = emulator.state

    async def history(request: Request) -> Response:
        state.settle()
        wanted = request.query_params.get("reserved_ip")
        return JSONResponse(
            [history_entry(e) for e in state.history if wanted in (None, e.reserved_ip)]
        )

    async def get_faults(request: Request) -> Response:
        return JSONResponse(emulator.faults.describe(emulator.clock()))

    async def post_faults(request: Request) -> Response:
        try:
            change = msgspec.json.decode(await request.body(), type=FaultUpdate)
            change.validate()
            event = change.droplet_event
            if event is not None:
                state.start_droplet_event(event.droplet_id, event.type, event.seconds)
            emulator.faults.update(change, emulator.clock())
        except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as error:
            return bad_request(str(error))
        except EmulatorError as error:
            return error_response(error)
        return JSONResponse(emulator.faults.describe(emulator.clock()))

    async def post_droplet(request: Request) -> Response:
        try:
            spec = decode_droplet(await request.body())
            spec.add_to(state, replace=True)
        except ValueError as error:
            return bad_request(str(error))
        except EmulatorError as error:  # booting a droplet that has an event in flight
            return error_response(error)
        return JSONResponse(droplet_entry(spec.id))

    async def delete_droplet(request: Request) -> Response:
        droplet_id: int = request.path_params["droplet_id"]
        try:
            state.remove_droplet(droplet_id)
        except EmulatorError as error:
            return error_response(error)
        return JSONResponse({"deleted": droplet_id})

    async def grant_token(request: Request) -> Response:
        try:
            grant = msgspec.json.decode(await request.body(), type=TokenGrant)
            emulator.tokens.grant(grant.token, grant.scopes)
        except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as error:
            return bad_request(str(error))
        scopes = None if grant.scopes is None else sorted(set(grant.scopes))
        return JSONResponse({"tokens": len(emulator.tokens), "scopes": scopes})

    async def revoke_token(request: Request) -> Response:
        try:
            order = msgspec.json.decode(await request.body(), type=TokenRevoke)
        except (msgspec.ValidationError, msgspec.DecodeError) as error:
            return bad_request(str(error))
        if not emulator.tokens.revoke(order.token):
            return JSONResponse(
                {"id": "not_found", "message": "no such token is in force"}, status_code=404
            )
        return JSONResponse({"tokens": len(emulator.tokens)})

    def droplet_entry(droplet_id: int) -> dict[str, Any]:
        d = state.droplets[droplet_id]
        return {
            "id": d.id,
            "name": d.name,
            "region": d.region,
            "status": "new" if state.is_booting(d.id) else "active",
            "tags": list(d.tags),
            "public_ipv4": d.public_ipv4,
            "private_ipv4": d.private_ipv4,
            "web_url": d.web_url,
            "ipv6": d.ipv6,
            "public_ipv6": d.public_ipv6,
            "reserved_ip": getattr(state.ip_of_droplet(d.id), "ip", None),
            "reserved_ipv6": getattr(state.ip_of_droplet(d.id, "ipv6"), "ip", None),
        }

    async def assign(request: Request) -> Response:
        try:
            order = msgspec.json.decode(await request.body(), type=ManualAssign)
        except (msgspec.ValidationError, msgspec.DecodeError) as error:
            return bad_request(str(error))
        ip = order.reserved_ip or emulator.edge_ip
        if ip is None:
            return bad_request("no reserved IP exists")
        try:
            entry = state.manual_assign(ip, order.droplet_id)
        except EmulatorError as error:
            return error_response(error)
        return JSONResponse(history_entry(entry))

    async def describe_state(request: Request) -> Response:
        state.settle()
        now = emulator.clock()
        return JSONResponse(
            {
                "now_monotonic": now,
                "edge_reserved_ip": emulator.edge_ip,
                "edge_reserved_ipv6": emulator.edge_ipv6,
                "reserved_ips": [
                    {
                        "ip": r.ip,
                        "region": r.region,
                        "droplet_id": r.droplet_id,
                        "locked": state.is_locked(r.ip),
                        "pending_action_id": getattr(state.pending_action(r.ip), "id", None),
                    }
                    for r in state.reserved_ips.values()
                ],
                "droplets": [droplet_entry(d) for d in sorted(state.droplets)],
                "actions": [
                    {
                        **render.action(a),
                        "reserved_ip": a.ip,
                        "droplet_id": a.target_droplet_id,
                        "status": a.status,
                        "completes_monotonic": a.completes_clock,
                    }
                    for a in sorted(state.actions.values(), key=lambda a: a.id)
                ],
                "settings": msgspec.to_builtins(emulator.settings),
                "faults": emulator.faults.describe(now),
            }
        )

    async def requests(request: Request) -> Response:
        return JSONResponse(emulator.requests.describe())

    async def clear_requests(request: Request) -> Response:
        emulator.requests.clear()
        return JSONResponse(emulator.requests.describe())

    return [
        Route("/_emulator/history", history, methods=["GET"]),
        Route("/_emulator/faults", get_faults, methods=["GET"]),
        Route("/_emulator/faults", post_faults, methods=["POST"]),
        Route("/_emulator/assign", assign, methods=["POST"]),
        Route("/_emulator/droplets", post_droplet, methods=["POST"]),
        Route("/_emulator/droplets/{droplet_id:int}", delete_droplet, methods=["DELETE"]),
        Route("/_emulator/tokens", grant_token, methods=["POST"]),
        Route("/_emulator/tokens/revoke", revoke_token, methods=["POST"]),
        Route("/_emulator/state", describe_state, methods=["GET"]),
        Route("/_emulator/requests", requests, methods=["GET"]),
        Route("/_emulator/requests", clear_requests, methods=["DELETE"]),
    ]
