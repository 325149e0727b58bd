"""The `/v2/` API: reserved IPs (and their legacy `floating_ips` alias), reserved IPv6,
actions, droplets.

Every request passes one gate, in the real API's order as far as a client can tell:
injected outage and latency, then the per-token rate limit (429), then the bearer token
(401: unknown or revoked), then the token's scopes (403: a custom-scoped token without the
scope the operation names in the OpenAPI spec), then injected random errors, then the
route. Every answer, errors included, carries the `ratelimit-*` headers, and every error
body is `{id, message, request_id}`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from . import render
from .emulator import Emulator
from .faults import ERROR_IDS
from .state import Action, ActionKind, EmulatorError
from .tokens import Grant

JSON_TYPE = "application/json; charset=utf-8"
ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]

Handler = Callable[[Request], Awaitable[tuple[int, dict[str, Any]]]]


def json_response(status: int, body: dict[str, Any], headers: dict[str, str]) -> Response:
    return Response(
        json.dumps(body, separators=(",", ":")),
        status_code=status,
        headers=headers,
        media_type=JSON_TYPE,
    )


def bearer_token(request: Request) -> str:
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else ""


def forbidden() -> EmulatorError:
    return EmulatorError(403, "forbidden", "You do not have permission to perform this action.")


def grant_of(request: Request) -> Grant:
    """The token's grant, set by the gate before any handler runs."""
    grant: Grant = request.state.grant
    return grant


def action_body(
    emulator: Emulator, action: Action, project_id: str | None = None
) -> dict[str, Any]:
    """An action as the API shows it now (faults may respell its status)."""
    return render.action(
        action,
        with_project_id=project_id,
        completed_status=emulator.faults.action_completed_status,
    )


def page_params(request: Request) -> tuple[int, int]:
    """`page` and `per_page` as the real API reads them (per_page 1..200, default 20)."""
    try:
        page = int(request.query_params.get("page", "1"))
        per_page = int(request.query_params.get("per_page", "20"))
    except ValueError:
        raise EmulatorError(400, "bad_request", "page and per_page must be integers") from None
    return max(1, page), min(200, max(1, per_page))


class Gate:
    """Outage, latency, rate limit, auth and random errors around every API handler."""

    def __init__(self, emulator: Emulator) -> None:
        self.emulator = emulator

    def wrap(self, handler: Handler, scope: str | None) -> Callable[[Request], Awaitable[Response]]:
        """`handler` behind the gate; a scoped token needs `scope` (None: any token)."""

        async def endpoint(request: Request) -> Response:
            response = await self._answer(request, handler, scope)
            self.emulator.requests.record(request.method, request.url.path, response.status_code)
            return response

        return endpoint

    async def _answer(self, request: Request, handler: Handler, scope: str | None) -> Response:
        emulator = self.emulator
        faults = emulator.faults
        token = bearer_token(request)
        faulted = faults.applies_to(request.url.path)
        outage = faults.outage_remaining(emulator.clock()) if faulted else 0.0
        if outage > 0.0:
            if faults.outage_mode == "hang":
                await trio.sleep(outage)
            else:
                return self._error(token, 503, "service_unavailable", "Service unavailable.")
        if faulted and faults.latency_seconds > 0.0:
            await trio.sleep(faults.latency_seconds)
        now = emulator.clock()
        forced = faults.force_429_remaining(now) if faulted else 0.0
        if forced > 0.0:
            decision = emulator.limiter.refuse(token, now, forced)
        else:
            decision = emulator.limiter.check(token, now)
        headers = decision.headers(emulator.state.epoch_of(decision.reset_clock))
        if not decision.allowed:
            body = render.error("too_many_requests", "API rate limit exceeded.")
            return json_response(429, body, headers)
        grant = emulator.tokens.lookup(token) if token else None
        if grant is None:
            return json_response(
                401, render.error("unauthorized", "Unable to authenticate you"), headers
            )
        if scope is not None and not grant.allows(scope):
            error = forbidden()
            return json_response(403, render.error(error.error_id, error.message), headers)
        request.state.grant = grant
        if faulted and faults.should_fail(emulator.rng):
            status = faults.error_status
            body = render.error(ERROR_IDS[status], "Injected server error.")
            return json_response(status, body, headers)
        try:
            status, body = await handler(request)
        except EmulatorError as error:
            status, body = error.status, render.error(error.error_id, error.message)
        return json_response(status, body, headers)

    def _error(self, token: str, status: int, error_id: str, message: str) -> Response:
        """An error that does not count against the budget but still reports it."""
        now = self.emulator.clock()
        decision = self.emulator.limiter.check(token, now, consume=False)
        headers = decision.headers(self.emulator.state.epoch_of(decision.reset_clock))
        return json_response(status, render.error(error_id, message), headers)


