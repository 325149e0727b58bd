"""The docker-compose local cluster (compose/compose.yaml), brought up for real.

One long test walks through what the README shows a user, on real containers: the cluster
comes up and node 1 ends up holding the floating IP; failing node 1's web service hands the
IP to node 2 (health hand-over); crashing node 2's sidecar (SIGKILL to its process, which
Docker's restart policy then restarts) hands it back to node 1; stopping node 1's web
container (the droplet's network namespace) moves it to node 2 again; and the documented
recovery (start the web container, restart its sidecar) brings node 1 back, which takes the
IP back after its preempt delay. Each step is checked where a user would look: the
emulator's assignment history (who held the IP and since when) and a `curl` through the
edge. The sidecars' own logs must show no two leaders at any instant.

How it talks to the cluster: the edge and the emulator's API are published on 127.0.0.1
(ports picked free here), the API over https with the CA that compose/make-secrets.sh made;
a sidecar's status port stays inside its namespace and is read with `docker exec`.
Containers share the host's CLOCK_MONOTONIC, so `time.monotonic()` here compares directly
with the emulator's `*_monotonic` history times and the sidecars' `at_mono` log fields.

Set-up and clean-up: `docker/ensure-docker.sh` (installs and starts an engine if none
answers), then `docker/build-image.sh` for each of the two images (`fip-sidecar:local`,
the production image the sidecars and web services run, and `fip-sidecar-emulator:local`,
built with the `emulator` extra, for the emulator) only when it is missing or older
than a file of its build context (set FIP_REBUILD_IMAGE=1 to force a build). Secrets go to
a temporary directory; the project name is unique, and `down -v --remove-orphans` plus a
check that the network is gone run in a `finally`, whatever happened. Every wait is bounded.
Timings are printed (run with -s), never asserted: this is a shared 2-core machine.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

from sidecar.config import Config, load
from sidecar.localcluster import Event, leadership_intervals, overlaps
from sidecar.protocol import generate_cluster_key, parse_cluster_key

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
IMAGE = "fip-sidecar:local"
EMULATOR_IMAGE = "fip-sidecar-emulator:local"
#: Each image and the extras it is built with.
IMAGES = {IMAGE: "", EMULATOR_IMAGE: "emulator"}
SUBNET = ipaddress.IPv4Network("198.18.10.0/24")
#: What docker/Dockerfile copies into the image: a newer file here means a stale image.
BUILD_CONTEXT = (
    "pyproject.toml",
    "README.md",
    "sidecar",
    "docker/Dockerfile",
    "docker/healthcheck.py",
)
DROPLET = {1: 1001, 2: 1002, 3: 1003}
#: The reserved addresses the compose cluster serves (one per family), each with its edge.
RESERVED_ADDRESSES = ("203.0.113.10", "2001:db8::10")
SIDECAR_NODE = {"sidecar1": 1, "sidecar2": 2, "sidecar3": 3}
STATUS_URL_PORT = 9401

T = TypeVar("T")


def run(
    args: list[str], *, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, env=env
    )


def docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run(["docker", *args], timeout=timeout)


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.1) -> T:
    """Poll `probe` until it returns something other than None; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------- engine and image


