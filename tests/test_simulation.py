"""Thousands of seeds of the deterministic cluster simulator (`tests/sim`).

Each seed runs one scenario on 3, 5 or 7 nodes (half of them with a witness) and fails
with the invariant or recovery check that broke and a one-line command that replays it with
its timeline. The membership-change explorer (`tests/sim/membership.py`) runs 5,000
rollouts (about 2.5 minutes on two cores) and prints what it covered, and its negative
control must find two leaders when the transition config is skipped. The seeds run in
worker processes (one per core) because the suite is the slowest in the repository;
everything is deterministic per seed either way.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sidecar.election import Election, Member, PeerState, Role, Timing
from sidecar.messages import Ack

try:
    from tests.sim import run
    from tests.sim.clock import NodeClock
    from tests.sim.cluster import NodeConfig, Simulation
    from tests.sim.membership import CHANGES, Coverage, explore
except ImportError:  # pytest's default rootdir import mode puts tests/ itself on sys.path
    from sim import run  # type: ignore[no-redef]
    from sim.clock import NodeClock  # type: ignore[no-redef]
    from sim.cluster import NodeConfig, Simulation  # type: ignore[no-redef]
    from sim.membership import CHANGES, Coverage, explore  # type: ignore[no-redef]

CHUNK = 100
#: (scenario, how many seeds) - 2,000 in all; chaos is where the faults are.
PLAN = [
    ("chaos", 1000),
    ("failover", 200),
    ("cold_start", 200),
    ("pause", 200),
    ("preempt", 200),
    ("no_preempt", 200),
]
#: Node counts, weighted towards the cheap ones: 3 nodes run ~5x faster than 7.
SIZES = (3, 3, 5, 3, 5, 7)


def case(scenario: str, seed: int) -> tuple[int, int, bool, str]:
    return seed, SIZES[seed % len(SIZES)], seed % 2 == 1, scenario


def run_case(args: tuple[int, int, bool, str]) -> str | None:
    seed, nodes, witness, scenario = args
    outcome = run(seed, nodes, witness, scenario)
    if outcome.ok:
        return None
    return f"{outcome.failures[0]}\n    reproduce: {outcome.reproduce()}"


@pytest.fixture(scope="module")
def pool() -> Iterator[ProcessPoolExecutor]:
    with ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as executor:
        yield executor


CHUNKS = [(scenario, start) for scenario, count in PLAN for start in range(0, count, CHUNK)]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(("scenario", "first_seed"), CHUNKS)
def test_simulated_seeds_keep_every_invariant(
    pool: ProcessPoolExecutor, scenario: str, first_seed: int
) -> None:
    cases = [case(scenario, seed) for seed in range(first_seed, first_seed + CHUNK)]
    failures = [f for f in pool.map(run_case, cases, chunksize=5) if f is not None]
    assert not failures, f"{len(failures)} of {len(cases)} seeds failed:\n" + "\n".join(failures)


#: Membership-change rollouts (tests/sim/membership.py) run by CI, and how many seeds of the
#: unsafe rollout may pass before the explorer must have found two leaders there.
MEMBERSHIP_SEEDS = 5000
UNSAFE_SEEDS = 200


def explore_all(pool: ProcessPoolExecutor, seeds: int, unsafe: bool) -> tuple[Coverage, list[str]]:
    coverage, failures = Coverage(), []
    chunks = [range(first, min(first + CHUNK, seeds)) for first in range(0, seeds, CHUNK)]
    for part, failed in pool.map(explore, chunks, [unsafe] * len(chunks)):
        coverage.merge(part)
        failures += failed
    return coverage, failures


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_membership_changes_in_any_rollout_order_keep_one_leader(
    pool: ProcessPoolExecutor, capsys: pytest.CaptureFixture[str]
) -> None:
    """The documented two-phase procedure, every change the README lists, thousands of
    rollout orders under partitions, crashes, pauses and loss: never two leases at once,
    every lease on a majority of each of its memberships, one leader of the new membership
    after the rollout heals."""
    coverage, failures = explore_all(pool, MEMBERSHIP_SEEDS, unsafe=False)
    with capsys.disabled():
        print("\nmembership explorer:\n  " + "\n  ".join(coverage.lines()))
    assert not failures, f"{len(failures)} seeds failed:\n" + "\n".join(failures)
    # The explorer really went where the argument is delicate.
    assert set(coverage.changes) == set(CHANGES)
    for what in (
        "reloads while leading",
        "restarts while leading",
        "splits held through the rollout",
        "crashes",
        "pauses",
        "one-way cuts",
        "configs while down",
    ):
        assert coverage.counts[what] > MEMBERSHIP_SEEDS // 20, what
    assert coverage.no_gap > MEMBERSHIP_SEEDS // 5
    assert coverage.witnesses and coverage.dead_leaving


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_membership_explorer_finds_two_leaders_when_the_transition_is_skipped(
    pool: ProcessPoolExecutor, capsys: pytest.CaptureFixture[str]
) -> None:
    """The negative control, and the documented unsafe case: old and new configs side by
    side (each node straight from the old membership to the new one) let an old majority
    and a new majority both elect. The same explorer must find it, or it could not fail."""
    _, failures = explore_all(pool, UNSAFE_SEEDS, unsafe=True)
    two = [f for f in failures if "TWO LEADERS" in f]
    with capsys.disabled():
        print(f"\nunsafe rollouts: two leaders in {len(two)} of {UNSAFE_SEEDS} seeds")
        print("\n".join(two[:1]))
    assert two, f"no two leaders in {UNSAFE_SEEDS} unsafe rollouts"


@pytest.mark.parametrize("first_seed", [0, 100])
def test_leases_never_outlive_the_promises_when_acks_are_lost_delayed_or_reordered(
    pool: ProcessPoolExecutor, first_seed: int
) -> None:
    """Acks ride in heartbeats, so a promise reaches the leader late, twice, out of order or
    never: 200 seeds on 3, 5 and 7 nodes of every link losing, duplicating, delaying and
    reordering, each checked after every call (no lease outlives a majority's promises)."""
    cases = [case("lossy_acks", seed) for seed in range(first_seed, first_seed + CHUNK)]
    failures = [f for f in pool.map(run_case, cases, chunksize=5) if f is not None]
    assert not failures, f"{len(failures)} of {len(cases)} seeds failed:\n" + "\n".join(failures)


def test_the_lossy_acks_scenario_catches_a_lease_counted_from_the_acks_arrival(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Negative control: a leader that counted its lease from when a (late) ack arrived,
    instead of from its own send time of the heartbeat promised on, must be caught."""

    def from_arrival(
        self: Election, peer: PeerState, ack: Ack, now: float, received: float
    ) -> None:
        if ack.seq in self._sent and ack.promised and self.role is Role.LEADER:
            self._record_promise(peer.id, now, now)

    monkeypatch.setattr(Election, "_on_ack", from_arrival)
    caught = [
        seed
        for seed in range(30)
        if any("promise it that long" in f for f in run(*case("lossy_acks", seed)).failures)
    ]
    assert caught, "30 seeds of lossy acks did not notice leases counted from ack arrival"


def test_a_seed_replays_exactly() -> None:
    first, second = run(7, 5, True, "chaos"), run(7, 5, True, "chaos")
    assert first.sim.timeline == second.sim.timeline
    assert first.sim.calls == second.sim.calls


@settings(max_examples=25, deadline=None)
@given(
    heartbeat=st.floats(0.05, 0.5),
    peer_factor=st.floats(2.0, 8.0),
    lease_factor=st.floats(1.0, 2.0),
    max_drift=st.floats(0.0, 0.45),
    round_factor=st.floats(0.1, 2.0),
    preempt=st.booleans(),
    preempt_delay=st.floats(0.0, 2.0),
    seed=st.integers(0, 2**32),
)
def test_any_accepted_timing_keeps_safety_in_short_chaos(
    heartbeat: float,
    peer_factor: float,
    lease_factor: float,
    max_drift: float,
    round_factor: float,
    preempt: bool,
    preempt_delay: float,
    seed: int,
) -> None:
    peer_timeout = heartbeat * peer_factor
    timing = Timing(
        heartbeat_interval=heartbeat,
        peer_timeout=peer_timeout,
        lease_timeout=peer_timeout * lease_factor,
        max_drift=max_drift,
        vote_retry_interval=heartbeat / 4,
        election_round=peer_timeout * round_factor,
        preempt=preempt,
        preempt_delay=preempt_delay,
    )
    assume(not timing.problems())
    outcome = run(seed, 3, seed % 2 == 0, "chaos", timing=timing)
    assert outcome.ok, f"{outcome.failures[0]} with {timing}"


def test_phase_two_right_after_phase_one_keeps_one_leader() -> None:
    """Shrinking {1..5} to {1,2,3} while {1,4,5} cannot reach {2,3} (membership explorer
    seed 2279, minimised). Node 1 leads on {1,4,5}, a majority of the old membership only;
    a live reload to the transition config keeps that lease. Phase 2 starts the moment every
    node runs the transition config: node 2 reloads to {1,2,3} and node 3, which never
    promised node 1, votes for it. Node 2 must not lead while node 1's lease runs."""
    old, new = frozenset({1, 2, 3, 4, 5}), frozenset({1, 2, 3})
    members = [Member(i) for i in sorted(old)]
    timing = Timing(preempt_delay=1.0)
    sim = Simulation(
        members,
        timing,
        random.Random(1),
        {i: NodeClock(0.0, 1.0) for i in old},
        configs=dict.fromkeys(old, NodeConfig.of(members, old)),
        track_incarnations=True,
    )
    for node_id in sorted(old):
        sim.start(node_id)
    sim.run_until(3.0)
    assert sim.leader_now() == 1
    sim.network.partition({1, 4, 5}, {2, 3})
    sim.run_until(5.0)
    assert sim.leader_now() == 1  # on 4 and 5: a majority of the old membership
    for node_id, config in [
        *((i, NodeConfig.of(members, old, new)) for i in (1, 2, 3, 4, 5)),
        *((i, NodeConfig.of(members[:3], new)) for i in (2, 3, 1)),
    ]:
        sim.reconfigure(node_id, config)
        sim.run_until(sim.now + 0.01)
    sim.run_until(8.0)  # the invariants are checked after every call in between
    assert sim.leader_now() == 2  # 1 cannot renew on {1,2,3}; 2 leads on {2,3}
