"""One test per rule of the election core (`sidecar/election.py`), on a hand-driven cluster.

`Harness` runs cores on one shared clock and passes packets with zero delay, in order,
unless a test cuts a link or holds a packet back; time moves in 10 ms steps. The
simulator (`tests/sim`) covers drift, delay, loss and chaos; these tests pin each rule.
"""

from __future__ import annotations

import collections
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sidecar.election import (
    FOLLOWER_FALLBACK,
    Election,
    Event,
    GainedLeadership,
    LostLeadership,
    Member,
    Ready,
    Role,
    Timing,
)
from sidecar.messages import Ack, Heartbeat, Message, Resign, VoteRequest, VoteResponse

LAN = Timing()  # heartbeat 0.1, peer_timeout 0.5, lease 0.6, drift 0.1
QUIET = LAN.lease_timeout  # the start-up quiet period
STEP = 0.01


@dataclass
class Harness:
    """A cluster of cores on one clock; packets arrive instantly unless cut or held."""

    ids: tuple[int, ...] = (1, 2, 3)
    timing: Timing = LAN
    witnesses: tuple[int, ...] = ()
    unhealthy: tuple[int, ...] = ()
    now: float = 0.0
    cut: set[tuple[int, int]] = field(default_factory=set)
    hold_if: Callable[[int, int, Message], bool] | None = None
    held: list[tuple[int, int, Message]] = field(default_factory=list)
    events: list[tuple[float, int, Event]] = field(default_factory=list)
    pending: list[tuple[int, int, Message]] = field(default_factory=list)
    most_leaders_at_once: int = 0

    def __post_init__(self) -> None:
        members = [Member(i, eligible=i not in self.witnesses) for i in self.ids]
        self.nodes = {
            i: Election(
                i, members, self.timing, self.now, random.Random(i), healthy=i not in self.unhealthy
            )
            for i in self.ids
        }

    def take(self, node_id: int, ready: Ready) -> Ready:
        self.pending += [(node_id, out.to, out.msg) for out in ready.sends]
        self.events += [(self.now, node_id, event) for event in ready.events]
        self.most_leaders_at_once = max(self.most_leaders_at_once, len(self.leaders()))
        return ready

    def deliver(self) -> None:
        """Pass every pending packet (and the answers they cause), in order."""
        for _ in range(10_000):
            if not self.pending:
                return
            src, dst, msg = self.pending.pop(0)
            if (src, dst) in self.cut or dst not in self.nodes:
                continue
            if self.hold_if is not None and self.hold_if(src, dst, msg):
                self.held.append((src, dst, msg))
                continue
            self.take(dst, self.nodes[dst].step(src, msg, self.now))
        raise AssertionError("packets never settled")

    def release_held(self) -> None:
        held, self.held = self.held, []
        for src, dst, msg in held:
            self.take(dst, self.nodes[dst].step(src, msg, self.now))
        self.deliver()

    def run(self, until: float) -> None:
        """Tick every node every 10 ms up to `until`, delivering as we go."""
        while self.now < until - 1e-9:
            self.now = round(self.now + STEP, 9)
            for node_id, node in self.nodes.items():
                self.take(node_id, node.tick(self.now))
            self.deliver()

    def leaders(self) -> list[int]:
        return [i for i, n in self.nodes.items() if n.role_at(self.now) is Role.LEADER]

    def gains(self) -> list[tuple[float, int]]:
        return [(t, i) for t, i, e in self.events if isinstance(e, GainedLeadership)]

    def cut_both(self, a: int, b: int) -> None:
        self.cut |= {(a, b), (b, a)}

    def isolate(self, node_id: int) -> None:
        for other in self.ids:
            if other != node_id:
                self.cut_both(node_id, other)


def lone(node_id: int = 3, ids: tuple[int, ...] = (1, 2, 3), **kw: object) -> Election:
    members = [Member(i, eligible=i not in kw.get("witnesses", ())) for i in ids]  # type: ignore[operator]
    return Election(node_id, members, LAN, 0.0, random.Random(0))


def heartbeat(
    term: int = 0,
    *,
    leading: bool = False,
    viable: bool = True,
    seq: int = 1,
    ack: Ack | None = None,
) -> Heartbeat:
    return Heartbeat(
        term=term,
        seq=seq,
        leader_id=None,
        leading=leading,
        eligible=True,
        healthy=True,
        viable=viable,
        ready_to_preempt=False,
        ack=ack,
    )


def acks(ready: Ready, to: int) -> list[Ack]:
    """The acks `ready` carries to `to` (in heartbeats)."""
    return [
        o.msg.ack
        for o in ready.sends
        if o.to == to and isinstance(o.msg, Heartbeat) and o.msg.ack is not None
    ]


def vote_answer(ready: Ready) -> VoteResponse:
    answers = [o.msg for o in ready.sends if isinstance(o.msg, VoteResponse)]
    assert len(answers) == 1
    return answers[0]


def settled(h: Harness, until: float = 2.0) -> Harness:
    h.run(until)
    return h


# ---------------------------------------------------------------------------- who wins