def compose_command() -> list[str] | None:
    """docker-compose v1 (Debian's), else the `docker compose` v2 plugin, else None."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if run(["docker", "compose", "version"]).returncode == 0:
        return ["docker", "compose"]
    return None


def newest_context_mtime() -> float:
    newest = 0.0
    for name in BUILD_CONTEXT:
        path = ROOT / name
        files = [path] if path.is_file() else path.rglob("*")
        for file in files:
            if file.is_file() and "__pycache__" not in file.parts:
                newest = max(newest, file.stat().st_mtime)
    return newest


def image_created(image: str) -> float | None:
    """The image's creation time (epoch seconds), None if there is no such image."""
    found = docker("image", "inspect", "--format", "{{.Created}}", image)
    if found.returncode != 0:
        return None
    text = found.stdout.strip()  # RFC 3339 with nanoseconds, e.g. 2026-11-29T17:33:12.6498Z
    head, _, fraction = text.removesuffix("Z").partition(".")
    created = dt.datetime.fromisoformat(head).replace(tzinfo=dt.UTC)
    return created.timestamp() + float(f"0.{fraction or 0}")


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    """An engine that answers and both images no older than their sources; prints what it
    took. Returns the images by what they are for."""
    if os.geteuid() != 0 and run(["docker", "info"]).returncode != 0:
        pytest.skip("no Docker engine, and not root to start one")
    started = time.monotonic()
    ensure = run(["bash", str(ROOT / "docker" / "ensure-docker.sh")], timeout=900)
    assert ensure.returncode == 0, ensure.stderr
    print(f"\nensure-docker: {time.monotonic() - started:.1f} s")
    for image, extras in IMAGES.items():
        created = image_created(image)
        stale = created is None or created < newest_context_mtime()
        if stale or os.environ.get("FIP_REBUILD_IMAGE") == "1":
            started = time.monotonic()
            build = run(
                ["bash", str(ROOT / "docker" / "build-image.sh"), image],
                timeout=1500,
                env={**os.environ, "EXTRAS": extras},
            )
            assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
            print(f"build-image {image}: {time.monotonic() - started:.1f} s")
        else:
            print(f"{image} is newer than its build context: not rebuilt")
    return {"sidecar": IMAGE, "emulator": EMULATOR_IMAGE}


# --------------------------------------------------------------------------- the cluster


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def subnet_in_use() -> str | None:
    """The name of an existing Docker network whose subnet overlaps the cluster's, if any."""
    ids = docker("network", "ls", "--quiet").stdout.split()
    if not ids:
        return None
    inspected = docker("network", "inspect", *ids)
    for network in json.loads(inspected.stdout or "[]"):
        for config in (network.get("IPAM") or {}).get("Config") or []:
            subnet = config.get("Subnet")
            if subnet and ipaddress.ip_network(subnet, strict=False).overlaps(SUBNET):
                return str(network["Name"])
    return None


