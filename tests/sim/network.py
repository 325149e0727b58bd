"""The simulated network: per-link loss, duplication, delay (hence reordering) and blocking.

Every directed link (a -> b) has its own profile, so one-way partitions and asymmetric
loss are just profiles. A packet's fate is decided when it is sent; packets already in
flight when a partition starts still arrive, as on a real network.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class LinkProfile:
    loss: float = 0.0
    duplicate: float = 0.0
    delay_min: float = 0.0002
    delay_max: float = 0.002
    #: Chance that a packet is held back for up to `straggler_max` seconds: a packet that
    #: arrives after many later ones (old heartbeats, resigns and votes from past terms).
    straggler: float = 0.0
    straggler_max: float = 0.0
    blocked: bool = False


#: A quiet LAN: no loss, sub-millisecond to 2 ms delay.
CLEAN = LinkProfile()


class Network:
    """Decides, from the simulation's one random stream, when each copy of a packet lands."""

    def __init__(self, rng: random.Random, ids: list[int]) -> None:
        self._rng = rng
        self.links: dict[tuple[int, int], LinkProfile] = {
            (a, b): CLEAN for a in ids for b in ids if a != b
        }

    def delays(self, src: int, dst: int) -> list[float]:
        """The delay of every copy of one packet that will arrive (none when it is lost)."""
        link = self.links[(src, dst)]
        if link.blocked or self._rng.random() < link.loss:
            return []
        copies = 2 if self._rng.random() < link.duplicate else 1
        return [self._delay(link) for _ in range(copies)]

    def _delay(self, link: LinkProfile) -> float:
        delay = self._rng.uniform(link.delay_min, link.delay_max)
        if link.straggler and self._rng.random() < link.straggler:
            delay += self._rng.uniform(0.0, link.straggler_max)
        return delay

    def set_all(self, profile: LinkProfile) -> None:
        for key in self.links:
            self.links[key] = profile

    def block(self, src: int, dst: int, blocked: bool = True) -> None:
        self.links[(src, dst)] = replace(self.links[(src, dst)], blocked=blocked)

    def partition(self, side_a: set[int], side_b: set[int], *, one_way: bool = False) -> None:
        """Cut traffic from side_a to side_b (and back, unless one_way)."""
        for a in side_a:
            for b in side_b:
                self.block(a, b)
                if not one_way:
                    self.block(b, a)

    def unblock_all(self) -> None:
        for key, link in self.links.items():
            self.links[key] = replace(link, blocked=False)
