"""Scenarios for the simulator, each a function of one seed, and the checks after healing.

Every scenario builds a cluster from `random.Random(seed)` (member ids 1..N, one of them a
witness when asked, clocks drawn within the drift bound), runs faults, and then (except
`steady`) heals the network and checks recovery: after the heal, with a majority up,

* some node leads within `recovery_bound(timing)` of the heal, and it is the lowest-id up,
  healthy, eligible node when `preempt` is on (any such node when it is off);
* no leadership event at all happens after that bound (no flapping);
* with no up, healthy, eligible node, leadership still stops changing (an unhealthy leader
  may stay: it resigns only for a viable peer);
* with fewer than a majority up, nobody leads.

`recovery_bound` = preempt_delay (when preempt is on) + 2 x lease_timeout + startup_grace +
peer_timeout +
2.4 x election_round + 4 x heartbeat_interval, every term stretched by the slowest clock
rate: one lease for stale promises and start-up quiet periods to run out, one peer timeout
for views of dead peers to lapse, up to two (jittered) election rounds, and a few heartbeats
for views to settle. With `lan` timing and preempt off that is 4.49 s.
"""

from __future__ import annotations

import functools
import random
import statistics
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace

from sidecar.election import Member, Timing, majority

from .clock import draw_clock, rate_bounds
from .cluster import InvariantViolation, Simulation
from .network import CLEAN, LinkProfile

LAN = Timing()
SCENARIOS = (
    "cold_start",
    "failover",
    "chaos",
    "pause",
    "preempt",
    "no_preempt",
    "steady",
    "lossy_acks",
)


@dataclass(slots=True)
class Outcome:
    seed: int
    scenario: str
    nodes: int
    witness: bool
    sim: Simulation
    failures: list[str] = field(default_factory=list)
    failover: float | None = None  # crash -> next GainedLeadership, true seconds
    leader_changes: int = 0

    @property
    def ok(self) -> bool:
        return not self.failures

    def reproduce(self) -> str:
        witness = " --witness" if self.witness else ""
        return (
            f"python -m tests.sim --seed {self.seed} --nodes {self.nodes}{witness} "
            f"--scenario {self.scenario} -v"
        )


def recovery_bound(timing: Timing, *, preemption: bool = True) -> float:
    """How long after healing the cluster may take to settle (see the module docstring).

    `preemption=False` leaves out preempt_delay, for scenarios where the lowest id is
    never away (a clean start, a crash of the leader).
    """
    slowest = rate_bounds(timing.max_drift)[0]
    bound = (
        2 * timing.lease_timeout
        + timing.startup_grace  # a node restarted just before the heal may still wait
        + timing.peer_timeout
        + 2.4 * timing.election_round
        + 4 * timing.heartbeat_interval
    )
    if timing.preempt and preemption:
        bound += timing.preempt_delay
    return bound / slowest


def random_timing(rng: random.Random) -> Timing:
    """Any timing the core accepts (problems() == []), with a short preempt_delay."""
    for _ in range(1000):
        heartbeat = rng.uniform(0.05, 0.3)
        peer_timeout = heartbeat * rng.uniform(2.0, 6.0)
        timing = Timing(
            heartbeat_interval=heartbeat,
            peer_timeout=peer_timeout,
            lease_timeout=peer_timeout * rng.uniform(1.0, 1.6),
            max_drift=rng.uniform(0.0, 0.3),
            vote_retry_interval=heartbeat * rng.uniform(0.1, 1.0),
            election_round=peer_timeout * rng.uniform(0.3, 1.0),
            preempt=rng.random() < 0.7,
            preempt_delay=rng.uniform(0.0, 3.0),
            startup_grace=rng.uniform(0.0, 2.0),
        )
        if not timing.problems():
            return timing
    raise RuntimeError("could not draw a valid timing")  # pragma: no cover


def build(
    rng: random.Random,
    seed: int,
    nodes: int,
    witness: bool,
    timing: Timing,
    *,
    trace_messages: bool = False,
) -> Simulation:
    witness_id = rng.randint(1, nodes) if witness else None
    members = [Member(i, eligible=i != witness_id) for i in range(1, nodes + 1)]
    extreme = rng.random() < 0.3
    clocks = {m.id: draw_clock(rng, timing.max_drift, extreme=extreme) for m in members}
    sim = Simulation(members, timing, rng, clocks, trace_messages=trace_messages)
    sim.log(
        f"seed={seed} members={[(m.id, 'eligible' if m.eligible else 'witness') for m in members]}"
        f" timing={timing}"
    )
    for node in sim.nodes.values():
        sim.log(f"n{node.id} clock rate={node.clock.rate:.5f}")
    return sim


