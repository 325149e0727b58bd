"""The membership-change explorer: rolling out a change from membership O to N, one seed at a
time, under partitions, crashes, pauses, loss and delay.

The documented procedure (README: Changing membership) has two phases:

1. every node (old and new members, in any order, by live reload or by a restart) gets the
   *transition* config: every member of O and N listed, memberships (O, N);
2. once every node has it, every member of N gets the *final* config (membership N), in any
   order; members leaving (in O, not in N) are stopped at the end.

Each seed draws one change (add a member 3 -> 4, remove one 4 -> 3 with the removed one
alive or dead, grow 3 -> 5, shrink 5 -> 3, replace a member by a new id 3 -> {1,2,4}, a witness
among the members in some of them), a pace and an order for each phase (half the time the
next node is the current leader, so reloads and restarts hit a leader), whether each step
is a live reload or a restart with the new config, the gap between the phases (often none),
and faults at random times throughout: partitions (a third of them the split between an old
majority and a new one, as in the issue's {1,2} | {3,4,5}), one-way cuts, crashes and
restarts, pauses, loss, duplication and delay. The invariants of `cluster.py` are checked
after every call into any node (never two leases at once in true time; each lease rests on
a majority of each membership it was extended under); after the rollout the network heals
and the cluster must settle on one leader of N (`scenarios.check_recovery`).

`unsafe=True` is the negative control: no transition config, each node goes straight from O
to N in the same random order (old and new configs side by side). Nodes whose memberships
share none ignore each other, so an old majority and a new majority can both elect: the
explorer must find two leaders there, which shows that it can fail.
"""

from __future__ import annotations

import functools
import itertools
import random
from collections import Counter
from dataclasses import dataclass, field, replace

from sidecar.election import Member, Timing, majority

from .clock import draw_clock
from .cluster import InvariantViolation, NodeConfig, Simulation
from .network import CLEAN
from .scenarios import LAN, check_recovery, degrade_links, random_timing

#: The changes the issue asks for; each seed draws one.
CHANGES = ("add", "remove", "grow", "shrink", "replace")
#: How fast the rollout goes: a config tool that pushes everywhere at once, a person, a slow one.
PACES = {"burst": (0.0, 0.05), "steady": (0.05, 1.0), "slow": (0.5, 3.0)}
#: Faults per second, one per seed: a calm run lets a rare interleaving play out undisturbed.
FAULT_RATES = (0.3, 1.0, 3.0)


@dataclass(frozen=True, slots=True)
class Change:
    kind: str
    old: frozenset[int]
    new: frozenset[int]
    members: tuple[Member, ...]  # everyone in old or new
    #: Leaving members that are dead before the rollout starts (a failed droplet).
    dead: frozenset[int]

    @property
    def leaving(self) -> frozenset[int]:
        return self.old - self.new

    def config(self, *memberships: frozenset[int]) -> NodeConfig:
        listed = frozenset().union(*memberships)
        return NodeConfig.of((m for m in self.members if m.id in listed), *memberships)

    def describe(self) -> str:
        witness = [m.id for m in self.members if not m.eligible]
        return (
            f"{self.kind}: {sorted(self.old)} -> {sorted(self.new)}"
            + (f", witness n{witness[0]}" if witness else "")
            + (f", dead {sorted(self.dead)}" if self.dead else "")
        )


def draw_change(rng: random.Random) -> Change:
    kind = rng.choice(CHANGES)
    old: set[int]
    if kind == "add":
        old, new = {1, 2, 3}, {1, 2, 3, 4}
    elif kind == "remove":
        old = {1, 2, 3, 4}
        new = old - {rng.choice(sorted(old))}
    elif kind == "grow":
        old, new = {1, 2, 3}, {1, 2, 3, 4, 5}
    elif kind == "shrink":
        old = {1, 2, 3, 4, 5}
        new = old - set(rng.sample(sorted(old), 2))
    else:  # replace: one member's droplet gives way to a new one with a new id
        old = {1, 2, 3}
        new = (old - {rng.choice(sorted(old))}) | {4}
    everyone = sorted(old | new)
    witness = rng.choice(everyone) if rng.random() < 0.4 else None
    members = tuple(Member(i, eligible=i != witness) for i in everyone)
    dead = frozenset(i for i in old - new if rng.random() < 0.4)
    return Change(kind, frozenset(old), frozenset(new), members, dead)


