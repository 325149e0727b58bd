"""A deterministic discrete-event simulation of a whole cluster of election cores.

True time is the simulator's; each node sees only its own clock (`clock.NodeClock`). A node
is driven exactly as the Trio runtime drives it: `tick` at its `next_deadline()` (converted
from local to true time) and `step` for every packet that reaches it. As in the runtime, a
packet from a peer outside the receiver's `Election.wake_on` waits (with its arrival time)
until the receiver's next wake-up, its timer or an urgent packet, and is stepped first then;
`defer=False` steps every packet on arrival instead, for comparison.

Each node has its own `NodeConfig` (the members it lists and its memberships), so a rolling
membership change can be simulated (`membership.py`). As in the runtime, a node only talks to
the members it lists, and a packet whose sender's memberships share none with the receiver's
is refused (protocol.py's `config_mismatch`). With `track_incarnations`, each receiver also
tells its core when a peer is a new process (`Election.peer_restarted`) and drops packets of
a second process with the same id, as `peers.py` does. Everything random
comes from the one `random.Random` passed in, so a seed replays the same run bit for bit.

After every call into any node the invariants are checked, in true time:

* **one leader**: each node's leadership is an interval of true time ending at its lease
  (converted to true time); the intervals of different nodes never overlap. Because a
  node's role can only change when it is called, checking at each call against the other
  nodes' recorded lease ends is exact, not sampled.
* **a witness never leads**.
* **the lease rests on a majority**: for every node holding a lease, a majority (itself
  included, where it is a member) of *each* membership the lease was won or last extended
  under currently promises it at least until the lease's end, where a crashed (or not yet
  started) node or one in its start-up quiet period past that end counts as promising (it
  cannot vote for anyone). A lease kept across a live membership change rests on the
  memberships it was extended under, which is what the core promises (`Election.reconfigure`).
* **next_deadline** is always later than now and no later than the next heartbeat (for a
  follower of a live leader, its fallback: `FOLLOWER_FALLBACK` intervals).
"""

from __future__ import annotations

import functools
import heapq
import itertools
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from sidecar.election import (
    FOLLOWER_FALLBACK,
    Arrival,
    Election,
    GainedLeadership,
    LeaderChanged,
    LostLeadership,
    Member,
    Ready,
    Role,
    Timing,
    majority,
)
from sidecar.messages import Message

from .clock import NodeClock
from .network import Network

#: Slack for float rounding when comparing instants converted between clocks (1 ns).
EPSILON = 1e-9


class InvariantViolation(AssertionError):
    """An invariant failed; the message says which and when (true time)."""


@dataclass(frozen=True)
class NodeConfig:
    """What one node's config file says about the cluster.

    `members` are the nodes it lists (itself and its peers); `memberships` is one set of
    ids, or (old, new) while a change is rolled out (`Election`'s `memberships`)."""

    members: tuple[Member, ...]
    memberships: tuple[frozenset[int], ...]

    @classmethod
    def of(cls, members: Iterable[Member], *memberships: Iterable[int]) -> NodeConfig:
        listed = tuple(sorted(members, key=lambda m: m.id))
        sets = tuple(frozenset(m) for m in memberships) or (frozenset(m.id for m in listed),)
        return cls(listed, sets)

    @functools.cached_property
    def ids(self) -> frozenset[int]:
        return frozenset(m.id for m in self.members)

    @functools.cached_property  # every packet carries it: computed once per config
    def digests(self) -> frozenset[frozenset[tuple[int, bool]]]:
        """The memberships as protocol.py digests them: sets of (id, eligible)."""
        eligible = {m.id: m.eligible for m in self.members}
        return frozenset(frozenset((i, eligible[i]) for i in m) for m in self.memberships)

    def describe(self) -> str:
        return " -> ".join("{" + ",".join(map(str, sorted(m))) + "}" for m in self.memberships)


@dataclass(frozen=True, slots=True)
class Packet:
    """One copy of a message in flight, with what its envelope says about the sender."""

    src: int
    msg: Message
    incarnation: int
    digests: frozenset[frozenset[tuple[int, bool]]]


