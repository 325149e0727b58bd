"""fip-sidecar beside keepalived (VRRP), measured in the same namespace topology, one run.

Both systems move the same emulated DigitalOcean reserved IP: the sidecar through its own
assigner, keepalived through its `notify_fifo_script` that calls the emulator's
`/v2/reserved_ips/{ip}/actions` the way the usual DigitalOcean+keepalived recipes do. Hosts
n1 and n2 are eligible (n1 preferred), n3 is the sidecar's witness (keepalived has none),
`api` runs the emulator; all on 198.18.0.0/24 inside namespaces made for this run.

Measured for each system:
- failover after SIGKILL of the leader/MASTER process, and after its host's link goes down:
  fault -> the other node's leadership (keepalived: its fifo reader's CLOCK_MONOTONIC
  stamp; sidecar: `gained.at_mono` from its log), and fault -> the IP moved (emulator's
  `completed_monotonic`, which includes the emulator's action time, the same for both);
- idle CPU (% of one core; the leader/MASTER and the followers/BACKUP apart), RSS and PSS
  per node, from /proc over `--idle-windows` windows of `--idle-seconds` each;
- false failovers (leadership changes and IP moves) while every node's link has 5 % loss
  and 20 +- 10 ms jitter for `--steady-seconds`.

keepalived profiles: `default` (Debian's defaults: VRRPv2, advert_int 1 s => ~3.6 s
master-down), `matched` (VRRPv3, advert_int 0.1 s, the sidecar's heartbeat), `fastest`
(VRRPv3, advert_int 0.01 s, the smallest keepalived accepts). Unicast adverts
(`unicast_peer`), so nothing depends on multicast over the bridge.

Run as root from the repository root:
    .venv/bin/python bench/compare.py --trials 10 --steady-seconds 60      # quick (~15 min)
    .venv/bin/python bench/compare.py                                      # full (600 s soak)
    .venv/bin/python bench/compare.py --node-python /tmp/prodvenv/bin/python   # nodes from a
        # production venv (`python3 -m venv /tmp/prodvenv && /tmp/prodvenv/bin/pip install .`)
"""

from __future__ import annotations

import abc
import argparse
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from chaos import netns
from chaos.checker import read_events
from chaos.cluster import (
    API_HOST_INDEX,
    RESERVED_IP,
    EmulatorHost,
    SidecarCluster,
    wait_until,
)

SETTLE_TIMEOUT = 60.0
TAKEOVER_TIMEOUT = 30.0
STABLE_SECONDS = 2.0
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class KeepalivedProfile:
    name: str
    vrrp_version: int
    advert_int: float


KEEPALIVED_PROFILES = {
    "default": KeepalivedProfile("default", 2, 1.0),
    "matched": KeepalivedProfile("matched", 3, 0.1),
    "fastest": KeepalivedProfile("fastest", 3, 0.01),
}

#: keepalived's `notify_fifo_script`: keepalived starts it and writes every transition, in
#: order, to the fifo. (Per-transition `notify_master`/`notify_backup` scripts run as separate
#: processes and race each other when transitions are milliseconds apart, so their order and
#: stamps cannot be trusted at advert_int 0.1 s.) MASTER moves the reserved IP the way the
#: usual DigitalOcean keepalived recipes do: one assign call, retried while the API says 422.
FIFO_SCRIPT = """#!/usr/bin/python3
import json, sys, threading, time, urllib.error, urllib.request
STATE_LOG, API, DROPLET, TOKEN_FILE, IP = {settings!r}

def assign():
    token = open(TOKEN_FILE).read().strip()
    body = json.dumps({{"type": "assign", "droplet_id": DROPLET}}).encode()
    for attempt in range(20):
        request = urllib.request.Request(
            API + "/v2/reserved_ips/" + IP + "/actions", data=body,
            headers={{"Authorization": "Bearer " + token, "Content-Type": "application/json"}},
        )
        try:
            urllib.request.urlopen(request, timeout=5).read()
            return
        except urllib.error.HTTPError as error:
            if error.code != 422:
                return
        except OSError:
            pass
        time.sleep(0.25)

with open(sys.argv[-1]) as fifo:
    for line in fifo:
        stamp = time.monotonic()
        parts = line.split()
        if len(parts) < 3 or parts[0] != "INSTANCE":
            continue
        state = parts[2]
        with open(STATE_LOG, "a") as log:
            log.write(state + " " + repr(stamp) + "\\n")
        if state == "MASTER":
            threading.Thread(target=assign).start()
"""


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