class ReservedIPResource:
    """Handlers for one spelling of the resource: `reserved_ip` or legacy `floating_ip`."""

    def __init__(self, emulator: Emulator, singular: str) -> None:
        self.emulator = emulator
        self.singular = singular
        self.plural = singular + "s"

    def _render_ip(self, ip: str) -> dict[str, Any]:
        state = self.emulator.state
        reserved = state.reserved_ip(ip, "ipv4")
        holder = state.droplets.get(reserved.droplet_id) if reserved.droplet_id else None
        return render.reserved_ip(reserved, holder, locked=state.is_locked(ip))

    async def list_ips(self, request: Request) -> tuple[int, dict[str, Any]]:
        page, per_page = page_params(request)
        ips = self.emulator.state.list_reserved_ips()
        chunk = ips[(page - 1) * per_page : page * per_page]
        base = str(request.url.replace(query=""))
        return 200, {
            self.plural: [self._render_ip(r.ip) for r in chunk],
            "links": render.page_links(base, page, per_page, len(ips)),
            "meta": {"total": len(ips)},
        }

    async def get(self, request: Request) -> tuple[int, dict[str, Any]]:
        return 200, {self.singular: self._render_ip(request.path_params["ip"])}

    async def list_actions(self, request: Request) -> tuple[int, dict[str, Any]]:
        ip = request.path_params["ip"]
        self.emulator.state.reserved_ip(ip, "ipv4")
        page, per_page = page_params(request)
        actions = self.emulator.state.list_actions(ip=ip)
        chunk = actions[(page - 1) * per_page : page * per_page]
        base = str(request.url.replace(query=""))
        return 200, {
            "actions": [action_body(self.emulator, a) for a in chunk],
            "links": render.page_links(base, page, per_page, len(actions)),
            "meta": {"total": len(actions)},
        }

    async def post_action(self, request: Request) -> tuple[int, dict[str, Any]]:
        reserved = self.emulator.state.reserved_ip(request.path_params["ip"], "ipv4")
        kind, droplet_id = parse_action_request(await request.body())
        action = self.emulator.state.start_action(
            reserved.ip,
            kind,
            droplet_id,
            resource_type=self.singular,
            will_error=self.emulator.faults.should_error_action(self.emulator.rng),
        )
        return 201, {"action": action_body(self.emulator, action, reserved.project_id)}

    async def get_action(self, request: Request) -> tuple[int, dict[str, Any]]:
        reserved = self.emulator.state.reserved_ip(request.path_params["ip"], "ipv4")
        action = self.emulator.state.action(request.path_params["action_id"], ip=reserved.ip)
        return 200, {"action": action_body(self.emulator, action, reserved.project_id)}

    def routes(self, gate: Gate) -> list[BaseRoute]:
        base = f"/v2/{self.plural}"
        read, update = "reserved_ip:read", "reserved_ip:update"
        return [
            Route(base, gate.wrap(self.list_ips, read), methods=["GET"]),
            Route(base + "/{ip}", gate.wrap(self.get, read), methods=["GET"]),
            Route(base + "/{ip}/actions", gate.wrap(self.list_actions, read), methods=["GET"]),
            Route(base + "/{ip}/actions", gate.wrap(self.post_action, update), methods=["POST"]),
            Route(
                base + "/{ip}/actions/{action_id:int}",
                gate.wrap(self.get_action, read),
                methods=["GET"],
            ),
        ]


class ReservedIPv6Resource:
    """`/v2/reserved_ipv6`: list, get, and POST actions. As in the spec there is no
    per-address action GET (actions are read through `/v2/actions/{id}`), no `locked`
    field, and no legacy `floating_` spelling."""

    def __init__(self, emulator: Emulator) -> None:
        self.emulator = emulator

    def _render_ip(self, ip: str) -> dict[str, Any]:
        state = self.emulator.state
        reserved = state.reserved_ip(ip, "ipv6")
        holder = state.droplets.get(reserved.droplet_id) if reserved.droplet_id else None
        return render.reserved_ipv6(reserved, holder)

    async def list_ips(self, request: Request) -> tuple[int, dict[str, Any]]:
        page, per_page = page_params(request)
        ips = self.emulator.state.list_reserved_ips("ipv6")
        chunk = ips[(page - 1) * per_page : page * per_page]
        base = str(request.url.replace(query=""))
        return 200, {
            "reserved_ipv6s": [self._render_ip(r.ip) for r in chunk],
            "links": render.page_links(base, page, per_page, len(ips)),
            "meta": {"total": len(ips)},
        }

    async def get(self, request: Request) -> tuple[int, dict[str, Any]]:
        return 200, {"reserved_ipv6": self._render_ip(request.path_params["ip"])}

    async def post_action(self, request: Request) -> tuple[int, dict[str, Any]]:
        reserved = self.emulator.state.reserved_ip(request.path_params["ip"], "ipv6")
        kind, droplet_id = parse_action_request(await request.body())
        action = self.emulator.state.start_action(
            reserved.ip,
            kind,
            droplet_id,
            resource_type="reserved_ipv6",
            will_error=self.emulator.faults.should_error_action(self.emulator.rng),
        )
        return 201, {"action": action_body(self.emulator, action)}

    def routes(self, gate: Gate) -> list[BaseRoute]:
        base = "/v2/reserved_ipv6"
        return [
            Route(base, gate.wrap(self.list_ips, "reserved_ip:read"), methods=["GET"]),
            Route(base + "/{ip}", gate.wrap(self.get, "reserved_ip:read"), methods=["GET"]),
            Route(
                base + "/{ip}/actions",
                gate.wrap(self.post_action, "reserved_ip:update"),
                methods=["POST"],
            ),
        ]


