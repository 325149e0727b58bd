"""A rehearsal of the Terraform-deployed cluster: its own user_data, run in three droplets.

Terraform renders every droplet's user_data from terraform/ (tests/rehearsal/render.py);
each droplet is a network namespace with its own mounts and process tree
(tests/rehearsal/cluster.py) that gets the user_data's files and runs its `runcmd`: the
apply script runs configure_sidecar.py against the emulated DigitalOcean API (https, a
custom-scoped token), which writes the sidecar's config, and starts real `fip-sidecar run`
processes through a stand-in `docker`. The emulator serves the API and each droplet's
metadata, as the droplet would see them.

The steps run in order on one deployment (module fixture), each printing its figures:
boot to the IP on node 1; a crash of node 1's sidecar (kill -9; Docker's restart policy
brings it back, and it takes the IP back after preempt_delay); replacing droplet 2 with a
new droplet at a new address, picked up by the others' apply timer (a reload on SIGHUP, no
restart) with zero IP moves; a revoked token, in the leader's /status and as a failed unit.

    .venv/bin/pytest tests/test_rehearsal.py -s
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from chaos import netns
from rehearsal.cluster import Droplet, RehearsalAPI
from rehearsal.render import UserData, render_user_data, terraform_binary

from sidecar.localcluster import read_events

pytestmark = [pytest.mark.slow, pytest.mark.netns, pytest.mark.timeout(900)]

RESERVED_IP = "203.0.113.10"
PRIMARY, WITNESS_REGION = "nyc3", "tor1"
SIDECAR_IMAGE = "registry.example.com/fip-sidecar:rehearsal"
WEB_IMAGE = "nginxdemos/hello:plain-text"
TOKEN = "dop_v1_" + "5ca1ab1e" * 8
#: The README's scopes for the sidecar token, the read scopes DigitalOcean requires with
#: them, and tag:read, without which `GET /v2/droplets?tag_name=` is refused (the spec).
SCOPES = (
    "reserved_ip:read",
    "reserved_ip:update",
    "droplet:read",
    "tag:read",
    "actions:read",
    "regions:read",
    "sizes:read",
    "image:read",
)
ACTION_SECONDS = 2.0
BOOT_SECONDS = 2.0
#: Droplets by node id: (droplet id, lab index = last octet, private address, region).
LAYOUT = {
    1: (1001, 11, "198.18.1.11", PRIMARY),
    2: (1002, 12, "198.18.1.12", PRIMARY),
    3: (1003, 13, "198.18.2.13", WITNESS_REGION),
}
REPLACEMENT = (1004, 22, "198.18.1.22")

T = TypeVar("T")


def wait_for(what: str, predicate: Callable[[], T | None], timeout: float) -> T:
    """Poll every 0.2 s until `predicate` gives something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)


@dataclass
class Deployment:
    lab: netns.Lab
    api: RehearsalAPI
    droplets: dict[int, Droplet]
    user_data: dict[int, UserData]
    destroyed: list[Droplet] = field(default_factory=list)

    @property
    def cluster_tag(self) -> str:
        tag: str = self.droplets[1].cluster["cluster_tag"]
        return tag

    def report(self, line: str) -> None:
        print(f"rehearsal: {line}", flush=True)

    def close(self) -> None:
        for droplet in [*self.droplets.values(), *self.destroyed]:
            droplet.destroy()

    def statuses(self) -> dict[int, dict[str, Any] | None]:
        return {node: droplet.status() for node, droplet in self.droplets.items()}

    def settled(self, leader: int = 1) -> bool:
        """Every node follows `leader`, sees every peer alive, and the IP is its droplet's."""
        statuses = self.statuses()
        for status in statuses.values():
            if status is None or status["leader_id"] != leader:
                return False
            if not all(peer["alive"] for peer in status["peers"]):
                return False
        return self.api.holder(RESERVED_IP) == self.droplets[leader].droplet_id

    def moves_since(self, moment: float) -> list[dict[str, Any]]:
        return [
            entry
            for entry in self.api.history(RESERVED_IP)
            if entry["source"] == "api" and entry["completed_monotonic"] > moment
        ]

    def wait_active(self, droplet_ids: list[int], timeout: float = 30.0) -> float:
        def active() -> bool:
            state = self.api.admin("GET", "/_emulator/state")
            status = {d["id"]: d["status"] for d in state["droplets"]}
            return all(status.get(d) == "active" for d in droplet_ids)

        wait_for(f"droplets {droplet_ids} to be active", active, timeout)
        return time.monotonic()


