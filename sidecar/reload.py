"""What a reload (SIGHUP, `fip-sidecar reload`) may change in a running node, and what not.

A reload re-reads the same config file (and environment) and applies the difference
without giving up leadership. Some settings cannot change under a live process without
breaking a promise the node has already made to its peers or to the operator:

* `node_id`, `bind`, the cluster key: peers know the node by them; changing them is a new
  member, which is a restart (and, for the id, a membership change).
* `timing` / `profile`: leases and promises are computed with these on *both* sides, and a
  follower promising for less time than its leader counts on would break the lease
  argument. All members must change them together, by restart.
* `status_listen`, `floating_ip`, `addresses`, `digitalocean`: the sockets, the client and
  the assigners are built at start; changing them under the leader could strand an
  assignment in flight.

Everything else applies live: peer addresses (a replaced droplet), membership (through the
joining/leaving procedure), the health check, hooks, the assigner's settings, the log level
and `max_clock_skew`. A reload that touches a setting of the first kind is refused as a
whole, with one log line naming the settings, and the node keeps its old config.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.config import Config

#: Settings a running node cannot take over (see the module docstring), by config key.
RESTART_ONLY = (
    "node_id",
    "bind",
    "cluster_key",
    "timing",
    "profile",
    "status_listen",
    "floating_ip",
    "addresses",
    "digitalocean",
)

#: Settings applied live, by config key, in the order a reload applies them.
LIVE = (
    "peers",
    "eligible",
    "cluster_name",
    "memberships",
    "max_clock_skew",
    "health",
    "hooks",
    "assigner",
    "log_level",
)


@dataclass(frozen=True, slots=True)
class Plan:
    """The difference between the running config and the reloaded one."""

    live: tuple[str, ...]
    restart_only: tuple[str, ...]

    @property
    def refused(self) -> bool:
        return bool(self.restart_only)

    @property
    def membership_changed(self) -> bool:
        return any(key in self.live for key in ("peers", "eligible", "cluster_name", "memberships"))


def plan(old: Config, new: Config) -> Plan:
    """Which settings differ, split into those a reload applies and those it refuses."""
    return Plan(
        live=tuple(key for key in LIVE if getattr(old, key) != getattr(new, key)),
        restart_only=tuple(key for key in RESTART_ONLY if getattr(old, key) != getattr(new, key)),
    )
