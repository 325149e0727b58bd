"""The floor under a node's idle CPU: a process waking N times a second and doing nothing else.

Two probes, each a child process on a fixed grid of wake-ups: `thread`, a plain thread
sleeping in `epoll_wait` with the next grid instant as its timeout (how a node's election
loop waits, minus every packet and every call into the core), on a process that also runs
an idle Trio loop (as a node's does); and `trio`, one Trio task sleeping until each grid
instant (how the loop would wait as a Trio task). CPU comes from the scheduler's
nanosecond counts (/proc/PID/task/*/schedstat), over --seconds, for each rate; a node's
own wake-up cost is its idle CPU minus the `thread` figure, divided by its wake-ups.

    python bench/wakeup_floor.py                      # 10 and 20 wake-ups/s (lan, fast)
    python bench/wakeup_floor.py --rates 10 --seconds 60 --trials 5
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBES = {
    "thread": """
import select, sys, time, trio

def loop(rate):
    ready, due = select.epoll(), time.monotonic()
    while True:
        due += 1 / rate
        ready.poll(max(0.0, due - time.monotonic()))

async def main(rate):
    await trio.to_thread.run_sync(loop, rate)

trio.run(main, float(sys.argv[1]))
""",
    "trio": """
import sys, time, trio

async def main(rate):
    due = trio.current_time()
    while True:
        due += 1 / rate
        await trio.sleep_until(due)

trio.run(main, float(sys.argv[1]))
""",
}


def cpu_seconds(pid: int) -> float:
    tasks = Path(f"/proc/{pid}/task")
    return sum(int((t / "schedstat").read_text().split()[0]) for t in tasks.iterdir()) / 1e9


def measure(probe_name: str, rate: float, seconds: float) -> float:
    """% of one core used by one probe at `rate` wake-ups a second."""
    probe = subprocess.Popen([sys.executable, "-c", PROBES[probe_name], str(rate)], cwd=ROOT)
    try:
        time.sleep(2.0)  # past start-up and imports
        before, started = cpu_seconds(probe.pid), time.monotonic()
        time.sleep(seconds)
        used, elapsed = cpu_seconds(probe.pid) - before, time.monotonic() - started
    finally:
        probe.kill()
        probe.wait(timeout=10)
    return 100.0 * used / elapsed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="10,20", help="wake-ups a second, comma-separated")
    parser.add_argument("--seconds", type=float, default=30.0, help="window per trial")
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"wake-up floor on {sys.executable}: {args.trials} x {args.seconds:g} s per rate")
    for rate in (float(r) for r in args.rates.split(",") if r):
        for name in PROBES:  # interleaved trials, so the machine's load hits both alike
            figures = [measure(name, rate, args.seconds) for _ in range(args.trials)]
            per_wake = statistics.median(figures) / 100 / rate * 1e6
            print(
                f"  {name:<6} {rate:g} wake-ups/s: CPU median {statistics.median(figures):.3f} %"
                f" (min {min(figures):.3f}, max {max(figures):.3f}), {per_wake:.0f} us a wake-up"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