# ---------------------------------------------------------------------- /proc sampling
def _cpu_seconds(pid: int) -> float:
    """Time on a CPU, every thread of `pid`, from the scheduler's own nanosecond count
    (/proc/.../schedstat): utime + stime in /proc/PID/stat move in 10 ms ticks, which is
    a 0.05 % step over a 20 s window, the size of the differences measured here."""
    tasks = Path(f"/proc/{pid}/task")
    return sum(int((task / "schedstat").read_text().split()[0]) for task in tasks.iterdir()) / 1e9


def _rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE


def _pss_bytes(pid: int) -> int:
    """Proportional set size: shared pages (libpython, trio's modules) split among the
    processes mapping them, so the sum over nodes on one host is what they really cost."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass(frozen=True)
class Usage:
    """One node over one idle window: CPU % of one core, RSS and PSS in MiB at the end."""

    cpu: float
    rss: float
    pss: float


def idle_usage(pids_of: dict[int, list[int]], seconds: float) -> dict[int, Usage]:
    """node -> its `Usage` over `seconds`, summed over all its processes."""
    before = {node: sum(_cpu_seconds(p) for p in pids) for node, pids in pids_of.items()}
    started = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    usage = {}
    for node, pids in pids_of.items():
        used = sum(_cpu_seconds(p) for p in pids) - before[node]
        usage[node] = Usage(
            cpu=100.0 * used / elapsed,
            rss=sum(_rss_bytes(p) for p in pids) / 2**20,
            pss=sum(_pss_bytes(p) for p in pids) / 2**20,
        )
    return usage


# ---------------------------------------------------------------------- systems
class System(abc.ABC):
    """What the measurements need from either system."""

    name: str
    lab: netns.Lab
    api: EmulatorHost
    eligible: tuple[int, ...] = (1, 2)

    @abc.abstractmethod
    def start(self) -> None:
        """Start everything (emulator included)."""

    @abc.abstractmethod
    def leader(self) -> int | None:
        """The one node that says it leads now, else None."""

    @abc.abstractmethod
    def takeovers(self, since: float) -> list[tuple[float, int]]:
        """(monotonic time, node) of every leadership gained since `since`, in order."""

    @abc.abstractmethod
    def kill_leader_process(self, node: int) -> float:
        """SIGKILL the node's daemon; the monotonic time of the kill."""

    @abc.abstractmethod
    def restart(self, node: int) -> None: ...

    @abc.abstractmethod
    def pids(self) -> dict[int, list[int]]:
        """node -> every PID of its daemon (keepalived has a parent and a VRRP child)."""

    @abc.abstractmethod
    def settled(self) -> int | None:
        """The leader, when the system is at rest with the IP on it; else None."""

    def host(self, node: int) -> netns.Host:
        return self.lab.hosts[f"n{node}"]