@dataclass(slots=True)
class MembershipOutcome:
    seed: int
    unsafe: bool
    change: Change
    sim: Simulation
    pace: str = ""
    gap: float | None = None  # between phase 1's last step and phase 2's first
    #: Per phase, the order the nodes got their new config in.
    orders: list[tuple[int, ...]] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def two_leaders(self) -> bool:
        return any("TWO LEADERS" in f for f in self.failures)

    def reproduce(self) -> str:
        unsafe = " --unsafe" if self.unsafe else ""
        return f"python -m tests.sim --membership --seed {self.seed}{unsafe} -v"


class _Explorer:
    """One seed's rollout and faults, run on one `Simulation`."""

    def __init__(self, seed: int, unsafe: bool, *, trace_messages: bool = False) -> None:
        rng = self.rng = random.Random(seed)
        change = self.change = draw_change(rng)
        self.timing: Timing = (
            random_timing(rng)
            if rng.random() < 0.7
            else replace(LAN, preempt_delay=rng.uniform(0.0, 3.0))
        )
        extreme = rng.random() < 0.3
        clocks = {
            m.id: draw_clock(rng, self.timing.max_drift, extreme=extreme) for m in change.members
        }
        self.initial = change.config(change.old)
        self.transition = change.config(change.old, change.new)
        self.final = change.config(change.new)
        # New members are given their config by the rollout before they first start.
        self.sim = Simulation(
            list(change.members),
            self.timing,
            rng,
            clocks,
            configs=dict.fromkeys(change.old, self.initial),
            track_incarnations=True,
            trace_messages=trace_messages,
        )
        self.outcome = MembershipOutcome(seed, unsafe, change, self.sim, rng.choice(list(PACES)))
        self.fault_rate = rng.choice(FAULT_RATES)
        #: How many of the rollout's steps on a running node are live reloads (else restarts).
        self.reload_share = rng.choice((0.2, 0.6, 0.95))
        self.next_fault = 0.0
        self.unsafe = unsafe
        #: Nodes that must stay down: dead leaving members, and leaving members once stopped.
        self.gone: set[int] = set()
        self.started: set[int] = set()
        self.held = False  # a split partition is held through the rollout
        self.sim.log(
            f"seed={seed} {'UNSAFE (no transition) ' if unsafe else ''}{change.describe()} "
            f"timing={self.timing}"
        )
        for node in self.sim.nodes.values():
            self.sim.log(f"n{node.id} clock rate={node.clock.rate:.5f}")

    # ------------------------------------------------------------------ the run

    def run(self) -> MembershipOutcome:
        try:
            self._run()
        except InvariantViolation as violation:
            self.sim.log(f"INVARIANT VIOLATED: {violation}")
            self.outcome.failures.append(str(violation))
        return self.outcome

    def _run(self) -> None:
        sim, rng, change = self.sim, self.rng, self.change
        for node_id in sorted(change.old):
            self._start_at(rng.uniform(0.0, 0.3), node_id)
        for node_id in change.dead:
            sim.at(rng.uniform(0.0, 1.0), functools.partial(self._kill, node_id))
        self.next_fault = rng.expovariate(self.fault_rate)
        rollout_at = rng.uniform(1.0, 4.0)
        if rng.random() < 0.3:
            # The case: an old majority cut off from a new one all through the
            # rollout (random partitions leave it alone until the rollout is done).
            self._wait_until(rollout_at - rng.uniform(0.0, 1.0))
            self._partition(self._split(), "held split")
        self._wait_until(rollout_at)
        pace = self.outcome.pace
        if self.unsafe:
            self._phase(self.final, sorted(change.new))
        else:
            self._phase(self.transition, sorted(change.old | change.new))
            # "Once every node runs it": a paused node applies its reload on waking.
            while any(n.reload_pending is not None for n in sim.nodes.values()):
                self._wait_until(sim.now + 0.05)
            self.outcome.gap = 0.0 if rng.random() < 0.4 else self._pause_length(pace)
            self._wait_until(sim.now + self.outcome.gap)
            self._phase(self.final, sorted(change.new))
        for node_id in sorted(change.leaving - change.dead):
            self._wait_until(sim.now + self._pause_length(pace))
            self.gone.add(node_id)
            self._stop(node_id)
        self.held = False
        self._wait_until(sim.now + rng.uniform(0.0, 1.5))
        heal_at = sim.now
        sim.network.set_all(CLEAN)
        for node_id in sorted(change.new):
            if not sim.nodes[node_id].up and rng.random() < 0.7:
                sim.start(node_id)
        sim.log("rollout done, network healed")
        wrong = [n.id for n in sim.nodes.values() if n.id in change.new and n.config != self.final]
        if wrong:
            self.outcome.failures.append(f"nodes {wrong} never got the final config")
        self.outcome.failures += check_recovery(sim, healed_at=heal_at, members=change.new)

    def _wait_until(self, end: float) -> None:
        """Run the simulation to `end`, injecting faults at random times on the way."""
        while self.next_fault < end:
            self.sim.run_until(self.next_fault)
            self._fault()
            self.next_fault = self.sim.now + self.rng.expovariate(self.fault_rate)
        self.sim.run_until(end)

    def _pause_length(self, pace: str) -> float:
        low, high = PACES[pace]
        return self.rng.uniform(low, high)

    # ------------------------------------------------------------------ rollout

    def _phase(self, config: NodeConfig, nodes: list[int]) -> None:
        """Give each of `nodes` `config`, one at a time, the leader first half the time."""
        sim, rng = self.sim, self.rng
        todo = [i for i in nodes if i not in self.gone]
        rng.shuffle(todo)
        order: list[int] = []
        while todo:
            self._wait_until(sim.now + self._pause_length(self.outcome.pace))
            leader = sim.leader_now()
            node_id = leader if leader in todo and rng.random() < 0.5 else todo[0]
            todo.remove(node_id)
            order.append(node_id)
            self._apply(node_id, config)
        self.outcome.orders.append(tuple(order))

    def _apply(self, node_id: int, config: NodeConfig) -> None:
        sim, rng, counts = self.sim, self.rng, self.outcome.counts
        node = sim.nodes[node_id]
        if node_id not in self.started:
            sim.reconfigure(node_id, config)
            counts["joins"] += 1
            self.started.add(node_id)
            sim.start(node_id)
        elif not node.up:
            counts["configs while down"] += 1
            sim.reconfigure(node_id, config)
            if rng.random() < 0.5:
                counts["restarts with the new config"] += 1
                sim.start(node_id)
        elif rng.random() < self.reload_share:
            counts["reloads"] += 1
            if sim.leader_now() == node_id:
                counts["reloads while leading"] += 1
            sim.reconfigure(node_id, config)
        else:
            counts["restarts with the new config"] += 1
            if sim.leader_now() == node_id:
                counts["restarts while leading"] += 1
            self._stop(node_id)
            sim.reconfigure(node_id, config)
            self._start_at(sim.now + rng.uniform(0.03, 1.0), node_id)

    def _start_at(self, when: float, node_id: int) -> None:
        self.started.add(node_id)
        self.sim.at(when, functools.partial(self._start, node_id))

    def _start(self, node_id: int) -> None:
        if node_id not in self.gone:
            self.sim.start(node_id)

    def _kill(self, node_id: int) -> None:
        self.gone.add(node_id)
        self.sim.crash(node_id)

    def _stop(self, node_id: int) -> None:
        """SIGTERM (the process resigns and exits 20 ms later) most of the time, else SIGKILL."""
        if self.rng.random() < 0.7 and not self.sim.nodes[node_id].paused:
            self.sim.shutdown(node_id, exit_after=0.02)
        else:
            self.sim.crash(node_id)

    # ------------------------------------------------------------------ faults

    def _fault(self) -> None:
        sim, rng, counts = self.sim, self.rng, self.outcome.counts
        ids = sorted(sim.nodes)
        leader = sim.leader_now()
        up = [i for i in ids if sim.nodes[i].up]
        down = [i for i in ids if not sim.nodes[i].up and i in self.started and i not in self.gone]
        kind = rng.choices(
            ("links", "partition", "split", "heal", "crash", "restart", "pause"),
            weights=(3, 2, 2, 3, 2, 3, 1),
        )[0]
        if kind == "links":
            degrade_links(sim, rng)
            counts["link changes"] += 1
        elif kind in ("partition", "split", "heal") and self.held:
            pass  # a held split stays as it is until the rollout is done
        elif kind == "partition":
            side_a = {i for i in ids if rng.random() < 0.5}
            if leader is not None and rng.random() < 0.5:
                side_a.add(leader)
            self._partition(side_a, kind, one_way=rng.random() < 0.3)
        elif kind == "split":
            self._partition(self._split(), kind)
        elif kind == "heal":
            sim.network.unblock_all()
            sim.log("partitions removed")
        elif kind == "crash" and up:
            victim = leader if leader is not None and rng.random() < 0.5 else rng.choice(up)
            counts["crashes"] += 1
            counts["leader crashes"] += victim == leader
            sim.crash(victim)
        elif kind == "restart" and down:
            counts["restarts"] += 1
            sim.start(rng.choice(down))
        elif kind == "pause" and up:
            victim = leader if leader is not None and rng.random() < 0.5 else rng.choice(up)
            counts["pauses"] += 1
            sim.pause(victim, rng.uniform(0.05, 1.5))

    def _partition(self, side_a: set[int], kind: str, *, one_way: bool = False) -> None:
        """Replace any partition by one that cuts `side_a` off from everyone else."""
        counts = self.outcome.counts
        side_b = set(self.sim.nodes) - side_a
        self.sim.network.unblock_all()
        self.sim.network.partition(side_a, side_b, one_way=one_way)
        self.held = kind == "held split"
        counts["partitions"] += 1
        counts["old/new majority splits"] += kind != "partition"
        counts["splits held through the rollout"] += self.held
        counts["one-way cuts"] += one_way
        arrow = "->" if one_way else "<->"
        self.sim.log(f"partition ({kind}) {sorted(side_a)} {arrow} {sorted(side_b)}")

    def _split(self) -> set[int]:
        """An old majority on one side, and if possible a new majority on the other."""
        old, new = sorted(self.change.old), self.change.new
        sides = [set(a) for a in itertools.combinations(old, majority(self.change.old))]
        apart = [a for a in sides if len(new - a) >= majority(new)] or sides
        # Half the time the leader keeps its old majority (its lease goes on).
        leader = self.sim.leader_now()
        with_leader = [a for a in apart if leader in a]
        if with_leader and self.rng.random() < 0.5:
            apart = with_leader
        return set(self.rng.choice(apart))


