"""What the runtime learns about each peer from authentic packets, beyond the election.

The election core sees one process per peer id and nothing about keys, clocks or
configurations. This module sits between the codec and the core and answers the questions
an operator asks when a peer is not counted:

* **Which process is node N?** Each process has a random incarnation. The first one heard
  is *current*; another one takes over only once the current one has been silent for
  `switch_after` (a restart). Packets from a second incarnation while the current one is
  still talking are a **duplicate node id** (a cloned droplet, a container started twice):
  they are dropped before the core, so the genuine node keeps its place, and once the
  current process has been heard again after the other appeared, it is reported.
* **Is its clock off?** The wall clock only travels for this: the offset of each peer's
  clock from ours, smoothed, with a warning past `max_clock_skew`. Nothing depends on it.
* **Why are its packets refused?** Wrong cluster key (seen on the peer's own socket or
  from its configured address), a different membership (with the member lists when the
  peer sent them), or stale challenges.

Sans-IO like the core: every method takes `now` (monotonic seconds) and logs nothing;
`take_warnings()` hands the runtime what deserves one WARNING line each.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

#: How long a refusal or a second process stays in /status after its last packet.
RECENT = 5.0
#: Offset samples are smoothed with this weight for the newest (an EWMA).
_OFFSET_WEIGHT = 0.2


class Verdict(enum.Enum):
    """What to do with an accepted packet from a peer."""

    PASS = "pass"
    RESTARTED = "restarted"  # pass it, after telling the core the peer is a new process
    DUPLICATE = "duplicate"  # drop: a second live process with the same id


@dataclass(slots=True)
class _Incarnation:
    first_heard: float
    last_heard: float
    source: str | None


@dataclass(slots=True)
class PeerRecord:
    """Everything noticed about one peer id; read by /status."""

    id: int
    current: int | None = None
    current_last_heard: float = -math.inf
    others: dict[int, _Incarnation] = field(default_factory=dict)
    duplicate_reported: set[int] = field(default_factory=set)
    clock_offset: float | None = None
    clock_warned: bool = False
    last_bad_mac: float = -math.inf
    bad_mac_source: str | None = None
    bad_mac_warned: bool = False
    last_mismatch: float = -math.inf
    mismatch_since: float = -math.inf
    mismatch_digests: tuple[int, ...] = ()
    mismatch_members: tuple[tuple[int, bool], ...] | None = None
    mismatch_warned: tuple[int, ...] | None = None
    last_stale: float = -math.inf
    restarts: int = 0


@dataclass(frozen=True, slots=True)
class Warning:
    """One line an operator should see, with structured fields for the JSON log."""

    message: str
    fields: dict[str, object]


class PeerTracker:
    """Per-peer incarnations, clock offsets and refusal reasons (see the module docstring)."""

    def __init__(
        self,
        peer_ids: Iterable[int],
        *,
        switch_after: float,
        max_clock_skew: float,
        own_members: tuple[tuple[int, bool], ...] = (),
    ) -> None:
        self.switch_after = switch_after
        self.max_clock_skew = max_clock_skew
        self.own_members = own_members
        self.peers: dict[int, PeerRecord] = {}
        self._warnings: list[Warning] = []
        self.set_peers(peer_ids)

    def set_peers(self, peer_ids: Iterable[int]) -> None:
        ids = set(peer_ids)
        self.peers = {i: self.peers.get(i) or PeerRecord(i) for i in sorted(ids)}

    # ------------------------------------------------------------------ inputs

    def accepted(
        self,
        peer: int,
        incarnation: int,
        now: float,
        *,
        sent_at: float,
        wall: float,
        source: str | None = None,
    ) -> Verdict:
        """An accepted packet from `peer`: is it the peer's current process?"""
        record = self.peers[peer]
        if record.current is None or record.current == incarnation:
            record.current = incarnation
            record.current_last_heard = now
            self._observe_clock(record, sent_at, wall)
            self._check_duplicates(record, now)
            return Verdict.PASS
        if now - record.current_last_heard >= self.switch_after:
            # The process we knew has gone quiet: this is its successor (a restart).
            record.others.pop(incarnation, None)
            record.current = incarnation
            record.current_last_heard = now
            record.restarts += 1
            self._observe_clock(record, sent_at, wall)
            return Verdict.RESTARTED
        self._other(record, incarnation, now, source)
        return Verdict.DUPLICATE

    def refused(
        self, peer: int, incarnation: int, now: float, reason: str, source: str | None = None
    ) -> None:
        """An authentic packet the codec refused (stale or a replay): a second process that
        never gets our challenge (another address) shows up only here."""
        record = self.peers[peer]
        if reason == "stale":
            record.last_stale = now
        if (
            record.current is not None
            and incarnation != record.current
            and now - record.current_last_heard < self.switch_after
        ):
            self._other(record, incarnation, now, source)

    def mismatch(
        self,
        peer: int,
        now: float,
        digests: tuple[int, ...],
        members: tuple[tuple[int, bool], ...] | None,
    ) -> None:
        """`peer` runs another membership; warn once per (peer, its digests)."""
        record = self.peers[peer]
        if digests != record.mismatch_digests or now - record.last_mismatch >= RECENT:
            record.mismatch_since = now
            record.mismatch_digests = digests
            record.mismatch_members = None
            record.mismatch_warned = None
        record.last_mismatch = now
        if members is not None:
            record.mismatch_members = members
        # One warning per change, once the peer's member list has arrived (it sends it as
        # soon as it sees our digests) or, from a peer that never sends it, after a while.
        known = record.mismatch_members is not None or now - record.mismatch_since >= 2.0
        if record.mismatch_warned == digests or not known:
            return
        record.mismatch_warned = digests
        members = record.mismatch_members
        self._warnings.append(
            Warning(
                f"peer {peer} runs a different membership; nodes that disagree ignore each "
                "other (see the README: Changing membership)",
                {
                    "event": "config_mismatch",
                    "peer": peer,
                    "their_digests": [f"{d:016x}" for d in digests],
                    **self._differences(members),
                },
            )
        )

    def bad_mac(self, peer: int, source: str, now: float) -> None:
        """A packet from `peer`'s address failed authentication: most likely a wrong key."""
        record = self.peers[peer]
        record.last_bad_mac = now
        record.bad_mac_source = source
        if not record.bad_mac_warned:
            record.bad_mac_warned = True
            self._warnings.append(
                Warning(
                    f"packets from peer {peer}'s address {source} fail authentication: "
                    "its cluster key differs from ours",
                    {"event": "wrong_key", "peer": peer, "source": source},
                )
            )

    # ------------------------------------------------------------------ queries

    def take_warnings(self) -> list[Warning]:
        found, self._warnings = self._warnings, []
        return found

    def wants_members(self, peer: int, now: float) -> bool:
        """Send our member list to `peer`? Only while it is known to disagree with us."""
        record = self.peers.get(peer)
        return record is not None and now - record.last_mismatch < RECENT

    def refusal(self, peer: int, now: float) -> str | None:
        """Why `peer`'s packets are being refused right now, for /status (None if they are
        not, as far as we can tell)."""
        record = self.peers[peer]
        if now - record.last_bad_mac < RECENT:
            return f"wrong_key: packets from {record.bad_mac_source} fail authentication"
        if now - record.last_mismatch < RECENT:
            detail = self._differences(record.mismatch_members)
            extra = "".join(f", {k} {v}" for k, v in detail.items() if v)
            return "config_mismatch: it runs a different membership" + extra
        if now - record.last_stale < RECENT and now - record.current_last_heard >= RECENT:
            return "stale: its packets do not echo our challenge (it does not hear us)"
        return None

    def duplicates(self, peer: int, now: float) -> list[dict[str, object]]:
        """Second processes heard recently for `peer` (the current one is not listed)."""
        record = self.peers[peer]
        return [
            {
                "incarnation": f"{inc:016x}",
                "last_heard_age": round(now - other.last_heard, 3),
                "source": other.source,
            }
            for inc, other in record.others.items()
            if now - other.last_heard < RECENT
        ]

    # ------------------------------------------------------------------ internals

    def _other(self, record: PeerRecord, incarnation: int, now: float, source: str | None) -> None:
        other = record.others.get(incarnation)
        if other is None:
            record.others[incarnation] = _Incarnation(now, now, source)
            if len(record.others) > 8:  # bounded: forget the one heard longest ago
                oldest = min(record.others, key=lambda i: record.others[i].last_heard)
                del record.others[oldest]
        else:
            other.last_heard = now

    def _check_duplicates(self, record: PeerRecord, now: float) -> None:
        """The current process was heard again after another one appeared: two processes."""
        if not record.others:
            return  # the common case, on every packet
        for inc, other in list(record.others.items()):
            if now - other.last_heard >= RECENT:
                del record.others[inc]
                record.duplicate_reported.discard(inc)
                continue
            if inc in record.duplicate_reported or other.first_heard >= now:
                continue
            record.duplicate_reported.add(inc)
            self._warnings.append(
                Warning(
                    f"two processes speak as node {record.id}: keeping the one heard first "
                    f"and dropping the other's packets (stop the duplicate: a cloned droplet "
                    "or a second container with the same config)",
                    {
                        "event": "duplicate_id",
                        "peer": record.id,
                        "kept": f"{record.current:016x}",
                        "dropped": f"{inc:016x}",
                    },
                )
            )

    def _observe_clock(self, record: PeerRecord, sent_at: float, wall: float) -> None:
        if not math.isfinite(sent_at):
            return
        sample = sent_at - wall
        previous = record.clock_offset
        # A step (or the first sample) replaces the estimate; jitter is smoothed.
        if previous is None or abs(sample - previous) > 1.0:
            record.clock_offset = sample
        else:
            record.clock_offset = previous + _OFFSET_WEIGHT * (sample - previous)
        offset = record.clock_offset
        if abs(offset) > self.max_clock_skew and not record.clock_warned:
            record.clock_warned = True
            self._warnings.append(
                Warning(
                    f"peer {record.id}'s wall clock is {offset:+.1f}s from ours "
                    f"(more than max_clock_skew {self.max_clock_skew:g}s): the election does "
                    "not use wall clocks, but logs and TLS on that droplet will be off; "
                    "check its NTP",
                    {"event": "clock_offset", "peer": record.id, "offset": round(offset, 3)},
                )
            )
        elif abs(offset) <= self.max_clock_skew / 2:
            record.clock_warned = False

    def _differences(self, members: tuple[tuple[int, bool], ...] | None) -> dict[str, object]:
        if members is None:
            return {}
        ours, theirs = dict(self.own_members), dict(members)
        return {
            "only_theirs": sorted(set(theirs) - set(ours)),
            "only_ours": sorted(set(ours) - set(theirs)),
            "eligibility_differs": sorted(
                i for i in set(ours) & set(theirs) if ours[i] != theirs[i]
            ),
        }
