"""`/healthz`, `/status` (JSON) and `/metrics` (Prometheus text) on a local port.

What the routes contain lives here (`StatusApp`); how they are served is `httpserver.py`,
a small HTTP/1.1 server over h11: three read-only GET routes do not need a web framework.
Every answer is computed when the request arrives, against the clock, so a leader whose
lease ran out while it was paused never reports `leader`.
Other modules add their own part of `/status` with `add_section(name, producer)`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import trio

from sidecar.config import Address
from sidecar.election import View
from sidecar.exposition import CONTENT_TYPE
from sidecar.httpserver import HTTPServer, Response, Route
from sidecar.metrics import Metrics
from sidecar.node import Node

log = logging.getLogger(__name__)

NOT_FOUND = "not found: try /status, /metrics or /healthz"


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
    """What `/healthz`, `/status` and `/metrics` answer; one instance per node."""

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

    def routes(self) -> dict[str, Route]:
        """What the status server serves, path by path."""
        return {
            "/healthz": lambda: Response(b"ok\n", "text/plain; charset=utf-8"),
            "/status": lambda: Response(
                json.dumps(self.status(), indent=2).encode() + b"\n", "application/json"
            ),
            "/metrics": lambda: Response(self._metrics.registry.render(), CONTENT_TYPE),
        }


async def serve_status(
    app: StatusApp,
    listen: Address,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled, with `httpserver.Limits`' defaults."""
    server = HTTPServer(app.routes(), not_found=NOT_FOUND)
    await server.serve(listen.host, listen.port, task_status=task_status)
