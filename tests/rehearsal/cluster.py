"""Namespace "droplets" that run their rendered user_data against the emulated DigitalOcean.

Each droplet is a lab host (a network namespace on the lab's bridge, tests/chaos/netns.py)
with its own mounts and process tree (`droplet_init.py` is its PID 1). Before it boots,
the files of its user_data's `write_files` are laid into overlay layers for /etc and
/usr/local, together with what the machine image would bring: /etc/hosts pointing
api.digitalocean.com at the emulator, a CA bundle that trusts the emulator's CA, and a
`docker` that runs images as local processes (`docker_shim.py`, at /usr/bin/docker). Then
`runcmd` runs as cloud-init would run it; `systemctl` lines are interpreted (see
`start_unit`; the timer fires when the test says so, standing for its next tick).

What the droplet reaches: its own addresses, the other droplets and the emulator, all in
198.18.0.0/15 on the lab's bridge. Its traffic to the metadata address 169.254.169.254:80
is rewritten (nftables DNAT, inside its own namespace) to the emulator's metadata port,
which answers about whichever droplet the request comes from, so the sidecar runs with the
default `metadata_url`. The only setting the rehearsal adds to what user_data writes is the
CA file the sidecar trusts (the real image trusts DigitalOcean's CA through certifi).
"""

from __future__ import annotations

import http.client
import json
import os
import select
import shlex
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
from chaos.netns import Host, Lab, LabError, Process, run

from .render import UserData

HERE = Path(__file__).resolve().parent
SHIM = HERE / "docker_shim.py"
INIT = HERE / "droplet_init.py"
API_HOSTNAME = "api.digitalocean.com"
API_PORT = 443
METADATA_ADDRESS = "169.254.169.254"
METADATA_PORT = 80
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DROPLET_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
SIDECAR_USER = "10001:10001"
COMMAND_TIMEOUT = 60.0
READY_TIMEOUT = 30.0
DROPLET_LIFETIME = 1800.0
NFT_TABLE = "fipt_metadata"


def http_json(
    sock: socket.socket,
    host: str,
    method: str,
    path: str,
    body: Any = None,
    *,
    tls: ssl.SSLContext | None = None,
    timeout: float = 5.0,
) -> tuple[int, Any]:
    """One HTTP request over an already connected socket (made inside some namespace)."""
    sock.settimeout(timeout)
    if tls is not None:
        sock = tls.wrap_socket(sock, server_hostname=host)
    conn = http.client.HTTPConnection(host, timeout=timeout)
    conn.sock = sock
    try:
        payload = None if body is None else json.dumps(body)
        headers = {} if body is None else {"Content-Type": "application/json"}
        conn.request(method, path, payload, headers)
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    return response.status, json.loads(raw) if raw else None


class RehearsalAPI:
    """The emulator as the droplets see DigitalOcean: https://api.digitalocean.com (a
    certificate from a CA only the droplets trust) and the metadata service."""

    def __init__(self, lab: Lab, host: Host, token: str, scopes: Sequence[str]) -> None:
        self.lab = lab
        self.host = host
        self.token = token
        self.scopes = list(scopes)
        self.ca = trustme.CA()
        self.ca_pem = self.ca.cert_pem.bytes()
        self.process: Process | None = None
        self._tls = ssl.create_default_context()
        self.ca.configure_trust(self._tls)

    def start(self, reserved_ip: str, region: str, action_seconds: float) -> None:
        workdir = self.lab.workdir
        cert = self.ca.issue_cert(API_HOSTNAME)
        cert.private_key_and_cert_chain_pem.write_to_path(str(workdir / "api.pem"))
        token_file = workdir / "api-token"
        token_file.write_text(self.token + "\n")
        token_file.chmod(0o600)
        argv = [
            sys.executable, "-m", "sidecar.emulator",
            "--listen", f"{self.host.address}:{API_PORT}",
            "--metadata-listen", f"{self.host.address}:{METADATA_PORT}",
            "--tls-cert", str(workdir / "api.pem"), "--tls-key", str(workdir / "api.pem"),
            "--token-file", str(token_file), "--token-scopes", ",".join(self.scopes),
            "--reserved-ip", f"{reserved_ip}={region}",
            "--action-seconds", str(action_seconds),
        ]  # fmt: skip
        self.process = self.lab.spawn(self.host, "emulator", argv)
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            try:
                self.admin("GET", "/_emulator/state")
                return
            except (OSError, LabError):
                time.sleep(0.2)
        raise LabError(f"the emulator did not answer within {READY_TIMEOUT}s")

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        """An admin call (`/_emulator/...`) over https from inside the API's namespace."""
        sock = self.lab.open_socket(self.host, kind=socket.SOCK_STREAM)
        try:
            sock.settimeout(5.0)
            sock.connect((self.host.address, API_PORT))
        except OSError:
            sock.close()
            raise
        status, answer = http_json(sock, API_HOSTNAME, method, path, body, tls=self._tls)
        if status >= 300:
            raise LabError(f"{method} {path}: HTTP {status}: {answer}")
        return answer

    def holder(self, reserved_ip: str) -> int | None:
        for entry in self.admin("GET", "/_emulator/state")["reserved_ips"]:
            if entry["ip"] == reserved_ip:
                droplet: int | None = entry["droplet_id"]
                return droplet
        return None

    def history(self, reserved_ip: str) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = self.admin(
            "GET", f"/_emulator/history?reserved_ip={reserved_ip}"
        )
        return entries