class KeepalivedPair(System):
    def __init__(self, lab: netns.Lab, profile: KeepalivedProfile) -> None:
        self.name = f"keepalived-{profile.name}"
        self.lab = lab
        self.profile = profile
        for node in self.eligible:
            lab.add_host(f"n{node}", node)
        self.api = EmulatorHost(lab, lab.add_host("api", API_HOST_INDEX))
        self.processes: dict[int, netns.Process] = {}

    def state_log(self, node: int) -> Path:
        return self.lab.workdir / f"keepalived{node}.states"

    def vrrp_pid_file(self, node: int) -> Path:
        return self.lab.workdir / f"keepalived{node}.vrrp.pid"

    def script(self, node: int) -> Path:
        return self.lab.workdir / f"keepalived{node}-notify.py"

    def config_text(self, node: int) -> str:
        me, peer = self.host(node), self.host(3 - node)
        settings = (
            str(self.state_log(node)), self.api.url, 1000 + node, str(self.api.token_path),
            RESERVED_IP,
        )  # fmt: skip
        self.script(node).write_text(FIFO_SCRIPT.format(settings=settings))
        self.script(node).chmod(0o700)
        return f"""global_defs {{
    router_id n{node}
    script_user root
    notify_fifo {self.lab.workdir / f"keepalived{node}.fifo"}
    notify_fifo_script {self.script(node)}
    vrrp_version {self.profile.vrrp_version}
    vrrp_garp_master_delay 0
}}
vrrp_instance fip {{
    state BACKUP
    interface eth0
    virtual_router_id 51
    priority {150 if node == 1 else 100}
    advert_int {self.profile.advert_int}
    unicast_src_ip {me.address}
    unicast_peer {{
        {peer.address}
    }}
    virtual_ipaddress {{
        198.18.0.200/32 dev eth0
    }}
}}
"""

    def start(self) -> None:
        self.api.start({1001: "nyc3", 1002: "nyc3"})
        for node in self.eligible:
            self._spawn(node)

    def _spawn(self, node: int) -> None:
        conf = self.lab.workdir / f"keepalived{node}.conf"
        conf.write_text(self.config_text(node))
        argv = [
            "keepalived", "--dont-fork", "--log-console", "--no-syslog", "--vrrp",
            "--use-file", str(conf),
            "--pid", str(self.lab.workdir / f"keepalived{node}.pid"),
            "--vrrp_pid", str(self.vrrp_pid_file(node)),
        ]  # fmt: skip
        self.vrrp_pid_file(node).unlink(missing_ok=True)
        if node in self.processes:
            self.lab.restart(self.processes[node])
        else:
            self.processes[node] = self.lab.spawn(self.host(node), f"keepalived{node}", argv)

    def _vrrp_pid(self, node: int) -> int | None:
        text = wait_until(lambda: self._read(self.vrrp_pid_file(node)), 10.0)
        return int(text) if text else None

    @staticmethod
    def _read(path: Path) -> str | None:
        try:
            return path.read_text().strip() or None
        except FileNotFoundError:
            return None

    def _states(self, node: int) -> list[tuple[float, str]]:
        text = self._read(self.state_log(node)) or ""
        rows = []
        for line in text.splitlines():
            state, stamp = line.split()
            rows.append((float(stamp), state))
        return rows

    def leader(self) -> int | None:
        masters = [
            node
            for node in self.eligible
            if self.processes[node].running()
            and self._states(node)
            and self._states(node)[-1][1] == "MASTER"
        ]
        return masters[0] if len(masters) == 1 else None

    def takeovers(self, since: float) -> list[tuple[float, int]]:
        return sorted(
            (stamp, node)
            for node in self.eligible
            for stamp, state in self._states(node)
            if state == "MASTER" and stamp >= since
        )

    def kill_leader_process(self, node: int) -> float:
        """SIGKILL the VRRP child, then its parent (so nothing respawns it or resigns)."""
        vrrp = self._vrrp_pid(node)
        at = time.monotonic()
        if vrrp is not None:
            os.kill(vrrp, signal.SIGKILL)
        self.lab.kill(self.processes[node])
        return at

    def restart(self, node: int) -> None:
        self._spawn(node)

    def pids(self) -> dict[int, list[int]]:
        found = {}
        for node in self.eligible:
            vrrp = self._vrrp_pid(node)
            found[node] = [self.processes[node].pid] + ([vrrp] if vrrp else [])
        return found

    def settled(self) -> int | None:
        """n1 MASTER (keepalived preempts back to the higher priority), n2 BACKUP, IP on 1001.

        Waiting for the preferred master keeps a pending preemption out of the next trial.
        """
        states = {n: self._states(n) for n in self.eligible}
        if not all(self.processes[n].running() and states[n] for n in self.eligible):
            return None
        if states[1][-1][1] != "MASTER" or states[2][-1][1] != "BACKUP":
            return None
        return 1 if self.api.ip_holder() == 1001 else None