def test_lowest_eligible_id_wins_at_cold_start() -> None:
    h = settled(Harness(ids=(1, 2, 3, 4, 5), witnesses=(1,)))
    assert h.leaders() == [2]
    assert [i for _, i in h.gains()] == [2]


def test_startup_grace_waits_for_a_slower_booting_lower_id() -> None:
    """Node 1's process comes up a second after the others: it still wins the cold start,
    so the IP moves once instead of twice (node 2, then node 1 after preempt_delay)."""
    h = Harness()
    h.isolate(1)
    h.run(1.0)
    assert h.gains() == []  # node 2 is past its quiet period but waits for node 1
    h.cut.clear()
    h.run(2.5)
    assert [i for _, i in h.gains()] == [1]


def test_startup_grace_ends_when_the_lower_id_never_shows_up() -> None:
    h = Harness()
    h.isolate(1)
    h.run(LAN.startup_grace - STEP)
    assert h.gains() == []
    h.run(LAN.startup_grace + 0.5)
    assert [i for _, i in h.gains()] == [2]


def test_no_vote_during_the_startup_quiet_period() -> None:
    voter = lone(3)
    voter.step(2, heartbeat(), 0.1)
    assert vote_answer(voter.step(2, VoteRequest(1, 1), QUIET - 0.01)).reason == "startup_quiet"
    voter.step(2, heartbeat(), QUIET)
    assert vote_answer(voter.step(2, VoteRequest(1, 2), QUIET + 0.01)).granted


def test_no_leader_during_the_startup_quiet_period() -> None:
    h = Harness()
    h.run(QUIET - STEP)
    assert h.leaders() == [] and h.gains() == []


def test_one_vote_per_term() -> None:
    voter = lone(3, ids=(1, 2, 3, 4, 5))
    assert vote_answer(voter.step(4, VoteRequest(7, 1), 1.0)).granted
    refusal = vote_answer(voter.step(5, VoteRequest(7, 1), 1.0))
    assert (refusal.granted, refusal.reason) == (False, "already_voted")


def test_refuses_while_promised_to_another() -> None:
    voter = lone(3)
    ready = voter.step(2, heartbeat(4, leading=True), 1.0)
    assert acks(ready, to=2) == [Ack(1, promised=True, held=0.0)]  # answered at once
    refusal = vote_answer(voter.step(1, VoteRequest(5, 1), 1.0 + LAN.lease_timeout - 0.01))
    assert refusal.reason == "promised"
    # The promise runs one lease_timeout from receipt; after that the vote is free again.
    assert vote_answer(voter.step(1, VoteRequest(6, 2), 1.0 + LAN.lease_timeout)).granted


def test_refuses_a_witness_candidate() -> None:
    voter = lone(3, witnesses=(1,))
    refusal = vote_answer(voter.step(1, VoteRequest(1, 1), 1.0))
    assert (refusal.granted, refusal.reason) == (False, "not_eligible")


def test_refuses_when_a_lower_viable_id_is_alive() -> None:
    voter = lone(3)
    voter.step(1, heartbeat(viable=True), 0.9)
    assert vote_answer(voter.step(2, VoteRequest(1, 1), 1.0)).reason == "lower_id_viable"
    # Once node 1 has been silent for peer_timeout, node 2 is the best choice.
    later = 0.9 + LAN.peer_timeout + 0.01
    assert vote_answer(voter.step(2, VoteRequest(2, 2), later)).granted


def test_a_viable_voter_refuses_a_higher_id() -> None:
    voter = lone(1)
    voter.step(3, heartbeat(), 0.9)  # node 1 sees a majority: viable (and it stands, term 1)
    assert vote_answer(voter.step(2, VoteRequest(5, 1), 1.0)).reason == "lower_id_viable"


# ---------------------------------------------------------------------------- leases


def leader_of_three() -> tuple[Harness, Election]:
    h = settled(Harness(), 1.5)
    assert h.leaders() == [1]
    return h, h.nodes[1]


def test_lease_counts_from_the_send_time_with_the_drift_margin() -> None:
    h, leader = leader_of_three()
    lease_before = leader.lease_until()
    assert lease_before is not None
    now = h.now
    for _ in range(100):  # run the leader alone until it sends its next heartbeat
        now = leader.next_deadline(now)
        beats = [o.msg for o in leader.tick(now).sends if isinstance(o.msg, Heartbeat)]
        if beats:
            break
    sent_at, seq = now, beats[0].seq
    assert beats[0].leading
    # The ack arrives 200 ms later; the lease still starts at the send time, not at receipt.
    leader.step(2, heartbeat(leader.term, ack=Ack(seq, True, 0.0)), sent_at + 0.2)
    expected = sent_at + LAN.lease_timeout * (1 - LAN.max_drift)
    assert leader.lease_until() == pytest.approx(expected)
    assert expected > lease_before


def test_an_ack_without_a_promise_does_not_extend_the_lease() -> None:
    h, leader = leader_of_three()
    lease_before = leader.lease_until()
    now = leader.next_deadline(h.now)
    seq = max(leader._sent)
    leader.step(2, heartbeat(leader.term, ack=Ack(seq, False, 0.0)), now)
    assert leader.lease_until() == lease_before


