"""What a node costs to keep running and to start: RSS, PSS, start-up time, imports.

A real three-node loopback cluster (node 3 a witness), `lan` profile, everything enabled
on every node: the status server, an HTTP health check of a demo web service, and the
assigner against the DigitalOcean API emulator. Once node 1 holds the IP and the cluster
has idled for `--settle` seconds, it prints per node RSS and PSS (from
/proc/PID/smaps_rollup, the median of `--samples` readings a second apart) and the peak
RSS (VmHWM). PSS shares the interpreter's and libraries' pages among the processes that
map them, so it is what one more node on the same machine costs; RSS is what one node on
its own droplet costs.

Start-up: `--trials` times, the witness is stopped (SIGTERM) and started again; the time
from just before exec to its "node started" log line (its election socket is bound and it
speaks), and to its status port answering, are printed as median and p99 (CLOCK_MONOTONIC,
shared by every process here).

Imports: `python -X importtime -c "import sidecar.cli"` (`--import-trials` runs, medians)
gives each main module's cumulative import time, and one more process imports them in
order and prints the RSS each one adds.

The nodes run on this interpreter unless `--node-python` names another, or
`--production-venv` builds one (`pip install .` into a temporary venv: the runtime
dependencies only, as the production image has them). Figures are printed, nothing is
asserted.

    .venv/bin/python bench/footprint.py --trials 20
    .venv/bin/python bench/footprint.py --production-venv --trials 20
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

from sidecar.localcluster import LocalCluster

ROOT = Path(__file__).resolve().parent.parent
WITNESS = 3
#: Imported in this order by the RSS probe: each one's figure excludes what came before.
MAIN_MODULES = (
    "trio",
    "msgspec",
    "httpx",
    "h11",
    "sidecar.protocol",
    "sidecar.election",
    "sidecar.config",
    "sidecar.node",
    "sidecar.health",
    "sidecar.assigner",
    "sidecar.exposition",
    "sidecar.metrics",
    "sidecar.status",
    "sidecar.service",
    "sidecar.cli",
)
_IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)\s*$")
_RSS_PROBE = """
import importlib, sys
def kib(key):
    for line in open('/proc/self/smaps_rollup'):
        if line.startswith(key + ':'):
            return int(line.split()[1])
print('python', kib('Rss'), flush=True)
for name in sys.argv[1:]:
    importlib.import_module(name)
    print(name, kib('Rss'), flush=True)
"""


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f}"


def p99(values: Sequence[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def smaps_kib(pid: int) -> dict[str, int]:
    """Rss and Pss (KiB) from smaps_rollup, and VmHWM (peak RSS) from status."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            found[key] = int(rest.split()[0])
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            found["VmHWM"] = int(line.split()[1])
    return found


@contextlib.contextmanager
def production_venv(source: Path) -> Iterator[str]:
    """A temporary venv with `pip install SOURCE` (no extras); yields its python."""
    with tempfile.TemporaryDirectory(prefix="fip-footprint-venv-") as tmp:
        venv = Path(tmp) / "venv"
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        subprocess.run(
            [
                str(venv / "bin" / "pip"),
                "install",
                "-q",
                "--disable-pip-version-check",
                str(source),
            ],
            check=True,
            timeout=900,
        )
        print(f"production venv built in {time.monotonic() - started:.0f} s: {venv}", flush=True)
        yield str(venv / "bin" / "python")


def measure_memory(cluster: LocalCluster, samples: int) -> None:
    readings: dict[int, list[dict[str, int]]] = {n: [] for n in cluster.nodes}
    for sample in range(samples):
        for node in cluster.nodes:
            pid = cluster.members[node].pid
            assert pid is not None
            readings[node].append(smaps_kib(pid))
        if sample + 1 < samples:
            time.sleep(1.0)
    statuses = cluster.statuses(timeout=2.0)
    print(f"\nmemory per node (median of {samples} readings, MiB):")
    print("  node  role        RSS    PSS   peak RSS")
    totals: dict[str, list[float]] = {"Rss": [], "Pss": []}
    for node in cluster.nodes:
        status = statuses.get(node) or {}
        role = "witness" if node == WITNESS else str(status.get("role", "?"))
        rss = statistics.median(r["Rss"] for r in readings[node])
        pss = statistics.median(r["Pss"] for r in readings[node])
        peak = max(r["VmHWM"] for r in readings[node])
        totals["Rss"].append(rss)
        totals["Pss"].append(pss)
        print(f"  {node:>4}  {role:<10} {mib(rss):>5}  {mib(pss):>5}  {mib(peak):>8}")
    mean_rss, mean_pss = (statistics.mean(totals[k]) for k in ("Rss", "Pss"))
    print(f"  mean             {mib(mean_rss):>5}  {mib(mean_pss):>5}")