def start_all(sim: Simulation, rng: random.Random, spread: float = 0.3) -> None:
    for node_id in sim.nodes:
        sim.at(rng.uniform(0.0, spread), functools.partial(sim.start, node_id))


def eligible_healthy_up(sim: Simulation, members: Collection[int] | None = None) -> list[int]:
    return sorted(
        n.id
        for n in sim.nodes.values()
        if n.up and n.member.eligible and n.healthy and (members is None or n.id in members)
    )


def check_recovery(
    sim: Simulation,
    healed_at: float,
    *,
    settle: float = 2.0,
    preemption: bool = True,
    members: Collection[int] | None = None,
) -> list[str]:
    """Run past the bound plus `settle` seconds and check who leads and that it stayed put.

    `members` (default: every node) is the membership the cluster ends up with; nodes
    outside it must be stopped by then."""
    bound = recovery_bound(sim.timing, preemption=preemption)
    sim.run_until(healed_at + bound + settle)
    counted = set(sim.nodes) if members is None else set(members)
    up = [n for n in sim.nodes.values() if n.up and n.id in counted]
    candidates = eligible_healthy_up(sim, counted)
    leader = sim.leader_now()
    after = [e for e in sim.leadership if e.true_time > healed_at + bound]
    failures: list[str] = []
    if len(up) >= majority(frozenset(counted)) and candidates:
        if leader is None:
            failures.append(
                f"no leader {bound + settle:.2f}s after healing (candidates {candidates})"
            )
        elif sim.timing.preempt and leader != candidates[0]:
            failures.append(f"n{leader} leads, but n{candidates[0]} should (preempt on)")
        elif leader not in candidates:
            failures.append(f"n{leader} leads but is not an up, healthy, eligible node")
        if after:
            failures.append(
                f"leadership still changing {after[0].true_time - healed_at:.3f}s after healing "
                f"(bound {bound:.3f}s): n{after[0].node} {after[0].reason}"
            )
    elif len(up) < majority(frozenset(counted)) and leader is not None:
        failures.append(f"n{leader} leads with only {len(up)} of {len(counted)} nodes up")
    elif after:
        # No healthy candidate: an unhealthy leader may stay (it resigns only for a viable
        # peer), but nothing may keep changing.
        failures.append(
            f"leadership still changing {after[0].true_time - healed_at:.3f}s after healing"
        )
    return failures


def leader_changes(sim: Simulation, since: float) -> int:
    return sum(1 for e in sim.leadership if e.gained and e.true_time > since)


# ---------------------------------------------------------------------------- scenarios


def cold_start(sim: Simulation, rng: random.Random, outcome: Outcome) -> None:
    start_all(sim, rng)
    outcome.failures += check_recovery(sim, healed_at=0.3, preemption=False)


def failover(sim: Simulation, rng: random.Random, outcome: Outcome) -> None:
    """Crash the leader of a settled cluster; time until someone else gains leadership."""
    start_all(sim, rng, spread=0.2)
    sim.run_until(3.0 + rng.uniform(0.0, 0.5))
    leader = sim.leader_now()
    if leader is None:
        outcome.failures.append("no leader 3 s after a clean start")
        return
    crashed_at = sim.now
    sim.crash(leader)
    outcome.failures += check_recovery(sim, healed_at=crashed_at, preemption=False)
    gains = [e for e in sim.leadership if e.gained and e.true_time > crashed_at]
    if gains:
        outcome.failover = gains[0].true_time - crashed_at


def pause_leader(sim: Simulation, rng: random.Random, outcome: Outcome) -> None:
    """Freeze the leader past its lease (GC, SIGSTOP); it must wake up as a follower."""
    start_all(sim, rng)
    sim.run_until(2.5 + rng.uniform(0.0, 0.5))
    leader = sim.leader_now()
    if leader is None:
        outcome.failures.append("no leader 2.5 s after a clean start")
        return
    duration = sim.timing.lease_timeout * rng.uniform(0.5, 4.0)
    sim.pause(leader, duration)
    outcome.failures += check_recovery(sim, healed_at=sim.now + duration)