class SidecarSystem(System):
    def __init__(self, lab: netns.Lab, profile: str = "lan", python: str | None = None) -> None:
        self.name = "fip-sidecar" if profile == "lan" else f"fip-sidecar-{profile}"
        self.lab = lab
        self.cluster = SidecarCluster(lab, profile=profile, python=python)
        self.api = self.cluster.api

    def start(self) -> None:
        self.cluster.start()

    def leader(self) -> int | None:
        leaders = self.cluster.leaders()
        return next(iter(leaders)) if len(leaders) == 1 else None

    def takeovers(self, since: float) -> list[tuple[float, int]]:
        found = []
        for node, proc in self.cluster.processes.items():
            for event in read_events(proc.log_path):
                if event.get("event") == "gained" and event["at_mono"] >= since:
                    found.append((float(event["at_mono"]), node))
        return sorted(found)

    def kill_leader_process(self, node: int) -> float:
        return self.cluster.kill(node)

    def restart(self, node: int) -> None:
        self.cluster.restart(node)

    def pids(self) -> dict[int, list[int]]:
        return {node: [proc.pid] for node, proc in self.cluster.processes.items()}

    def settled(self) -> int | None:
        leader = self.leader()
        if leader is None or self.api.ip_holder() != 1000 + leader:
            return None
        everyone_follows = all(
            (status := self.cluster.status(node)) is not None and status.get("leader_id") == leader
            for node in self.cluster.specs
        )
        return leader if everyone_follows else None


# ---------------------------------------------------------------------- measurements
@dataclass
class Results:
    kill_leader: list[float] = field(default_factory=list)
    kill_ip: list[float] = field(default_factory=list)
    link_leader: list[float] = field(default_factory=list)
    link_ip: list[float] = field(default_factory=list)
    cpu_leader: list[float] = field(default_factory=list)
    cpu_follower: list[float] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)
    pss: list[float] = field(default_factory=list)
    false_leader_changes: int | None = None
    false_ip_moves: int | None = None
    steady_seconds: float = 0.0
    failed_trials: int = 0
    failure: str | None = None


def wait_settled(system: System) -> int:
    """Wait until one leader holds the IP, stably for STABLE_SECONDS; return it."""

    def stable() -> int | None:
        first = system.settled()
        if first is None:
            return None
        time.sleep(STABLE_SECONDS)
        return first if system.settled() == first else None

    leader = wait_until(stable, SETTLE_TIMEOUT, interval=0.2)
    if leader is None:
        raise netns.LabError(f"{system.name}: no stable leader holding the IP")
    return leader


def measure_failover(
    system: System,
    results_leader: list[float],
    results_ip: list[float],
    inject: Callable[[int], float],
    repair: Callable[[int], object],
) -> bool:
    old = wait_settled(system)
    other = next(n for n in system.eligible if n != old)
    fault_at = inject(old)
    took = wait_until(
        lambda: [t for t, node in system.takeovers(fault_at) if node == other],
        TAKEOVER_TIMEOUT,
        interval=0.05,
    )
    moved = wait_until(
        lambda: [
            e["completed_monotonic"]
            for e in system.api.history()
            if e["droplet_id"] == 1000 + other
            and e.get("completed_monotonic") is not None
            and e["completed_monotonic"] >= fault_at
        ],
        TAKEOVER_TIMEOUT,
        interval=0.1,
    )
    repair(old)
    if not took or not moved:
        return False
    results_leader.append(took[0] - fault_at)
    results_ip.append(moved[0] - fault_at)
    return True


