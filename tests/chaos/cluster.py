"""Real fip-sidecar processes and the DigitalOcean API emulator, one per lab host.

Node N lives on host `nN` at 198.18.0.N (election on UDP 7400, `/status` on 9400 of the
same address, reachable only from inside the lab); the emulator lives on host `api` at
198.18.0.100:8089 and holds the reserved IP 203.0.113.10 (TEST-NET-3). Every node's log
is a JSON-lines file the checker reads afterwards; restarts append to the same file.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from .checker import NodeLog, Verdict, check_run
from .netns import Host, Lab, LabError, Process

ELECTION_PORT = 7400
STATUS_PORT = 9400
API_PORT = 8089
API_HOST_INDEX = 100
RESERVED_IP = "203.0.113.10"
TOKEN = "chaos-test-token-not-a-secret"
REGION = "nyc3"
WITNESS_REGION = "sfo3"
START_TIMEOUT = 60.0

T = TypeVar("T")


@dataclass(frozen=True)
class NodeSpec:
    id: int
    eligible: bool = True

    @property
    def droplet_id(self) -> int:
        return 1000 + self.id


#: Two eligible nodes and a witness: the deployment the design recommends.
THREE_NODES = (NodeSpec(1), NodeSpec(2), NodeSpec(3, eligible=False))


def wait_until(
    predicate: Callable[[], T | None], timeout: float, interval: float = 0.1
) -> T | None:
    """Poll until `predicate` returns something truthy; None after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


class EmulatorHost:
    """The API emulator on its own lab host, holding RESERVED_IP; droplets given at start."""

    def __init__(
        self, lab: Lab, host: Host, *, action_seconds: float = 0.5, token: str = TOKEN
    ) -> None:
        self.lab = lab
        self.host = host
        self.action_seconds = action_seconds
        self.token = token
        self.token_path = lab.workdir / "do_token"
        self.process: Process | None = None
        #: More reserved addresses (e.g. an IPv6, for an emulator that has them), in REGION.
        self.extra_reserved_ips: list[str] = []

    @property
    def url(self) -> str:
        return f"http://{self.host.address}:{API_PORT}"

    def start(self, droplets: Mapping[int, str]) -> None:
        """`droplets`: droplet id -> region."""
        self.token_path.write_text(self.token + "\n")
        self.token_path.chmod(0o600)
        argv = [
            sys.executable, "-m", "sidecar.cli", "emulate",
            "--listen", f"{self.host.address}:{API_PORT}",
            "--token-file", str(self.token_path),
            "--reserved-ip", f"{RESERVED_IP}={REGION}",
            "--action-seconds", str(self.action_seconds),
        ]  # fmt: skip
        for droplet, region in droplets.items():
            argv += ["--droplet", f"{droplet}={region}"]
        for address in self.extra_reserved_ips:
            argv += ["--reserved-ip", f"{address}={REGION}"]
        self.process = self.lab.spawn(self.host, "emulator", argv)
        if wait_until(self.state, START_TIMEOUT) is None:
            raise LabError(f"the emulator did not answer within {START_TIMEOUT}s")

    def state(self) -> dict[str, Any] | None:
        try:
            state: dict[str, Any] = self.lab.http_get_json(self.host, API_PORT, "/_emulator/state")
        except (OSError, LabError, ValueError):
            return None
        return state

    def ip_holder(self) -> int | None:
        """The droplet the emulator says holds the reserved IP now."""
        state = self.state()
        if state is None:
            return None
        for entry in state["reserved_ips"]:
            if entry["ip"] == RESERVED_IP:
                holder: int | None = entry["droplet_id"]
                return holder
        return None

    def history(self) -> list[dict[str, Any]]:
        answer: list[dict[str, Any]] = self.lab.http_get_json(
            self.host, API_PORT, f"/_emulator/history?reserved_ip={RESERVED_IP}"
        )
        return answer

    def set_faults(self, **change: Any) -> dict[str, Any]:
        """POST /_emulator/faults (only the fields given change); returns the faults now."""
        answer: dict[str, Any] = self.lab.http_post_json(
            self.host, API_PORT, "/_emulator/faults", change
        )
        return answer

    def requests(self) -> dict[str, Any]:
        """GET /_emulator/requests: `total` and counts by method, path and status so far."""
        answer: dict[str, Any] = self.lab.http_get_json(self.host, API_PORT, "/_emulator/requests")
        return answer