def test_leader_steps_down_when_the_lease_runs_out_without_majority_acks() -> None:
    h, leader = leader_of_three()
    lease_end = leader.lease_until()
    assert lease_end is not None
    h.isolate(1)
    h.run(lease_end + 0.05)
    lost = [e for _, i, e in h.events if i == 1 and isinstance(e, LostLeadership)]
    assert [(e.reason, e.lease_ended_at) for e in lost] == [("lease_expired", lease_end)]
    assert leader.role is Role.FOLLOWER


def test_one_ack_of_two_keeps_a_three_node_lease() -> None:
    h, _ = leader_of_three()
    h.cut_both(1, 3)
    h.run(h.now + 3 * LAN.lease_timeout)
    assert h.leaders() == [1]


def test_role_at_says_follower_past_the_lease_even_without_a_tick() -> None:
    _, leader = leader_of_three()
    lease_end = leader.lease_until()
    assert lease_end is not None
    assert leader.role_at(lease_end - 1e-6) is Role.LEADER
    assert leader.role_at(lease_end) is Role.FOLLOWER
    assert leader.leader_at(lease_end) is None
    assert leader.role is Role.LEADER  # nothing was processed: only the query knows


def test_a_paused_leader_wakes_as_a_follower_before_it_acts() -> None:
    h, _ = leader_of_three()
    paused = h.nodes.pop(1)  # a paused node processes nothing
    h.run(h.now + 3.0)
    assert h.leaders() == [2]
    woke = paused.tick(h.now)
    assert paused.role_at(h.now) is Role.FOLLOWER
    assert isinstance(woke.events[0], LostLeadership)
    assert not any(isinstance(o.msg, Heartbeat) and o.msg.leading for o in woke.sends)


# ---------------------------------------------------------------------------- hand-overs


def test_resign_releases_promises_and_the_next_node_wins_in_about_a_round_trip() -> None:
    h, leader = leader_of_three()
    resigned_at = h.now
    h.take(1, leader.shutdown(h.now))
    h.deliver()  # zero-delay network: the whole hand-over is a chain of packets
    assert h.leaders() == [2]
    assert h.gains()[-1] == (resigned_at, 2)
    assert h.nodes[3].promise_at(h.now) == (2, pytest.approx(h.now + LAN.lease_timeout))


def test_shutdown_leaves_for_good() -> None:
    h, leader = leader_of_three()
    h.take(1, leader.shutdown(h.now))
    h.run(h.now + 5.0)
    assert h.leaders() == [2]
    view = leader.view(h.now)
    assert (view.role, view.viable) == (Role.FOLLOWER, False)
    assert [i for _, i in h.gains()] == [1, 2]


def test_a_follower_shutting_down_sends_no_resign() -> None:
    h, _ = leader_of_three()
    ready = h.nodes[3].shutdown(h.now)
    assert not any(isinstance(o.msg, Resign) for o in ready.sends)


def test_unhealthy_leader_resigns_only_when_a_viable_peer_exists() -> None:
    h, leader = leader_of_three()
    for node_id in (2, 3):
        h.take(node_id, h.nodes[node_id].set_healthy(False, h.now))
    h.deliver()  # the leader hears that nobody else could take over
    h.take(1, leader.set_healthy(False, h.now))
    h.run(h.now + 2.0)
    assert h.leaders() == [1]  # sick, but nobody can do better
    h.take(2, h.nodes[2].set_healthy(True, h.now))
    h.run(h.now + 0.5)
    assert h.leaders() == [2]
    lost = [e for _, i, e in h.events if i == 1 and isinstance(e, LostLeadership)]
    assert [e.reason for e in lost] == ["unhealthy"]


# ---------------------------------------------------------------------------- pre-emption


def returning_lowest_id(timing: Timing) -> tuple[Harness, float]:
    h = settled(Harness(timing=timing), 1.5)
    h.isolate(1)
    h.run(h.now + 2.0)
    assert h.leaders() == [2]
    h.nodes[1] = Election(1, [Member(i) for i in h.ids], timing, h.now, random.Random(9))
    h.cut.clear()
    return h, h.now


def test_a_returning_lower_id_takes_over_only_after_preempt_delay() -> None:
    timing = replace(LAN, preempt_delay=2.0)
    h, returned_at = returning_lowest_id(timing)
    h.run(returned_at + timing.preempt_delay - STEP)
    assert h.leaders() == [2]
    h.run(returned_at + timing.preempt_delay + 0.2)
    assert h.leaders() == [1]
    takeover = [t for t, i in h.gains() if i == 1 and t > returned_at]
    assert takeover[0] - returned_at >= timing.preempt_delay


def test_without_preempt_a_returning_lower_id_never_takes_over() -> None:
    timing = replace(LAN, preempt=False)
    h, returned_at = returning_lowest_id(timing)
    h.run(returned_at + 60.0)
    assert h.leaders() == [2]
    assert [i for t, i in h.gains() if t > returned_at] == []


# ---------------------------------------------------------------------------- no flapping


