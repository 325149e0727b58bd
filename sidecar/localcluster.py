"""A real cluster of sidecar processes on loopback, for tests, benchmarks and the demo.

Every member is a real `fip-sidecar run` process with its own config file, UDP port, status
port and JSON log file, so what a test sees here is what an operator would see: no
in-process shortcuts. Optionally it also runs the DigitalOcean API emulator with its edge
and one demo web service per droplet, so the floating IP visibly moves.

Ports are picked free at run time on 127.0.0.1, every wait is bounded, and `stop()` ends
exactly the processes this object started, by PID (also from a `with` block). Node logs
share CLOCK_MONOTONIC (`mono`, `at_mono`, ...) with this process, so `time.monotonic()`
here is directly comparable with the nodes' event times.

`python -m sidecar.localcluster` (wired as `fip-sidecar demo`) starts the full demo and
prints what to `curl` and what to kill.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import httpx

from sidecar.protocol import generate_cluster_key

Event = dict[str, Any]
TimingValue = float | bool

LOOPBACK = "127.0.0.1"
DEFAULT_RESERVED_IP = "203.0.113.10"
DEFAULT_RESERVED_IPV6 = "2001:db8::10"
#: Droplet ids are config values (`floating_ip.droplet_id`), distinct from node ids on purpose.
DROPLET_ID_BASE = 1000
ELIGIBLE_REGION = "nyc1"
WITNESS_REGION = "sfo3"  # like the real deployment: the witness lives in another region


class ClusterError(Exception):
    """The local cluster could not start, or a wait ran out; the message says which part."""


class SplitBrainError(ClusterError):
    """More than one node answered `role: leader` in one poll."""


@dataclass
class Member:
    """One sidecar process and everything needed to (re)start and observe it."""

    id: int
    eligible: bool
    udp_port: int
    status_port: int
    config_path: Path
    log_path: Path
    droplet_id: int
    web_port: int | None = None
    process: subprocess.Popen[bytes] | None = None
    #: CLOCK_MONOTONIC right after each SIGKILL this cluster sent: the process cannot run
    #: past it, so a leadership interval with no `lost` event ends there.
    killed_at: list[float] = field(default_factory=list)

    @property
    def status_url(self) -> str:
        return f"http://{LOOPBACK}:{self.status_port}"

    @property
    def web_url(self) -> str | None:
        return None if self.web_port is None else f"http://{LOOPBACK}:{self.web_port}"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class _Helper:
    """A non-sidecar process (emulator, web service) and where its output goes."""

    name: str
    process: subprocess.Popen[bytes]
    stdout_path: Path


def free_port(kind: int, taken: set[int]) -> int:
    """A port the kernel says is free on loopback now (SOCK_DGRAM or SOCK_STREAM).

    There is a small window before the child binds it; ports are never reused inside one
    cluster (`taken`), which is what matters for a single test run.
    """
    for _ in range(50):
        with socket.socket(socket.AF_INET, kind) as sock:
            sock.bind((LOOPBACK, 0))
            port = int(sock.getsockname()[1])
        if port not in taken:
            taken.add(port)
            return port
    raise ClusterError("could not find a free loopback port in 50 tries")


def udp_port_in_use(port: int) -> bool:
    """Whether some socket has bound UDP `port`, from /proc/net/udp (Linux).

    Read-only on purpose: probing by binding the port ourselves could make the node's own
    bind fail in the instant we hold it.
    """
    wanted = f":{port:04X}"
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        if any(line.split()[1].endswith(wanted) for line in lines if line.strip()):
            return True
    return False


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml_table(name: str, values: Mapping[str, object]) -> list[str]:
    if not values:
        return []
    return [f"[{name}]", *(f"{key} = {_toml_value(v)}" for key, v in values.items()), ""]


def _child_env() -> dict[str, str]:
    """The environment for children, minus anything that would override their config files.

    In particular a real `DIGITALOCEAN_TOKEN` in the caller's shell must never reach a
    local cluster, and `FIP_SIDECAR_*` variables would silently change every node.
    """
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FIP_SIDECAR_")
        and k not in ("DIGITALOCEAN_TOKEN", "FIP_EMULATOR_TOKEN")
    }


def read_events(path: Path) -> list[Event]:
    """Every JSON object logged to `path`, in order; other lines (tracebacks) are skipped."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    events: list[Event] = []
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line still being written
        if isinstance(record, dict):
            events.append(record)
    return events


