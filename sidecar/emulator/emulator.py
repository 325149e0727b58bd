"""One emulated DigitalOcean account: its state plus the machinery around the API.

The API app, the metadata service, the admin endpoints and the edge all share one
`Emulator`, so a move made through the API is what the metadata service reports and what
the edge routes by, exactly as on the real platform (minus the propagation delay the
edge adds on purpose).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

from .faults import Faults
from .ratelimit import RateLimiter
from .settings import EmulatorSettings
from .state import AccountState, Clock, Family
from .tokens import TokenRegistry


class RequestLog:
    """Counts of API requests by method, path and status, for tests of rate budgets."""

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, str, int]] = Counter()

    def record(self, method: str, path: str, status: int) -> None:
        self._counts[(method, path, status)] += 1

    def clear(self) -> None:
        self._counts.clear()

    def describe(self) -> dict[str, Any]:
        """The JSON shape of `GET /_emulator/requests`."""
        rows = [
            {"method": method, "path": path, "status": status, "count": count}
            for (method, path, status), count in sorted(self._counts.items())
        ]
        return {"total": sum(self._counts.values()), "requests": rows}


class Emulator:
    """The shared heart of the emulator process (or of an in-process test).

    `token` is accepted with full access, or only with `token_scopes` when given (a
    custom-scoped token); `tokens` can issue, re-scope and revoke tokens later.
    """

    def __init__(
        self,
        token: str,
        settings: EmulatorSettings | None = None,
        *,
        token_scopes: Iterable[str] | None = None,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
        rng: random.Random | None = None,
        edge_ip: str | None = None,
        edge_ipv6: str | None = None,
    ) -> None:
        if not token:
            raise ValueError("the emulator needs a non-empty API token to accept")
        self.token = token
        self.tokens = TokenRegistry()
        self.tokens.grant(token, token_scopes)
        self.settings = settings if settings is not None else EmulatorSettings()
        self.clock = clock
        self.state = AccountState(self.settings, clock=clock, wall_clock=wall_clock)
        self.faults = Faults()
        self.limiter = RateLimiter(
            self.settings.rate_limit_per_minute, self.settings.rate_limit_per_hour
        )
        self.requests = RequestLog()
        self.rng = rng if rng is not None else random.Random()
        self._edge_ip = edge_ip
        self._edge_ipv6 = edge_ipv6

    @property
    def edge_ip(self) -> str | None:
        """The reserved IPv4 the edge serves: the one chosen, else the first one added."""
        return self._edge_ip or self._first("ipv4")

    @property
    def edge_ipv6(self) -> str | None:
        """The reserved IPv6 the IPv6 edge serves: the one chosen, else the first added."""
        return self._edge_ipv6 or self._first("ipv6")

    def edge_address(self, family: Family) -> str | None:
        return self.edge_ip if family == "ipv4" else self.edge_ipv6

    def _first(self, family: Family) -> str | None:
        return next((r.ip for r in self.state.reserved_ips.values() if r.family == family), None)