@pytest.mark.parametrize("victim", range(60))
def test_losing_any_single_packet_never_changes_the_leader(victim: int) -> None:
    h, _ = leader_of_three()
    h.run(h.now + 0.25)
    gains_before = len(h.gains())
    counter = iter(range(10_000))

    def lose_one(src: int, dst: int, msg: Message) -> bool:
        return next(counter) == victim

    h.hold_if = lose_one
    h.run(h.now + 1.0)
    assert len(h.held) == 1  # that packet never arrives
    h.hold_if = None
    h.run(h.now + 2.0)
    assert h.leaders() == [1]
    assert len(h.gains()) == gains_before


# ---------------------------------------------------------------------------- deadlines


@pytest.mark.parametrize("role", ["follower", "candidate", "leader"])
def test_next_deadline_is_after_now_and_no_later_than_the_next_heartbeat(role: str) -> None:
    """A follower of a live leader answers the leader's heartbeats; its own timer is the
    fallback, FOLLOWER_FALLBACK intervals on. Everyone else heartbeats every interval."""
    h = Harness()
    for _ in range(300):
        h.run(h.now + STEP)
        for node in h.nodes.values():
            if node.role_at(h.now).value == role:
                deadline = node.next_deadline(h.now)
                leader = node.leader_at(h.now)
                following = leader is not None and leader != node.node_id
                factor = FOLLOWER_FALLBACK if following else 1.0
                assert h.now < deadline <= h.now + factor * LAN.heartbeat_interval + 1e-9


# ---------------------------------------------------------------------------- acks in heartbeats


def count_sends(h: Harness, seconds: float) -> collections.Counter[str]:
    """Datagrams the cluster sends over `seconds`, by kind (`ack` for a standalone one)."""
    counts: collections.Counter[str] = collections.Counter()
    take = h.take

    def counting(node_id: int, ready: Ready) -> Ready:
        for out in ready.sends:
            counts[type(out.msg).__name__] += 1
        return take(node_id, ready)

    h.take = counting  # type: ignore[method-assign]
    h.run(h.now + seconds)
    h.take = take  # type: ignore[method-assign]
    return counts


def test_three_nodes_send_six_datagrams_per_interval_not_twelve() -> None:
    """Acks ride in heartbeats: each node sends one heartbeat to each peer per interval and
    nothing else (a separate ack per heartbeat doubled that to 12)."""
    h = settled(Harness(), 3.0)
    assert h.leaders() == [1]
    intervals = 50
    counts = count_sends(h, intervals * LAN.heartbeat_interval)
    assert set(counts) == {"Heartbeat"}, counts
    assert 6 * intervals - 6 <= counts["Heartbeat"] <= 6 * intervals + 6, counts
    assert h.leaders() == [1] and h.nodes[1].lease_until() is not None


def test_a_follower_answers_the_leaders_heartbeat_at_once_with_the_promise() -> None:
    h, leader = leader_of_three()
    now = h.now
    for _ in range(100):  # run the leader alone until it sends its next heartbeat
        now = leader.next_deadline(now)
        ready = leader.tick(now)
        if ready.sends:
            break
    beat = next(o.msg for o in ready.sends if o.to == 2)
    assert isinstance(beat, Heartbeat) and beat.leading
    answer = h.nodes[2].step(1, beat, now + 0.003)
    # One heartbeat to each peer, at once; the one to the leader carries the promise.
    assert sorted(o.to for o in answer.sends) == [1, 3]
    assert acks(answer, to=1) == [Ack(beat.seq, promised=True, held=0.0)]
    # Node 3's newest heartbeat, heard a while ago, is acked too (held that long), no promise.
    assert [a.promised for a in acks(answer, to=3)] == [False]
    # The leader's lease runs from its own send time, not from the answer's arrival.
    to_leader = next(o.msg for o in answer.sends if o.to == 1)
    leader.step(2, to_leader, now + 0.009)
    assert leader.lease_until() == pytest.approx(now + LAN.lease_timeout * (1 - LAN.max_drift))
    assert leader.peers[2].rtt == pytest.approx(0.009)


def test_rtt_from_a_carried_ack_subtracts_the_time_it_was_held() -> None:
    node = lone(3)
    ready = node.tick(1.0)
    seq = next(o.msg.seq for o in ready.sends if isinstance(o.msg, Heartbeat))
    node.step(2, heartbeat(ack=Ack(seq, False, 0.07)), 1.09)
    assert node.peers[2].rtt == pytest.approx(0.02)
    # A held time longer than the whole exchange (or negative, or NaN) is nonsense from the
    # peer's clock: the RTT is not updated from it, and nothing else depends on it.
    for held in (0.2, -0.01, math.nan):
        node.step(2, heartbeat(ack=Ack(seq, False, held)), 1.1)
        assert node.peers[2].rtt == pytest.approx(0.02)


def test_heartbeats_of_a_node_without_a_leader_stay_on_the_interval_grid() -> None:
    """An early heartbeat (news to tell) does not shift the later ones: fewer wake-ups."""
    node = lone(3)
    node.tick(1.0)  # on the grid
    node.step(2, heartbeat(viable=True), 1.037)  # node 3 now sees a majority: news, sent at once
    assert node.next_deadline(1.037) == pytest.approx(1.1)


# ---------------------------------------------------------------------------- counterexamples


