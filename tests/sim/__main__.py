"""Command line for the simulator: replay one seed with its timeline, sweep seeds, or
measure failover and steady-state figures.

    python -m tests.sim --seed 1234 --nodes 5 --witness --scenario chaos -v
    python -m tests.sim --sweep 500 --scenario chaos
    python -m tests.sim --stats
    python -m tests.sim --membership --sweep 2000      (membership changes, coverage)
    python -m tests.sim --membership --seed 7 -v [--unsafe]
"""

from __future__ import annotations

import argparse
import sys
import time

from .membership import explore, run_membership
from .scenarios import SCENARIOS, percentiles, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--witness", action="store_true", help="make one member a witness")
    parser.add_argument("--scenario", choices=SCENARIOS, default="chaos")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="print the timeline (-vv: every message too)",
    )
    parser.add_argument("--sweep", type=int, metavar="N", help="run seeds seed..seed+N-1")
    parser.add_argument("--stats", action="store_true", help="failover and steady-state figures")
    parser.add_argument("--stats-seeds", type=int, default=1000)
    parser.add_argument("--steady-minutes", type=float, default=10.0)
    parser.add_argument(
        "--membership",
        action="store_true",
        help="explore rolling membership changes (tests/sim/membership.py); "
        "--nodes, --witness and --scenario do not apply",
    )
    parser.add_argument(
        "--unsafe",
        action="store_true",
        help="with --membership: skip the transition config (the documented unsafe case)",
    )
    args = parser.parse_args(argv)
    if args.stats:
        return stats(args.stats_seeds, args.steady_minutes)
    if args.membership:
        return membership(args)
    if args.sweep:
        return sweep(args)
    outcome = run(
        args.seed, args.nodes, args.witness, args.scenario, trace_messages=args.verbose > 1
    )
    if args.verbose or not outcome.ok:
        print("\n".join(outcome.sim.timeline))
    if outcome.failover is not None:
        print(f"failover: {outcome.failover * 1000:.1f} ms")
    for failure in outcome.failures:
        print(f"FAIL: {failure}")
    print("ok" if outcome.ok else f"reproduce: {outcome.reproduce()}")
    return 0 if outcome.ok else 1


def sweep(args: argparse.Namespace) -> int:
    failed = 0
    started = time.perf_counter()
    for seed in range(args.seed, args.seed + args.sweep):
        outcome = run(seed, args.nodes, args.witness, args.scenario)
        if not outcome.ok:
            failed += 1
            print(f"{outcome.failures[0]}\n  reproduce: {outcome.reproduce()}")
    elapsed = time.perf_counter() - started
    print(f"{args.sweep - failed}/{args.sweep} seeds ok in {elapsed:.1f}s")
    return 1 if failed else 0


def membership(args: argparse.Namespace) -> int:
    if not args.sweep:
        outcome = run_membership(args.seed, unsafe=args.unsafe, trace_messages=args.verbose > 1)
        if args.verbose or not outcome.ok:
            print("\n".join(outcome.sim.timeline))
        for failure in outcome.failures:
            print(f"FAIL: {failure}")
        print("ok" if outcome.ok else f"reproduce: {outcome.reproduce()}")
        return 0 if outcome.ok else 1
    started = time.perf_counter()
    coverage, failures = explore(range(args.seed, args.seed + args.sweep), unsafe=args.unsafe)
    print("\n".join([*failures, *coverage.lines()]))
    print(f"{args.sweep} seeds in {time.perf_counter() - started:.1f}s")
    return 1 if coverage.failed else 0


def stats(seeds: int, steady_minutes: float) -> int:
    """Failover after a leader crash (lan timing), and leader changes under 5 % loss."""
    for nodes, witness in ((3, False), (3, True), (5, False), (5, True), (7, False)):
        times = []
        for seed in range(seeds):
            outcome = run(seed, nodes, witness, "failover")
            if outcome.failover is not None:
                times.append(outcome.failover)
        label = f"{nodes} nodes{' + witness' if witness else ''}"
        figures = percentiles(times)
        print(
            f"failover {label:17} n={len(times):5}  "
            + "  ".join(f"{k}={v * 1000:6.1f}ms" for k, v in figures.items())
        )
    for nodes in (3, 5):
        outcome = run(0, nodes, False, "steady", steady_duration=steady_minutes * 60)
        print(
            f"steady   {nodes} nodes, 5 % loss, 20+/-10 ms, {steady_minutes:g} min: "
            f"{outcome.leader_changes} leader changes"
            + ("" if outcome.ok else f"  FAIL: {outcome.failures}")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
