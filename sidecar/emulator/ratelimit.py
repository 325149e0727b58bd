"""The real API's rate limit: 250 requests a minute and 5,000 an hour per token.

DigitalOcean counts requests in sliding windows and reports the *hourly* window in the
`ratelimit-limit`, `ratelimit-remaining` and `ratelimit-reset` headers of every response.
A refused request, whichever window refused it, says `ratelimit-remaining: 0` (the API
documentation's "rate exceeded" sample) and carries `retry-after` (the burst limit's
header since 2023). A client watching only `ratelimit-remaining` on successes can still be
refused by the per-minute window while the hourly count is far from zero.

Refused requests are not counted, so a client that backs off as told recovers.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

MINUTE = 60.0
HOUR = 3600.0


@dataclass(frozen=True)
class RateDecision:
    """The verdict on one request, and what the rate-limit headers should say."""

    allowed: bool
    limit: int
    remaining: int
    reset_clock: float
    retry_after_seconds: int

    def headers(self, epoch_of_clock: float) -> dict[str, str]:
        """The real API's headers; `epoch_of_clock` is the wall time of `reset_clock`."""
        headers = {
            "ratelimit-limit": str(self.limit),
            "ratelimit-remaining": str(self.remaining),
            "ratelimit-reset": str(math.ceil(epoch_of_clock)),
        }
        if not self.allowed:
            headers["retry-after"] = str(self.retry_after_seconds)
        return headers


class RateLimiter:
    """Sliding minute and hour windows per key (the key is the bearer token presented)."""

    def __init__(self, per_minute: int, per_hour: int) -> None:
        self.per_minute = per_minute
        self.per_hour = per_hour
        self._times: dict[str, list[float]] = {}

    def check(self, key: str, now: float, *, consume: bool = True) -> RateDecision:
        """Decide whether a request at `now` fits; count it if it does and `consume`."""
        times = self._times.setdefault(key, [])
        del times[: bisect.bisect_right(times, now - HOUR)]
        in_minute = len(times) - bisect.bisect_right(times, now - MINUTE)
        retry_after = 0.0
        if len(times) >= self.per_hour:
            retry_after = times[0] + HOUR - now
        elif in_minute >= self.per_minute:
            retry_after = times[len(times) - in_minute] + MINUTE - now
        # Decided by the counts, not by retry_after: at the exact window edge a float sum
        # can make retry_after 0.0 for a request that does not fit (found by hypothesis).
        allowed = len(times) < self.per_hour and in_minute < self.per_minute
        if allowed and consume:
            times.append(now)
        reset_clock = times[0] + HOUR if times else now
        return RateDecision(
            allowed=allowed,
            limit=self.per_hour,
            remaining=max(0, self.per_hour - len(times)) if allowed else 0,
            reset_clock=reset_clock,
            retry_after_seconds=max(1, math.ceil(retry_after)) if not allowed else 0,
        )

    def refuse(self, key: str, now: float, retry_after: float) -> RateDecision:
        """A forced 429 (fault injection) that still reports the true window."""
        current = self.check(key, now, consume=False)
        return RateDecision(
            allowed=False,
            limit=current.limit,
            remaining=0,
            reset_clock=current.reset_clock,
            retry_after_seconds=max(1, math.ceil(retry_after)),
        )
