"""What a running node imports: the runtime only, never the emulator's web framework.

A sidecar runs on every droplet, so every module it loads is memory paid on every droplet
(hypercorn with h2/wsproto/priority cost ~4 MiB; issue 13). Here a real three-node cluster
with everything enabled (status server, HTTP health checks, the assigner against the
emulator) runs with `PYTHONPROFILEIMPORTTIME=1`, so each node's stderr lists every module
it imported over its whole life: start-up, an election, the leader's API calls, /status
and /metrics requests, and the SIGTERM shutdown. Only the leader builds an API client.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from sidecar.localcluster import LocalCluster

#: Packages only the emulator (the `emulator` extra), the demo/CLI helpers or the tests need
#: (prometheus_client only checks sidecar/exposition.py's output; ~1.4 MiB a node). Not h2:
#: httpcore imports it whenever it is installed (this venv has it, through hypercorn), and
#: the production image, which has no h2 at all, is checked by tests/test_image.py.
FORBIDDEN = (
    "prometheus_client",
    "hypercorn",
    "starlette",
    "wsproto",
    "priority",
    "sidecar.emulator",
    "sidecar.localcluster",
    "sidecar.demo_web",
    "sidecar.status_cli",
)
#: What a node does load: the parse below must be finding real import lines.
EXPECTED = (
    "trio",
    "h11",
    "httpx",
    "sidecar.node",
    "sidecar.exposition",
    "sidecar.status",
    "sidecar.service",
)

#: What only the leader's API client needs (httpx's transport): a follower's HTTP health
#: check goes over h11 directly (sidecar/httpprobe.py), ~1.9 MiB less RSS per follower.
LEADER_ONLY = ("httpcore", "anyio")

_IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)\s*$")


def imported_modules(log: Path) -> set[str]:
    """Every module named by `-X importtime` lines in a process's stderr."""
    found = set()
    for line in log.read_text(errors="replace").splitlines():
        match = _IMPORT_LINE.match(line)
        if match:
            found.add(match.group(1))
    return found


def forbidden_in(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))


@pytest.mark.timeout(180)
def test_a_running_node_imports_no_emulator_or_web_framework(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")  # inherited by the cluster's processes
    with LocalCluster(tmp_path / "cluster", with_ip=True) as cluster:
        leader = cluster.wait_for_leader(timeout=30.0, expect=1)
        cluster.wait_for_holder(cluster.members[leader].droplet_id, timeout=60.0)
        with httpx.Client(trust_env=False, timeout=5.0) as client:
            for member in cluster.members.values():
                for path in ("/status", "/metrics", "/healthz"):
                    assert client.get(member.status_url + path).status_code == 200
        built = {n: cluster.events(n, "api_client_built") for n in cluster.nodes}
    logs = {n: cluster.members[n].log_path for n in cluster.nodes}
    for node, log in logs.items():
        modules = imported_modules(log)
        missing = [m for m in EXPECTED if m not in modules]
        assert not missing, f"node {node}: no import line for {missing}; is the log parsed?"
        assert forbidden_in(modules) == [], f"node {node} imported emulator-only modules"
    # The followers (node 2, and the witness 3) never built a DigitalOcean client.
    assert [n for n, events in built.items() if events] == [leader]
    for node, log in logs.items():
        if node != leader:
            loaded = [m for m in LEADER_ONLY if m in imported_modules(log)]
            assert loaded == [], f"follower {node} imported {loaded}"


def test_importing_the_entry_point_loads_no_emulator_or_web_framework() -> None:
    """What `fip-sidecar` itself loads before it runs any command."""
    probe = "import sys, sidecar.cli; print('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    modules = set(result.stdout.split())
    assert "sidecar.service" in modules
    assert forbidden_in(modules) == []