def run_membership(
    seed: int, *, unsafe: bool = False, trace_messages: bool = False
) -> MembershipOutcome:
    """Explore one seed (see the module docstring); failures are in the outcome."""
    return _Explorer(seed, unsafe, trace_messages=trace_messages).run()


@dataclass(slots=True)
class Coverage:
    """What a sweep of seeds explored, and what it found."""

    seeds: int = 0
    failed: int = 0
    two_leaders: int = 0
    changes: Counter[str] = field(default_factory=Counter)
    paces: Counter[str] = field(default_factory=Counter)
    orders: set[tuple[str, tuple[tuple[int, ...], ...]]] = field(default_factory=set)
    no_gap: int = 0
    witnesses: int = 0
    dead_leaving: int = 0
    counts: Counter[str] = field(default_factory=Counter)

    def add(self, outcome: MembershipOutcome) -> None:
        change = outcome.change
        self.seeds += 1
        self.failed += not outcome.ok
        self.two_leaders += outcome.two_leaders
        self.changes[change.kind] += 1
        self.paces[outcome.pace] += 1
        self.orders.add((change.describe(), tuple(outcome.orders)))
        self.no_gap += outcome.gap == 0.0
        self.witnesses += any(not m.eligible for m in change.members)
        self.dead_leaving += bool(change.dead)
        self.counts += outcome.counts

    def merge(self, other: Coverage) -> None:
        self.seeds += other.seeds
        self.failed += other.failed
        self.two_leaders += other.two_leaders
        self.changes += other.changes
        self.paces += other.paces
        self.orders |= other.orders
        self.no_gap += other.no_gap
        self.witnesses += other.witnesses
        self.dead_leaving += other.dead_leaving
        self.counts += other.counts

    def lines(self) -> list[str]:
        counts = ", ".join(f"{v} {k}" for k, v in sorted(self.counts.items()))
        return [
            f"rollouts: {self.seeds} ("
            + ", ".join(f"{k} {v}" for k, v in sorted(self.changes.items()))
            + f"; {self.witnesses} with a witness, {self.dead_leaving} with a dead leaving member)",
            f"distinct rollout orders: {len(self.orders)}; paces "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.paces.items()))
            + f"; phase 2 right after phase 1: {self.no_gap}",
            f"faults and steps: {counts}",
            f"results: {self.seeds - self.failed} ok, {self.failed} failed "
            f"({self.two_leaders} with two leaders)",
        ]


def explore(seeds: range, unsafe: bool = False) -> tuple[Coverage, list[str]]:
    """Run `seeds`; what they covered, and one line (with the command to replay it) per
    failed seed. Picklable both ways, for a worker pool."""
    coverage = Coverage()
    failures = []
    for seed in seeds:
        outcome = run_membership(seed, unsafe=unsafe)
        coverage.add(outcome)
        if not outcome.ok:
            failures.append(f"{outcome.failures[0]}\n    reproduce: {outcome.reproduce()}")
    return coverage, failures
