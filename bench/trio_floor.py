"""The floor under a node's idle CPU: Trio waking N times a second and doing nothing else.

Each probe is a child process running one Trio task that waits on an epoll set holding a
timerfd (`sidecar/timerfd.py`), re-armed for the next instant of a fixed grid: exactly how
an idle node's receive loop waits, minus every packet and every call into the core. Its CPU
comes from the scheduler's nanosecond counts (/proc/PID/schedstat), over --seconds, for each
rate; a node's own wake-up cost is its idle CPU minus this, divided by its wake-ups.

    python bench/trio_floor.py                      # 10 and 20 wake-ups/s (lan, fast)
    python bench/trio_floor.py --rates 10 --seconds 60 --trials 5
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

PROBE = """
import select, sys, time, trio
from sidecar.timerfd import Deadline

async def main(rate):
    timer, ready = Deadline(), select.epoll()
    ready.register(timer, select.EPOLLIN)
    due = time.monotonic()
    while True:
        due += 1 / rate
        timer.set(due)
        await trio.lowlevel.wait_readable(ready)

trio.run(main, float(sys.argv[1]))
"""


def cpu_seconds(pid: int) -> float:
    tasks = Path(f"/proc/{pid}/task")
    return sum(int((t / "schedstat").read_text().split()[0]) for t in tasks.iterdir()) / 1e9


def measure(rate: float, seconds: float) -> float:
    """% of one core used by one probe at `rate` wake-ups a second."""
    probe = subprocess.Popen([sys.executable, "-c", PROBE, str(rate)], cwd=ROOT)
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
    print(f"Trio floor on {sys.executable}: {args.trials} x {args.seconds:g} s per rate")
    for rate in (float(r) for r in args.rates.split(",") if r):
        figures = [measure(rate, args.seconds) for _ in range(args.trials)]
        per_wake = statistics.median(figures) / 100 / rate * 1e6
        print(
            f"  {rate:g} wake-ups/s: CPU median {statistics.median(figures):.3f} %"
            f" (min {min(figures):.3f}, max {max(figures):.3f}), {per_wake:.0f} us a wake-up"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