class ComposeCluster:
    """One compose project of compose/compose.yaml, with ways to observe and disturb it."""

    def __init__(self, compose: list[str], secrets_dir: Path, images: dict[str, str]) -> None:
        self.project = f"fiptest{uuid.uuid4().hex[:10]}"
        self.compose = [*compose, "--project-name", self.project, "--file", str(COMPOSE_FILE)]
        self.edge_port = free_loopback_port()
        self.edge6_port = free_loopback_port()
        self.api_port = free_loopback_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "FIP_"))},
            "FIP_SECRETS_DIR": str(secrets_dir),
            "FIP_EDGE_PORT": str(self.edge_port),
            "FIP_EDGE6_PORT": str(self.edge6_port),
            "FIP_API_PORT": str(self.api_port),
            "FIP_IMAGE": images["sidecar"],
            "FIP_EMULATOR_IMAGE": images["emulator"],
        }
        self.edge = httpx.Client(
            base_url=f"http://127.0.0.1:{self.edge_port}", trust_env=False, timeout=3.0
        )
        #: The edge of the reserved IPv6 (2001:db8::10), published on 127.0.0.1 like the
        #: IPv4's: what it forwards to is chosen by the address it serves, not by the family
        #: the client speaks.
        self.edge6 = httpx.Client(
            base_url=f"http://127.0.0.1:{self.edge6_port}", trust_env=False, timeout=3.0
        )
        self.api = httpx.Client(
            base_url=f"https://127.0.0.1:{self.api_port}",
            verify=ssl.create_default_context(cafile=str(secrets_dir / "emulator_ca")),
            trust_env=False,
            timeout=3.0,
        )
        self._ids: dict[str, str] = {}

    # ------------------------------------------------------------------ lifecycle

    def run_compose(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return run([*self.compose, *args], timeout=timeout, env=self.env)

    def up(self) -> None:
        result = self.run_compose("up", "--detach", timeout=900)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    def down(self) -> None:
        """Remove containers, volumes and the network, by force if compose could not;
        then fail if anything was left behind."""
        self.edge.close()
        self.edge6.close()
        self.api.close()
        problem = ""
        try:
            result = self.run_compose(
                "down", "--volumes", "--remove-orphans", "--timeout", "10", timeout=600
            )
            if result.returncode != 0:
                problem = f"compose down failed: {result.stderr[-2000:]}"
        except subprocess.TimeoutExpired:
            problem = "compose down timed out"
        label = f"label=com.docker.compose.project={self.project}"
        leftovers = docker("ps", "--all", "--quiet", "--filter", label).stdout.split()
        for container in leftovers:
            docker("rm", "--force", "--volumes", container)
        network = f"{self.project}_fip"
        if docker("network", "inspect", network).returncode == 0:
            docker("network", "rm", network)
            problem = problem or f"{network} was left behind"
        assert not problem, problem
        assert not leftovers, f"containers left after down: {leftovers}"
        assert docker("network", "inspect", network).returncode != 0, f"cannot remove {network}"

    def container(self, service: str) -> str:
        if service not in self._ids:
            found = self.run_compose("ps", "--quiet", service, timeout=60).stdout.split()
            assert len(found) == 1, f"{service}: expected one container, found {found}"
            self._ids[service] = found[0]
        return self._ids[service]

    def inspect(self, service: str, template: str) -> str:
        return docker("inspect", "--format", template, self.container(service)).stdout.strip()

    def logs(self, service: str) -> str:
        result = docker("logs", self.container(service), timeout=60)
        return result.stdout + result.stderr

    def diagnostics(self) -> str:
        parts = [self.run_compose("ps", timeout=60).stdout]
        for service in ("emulator", "sidecar1", "sidecar2", "sidecar3"):
            with_logs = self.run_compose("logs", "--no-color", "--tail", "15", service, timeout=60)
            parts.append(with_logs.stdout[-3000:])
        return "\n".join(parts)

    # ------------------------------------------------------------------ observing

    def history(self) -> list[dict[str, Any]]:
        response = self.api.get("/_emulator/history")
        response.raise_for_status()
        entries = response.json()
        assert isinstance(entries, list)
        return entries

    def holder_entry(self, droplet: int, since: float) -> dict[str, Any] | None:
        """The newest history entry that gave an address to `droplet`, requested after
        `since` (CLOCK_MONOTONIC), once every reserved address's latest completed entry
        gives it to `droplet` (the leader holds them all); else None."""
        try:
            entries = self.history()
        except httpx.HTTPError:
            return None
        latest = {entry["reserved_ip"]: entry for entry in entries}
        if set(latest) != set(RESERVED_ADDRESSES):
            return None
        if all(entry["droplet_id"] == droplet for entry in latest.values()):
            newest = max(latest.values(), key=lambda entry: entry["completed_monotonic"])
            if newest["requested_monotonic"] > since:
                return newest
        return None

    def wait_for_holder(self, droplet: int, since: float, timeout: float) -> dict[str, Any]:
        return wait_for(
            f"the IP on droplet {droplet}",
            lambda: self.holder_entry(droplet, since),
            timeout,
            interval=0.1,
        )

    def edge_answer(self, edge: httpx.Client) -> str | None:
        try:
            response = edge.get("/")
        except httpx.HTTPError:
            return None
        return response.text if response.status_code == 200 else None

    def wait_for_edge(self, droplet: int, timeout: float) -> float:
        """Until a `curl` of both edges (IPv4 and IPv6) answers from `droplet`; the
        monotonic time the second of them did."""
        seen: dict[str, float] = {}

        def probe() -> float | None:
            for family, edge in (("ipv4", self.edge), ("ipv6", self.edge6)):
                answer = self.edge_answer(edge)
                if family not in seen and answer and f"droplet {droplet} " in answer:
                    seen[family] = time.monotonic()
            return max(seen.values()) if len(seen) == 2 else None

        return wait_for(f"both edges to answer from droplet {droplet}", probe, timeout, 0.05)

    def node_status(self, service: str) -> dict[str, Any] | None:
        """The sidecar's /status, read inside its namespace (the port is not published)."""
        script = (
            "import http.client as h; c = h.HTTPConnection('127.0.0.1', "
            f"{STATUS_URL_PORT}, timeout=2); c.request('GET', '/status'); "
            "print(c.getresponse().read().decode())"
        )
        result = docker("exec", self.container(service), "python3", "-c", script, timeout=30)
        if result.returncode != 0:
            return None
        try:
            body = json.loads(result.stdout)
        except json.JSONDecodeError:
            return None
        return body if isinstance(body, dict) else None

    def wait_for_status(
        self, service: str, wanted: Callable[[dict[str, Any]], bool], what: str, timeout: float
    ) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            body = self.node_status(service)
            return body if body is not None and wanted(body) else None

        return wait_for(f"{service}: {what}", probe, timeout, interval=0.5)

    def web_post(self, service: str, path: str) -> str:
        """POST to a web service inside its own namespace (e.g. /recover)."""
        script = (
            "import http.client as h; c = h.HTTPConnection('127.0.0.1', 8080, timeout=2); "
            f"c.request('POST', '{path}'); print(c.getresponse().read().decode())"
        )
        result = docker("exec", self.container(service), "python3", "-c", script, timeout=30)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def sidecar_events(self, service: str) -> list[Event]:
        """Every JSON log line of the sidecar, across restarts of its container."""
        events: list[Event] = []
        for line in self.logs(service).splitlines():
            if line.startswith("{"):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict):
                    events.append(record)
        return sorted(events, key=lambda e: float(e.get("mono", 0.0)))