# ---------------------------------------------------------------------- leadership intervals


@dataclass(frozen=True)
class Interval:
    """When one node believed it led, on CLOCK_MONOTONIC: [start, end)."""

    node: int
    start: float
    end: float
    term: int | None
    end_reason: str


def leadership_intervals(
    node: int, events: Iterable[Event], killed_at: Sequence[float] = ()
) -> list[Interval]:
    """Intervals from one node's log: from `gained.at_mono` to the earlier of the `lost`
    event's `at_mono` and `lease_ended_mono` (a node paused past its lease stopped leading
    when the lease ended, not when it woke up and noticed).

    A leader killed with SIGKILL logs no `lost`; its interval ends at the first kill time
    after it started. One still open at the end of the log ends at +inf (still leading).
    """
    intervals: list[Interval] = []
    open_start: float | None = None
    open_term: int | None = None
    kills = sorted(killed_at)

    def close_by_kill(before: float) -> None:
        nonlocal open_start
        if open_start is None:
            return
        ends = [k for k in kills if k >= open_start]
        end = ends[0] if ends and ends[0] <= before else before
        intervals.append(Interval(node, open_start, end, open_term, "killed"))
        open_start = None

    for event in events:
        kind = event.get("event")
        if kind == "started" and open_start is not None:
            # A new incarnation began while the old one never logged `lost`: it was killed.
            close_by_kill(float(event.get("mono", math.inf)))
        elif kind == "gained":
            open_start = float(event["at_mono"])
            open_term = event.get("term")
        elif kind == "lost" and open_start is not None:
            end = min(float(event["at_mono"]), float(event["lease_ended_mono"]))
            intervals.append(Interval(node, open_start, end, open_term, str(event.get("reason"))))
            open_start = None
    if open_start is not None:
        close_by_kill(math.inf)
    return intervals


def overlaps(intervals: Iterable[Interval]) -> list[tuple[Interval, Interval]]:
    """Every pair of intervals of different nodes that share an instant."""
    ordered = sorted(intervals, key=lambda i: i.start)
    found: list[tuple[Interval, Interval]] = []
    for a, b in itertools.combinations(ordered, 2):
        if a.node != b.node and a.start < b.end and b.start < a.end:
            found.append((a, b))
    return found


# ---------------------------------------------------------------------- the cluster


