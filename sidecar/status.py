"""`/healthz`, `/status` (JSON) and `/metrics` (Prometheus text) on a local port.

A tiny ASGI app served by hypercorn on Trio: three read-only GET routes do not need a web
framework. Every answer is computed when the request arrives, against the clock, so a
leader whose lease ran out while it was paused never reports `leader`.
Other modules add their own part of `/status` with `add_section(name, producer)`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sidecar.config import Address
from sidecar.election import View
from sidecar.metrics import Metrics
from sidecar.node import Node

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def view_to_json(view: View) -> dict[str, Any]:
    """The `/status` core fields (DESIGN.md's stable interface) from one election snapshot."""
    return {
        "node_id": view.node_id,
        "role": str(view.role),
        "term": view.term,
        "leader_id": view.leader_id,
        "eligible": view.eligible,
        "healthy": view.healthy,
        "viable": view.viable,
        "lease_remaining": _round(view.lease_remaining),
        "promise_to": view.promise_to,
        "promise_remaining": _round(view.promise_remaining),
        "in_startup_quiet": view.in_startup_quiet,
        "waiting_for": view.waiting_for,
        "peers": [
            {
                "id": peer.id,
                "alive": peer.alive,
                "eligible": peer.eligible,
                "healthy": peer.healthy,
                "viable": peer.viable,
                "last_heard_age": _round(peer.last_heard_age),
                "rtt": _round(peer.rtt),
                "term": peer.term,
                "leader_id": peer.leader_id,
            }
            for peer in view.peers
        ],
    }


class StatusApp:
    """The ASGI application; one instance per node."""

    def __init__(self, node: Node, metrics: Metrics) -> None:
        self._node = node
        self._metrics = metrics
        self._sections: dict[str, Callable[[], Any]] = {}

    def add_section(self, name: str, producer: Callable[[], Any]) -> None:
        """Add `name` to `/status`, filled by `producer()` (JSON-able) on every request."""
        self._sections[name] = producer

    def status(self) -> dict[str, Any]:
        body = view_to_json(self._node.view())
        reports = self._node.peer_reports()
        for peer in body["peers"]:
            peer.update(reports.get(peer["id"], {}))
        config = self._node.config
        body["membership"] = {
            "cluster_name": config.cluster_name,
            "members": [sorted(m) for m in config.memberships],
            "digests": [f"{d:016x}" for d in config.membership_digests],
            "changing": config.changing_membership,
            "quorum": config.quorum_text,
        }
        body["profile"] = config.profile
        body["packets"] = {
            **self._node.counter_values(),
            "dropped": dict(self._node.drop_counts()),
        }
        for name, producer in self._sections.items():
            try:
                body[name] = producer()
            except Exception as exc:  # a broken section must not hide the election's state
                log.exception("status section failed", extra={"section": name})
                body[name] = {"error": type(exc).__name__}
        return body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["method"] not in ("GET", "HEAD"):
            await _respond(send, 405, b"method not allowed\n", "text/plain", [(b"allow", b"GET")])
            return
        path = scope["path"]
        if path == "/healthz":
            await _respond(send, 200, b"ok\n", "text/plain")
        elif path == "/status":
            body = json.dumps(self.status(), indent=2).encode() + b"\n"
            await _respond(send, 200, body, "application/json")
        elif path == "/metrics":
            await _respond(send, 200, generate_latest(self._metrics.registry), CONTENT_TYPE_LATEST)
        else:
            await _respond(
                send, 404, b"not found: try /status, /metrics or /healthz\n", "text/plain"
            )

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: str,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type.encode()), *(headers or [])],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def serve_status(
    app: StatusApp,
    listen: Address,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled."""
    config = HypercornConfig()
    config.bind = [str(listen)]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 0.5
    await serve(app, config, task_status=task_status)  # type: ignore[arg-type]
