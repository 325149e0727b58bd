"""The sans-IO election core: bully priority, majority quorum, and leases.

Nothing here opens a socket, reads a clock, sleeps or imports trio. The runtime feeds it
messages (`step`) and the passage of time (`tick`), both with `now` in monotonic seconds,
and collects what it must send and what happened (`Ready`). That makes every rule testable
by hand and the whole cluster replayable in a deterministic simulator.

Why the rules are safe (the argument the tests check):

* A *promise* is a node's commitment not to vote for anyone but X until a local deadline.
  A node promises when it accepts a leader's heartbeat (until receipt + lease_timeout) and
  when it grants a vote (until receipt + lease_timeout). A leader or candidate needs no
  promise to itself: it refuses every vote while leading, votes for itself once a term as a
  candidate, and abandons a round for good before it votes for anyone else.
* A leader's *lease* runs from the **send** time of the newest heartbeat or vote request
  that a majority (itself included) promised on, for lease_timeout * (1 - max_drift). The
  send precedes every receipt, and a clock running up to max_drift faster or slower cannot
  make the shortened lease outlast any promise it is based on. A promise travels back in
  the follower's next heartbeat (`Ack`, sent at once in answer to the leader's): however
  late, lost or reordered it arrives, it only names a send time the leader recorded itself,
  so it can make the lease shorter than it might be, never longer than the promise.
* A new leader needs a majority of votes; that majority shares a node with the majority
  behind any older lease, and that node votes only once its promise has run out, which is
  after the older lease has run out. So two leases never overlap in real time. Terms order
  messages and let a voter vote once per term; safety does not rest on them, which is why
  no disk state is needed: a restarted node casts no vote for one lease_timeout instead.
* `role_at(now)` re-checks the lease, so a node woken from a pause past its lease never
  answers "leader", whatever it has not yet processed.

Membership changes (joint consensus, as in Raft's thesis section 4.3): a node may be given two
memberships, the one before a change and the one after. While it has two, it counts a majority
in *each* of them for everything (its lease, its viability), and a member that is leaving
(absent from the newer membership) never stands. Nodes whose memberships share none are kept
apart by the codec. So while a change is rolled out, every lease rests on a majority of the
old membership (first half of the roll-out) or of the new one (second half), and any two
leases share a voter, who promises only one of them.

The one lease that breaks that pattern is one won on the old membership alone and kept
across its holder's reload to (old, new): it can run for up to one lease after that reload,
so into the second half, where a majority of the new membership alone may elect. Hence a
node whose live reload *drops* a membership (old, new) -> new does not stand for one
lease_timeout (and gives up a round under way), as a restarted node does not: every lease
resting on the new membership alone starts after every lease resting on the old one alone
has ended, whatever the order and the pace of the roll-out.

Liveness and priority: a node stands only when it is viable (eligible, healthy, sees a
majority), holds no promise, sees no live viable lower id, and sees no live peer that
follows a leader; voters apply the same priority test, so the lowest viable id wins.
A leader hands over on purpose with `Resign`, which lets followers release their promise
at once; pre-emption by a returning lower id goes through the same hand-over, but only
after that node has been viable for preempt_delay.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from sidecar.messages import Ack, Heartbeat, Message, Resign, VoteRequest, VoteResponse

#: How many heartbeat send times a node remembers, to match acks and measure RTT.
_SENT_HISTORY = 64

#: While following a live leader, a node's own heartbeat timer is only the fallback: it
#: answers each of the leader's heartbeats at once (phase-locked to the leader), and sends
#: on its own after this many intervals without one. The margin keeps network jitter from
#: making the fallback fire just before the leader's heartbeat (two sends an interval).
FOLLOWER_FALLBACK = 1.5


#: One received packet for `Election.receive`: (sender, message, arrival time or None).
Arrival = tuple[int, Message, float | None]


class Role(enum.StrEnum):
    FOLLOWER = "follower"
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass(frozen=True, slots=True)
class Member:
    """One cluster member as listed in config: its id and whether it may ever lead."""

    id: int
    eligible: bool = True


def majority(members: frozenset[int]) -> int:
    return len(members) // 2 + 1


@dataclass(frozen=True, slots=True)
class Timing:
    """Every duration the election uses, in seconds. Profiles live in `config.py`."""

    heartbeat_interval: float = 0.1
    peer_timeout: float = 0.5
    lease_timeout: float = 0.6
    max_drift: float = 0.1
    vote_retry_interval: float = 0.025
    election_round: float = 0.3
    preempt: bool = True
    preempt_delay: float = 30.0
    #: After start, wait this long for never-heard lower-id eligible peers before standing,
    #: so the node that happens to boot first does not win a cold start only to be
    #: pre-empted (a second IP move) preempt_delay later.
    startup_grace: float = 1.5

    def problems(self) -> list[str]:
        """Every way these timings break the protocol's assumptions, as messages naming keys."""
        found: list[str] = []
        for name in (
            "heartbeat_interval",
            "peer_timeout",
            "lease_timeout",
            "election_round",
            "vote_retry_interval",
        ):
            if getattr(self, name) <= 0:
                found.append(f"{name} must be > 0")
        if not 0 <= self.max_drift < 0.5:
            found.append("max_drift must be in [0, 0.5)")
        if self.preempt_delay < 0:
            found.append("preempt_delay must be >= 0")
        if self.startup_grace < 0:
            found.append("startup_grace must be >= 0")
        if self.peer_timeout < 2 * self.heartbeat_interval:
            found.append("peer_timeout must be at least 2 x heartbeat_interval")
        if self.lease_timeout * (1 - self.max_drift) <= self.heartbeat_interval:
            found.append("lease_timeout x (1 - max_drift) must exceed heartbeat_interval")
        if self.lease_timeout < self.peer_timeout:
            found.append("lease_timeout must be >= peer_timeout")
        return found


