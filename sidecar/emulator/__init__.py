"""A local stand-in for the slice of the DigitalOcean API the sidecar uses.

It serves reserved-IP reads, assign/unassign actions that take time, the per-droplet
metadata service, fault injection and an assignment history (see `app.build_app`), plus
an edge that routes traffic to the IP's holder (`edge.build_edge_app`). Tests drive it
in-process through `httpx.ASGITransport`; `fip-sidecar emulate` runs it as a process.
"""

from .app import build_app
from .edge import build_edge_app
from .emulator import Emulator
from .settings import EmulatorSettings
from .state import EmulatorError

__all__ = ["Emulator", "EmulatorError", "EmulatorSettings", "build_app", "build_edge_app"]
