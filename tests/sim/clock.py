"""Per-node clocks for the simulator: local time = offset + rate x true time.

The election core never reads a clock; the simulator hands each node its own local time.
Clock rates are what the lease argument in `sidecar/election.py` depends on: a leader
shortens its lease by `max_drift`, which is safe exactly when, for any two nodes a and b,

    rate_a / rate_b <= 1 / (1 - max_drift)

(a fast-clocked follower's promise, counted in its own seconds, must not end before a
slow-clocked leader's shortened lease). The simulator draws every rate from
[1 - max_drift / 2.2, 1 + max_drift / 2.2]; the largest ratio there, (1 + x) / (1 - x) with
x = max_drift / 2.2, stays within that bound because x <= max_drift / (2 - max_drift).
`extreme` puts every clock at one end of the interval, the worst case for the lease.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

#: The rate interval's half-width is max_drift divided by this (see the module docstring).
RATE_SPREAD_DIVISOR = 2.2


@dataclass(frozen=True, slots=True)
class NodeClock:
    """One node's monotonic clock as an affine function of the simulator's true time."""

    offset: float
    rate: float

    def local(self, true_time: float) -> float:
        return self.offset + self.rate * true_time

    def true_time_of(self, local_time: float) -> float:
        """The earliest true time at which this clock reads at least `local_time`.

        Rounding up matters: a timer set for a local deadline must fire when the node's
        clock has reached it, or the node would tick, find nothing due and re-arm the same
        timer forever.
        """
        t = (local_time - self.offset) / self.rate
        while self.local(t) < local_time:
            t = math.nextafter(t, math.inf)
        return t


def rate_bounds(max_drift: float) -> tuple[float, float]:
    half_width = max_drift / RATE_SPREAD_DIVISOR
    return 1 - half_width, 1 + half_width


def draw_clock(rng: random.Random, max_drift: float, *, extreme: bool = False) -> NodeClock:
    low, high = rate_bounds(max_drift)
    rate = rng.choice((low, high)) if extreme else rng.uniform(low, high)
    # Unrelated offsets: monotonic clocks on different machines share no epoch.
    return NodeClock(offset=rng.uniform(0.0, 1000.0), rate=rate)
