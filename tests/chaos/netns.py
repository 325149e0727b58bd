"""A lab of network namespaces on one machine: a switch, hosts, processes and faults.

Topology: one "switch" namespace holds a bridge; every host is a namespace with `eth0`, a
veth whose other end (`pN`) is a port of that bridge. Hosts get 198.18.0.N/24 (the
benchmark range) and nothing else; IPv6 is off everywhere so no link-local chatter leaves
a host; the root namespace is never touched. Every namespace's name starts with this run's
prefix (`fipt-<pid>-`), so cleanup deletes exactly what this run made, even after a crash
of an earlier run (`remove_stale_labs`).

Faults, each reversible:
- `link_down` / `link_up`: the host's `eth0` (a pulled cable, seen by the host itself).
- `impair`: delay, jitter and loss on a host's link. The CI kernel has no `sch_netem`, so
  this runs `impair.py` (a userspace netem) between the host's switch port and the bridge.
- `drop`: loss in one direction (or from/to one peer) with nftables inside the host's
  namespace (`numgen random` gives probabilistic loss; kernel-side, exact).
- `pause` / `resume` / `kill` / `restart` of processes the lab started, by PID only.

Processes run through `ip netns exec`, which execs the command, so the PID we hold is the
process itself. Talking to a host from the test process uses a socket created inside the
host's namespace (`setns` on the creating thread only), so no route or address is ever
added to the root namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

SUBNET_PREFIX = "198.18.0"
PREFIX_LENGTH = 24
NAME_PREFIX = "fipt-"
IMPAIR_SCRIPT = Path(__file__).with_name("impair.py")
COMMAND_TIMEOUT = 20.0
CLONE_NEWNET = 0x40000000
NFT_TABLE = "fipt_chaos"


class LabError(Exception):
    """A lab command failed; the message carries the command and its stderr."""


def unavailable_reason() -> str | None:
    """Why the lab cannot run here (None when it can): tests skip with this reason."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "needs iproute2 (`ip`)"
    probe = f"{NAME_PREFIX}{os.getpid()}-probe"
    added = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if added.returncode != 0:
        return f"`ip netns add` failed: {added.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a short command (bounded in time); raise LabError with its stderr on failure."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        raise LabError(f"timed out after {COMMAND_TIMEOUT}s: {' '.join(argv)}") from None
    if check and done.returncode != 0:
        raise LabError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_namespaces() -> list[str]:
    out = run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def remove_stale_labs() -> list[str]:
    """Delete namespaces left by earlier runs whose process is gone (`fipt-<deadpid>-*`)."""
    removed = []
    for name in list_namespaces():
        match = re.fullmatch(rf"{NAME_PREFIX}(\d+)-.+", name)
        if match and int(match[1]) != os.getpid() and not _pid_alive(int(match[1])):
            run(["ip", "netns", "del", name], check=False)
            removed.append(name)
    return removed