class SidecarCluster:
    """Start, watch, hurt and judge a cluster of fip-sidecar nodes inside a lab."""

    def __init__(
        self,
        lab: Lab,
        nodes: Sequence[NodeSpec] = THREE_NODES,
        *,
        timing: Mapping[str, float | bool] | None = None,
        profile: str = "lan",
        action_seconds: float = 0.5,
        token: str = TOKEN,
        assigner: Mapping[str, float | int] | None = None,
        python: str | None = None,
    ) -> None:
        self.lab = lab
        #: The nodes' interpreter: `sys.executable` (the dev venv, importing this checkout)
        #: unless a benchmark runs them from a production venv, with `-P` so that the
        #: working directory's `sidecar/` cannot shadow the installed package.
        self.node_argv = [python, "-P"] if python else [sys.executable]
        self.specs = {spec.id: spec for spec in nodes}
        self.timing = dict(timing or {})
        self.assigner = dict(assigner or {})
        self.profile = profile
        self.hosts: dict[int, Host] = {n: lab.add_host(f"n{n}", n) for n in self.specs}
        self.api_host = lab.add_host("api", API_HOST_INDEX)
        self.api = EmulatorHost(lab, self.api_host, action_seconds=action_seconds, token=token)
        self.processes: dict[int, Process] = {}
        self.key_path = lab.workdir / "cluster.key"
        self.token_path = self.api.token_path

    @property
    def api_url(self) -> str:
        return self.api.url

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        from sidecar.protocol import generate_cluster_key

        self.key_path.write_text(generate_cluster_key() + "\n")
        self.key_path.chmod(0o600)
        self._start_emulator()
        for node in self.specs:
            path = self.lab.workdir / f"node{node}.toml"
            path.write_text(self.config_text(node))
            self.processes[node] = self.lab.spawn(
                self.hosts[node],
                f"node{node}",
                [*self.node_argv, "-m", "sidecar.cli", "run", "--config", str(path)],
            )
        for node in self.specs:
            if wait_until(lambda n=node: self.status(n), START_TIMEOUT) is None:  # type: ignore[misc]
                raise LabError(f"node {node} did not answer /status within {START_TIMEOUT}s")

    def _start_emulator(self) -> None:
        self.api.start(
            {
                spec.droplet_id: REGION if spec.eligible else WITNESS_REGION
                for spec in self.specs.values()
            }
        )

    def config_text(self, node: int) -> str:
        spec, host = self.specs[node], self.hosts[node]
        lines = [
            f"node_id = {node}",
            f'bind = "{host.address}:{ELECTION_PORT}"',
            f'status_listen = "{host.address}:{STATUS_PORT}"',
            f'cluster_key_file = "{self.key_path}"',
            f'profile = "{self.profile}"',
            'log_level = "info"',
        ]
        if not spec.eligible:
            lines.append("eligible = false")
        for peer in self.specs.values():
            if peer.id != node:
                lines += [
                    "",
                    "[[peers]]",
                    f"id = {peer.id}",
                    f'address = "{self.hosts[peer.id].address}:{ELECTION_PORT}"',
                    f"eligible = {'true' if peer.eligible else 'false'}",
                ]
        if self.timing:
            lines += ["", "[timing]"]
            for key, value in self.timing.items():
                text = ("true" if value else "false") if isinstance(value, bool) else repr(value)
                lines.append(f"{key} = {text}")
        if self.assigner:
            lines += ["", "[assigner]"]
            lines += [f"{key} = {value!r}" for key, value in self.assigner.items()]
        lines += [
            "",
            "[floating_ip]",
            f'address = "{RESERVED_IP}"',
            f"droplet_id = {spec.droplet_id}",
            "",
            "[digitalocean]",
            f'api_url = "{self.api_url}"',
            f'token_file = "{self.token_path}"',
            f'metadata_url = "{self.api_url}/metadata/droplets/{spec.droplet_id}"',
            "allow_insecure_http = true",
        ]
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ observe
    def status(self, node: int, timeout: float = 1.0) -> dict[str, Any] | None:
        """The node's /status, or None when it does not answer (dead, paused, cut off)."""
        try:
            answer: dict[str, Any] = self.lab.http_get_json(
                self.hosts[node], STATUS_PORT, "/status", timeout
            )
        except (OSError, LabError, ValueError):
            return None
        return answer

    def leaders(self) -> set[int]:
        """Nodes whose /status says `role = leader` right now."""
        found = set()
        for node in self.specs:
            status = self.status(node)
            if status is not None and status.get("role") == "leader":
                found.add(node)
        return found

    def wait_for_leader(self, expected: int, timeout: float) -> bool:
        """True once `expected` is the only node reporting itself leader."""
        return wait_until(lambda: self.leaders() == {expected}, timeout, interval=0.2) is not None

    def ip_holder(self) -> int | None:
        return self.api.ip_holder()

    def history(self) -> list[dict[str, Any]]:
        return self.api.history()

    # ------------------------------------------------------------------ hurt
    def kill(self, node: int) -> float:
        """SIGKILL the node's process; returns the monotonic time of the kill."""
        return self.lab.kill(self.processes[node])

    def restart(self, node: int) -> None:
        self.lab.restart(self.processes[node])

    def pause(self, node: int) -> float:
        """SIGSTOP the node (a long GC pause, a frozen VM); returns the monotonic time."""
        at = time.monotonic()
        self.processes[node].pause()
        return at

    def resume(self, node: int) -> float:
        """SIGCONT the node; returns the monotonic time."""
        at = time.monotonic()
        self.processes[node].resume()
        return at

    def heal(self) -> None:
        """Undo every fault the lab and the emulator can inject, and restart dead nodes.

        For scenarios that share one cluster: afterwards the network is whole, the API
        healthy and every node running (what it believes is up to the election).
        """
        self.api.set_faults(clear=True)
        for host in self.hosts.values():
            self.lab.clear_impairment(host)
            if shutil.which("nft") is not None:
                self.lab.clear_drops(host)
            self.lab.link_up(host)
        for node, proc in self.processes.items():
            if proc.running():
                proc.resume()
            else:
                self.restart(node)

    # ------------------------------------------------------------------ judge
    def node_logs(self) -> list[NodeLog]:
        return [
            NodeLog(
                node_id=node,
                eligible=spec.eligible,
                droplet_id=spec.droplet_id,
                path=self.processes[node].log_path,
                deaths=tuple(self.processes[node].kills),
            )
            for node, spec in self.specs.items()
        ]

    def check(self, *, since: float, until: float | None = None, **expect: Any) -> Verdict:
        """Judge the run between `since` and `until` (monotonic); see `checker.check_run`."""
        return check_run(
            self.node_logs(),
            self.history(),
            since=since,
            until=time.monotonic() if until is None else until,
            **expect,
        )
