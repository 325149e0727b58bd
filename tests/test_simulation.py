"""Thousands of seeds of the deterministic cluster simulator (`tests/sim`).

Each seed runs one scenario on 3, 5 or 7 nodes (half of them with a witness) and fails
with the invariant or recovery check that broke and a one-line command that replays it with
its timeline. The seeds run in worker processes (one per core) because the suite is the
slowest in the repository; everything is deterministic per seed either way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sidecar.election import Timing

try:
    from tests.sim import run
except ImportError:  # pytest's default rootdir import mode puts tests/ itself on sys.path
    from sim import run  # type: ignore[no-redef]

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