def test_a_stale_resign_does_not_release_a_newer_promise() -> None:
    """A Resign from a leader's earlier stint, delivered late, must not free a follower.

    Node 2 leads (node 1 is sick), resigns and at once wins again in a new term; one copy
    of its first Resign to node 3 is held back. Node 1 recovers but cannot hear node 2. When
    the stale Resign finally reaches node 3, node 3 must stay promised to node 2: if it let go,
    node 1 would win node 3's vote while node 2 still leads on node 3's acks: two leaders.
    """
    h = Harness(unhealthy=(1,))
    h.run(1.0)
    assert h.leaders() == [2]
    h.hold_if = lambda src, dst, msg: isinstance(msg, Resign) and dst == 3 and not h.held
    h.take(2, h.nodes[2].resign(h.now, "test"))
    h.run(h.now + STEP)
    h.hold_if = None
    assert h.leaders() == [2] and len(h.held) == 1  # node 2 leads again, in a newer term
    h.cut_both(1, 2)
    h.take(1, h.nodes[1].set_healthy(True, h.now))
    h.run(h.now + LAN.peer_timeout + 0.1)  # node 1 no longer sees node 2 at all
    h.release_held()
    h.run(h.now + 0.5)
    assert h.most_leaders_at_once == 1
    assert h.leaders() == [2]


def test_votes_too_late_to_leave_a_lease_make_no_leader() -> None:
    """With a long election round, a vote can arrive after the lease it would give is over."""
    timing = replace(LAN, election_round=2.0)
    h = Harness(timing=timing)
    h.hold_if = lambda src, dst, msg: isinstance(msg, VoteResponse) and dst == 1
    h.run(1.0)
    candidate = h.nodes[1]
    assert candidate.role is Role.CANDIDATE
    granted = [(src, m) for src, _, m in h.held if isinstance(m, VoteResponse) and m.granted]
    src, first = min(granted, key=lambda pair: pair[1].seq)
    h.now += timing.lease_timeout  # the earliest vote arrives one lease after it was asked for
    ready = h.take(1, candidate.step(src, first, h.now))
    assert not any(isinstance(e, GainedLeadership) for e in ready.events)
    assert candidate.role_at(h.now) is Role.CANDIDATE


# ---------------------------------------------------------------------------- properties

terms = st.integers(0, 6)
seqs = st.integers(0, 80)
node_ids = st.sampled_from((1, 2, 3))
messages = st.one_of(
    st.builds(
        Heartbeat,
        term=terms,
        seq=seqs,
        leader_id=st.none() | node_ids,
        leading=st.booleans(),
        eligible=st.booleans(),
        healthy=st.booleans(),
        viable=st.booleans(),
        ready_to_preempt=st.booleans(),
        ack=st.none() | st.builds(Ack, seq=seqs, promised=st.booleans(), held=st.floats()),
    ),
    st.builds(VoteRequest, term=terms, seq=seqs),
    st.builds(VoteResponse, term=terms, seq=seqs, granted=st.booleans(), reason=st.just("x")),
    st.builds(Resign, term=terms, reason=st.just("x")),
)
inputs = st.one_of(
    st.tuples(st.just("step"), node_ids, messages),
    st.tuples(st.just("tick"), st.none(), st.none()),
    st.tuples(st.just("health"), st.none(), st.booleans()),
    st.tuples(st.just("resign"), st.none(), st.none()),
    st.tuples(st.just("shutdown"), st.none(), st.none()),
)


@settings(max_examples=100, deadline=None)
@given(
    me=node_ids,
    witness=st.booleans(),
    script=st.lists(st.tuples(inputs, st.floats(0.0, 0.4)), max_size=80),
)
def test_any_input_sequence_is_handled_and_keeps_the_core_consistent(
    me: int, witness: bool, script: list[tuple[tuple[str, int | None, object], float]]
) -> None:
    """Arbitrary (even dishonest) messages never raise, never make a witness lead, and
    never leave a lease that is already over or a deadline that is not in the future."""
    members = [Member(i, eligible=not (witness and i == me)) for i in (1, 2, 3)]
    node = Election(me, members, LAN, 0.0, random.Random(0))
    now = 0.0
    for (kind, sender, payload), dt in script:
        now += dt
        if kind == "step" and sender != me:
            assert isinstance(payload, Heartbeat | VoteRequest | VoteResponse | Resign)
            ready = node.step(sender or 1, payload, now)
        elif kind == "health":
            ready = node.set_healthy(bool(payload), now)
        elif kind == "resign":
            ready = node.resign(now, "test")
        elif kind == "shutdown":
            ready = node.shutdown(now)
        else:
            ready = node.tick(now)
        assert all(o.to != me for o in ready.sends)
        for event in ready.events:
            if isinstance(event, GainedLeadership):
                assert event.lease_until > event.at
        if node.role_at(now) is Role.LEADER:
            assert node.eligible and not node.stopping
            lease = node.lease_until()
            assert lease is not None and lease > now
        leader = node.leader_at(now)
        factor = FOLLOWER_FALLBACK if leader not in (None, node.node_id) else 1.0
        assert now < node.next_deadline(now) <= now + factor * LAN.heartbeat_interval + 1e-9
        node.view(now)


