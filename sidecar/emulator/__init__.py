"""A local stand-in for the slice of the DigitalOcean API the sidecar uses.

It serves reserved-IP reads, assign/unassign actions that take time, droplets (listed by
tag, with their networks) and their events, scoped tokens, the per-droplet metadata
service, fault injection and an assignment history (see `app.build_app`), plus an edge
that routes traffic to the IP's holder (`edge.build_edge_app`). Tests drive it
in-process through `httpx.ASGITransport`; `fip-sidecar emulate` runs it as a process.


The names below load on first use: `fip-sidecar run` builds the `emulate` sub-command's
flags from `cli`, and must not pay for the web framework (several MB of a node's RSS).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import build_app
    from .edge import build_edge_app
    from .emulator import Emulator
    from .settings import EmulatorSettings
    from .state import EmulatorError

__all__ = ["Emulator", "EmulatorError", "EmulatorSettings", "build_app", "build_edge_app"]

_HOMES = {
    "build_app": ".app",
    "build_edge_app": ".edge",
    "Emulator": ".emulator",
    "EmulatorSettings": ".settings",
    "EmulatorError": ".state",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name], __name__), name)
