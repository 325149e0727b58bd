"""Injected failures of the emulated API, switched on and off through `/_emulator/faults`.

They exist so tests can show the sidecar's client surviving what the real API does on a
bad day: slowness, random 5xx, a full outage (answers 503, or accepts the connection and
never answers), a burst of 429s, actions that end `errored`, actions that end with a status
the spec does not list (DigitalOcean once answered `done` instead of `completed`), and a
droplet event (a backup, a resize) that makes the API refuse to assign a reserved IP to
that droplet until it ends. Deadlines are values of the emulator's clock, so "for N
seconds" works the same under a mock clock.

Faults touch only the `/v2/` API: the metadata service and the admin endpoints stay up,
so a test can always switch a fault off again.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from .state import DROPLET_EVENT_KINDS, DropletEventKind

OutageMode = Literal["error", "hang"]

ERROR_IDS = {
    500: "server_error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "gateway_timeout",
}


class DropletEvent(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """A droplet event to start now: `{"droplet_id": 1002, "type": "backup", "seconds": 30}`."""

    droplet_id: int
    type: DropletEventKind = "backup"
    seconds: float = 30.0


class FaultUpdate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """A POST to `/_emulator/faults`: only the fields given change.

    `clear: true` first resets every fault, so `{"clear": true}` alone switches all off.
    An outage is given either as `outage_seconds` (from now) or `outage_until_monotonic`
    (a deadline on the emulator's clock, `time.monotonic()` when run as a process).
    """

    clear: bool = False
    latency_seconds: float | None = None
    error_rate: float | None = None
    error_status: int | None = None
    outage_seconds: float | None = None
    outage_until_monotonic: float | None = None
    outage_mode: OutageMode | None = None
    force_429_seconds: float | None = None
    action_error_rate: float | None = None
    action_completed_status: str | None = None
    """How a completed action's `status` is spelled from now on ("" restores `completed`)."""
    droplet_event: DropletEvent | None = None
    """Start this droplet event (state, not a switch: `clear` does not end it)."""
    path_prefixes: list[str] | None = None
    """Latency, errors, outages and forced 429s hit only `/v2/` paths starting with one
    of these (e.g. `["/v2/reserved_ipv6"]`: the IPv6 API down, IPv4 fine); `[]` restores
    "every path"."""

    def validate(self) -> None:
        for name in ("error_rate", "action_error_rate"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value!r}")
        for name in ("latency_seconds", "outage_seconds", "force_429_seconds"):
            value = getattr(self, name)
            if value is not None and not value >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if self.error_status is not None and self.error_status not in ERROR_IDS:
            raise ValueError(f"error_status must be one of {sorted(ERROR_IDS)}")
        if self.outage_seconds is not None and self.outage_until_monotonic is not None:
            raise ValueError("give outage_seconds or outage_until_monotonic, not both")
        status = self.action_completed_status
        if status is not None and status in ("in-progress", "errored"):
            raise ValueError(f"action_completed_status {status!r} would not be an unknown status")
        if status is not None and len(status) > 64:
            raise ValueError("action_completed_status is longer than 64 characters")
        for prefix in self.path_prefixes or ():
            if not prefix.startswith("/v2/"):
                raise ValueError(f"path_prefixes: {prefix!r} does not start with /v2/")
        event = self.droplet_event
        if event is not None and event.type not in DROPLET_EVENT_KINDS:
            raise ValueError(f"droplet_event.type must be one of {', '.join(DROPLET_EVENT_KINDS)}")
        if event is not None and not event.seconds > 0.0:
            raise ValueError(f"droplet_event.seconds must be > 0, got {event.seconds!r}")


@dataclass
class Faults:
    """The faults in force now."""

    latency_seconds: float = 0.0
    error_rate: float = 0.0
    error_status: int = 503
    outage_until: float | None = None
    outage_mode: OutageMode = "error"
    force_429_until: float | None = None
    action_error_rate: float = 0.0
    action_completed_status: str = "completed"
    path_prefixes: tuple[str, ...] = ()

    def applies_to(self, path: str) -> bool:
        """Whether the request faults hit `path` (every path unless prefixes are set)."""
        return not self.path_prefixes or path.startswith(self.path_prefixes)

    def update(self, change: FaultUpdate, now: float) -> None:
        change.validate()
        if change.clear:
            fresh = Faults()
            self.__dict__.update(fresh.__dict__)
        if change.latency_seconds is not None:
            self.latency_seconds = change.latency_seconds
        if change.error_rate is not None:
            self.error_rate = change.error_rate
        if change.error_status is not None:
            self.error_status = change.error_status
        if change.outage_mode is not None:
            self.outage_mode = change.outage_mode
        if change.outage_seconds is not None:
            self.outage_until = now + change.outage_seconds
        if change.outage_until_monotonic is not None:
            self.outage_until = change.outage_until_monotonic
        if change.force_429_seconds is not None:
            self.force_429_until = now + change.force_429_seconds
        if change.action_error_rate is not None:
            self.action_error_rate = change.action_error_rate
        if change.action_completed_status is not None:
            self.action_completed_status = change.action_completed_status or "completed"
        if change.path_prefixes is not None:
            self.path_prefixes = tuple(change.path_prefixes)

    def outage_remaining(self, now: float) -> float:
        return max(0.0, self.outage_until - now) if self.outage_until is not None else 0.0

    def force_429_remaining(self, now: float) -> float:
        if self.force_429_until is None:
            return 0.0
        return max(0.0, self.force_429_until - now)

    def should_fail(self, rng: random.Random) -> bool:
        return self.error_rate > 0.0 and rng.random() < self.error_rate

    def should_error_action(self, rng: random.Random) -> bool:
        return self.action_error_rate > 0.0 and rng.random() < self.action_error_rate

    def describe(self, now: float) -> dict[str, Any]:
        """The JSON shape of `GET /_emulator/faults`."""
        return {
            "latency_seconds": self.latency_seconds,
            "error_rate": self.error_rate,
            "error_status": self.error_status,
            "outage_mode": self.outage_mode,
            "outage_until_monotonic": self.outage_until,
            "outage_remaining_seconds": self.outage_remaining(now),
            "force_429_until_monotonic": self.force_429_until,
            "force_429_remaining_seconds": self.force_429_remaining(now),
            "action_error_rate": self.action_error_rate,
            "action_completed_status": self.action_completed_status,
            "path_prefixes": list(self.path_prefixes),
            "now_monotonic": now,
        }