@pytest.fixture
def cluster(images: dict[str, str], tmp_path: Path) -> Iterator[ComposeCluster]:
    compose = compose_command()
    if compose is None:
        pytest.skip("neither docker-compose nor the docker compose plugin is installed")
    taken_by = subnet_in_use()
    if taken_by is not None:
        pytest.skip(f"Docker network {taken_by!r} already uses {SUBNET} (a cluster is up?)")
    secrets_dir = tmp_path / "secrets"
    made = run(["bash", str(COMPOSE_DIR / "make-secrets.sh"), str(secrets_dir)])
    assert made.returncode == 0, made.stderr
    cluster = ComposeCluster(compose, secrets_dir, images)
    try:
        yield cluster
    finally:
        started = time.monotonic()
        cluster.down()
        print(f"down: {time.monotonic() - started:.1f} s")


# --------------------------------------------------------------------------- static checks
# These need no engine: they read the files a user runs and check that they agree.


def compose_spec() -> dict[str, Any]:
    spec = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(spec, dict)
    return spec


def node_config(node: int) -> Config:
    """compose/nodeN.toml as the sidecar loads it (the key comes from the environment here,
    as the file at /run/secrets/cluster_key exists only in the container)."""
    key = generate_cluster_key()
    return load(COMPOSE_DIR / f"node{node}.toml", env={"FIP_SIDECAR_CLUSTER_KEY": key})


def emulator_flags(spec: dict[str, Any], flag: str) -> list[str]:
    prefix = f"--{flag}="
    return [
        a[len(prefix) :] for a in spec["services"]["emulator"]["command"] if a.startswith(prefix)
    ]


def test_compose_file_is_in_compose_specification_form() -> None:
    spec = compose_spec()
    # docker-compose 1.29 rejects a top-level `name`; `version` is obsolete in the spec.
    assert set(spec) <= {"services", "networks", "secrets", "volumes"} | {
        k for k in spec if k.startswith("x-")
    }
    assert "$" not in json.dumps(spec).replace("${", "")  # only ${VAR:-default} interpolation


def test_each_droplet_is_a_web_container_and_a_sidecar_in_its_namespace() -> None:
    services = compose_spec()["services"]
    subnet = ipaddress.IPv4Network(compose_spec()["networks"]["fip"]["ipam"]["config"][0]["subnet"])
    assert subnet == SUBNET and subnet.subnet_of(ipaddress.IPv4Network("198.18.0.0/15"))
    for node in (1, 2, 3):
        web, sidecar = services[f"web{node}"], services[f"sidecar{node}"]
        address = ipaddress.ip_address(web["networks"]["fip"]["ipv4_address"])
        assert address in subnet
        assert sidecar["network_mode"] == f"service:web{node}"
        assert "ports" not in sidecar and "ports" not in web  # status stays in the namespace
        config = node_config(node)
        assert str(config.bind) == f"{address}:7401"
        assert config.status_listen.host == "127.0.0.1"
        assert f"./node{node}.toml:/etc/fip-sidecar/config.toml:ro" in sidecar["volumes"]


