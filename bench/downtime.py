"""Client-observed downtime through the floating IP when the leader's droplet crashes.

A real local cluster (`LocalCluster(with_ip=True)`): the DigitalOcean API emulator with its
edge (the stand-in for the network that routes the reserved IP to its holder), one demo web
service per droplet and three `fip-sidecar run` processes (nodes 1 and 2 eligible, node 3 a
witness), profile `lan`. A client thread sends `GET /` through the edge every 20 ms
(`--interval`). Each trial starts with node 1 leading and the IP on droplet 1001, then
crashes droplet 1: `kill -9` of node 1's sidecar and, right after, of its web service (a
dead droplet takes both; killing the sidecar alone leaves the old holder serving, so a
client would see no gap at all). The downtime is the longest gap between two successful
(HTTP 200) responses, from the last success before the kill until the edge has answered
from droplet 1002 for a while: what a user of the service would notice.

Each trial also splits the time after the kill, from the nodes' logs and the emulator's
history (all CLOCK_MONOTONIC, shared by every process on the machine):

  election  kill -> node 2 logs `gained`
  request   `gained` -> the emulator receives the assign POST (a GET of the IP first,
            which the API rules require: assigning to the current holder is a 422)
  action    POST -> the action completes and the IP moves (`--action-seconds`)
  edge      the move -> first 200 from droplet 1002 (`--propagation-delay`, plus the
            client's 20 ms pacing)

Two phases: emulated action time and propagation delay at zero (only the sidecar's own
costs remain; target p99 <= 1.2 s), then values modelled on DigitalOcean
(`--slow-action-seconds 3 --slow-propagation-delay 1` by default). Why those: the docs
promise reserved IPs can be "instantly remapped", and the OpenAPI examples show assign
actions that completed in 0 s and in 11 s (started_at/completed_at); 3 s is a typical
middle for the action, and 1 s stands for the network converging after the API reports
the action complete (the docs give no figure; announcements settle "within seconds").
For the pessimistic end run `--slow-action-seconds 11`.

A third phase, `pending-event`, measures what a busy standby costs: at the kill, droplet
1002 (the failover target) has a droplet event in flight (`--event-type backup`, for
`--event-seconds`), during which DigitalOcean refuses to assign it a reserved IP (422
"Droplet already has a pending event."). The assigner waits `unprocessable_delay` (2-3 s,
jittered) between attempts, so the outage is the election plus the event plus up to one
such wait. Action time and propagation are zero there, so only that cost shows (in the
`request` part: from `gained` to the POST the API accepted).

Restoring between trials (`--restore`):
- `restart` (default): start node 1's web service and sidecar again; with a short
  `preempt_delay` (0.5 s) node 1 takes the lead and the IP back once healthy, then the
  bench waits until every node agrees, the IP is on droplet 1001 and the edge answers from
  it. Each trial starts from the same state; the restore time is not measured.
- `fresh`: a new cluster per trial (slower).

Both address families in the same run (`--families both`, the default): the cluster holds
a reserved IPv4 and a reserved IPv6 (`[[addresses]]`, one assigner each), the emulator
serves an IPv4 edge on 127.0.0.1 and an IPv6 edge on ::1, and a client thread probes
each. Per trial the bench reports the downtime each family's client saw, and `both`: the
time from the kill until each edge has answered from droplet 1002 (both addresses on the
new leader). The component split is the IPv4 address's. `--families ipv4` runs the
single-address cluster of before.

Every wait is bounded, `--max-seconds` bounds the whole run, and every process is stopped
by PID at the end.

    .venv/bin/python bench/downtime.py --trials 20 --slow-trials 5 --event-trials 5
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from sidecar.emulator.state import DROPLET_EVENT_KINDS
from sidecar.localcluster import DEFAULT_RESERVED_IPV6, ClusterError, LocalCluster, overlaps

DROPLET_1 = 1001
DROPLET_2 = 1002
#: Health checks quick enough that a restarted node 1 is eligible again soon; they do not
#: affect the measurement (node 2's service stays healthy throughout).
HEALTH = {"check_interval": 0.25, "check_timeout": 0.2, "rise": 2, "fall": 3}
#: After the first 200 from droplet 1002, keep sampling this long (a relapse would show).
SETTLE_AFTER_RECOVERY = 0.5
FAST_TARGET_P99 = 1.2
COMPONENTS = ("election", "request", "action", "edge")
FAMILY_COLUMNS = ("ipv4 p50 p99", "ipv6 p50 p99", "both p50 p99")


@dataclass(frozen=True)
class Phase:
    name: str
    action_seconds: float
    propagation_delay: float
    trials: int
    #: A droplet event on the failover target, started at the kill: (type, seconds).
    target_event: tuple[str, float] | None = None

    @property
    def label(self) -> str:
        label = f"{self.name} (action {self.action_seconds:g} s, "
        label += f"propagation {self.propagation_delay:g} s"
        if self.target_event is not None:
            label += f", target {self.target_event[0]} {self.target_event[1]:g} s"
        return label + ")"


@dataclass
class Trial:
    downtime: float  # the IPv4 client's
    parts: dict[str, float]
    downtime6: float | None = None  # the IPv6 client's
    both: float | None = None  # kill -> both edges answer from droplet 1002


@dataclass
class PhaseResult:
    phase: Phase
    trials: list[Trial] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0


# ---------------------------------------------------------------------- the client


@dataclass(frozen=True)
class Sample:
    sent: float  # CLOCK_MONOTONIC
    done: float
    ok: bool
    droplet: int | None


class Prober:
    """Sends GET / through the edge every `interval` seconds from a thread and keeps every
    outcome. A request never waits for an earlier one's slot: a slow answer delays only
    the next send, it does not build a backlog."""

    def __init__(self, edge_url: str, interval: float, timeout: float = 1.0) -> None:
        self._url = f"{edge_url}/"
        self._interval = interval
        self._timeout = timeout
        self._samples: list[Sample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prober", daemon=True)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self._timeout + 2.0)

    def _run(self) -> None:
        with httpx.Client(trust_env=False, timeout=self._timeout) as client:
            next_send = time.monotonic()
            while not self._stop.is_set():
                sent = time.monotonic()
                ok, droplet = False, None
                try:
                    response = client.get(self._url)
                    ok = response.status_code == 200
                    header = response.headers.get("x-fip-droplet")
                    droplet = int(header) if header and header.isdigit() else None
                except httpx.HTTPError:
                    pass
                with self._lock:
                    self._samples.append(Sample(sent, time.monotonic(), ok, droplet))
                next_send = max(next_send + self._interval, time.monotonic())
                self._stop.wait(max(0.0, next_send - time.monotonic()))

    def samples(self) -> list[Sample]:
        with self._lock:
            return list(self._samples)


#: Trials come every ~3 s, far more often than any real failover: with the default
#: request budget (60 a minute per node) node 2 runs out after ~18 trials and then waits
#: for room, which measures the rate limiter rather than the failover. The bench raises
#: the budget to DigitalOcean's own per-token limit instead.
ASSIGNER = {"requests_per_minute": 250, "requests_per_hour": 5000}


def longest_gap(samples: Sequence[Sample], since: float) -> float:
    """The longest time between two successful answers, counting from the last success
    before `since` (the kill) to the last sample."""
    successes = [s.done for s in samples if s.ok]
    before = [t for t in successes if t <= since]
    if not before:
        raise ClusterError("no successful answer before the kill: the trial did not start stable")
    times = [before[-1], *[t for t in successes if t > since]]
    return max(b - a for a, b in itertools.pairwise(times)) if len(times) > 1 else 0.0


# ---------------------------------------------------------------------- one trial


def new_cluster(workdir: Path, phase: Phase, preempt_delay: float, ipv6: bool) -> LocalCluster:
    cluster = LocalCluster(
        workdir,
        with_ip=True,
        reserved_ipv6=DEFAULT_RESERVED_IPV6 if ipv6 else None,
        timing={"preempt_delay": preempt_delay},
        health=HEALTH,
        assigner=ASSIGNER,
        emulator_flags=(
            "--action-seconds",
            str(phase.action_seconds),
            "--propagation-delay",
            str(phase.propagation_delay),
        ),
    )
    try:
        cluster.start()
        wait_ready_for_trial(cluster, phase)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def wait_ready_for_trial(cluster: LocalCluster, phase: Phase, timeout: float = 60.0) -> None:
    """Node 1 leads, every node agrees and sees every peer, the IP is on droplet 1001 and
    the edge answers from it."""
    deadline = time.monotonic() + timeout
    cluster.wait_stable(timeout=timeout, expect=1)
    cluster.wait_for_holder(DROPLET_1, timeout=max(1.0, deadline - time.monotonic()))
    if cluster.reserved_ipv6 is not None:
        cluster.wait_for_holder(
            DROPLET_1, timeout=max(1.0, deadline - time.monotonic()), ip=cluster.reserved_ipv6
        )
    for edge in edges(cluster):
        wait_edge_answers(edge, deadline)


def edges(cluster: LocalCluster) -> list[str]:
    """The IPv4 edge's URL, and the IPv6 edge's when the cluster has a reserved IPv6."""
    assert cluster.edge_url is not None
    return [cluster.edge_url] + ([cluster.edge6_url] if cluster.edge6_url else [])


def wait_edge_answers(edge: str, deadline: float) -> None:
    with httpx.Client(trust_env=False, timeout=1.0) as client:
        while time.monotonic() < deadline:
            try:
                response = client.get(f"{edge}/")
                if response.headers.get("x-fip-droplet") == str(DROPLET_1):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    raise ClusterError(f"{edge} did not answer from droplet {DROPLET_1} in time")


def wait_for_baseline(prober: Prober, successes: int = 10, timeout: float = 10.0) -> None:
    """Until the client has had `successes` answers from droplet 1001 (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ok = [s for s in prober.samples() if s.ok and s.droplet == DROPLET_1]
        if len(ok) >= successes:
            return
        time.sleep(0.02)
    raise ClusterError(f"the client had no {successes} answers from droplet 1 in {timeout}s")


def start_target_event(cluster: LocalCluster, kind: str, seconds: float) -> None:
    """Give the failover target a droplet event (the emulator's `droplet_event` fault)."""
    event = {"droplet_id": DROPLET_2, "type": kind, "seconds": seconds}
    with httpx.Client(trust_env=False, timeout=2.0) as client:
        response = client.post(
            f"{cluster.emulator_url}/_emulator/faults", json={"droplet_event": event}
        )
    if response.status_code != 200:
        raise ClusterError(f"the emulator refused the droplet event: {response.text}")


def first_from_target(samples: Sequence[Sample], since: float) -> float | None:
    return min((s.done for s in samples if s.ok and s.droplet == DROPLET_2 and s.sent > since),
               default=None)  # fmt: skip


def measure_one(cluster: LocalCluster, phase: Phase, interval: float) -> Trial:
    bound = 20.0 + 2 * (phase.action_seconds + phase.propagation_delay)
    if phase.target_event is not None:
        bound += phase.target_event[1]
    with contextlib.ExitStack() as stack:
        probers = [stack.enter_context(Prober(edge, interval)) for edge in edges(cluster)]
        for prober in probers:
            wait_for_baseline(prober)
        if phase.target_event is not None:
            start_target_event(cluster, *phase.target_event)
        killed = cluster.kill(1)
        cluster.kill_web(1)
        deadline = time.monotonic() + bound
        while time.monotonic() < deadline:
            time.sleep(0.05)
            recovered = [first_from_target(p.samples(), killed) for p in probers]
            if all(r is not None for r in recovered) and time.monotonic() >= (
                max(r for r in recovered if r is not None) + SETTLE_AFTER_RECOVERY
            ):
                break
        else:
            raise ClusterError(f"no answer from droplet {DROPLET_2} within {bound:.0f} s")
    cluster.wait_exit(1)
    samples = probers[0].samples()
    gained = cluster.wait_for_event(
        2, lambda e: e.get("event") == "gained" and e["at_mono"] > killed, timeout=5.0
    )
    moved = cluster.wait_for_holder(DROPLET_2, since=killed, timeout=5.0)
    first_ok = first_from_target(samples, killed)
    assert first_ok is not None
    parts = {
        "election": gained["at_mono"] - killed,
        "request": moved["requested_monotonic"] - gained["at_mono"],
        "action": moved["completed_monotonic"] - moved["requested_monotonic"],
        "edge": first_ok - moved["completed_monotonic"],
    }
    trial = Trial(longest_gap(samples, killed), parts)
    if len(probers) == 2:
        samples6 = probers[1].samples()
        first6 = first_from_target(samples6, killed)
        assert first6 is not None
        trial.downtime6 = longest_gap(samples6, killed)
        trial.both = max(first_ok, first6) - killed
    return trial


def restore(cluster: LocalCluster, phase: Phase) -> None:
    cluster.start_web(1)
    cluster.start_node(1)
    wait_ready_for_trial(cluster, phase)


def run_phase(phase: Phase, root: Path, args: argparse.Namespace, deadline: float) -> PhaseResult:
    result = PhaseResult(phase)
    started = time.monotonic()
    cluster: LocalCluster | None = None
    try:
        for trial in range(phase.trials):
            if time.monotonic() > deadline:
                result.failures.append(f"stopped after {trial} trials: --max-seconds")
                break
            try:
                if cluster is None or args.restore == "fresh":
                    if cluster is not None:
                        cluster.stop()
                    cluster = new_cluster(
                        root / f"{phase.name}-{trial}",
                        phase,
                        args.preempt_delay,
                        args.families == "both",
                    )
                result.trials.append(measure_one(cluster, phase, args.interval))
                if overlaps(cluster.intervals()):
                    result.failures.append(f"trial {trial}: two leaders overlapped")
                if args.restore == "restart" and trial + 1 < phase.trials:
                    restore(cluster, phase)
            except ClusterError as exc:
                result.failures.append(f"trial {trial}: {exc}")
                if cluster is not None:
                    cluster.stop()
                cluster = None
            print(
                f"  {phase.name}: trial {trial + 1}/{phase.trials}"
                + (f" downtime {result.trials[-1].downtime:.3f} s" if result.trials else ""),
                file=sys.stderr,
                flush=True,
            )
    finally:
        if cluster is not None:
            cluster.stop()
    result.wall_seconds = time.monotonic() - started
    return result


# ---------------------------------------------------------------------- report


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest rank: with fewer than 100 samples p99 is the maximum, as it should be."""
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def print_table(results: Sequence[PhaseResult], args: argparse.Namespace) -> None:
    print(
        "\nclient-observed downtime through the edge, kill -9 of the leader's droplet "
        f"(sidecar + web service); a GET every {args.interval * 1000:.0f} ms; "
        f"3 processes (2 eligible + 1 witness), profile lan, restore={args.restore}\n"
    )
    print(
        f"{'phase':<62} {'n':>3} {'min':>7} {'p50':>7} {'p99':>7} {'max':>7}   "
        + "  ".join(f"{c + ' p50':>13}" for c in COMPONENTS)
    )
    for result in results:
        phase = result.phase
        label = phase.label
        values = sorted(t.downtime for t in result.trials)
        if not values:
            print(f"{label:<62} {0:>3}  (no samples)")
            continue
        medians = [statistics.median(t.parts[c] for t in result.trials) for c in COMPONENTS]
        print(
            f"{label:<62} {len(values):>3} {values[0]:>7.3f} {percentile(values, 50):>7.3f}"
            f" {percentile(values, 99):>7.3f} {values[-1]:>7.3f}   "
            + "  ".join(f"{m:>13.3f}" for m in medians)
        )
    if args.families == "both":
        print(
            "\nboth families (IPv4 edge on 127.0.0.1, IPv6 edge on ::1): client downtime per "
            "family, and `both` = kill -> each edge answers from droplet 1002"
        )
        print(f"{'phase':<62} {'n':>3} " + "  ".join(f"{c:>17}" for c in FAMILY_COLUMNS))
        for result in results:
            cells = []
            for name in ("downtime", "downtime6", "both"):
                values = sorted(v for t in result.trials if (v := getattr(t, name)) is not None)
                cells.append(
                    f"{percentile(values, 50):>8.3f} {percentile(values, 99):>8.3f}"
                    if values
                    else f"{'-':>17}"
                )
            print(f"{result.phase.label:<62} {len(result.trials):>3} " + "  ".join(cells))
    fast = next((r for r in results if r.phase.name == "zero-delay"), None)
    if fast is not None and fast.trials:
        p99 = percentile(sorted(t.downtime for t in fast.trials), 99)
        verdict = "met" if p99 <= FAST_TARGET_P99 else "MISSED"
        print(f"\nzero-delay target p99 <= {FAST_TARGET_P99} s: {verdict} ({p99:.3f} s)")
    for result in results:
        print(f"  {result.phase.name}: {result.wall_seconds:.0f} s wall")
        for failure in result.failures:
            print(f"  ! {result.phase.name}: {failure}")
    if args.raw:
        for result in results:
            for i, t in enumerate(result.trials):
                parts = " ".join(f"{c}={t.parts[c]:.3f}" for c in COMPONENTS)
                extra = "" if t.both is None else f" downtime6={t.downtime6:.3f} both={t.both:.3f}"
                print(f"  {result.phase.name}[{i}] downtime={t.downtime:.3f}{extra} {parts}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="trials at zero delays")
    parser.add_argument("--slow-trials", type=int, default=5, help="trials with slow actions")
    parser.add_argument("--slow-action-seconds", type=float, default=3.0)
    parser.add_argument("--slow-propagation-delay", type=float, default=1.0)
    parser.add_argument(
        "--event-trials", type=int, default=5, help="trials with the target busy (0: skip)"
    )
    parser.add_argument(
        "--event-seconds", type=float, default=5.0, help="how long the target's event runs"
    )
    parser.add_argument(
        "--event-type",
        default="backup",
        choices=DROPLET_EVENT_KINDS,
    )
    parser.add_argument("--interval", type=float, default=0.02, help="client request period")
    parser.add_argument(
        "--families",
        choices=["both", "ipv4"],
        default="both",
        help="a reserved IPv4 and IPv6 (default), or the IPv4 alone",
    )
    parser.add_argument("--restore", choices=["restart", "fresh"], default="restart")
    parser.add_argument("--preempt-delay", type=float, default=0.5)
    parser.add_argument("--max-seconds", type=float, default=1200.0, help="bound on the run")
    parser.add_argument("--raw", action="store_true", help="also print every trial")
    parser.add_argument("--workdir", type=Path, default=None, help="keep configs and logs here")
    args = parser.parse_args(argv)
    if not 0.005 <= args.interval <= 1.0:
        parser.error("--interval must be between 0.005 and 1 s")
    if not args.event_seconds > 0:
        parser.error("--event-seconds must be > 0")
    phases = [
        Phase("zero-delay", 0.0, 0.0, args.trials),
        Phase("slow", args.slow_action_seconds, args.slow_propagation_delay, args.slow_trials),
        Phase(
            "pending-event",
            0.0,
            0.0,
            args.event_trials,
            target_event=(args.event_type, args.event_seconds),
        ),
    ]
    deadline = time.monotonic() + args.max_seconds
    with tempfile.TemporaryDirectory(prefix="fip-downtime-") as scratch:
        root = args.workdir or Path(scratch)
        started = time.monotonic()
        results = [run_phase(p, root, args, deadline) for p in phases if p.trials > 0]
        print_table(results, args)
        print(f"\n({time.monotonic() - started:.0f} s in all)")
    return 1 if any(r.failures for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