class DropletResource:
    """`GET /v2/droplets` (filtered by `tag_name` or `name`, paginated) and one droplet."""

    def __init__(self, emulator: Emulator) -> None:
        self.emulator = emulator

    def _render(self, droplet_id: int) -> dict[str, Any]:
        state = self.emulator.state
        droplet = state.droplet(droplet_id)
        return render.droplet(droplet, booting=state.is_booting(droplet_id))

    async def list_droplets(self, request: Request) -> tuple[int, dict[str, Any]]:
        tag = request.query_params.get("tag_name")
        name = request.query_params.get("name")
        if tag is not None and not grant_of(request).allows("tag:read"):
            raise forbidden()  # the spec: `tag_name` "Requires `tag:read` scope"
        page, per_page = page_params(request)
        droplets = self.emulator.state.list_droplets(tag=tag, name=name)
        chunk = droplets[(page - 1) * per_page : page * per_page]
        base = str(request.url.replace(query=""))
        kept = {k: v for k, v in (("tag_name", tag), ("name", name)) if v is not None}
        return 200, {
            "droplets": [self._render(d.id) for d in chunk],
            "links": render.page_links(base, page, per_page, len(droplets), kept),
            "meta": {"total": len(droplets)},
        }

    async def get(self, request: Request) -> tuple[int, dict[str, Any]]:
        return 200, {"droplet": self._render(request.path_params["droplet_id"])}

    def routes(self, gate: Gate) -> list[BaseRoute]:
        return [
            Route("/v2/droplets", gate.wrap(self.list_droplets, "droplet:read"), methods=["GET"]),
            Route(
                "/v2/droplets/{droplet_id:int}",
                gate.wrap(self.get, "droplet:read"),
                methods=["GET"],
            ),
        ]


def parse_action_request(raw: bytes) -> tuple[ActionKind, int | None]:
    """Read `{"type": "assign", "droplet_id": N}` or `{"type": "unassign"}`."""
    try:
        body = json.loads(raw)
    except ValueError:
        raise EmulatorError(400, "bad_request", "error parsing request body") from None
    if not isinstance(body, dict):
        raise EmulatorError(400, "bad_request", "error parsing request body")
    kind = body.get("type")
    if kind == "unassign":
        return "unassign", None
    if kind == "assign":
        droplet_id = body.get("droplet_id")
        if not isinstance(droplet_id, int) or isinstance(droplet_id, bool):
            raise EmulatorError(
                422, "unprocessable_entity", "droplet_id is required and must be an integer"
            )
        return "assign", droplet_id
    raise EmulatorError(422, "unprocessable_entity", "type must be one of 'assign' or 'unassign'")


def api_routes(emulator: Emulator) -> list[BaseRoute]:
    """Every `/v2/` route, ending with a JSON 404 for anything else under `/v2/`."""
    gate = Gate(emulator)

    async def get_action(request: Request) -> tuple[int, dict[str, Any]]:
        action = emulator.state.action(request.path_params["action_id"])
        return 200, {"action": action_body(emulator, action)}

    async def list_actions(request: Request) -> tuple[int, dict[str, Any]]:
        page, per_page = page_params(request)
        actions = emulator.state.list_actions()
        chunk = actions[(page - 1) * per_page : page * per_page]
        base = str(request.url.replace(query=""))
        return 200, {
            "actions": [action_body(emulator, a) for a in chunk],
            "links": render.page_links(base, page, per_page, len(actions)),
            "meta": {"total": len(actions)},
        }

    async def unknown(request: Request) -> tuple[int, dict[str, Any]]:
        return 404, render.error("not_found", "The resource you requested could not be found.")

    return [
        *ReservedIPResource(emulator, "reserved_ip").routes(gate),
        *ReservedIPResource(emulator, "floating_ip").routes(gate),
        *ReservedIPv6Resource(emulator).routes(gate),
        *DropletResource(emulator).routes(gate),
        Route("/v2/actions", gate.wrap(list_actions, "actions:read"), methods=["GET"]),
        Route(
            "/v2/actions/{action_id:int}", gate.wrap(get_action, "actions:read"), methods=["GET"]
        ),
        Route("/v2/{rest:path}", gate.wrap(unknown, None), methods=ALL_METHODS),
    ]