@settings(max_examples=60, deadline=None, stateful_step_count=100)
class AdversarialNetwork(RuleBasedStateMachine):
    """Three cores on one clock; Hypothesis delivers, duplicates, reorders and drops every
    packet and moves time as it likes. Safety rests on clocks alone, so no schedule may
    ever produce two leases that overlap in time."""

    def __init__(self) -> None:
        super().__init__()
        members = [Member(1), Member(2), Member(3, eligible=False)]
        self.now = 0.0
        self.nodes = {i: Election(i, members, LAN, 0.0, random.Random(i)) for i in (1, 2, 3)}
        self.in_flight: list[tuple[int, int, Message]] = []
        self.lease_end = {i: float("-inf") for i in self.nodes}

    def _absorb(self, node_id: int, ready: Ready) -> None:
        self.in_flight += [(node_id, o.to, o.msg) for o in ready.sends]
        self.in_flight = self.in_flight[-60:]  # bound the state; older packets count as lost
        node = self.nodes[node_id]
        if node.role_at(self.now) is Role.LEADER:
            lease = node.lease_until()
            assert lease is not None
            for other, end in self.lease_end.items():
                assert other == node_id or end <= self.now, "two leases overlap"
            self.lease_end[node_id] = max(self.lease_end[node_id], lease)
        else:
            self.lease_end[node_id] = min(self.lease_end[node_id], self.now)

    @rule(node_id=node_ids, dt=st.floats(0.0, 0.7))
    def tick(self, node_id: int, dt: float) -> None:
        self.now += dt
        self._absorb(node_id, self.nodes[node_id].tick(self.now))

    @precondition(lambda self: bool(self.in_flight))
    @rule(pick=st.integers(0, 59), keep=st.booleans())
    def deliver(self, pick: int, keep: bool) -> None:
        src, dst, msg = self.in_flight[pick % len(self.in_flight)]
        if not keep:  # keep=True leaves a copy in flight: a duplicate, deliverable later
            self.in_flight.remove((src, dst, msg))
        self._absorb(dst, self.nodes[dst].step(src, msg, self.now))

    @rule(node_id=node_ids)
    def restart(self, node_id: int) -> None:
        members = [Member(1), Member(2), Member(3, eligible=False)]
        self.nodes[node_id] = Election(node_id, members, LAN, self.now, random.Random(node_id))

    @rule(node_id=node_ids, healthy=st.booleans())
    def health(self, node_id: int, healthy: bool) -> None:
        self._absorb(node_id, self.nodes[node_id].set_healthy(healthy, self.now))

    @rule(node_id=node_ids)
    def resign(self, node_id: int) -> None:
        self._absorb(node_id, self.nodes[node_id].resign(self.now, "test"))

    @invariant()
    def at_most_one_leader(self) -> None:
        leading = [i for i, n in self.nodes.items() if n.role_at(self.now) is Role.LEADER]
        assert len(leading) <= 1
        assert 3 not in leading


test_adversarial_network_never_yields_two_leases = AdversarialNetwork.TestCase


def test_one_way_outbound_loss_does_not_skip_the_preempt_hold_down() -> None:
    """Node 1 can hear but not be heard: it loses its lease while staying viable in its own
    eyes. When its packets flow again, node 2 must not hand over before preempt_delay
    (found in the namespace chaos suite: two IP moves within a second)."""
    h = Harness(timing=replace(LAN, preempt_delay=3.0))
    h.run(5.0)  # node 1 has led (and been viable) for longer than preempt_delay
    assert h.leaders() == [1]
    h.cut |= {(1, 2), (1, 3)}
    h.run(7.0)
    assert h.leaders() == [2]
    healed = h.now
    h.cut.clear()
    h.run(healed + 2.5)
    assert h.leaders() == [2], "pre-empted before node 2 had heard node 1 for preempt_delay"
    h.run(healed + 5.0)
    assert h.leaders() == [1]  # the bully rule still applies once the hold-down has passed


# ---------------------------------------------------------------------- issue 10 / 12 additions


def test_every_round_is_counted_even_one_restarted_within_a_tick() -> None:
    """A candidacy that expires and restarts in the same call was invisible to a runtime
    that compared roles before and after (fip_elections_total stayed at 0 while the term
    rose). The core counts rounds itself."""
    node = lone(1)
    for peer in (2, 3):
        node.step(peer, heartbeat(viable=False), QUIET + 0.01)
    node.tick(QUIET + 0.02)
    assert node.role is Role.CANDIDATE and node.elections == 1
    # No votes arrive; one tick past the round: it abandons and stands again at once.
    late = QUIET + 0.02 + LAN.election_round * 1.3
    for peer in (2, 3):
        node.step(peer, heartbeat(viable=False), late - 0.001)
    node.tick(late)
    assert node.role is Role.CANDIDATE
    assert node.elections == 2


def test_sequence_numbers_of_two_processes_do_not_collide() -> None:
    """An Ack meant for a predecessor's heartbeat must not match ours: seq starts at random."""
    starts = set()
    for seed in range(20):
        node = Election(1, [Member(1), Member(2), Member(3)], LAN, 0.0, random.Random(seed))
        ready = node.tick(0.0)
        seqs = {o.msg.seq for o in ready.sends if isinstance(o.msg, Heartbeat)}
        starts |= seqs
    assert len(starts) == 20