class LocalCluster:
    """Start, observe, disturb and stop a local cluster. Use as a context manager.

    `size` members with ids 1..size; `witnesses` (default: the highest id) vote but never
    lead. `timing` overrides the `[timing]` section (e.g. `{"preempt_delay": 1.0}`).
    `with_ip` also starts the emulator, its edge and one demo web service per droplet, and
    configures `[floating_ip]`, `[digitalocean]` and an HTTP `[health]` check per node;
    `health` and `assigner` add keys to those nodes' `[health]` and `[assigner]` sections.
    `hooks` is every node's `[hooks]` section (e.g. `{"on_gained": [...]}`).
    `reserved_ipv6` adds a reserved IPv6 beside the IPv4 (`[[addresses]]` in each config,
    a second edge on `::1` at `edge6_url`).
    `python` runs every process; `node_python`, when given, runs the nodes instead (say a
    production venv without the emulator extra), from the work directory so that the
    source tree in the caller's directory cannot shadow that interpreter's install.
    """

    def __init__(
        self,
        workdir: Path | str | None = None,
        *,
        size: int = 3,
        witnesses: Iterable[int] | None = None,
        timing: Mapping[str, TimingValue] | None = None,
        profile: str = "lan",
        with_ip: bool = False,
        health: Mapping[str, object] | None = None,
        assigner: Mapping[str, object] | None = None,
        hooks: Mapping[str, object] | None = None,
        reserved_ip: str = DEFAULT_RESERVED_IP,
        reserved_ipv6: str | None = None,
        emulator_flags: Sequence[str] = ("--action-seconds", "0.5"),
        log_level: str = "info",
        ready_timeout: float = 20.0,
        python: str = sys.executable,
        node_python: str | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("size must be >= 1")
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="fip-localcluster-")
            workdir = self._tempdir.name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.size = size
        witness_ids = {size} if witnesses is None else set(witnesses)
        if size == 1:
            witness_ids = set()
        self.timing = dict(timing or {})
        self.profile = profile
        self.with_ip = with_ip
        self.health = dict(health or {})
        self.assigner = dict(assigner or {})
        self.hooks = dict(hooks or {})
        self.reserved_ip = reserved_ip
        self.reserved_ipv6 = reserved_ipv6
        self.edge6_url: str | None = None
        self.emulator_flags = tuple(emulator_flags)
        self.log_level = log_level
        self.ready_timeout = ready_timeout
        self.python = python
        self.node_python = node_python
        self.emulator_url: str | None = None
        self.edge_url: str | None = None
        self._helpers: list[_Helper] = []
        self._taken_ports: set[int] = set()
        self._http = httpx.Client(trust_env=False, timeout=1.0)
        self.key_path = self.workdir / "cluster.key"
        self.token_path = self.workdir / "do_token"
        #: Per node, `config_text` options its config is written with (see rewrite_config).
        self.config_options: dict[int, dict[str, Any]] = {}
        self.members: dict[int, Member] = {}
        for node in range(1, size + 1):
            self.members[node] = Member(
                id=node,
                eligible=node not in witness_ids,
                udp_port=free_port(socket.SOCK_DGRAM, self._taken_ports),
                status_port=free_port(socket.SOCK_STREAM, self._taken_ports),
                config_path=self.workdir / f"node{node}.toml",
                log_path=self.workdir / f"node{node}.log",
                droplet_id=DROPLET_ID_BASE + node,
                web_port=free_port(socket.SOCK_STREAM, self._taken_ports) if with_ip else None,
            )

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def nodes(self) -> list[int]:
        return sorted(self.members)

    def write_files(self) -> None:
        """The cluster key and every node's config; `start()` calls this."""
        self.key_path.write_text(generate_cluster_key() + "\n")
        self.key_path.chmod(0o600)
        for member in self.members.values():
            options = self.config_options.get(member.id, {})
            member.config_path.write_text(self.config_text(member.id, **options))

    def config_text(
        self,
        node: int,
        *,
        members: Iterable[int] | None = None,
        joining: Iterable[int] = (),
        leaving: Iterable[int] = (),
    ) -> str:
        """The TOML one member runs with (ports and paths filled in).

        `members` limits the membership it lists (default: every member of this cluster);
        `joining`/`leaving` mark a membership change in progress (README: Changing
        membership)."""
        me = self.members[node]
        listed = set(self.members if members is None else members) | {node}
        joining, leaving = set(joining), set(leaving)
        lines = [
            f"node_id = {node}",
            f'bind = "{LOOPBACK}:{me.udp_port}"',
            f'status_listen = "{LOOPBACK}:{me.status_port}"',
            f"cluster_key_file = {_toml_value(str(self.key_path))}",
            f'profile = "{self.profile}"',
            f'log_level = "{self.log_level}"',
        ]
        if not me.eligible:
            lines.append("eligible = false")
        if node in joining:
            lines.append("joining = true")
        if node in leaving:
            lines.append("leaving = true")
        lines.append("")
        for peer in self.members.values():
            if peer.id == node or peer.id not in listed:
                continue
            lines += [
                "[[peers]]",
                f"id = {peer.id}",
                f'address = "{LOOPBACK}:{peer.udp_port}"',
                f"eligible = {_toml_value(peer.eligible)}",
            ]
            lines += ["joining = true"] if peer.id in joining else []
            lines += ["leaving = true"] if peer.id in leaving else []
            lines.append("")
        lines += _toml_table("timing", self.timing)
        lines += _toml_table("hooks", self.hooks)
        if self.with_ip:
            if self.emulator_url is None:
                raise ClusterError("start the emulator before writing configs with an IP")
            if self.reserved_ipv6 is None:
                lines += _toml_table(
                    "floating_ip", {"address": self.reserved_ip, "droplet_id": me.droplet_id}
                )
            else:
                lines.insert(1, f"droplet_id = {me.droplet_id}")  # a top-level key
                for address in (self.reserved_ip, self.reserved_ipv6):
                    lines += ["[[addresses]]", f'address = "{address}"', ""]
            lines += _toml_table(
                "digitalocean",
                {
                    "api_url": self.emulator_url,
                    "token_file": str(self.token_path),
                    "metadata_url": f"{self.emulator_url}/metadata/droplets/{me.droplet_id}",
                },
            )
            lines += _toml_table("health", {"http": f"{me.web_url}/healthz", **self.health})
            lines += _toml_table("assigner", self.assigner)
        return "\n".join(lines) + "\n"

    def start(self, *, synchronized: bool = False, only: Iterable[int] | None = None) -> None:
        """Start everything and wait until every status port answers (bounded).

        Processes are spawned back to back; their start-up (imports) still spreads them
        over a second or so. With `synchronized`, each node is frozen (SIGSTOP) the moment
        it has bound its election port, and all are released (SIGCONT) together once every
        one is bound, so their elections really begin at the same instant. `only` starts
        just those members (the others can join later with `start_node`).
        """
        if self.with_ip:
            self._start_web_services()
            self._start_emulator()
        self.write_files()
        self.start_written(synchronized=synchronized, only=only)

    def start_written(
        self, *, synchronized: bool = False, only: Iterable[int] | None = None
    ) -> None:
        """Like `start`, with the config files as they are (a test may have edited them)."""
        starting = [self.members[n] for n in (self.members if only is None else only)]
        for member in starting:
            self._spawn(member)
        if synchronized:
            self._freeze_each_once_bound(starting)
            for member in starting:
                self.resume(member.id)
        for member in starting:
            self.wait_ready(member.id)

    def _freeze_each_once_bound(self, members: list[Member]) -> None:
        waiting = {m.id: m for m in members}
        deadline = time.monotonic() + self.ready_timeout
        while waiting:
            for node, member in list(waiting.items()):
                if not member.running():
                    raise ClusterError(f"node {node} exited while starting:\n{self.log_tail(node)}")
                if udp_port_in_use(member.udp_port):
                    self.pause(node)
                    del waiting[node]
            if time.monotonic() > deadline:
                raise ClusterError(f"nodes {sorted(waiting)} did not bind within the timeout")
            time.sleep(0.002)

    def _spawn(self, member: Member) -> None:
        log = member.log_path.open("ab")
        try:
            python = self.node_python or self.python
            member.process = subprocess.Popen(
                [python, "-m", "sidecar.cli", "run", "--config", str(member.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=_child_env(),
                cwd=None if self.node_python is None else self.workdir,
                # Own session: a Ctrl-C in the demo's terminal reaches only the demo, which
                # then stops its children in order.
                start_new_session=True,
            )
        finally:
            log.close()
        (self.workdir / f"node{member.id}.pid").write_text(f"{member.process.pid}\n")

    def rewrite_config(self, node: int, **options: Any) -> None:
        """Write a new config for `node` (see `config_text` for the options)."""
        self.config_options[node] = options
        self.members[node].config_path.write_text(self.config_text(node, **options))

    def reload(self, node: int, timeout: float = 10.0) -> Event:
        """SIGHUP `node` and return its log line saying how the reload ended."""
        since = len(self.events(node))
        process = self.members[node].process
        if process is None or process.poll() is not None:
            raise ClusterError(f"node {node} is not running")
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events(node)[since:]:
                if event.get("event") in ("reloaded", "reload_refused"):
                    return event
            if process.poll() is not None:
                raise ClusterError(f"node {node} exited on SIGHUP:\n{self.log_tail(node)}")
            time.sleep(0.02)
        raise ClusterError(f"node {node} did not report its reload:\n{self.log_tail(node)}")

    def start_node(self, node: int, *, wait: bool = True) -> None:
        """Start a member that is not running (its log file is appended to)."""
        member = self.members[node]
        if member.running():
            raise ClusterError(f"node {node} is already running (pid {member.pid})")
        self._spawn(member)
        if wait:
            self.wait_ready(node)

    def restart(self, node: int, sig: int = signal.SIGKILL, *, wait: bool = True) -> None:
        """Stop a member with `sig` (if it runs), wait for it to exit, start it again."""
        if self.members[node].running():
            self.kill(node, sig)
            self.wait_exit(node)
        self.start_node(node, wait=wait)

    def wait_ready(self, node: int, timeout: float | None = None) -> None:
        """Until the node's /status answers; fail early if the process exits."""
        member = self.members[node]
        deadline = time.monotonic() + (timeout or self.ready_timeout)
        while time.monotonic() < deadline:
            if not member.running():
                raise ClusterError(
                    f"node {node} exited with {self._returncode(member)} while starting; "
                    f"log {member.log_path}:\n{self.log_tail(node)}"
                )
            if self.status(node) is not None:
                return
            time.sleep(0.05)
        raise ClusterError(
            f"node {node} did not answer on {member.status_url} within "
            f"{timeout or self.ready_timeout}s; log:\n{self.log_tail(node)}"
        )

    @staticmethod
    def _returncode(member: Member) -> int | None:
        return None if member.process is None else member.process.returncode

    def stop(self) -> None:
        """End every process this cluster started, by PID: SIGTERM (so leaders resign and
        logs end cleanly), SIGCONT for paused ones, then SIGKILL whatever is left after a
        few seconds. Safe to call twice."""
        processes = [m.process for m in self.members.values() if m.process is not None]
        processes += [h.process for h in self._helpers]
        for process in processes:
            if process.poll() is None:
                for sig in (signal.SIGTERM, signal.SIGCONT):
                    with contextlib.suppress(ProcessLookupError):
                        process.send_signal(sig)
        deadline = time.monotonic() + 5.0
        for process in processes:
            try:
                process.wait(timeout=max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5.0)
        self._helpers.clear()
        self._http.close()
        self._http = httpx.Client(trust_env=False, timeout=1.0)

    def cleanup(self) -> None:
        """`stop()`, then delete the work directory if this cluster created it."""
        self.stop()
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None

    # ------------------------------------------------------------------ disturbing

    def kill(self, node: int, sig: int = signal.SIGKILL) -> float:
        """Send `sig` to the node's process; return time.monotonic() taken just before."""
        member = self.members[node]
        if member.process is None or not member.running():
            raise ClusterError(f"node {node} is not running")
        before = time.monotonic()
        os.kill(member.process.pid, sig)
        if sig == signal.SIGKILL:
            member.killed_at.append(time.monotonic())
        return before

    def pause(self, node: int) -> float:
        """SIGSTOP: the process freezes mid-whatever, like a long GC pause or a stalled VM."""
        return self.kill(node, signal.SIGSTOP)

    def resume(self, node: int) -> float:
        return self.kill(node, signal.SIGCONT)

    def wait_exit(self, node: int, timeout: float = 10.0) -> int:
        """Wait for the node's process to end and return its exit status."""
        process = self.members[node].process
        if process is None:
            raise ClusterError(f"node {node} was never started")
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ClusterError(f"node {node} did not exit within {timeout}s") from None

    # ------------------------------------------------------------------ observing

    def status(self, node: int, timeout: float = 1.0) -> dict[str, Any] | None:
        """The node's /status JSON, or None if it does not answer in time."""
        try:
            response = self._http.get(f"{self.members[node].status_url}/status", timeout=timeout)
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        body = response.json()
        return body if isinstance(body, dict) else None

    def statuses(self, timeout: float = 0.5) -> dict[int, dict[str, Any] | None]:
        return {
            node: self.status(node, timeout) if self.members[node].running() else None
            for node in self.nodes
        }

    def leaders(self, timeout: float = 0.5) -> list[int]:
        """Every node whose /status says `role: leader` right now."""
        return [
            node
            for node, body in self.statuses(timeout).items()
            if body is not None and body.get("role") == "leader"
        ]

    def leader(self, timeout: float = 0.5) -> int | None:
        """The one node that says it leads, None if none does.

        Polls are sequential, so a hand-over between two polls can show two leaders that
        never led at the same instant; several leaders in two polls in a row raise
        SplitBrainError. The logs' leadership intervals are the exact check.
        """
        found = self.leaders(timeout)
        if len(found) > 1:
            found = self.leaders(timeout)
            if len(found) > 1:
                raise SplitBrainError(f"nodes {found} report role=leader in two polls in a row")
        return found[0] if found else None

    def wait_for_leader(
        self,
        timeout: float = 20.0,
        *,
        expect: int | None = None,
        agreed: bool = True,
        poll_interval: float = 0.05,
    ) -> int:
        """Until exactly one node leads (and, if `agreed`, every running node that answers
        names it as `leader_id`). With `expect`, until that node leads. Bounded by `timeout`.
        """
        deadline = time.monotonic() + timeout
        seen: dict[int, dict[str, Any] | None] = {}
        while time.monotonic() < deadline:
            seen = self.statuses()
            leading = [n for n, b in seen.items() if b is not None and b.get("role") == "leader"]
            if len(leading) == 1 and (expect is None or leading[0] == expect):
                who = leading[0]
                answering = [b for b in seen.values() if b is not None]
                if not agreed or all(b.get("leader_id") == who for b in answering):
                    return who
            time.sleep(poll_interval)
        summary = {
            n: None if b is None else (b.get("role"), b.get("leader_id"), b.get("term"))
            for n, b in seen.items()
        }
        raise ClusterError(
            f"no agreed leader{'' if expect is None else f' {expect}'} within {timeout}s: "
            f"(role, leader_id, term) per node: {summary}"
        )

    def wait_stable(self, timeout: float = 30.0, *, expect: int | None = None) -> int:
        """Until one agreed leader (`expect` if given) and every running node sees every
        other running node alive: the state to start a measurement from. Bounded."""
        deadline = time.monotonic() + timeout
        while True:
            who = self.wait_for_leader(max(0.1, deadline - time.monotonic()), expect=expect)
            running = {n for n in self.nodes if self.members[n].running()}
            bodies = self.statuses()
            if all(
                body is not None
                and body.get("leader_id") == who
                and all(p["alive"] for p in body["peers"] if p["id"] in running)
                for n, body in bodies.items()
                if n in running
            ):
                return who
            if time.monotonic() >= deadline:
                raise ClusterError(f"cluster not stable within {timeout}s: {bodies}")
            time.sleep(0.05)

    def events(self, node: int, kind: str | None = None) -> list[Event]:
        """The node's parsed JSON log lines (every incarnation), optionally one `event` kind."""
        found = read_events(self.members[node].log_path)
        return found if kind is None else [e for e in found if e.get("event") == kind]

    def wait_for_event(
        self,
        node: int,
        predicate: Callable[[Event], bool],
        timeout: float = 10.0,
    ) -> Event:
        """The first logged event of `node` matching `predicate`, waiting for it (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events(node):
                if predicate(event):
                    return event
            if time.monotonic() >= deadline:
                raise ClusterError(f"node {node}: no matching event within {timeout}s")
            time.sleep(0.02)

    def intervals(self) -> list[Interval]:
        """Every node's leadership intervals, from the logs (see `leadership_intervals`)."""
        return [
            interval
            for member in self.members.values()
            for interval in leadership_intervals(
                member.id, self.events(member.id), member.killed_at
            )
        ]

    def log_tail(self, node: int, lines: int = 20) -> str:
        try:
            text = self.members[node].log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------------ the emulator side

    def emulator_history(self) -> list[dict[str, Any]]:
        """Every assignment the emulator recorded (droplet id, monotonic timestamps)."""
        if self.emulator_url is None:
            raise ClusterError("this cluster runs without the emulator (with_ip=False)")
        response = self._http.get(f"{self.emulator_url}/_emulator/history", timeout=2.0)
        response.raise_for_status()
        history = response.json()
        if not isinstance(history, list):
            raise ClusterError(f"unexpected history from the emulator: {history!r}")
        return history

    def holder(self, ip: str | None = None) -> int | None:
        """The droplet holding `ip` (default: the reserved IPv4) now, by the emulator's
        history (None: none)."""
        history = self._history_of(ip)
        return history[-1]["droplet_id"] if history else None

    def _history_of(self, ip: str | None) -> list[dict[str, Any]]:
        wanted = self.reserved_ip if ip is None else ip
        return [e for e in self.emulator_history() if e.get("reserved_ip") == wanted]

    def wait_for_holder(
        self,
        droplet_id: int,
        *,
        since: float = -math.inf,
        timeout: float = 20.0,
        ip: str | None = None,
    ) -> dict[str, Any]:
        """The history entry that gave `ip` (default: the reserved IPv4) to `droplet_id`,
        completed after `since` (CLOCK_MONOTONIC), once it is also the current holder;
        bounded by `timeout`."""
        deadline = time.monotonic() + timeout
        history: list[dict[str, Any]] = []
        while True:
            history = self._history_of(ip)
            if history and history[-1]["droplet_id"] == droplet_id:
                entry = history[-1]
                if entry["completed_monotonic"] > since:
                    return entry
            if time.monotonic() >= deadline:
                last = history[-3:]
                raise ClusterError(
                    f"the IP did not move to droplet {droplet_id} within {timeout}s; "
                    f"last history entries: {last}"
                )
            time.sleep(0.05)

    def kill_web(self, node: int, sig: int = signal.SIGKILL) -> float:
        """Stop the demo web service beside `node` (with `kill` of the node: a droplet
        crash); return time.monotonic() taken just before the signal."""
        helper = self._helper(f"web{node}")
        before = time.monotonic()
        helper.process.send_signal(sig)
        helper.process.wait(timeout=10.0)
        return before

    def start_web(self, node: int) -> None:
        """Start the demo web service beside `node` again, on the same port (bounded)."""
        name = f"web{node}"
        if any(h.name == name and h.process.poll() is None for h in self._helpers):
            raise ClusterError(f"the web service of node {node} is already running")
        self._helpers = [h for h in self._helpers if h.name != name]
        self._wait_line(self._start_helper(f"web{node}", self._web_argv(node)), "demo web ")

    def _helper(self, name: str) -> _Helper:
        for helper in self._helpers:
            if helper.name == name:
                return helper
        raise ClusterError(f"this cluster runs no {name}")

    def set_web_health(self, node: int, healthy: bool) -> None:
        """Fail or recover the demo web service beside `node`."""
        url = self.members[node].web_url
        if url is None:
            raise ClusterError("this cluster runs without web services (with_ip=False)")
        response = self._http.post(f"{url}/{'recover' if healthy else 'fail'}", timeout=2.0)
        response.raise_for_status()

    def _start_helper(self, name: str, argv: list[str]) -> _Helper:
        stdout_path = self.workdir / f"{name}.out"
        stderr_path = self.workdir / f"{name}.log"
        with stdout_path.open("wb") as out, stderr_path.open("ab") as err:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=_child_env(),
                start_new_session=True,
            )
        helper = _Helper(name, process, stdout_path)
        self._helpers.append(helper)
        return helper

    def _wait_line(self, helper: _Helper, prefix: str) -> str:
        """The helper's first stdout line starting with `prefix` (its ready line), bounded."""
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            for line in helper.stdout_path.read_text(errors="replace").splitlines():
                if line.startswith(prefix):
                    return line
            if helper.process.poll() is not None:
                err = (self.workdir / f"{helper.name}.log").read_text(errors="replace")
                raise ClusterError(
                    f"{helper.name} exited with {helper.process.returncode}: {err[-2000:]}"
                )
            time.sleep(0.05)
        raise ClusterError(f"{helper.name} printed no ready line within {self.ready_timeout}s")

    def _web_argv(self, node: int) -> list[str]:
        member = self.members[node]
        return [
            self.python,
            "-m",
            "sidecar.demo_web",
            "--listen",
            f"{LOOPBACK}:{member.web_port}",
            "--name",
            f"droplet {member.droplet_id} (node {member.id})",
        ]

    def _start_web_services(self) -> None:
        started = [self._start_helper(f"web{node}", self._web_argv(node)) for node in self.members]
        for helper in started:
            self._wait_line(helper, "demo web ")

    def _start_emulator(self) -> None:
        self.token_path.write_text(secrets.token_hex(32) + "\n")
        self.token_path.chmod(0o600)
        argv = [
            self.python,
            "-m",
            "sidecar.emulator",
            "--listen",
            f"{LOOPBACK}:0",
            "--edge-listen",
            f"{LOOPBACK}:0",
            "--token-file",
            str(self.token_path),
            "--reserved-ip",
            f"{self.reserved_ip}={ELIGIBLE_REGION}",
            *self.emulator_flags,
        ]
        if self.reserved_ipv6 is not None:
            argv += [
                "--reserved-ip",
                f"{self.reserved_ipv6}={ELIGIBLE_REGION}",
                "--edge6-listen",
                "[::1]:0",
            ]
        for member in self.members.values():
            argv += [
                "--droplet",
                f"{member.droplet_id}={ELIGIBLE_REGION if member.eligible else WITNESS_REGION}"
                f"={member.web_url}",
            ]
        line = self._wait_line(self._start_helper("emulator", argv), "emulator listening on ")
        words = line.split()
        self.emulator_url = words[3]
        self.edge_url = words[words.index("edge") + 2] if "edge" in words else None
        self.edge6_url = words[words.index("edge6") + 2] if "edge6" in words else None


# ---------------------------------------------------------------------- the demo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `demo` flags."""
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where configs, keys and logs go (default: a new temporary directory, "
        "deleted at the end)",
    )
    parser.add_argument(
        "--nodes", type=int, choices=[3, 5], default=3, help="members (the last is a witness)"
    )
    parser.add_argument(
        "--preempt-delay",
        type=float,
        default=10.0,
        help="seconds a returning lower-id node waits before taking the IP back",
    )
    parser.add_argument(
        "--restart-after",
        type=float,
        default=5.0,
        help="restart a node this many seconds after it exits, as a supervisor would (0: never)",
    )
    parser.add_argument(
        "--action-seconds",
        type=float,
        default=1.0,
        help="how long the emulated API takes to move the IP",
    )


def _print_demo(cluster: LocalCluster, leader: int, restart_after: float) -> None:
    fip_sidecar = f"{shlex.quote(sys.executable)} -m sidecar.cli"
    lead = cluster.members[leader]
    print(f"\nfip-sidecar local demo is up (files and logs in {cluster.workdir})\n")
    print(f"  floating IP {cluster.reserved_ip} via the edge:  curl -s {cluster.edge_url}/")
    print(f"  emulator API {cluster.emulator_url}")
    print(f"    who held the IP when:  curl -s {cluster.emulator_url}/_emulator/history")
    for member in cluster.members.values():
        kind = "eligible" if member.eligible else "witness "
        print(
            f"  node {member.id} ({kind}) pid {member.pid}  status {member.status_url}/status"
            f"  web {member.web_url}  log {member.log_path}"
        )
    print("\nWatch the IP (one line every half second):")
    print(f"  while sleep 0.5; do curl -s -m 1 {cluster.edge_url}/; done")
    print(f"\nNode {leader} leads now. Crash it and watch the IP move:")
    print(f"  kill -9 {lead.pid}")
    print("or fail its web service (a health failover; the leader resigns):")
    print(f"  curl -s -X POST {lead.web_url}/fail      # and later: .../recover")
    print("or stop it cleanly (it resigns first, so the hand-over takes one round trip):")
    print(f"  kill -TERM {lead.pid}")
    if restart_after > 0:
        print(
            f"The demo restarts a stopped node after {restart_after:g} s, like a supervisor; "
            f"node 1 takes the IP back once it has been healthy for its preempt delay."
        )
    print(f"Any node's view:  {fip_sidecar} status --url {lead.status_url}")
    print("\nCtrl-C stops everything.\n", flush=True)


def _supervise(cluster: LocalCluster, exited_at: dict[int, float], restart_after: float) -> None:
    """Report nodes that exited and start them again `restart_after` seconds later."""
    now = time.monotonic()
    for node, member in cluster.members.items():
        if member.running():
            continue
        if node not in exited_at:
            exited_at[node] = now
            code = None if member.process is None else member.process.returncode
            print(f"[{time.strftime('%H:%M:%S')}] node {node} exited ({code})", flush=True)
        elif restart_after > 0 and now - exited_at[node] >= restart_after:
            del exited_at[node]
            cluster.start_node(node, wait=False)
            print(
                f"[{time.strftime('%H:%M:%S')}] node {node} restarted, pid {member.pid}",
                flush=True,
            )


class _Stop(Exception):
    pass


def run(args: argparse.Namespace) -> int:
    """Start the demo, report leader changes as they happen, tear down on Ctrl-C/SIGTERM."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise _Stop

    previous = signal.signal(signal.SIGTERM, on_signal)
    cluster = LocalCluster(
        args.workdir,
        size=args.nodes,
        timing={"preempt_delay": args.preempt_delay},
        with_ip=True,
        emulator_flags=("--action-seconds", str(args.action_seconds)),
    )
    try:
        print(f"starting the emulator, {args.nodes} web services and sidecars ...", flush=True)
        cluster.start()
        _print_demo(cluster, cluster.wait_for_leader(timeout=30.0), args.restart_after)
        exited_at: dict[int, float] = {}
        shown: tuple[int | None, int | None] = (None, None)
        while True:  # until Ctrl-C / SIGTERM: a demo runs as long as the person wants
            leader: int | None = None
            try:
                leader = cluster.leader()
            except SplitBrainError as exc:
                print(f"!! {exc}", flush=True)
            _supervise(cluster, exited_at, args.restart_after)
            history = cluster.emulator_history()
            holder = history[-1]["droplet_id"] if history else None
            if (leader, holder) != shown:
                stamp = time.strftime("%H:%M:%S")
                print(f"[{stamp}] leader: node {leader}; IP on droplet {holder}", flush=True)
                shown = (leader, holder)
            time.sleep(0.5)
    except (KeyboardInterrupt, _Stop):
        print("\nstopping ...", flush=True)
        return 0
    except ClusterError as exc:
        print(f"fip-sidecar demo: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.workdir is None:
            cluster.cleanup()
        else:
            cluster.stop()
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sidecar.localcluster",
        description="Run a local demo: the DigitalOcean API emulator with its edge, one web "
        "service per droplet and a sidecar beside each; kill the leader and watch the IP move.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