def run_system(system: System, args: argparse.Namespace) -> Results:
    results = Results()
    system.start()
    for window in range(args.idle_windows):
        leader = wait_settled(system)
        print(
            f"[{system.name}] idle window {window + 1}/{args.idle_windows}: "
            f"{args.idle_seconds}s, leader n{leader}",
            flush=True,
        )
        for node, usage in idle_usage(system.pids(), args.idle_seconds).items():
            (results.cpu_leader if node == leader else results.cpu_follower).append(usage.cpu)
            results.rss.append(usage.rss)
            results.pss.append(usage.pss)
    for trial in range(args.trials):
        print(f"[{system.name}] trial {trial + 1}/{args.trials}: kill -9, link down", flush=True)
        if not measure_failover(
            system,
            results.kill_leader,
            results.kill_ip,
            system.kill_leader_process,
            system.restart,
        ):
            results.failed_trials += 1
        if not measure_failover(
            system,
            results.link_leader,
            results.link_ip,
            lambda node: system.lab.link_down(system.host(node)),
            lambda node: system.lab.link_up(system.host(node)),
        ):
            results.failed_trials += 1
    wait_settled(system)
    print(f"[{system.name}] {args.steady_seconds}s of 5% loss, 20+-10 ms jitter", flush=True)
    hosts = [h for h in system.lab.hosts.values() if h.name != "api"]
    since = time.monotonic()
    for seed, host in enumerate(hosts):
        system.lab.impair(host, delay=0.020, jitter=0.010, loss=0.05, seed=seed)
    time.sleep(args.steady_seconds)
    until = time.monotonic()
    for host in hosts:
        system.lab.clear_impairment(host)
    results.steady_seconds = until - since
    results.false_leader_changes = len([t for t, _ in system.takeovers(since) if t <= until])
    results.false_ip_moves = len(
        [
            e
            for e in system.api.history()
            if e.get("completed_monotonic") is not None
            and since <= e["completed_monotonic"] <= until
        ]
    )
    return results


# ---------------------------------------------------------------------- report
def _fmt(values: Sequence[float], unit: str, digits: int = 3) -> str:
    p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
    if p50 is None or p99 is None:
        return "n/a"
    return f"{p50:.{digits}f} / {p99:.{digits}f} {unit}"


def _count(value: int | None, results: Results) -> str:
    return f"{value} in {results.steady_seconds:.0f}s"