def wait_status(url: str, deadline: float) -> float | None:
    """The monotonic time `url`/healthz first answered, polling every 5 ms; None on timeout."""
    with httpx.Client(trust_env=False, timeout=0.5) as client:
        while time.monotonic() < deadline:
            try:
                if client.get(f"{url}/healthz").status_code == 200:
                    return time.monotonic()
            except httpx.HTTPError:
                pass
            time.sleep(0.005)
    return None


def measure_startup(cluster: LocalCluster, trials: int) -> None:
    member = cluster.members[WITNESS]
    to_started: list[float] = []
    to_status: list[float] = []
    for _ in range(trials):
        cluster.kill(WITNESS, signal.SIGTERM)
        cluster.wait_exit(WITNESS)
        seen = len(cluster.events(WITNESS, "started"))
        spawned = time.monotonic()
        cluster.start_node(WITNESS, wait=False)
        answered = wait_status(member.status_url, spawned + 30.0)
        started = None
        deadline = time.monotonic() + 30.0
        while started is None and time.monotonic() < deadline:
            events = cluster.events(WITNESS, "started")[seen:]
            started = events[0]["mono"] if events else None
            time.sleep(0.01)
        if started is None or answered is None:
            print("  a trial timed out; see", member.log_path, file=sys.stderr)
            continue
        to_started.append(float(started) - spawned)
        to_status.append(answered - spawned)
    if not to_started:
        return
    print(f"\nstart-up of node {WITNESS} ({len(to_started)} trials, seconds):")
    for name, values in (
        ('exec -> "node started"', to_started),
        ("exec -> /healthz answers", to_status),
    ):
        print(
            f"  {name:<26} median {statistics.median(values):.3f}  p99 {p99(values):.3f}  "
            f"min {min(values):.3f}"
        )


def measure_imports(python: str, trials: int) -> None:
    cumulative: dict[str, list[int]] = {m: [] for m in MAIN_MODULES}
    for _ in range(trials):
        result = subprocess.run(
            [python, "-X", "importtime", "-c", "import sidecar.cli"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tempfile.gettempdir(),
            check=True,
        )
        for line in result.stderr.splitlines():
            match = _IMPORT_LINE.match(line)
            if match and match.group(4) in cumulative:
                cumulative[match.group(4)].append(int(match.group(2)))
    probe = subprocess.run(
        [python, "-c", _RSS_PROBE, *MAIN_MODULES],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tempfile.gettempdir(),
        check=True,
    )
    rss = [(name, int(kib)) for name, kib in (line.split() for line in probe.stdout.splitlines())]
    added = {name: kib - before for (_, before), (name, kib) in itertools.pairwise(rss)}
    print(f"\nimports (python -X importtime -c 'import sidecar.cli', median of {trials} runs):")
    print("  cumulative ms: where `import sidecar.cli` first imports the module, with what it")
    print("  imports first; RSS added: importing the modules in this order, one process.")
    print(f"  bare interpreter RSS {mib(rss[0][1])} MiB")
    print("  module                      cumulative ms   RSS added MiB")
    for name in MAIN_MODULES:
        times = cumulative[name]
        # A module another one already imported has no line of its own here.
        ms = f"{statistics.median(times) / 1000:.1f}" if times else "(earlier)"
        print(f"  {name:<27} {ms:>13}   {added[name] / 1024:>13.2f}")
    print(f"  total RSS after all imports {mib(rss[-1][1])} MiB")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="start-up trials")
    parser.add_argument("--import-trials", type=int, default=5)
    parser.add_argument("--samples", type=int, default=5, help="memory readings per node")
    parser.add_argument("--settle", type=float, default=10.0, help="idle seconds before")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--node-python", help="run the nodes on this interpreter")
    choice.add_argument(
        "--production-venv",
        action="store_true",
        help="build a temporary `pip install .` venv and run the nodes on it",
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=ROOT,
        help="the project --production-venv installs (default: this checkout; another "
        "checkout measures its code, e.g. main's for a before/after)",
    )
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        python = args.node_python
        if args.production_venv:
            python = stack.enter_context(production_venv(args.source))
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fip-footprint-")))
        node_python = python or sys.executable
        print(f"nodes run on {node_python}", flush=True)
        cluster = LocalCluster(workdir.resolve(), with_ip=True, profile="lan", node_python=python)
        stack.callback(cluster.stop)
        cluster.start()
        leader = cluster.wait_for_leader(timeout=30.0, expect=1)
        cluster.wait_for_holder(cluster.members[leader].droplet_id, timeout=60.0)
        print(f"node {leader} leads and holds the IP; idling {args.settle:g} s", flush=True)
        time.sleep(args.settle)
        measure_memory(cluster, args.samples)
        measure_startup(cluster, args.trials)
        measure_imports(node_python, args.import_trials)
    return 0


if __name__ == "__main__":
    sys.exit(main())