# ---------------------------------------------------------------------------- outputs


@dataclass(frozen=True, slots=True)
class Outgoing:
    to: int
    msg: Message


@dataclass(frozen=True, slots=True)
class GainedLeadership:
    term: int
    at: float
    lease_until: float


@dataclass(frozen=True, slots=True)
class LostLeadership:
    term: int
    at: float
    reason: str
    #: When the lease really ended; before `at` when the node noticed late (after a pause).
    lease_ended_at: float


@dataclass(frozen=True, slots=True)
class LeaderChanged:
    term: int
    at: float
    previous: int | None
    current: int | None


Event = GainedLeadership | LostLeadership | LeaderChanged


@dataclass(slots=True)
class Ready:
    """What one call into the core produced: packets to send and events to publish."""

    sends: list[Outgoing] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


# ---------------------------------------------------------------------------- views


@dataclass(slots=True)
class PeerState:
    """What this node knows of one peer, from the peer's own heartbeats."""

    id: int
    eligible: bool  # from config: a peer cannot promote itself by claiming eligibility
    last_heard: float | None = None
    heard_since: float | None = None  # start of the current unbroken run of hearing it
    term: int = 0
    leader_id: int | None = None
    leading: bool = False
    healthy: bool = False
    viable: bool = False
    ready_to_preempt: bool = False
    starting: bool = False
    rtt: float | None = None

    def alive(self, now: float, peer_timeout: float) -> bool:
        return self.last_heard is not None and now - self.last_heard < peer_timeout


@dataclass(frozen=True, slots=True)
class PeerView:
    id: int
    alive: bool
    eligible: bool
    healthy: bool
    viable: bool
    last_heard_age: float | None
    rtt: float | None
    term: int
    leader_id: int | None


@dataclass(frozen=True, slots=True)
class View:
    """A snapshot for /status and metrics, evaluated at one instant."""

    node_id: int
    role: Role
    term: int
    leader_id: int | None
    eligible: bool
    healthy: bool
    viable: bool
    lease_remaining: float | None
    promise_to: int | None
    promise_remaining: float | None
    in_startup_quiet: bool
    peers: tuple[PeerView, ...]
    #: Why this node is not leading (None while it leads): for a person reading /status.
    waiting_for: str | None = None


# ---------------------------------------------------------------------------- the core