def print_table(all_results: dict[str, Results], baseline: str = "fip-sidecar") -> None:
    rows: list[tuple[str, Callable[[Results], str], Callable[[Results], float | None]]] = [
        ("kill -9 -> new leader (p50/p99)", lambda r: _fmt(r.kill_leader, "s"),
         lambda r: percentile(r.kill_leader, 0.5)),
        ("kill -9 -> IP moved (p50/p99)", lambda r: _fmt(r.kill_ip, "s"),
         lambda r: percentile(r.kill_ip, 0.5)),
        ("link down -> new leader (p50/p99)", lambda r: _fmt(r.link_leader, "s"),
         lambda r: percentile(r.link_leader, 0.5)),
        ("link down -> IP moved (p50/p99)", lambda r: _fmt(r.link_ip, "s"),
         lambda r: percentile(r.link_ip, 0.5)),
        ("idle CPU, leader (p50/max)", lambda r: _fmt(r.cpu_leader, "%", 2),
         lambda r: percentile(r.cpu_leader, 0.5)),
        ("idle CPU, followers (p50/max)", lambda r: _fmt(r.cpu_follower, "%", 2),
         lambda r: percentile(r.cpu_follower, 0.5)),
        ("RSS per node (p50/max)", lambda r: _fmt(r.rss, "MiB", 1),
         lambda r: percentile(r.rss, 0.5)),
        ("PSS per node (p50/max)", lambda r: _fmt(r.pss, "MiB", 1),
         lambda r: percentile(r.pss, 0.5)),
        ("false leader changes under loss", lambda r: _count(r.false_leader_changes, r),
         lambda r: r.false_leader_changes),
        ("false IP moves under loss", lambda r: _count(r.false_ip_moves, r),
         lambda r: r.false_ip_moves),
        ("trials without a takeover", lambda r: str(r.failed_trials), lambda r: r.failed_trials),
    ]  # fmt: skip
    names = list(all_results)
    base = all_results.get(baseline)
    header = ["metric", *names]
    lines = [header]
    for label, show, value in rows:
        cells = [label]
        for name in names:
            cell = show(all_results[name])
            if base is not None and name != baseline:
                mine, theirs = value(all_results[name]), value(base)
                if mine is not None and theirs:
                    cell += f" (x{mine / theirs:.1f})"
            cells.append(cell)
        lines.append(cells)
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    for i, row in enumerate(lines):
        print("  ".join(cell.ljust(widths[j]) for j, cell in enumerate(row)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(f"(xN = the column's p50 / {baseline}'s p50; 'p99' is the max for fewer than 100 trials)")
    for name, result in all_results.items():
        if result.failure is not None:
            print(f"{name}: could not be measured: {result.failure}")


def ensure_keepalived() -> None:
    if shutil.which("keepalived") is None:
        print("keepalived missing: apt-get install -y keepalived", flush=True)
        subprocess.run(["apt-get", "install", "-y", "keepalived"], check=True, timeout=600)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30, help="failovers of each kind")
    parser.add_argument("--steady-seconds", type=float, default=600.0, help="lossy soak")
    parser.add_argument("--idle-seconds", type=float, default=30.0, help="CPU/RSS window")
    parser.add_argument(
        "--idle-windows",
        type=int,
        default=3,
        help="idle windows per system (CPU per window and node: leader and followers apart)",
    )
    parser.add_argument(
        "--node-python",
        default=None,
        help="run the fip-sidecar nodes with this interpreter, e.g. a production venv's "
        "(python3 -m venv /tmp/prodvenv && /tmp/prodvenv/bin/pip install .), not the dev one",
    )
    parser.add_argument(
        "--keepalived-profiles",
        default="default,matched,fastest",
        help=f"comma-separated, of {', '.join(KEEPALIVED_PROFILES)} (empty: none)",
    )
    parser.add_argument("--no-sidecar", action="store_true")
    parser.add_argument(
        "--sidecar-profiles",
        default="lan",
        help="comma-separated timing profiles of fip-sidecar to measure (lan, fast, wan)",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep logs here")
    args = parser.parse_args(argv)
    reason = netns.unavailable_reason()
    if reason is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    profiles = [p for p in args.keepalived_profiles.split(",") if p]
    if profiles:
        ensure_keepalived()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="fip-compare-"))
    print(f"logs in {root}", flush=True)
    results: dict[str, Results] = {}
    plans: list[tuple[str, Callable[[netns.Lab], System]]] = []
    if not args.no_sidecar:
        for sidecar_profile in [p for p in args.sidecar_profiles.split(",") if p]:
            label = "fip-sidecar" if sidecar_profile == "lan" else f"fip-sidecar-{sidecar_profile}"
            plans.append(
                (
                    label,
                    functools.partial(
                        SidecarSystem, profile=sidecar_profile, python=args.node_python
                    ),
                )
            )
    for name in profiles:
        profile = KEEPALIVED_PROFILES[name]
        plans.append((f"keepalived-{name}", functools.partial(KeepalivedPair, profile=profile)))
    for label, make in plans:
        workdir = root / label
        workdir.mkdir(parents=True, exist_ok=True)
        with netns.lab(workdir, tag=label[:2]) as lab:
            try:
                results[label] = run_system(make(lab), args)
            except netns.LabError as error:
                print(f"[{label}] failed: {error}", file=sys.stderr, flush=True)
                results[label] = Results(failure=str(error))
    print()
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