@dataclass(slots=True)
class SimNode:
    id: int = field(init=False)
    member: Member
    clock: NodeClock
    config: NodeConfig
    election: Election | None = None
    healthy: bool = True
    paused: bool = False
    inbox: list[Packet] = field(default_factory=list)
    #: Packets that arrived while not urgent (`Election.wake_on`), with their local arrival
    #: time: stepped at the next wake-up, before it, as the runtime's sockets hold them.
    deferred: list[tuple[Packet, float]] = field(default_factory=list)
    timer_token: int = 0
    incarnation: int = 0
    started_at: float | None = None  # true time of the current incarnation's start
    #: A reload requested while paused, as the number of packets that were waiting then:
    #: on waking they are processed first (under the old config), then the reload.
    reload_pending: int | None = None
    #: Per peer: the incarnation heard last and when (local time), as peers.py keeps it.
    heard: dict[int, tuple[int, float]] = field(default_factory=dict)

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
        configs: dict[int, NodeConfig] | None = None,
        track_incarnations: bool = False,
        trace_messages: bool = False,
        defer: bool = True,
    ) -> None:
        self.members = members
        self.defer = defer
        self.timing = timing
        self.rng = rng
        self.quorum = len(members) // 2 + 1
        everyone = NodeConfig.of(members)
        self.nodes = {
            m.id: SimNode(m, clocks[m.id], (configs or {}).get(m.id, everyone)) for m in members
        }
        self.track_incarnations = track_incarnations
        self.network = Network(rng, [m.id for m in members])
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        #: Per node: the true time its current (or last) lease ends; -inf if never led.
        self.claim_end = {m.id: float("-inf") for m in members}
        #: Per node: the memberships its lease was won or last extended under.
        self.claim_basis: dict[int, tuple[frozenset[int], ...]] = {}
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
        node.reload_pending = None
        node.inbox.clear()
        node.deferred.clear()
        node.heard.clear()
        node.started_at = self.now
        local = node.clock.local(self.now)
        node_rng = random.Random(self.rng.getrandbits(64))
        node.election = Election(
            node_id,
            list(node.config.members),
            self.timing,
            local,
            node_rng,
            healthy=node.healthy,
            memberships=node.config.memberships,
        )
        self.log(
            f"n{node_id} start (incarnation {node.incarnation}, healthy={node.healthy}, "
            f"memberships {node.config.describe()})"
        )
        self._call(node, lambda e, now: e.tick(now))

    def reconfigure(self, node_id: int, config: NodeConfig) -> None:
        """Give a node a new config file: a live reload if it runs (on waking if paused),
        otherwise the config it starts with next time."""
        node = self.nodes[node_id]
        node.config = config
        if not node.up:
            self.log(f"n{node_id} (down) config -> {config.describe()}")
        elif node.paused:
            if node.reload_pending is None:
                node.reload_pending = len(node.inbox)
            self.log(f"n{node_id} (paused) reload -> {config.describe()} when it wakes")
        else:
            self._reload(node)

    def _reload(self, node: SimNode) -> None:
        node.reload_pending = None
        config = node.config
        self.log(f"n{node.id} reload -> {config.describe()}")
        self._call(
            node, lambda e, now: e.reconfigure(list(config.members), config.memberships, now)
        )

    def crash(self, node_id: int) -> None:
        node = self.nodes[node_id]
        if not node.up:
            return
        node.election = None
        node.paused = False
        node.reload_pending = None  # the config file is changed: it starts with it
        node.inbox.clear()
        node.deferred.clear()
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
        # What waited for a wake-up is in the socket buffers with what comes while paused.
        node.inbox[:0] = [packet for packet, _ in node.deferred]
        node.deferred.clear()
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
        for index, packet in enumerate([*waiting, None]):
            if not node.up or node.paused:
                break
            if index == node.reload_pending:
                self._reload(node)
            if packet is not None:
                self._deliver_now(node, packet)

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

    def _deliver(self, dst: int, packet: Packet) -> None:
        node = self.nodes[dst]
        if not node.up:
            return
        if node.paused:
            node.inbox.append(packet)
            return
        assert node.election is not None
        local = node.clock.local(self.now)
        wake = node.election.wake_on(local)
        if self.defer and wake is not None and packet.src not in wake:
            node.deferred.append((packet, local))
            return
        self._wake_up(node, packet)

    def _wake_up(self, node: SimNode, urgent: Packet | None = None) -> None:
        """One wake-up of the runtime's receive loop: the packets that waited, oldest first,
        then the one that woke it (if a packet did), in one `receive` call."""
        waiting, node.deferred = node.deferred, []
        arrivals: list[Arrival] = []
        for packet, arrived in [*waiting, (urgent, None)]:
            if packet is not None and self._admit(node, packet):
                arrivals.append((packet.src, packet.msg, arrived))
            if not node.up:
                return
        self._call(node, lambda e, now: e.receive(arrivals, now))

    def _deliver_now(self, node: SimNode, packet: Packet) -> None:
        if self._admit(node, packet) and node.up:
            self._call(node, lambda e, now: e.step(packet.src, packet.msg, now))

    def _admit(self, node: SimNode, packet: Packet) -> bool:
        """What the codec and the peer tracker let through; a new process is told first."""
        src, msg = packet.src, packet.msg
        # What the codec refuses: senders it does not list, and other memberships.
        if src not in node.config.ids or not packet.digests & node.config.digests:
            if self.trace_messages:
                self.log(f"n{node.id} refuses n{src} (not a member or config_mismatch)")
            return False
        restarted = False
        if self.track_incarnations:
            local = node.clock.local(self.now)
            seen = node.heard.get(src)
            if seen is not None and seen[0] != packet.incarnation:
                if local - seen[1] < self.timing.peer_timeout:
                    return False  # a second process with this id while the first still talks
                restarted = True
            node.heard[src] = (packet.incarnation, local)
        if self.trace_messages:
            self.log(f"n{node.id} <- n{src} {msg!r}")
        if restarted:
            self._call(node, lambda e, now: e.peer_restarted(src, now))
        return True

    def _timer(self, node_id: int, token: int) -> None:
        node = self.nodes[node_id]
        if node.up and not node.paused and node.timer_token == token:
            self._wake_up(node)

    def _call(self, node: SimNode, fn: Callable[[Election, float], Ready]) -> None:
        election = node.election
        assert election is not None
        local = node.clock.local(self.now)
        promise_before = election.promise_at(local)
        ready = fn(election, local)
        self.calls += 1
        digests = node.config.digests
        for out in ready.sends:
            packet = Packet(node.id, out.msg, node.incarnation, digests)
            for delay in self.network.delays(node.id, out.to):
                self.at(self.now + delay, functools.partial(self._deliver, out.to, packet))
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
        # A follower of a live leader answers its heartbeats; its own timer is the fallback.
        leader = election.leader_at(local)
        factor = FOLLOWER_FALLBACK if leader not in (None, node.id) else 1.0
        if deadline > local + factor * self.timing.heartbeat_interval + EPSILON:
            raise InvariantViolation(
                f"t={self.now:.6f} n{node.id}: next_deadline is {deadline - local:.6f}s away, "
                f"past the next heartbeat ({factor:g} x {self.timing.heartbeat_interval}s)"
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
            if end > self.claim_end[node.id]:
                self.claim_basis[node.id] = election.memberships
            self.claim_end[node.id] = max(self.claim_end[node.id], end)
        else:
            self.claim_end[node.id] = min(self.claim_end[node.id], self.now)
        if leading or weakened or node.started_at == self.now:
            self._check_majorities()

    def _check_majorities(self) -> None:
        for leader, end in self.claim_end.items():
            if end <= self.now:
                continue
            backers = {leader} | {
                node.id
                for node in self.nodes.values()
                if node.id != leader and self._backs(node, leader, end)
            }
            everyone = frozenset(self.nodes)
            for members in self.claim_basis.get(leader, (everyone,)):
                if len(backers & members) < majority(members):
                    raise InvariantViolation(
                        f"t={self.now:.6f} n{leader}'s lease runs to {end:.6f} but only "
                        f"{sorted(backers & members)} of membership {sorted(members)} promise "
                        f"it that long (majority {majority(members)})"
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