@dataclass
class UnitRun:
    """One run of a systemd service's ExecStart, judged as systemd would judge it."""

    unit: str
    returncode: int
    output: str
    success_statuses: frozenset[int]
    started: float
    finished: float

    @property
    def seconds(self) -> float:
        return self.finished - self.started

    @property
    def systemd_success(self) -> bool:
        return self.returncode == 0 or self.returncode in self.success_statuses


@dataclass
class Droplet:
    """One droplet: addresses, the files of its user_data, and its processes."""

    lab: Lab
    host: Host
    droplet_id: int
    private_address: str | None
    user_data: UserData
    api: RehearsalAPI
    images: Mapping[str, Mapping[str, Any]]
    root: Path = field(init=False)
    init: Process | None = None
    init_pid: int | None = None
    unit_runs: list[UnitRun] = field(default_factory=list)
    services: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = self.lab.workdir / "droplets" / self.host.name

    @property
    def node_id(self) -> int:
        return self.user_data.node_id

    @property
    def cluster(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(
            self.user_data.files["/etc/fip-sidecar/cluster.json"]["content"]
        )
        return loaded

    # ------------------------------------------------------------------ the disk

    def layer(self, target: str) -> Path:
        return self.root / target.strip("/").replace("/", "-") / "upper"

    def _overlay_targets(self) -> list[str]:
        targets = ["/etc", "/usr/local", "/usr/bin"]
        # The stand-in image's interpreter may live under a directory the sidecar's user
        # cannot enter (/root on these machines); the droplet gets a traversable copy.
        for parent in Path(os.path.realpath(sys.executable)).parents:
            if parent != Path("/") and not parent.stat().st_mode & 0o001:
                targets.append(str(parent))
        return targets

    def lay_out_files(self) -> None:
        """user_data's write_files, plus what the machine image brings, into the layers."""
        for target in self._overlay_targets():
            upper = self.layer(target)
            upper.mkdir(parents=True)
            (upper.parent / "work").mkdir()
            upper.chmod(Path(target).stat().st_mode & 0o7777 | 0o011)
        etc, usr_local = self.layer("/etc"), self.layer("/usr/local")
        for entry in self.user_data.document["write_files"]:
            path = Path(entry["path"])
            top = next((t for t in ("/etc", "/usr/local") if path.is_relative_to(t)), None)
            if top is None:
                raise LabError(f"write_files outside /etc and /usr/local: {path}")
            destination = self.layer(top) / path.relative_to(top)
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_text(entry["content"])
            destination.chmod(int(entry.get("permissions", "0644"), 8))
        hosts = Path("/etc/hosts").read_text()
        (etc / "hosts").write_text(f"{hosts.rstrip()}\n{self.api.host.address} {API_HOSTNAME}\n")
        certs = etc / "ssl" / "certs"
        certs.mkdir(parents=True, exist_ok=True)
        bundle = HOST_CA_BUNDLE.read_bytes() if HOST_CA_BUNDLE.exists() else b""
        (certs / "ca-certificates.crt").write_bytes(bundle + b"\n" + self.api.ca_pem)
        # Docker where the docker.io package puts it, and over any docker this machine has
        # in /usr/local/bin (which comes first on PATH).
        for shim in (self.layer("/usr/bin") / "docker", usr_local / "bin" / "docker"):
            shim.parent.mkdir(parents=True, exist_ok=True)
            shim.write_text(SHIM.read_text())
            shim.chmod(0o755)
        home = usr_local / "lib" / "docker-shim"
        home.mkdir(parents=True, exist_ok=True)
        (home / "images.json").write_text(json.dumps(self.images))

    # ------------------------------------------------------------------ the machine

    def plug_in(self) -> None:
        """The private address, and the route and DNAT to the metadata service."""
        ns = self.host.ns
        if self.private_address is not None:
            run(["ip", "-n", ns, "addr", "add", f"{self.private_address}/24", "dev", "eth0"])
        run(["ip", "-n", ns, "route", "add", f"{METADATA_ADDRESS}/32", "dev", "eth0"])
        nft = ["ip", "netns", "exec", ns, "nft"]
        run([*nft, "add", "table", "ip", NFT_TABLE])
        run([*nft, "add", "chain", "ip", NFT_TABLE, "out",
             "{ type nat hook output priority -100 ; }"])  # fmt: skip
        run([*nft, "add", "rule", "ip", NFT_TABLE, "out",
             "ip", "daddr", METADATA_ADDRESS, "tcp", "dport", str(METADATA_PORT),
             "dnat", "to", f"{self.api.host.address}:{METADATA_PORT}"])  # fmt: skip

    def boot(self) -> None:
        """Lay out the disk, plug in the network and start PID 1 (bounded)."""
        self.lay_out_files()
        self.plug_in()
        overlays = [
            {"target": t, "upper": str(self.layer(t)), "work": str(self.layer(t).parent / "work")}
            for t in self._overlay_targets()
        ]
        config = json.dumps({"overlays": overlays, "max_seconds": DROPLET_LIFETIME})
        argv = [
            "unshare", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc",
            "--propagation", "private", "--", "/usr/bin/python3", str(INIT), config,
        ]  # fmt: skip
        self.init = self.lab.spawn(self.host, f"{self.host.name}-init", argv, capture_stdout=True)
        assert self.init.stdout is not None
        ready, _, _ = select.select([self.init.stdout], [], [], READY_TIMEOUT)
        if not ready or self.init.stdout.readline().strip() != b"ready":
            raise LabError(f"{self.host.name}: PID 1 did not start (see its log)")
        children = Path(f"/proc/{self.init.pid}/task/{self.init.pid}/children").read_text()
        self.init_pid = int(children.split()[0])

    def destroy(self) -> None:
        """Power off: PID 1 dies and the kernel ends every process of the droplet (the
        `nsenter` parents of its services, outside it, then end too)."""
        if self.init is not None:
            self.lab.kill(self.init)
        for service in self.services:
            try:
                service.wait(timeout=10)
            except subprocess.TimeoutExpired:
                service.kill()
                service.wait(timeout=10)
        self.services.clear()

    def _nsenter(self, argv: Sequence[str]) -> list[str]:
        if self.init_pid is None:
            raise LabError(f"{self.host.name} has not booted")
        return ["nsenter", "-t", str(self.init_pid), "-m", "-p", "-n", "--", *argv]

    def run(
        self, argv: Sequence[str], *, timeout: float = COMMAND_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """A command on the droplet (its mounts, processes and network), as root."""
        try:
            return subprocess.run(
                self._nsenter(argv),
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd="/",
                env={"PATH": SYSTEM_PATH, "LANG": "C.UTF-8"},
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise LabError(f"{self.host.name}: timed out after {timeout}s: {argv}") from None

    # ------------------------------------------------------------------ cloud-init, systemd

    def unit_file(self, unit: str) -> dict[str, list[str]] | None:
        """The unit's settings (each key's values in order), None if user_data has none."""
        path = self.layer("/etc") / "systemd" / "system" / unit
        if not path.exists():
            return None
        settings: dict[str, list[str]] = {}
        for line in path.read_text().splitlines():
            key, sep, value = line.strip().partition("=")
            if sep and not key.startswith(("#", ";")):
                settings.setdefault(key, []).append(value)
        return settings

    def start_unit(self, unit: str) -> UnitRun | None:
        """`systemctl start UNIT`. A oneshot service runs ExecStart to its end and is judged
        by its status; a simple one runs ExecStartPre, then ExecStart in the background (its
        output in `unit-NAME.log`; Restart= is not emulated). Units that come with the
        machine image (docker.service) are already running; a timer fires when told."""
        settings = self.unit_file(unit)
        if settings is None:
            if unit == "docker.service":
                return None
            raise LabError(f"{self.host.name}: user_data has no unit {unit}")
        if unit.endswith(".timer"):
            return None
        kind = settings.get("Type", ["simple"])[-1]
        for line in settings.get("ExecStartPre", []):
            done = self.run(shlex.split(line.removeprefix("-")))
            if done.returncode != 0 and not line.startswith("-"):
                raise LabError(f"{self.host.name}: {unit} ExecStartPre failed: {done.stderr}")
        (command,) = settings["ExecStart"]
        if kind != "oneshot":
            log = (self.root / f"unit-{unit}.log").open("ab")
            self.services.append(
                subprocess.Popen(
                    self._nsenter(shlex.split(command)),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    cwd="/",
                    env={"PATH": SYSTEM_PATH, "LANG": "C.UTF-8"},
                )
            )
            log.close()
            return None
        success = frozenset(int(s) for s in " ".join(settings.get("SuccessExitStatus", [])).split())
        started = time.monotonic()
        done = self.run(shlex.split(command))
        output = done.stdout + done.stderr
        result = UnitRun(unit, done.returncode, output, success, started, time.monotonic())
        self.unit_runs.append(result)
        return result

    def fire_timer(self, timer: str = "fip-sidecar-apply.timer") -> UnitRun:
        """The timer's next tick: it starts the (oneshot) service of the same name."""
        run = self.start_unit(timer.removesuffix(".timer") + ".service")
        if run is None:
            raise LabError(f"{timer} does not start a oneshot service")
        return run

    def run_cloud_init(self) -> None:
        """user_data's runcmd, in order; a failing command fails the rehearsal."""
        for command in self.user_data.document["runcmd"]:
            argv = [str(part) for part in command]
            if argv[0] == "systemctl":
                verb, units = argv[1], [a for a in argv[2:] if not a.startswith("--")]
                if verb == "start" or (verb == "enable" and "--now" in argv):
                    for unit in units:
                        self.start_unit(unit)
                elif verb not in ("enable", "daemon-reload"):
                    raise LabError(f"the rehearsal does not interpret {argv}")
                continue
            done = self.run(argv)
            if done.returncode != 0:
                raise LabError(f"{self.host.name}: runcmd {argv}: {done.stderr.strip()}")

    # ------------------------------------------------------------------ what runs on it

    def container(self, name: str) -> Path:
        return self.layer("/usr/local") / "lib" / "docker-shim" / "containers" / name

    def container_events(self, name: str = "fip-sidecar") -> list[str]:
        path = self.container(name) / "events"
        return (
            [line.split(" ", 1)[1] for line in path.read_text().splitlines()]
            if path.exists()
            else []
        )

    def container_log(self, name: str = "fip-sidecar") -> str:
        path = self.container(name) / "log"
        return path.read_text(errors="replace") if path.exists() else ""

    def main_pid(self, name: str = "fip-sidecar") -> int | None:
        """The host's PID of the container's main process (it has another in the droplet)."""
        try:
            inner = int((self.container(name) / "main.pid").read_text())
        except (OSError, ValueError):
            return None
        assert self.init_pid is not None
        namespace = os.readlink(f"/proc/{self.init_pid}/ns/pid")
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") != namespace:
                    continue
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("NSpid:") and int(line.split()[-1]) == inner:
                    return int(entry)
        return None

    def status(self, timeout: float = 1.0) -> dict[str, Any] | None:
        """The sidecar's /status, from inside the droplet (status_listen is its loopback)."""
        address, _, port = self.cluster["status_listen"].rpartition(":")
        sock = self.lab.open_socket(self.host, kind=socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect((address, int(port)))
            code, answer = http_json(sock, address, "GET", "/status", timeout=timeout)
        except (OSError, ValueError):
            sock.close()
            return None
        return answer if code == 200 and isinstance(answer, dict) else None