_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def _in_namespace(ns: str) -> Iterator[None]:
    """Switch *this thread* into a namespace and back (network namespaces are per-thread)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise LabError(f"setns({ns}): {os.strerror(ctypes.get_errno())}")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:
                raise LabError(f"setns(back): {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(own)
        os.close(target)


class _NamespacedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, ns: str, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.ns = ns

    def connect(self) -> None:
        with _in_namespace(self.ns):
            self.sock = socket.create_connection((self.host, self.port), self.timeout)


@dataclass
class Process:
    """A process the lab started; every signal goes to this PID and nothing else."""

    name: str
    host: Host
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]
    stdout: IO[bytes] | None = None
    starts: list[float] = field(default_factory=list)
    kills: list[float] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)


@dataclass(frozen=True)
class Host:
    name: str
    ns: str
    address: str
    port_index: int

    @property
    def switch_port(self) -> str:
        return f"p{self.port_index}"


@dataclass
class _Impairment:
    relay: subprocess.Popen[bytes]
    veth: str


class Lab:
    """Namespaces, processes and faults of one test run; `close()` undoes all of it."""

    def __init__(self, workdir: Path, tag: str = "") -> None:
        self.prefix = f"{NAME_PREFIX}{os.getpid()}-{tag}"
        self.workdir = workdir
        self.switch_ns = self.prefix + "sw"
        self.hosts: dict[str, Host] = {}
        self.processes: list[Process] = []
        self._impairments: dict[str, _Impairment] = {}
        self._namespaces: list[str] = []
        try:
            self._add_namespace(self.switch_ns)
            run(["ip", "-n", self.switch_ns, "link", "add", "br0", "type", "bridge"])
            run(["ip", "-n", self.switch_ns, "link", "set", "br0", "up"])
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ topology
    def _add_namespace(self, ns: str) -> None:
        run(["ip", "netns", "add", ns])
        self._namespaces.append(ns)
        for key in ("all", "default"):
            run(
                [
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    "sysctl",
                    "-q",
                    "-w",
                    f"net.ipv6.conf.{key}.disable_ipv6=1",
                ]
            )
        run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def add_host(self, name: str, index: int) -> Host:
        """A host namespace with eth0 = 198.18.0.<index>/24, plugged into the switch."""
        if not 1 <= index <= 254 or name in self.hosts:
            raise LabError(f"bad host {name!r} / index {index}")
        host = Host(name, self.prefix + name, f"{SUBNET_PREFIX}.{index}", index)
        self._add_namespace(host.ns)
        sw = self.switch_ns
        port = host.switch_port
        run(
            [
                "ip",
                "-n",
                sw,
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                host.ns,
            ]
        )
        # One segment per frame, so the userspace impairer never meets a >MTU GSO frame.
        run(
            [
                "ip",
                "-n",
                host.ns,
                "link",
                "set",
                "dev",
                "eth0",
                "gso_max_size",
                "1500",
                "gso_max_segs",
                "1",
            ]
        )
        run(["ip", "-n", sw, "link", "set", port, "master", "br0", "up"])
        run(["ip", "-n", host.ns, "addr", "add", f"{host.address}/{PREFIX_LENGTH}", "dev", "eth0"])
        run(["ip", "-n", host.ns, "link", "set", "eth0", "up"])
        self.hosts[name] = host
        return host

    # ------------------------------------------------------------------ processes
    def spawn(
        self,
        host: Host,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        capture_stdout: bool = False,
    ) -> Process:
        """Start `argv` inside the host's namespace; stderr (and stdout) append to a log file."""
        log_path = self.workdir / f"{name}.log"
        log = log_path.open("ab")
        popen = subprocess.Popen(
            ["ip", "netns", "exec", host.ns, *argv],
            stdout=subprocess.PIPE if capture_stdout else log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        log.close()
        proc = Process(name, host, list(argv), log_path, popen, popen.stdout)
        proc.starts.append(time.monotonic())
        self.processes.append(proc)
        return proc

    def kill(self, proc: Process, sig: int = signal.SIGKILL) -> float:
        """Send `sig` to the process and reap it; returns the monotonic time of the signal."""
        at = time.monotonic()
        if proc.running():
            if sig == signal.SIGKILL:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
            os.kill(proc.pid, sig)
            proc.kills.append(at)
        try:
            proc.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.popen.wait(timeout=10)
        return at

    def restart(self, proc: Process) -> Process:
        """Start the same command again (same log file, appended); the old PID must be dead."""
        if proc.running():
            raise LabError(f"{proc.name} (pid {proc.pid}) is still running")
        log = proc.log_path.open("ab")
        popen = subprocess.Popen(
            ["ip", "netns", "exec", proc.host.ns, *proc.argv],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        proc.popen = popen
        proc.starts.append(time.monotonic())
        return proc

    # ------------------------------------------------------------------ faults
    def link_down(self, host: Host) -> float:
        at = time.monotonic()
        run(["ip", "-n", host.ns, "link", "set", "eth0", "down"])
        return at

    def link_up(self, host: Host) -> float:
        at = time.monotonic()
        run(["ip", "-n", host.ns, "link", "set", "eth0", "up"])
        return at

    def impair(
        self,
        host: Host,
        *,
        delay: float = 0.0,
        jitter: float = 0.0,
        loss: float = 0.0,
        direction: str = "out",
        seed: int | None = None,
        max_seconds: float = 3600.0,
    ) -> None:
        """Delay/jitter/loss on the host's link (out = what it sends, like netem on eth0)."""
        self.clear_impairment(host)
        sw = self.switch_ns
        inner, outer = f"i{host.port_index}", f"j{host.port_index}"
        run(["ip", "-n", sw, "link", "add", inner, "type", "veth", "peer", "name", outer])
        for dev in (inner, host.switch_port):
            run(
                [
                    "ip",
                    "-n",
                    sw,
                    "link",
                    "set",
                    "dev",
                    dev,
                    "gso_max_size",
                    "1500",
                    "gso_max_segs",
                    "1",
                ]
            )
        run(["ip", "-n", sw, "link", "set", outer, "master", "br0", "up"])
        run(["ip", "-n", sw, "link", "set", inner, "promisc", "on", "up"])
        argv = [
            sys.executable, str(IMPAIR_SCRIPT),
            "--host-port", host.switch_port, "--switch-port", inner,
            "--delay", str(delay), "--jitter", str(jitter), "--loss", str(loss),
            "--direction", direction, "--max-seconds", str(max_seconds),
        ]  # fmt: skip
        if seed is not None:
            argv += ["--seed", str(seed)]
        relay = subprocess.Popen(
            ["ip", "netns", "exec", sw, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=(self.workdir / f"impair-{host.name}.log").open("ab"),
        )
        self._impairments[host.name] = _Impairment(relay, inner)
        assert relay.stdout is not None and relay.stdin is not None
        if relay.stdout.readline().strip() != b"ready":
            self.clear_impairment(host)
            raise LabError(f"impairer for {host.name} did not start (see impair-{host.name}.log)")
        # Unplug the port only now that the relay is listening: the host loses no frames.
        run(["ip", "-n", sw, "link", "set", host.switch_port, "nomaster", "promisc", "on"])
        relay.stdin.write(b"go\n")
        relay.stdin.flush()

    def clear_impairment(self, host: Host) -> str:
        """Stop the impairer and plug the host's port back into the bridge; returns its counts."""
        imp = self._impairments.pop(host.name, None)
        if imp is None:
            return ""
        sw = self.switch_ns
        # Plug back in first (a few duplicate frames are harmless), then stop the relay.
        run(["ip", "-n", sw, "link", "set", host.switch_port, "promisc", "off", "master", "br0"])
        summary = b""
        if imp.relay.poll() is None:
            imp.relay.terminate()
        try:
            summary, _ = imp.relay.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            imp.relay.kill()
            imp.relay.wait(timeout=10)
        run(["ip", "-n", sw, "link", "del", imp.veth], check=False)
        return summary.decode(errors="replace").strip()

    def drop(
        self,
        host: Host,
        *,
        direction: str,
        probability: float = 1.0,
        peer: Host | None = None,
        protocol: str | None = None,
    ) -> None:
        """Lose packets the host receives (`in`) or sends (`out`), optionally only from/to `peer`.

        nftables (bridge family) in the switch namespace, so the loss happens on the wire:
        the host's own stack sees nothing (a drop in its OUTPUT hook would instead fail
        `sendto` with EPERM, which is a different fault). `numgen random mod 1000 < N` makes it
        probabilistic. Matching on IP addresses keeps working while the host is impaired.
        """
        if direction not in ("in", "out"):
            raise LabError(f"direction must be 'in' or 'out', not {direction!r}")
        if shutil.which("nft") is None:
            raise LabError("drop() needs nftables: apt-get install -y nftables")
        own, other = ("daddr", "saddr") if direction == "in" else ("saddr", "daddr")
        chain = self._drop_chain(host)
        rule: list[str] = ["ip", own, host.address]
        if peer is not None:
            rule += ["ip", other, peer.address]
        if protocol is not None:
            rule += ["meta", "l4proto", protocol]
        if probability < 1.0:
            rule += ["numgen", "random", "mod", "1000", "<", str(round(probability * 1000))]
        rule += ["counter", "drop"]
        self._nft("add", "rule", "bridge", NFT_TABLE, chain, *rule)

    def clear_drops(self, host: Host) -> None:
        self._nft("flush", "chain", "bridge", NFT_TABLE, self._drop_chain(host))

    def _drop_chain(self, host: Host) -> str:
        chain = f"drop_{host.name}"
        self._nft("add", "table", "bridge", NFT_TABLE)
        self._nft(
            "add", "chain", "bridge", NFT_TABLE, "forward",
            "{ type filter hook forward priority 0 ; policy accept ; }",
        )  # fmt: skip
        listed = self._nft("list", "chain", "bridge", NFT_TABLE, "forward").stdout
        if f"jump {chain}" not in listed:
            self._nft("add", "chain", "bridge", NFT_TABLE, chain)
            self._nft("add", "rule", "bridge", NFT_TABLE, "forward", "jump", chain)
        return chain

    def _nft(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", self.switch_ns, "nft", *args])

    # ------------------------------------------------------------------ talking to hosts
    def open_socket(
        self,
        host: Host,
        family: int = socket.AF_INET,
        kind: int = socket.SOCK_DGRAM,
        proto: int = 0,
    ) -> socket.socket:
        """A socket living in the host's namespace (a probe, a sniffer, an attacker).

        A socket stays in the namespace it was created in, so the test process can use it
        from any thread afterwards without touching the root namespace.
        """
        with _in_namespace(host.ns):
            return socket.socket(family, kind, proto)

    def http_get_text(self, host: Host, port: int, path: str, timeout: float = 2.0) -> str:
        """GET http://<host address>:<port><path> from inside the host's own namespace."""
        conn = _NamespacedHTTPConnection(host.ns, host.address, port, timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status != 200:
            raise LabError(f"GET {host.name}:{port}{path}: HTTP {response.status}")
        return body.decode()

    def http_get_json(self, host: Host, port: int, path: str, timeout: float = 2.0) -> Any:
        """GET http://<host address>:<port><path> (JSON) from inside the host's namespace."""
        return json.loads(self.http_get_text(host, port, path, timeout))

    def http_post_json(
        self, host: Host, port: int, path: str, payload: Any, timeout: float = 2.0
    ) -> Any:
        conn = _NamespacedHTTPConnection(host.ns, host.address, port, timeout)
        try:
            conn.request("POST", path, json.dumps(payload), {"Content-Type": "application/json"})
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status >= 300:
            raise LabError(f"POST {host.name}:{port}{path}: HTTP {response.status}: {body[:200]!r}")
        return json.loads(body)

    # ------------------------------------------------------------------ cleanup
    def close(self) -> None:
        """Kill our processes (by PID), stop impairers, delete our namespaces. Idempotent."""
        for proc in self.processes:
            if proc.running():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
                    os.kill(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()
        for name in list(self._impairments):
            imp = self._impairments.pop(name)
            if imp.relay.poll() is None:
                imp.relay.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                imp.relay.wait(timeout=10)
            for pipe in (imp.relay.stdin, imp.relay.stdout):
                if pipe is not None:
                    pipe.close()
        for ns in reversed(self._namespaces):
            run(["ip", "netns", "del", ns], check=False)
        self._namespaces.clear()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def lab(workdir: Path, tag: str = "") -> Iterator[Lab]:
    """A Lab that is torn down however the block ends, SIGTERM included (`_sigterm_unwinds`)."""
    remove_stale_labs()
    with _sigterm_unwinds():
        the_lab = Lab(workdir, tag)
        try:
            yield the_lab
        finally:
            the_lab.close()


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While the block runs, SIGTERM raises SystemExit(143) instead of ending the process.

    Its default action runs no `finally`, so a benchmark stopped by `timeout` or `kill` left
    its namespaces and every process in them running. Only where nobody handles SIGTERM
    already, and only on the main thread (the only one that may set handlers)."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def unwind(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