def test_node_configs_agree_on_membership_and_the_witness() -> None:
    configs = {node: node_config(node) for node in (1, 2, 3)}
    for node, config in configs.items():
        assert config.eligible is (node != 3)
        for peer in config.peers:
            assert str(config.peer_addresses[peer.id]) == str(configs[peer.id].bind)
            assert peer.eligible is configs[peer.id].eligible
    assert configs[3].floating_ip is None  # the witness never calls the API ...
    assert (
        "do_token" not in compose_spec()["services"]["sidecar3"]["secrets"]
    )  # ... nor holds a token


def test_sidecars_reach_the_emulator_over_https_with_the_private_ca() -> None:
    spec = compose_spec()
    ips = dict(spec_ip.split("=") for spec_ip in emulator_flags(spec, "reserved-ip"))
    droplets = {int(d.split("=")[0]): d.split("=", 2)[1:] for d in emulator_flags(spec, "droplet")}
    for node in (1, 2):
        config = node_config(node)
        assert config.digitalocean.api_url == "https://emulator:8443"
        assert config.digitalocean.ca_file == "/run/secrets/emulator_ca"
        assert not config.digitalocean.allow_insecure_http
        assert config.floating_ip is not None
        assert config.floating_ip.droplet_id == DROPLET[node]
        assert config.health.http == "http://127.0.0.1:8080/healthz"
        assert ips[config.floating_ip.address] == droplets[DROPLET[node]][0]  # same region
        web_ip = spec["services"][f"web{node}"]["networks"]["fip"]["ipv4_address"]
        assert droplets[DROPLET[node]][1] == f"http://{web_ip}:8080"
    assert droplets[DROPLET[3]][0] not in ips.values()  # the witness is in another region
    assert emulator_flags(spec, "tls-cert") and emulator_flags(spec, "tls-key")


def test_only_the_emulator_runs_the_image_with_the_emulator_extra() -> None:
    """The sidecars must run what a deployment runs: the image without the web framework."""
    services = compose_spec()["services"]
    images = {name: service["image"] for name, service in services.items()}
    assert images.pop("emulator") == "${FIP_EMULATOR_IMAGE:-" + EMULATOR_IMAGE + "}"
    assert set(images.values()) == {"${FIP_IMAGE:-" + IMAGE + "}"}
    # The file says how to build both, the way this test does.
    assert f"EXTRAS=emulator docker/build-image.sh {EMULATOR_IMAGE}" in COMPOSE_FILE.read_text()


def test_only_the_edge_and_the_api_are_published_and_only_on_loopback() -> None:
    services = compose_spec()["services"]
    published = {name: s.get("ports", []) for name, s in services.items() if s.get("ports")}
    assert list(published) == ["emulator"]
    assert all(port.startswith("127.0.0.1:") for port in published["emulator"])
    assert [port.rsplit(":", 1)[1] for port in published["emulator"]] == ["8000", "8001", "8443"]


def test_secrets_are_files_outside_the_compose_file_and_git_ignored() -> None:
    spec = compose_spec()
    for name, secret in spec["secrets"].items():
        assert set(secret) == {"file"}, name
        assert secret["file"] == "${FIP_SECRETS_DIR:-./secrets}/" + name
    assert "/secrets/" in (COMPOSE_DIR / ".gitignore").read_text().split()
    ignored = run(["git", "-C", str(ROOT), "check-ignore", "-q", "compose/secrets/do_token"])
    assert ignored.returncode == 0


def test_docker_compose_accepts_the_file(tmp_path: Path) -> None:
    if not shutil.which("docker-compose"):
        pytest.skip("docker-compose is not installed (docker/ensure-docker.sh installs it)")
    env = {**os.environ, "FIP_SECRETS_DIR": str(tmp_path)}
    checked = run(["docker-compose", "--file", str(COMPOSE_FILE), "config", "--quiet"], env=env)
    assert checked.returncode == 0, checked.stderr