def preempt(sim: Simulation, rng: random.Random, outcome: Outcome) -> None:
    """The lowest id crashes and returns: it takes over only after preempt_delay (or never)."""
    start_all(sim, rng)
    sim.run_until(2.5)
    first = sim.leader_now()
    if first is None:
        outcome.failures.append("no leader 2.5 s after a clean start")
        return
    sim.crash(first)
    sim.run_until(sim.now + rng.uniform(1.5, 3.0))
    second = sim.leader_now()
    returned_at = sim.now
    sim.start(first)
    outcome.failures += check_recovery(sim, healed_at=returned_at)
    takeover = [
        e for e in sim.leadership if e.gained and e.node == first and e.true_time > returned_at
    ]
    if not sim.timing.preempt:
        if second is not None and takeover:
            outcome.failures.append(f"n{first} took over from live n{second} with preempt off")
        return
    fastest = rate_bounds(sim.timing.max_drift)[1]
    if second is not None and takeover:
        waited = takeover[0].true_time - returned_at
        if waited < sim.timing.preempt_delay / fastest:
            outcome.failures.append(
                f"n{first} took over {waited:.3f}s after returning, "
                f"before preempt_delay={sim.timing.preempt_delay}"
            )


def chaos(sim: Simulation, rng: random.Random, outcome: Outcome) -> None:
    """Random faults of every kind for a few seconds, aimed at the leader half the time."""
    start_all(sim, rng, spread=rng.uniform(0.0, 1.0))
    heal_at = rng.uniform(3.0, 8.0)
    t = 0.0
    while True:
        t += rng.expovariate(3.0)
        if t >= heal_at:
            break
        sim.run_until(t)
        _random_fault(sim, rng, heal_at)
    sim.run_until(heal_at)
    sim.network.set_all(CLEAN)
    for node in sim.nodes.values():
        if not node.up and rng.random() < 0.5:
            sim.start(node.id)
    sim.log("network healed")
    outcome.failures += check_recovery(sim, healed_at=heal_at)


def lossy_acks(sim: Simulation, rng: random.Random, outcome: Outcome) -> None:
    """A settled cluster whose every link loses, duplicates, delays and reorders packets:
    the acks riding in heartbeats arrive late, twice, out of order or never, while the
    leader keeps renewing its lease from them. The invariants (checked at every call) say
    no lease outlives the majority's promises; then the network heals and it recovers."""
    start_all(sim, rng)
    sim.run_until(3.0)
    profile = LinkProfile(
        loss=rng.uniform(0.02, 0.4),
        duplicate=rng.uniform(0.0, 0.3),
        delay_min=0.0,
        delay_max=rng.uniform(0.005, 0.25),
        straggler=rng.uniform(0.0, 0.1),
        straggler_max=rng.uniform(0.0, 1.5),
    )
    sim.network.set_all(profile)
    sim.log(f"every link set to {profile}")
    heal_at = sim.now + rng.uniform(5.0, 15.0)
    sim.run_until(heal_at)
    sim.network.set_all(CLEAN)
    sim.log("network healed")
    outcome.failures += check_recovery(sim, healed_at=heal_at)


def degrade_links(sim: Simulation, rng: random.Random) -> None:
    """Give about half the links one random profile of loss, duplication and delay
    (partitions in place stay)."""
    profile = LinkProfile(
        loss=rng.uniform(0.0, 0.5),
        duplicate=rng.uniform(0.0, 0.3),
        delay_min=rng.uniform(0.0, 0.05),
        delay_max=rng.uniform(0.05, 0.3),
        straggler=rng.uniform(0.0, 0.1),
        straggler_max=rng.uniform(0.0, 3.0),
    )
    links = [k for k in sim.network.links if rng.random() < 0.5]
    for key in links:
        sim.network.links[key] = replace(profile, blocked=sim.network.links[key].blocked)
    sim.log(f"links {len(links)} set to {profile}")