def test_a_promise_to_a_restarted_peer_blocks_its_new_process_until_it_runs_out() -> None:
    """Node 3 promised node 1 (leader); node 1's process is replaced by another (a
    duplicate or a restart). The new process must not get node 3's vote on the strength of
    the old promise, or the old process could still be leading on it."""
    h = settled(Harness())
    assert h.leaders() == [1]
    voter = h.nodes[3]
    assert voter.promise_at(h.now) is not None
    voter.peer_restarted(1, h.now)
    promise = voter.promise_at(h.now)
    assert promise is not None and promise[0] is None  # still blocking, for nobody
    term = voter.term + 1
    answer = vote_answer(voter.step(1, VoteRequest(term, 5), h.now))
    assert not answer.granted and answer.reason == "promised"
    later = h.now + LAN.lease_timeout + 0.01
    answer = vote_answer(voter.step(1, VoteRequest(term + 1, 6), later))
    assert answer.reason != "promised"


def joint(old: set[int], new: set[int]) -> tuple[frozenset[int], frozenset[int]]:
    return frozenset(old), frozenset(new)


def test_a_transition_node_needs_a_majority_of_both_memberships() -> None:
    """Growing {1,2,3} -> {1,2,3,4,5}: with 2 and 3 reachable node 1 has 3 of 5 and 3 of 3;
    with only 2 it has 2 of 3 (enough for the old) but 2 of 5 (not for the new)."""
    members = [Member(i) for i in range(1, 6)]
    node = Election(
        1, members, LAN, 0.0, random.Random(1), memberships=joint({1, 2, 3}, set(range(1, 6)))
    )
    at = QUIET + 0.01
    node.step(2, heartbeat(viable=False), at)
    node.tick(at)
    assert not node.view(at).viable
    assert node.view(at).waiting_for == (
        "no quorum: 2 of 3 reachable, 2 needed; 2 of 5 reachable, 3 needed"
    )
    node.step(3, heartbeat(viable=False), at)
    assert node.view(at).viable


def test_a_leaving_member_never_stands() -> None:
    members = [Member(i) for i in range(1, 5)]
    node = Election(
        4, members, LAN, 0.0, random.Random(4), memberships=joint({1, 2, 3, 4}, {1, 2, 3})
    )
    assert not node.eligible
    assert node.view(0.0).waiting_for == "leaving (not in the new membership)"


def test_reconfigure_keeps_a_leaders_lease_and_renews_under_the_new_rule() -> None:
    h = settled(Harness())
    leader = h.nodes[1]
    lease = leader.lease_until()
    assert lease is not None
    members = [Member(i) for i in range(1, 6)]
    leader.reconfigure(members, joint({1, 2, 3}, set(range(1, 6))), h.now)
    assert leader.role_at(h.now) is Role.LEADER
    assert leader.lease_until() == lease
    # 4 and 5 never answer: 2 and 3 still make 3 of 5, so the lease is renewed.
    for node in (2, 3):
        h.nodes[node].reconfigure(members, joint({1, 2, 3}, set(range(1, 6))), h.now)
    h.run(h.now + 2.0)
    assert h.leaders() == [1]
    assert [e for _, i, e in h.events if i == 1 and isinstance(e, LostLeadership)] == []


def test_a_node_waiting_for_its_first_health_verdict_announces_starting() -> None:
    """On the old main a node with a pending verdict was simply unhealthy, so a peer whose
    service answered first won the cold start (and the IP moved twice)."""
    members = [Member(1), Member(2), Member(3, eligible=False)]
    node = Election(
        1,
        members,
        LAN,
        0.0,
        random.Random(1),
        healthy=False,
        health_pending=True,
        health_allowance=2.8,
    )
    ready = node.tick(0.0)
    beats = [o.msg for o in ready.sends if isinstance(o.msg, Heartbeat)]
    assert beats and all(b.starting for b in beats)
    assert node.view(0.0).waiting_for == "starting: waiting for the first health verdict"
    assert node.grace_until == pytest.approx(LAN.startup_grace + 2.8)
    node.set_healthy(False, 1.0)  # the verdict is in, and it is "unhealthy"
    assert not node.health_pending


def test_a_reload_that_drops_a_membership_holds_off_standing_for_one_lease() -> None:
    """Phase 2 of a change, (old, new) -> new, live: a lease won on the old membership alone
    may still run for one lease (tests/test_simulation.py shows the two leaders without
    this), so the node gives up its round and stands again only one lease later."""
    members = [Member(i) for i in (1, 2, 3)]
    old, new = frozenset({1, 2, 3}), frozenset({2, 3})
    timing = replace(LAN, startup_grace=0.0)
    node = Election(2, members, timing, 0.0, random.Random(0), memberships=(old, new))
    node.step(3, heartbeat(), 0.95)
    node.tick(1.0)
    assert node.role is Role.CANDIDATE
    node.reconfigure(members[1:], (new,), 1.0)
    assert node.role is Role.FOLLOWER
    assert node.view(1.0).waiting_for == "membership changed: not standing for one lease"
    assert node.next_deadline(1.55) <= 1.0 + timing.lease_timeout
    for now in (1.1, 1.2, 1.3, 1.4, 1.5):
        node.step(3, heartbeat(seq=int(now * 10)), now)
        assert node.role is Role.FOLLOWER
    node.step(3, heartbeat(seq=16), 1.6)
    assert node.role is Role.CANDIDATE