class Election:
    """One node's view of the election. Feed it with `step`/`tick`; read `role_at`/`view`."""

    def __init__(
        self,
        node_id: int,
        members: list[Member],
        timing: Timing,
        now: float,
        rng: random.Random,
        *,
        healthy: bool = True,
        memberships: Sequence[frozenset[int]] | None = None,
        health_pending: bool = False,
        health_allowance: float = 0.0,
    ) -> None:
        problems = timing.problems()
        if problems:
            raise ValueError("; ".join(problems))
        self.node_id = node_id
        self.timing = timing
        self._rng = rng
        self.peers: dict[int, PeerState] = {}
        self.memberships: tuple[frozenset[int], ...] = ()
        self.eligible = False
        self._configure(members, memberships)
        self.healthy = healthy
        #: No health verdict yet: the node still announces `starting`, so that a peer whose
        #: service answered first does not win the cold start (and move the IP twice).
        self.health_pending = health_pending
        self.stopping = False
        self.term = 0
        self.role = Role.FOLLOWER
        #: How many times this node stood for election (every round, even one that expired
        #: and restarted within one tick): what `fip_elections_total` counts.
        self.elections = 0
        # No vote for one lease after start: this replaces a persisted vote.
        self.quiet_until = now + timing.lease_timeout
        # No standing until then after a live reload dropped a membership (see the docstring).
        self._reconfigured_until = float("-inf")
        # A node waiting for its first health verdict is given that long on top.
        self.grace_until = now + timing.startup_grace + (health_allowance if health_pending else 0)
        self._voted_term = -1
        self._voted_for: int | None = None
        self._promise_to: int | None = None
        self._promise_until = float("-inf")
        # The newest term of the leader's messages behind the promise: only that leader's
        # Resign from that term or later may release it (an older one is a late packet).
        self._promise_term = -1
        self._follow: int | None = None  # the leader whose heartbeat we accepted
        self._follow_until = float("-inf")
        self._lease_until = float("-inf")
        # A random start keeps the sequence numbers of two processes of one node apart, so
        # a late Ack or VoteResponse meant for a predecessor never matches our own request.
        self._seq = rng.randrange(1 << 48)
        self._sent: dict[int, float] = {}  # seq -> send time (heartbeats and vote requests)
        # peer -> (seq, promised, receipt time) of its newest heartbeat our next one answers
        self._unacked: dict[int, tuple[int, bool, float]] = {}
        self._answer = False  # a leader's heartbeat arrived: answer it with ours at once
        self._promised_at: dict[int, float] = {}  # peer -> send time it promised on (this stint)
        self._round_until = float("-inf")
        self._next_vote_send = float("-inf")
        self._next_heartbeat = now
        self._viable_since: float | None = None
        self._announced_leader: int | None = None
        self._announced_viable = False
        self._announced_starting = False

    def _configure(
        self, members: list[Member], memberships: Sequence[frozenset[int]] | None
    ) -> None:
        ids = [m.id for m in members]
        if len(ids) != len(set(ids)):
            raise ValueError("member ids must be unique")
        me = [m for m in members if m.id == self.node_id]
        if not me:
            raise ValueError(f"node {self.node_id} is not among the members")
        sets = tuple(memberships) if memberships else (frozenset(ids),)
        if not 1 <= len(sets) <= 2 or any(not s or not s <= set(ids) for s in sets):
            raise ValueError("memberships: one or two non-empty subsets of the members")
        if self.node_id not in frozenset().union(*sets):
            raise ValueError(f"node {self.node_id} is in no membership")
        self.memberships = sets
        # A member leaving in this change never stands: it would need a majority of a
        # membership it is not in, and it is about to go.
        self.eligible = me[0].eligible and self.node_id in sets[-1]
        old = self.peers
        self.peers = {
            m.id: old.get(m.id) or PeerState(m.id, m.eligible)
            for m in members
            if m.id != self.node_id
        }
        for m in members:
            if m.id in self.peers:
                self.peers[m.id].eligible = m.eligible

    # ------------------------------------------------------------------ public inputs

    def reconfigure(
        self,
        members: list[Member],
        memberships: Sequence[frozenset[int]] | None,
        now: float,
    ) -> Ready:
        """A live membership change (reload). What we know of remaining peers is kept, and
        so is a lease already held: it rests on a majority of the membership it was won
        under, which is what the roll-out's safety argument needs. Renewals follow the new
        memberships from here on. Dropping a membership holds off standing for one lease."""
        before = self.memberships
        self._configure(members, memberships)
        if set(before) - set(self.memberships):
            self._reconfigured_until = now + self.timing.lease_timeout
            if self.role is Role.CANDIDATE:
                self._abandon_round()  # its votes were counted under the dropped membership
        for gone in set(self._promised_at) - set(self.peers):
            del self._promised_at[gone]
        for gone in set(self._unacked) - set(self.peers):
            del self._unacked[gone]
        if self._follow is not None and self._follow not in self.peers:
            self._follow, self._follow_until = None, min(self._follow_until, now)
        return self.tick(now)

    def peer_restarted(self, peer_id: int, now: float) -> Ready:
        """`peer_id` is now a different process (the runtime saw a new incarnation).

        Whatever the old process was promised is not the new one's: a promise to it keeps
        blocking every vote until it runs out, but no longer counts as "promised to this
        candidate", and a vote given to it this term is not given again.
        """
        peer = self.peers.get(peer_id)
        ready = Ready()
        if peer is None:
            return ready
        if self._promise_to == peer_id:
            self._promise_to = None
        if self._voted_for == peer_id:
            self._voted_for = None
        if self._follow == peer_id:
            self._follow_until = min(self._follow_until, now)
        peer.leading = peer.viable = peer.ready_to_preempt = peer.starting = False
        peer.leader_id = None
        peer.heard_since = now
        peer.rtt = None
        self._unacked.pop(peer_id, None)
        self._expire(now, ready)
        self._advance(now, ready)
        return ready

    def step(
        self, sender: int, msg: Message, now: float, *, received_at: float | None = None
    ) -> Ready:
        """Process one authenticated message from `sender` (a known peer); see `receive`."""
        return self.receive(((sender, msg, received_at),), now)

    def receive(self, arrivals: Iterable[Arrival], now: float) -> Ready:
        """Process the packets of one wake-up at `now`, then let time pass to `now`.

        Each arrival is (sender, message, when it reached this host or None for `now`),
        oldest first. A packet that was not urgent (see `wake_on`) is stepped at the next
        wake-up, after it arrived: every rule judges it at `now`, and a promise counted from
        the later time lasts longer, never shorter, so a late step is as safe as a late
        packet. Two things use the arrival instead. Measurements: round trips, how long
        our answer held a peer's heartbeat, when a peer was last heard. And acks: one that
        arrived while our lease ran counts before the lease is judged at `now`, as it
        would have on arrival (a leader woken by its lease's end finds there the acks
        that renew it); counting a follower's promise is sound whenever it is counted,
        since the lease runs from our own send time.

        With an empty `arrivals` this is `tick`.
        """
        ready = Ready()
        batch: list[tuple[PeerState, Message, float, bool]] = []
        for sender, msg, received_at in arrivals:
            peer = self.peers.get(sender)
            if peer is None:
                continue  # protocol.py already drops unknown senders; be safe anyway
            received = now if received_at is None else min(now, received_at)
            ack = msg.ack if isinstance(msg, Heartbeat) else None
            counted = False
            if ack is not None and self.role is Role.LEADER and received < self._lease_until:
                self._on_ack(peer, ack, now, received)
                counted = True
            batch.append((peer, msg, received, counted))
        self._expire(now, ready)
        for peer, msg, received, ack_counted in batch:
            if not peer.alive(received, self.timing.peer_timeout):
                peer.heard_since = received
            if peer.last_heard is None or received > peer.last_heard:
                peer.last_heard = received
            if msg.term > self.term:
                self._adopt_term(msg.term, peer.id)
            match msg:
                case Heartbeat():
                    self._on_heartbeat(peer, msg, now, received, ack_counted=ack_counted)
                case VoteRequest():
                    self._on_vote_request(peer, msg, now, ready)
                case VoteResponse():
                    self._on_vote_response(peer, msg, now, received, ready)
                case Resign():
                    self._on_resign(peer, msg, now)
        self._advance(now, ready)
        return ready

    def tick(self, now: float) -> Ready:
        """Let time pass: expire leases and promises, send heartbeats, stand for election."""
        ready = Ready()
        self._expire(now, ready)
        self._advance(now, ready)
        return ready

    def set_healthy(self, healthy: bool, now: float) -> Ready:
        """The local service's health changed (after the health checker's hysteresis)."""
        self.healthy = healthy
        self.health_pending = False
        return self.tick(now)

    def resign(self, now: float, reason: str) -> Ready:
        """Stop leading now and tell everyone, so they need not wait for the lease to lapse."""
        ready = Ready()
        self._expire(now, ready)
        if self.role is Role.LEADER:
            self._step_down(now, reason, ready, lease_ended_at=now)
            for peer_id in self.peers:
                # Twice: a lost Resign costs a full timeout; a duplicate costs nothing.
                for _ in range(2):
                    ready.sends.append(Outgoing(peer_id, Resign(self.term, reason)))
        self._advance(now, ready)
        return ready

    def shutdown(self, now: float) -> Ready:
        """Leave for good: resign if leading, and never stand or lead again."""
        self.stopping = True
        return self.resign(now, "shutdown")

    # ------------------------------------------------------------------ public queries

    def role_at(self, now: float) -> Role:
        """The role as of `now`; a leader whose lease has lapsed is a follower, even unticked."""
        if self.role is Role.LEADER and now >= self._lease_until:
            return Role.FOLLOWER
        return self.role

    def leader_at(self, now: float) -> int | None:
        """Whom this node believes leads at `now` (itself included), or None."""
        if self.role_at(now) is Role.LEADER:
            return self.node_id
        if self._follow is not None and now < self._follow_until:
            return self._follow
        return None

    def lease_until(self) -> float | None:
        return self._lease_until if self.role is Role.LEADER else None

    def promise_at(self, now: float) -> tuple[int | None, float] | None:
        """Whom this node has promised not to vote against at `now`, and until when.

        The id is None for a promise to a process that has since been replaced: it blocks
        every vote until it runs out, and supports nobody's new lease."""
        if now >= self._promise_until:
            return None
        return self._promise_to, self._promise_until

    def wake_on(self, now: float) -> frozenset[int] | None:
        """The peers whose packets must be stepped the moment they arrive (None: all).

        Every other packet may wait for the node's next wake-up (its own deadline, or an
        urgent packet), which is how an idle cluster wakes once per heartbeat interval
        and node instead of once per datagram; the waiting costs no safety (a late step
        is a late packet, see `receive`) and no speed, because of who needs what when:

        * A leader: nothing. What its peers send is acks (its lease runs from its own
          send times, and the next heartbeat is soon enough to count them; the lease
          outlasts several intervals), state it acts on after `preempt_delay`, and vote
          requests it refuses while it leads. Its own deadline wakes it for each heartbeat
          and for its lease's end, and the packets that waited are stepped first.
        * A follower holding a promise to a leader: only that leader, whose heartbeats it
          answers at once (so the answer is there for the leader's next heartbeat) and whose
          Resign frees the promise. It refuses every vote until the promise runs out, and
          its deadline wakes it then.
        * Anyone else (a candidate, a voter, a node looking for a leader): everyone.
        """
        if self.role_at(now) is Role.LEADER:
            return frozenset()
        promise = self.promise_at(now)
        if promise is not None and promise[0] is not None and self.role is Role.FOLLOWER:
            return frozenset((promise[0],))
        return None

    def next_deadline(self, now: float) -> float:
        """The earliest future time at which `tick` could change something."""
        t = self.timing
        candidates = [self._next_heartbeat]
        if self.role is Role.LEADER:
            candidates.append(self._lease_until)
        if self.role is Role.CANDIDATE:
            candidates += [self._next_vote_send, self._round_until]
        candidates += [self._promise_until, self._follow_until, self.quiet_until, self.grace_until]
        candidates.append(self._reconfigured_until)
        for peer in self.peers.values():
            if peer.last_heard is not None:
                candidates.append(peer.last_heard + t.peer_timeout)
        if self._viable_since is not None and t.preempt:
            candidates.append(self._viable_since + t.preempt_delay)
        future = [c for c in candidates if c > now]
        return min(future) if future else now + t.heartbeat_interval

    def view(self, now: float) -> View:
        t = self.timing
        role = self.role_at(now)
        promise_active = now < self._promise_until
        return View(
            node_id=self.node_id,
            role=role,
            term=self.term,
            leader_id=self.leader_at(now),
            eligible=self.eligible,
            healthy=self.healthy,
            viable=self._viable(now),
            lease_remaining=(self._lease_until - now) if role is Role.LEADER else None,
            promise_to=self._promise_to if promise_active else None,
            promise_remaining=(self._promise_until - now) if promise_active else None,
            in_startup_quiet=now < self.quiet_until,
            waiting_for=None if role is Role.LEADER else self._waiting_for(now),
            peers=tuple(
                PeerView(
                    id=p.id,
                    alive=p.alive(now, t.peer_timeout),
                    eligible=p.eligible,
                    healthy=p.healthy,
                    viable=p.viable,
                    last_heard_age=None if p.last_heard is None else now - p.last_heard,
                    rtt=p.rtt,
                    term=p.term,
                    leader_id=p.leader_id,
                )
                for p in sorted(self.peers.values(), key=lambda p: p.id)
            ),
        )

    def _waiting_for(self, now: float) -> str:
        """One reason a non-leader is not leading, in the order a person would look."""
        t = self.timing
        if self.stopping:
            return "stopping"
        if not self.eligible:
            leaving = self.node_id not in self.memberships[-1]
            return "leaving (not in the new membership)" if leaving else "not eligible (witness)"
        if self.health_pending:
            return "starting: waiting for the first health verdict"
        if not self.healthy:
            return "unhealthy: the local service fails its health check"
        if not self._has_quorum(now):
            return "no quorum: " + self._quorum_text(now)
        if now < self.quiet_until:
            return "starting: start-up quiet period"
        leader = self.leader_at(now)
        if leader is not None and leader != self.node_id:
            viable_since = self._viable_since
            if self.node_id < leader and t.preempt and viable_since is not None:
                left = viable_since + t.preempt_delay - now
                if left > 0:
                    return f"following {leader}; may take over in {left:.0f}s (preempt_delay)"
                return f"following {leader}; waiting for it to hand over (preempt)"
            return f"following {leader}"
        if self.role is Role.CANDIDATE:
            return "standing for election"
        if now < self._reconfigured_until:
            return "membership changed: not standing for one lease"
        for peer in sorted(self.peers.values(), key=lambda p: p.id):
            if peer.id < self.node_id and peer.viable and peer.alive(now, t.peer_timeout):
                return f"lower id {peer.id} is viable and should lead"
            if peer.id < self.node_id and peer.starting and peer.alive(now, t.peer_timeout):
                return f"lower id {peer.id} is starting"
        if now < self._promise_until:
            return f"promised to {self._promise_to} for another {self._promise_until - now:.2f}s"
        return "waiting for an election round"

    def _quorum_text(self, now: float) -> str:
        parts = []
        for members in self.memberships:
            alive = self._alive_count(members, now)
            parts.append(f"{alive} of {len(members)} reachable, {majority(members)} needed")
        return "; ".join(parts)

    # ------------------------------------------------------------------ message handlers

    def _on_heartbeat(
        self, peer: PeerState, msg: Heartbeat, now: float, received: float, *, ack_counted: bool
    ) -> None:
        if msg.ack is not None and not ack_counted:
            self._on_ack(peer, msg.ack, now, received)
        peer.term = msg.term
        peer.leader_id = msg.leader_id
        peer.leading = msg.leading
        peer.healthy = msg.healthy
        # A witness cannot make itself a candidate by saying so: config decides eligibility.
        peer.viable = msg.viable and peer.eligible
        peer.ready_to_preempt = msg.ready_to_preempt and peer.viable
        peer.starting = msg.starting and peer.eligible
        promised = msg.leading and self._accept_leader(peer.id, now)
        if promised:
            self._promise(peer.id, msg.term, now)
            self._follow = peer.id
            self._follow_until = self._promise_until
            if self.role is Role.CANDIDATE:
                self._abandon_round()
        self._unacked[peer.id] = (msg.seq, promised, received)
        # Answer a leader at once: its lease is renewed one round trip after its heartbeat,
        # as with a separate ack, and our heartbeat rides along. A leader never answers at
        # once (our answer has `leading` false), so two nodes can never ping-pong.
        if msg.leading and self.role_at(now) is not Role.LEADER:
            self._answer = True

    def _accept_leader(self, leader: int, now: float) -> bool:
        """May we promise to `leader`? Not while leading ourselves or promised to another."""
        if self.role_at(now) is Role.LEADER:
            return False
        return not (now < self._promise_until and self._promise_to != leader)

    def _promise(self, leader: int, term: int, now: float) -> None:
        """Promise `leader` (for a heartbeat or a vote in `term`) one lease from now."""
        if self._promise_to != leader:
            self._promise_term = term
        self._promise_term = max(self._promise_term, term)
        self._promise_to = leader
        self._promise_until = now + self.timing.lease_timeout

    def _on_ack(self, peer: PeerState, ack: Ack, now: float, received: float) -> None:
        sent_at = self._sent.get(ack.seq)
        if sent_at is None:
            return
        # `held` comes from the peer's clock and only corrects the RTT; a nonsensical one
        # (negative, NaN, longer than the whole exchange) leaves the RTT unknown this time.
        elapsed = received - sent_at
        if 0.0 <= ack.held <= elapsed:
            peer.rtt = elapsed - ack.held
        if ack.promised and self.role is Role.LEADER:
            self._record_promise(peer.id, sent_at, now)

    def _on_vote_request(self, peer: PeerState, msg: VoteRequest, now: float, ready: Ready) -> None:
        reason = self._refusal(peer, msg.term, now)
        granted = reason is None
        if granted:
            self._voted_term = msg.term
            self._voted_for = peer.id
            self._promise(peer.id, msg.term, now)
        ready.sends.append(
            Outgoing(peer.id, VoteResponse(self.term, msg.seq, granted, reason or "granted"))
        )

    def _refusal(self, candidate: PeerState, term: int, now: float) -> str | None:
        """Why we will not vote for `candidate` in `term`, or None to grant."""
        if term < self.term:
            return "stale_term"
        if not candidate.eligible:
            return "not_eligible"
        if now < self.quiet_until:
            return "startup_quiet"
        if self.role_at(now) is Role.LEADER:
            return "i_lead"
        if self._voted_term == term and self._voted_for != candidate.id:
            return "already_voted"
        if now < self._promise_until and self._promise_to != candidate.id:
            return "promised"
        if self._viable(now) and self.node_id < candidate.id:
            return "lower_id_viable"
        for other in self.peers.values():
            if (
                other.id < candidate.id
                and other.viable
                and other.alive(now, self.timing.peer_timeout)
            ):
                return "lower_id_viable"
        return None

    def _on_vote_response(
        self, peer: PeerState, msg: VoteResponse, now: float, received: float, ready: Ready
    ) -> None:
        sent_at = self._sent.get(msg.seq)
        if sent_at is not None and received >= sent_at:
            peer.rtt = received - sent_at
        if self.role is not Role.CANDIDATE or msg.term != self.term or not msg.granted:
            return
        if sent_at is None:
            return
        self._promised_at[peer.id] = max(self._promised_at.get(peer.id, sent_at), sent_at)
        lease_start = self._majority_promise_time(now)
        # Votes that arrive too late to leave any lease make no leader (and no event).
        if lease_start is not None and self._lease_end(lease_start) > now:
            self._become_leader(now, lease_start, ready)

    def _on_resign(self, peer: PeerState, msg: Resign, now: float) -> None:
        # A Resign from an earlier stint can arrive late (delayed or duplicated) after we
        # promised the same node again in a newer term. It must not free that promise: the
        # node may be leading again on it, and our vote for another would make two leaders.
        if self._promise_to == peer.id and msg.term < self._promise_term:
            return
        peer.leading = False
        peer.viable = False
        peer.ready_to_preempt = False
        peer.leader_id = None
        if self._promise_to == peer.id:
            self._promise_until = min(self._promise_until, now)
        if self._follow == peer.id:
            self._follow_until = min(self._follow_until, now)

    # ------------------------------------------------------------------ transitions

    def _adopt_term(self, term: int, sender: int) -> None:
        self.term = term
        if self.role is Role.CANDIDATE:
            # Someone is further along; our round is void. We stand again if still first.
            self._abandon_round()

    def _expire(self, now: float, ready: Ready) -> None:
        if self.role is Role.LEADER and now >= self._lease_until:
            self._step_down(now, "lease_expired", ready, lease_ended_at=self._lease_until)
        if self.role is Role.CANDIDATE and now >= self._round_until:
            self._abandon_round()

    def _advance(self, now: float, ready: Ready) -> None:
        """Everything that follows from the current state at `now`, in one place."""
        viable = self._viable(now)
        if viable and self._viable_since is None:
            self._viable_since = now
        elif not viable:
            self._viable_since = None

        if self.role is Role.LEADER:
            self._consider_handover(now, ready)
        if self.role is Role.FOLLOWER and self._should_stand(now):
            self._stand(now, ready)
        if self.role is Role.CANDIDATE and now >= self._next_vote_send:
            self._send_vote_requests(now, ready)

        leader = self.leader_at(now)
        starting = self._starting(now)
        changed = (
            leader != self._announced_leader
            or viable != self._announced_viable
            or starting != self._announced_starting
        )
        if leader != self._announced_leader:
            ready.events.append(LeaderChanged(self.term, now, self._announced_leader, leader))
            self._announced_leader = leader
        self._announced_viable = viable
        self._announced_starting = starting
        # Tell peers at once when what we report changes: it saves them a heartbeat
        # interval when a leader is lost or a node becomes able to stand.
        if changed or self._answer or now >= self._next_heartbeat:
            self._send_heartbeats(now, ready)

    def _viable(self, now: float) -> bool:
        if not (self.eligible and self.healthy) or self.stopping:
            return False
        return self._has_quorum(now)

    def _alive_count(self, members: frozenset[int], now: float) -> int:
        """Members of `members` we can count right now: ourselves and live peers."""
        alive = sum(
            1
            for p in self.peers.values()
            if p.id in members and p.alive(now, self.timing.peer_timeout)
        )
        return alive + (self.node_id in members)

    def _has_quorum(self, now: float) -> bool:
        return all(self._alive_count(m, now) >= majority(m) for m in self.memberships)

    def _should_stand(self, now: float) -> bool:
        t = self.timing
        if now < self.quiet_until or now < self._reconfigured_until or not self._viable(now):
            return False
        if now < self._promise_until:
            return False
        for peer in self.peers.values():
            if peer.eligible and peer.id < self.node_id:
                # A lower id that may just be booting more slowly than us: give it the
                # chance to win the cold start itself (bounded by the start-up grace).
                if peer.last_heard is None and now < self.grace_until:
                    return False
                if peer.starting and peer.alive(now, t.peer_timeout):
                    return False
            if not peer.alive(now, t.peer_timeout):
                continue
            if peer.viable and peer.id < self.node_id:
                return False
            # A live peer that still follows someone else would refuse us; standing anyway
            # only inflates terms (the "disruptive server" problem), so wait for it.
            if peer.leader_id is not None and peer.leader_id != self.node_id:
                return False
        return True

    def _stand(self, now: float, ready: Ready) -> None:
        highest_seen = max([self.term, *(p.term for p in self.peers.values())])
        self.term = highest_seen + 1
        self.role = Role.CANDIDATE
        self.elections += 1
        self._voted_term = self.term
        self._voted_for = self.node_id
        self._promised_at.clear()
        # A little jitter keeps two unlucky candidates from colliding round after round.
        self._round_until = now + self.timing.election_round * (1 + 0.2 * self._rng.random())
        self._next_vote_send = now
        if self._alone_is_majority():
            self._become_leader(now, now, ready)

    def _abandon_round(self) -> None:
        """Give up a candidacy; late votes for it are ignored, so it can never yield a lease."""
        self.role = Role.FOLLOWER
        self._promised_at.clear()

    def _send_vote_requests(self, now: float, ready: Ready) -> None:
        seq = self._next_seq(now)
        for peer_id in self.peers:
            ready.sends.append(Outgoing(peer_id, VoteRequest(self.term, seq)))
        self._next_vote_send = now + self.timing.vote_retry_interval

    def _become_leader(self, now: float, lease_start: float, ready: Ready) -> None:
        self.role = Role.LEADER
        self._lease_until = self._lease_end(lease_start)
        self._follow = None
        ready.events.append(GainedLeadership(self.term, now, self._lease_until))
        self._next_heartbeat = now  # establish every follower's promise at once

    def _step_down(self, now: float, reason: str, ready: Ready, *, lease_ended_at: float) -> None:
        self.role = Role.FOLLOWER
        self._lease_until = float("-inf")
        self._promised_at.clear()
        if reason == "lease_expired":
            # Cut off from the majority's acks: whatever our own view says, we were not
            # a stable member, so a pre-emption hold-down starts again from here.
            self._viable_since = None
        ready.events.append(LostLeadership(self.term, now, reason, lease_ended_at))

    def _consider_handover(self, now: float, ready: Ready) -> None:
        """Resign for a better leader: a ready lower id (bully), or any viable peer if sick."""
        t = self.timing
        live_viable = [p for p in self.peers.values() if p.viable and p.alive(now, t.peer_timeout)]
        reason = None
        # The challenger's own "ready" is not enough: a node that could hear but not be
        # heard (one-way loss) stays viable in its own eyes. We also must have heard it
        # without a break for preempt_delay, or every healed fault would move the IP twice.
        if any(
            p.id < self.node_id
            and p.ready_to_preempt
            and p.heard_since is not None
            and now - p.heard_since >= t.preempt_delay
            for p in live_viable
        ):
            reason = "preempted"
        elif not self.healthy and live_viable:
            reason = "unhealthy"
        if reason is None:
            return
        self._step_down(now, reason, ready, lease_ended_at=now)
        for peer_id in self.peers:
            for _ in range(2):
                ready.sends.append(Outgoing(peer_id, Resign(self.term, reason)))

    # ------------------------------------------------------------------ heartbeats & leases

    def _send_heartbeats(self, now: float, ready: Ready) -> None:
        leading = self.role_at(now) is Role.LEADER
        seq = self._next_seq(now)
        if leading and self._alone_is_majority():
            self._lease_until = self._lease_end(now)
        leader = self.leader_at(now)
        viable = self._viable(now)
        ready_to_preempt = self._ready_to_preempt(now)
        starting = self._starting(now)
        for peer_id in self.peers:
            unacked = self._unacked.pop(peer_id, None)
            ack = None if unacked is None else Ack(unacked[0], unacked[1], now - unacked[2])
            msg = Heartbeat(
                self.term,
                seq,
                leader,
                leading,
                self.eligible,
                self.healthy,
                viable,
                ready_to_preempt,
                starting,
                ack,
            )
            ready.sends.append(Outgoing(peer_id, msg))
        answered, self._answer = self._answer, False
        interval = self.timing.heartbeat_interval
        if answered and leader is not None and leader != self.node_id:
            # Phase-locked to the leader: its next heartbeat, which we answer at once,
            # normally comes first; this timer only covers one that is lost.
            self._next_heartbeat = now + interval * FOLLOWER_FALLBACK
        else:
            # On a grid of the interval (our monotonic clock), so that an early send (news
            # to tell) does not shift every later one: fewer distinct wake-ups. After a
            # fallback too: repeated fallbacks would fall on the promise's own lapse
            # (lease_timeout from the last answer), and a heartbeat sent just before the
            # lapse, overtaken by the one announcing it, would delay the election.
            self._next_heartbeat = (math.floor(now / interval) + 1) * interval
            if self._next_heartbeat <= now:  # float rounding at a grid point
                self._next_heartbeat += interval

    def _starting(self, now: float) -> bool:
        return (
            now < self.grace_until
            and self.eligible
            and (self.healthy or self.health_pending)
            and not self.stopping
        )

    def _ready_to_preempt(self, now: float) -> bool:
        t = self.timing
        return (
            t.preempt
            and self.role is not Role.LEADER
            and now >= self.quiet_until
            and self._viable_since is not None
            and now - self._viable_since >= t.preempt_delay
        )

    def _next_seq(self, now: float) -> int:
        self._seq += 1
        self._sent[self._seq] = now
        if len(self._sent) > _SENT_HISTORY:
            del self._sent[next(iter(self._sent))]  # insertion order: the oldest first
        return self._seq

    def _record_promise(self, peer_id: int, sent_at: float, now: float) -> None:
        self._promised_at[peer_id] = max(self._promised_at.get(peer_id, sent_at), sent_at)
        lease_start = self._majority_promise_time(now)
        if lease_start is not None:
            self._lease_until = max(self._lease_until, self._lease_end(lease_start))

    def _alone_is_majority(self) -> bool:
        """A one-node cluster: we are a majority of every membership by ourselves."""
        return all(majority(m) <= (self.node_id in m) for m in self.memberships)

    def _majority_promise_time(self, now: float) -> float | None:
        """The newest send time that a majority of every membership (with us, where we are
        a member) has promised on, if any."""
        starts = []
        for members in self.memberships:
            needed = majority(members) - (self.node_id in members)
            if needed <= 0:
                starts.append(now)
                continue
            times = sorted(
                (t for peer, t in self._promised_at.items() if peer in members), reverse=True
            )
            if len(times) < needed:
                return None
            starts.append(times[needed - 1])
        return min(starts)

    def _lease_end(self, lease_start: float) -> float:
        return lease_start + self.timing.lease_timeout * (1 - self.timing.max_drift)
