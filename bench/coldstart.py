"""Cold starts of a real local cluster with health checks: who leads first, and IP moves.

Each trial is a brand-new three-node cluster (node 3 a witness) with the emulator and an
HTTP health check on every node (as compose and Terraform deploy it), started
*synchronized*: every node is frozen the moment it binds its election port and all are
released together, the hardest case for "the lowest id wins". Per trial it records the
first node to gain leadership, how long that took from the release, when the IP reached
droplet 1001, and how many assignments the emulator saw (1 is the target: one move).
It also prints the time from exec to "node started" (start-up cost of a process).

    .venv/bin/python bench/coldstart.py --trials 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from sidecar.localcluster import LocalCluster


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--max-seconds", type=float, default=900.0)
    args = parser.parse_args(argv)
    started = time.monotonic()
    firsts: list[int] = []
    to_leader: list[float] = []
    to_ip: list[float] = []
    moves: list[int] = []
    boot: list[float] = []
    with tempfile.TemporaryDirectory(prefix="fip-coldstart-") as tmp:
        for trial in range(args.trials):
            if time.monotonic() - started > args.max_seconds:
                print(f"stopping after {trial} trials: --max-seconds reached", file=sys.stderr)
                break
            cluster = LocalCluster(Path(tmp) / f"trial{trial}", with_ip=True)
            try:
                spawned = time.monotonic()
                cluster.start(synchronized=True)
                released = time.monotonic()
                first = cluster.wait_for_leader(timeout=30.0, agreed=False)
                gained = min(
                    e["at_mono"] for n in cluster.nodes for e in cluster.events(n, "gained")
                )
                entry = cluster.wait_for_holder(cluster.members[1].droplet_id, timeout=60.0)
                firsts.append(first)
                to_leader.append(gained - released)
                to_ip.append(entry["completed_monotonic"] - released)
                moves.append(len(cluster.emulator_history()))
                starts = [e["mono"] for n in cluster.nodes for e in cluster.events(n, "started")]
                boot.append(max(starts) - spawned)
            finally:
                cluster.stop()
            print(
                f"trial {trial + 1}: node {firsts[-1]} led first after {to_leader[-1]:.3f}s, "
                f"IP on node 1 after {to_ip[-1]:.3f}s, {moves[-1]} assignment(s)",
                flush=True,
            )
    n = len(firsts)
    if not n:
        return 1
    print(f"\ncold starts with HTTP health checks, synchronized: {n} trials")
    print(f"  node 1 led first in {firsts.count(1)} of {n}")
    print(f"  IP moves per boot: {dict(sorted((m, moves.count(m)) for m in set(moves)))}")
    for name, values in (
        ("release -> first leader", to_leader),
        ("release -> IP on node 1", to_ip),
    ):
        print(
            f"  {name}: median {statistics.median(values):.3f}s, "
            f"p99 {_percentile(values, 0.99):.3f}s, max {max(values):.3f}s"
        )
    print(f"  exec -> all three 'node started': median {statistics.median(boot):.3f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