def droplet_spec(
    tag: str, node: int, droplet_id: int, public: str, private: str, region: str
) -> Any:
    """The droplet as Terraform creates it: name, region and the two cluster tags."""
    prefix = tag.removesuffix("-cluster")
    name = f"{prefix}-node-{node}" if node != 3 else f"{prefix}-witness-3"
    return {
        "id": droplet_id,
        "region": region,
        "name": name,
        "tags": [tag, f"{tag}-node-{node}"],
        "public_ipv4": public,
        "private_ipv4": private,
        "boot_seconds": BOOT_SECONDS,
    }


def images(node: int) -> dict[str, Any]:
    """What the stand-in `docker` runs for each image name user_data uses."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "PYTHONUNBUFFERED": "1", "LANG": "C.UTF-8"}
    return {
        SIDECAR_IMAGE: {
            "entrypoint": [sys.executable, "-m", "sidecar.cli"],
            "cmd": ["run", "--config", "/etc/fip-sidecar/config.toml"],
            "user": "10001:10001",
            # The one addition: the real image trusts DigitalOcean's CA (certifi).
            "env": {
                **env,
                "FIP_SIDECAR_DIGITALOCEAN__CA_FILE": "/etc/ssl/certs/ca-certificates.crt",
            },
        },
        WEB_IMAGE: {
            "entrypoint": [sys.executable, "-m", "sidecar.demo_web", "--listen", "0.0.0.0:80"],
            "cmd": ["--name", f"node {node}"],
            "user": None,
            "env": env,
        },
    }


def new_droplet(
    lab: netns.Lab, api: RehearsalAPI, data: UserData, droplet_id: int, index: int, private: str
) -> Droplet:
    host = lab.add_host(f"n{index}", index)
    return Droplet(lab, host, droplet_id, private, data, api, images(data.node_id))


def boot_all(deployment: Deployment, droplets: list[Droplet]) -> float:
    """Start the droplets; once the API says they are active, run their cloud-init."""
    for droplet in droplets:
        droplet.boot()
    booted = deployment.wait_active([d.droplet_id for d in droplets])
    with ThreadPoolExecutor(len(droplets)) as pool:
        list(pool.map(lambda d: d.run_cloud_init(), droplets))
    return booted


def first_event(droplet: Droplet, event: str, after: float) -> float | None:
    path = droplet.container("fip-sidecar") / "log"
    for record in read_events(path):
        if record.get("event") == event and float(record.get("at_mono", 0)) > after:
            return float(record["at_mono"])
    return None


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    reason = netns.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    for tool in ("unshare", "nsenter", "nft"):
        if shutil.which(tool) is None:
            pytest.skip(f"the rehearsal needs {tool}")
    if terraform_binary() is None:
        pytest.skip("NO TERRAFORM ON THIS MACHINE: the rehearsal renders user_data with it")
    workdir = tmp_path_factory.mktemp("rehearsal")
    cluster_key = base64.b64encode(secrets.token_bytes(32)).decode()
    variables = {
        "do_token": "terraform-own-token-never-on-a-droplet",
        "sidecar_do_token": TOKEN,
        "cluster_key": cluster_key,
        "ssh_key_fingerprints": ["rehearsal"],
        "admin_cidr": "203.0.113.7/32",
        "sidecar_image": SIDECAR_IMAGE,
        "web_image": WEB_IMAGE,
        "primary_region": PRIMARY,
        "witness_region": WITNESS_REGION,
    }
    rendered = render_user_data(
        workdir, variables, {"digitalocean_reserved_ip.service.ip_address": RESERVED_IP}
    )
    by_node = {data.node_id: data for data in rendered}
    assert sorted(by_node) == [1, 2, 3], [d.resource for d in rendered]
    tag = json.loads(by_node[1].files["/etc/fip-sidecar/cluster.json"]["content"])["cluster_tag"]
    with netns.lab(workdir, tag="rh") as lab:
        api = RehearsalAPI(lab, lab.add_host("api", 100), TOKEN, SCOPES)
        api.start(RESERVED_IP, PRIMARY, ACTION_SECONDS)
        droplets = {}
        for node, (droplet_id, index, private, region) in LAYOUT.items():
            spec = droplet_spec(tag, node, droplet_id, f"198.18.0.{index}", private, region)
            api.admin("POST", "/_emulator/droplets", spec)
            droplets[node] = new_droplet(lab, api, by_node[node], droplet_id, index, private)
        deployment = Deployment(lab, api, droplets, by_node)
        try:
            yield deployment
        finally:
            deployment.close()


def test_boot_gives_node_1_the_ip(
    deployment: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    with capsys.disabled():
        booted = boot_all(deployment, list(deployment.droplets.values()))
        on_node_1 = wait_for(
            "node 1 to hold the IP",
            lambda: [e for e in deployment.moves_since(booted) if e["droplet_id"] == 1001],
            120.0,
        )[0]
        wait_for("the cluster to settle", deployment.settled, 30.0)
        moves = deployment.moves_since(booted)
        node_1 = deployment.droplets[1]
        gained = first_event(node_1, "gained", booted)
        applied = node_1.unit_runs[0]
        path = ", ".join(
            f"{e['droplet_id']} at {e['completed_monotonic'] - booted:.1f} s" for e in moves
        )
        deployment.report(
            f"droplets booted -> IP on node 1: {on_node_1['completed_monotonic'] - booted:.2f} s "
            f"(apply script {applied.seconds:.2f} s; node 1 leads "
            f"{(gained or float('nan')) - booted:.2f} s after boot; assign action "
            f"{on_node_1['completed_monotonic'] - on_node_1['requested_monotonic']:.2f} s); "
            f"IP moves during boot: {len(moves)} ({path})"
        )
    for droplet in deployment.droplets.values():
        (run,) = droplet.unit_runs
        assert run.returncode == 0 and "config written" in run.output, run.output
        assert droplet.container_events()[0] == f"run {SIDECAR_IMAGE}"
    assert [e["droplet_id"] for e in moves] == [1001], "a cold start moves the IP once"
    statuses = deployment.statuses()
    assert [s["role"] for s in statuses.values() if s] == ["leader", "follower", "follower"]
    assert statuses[3] is not None and statuses[3]["eligible"] is False


def test_crash_of_node_1_moves_the_ip_and_it_comes_back(
    deployment: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    wait_for("node 1 to lead", deployment.settled, 60.0)
    node_1 = deployment.droplets[1]
    pid = node_1.main_pid()
    assert pid is not None
    with capsys.disabled():
        # Docker restarts a crashed container after 0.1 s: on a loaded machine the new
        # process can be back (and lead again, the IP never having left) before node 2
        # stands. That is a correct outcome, but not the failover this test measures:
        # kill again; the restart policy's delay doubles each time, so node 2 gets there.
        moved: dict[str, Any] | None = None
        for attempt in range(1, 5):
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)

            def outcome(killed: float = killed, pid: int = pid) -> tuple[str, Any] | None:
                to_2 = [e for e in deployment.moves_since(killed) if e["droplet_id"] == 1002]
                if to_2:
                    return ("moved", to_2[0])
                again = node_1.main_pid()
                if again not in (None, pid) and deployment.settled():
                    return ("back", again)
                return None

            kind, value = wait_for("the IP to move to droplet 1002", outcome, 30.0)
            if kind == "moved":
                moved = value
                break
            print(f"rehearsal: attempt {attempt}: node 1 restarted and led again first")
            pid = value
        assert moved is not None, "node 1 always restarted and led again before node 2 stood"
        restarted = wait_for(
            "Docker's restart policy to start node 1's sidecar again",
            lambda: (p := node_1.main_pid()) is not None and p != pid,
            30.0,
        )
        assert restarted
        back = wait_for(
            "node 1 to take the IP back",
            lambda: [
                e
                for e in deployment.moves_since(moved["completed_monotonic"])
                if e["droplet_id"] == 1001
            ],
            120.0,
        )[0]
        wait_for("the cluster to settle", deployment.settled, 30.0)
        deployment.report(
            f"kill -9 of node 1's sidecar -> IP on node 2: "
            f"{moved['completed_monotonic'] - killed:.2f} s (assign requested after "
            f"{moved['requested_monotonic'] - killed:.2f} s); node 1 restarted by the restart "
            f"policy, took the IP back {back['completed_monotonic'] - killed:.1f} s after the kill"
        )
    assert "exit -9" in node_1.container_events()


def test_replacing_droplet_2_is_picked_up_without_moving_the_ip(
    deployment: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    wait_for("node 1 to lead", deployment.settled, 60.0)
    api, old = deployment.api, deployment.droplets[2]
    droplet_id, index, private = REPLACEMENT
    with capsys.disabled():
        started = time.monotonic()
        api.admin("DELETE", f"/_emulator/droplets/{old.droplet_id}")  # terraform destroys it
        old.destroy()
        deployment.destroyed.append(old)
        spec = droplet_spec(
            deployment.cluster_tag, 2, droplet_id, f"198.18.0.{index}", private, PRIMARY
        )
        api.admin("POST", "/_emulator/droplets", spec)  # ... and creates the new one
        new = new_droplet(deployment.lab, api, deployment.user_data[2], droplet_id, index, private)
        deployment.droplets[2] = new
        boot_all(deployment, [new])
        # The others' apply timer ticks (every 2 min on a droplet; here, now).
        before = {n: len(deployment.droplets[n].container_events()) for n in (1, 3)}
        pids = {n: deployment.droplets[n].main_pid() for n in (1, 3)}
        with ThreadPoolExecutor(2) as pool:
            runs = list(pool.map(lambda n: deployment.droplets[n].fire_timer(), (1, 3)))
        did = {n: deployment.droplets[n].container_events()[before[n] :][:1] for n in (1, 3)}
        wait_for("the cluster to settle with the new node 2", deployment.settled, 150.0)
        moves = deployment.moves_since(started)
        peer_2 = next(p for p in deployment.statuses()[1]["peers"] if p["id"] == 2)  # type: ignore[index]
        deployment.report(
            f"droplet 2 replaced (droplet {old.droplet_id} -> {droplet_id}, "
            f"{old.private_address} -> {private}): settled {time.monotonic() - started:.1f} s "
            f"after the destroy; apply on nodes 1 and 3 exited {[r.returncode for r in runs]} "
            f"and did {did} to the sidecar; IP moves: {len(moves)} (target 0)"
        )
    assert all("config written" in run.output for run in runs), [run.output for run in runs]
    assert peer_2["alive"], "nodes 1 and 3 reach node 2 at its new address"
    assert {n: deployment.droplets[n].main_pid() for n in (1, 3)} == pids, "reloaded in place"
    assert moves == [], "the IP stays on droplet 1001 throughout"


def test_a_revoked_token_shows_in_the_leaders_status(
    deployment: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    wait_for("node 1 to lead", deployment.settled, 150.0)
    node_1 = deployment.droplets[1]
    with capsys.disabled():
        revoked = time.monotonic()
        deployment.api.admin("POST", "/_emulator/tokens/revoke", {"token": TOKEN})

        def rejected() -> dict[str, Any] | None:
            status = node_1.status()
            error = status and status["floating_ip"]["last_error"]
            return error if error and error["status"] == 401 else None

        # The leader reads the IP every reconcile_interval (10 s, jittered 20 %).
        error = wait_for("node 1's /status to show the 401", rejected, 30.0)
        deployment.report(
            f"token revoked -> node 1's /status shows {error['type']} "
            f"({error['status']}) {time.monotonic() - revoked:.1f} s later: {error['message']}"
        )
    assert "401" in error["message"] and TOKEN not in str(node_1.status())


def test_a_revoked_token_fails_the_apply_unit_with_the_status_code(
    deployment: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    deployment.api.admin("POST", "/_emulator/tokens", {"token": "unrelated", "scopes": None})
    tokens = deployment.api.admin("POST", "/_emulator/tokens/revoke", {"token": "unrelated"})
    assert tokens["tokens"] == 0, "the droplets' token is revoked (the test before did it)"
    with capsys.disabled():
        run = deployment.droplets[1].fire_timer()
        deployment.report(
            f"token revoked -> the apply unit exits {run.returncode} "
            f"({'success' if run.systemd_success else 'FAILED'} for systemd): "
            f"{run.output.strip()}"
        )
    assert not run.systemd_success
    assert "401" in run.output