def _random_fault(sim: Simulation, rng: random.Random, heal_at: float) -> None:
    ids = list(sim.nodes)
    leader = sim.leader_now()
    up = [i for i in ids if sim.nodes[i].up]
    down = [i for i in ids if not sim.nodes[i].up]

    def target(pool: list[int]) -> int | None:
        if leader is not None and leader in pool and rng.random() < 0.5:
            return leader
        return rng.choice(pool) if pool else None

    kind = rng.choices(
        ("links", "partition", "heal_links", "crash", "restart", "pause", "health", "shutdown"),
        weights=(3, 3, 2, 2, 3, 2, 2, 1),
    )[0]
    if kind == "links":
        degrade_links(sim, rng)
    elif kind == "partition":
        side_a = {i for i in ids if rng.random() < 0.5}
        if leader is not None and rng.random() < 0.5:
            side_a.add(leader)
        side_b = set(ids) - side_a
        one_way = rng.random() < 0.3
        sim.network.partition(side_a, side_b, one_way=one_way)
        sim.log(f"partition {sorted(side_a)} {'->' if one_way else '<->'} {sorted(side_b)}")
    elif kind == "heal_links":
        sim.network.unblock_all()
        sim.log("partitions removed")
    elif kind == "crash" and (victim := target(up)) is not None:
        sim.crash(victim)
    elif kind == "restart" and down:
        sim.start(rng.choice(down))
    elif kind == "pause" and (victim := target(up)) is not None:
        duration = min(rng.uniform(0.05, 3.0), max(heal_at - sim.now, 0.01))
        sim.pause(victim, duration)
    elif kind == "health":
        victim = target(ids)
        assert victim is not None
        sim.set_healthy(victim, not sim.nodes[victim].healthy)
    elif kind == "shutdown" and (victim := target(up)) is not None:
        sim.shutdown(victim)


def steady(sim: Simulation, rng: random.Random, outcome: Outcome, duration: float = 60.0) -> None:
    """5 % loss and 20 +/- 10 ms delay on every link; count leader changes after the first."""
    sim.network.set_all(LinkProfile(loss=0.05, delay_min=0.010, delay_max=0.030))
    start_all(sim, rng)
    sim.run_until(3.0)
    first = sim.leader_now()
    if first is None:
        outcome.failures.append("no leader 3 s after start with 5 % loss")
    sim.run_until(3.0 + duration)
    outcome.leader_changes = leader_changes(sim, since=3.0)
    if outcome.leader_changes:
        outcome.failures.append(f"{outcome.leader_changes} leader changes in steady state")


Runner = Callable[[Simulation, random.Random, Outcome], None]

_RUNNERS: dict[str, tuple[Runner, Callable[[random.Random], Timing]]] = {
    "cold_start": (cold_start, lambda rng: LAN),
    "failover": (failover, lambda rng: LAN),
    "chaos": (chaos, lambda rng: LAN if rng.random() < 0.3 else random_timing(rng)),
    "pause": (pause_leader, lambda rng: replace(LAN, preempt_delay=rng.uniform(0.0, 3.0))),
    "preempt": (preempt, lambda rng: replace(LAN, preempt_delay=rng.uniform(0.0, 3.0))),
    "no_preempt": (preempt, lambda rng: replace(LAN, preempt=False)),
    "steady": (steady, lambda rng: LAN),
    "lossy_acks": (lossy_acks, lambda rng: LAN if rng.random() < 0.5 else random_timing(rng)),
}


def run(
    seed: int,
    nodes: int,
    witness: bool,
    scenario: str,
    *,
    trace_messages: bool = False,
    timing: Timing | None = None,
    steady_duration: float | None = None,
) -> Outcome:
    """Run one scenario; invariant violations become failures (with the timeline kept)."""
    runner, pick_timing = _RUNNERS[scenario]
    rng = random.Random(seed)
    chosen = timing or pick_timing(rng)
    sim = build(rng, seed, nodes, witness, chosen, trace_messages=trace_messages)
    outcome = Outcome(seed, scenario, nodes, witness, sim)
    try:
        if scenario == "steady" and steady_duration is not None:
            steady(sim, rng, outcome, duration=steady_duration)
        else:
            runner(sim, rng, outcome)
    except InvariantViolation as violation:
        sim.log(f"INVARIANT VIOLATED: {violation}")
        outcome.failures.append(str(violation))
    return outcome


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    cuts = statistics.quantiles(ordered, n=100, method="inclusive")
    return {"min": ordered[0], "p50": cuts[49], "p99": cuts[98], "max": ordered[-1]}
