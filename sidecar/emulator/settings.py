"""The emulator's tunable realism, as one typed settings section.

Each knob exists because the real API behaves that way and a client must cope with it:
actions take time, a freshly created action can briefly be unknown to a read replica,
the edge (the network) learns about a move a little after the API says it is done, and
the rate limits are real. Defaults copy the real API where it has a documented number.
"""

from __future__ import annotations

import msgspec


class EmulatorSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """How the emulated API and edge behave over time."""

    action_seconds: float = 2.0
    """How long an assign/unassign action stays `in-progress`; the IP moves only at its end."""

    action_404_seconds: float = 0.0
    """For this long after the POST, reading the new action answers 404 (replica lag)."""

    propagation_delay: float = 0.0
    """The edge routes by who held the IP this many seconds ago (network convergence)."""

    rate_limit_per_minute: int = 250
    """Requests a token may make in any 60 s window (the real API's limit)."""

    rate_limit_per_hour: int = 5000
    """Requests a token may make in any 3600 s window (the real API's limit)."""

    edge_timeout: float = 10.0
    """How long the edge waits for a droplet's web service before answering 502."""

    allow_mixed_families: bool = True
    """Whether one droplet may hold a reserved IPv4 and a reserved IPv6 at once. The real
    API does not document it; the default assumes it may (a dual-stack service), and
    `false` makes such an assign a 422 so a client can be tested against the other
    answer. Either way a droplet holds at most one address of each family."""

    def validate(self) -> None:
        """Reject values that would make the emulator lie in a way no real API does."""
        for name in ("action_seconds", "action_404_seconds", "propagation_delay"):
            value = getattr(self, name)
            if not value >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if not self.edge_timeout > 0.0:
            raise ValueError(f"edge_timeout must be > 0, got {self.edge_timeout!r}")
        for name in ("rate_limit_per_minute", "rate_limit_per_hour"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value!r}")
