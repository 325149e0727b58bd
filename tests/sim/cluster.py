"""A deterministic discrete-event simulation of a whole cluster of election cores.

True time is the simulator's; each node sees only its own clock (`clock.NodeClock`). A node
is driven exactly as the Trio runtime drives it: `tick` at its `next_deadline()` (converted
from local to true time) and `step` for every packet that reaches it. Everything random
comes from the one `random.Random` passed in, so a seed replays the same run bit for bit.

After every call into any node the invariants are checked, in true time:

* **one leader**: each node's leadership is an interval of true time ending at its lease
  (converted to true time); the intervals of different nodes never overlap. Because a
  node's role can only change when it is called, checking at each call against the other
  nodes' recorded lease ends is exact, not sampled.
* **a witness never leads**.
* **the lease rests on a majority**: for every node holding a lease, a majority (itself
  included) currently promises it at least until the lease's end, where a crashed node or one
  in its start-up quiet period past that end counts as promising (it cannot vote for anyone).
* **next_deadline** is always later than now and no later than the next heartbeat.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from sidecar.election import (
    Election,
    GainedLeadership,
    LeaderChanged,
    LostLeadership,
    Member,
    Ready,
    Role,
    Timing,
)
from sidecar.messages import Message

from .clock import NodeClock
from .network import Network

#: Slack for float rounding when comparing instants converted between clocks (1 ns).
EPSILON = 1e-9


class InvariantViolation(AssertionError):
    """An invariant failed; the message says which and when (true time)."""


@dataclass(slots=True)
class SimNode:
    id: int = field(init=False)
    member: Member
    clock: NodeClock
    election: Election | None = None
    healthy: bool = True
    paused: bool = False
    inbox: list[tuple[int, Message]] = field(default_factory=list)
    timer_token: int = 0
    incarnation: int = 0
    started_at: float | None = None  # true time of the current incarnation's start

    def __post_init__(self) -> None:
        self.id = self.member.id

    @property
    def up(self) -> bool:
        return self.election is not None


@dataclass(frozen=True, slots=True)
class LeadershipEvent:
    true_time: float
    node: int
    gained: bool
    reason: str


class Simulation:
    def __init__(
        self,
        members: list[Member],
        timing: Timing,
        rng: random.Random,
        clocks: dict[int, NodeClock],
        *,
        trace_messages: bool = False,
    ) -> None:
        self.members = members
        self.timing = timing
        self.rng = rng
        self.quorum = len(members) // 2 + 1
        self.nodes = {m.id: SimNode(m, clocks[m.id]) for m in members}
        self.network = Network(rng, [m.id for m in members])
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        #: Per node: the true time its current (or last) lease ends; -inf if never led.
        self.claim_end = {m.id: float("-inf") for m in members}
        self.leadership: list[LeadershipEvent] = []
        self.timeline: list[str] = []
        self.trace_messages = trace_messages
        self.calls = 0

    # ------------------------------------------------------------------ scheduling

    def at(self, true_time: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (max(true_time, self.now), next(self._seq), action))

    def run_until(self, end: float) -> None:
        while self._queue and self._queue[0][0] <= end:
            when, _, action = heapq.heappop(self._queue)
            self.now = when
            action()
        self.now = max(self.now, end)

    def log(self, text: str) -> None:
        self.timeline.append(f"{self.now:10.4f}  {text}")

    # ------------------------------------------------------------------ faults and lifecycle

    def start(self, node_id: int) -> None:
        """Start a node (or restart a crashed one): a fresh core with no memory."""
        node = self.nodes[node_id]
        if node.up:
            return
        node.incarnation += 1
        node.paused = False
        node.inbox.clear()
        node.started_at = self.now
        local = node.clock.local(self.now)
        node_rng = random.Random(self.rng.getrandbits(64))
        node.election = Election(
            node_id, self.members, self.timing, local, node_rng, healthy=node.healthy
        )
        self.log(f"n{node_id} start (incarnation {node.incarnation}, healthy={node.healthy})")
        self._call(node, lambda e, now: e.tick(now))

    def crash(self, node_id: int) -> None:
        node = self.nodes[node_id]
        if not node.up:
            return
        node.election = None
        node.paused = False
        node.inbox.clear()
        node.timer_token += 1
        self.log(f"n{node_id} crash")

    def shutdown(self, node_id: int, exit_after: float = 0.02) -> None:
        """SIGTERM: resign if leading, then the process exits shortly after."""
        node = self.nodes[node_id]
        if not node.up or node.paused:
            return
        self.log(f"n{node_id} shutdown")
        self._call(node, lambda e, now: e.shutdown(now))
        incarnation = node.incarnation
        self.at(self.now + exit_after, lambda: self._exit(node_id, incarnation))

    def _exit(self, node_id: int, incarnation: int) -> None:
        if self.nodes[node_id].incarnation == incarnation:
            self.crash(node_id)

    def pause(self, node_id: int, duration: float) -> None:
        """Freeze a node (SIGSTOP, GC): it processes nothing, then wakes and ticks first."""
        node = self.nodes[node_id]
        if not node.up or node.paused:
            return
        node.paused = True
        node.timer_token += 1
        incarnation = node.incarnation
        self.log(f"n{node_id} pause for {duration:.3f}s")
        self.at(self.now + duration, lambda: self._wake(node_id, incarnation))

    def _wake(self, node_id: int, incarnation: int) -> None:
        node = self.nodes[node_id]
        if not node.up or node.incarnation != incarnation or not node.paused:
            return
        node.paused = False
        self.log(f"n{node_id} wake ({len(node.inbox)} packets waiting)")
        self._call(node, lambda e, now: e.tick(now))
        waiting, node.inbox = node.inbox, []
        for sender, msg in waiting:
            if node.up and not node.paused:
                self._deliver_now(node, sender, msg)

    def set_healthy(self, node_id: int, healthy: bool) -> None:
        node = self.nodes[node_id]
        node.healthy = healthy
        self.log(f"n{node_id} healthy={healthy}")
        if node.up and not node.paused:
            self._call(node, lambda e, now: e.set_healthy(healthy, now))
        elif node.up and node.election is not None:
            # A paused process's health checker is paused too: it sees the change on waking.
            incarnation = node.incarnation
            self.at(self.now, lambda: self._late_health(node_id, incarnation))

    def _late_health(self, node_id: int, incarnation: int) -> None:
        node = self.nodes[node_id]
        if node.up and node.incarnation == incarnation and node.paused:
            self.at(self.now + 0.05, lambda: self._late_health(node_id, incarnation))
        elif node.up and node.incarnation == incarnation:
            healthy = node.healthy
            self._call(node, lambda e, now: e.set_healthy(healthy, now))

    # ------------------------------------------------------------------ driving the cores

    def _deliver(self, dst: int, src: int, msg: Message) -> None:
        node = self.nodes[dst]
        if not node.up:
            return
        if node.paused:
            node.inbox.append((src, msg))
            return
        self._deliver_now(node, src, msg)

    def _deliver_now(self, node: SimNode, src: int, msg: Message) -> None:
        if self.trace_messages:
            self.log(f"n{node.id} <- n{src} {msg!r}")
        self._call(node, lambda e, now: e.step(src, msg, now))

    def _timer(self, node_id: int, token: int) -> None:
        node = self.nodes[node_id]
        if node.up and not node.paused and node.timer_token == token:
            self._call(node, lambda e, now: e.tick(now))

    def _call(self, node: SimNode, fn: Callable[[Election, float], Ready]) -> None:
        election = node.election
        assert election is not None
        local = node.clock.local(self.now)
        promise_before = election.promise_at(local)
        ready = fn(election, local)
        self.calls += 1
        for out in ready.sends:
            for delay in self.network.delays(node.id, out.to):
                self.at(
                    self.now + delay, functools.partial(self._deliver, out.to, node.id, out.msg)
                )
        for event in ready.events:
            self._record(node, event)
        self._check_after_call(node, election, local, promise_before)
        self._arm_timer(node, election, local)

    def _record(self, node: SimNode, event: object) -> None:
        match event:
            case GainedLeadership(term=term, lease_until=lease_until):
                if lease_until <= node.clock.local(self.now):
                    raise InvariantViolation(
                        f"t={self.now:.6f} n{node.id} announced leadership with a lapsed lease"
                    )
                end = node.clock.true_time_of(lease_until)
                self.leadership.append(LeadershipEvent(self.now, node.id, True, "gained"))
                self.log(f"n{node.id} GAINED leadership term={term} lease_until(true)={end:.4f}")
            case LostLeadership(term=term, reason=reason):
                self.leadership.append(LeadershipEvent(self.now, node.id, False, reason))
                self.log(f"n{node.id} LOST leadership term={term} reason={reason}")
            case LeaderChanged(current=current, previous=previous):
                self.log(f"n{node.id} leader {previous} -> {current}")

    def _arm_timer(self, node: SimNode, election: Election, local: float) -> None:
        deadline = election.next_deadline(local)
        if not deadline > local:
            raise InvariantViolation(
                f"t={self.now:.6f} n{node.id}: next_deadline {deadline!r} is not after {local!r}"
            )
        if deadline > local + self.timing.heartbeat_interval + EPSILON:
            raise InvariantViolation(
                f"t={self.now:.6f} n{node.id}: next_deadline is {deadline - local:.6f}s away, "
                f"past the next heartbeat ({self.timing.heartbeat_interval}s)"
            )
        node.timer_token += 1
        token = node.timer_token
        self.at(node.clock.true_time_of(deadline), lambda: self._timer(node.id, token))

    # ------------------------------------------------------------------ invariants

    def _check_after_call(
        self,
        node: SimNode,
        election: Election,
        local: float,
        promise_before: tuple[int | None, float] | None,
    ) -> None:
        promise_after = election.promise_at(local)
        # Majorities can only shrink when a promise is dropped, cut short or moved, and
        # leases only grow at the leader's own calls: check exactly then (cheap, and exact).
        weakened = promise_before is not None and (
            promise_after is None
            or promise_after[0] != promise_before[0]
            or promise_after[1] < promise_before[1]
        )
        leading = election.role_at(local) is Role.LEADER
        if leading:
            if not node.member.eligible:
                raise InvariantViolation(f"t={self.now:.6f} witness n{node.id} leads")
            lease = election.lease_until()
            assert lease is not None
            end = node.clock.true_time_of(lease)
            for other, other_end in self.claim_end.items():
                if other != node.id and other_end > self.now + EPSILON:
                    raise InvariantViolation(
                        f"t={self.now:.6f} TWO LEADERS: n{node.id} leads (lease to "
                        f"{end:.6f}) while n{other}'s lease runs to {other_end:.6f}"
                    )
            self.claim_end[node.id] = max(self.claim_end[node.id], end)
        else:
            self.claim_end[node.id] = min(self.claim_end[node.id], self.now)
        if leading or weakened or node.started_at == self.now:
            self._check_majorities()

    def _check_majorities(self) -> None:
        for leader, end in self.claim_end.items():
            if end <= self.now:
                continue
            backers = [leader]
            for node in self.nodes.values():
                if node.id != leader and self._backs(node, leader, end):
                    backers.append(node.id)
            if len(backers) < self.quorum:
                raise InvariantViolation(
                    f"t={self.now:.6f} n{leader}'s lease runs to {end:.6f} but only "
                    f"{sorted(backers)} promise it that long (quorum {self.quorum})"
                )

    def _backs(self, node: SimNode, leader: int, until: float) -> bool:
        """Does `node` promise `leader` (or is unable to vote at all) until `until`?"""
        election = node.election
        if election is None:
            return True  # crashed: it votes again only after a restart and a quiet period
        if node.clock.true_time_of(election.quiet_until) >= until - EPSILON:
            return True
        promise = election.promise_at(node.clock.local(self.now))
        if promise is None:
            return False
        promised_to, promised_until = promise
        # A promise to a replaced process (None) blocks every vote, so it backs anyone's lease.
        return promised_to in (leader, None) and (
            node.clock.true_time_of(promised_until) >= until - EPSILON
        )

    # ------------------------------------------------------------------ queries

    def leader_now(self) -> int | None:
        """Who holds a lease at the current true time (at most one, by the invariant)."""
        for node in self.nodes.values():
            if node.election is None:
                continue
            if node.election.role_at(node.clock.local(self.now)) is Role.LEADER:
                return node.id
        return None