def test_a_reload_that_adds_a_membership_stands_at_once() -> None:
    """Phase 1, old -> (old, new), drops nothing: no hold-off (a reload must not slow an
    election down needlessly)."""
    members = [Member(i) for i in (1, 2, 3)]
    old, new = frozenset({1, 2, 3}), frozenset({2, 3})
    node = Election(2, members, replace(LAN, startup_grace=0.0), 0.0, random.Random(0))
    node.step(3, heartbeat(), 0.95)
    node.reconfigure(members, (old, new), 0.96)
    node.tick(1.0)
    assert node.role is Role.CANDIDATE


# ---------------------------------------------------------------------------- waking


def next_heartbeat_of(leader: Election, now: float) -> tuple[float, Heartbeat]:
    """Run `leader` alone to its next heartbeat: (send time, the heartbeat to node 2)."""
    for _ in range(100):
        now = leader.next_deadline(now)
        ready = leader.tick(now)
        beats = [o.msg for o in ready.sends if o.to == 2 and isinstance(o.msg, Heartbeat)]
        if beats:
            return now, beats[0]
    raise AssertionError("no heartbeat")


def test_wake_on_nothing_for_a_leader_only_the_leader_for_its_followers() -> None:
    """Who needs which packets at once (`wake_on`): a leader nobody's, a follower holding
    a promise only its leader's, anyone else everyone's."""
    h, leader = leader_of_three()
    assert leader.wake_on(h.now) == frozenset()
    assert h.nodes[2].wake_on(h.now) == frozenset({1})
    assert h.nodes[3].wake_on(h.now) == frozenset({1})
    h.isolate(1)
    h.run(h.now + LAN.lease_timeout + 0.05)  # promises run out, node 2 stands
    assert h.nodes[2].wake_on(h.now) in (None, frozenset())  # candidate or new leader
    assert leader.wake_on(h.now) is None  # lapsed, cut off, looking for a leader
    fresh = lone(2)
    assert fresh.wake_on(0.0) is None


def test_an_ack_that_arrived_in_time_renews_the_lease_though_stepped_after_its_end() -> None:
    """The leader's acks wait for its next wake-up; one that came while the lease ran
    counts as it would have on arrival, so a leader woken by its lease's end keeps it."""
    h, leader = leader_of_three()
    sent_at, beat = next_heartbeat_of(leader, h.now)
    lease_end = leader.lease_until()
    assert lease_end is not None
    answer = Heartbeat(**{**_fields(heartbeat(leader.term)), "ack": Ack(beat.seq, True, 0.0)})
    ready = leader.receive([(2, answer, lease_end - 0.01)], lease_end + 0.001)
    assert not [e for e in ready.events if isinstance(e, LostLeadership)]
    assert leader.role_at(lease_end + 0.001) is Role.LEADER
    assert leader.lease_until() == pytest.approx(sent_at + LAN.lease_timeout * (1 - LAN.max_drift))
    assert leader.peers[2].rtt == pytest.approx(lease_end - 0.01 - sent_at)


def test_an_ack_that_arrived_after_the_lease_ended_does_not_revive_it() -> None:
    h, leader = leader_of_three()
    _, beat = next_heartbeat_of(leader, h.now)
    lease_end = leader.lease_until()
    assert lease_end is not None
    answer = Heartbeat(**{**_fields(heartbeat(leader.term)), "ack": Ack(beat.seq, True, 0.0)})
    ready = leader.receive([(2, answer, lease_end + 0.001)], lease_end + 0.002)
    assert [e.reason for e in ready.events if isinstance(e, LostLeadership)] == ["lease_expired"]
    assert leader.role_at(lease_end + 0.002) is not Role.LEADER


def test_a_waiting_heartbeat_is_answered_with_the_time_it_really_waited() -> None:
    """`held` in our ack counts from the packet's arrival, not from when it was stepped,
    so the peer's round trip excludes the wait; the rules still use the step's time."""
    node = lone(3)
    node.tick(0.95)  # its first heartbeat; the next is due at 1.0
    ready = node.receive([(2, heartbeat(seq=7), 1.01)], 1.08)
    assert [(a.seq, a.held) for a in acks(ready, to=2)] == [(7, pytest.approx(0.07))]
    assert node.peers[2].last_heard == pytest.approx(1.01)
    # An arrival "after" the step (a clock quirk) is taken as the step's own time.
    node.receive([(2, heartbeat(seq=8), 9.0)], 1.2)
    assert node.peers[2].last_heard == pytest.approx(1.2)


def _fields(beat: Heartbeat) -> dict[str, object]:
    return {name: getattr(beat, name) for name in beat.__struct_fields__}