def tls_handshake(secrets_dir: Path, server_name: str) -> None:
    """A real TLS handshake in memory: the emulator's certificate and key on one side, the
    sidecar's way of trusting the CA (`ssl.create_default_context(cafile=...)`) on the other."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(secrets_dir / "emulator_cert", secrets_dir / "emulator_key")
    client_context = ssl.create_default_context(cafile=str(secrets_dir / "emulator_ca"))
    pipes = [ssl.MemoryBIO() for _ in range(4)]
    client = client_context.wrap_bio(pipes[0], pipes[1], server_hostname=server_name)
    server = server_context.wrap_bio(pipes[2], pipes[3], server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, end in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        pipes[2].write(pipes[1].read())  # client -> server
        pipes[0].write(pipes[3].read())  # server -> client
        if all(done.values()):
            return
    raise AssertionError("TLS handshake did not finish")


def test_make_secrets_makes_what_the_containers_read(tmp_path: Path) -> None:
    secrets_dir = tmp_path / "secrets"
    made = run(["bash", str(COMPOSE_DIR / "make-secrets.sh"), str(secrets_dir)])
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in secrets_dir.iterdir()) == sorted(compose_spec()["secrets"])
    assert secrets_dir.stat().st_mode & 0o777 == 0o700
    for path in secrets_dir.iterdir():
        mode = path.stat().st_mode & 0o777
        if os.geteuid() == 0:
            assert (path.stat().st_uid, mode) == (10001, 0o400), path.name
        else:
            assert mode == 0o444, path.name
    assert len(parse_cluster_key((secrets_dir / "cluster_key").read_text())) == 32
    token = (secrets_dir / "do_token").read_text().strip()
    assert token.startswith("dop_v1_") and len(token) == 71
    for name in ("emulator", "198.18.10.2", "127.0.0.1", "localhost"):
        tls_handshake(secrets_dir, name)
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_handshake(secrets_dir, "api.digitalocean.com")

    # Idempotent: a complete set is kept; --force makes a new one.
    again = run(["bash", str(COMPOSE_DIR / "make-secrets.sh"), str(secrets_dir)])
    assert again.returncode == 0 and (secrets_dir / "do_token").read_text().strip() == token
    forced = run(["bash", str(COMPOSE_DIR / "make-secrets.sh"), "--force", str(secrets_dir)])
    assert forced.returncode == 0 and (secrets_dir / "do_token").read_text().strip() != token
    assert sorted(p.name for p in secrets_dir.iterdir()) == sorted(compose_spec()["secrets"])


# --------------------------------------------------------------------------- the test


def report(label: str, fault_at: float, entry: dict[str, Any], edge_at: float) -> None:
    print(
        f"{label}: assign requested after {entry['requested_monotonic'] - fault_at:.2f} s, "
        f"IP moved (action completed) after {entry['completed_monotonic'] - fault_at:.2f} s, "
        f"both edges answered from droplet {entry['droplet_id']} after {edge_at - fault_at:.2f} s"
    )


def is_healthy_follower_of(leader: int) -> Callable[[dict[str, Any]], bool]:
    return lambda s: bool(s.get("healthy") and s.get("viable") and s.get("leader_id") == leader)


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_compose_cluster_fails_over_and_back(cluster: ComposeCluster) -> None:
    try:
        walk_through(cluster)
    except BaseException:
        print(cluster.diagnostics())
        raise


def walk_through(cluster: ComposeCluster) -> None:
    # --- up: node 1 ends up holding the IP (directly, or by pre-emption after preempt_delay
    # if node 2 turned healthy first).
    began = time.monotonic()
    cluster.up()
    up_done = time.monotonic()
    first = cluster.wait_for_holder(DROPLET[1], since=began, timeout=240)
    history = cluster.history()
    edge_at = cluster.wait_for_edge(DROPLET[1], timeout=30)
    print(
        f"\nup -d: {up_done - began:.1f} s; first assignment (droplet "
        f"{history[0]['droplet_id']}) {history[0]['completed_monotonic'] - began:.1f} s; "
        f"IP on droplet 1001 {first['completed_monotonic'] - began:.1f} s "
        f"({len(history)} assignment(s)); edge answers from 1001 {edge_at - began:.1f} s"
    )
    cluster.wait_for_status("sidecar2", is_healthy_follower_of(1), "follows node 1", 60)
    cluster.wait_for_status("sidecar3", lambda s: s.get("leader_id") == 1, "follows node 1", 60)

    # --- health hand-over: fail the service that answers for the IP (through the edge).
    fault_at = time.monotonic()
    answer = cluster.edge.post("/fail")
    assert answer.status_code == 200 and "droplet 1001 " in answer.text, answer.text
    entry = cluster.wait_for_holder(DROPLET[2], since=fault_at, timeout=60)
    report(
        "health hand-over (POST /fail to node 1's web)",
        fault_at,
        entry,
        cluster.wait_for_edge(DROPLET[2], 30),
    )

    # --- crash: node 1 healthy again (it follows node 2: pre-emption waits 30 s), then
    # SIGKILL node 2's sidecar process. Docker's restart policy starts it again.
    assert "now passes" in cluster.web_post("web1", "/recover")
    cluster.wait_for_status("sidecar1", is_healthy_follower_of(2), "healthy follower of 2", 60)
    restarts_before = int(cluster.inspect("sidecar2", "{{.RestartCount}}"))
    holder = cluster.history()[-1]["droplet_id"]
    assert holder == DROPLET[2], "node 1 pre-empted node 2 before the crash could be staged"
    pid = int(cluster.inspect("sidecar2", "{{.State.Pid}}"))
    assert pid > 0
    fault_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)  # the container's main process, by PID: a crash
    killed_at = {2: [time.monotonic()]}  # node 2 led until at the latest here
    entry = cluster.wait_for_holder(DROPLET[1], since=fault_at, timeout=60)
    report(
        "crash (SIGKILL node 2's sidecar)", fault_at, entry, cluster.wait_for_edge(DROPLET[1], 30)
    )
    wait_for(
        "Docker to restart sidecar2",
        lambda: (
            True
            if int(cluster.inspect("sidecar2", "{{.RestartCount}}")) > restarts_before
            else None
        ),
        timeout=60,
        interval=0.5,
    )
    back = cluster.wait_for_status("sidecar2", is_healthy_follower_of(1), "follows node 1", 90)
    print(f"sidecar2 restarted by Docker and follows node 1 (term {back['term']})")

    # --- droplet network lost: stopping web1 takes the namespace node 1's sidecar runs in.
    fault_at = time.monotonic()
    stopped = docker("stop", "--time", "10", cluster.container("web1"), timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    entry = cluster.wait_for_holder(DROPLET[2], since=fault_at, timeout=60)
    report(
        "droplet network lost (docker stop web1)",
        fault_at,
        entry,
        cluster.wait_for_edge(DROPLET[2], 30),
    )
    cut_off = cluster.node_status("sidecar1")
    assert cut_off is not None and cut_off["role"] != "leader", cut_off

    # --- recovery as documented: start web1 (a new namespace), restart sidecar1 into it.
    # Node 1 rejoins as a follower and takes the IP back after its preempt delay.
    restore_at = time.monotonic()
    for args in (("start",), ("restart", "--time", "10")):
        service = "web1" if args[0] == "start" else "sidecar1"
        result = docker(*args, cluster.container(service), timeout=120)
        assert result.returncode == 0, result.stderr
    cluster.wait_for_status("sidecar1", is_healthy_follower_of(2), "rejoined", 90)
    rejoined_at = time.monotonic()
    entry = cluster.wait_for_holder(DROPLET[1], since=restore_at, timeout=150)
    edge_at = cluster.wait_for_edge(DROPLET[1], 30)
    print(
        f"recovery (start web1, restart sidecar1): node 1 rejoined after "
        f"{rejoined_at - restore_at:.1f} s; took the IP back by pre-emption "
        f"{entry['completed_monotonic'] - rejoined_at:.1f} s later; "
        f"edge from 1001 after {edge_at - restore_at:.1f} s"
    )

    # --- what must hold over the whole run.
    history = cluster.history()
    assert all(e["droplet_id"] != DROPLET[3] for e in history), "the witness got the IP"
    intervals = []
    for service, node in SIDECAR_NODE.items():
        events = cluster.sidecar_events(service)
        intervals += leadership_intervals(node, events, killed_at.get(node, []))
    assert not [i for i in intervals if i.node == 3], "the witness led"
    assert overlaps(intervals) == [], f"two leaders at once: {overlaps(intervals)}"
    print(
        f"{len(history)} assignments in all: {[e['droplet_id'] for e in history]}; "
        f"{len(intervals)} leadership intervals, none overlapping"
    )
