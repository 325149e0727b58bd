"""Health-driven failover on real processes: the demo web services fail and recover.

The local cluster runs the emulator, one demo web service per droplet (its `/healthz`
fails on `POST /fail` and heals on `POST /recover`) and three sidecars checking them over
HTTP. What is checked comes from the nodes' JSON logs (`lost` with its reason, `gained`),
the emulator's assignment history (who held the IP), and files written by real notify
hooks (`on_gained` / `on_lost` are a small Python script recording its FIP_* environment
and its parent's PID, so a record proves both what a hook was told and which sidecar ran it).

Timing assertions are lower bounds only (a node must *not* take over before its
`preempt_delay`); every wait is bounded.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sidecar.localcluster import Event, LocalCluster, overlaps

MakeCluster = Callable[..., LocalCluster]

DROPLET = {1: 1001, 2: 1002, 3: 1003}
PREEMPT_DELAY = 3.0
#: Quick checks (a failure is noticed in about `fall` x 0.3 s) with enough timeout that a
#: busy machine does not fail them by accident.
FAST_HEALTH = {"check_interval": 0.3, "check_timeout": 0.25, "rise": 2, "fall": 2}
ASSIGNER = {"reconcile_interval": 1.0, "cooloff_interval": 0.5, "backoff_max_delay": 1.0}

HOOK_SCRIPT = """\
import json, os, sys, time
record = {
    "ppid": os.getppid(),
    "mono": time.monotonic(),
    "env": {k: v for k, v in os.environ.items() if k.startswith("FIP_")},
    "environ": sorted(os.environ),
}
path = os.path.join(sys.argv[1], f"{time.monotonic_ns()}-{os.getpid()}.json")
with open(path + ".tmp", "w") as out:
    json.dump(record, out)
os.replace(path + ".tmp", path)
"""


class Hooks:
    """The hook script and where its records land."""

    def __init__(self, root: Path) -> None:
        self.script = root / "hook.py"
        self.script.write_text(HOOK_SCRIPT)
        self.records_dir = root / "hook-records"
        self.records_dir.mkdir()
        self.pids: dict[int, int] = {}  # every sidecar PID seen -> its node id

    def remember(self, cluster: LocalCluster) -> None:
        """Note the nodes' current PIDs (call again after a restart)."""
        for node, member in cluster.members.items():
            if member.pid is not None:
                self.pids[member.pid] = node

    def section(self) -> dict[str, object]:
        argv = [sys.executable, str(self.script), str(self.records_dir)]
        return {"on_gained": argv, "on_lost": argv, "hook_timeout": 10.0}

    def records(self, cluster: LocalCluster) -> list[dict[str, Any]]:
        """Every finished hook run, oldest first, with `node` found from its parent PID."""
        self.remember(cluster)
        found = []
        for path in sorted(self.records_dir.glob("*.json")):
            record = json.loads(path.read_text())
            record["node"] = self.pids.get(record["ppid"])
            found.append(record)
        return found

    def wait_for(
        self, cluster: LocalCluster, node: int, event: str, term: int, timeout: float = 15.0
    ) -> dict[str, Any]:
        """The record of `event`'s hook run by `node` for `term` (bounded wait)."""
        deadline = time.monotonic() + timeout
        while True:
            for record in self.records(cluster):
                env = record["env"]
                if (
                    record["node"] == node
                    and env.get("FIP_EVENT") == event
                    and env.get("FIP_TERM") == str(term)
                ):
                    return record
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"no {event} hook for term {term} on node {node}: {self.records(cluster)}"
                )
            time.sleep(0.05)


@pytest.fixture
def hooks(tmp_path: Path) -> Hooks:
    return Hooks(tmp_path)


@pytest.fixture
def make_cluster(tmp_path: Path, hooks: Hooks) -> Iterator[MakeCluster]:
    """Start IP clusters with hooks inside tmp_path; every process is stopped by PID."""
    started: list[LocalCluster] = []

    def make(**timing: float | bool) -> LocalCluster:
        cluster = LocalCluster(
            tmp_path / f"cluster{len(started)}",
            with_ip=True,
            timing={"preempt_delay": PREEMPT_DELAY, **timing},
            health=FAST_HEALTH,
            assigner=ASSIGNER,
            hooks=hooks.section(),
        )
        started.append(cluster)
        cluster.start()
        hooks.remember(cluster)
        return cluster

    try:
        yield make
    finally:
        for cluster in started:
            cluster.stop()


# ---------------------------------------------------------------------- helpers


def settle_on_node_1(cluster: LocalCluster, hooks: Hooks) -> None:
    """Node 1 leads and holds the IP.

    On a busy machine node 2 can win the first election (node 1's service not yet seen
    healthy `rise` times, or node 1 not yet heard). With `preempt = false` node 1 would
    then never lead, so the winner is restarted with SIGTERM: it resigns, node 1 takes
    over, and it comes back as a follower.
    """
    leader = cluster.wait_for_leader(timeout=20.0)
    if leader != 1:
        cluster.restart(leader, signal.SIGTERM)
        hooks.remember(cluster)
    cluster.wait_for_leader(expect=1, timeout=20.0 + PREEMPT_DELAY)
    cluster.wait_for_holder(DROPLET[1], timeout=20.0)


def event_after(
    cluster: LocalCluster, node: int, kind: str, since: float, timeout: float = 15.0
) -> Event:
    return cluster.wait_for_event(
        node, lambda e: e.get("event") == kind and e["at_mono"] > since, timeout=timeout
    )


def wait_status(
    cluster: LocalCluster,
    node: int,
    predicate: Callable[[dict[str, Any]], bool],
    timeout: float = 10.0,
) -> dict[str, Any]:
    """The node's /status once `predicate` holds for it (bounded wait)."""
    deadline = time.monotonic() + timeout
    body: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        body = cluster.status(node)
        if body is not None and predicate(body):
            return body
        time.sleep(0.05)
    raise AssertionError(f"node {node}'s status never matched; last: {body}")


def peer(body: dict[str, Any], node: int) -> dict[str, Any]:
    return next(p for p in body["peers"] if p["id"] == node)


def assert_hook_env(record: dict[str, Any], node: int, event: str, role: str) -> None:
    env = record["env"]
    assert env["FIP_NODE_ID"] == str(node)
    assert env["FIP_EVENT"] == event
    assert env["FIP_ROLE"] == role
    assert env["FIP_FLOATING_IP"] == "203.0.113.10"
    if event == "gained":
        assert env["FIP_LEADER_ID"] == str(node)
    else:
        assert env["FIP_LEADER_ID"] != str(node)
    assert "DIGITALOCEAN_TOKEN" not in record["environ"]


def assert_safe(cluster: LocalCluster) -> None:
    intervals = cluster.intervals()
    assert overlaps(intervals) == [], intervals
    assert cluster.events(3, "gained") == [], "the witness led"


# ---------------------------------------------------------------------- tests


@pytest.mark.parametrize("preempt", [True, False], ids=["preempt", "no-preempt"])
def test_a_failing_service_hands_over_and_a_recovered_one_takes_back_only_with_preempt(
    make_cluster: MakeCluster, hooks: Hooks, preempt: bool
) -> None:
    cluster = make_cluster(preempt=preempt)
    settle_on_node_1(cluster, hooks)
    first_term = cluster.events(1, "gained")[-1]["term"]
    assert_hook_env(hooks.wait_for(cluster, 1, "gained", first_term), 1, "gained", "leader")

    failed_at = time.monotonic()
    cluster.set_web_health(1, False)
    lost = event_after(cluster, 1, "lost", failed_at)
    assert lost["reason"] == "unhealthy"
    gained = event_after(cluster, 2, "gained", failed_at)
    assert cluster.wait_for_leader(expect=2) == 2
    moved = cluster.wait_for_holder(DROPLET[2], since=failed_at)
    assert moved["requested_monotonic"] > gained["at_mono"]
    assert_hook_env(hooks.wait_for(cluster, 1, "lost", lost["term"]), 1, "lost", "follower")
    assert_hook_env(hooks.wait_for(cluster, 2, "gained", gained["term"]), 2, "gained", "leader")

    recovered_at = time.monotonic()
    cluster.set_web_health(1, True)
    wait_status(cluster, 1, lambda b: b["healthy"] is True)
    if preempt:
        back = event_after(cluster, 1, "gained", recovered_at, timeout=PREEMPT_DELAY + 15.0)
        # The hold-down: healthy again is not enough, it must stay so for preempt_delay.
        assert back["at_mono"] - recovered_at >= PREEMPT_DELAY
        handed = event_after(cluster, 2, "lost", recovered_at)
        assert handed["reason"] == "preempted"
        assert cluster.wait_for_leader(expect=1) == 1
        cluster.wait_for_holder(DROPLET[1], since=recovered_at)
        record = hooks.wait_for(cluster, 2, "lost", handed["term"])
        assert_hook_env(record, 2, "lost", "follower")
        assert_hook_env(hooks.wait_for(cluster, 1, "gained", back["term"]), 1, "gained", "leader")
    else:
        # Bounded watch past the point where a preempting node 1 would have taken over.
        watch_until = recovered_at + PREEMPT_DELAY + 3.0
        while time.monotonic() < watch_until:
            assert cluster.leaders() == [2]
            time.sleep(0.1)
        assert [e for e in cluster.events(1, "gained") if e["at_mono"] > recovered_at] == []
        assert [e for e in cluster.events(2, "lost") if e["at_mono"] > gained["at_mono"]] == []
        body = cluster.status(2)
        assert body is not None and peer(body, 1)["healthy"] is True
        assert cluster.holder() == DROPLET[2]
    # The witness never gains or loses leadership, so it never runs these hooks.
    assert all(r["node"] in (1, 2) for r in hooks.records(cluster)), hooks.records(cluster)
    assert_safe(cluster)


def test_a_sick_leader_keeps_leading_while_nobody_is_healthier(
    make_cluster: MakeCluster, hooks: Hooks
) -> None:
    cluster = make_cluster()
    settle_on_node_1(cluster, hooks)
    for node in (2, 3):
        cluster.set_web_health(node, False)
    wait_status(cluster, 1, lambda b: peer(b, 2)["healthy"] is False)
    sick_at = time.monotonic()
    cluster.set_web_health(1, False)
    wait_status(cluster, 1, lambda b: b["healthy"] is False)

    watch_until = time.monotonic() + 3.0  # many health checks and lease renewals
    while time.monotonic() < watch_until:
        assert cluster.leaders() == [1]
        time.sleep(0.1)
    assert [e for e in cluster.events(1, "lost") if e["at_mono"] > sick_at] == []
    assert cluster.holder() == DROPLET[1]
    # Still a working leader: it puts back an IP moved behind its back.
    moved_at = time.monotonic()
    assert cluster.emulator_url is not None
    with httpx.Client(trust_env=False, timeout=5.0) as client:
        client.post(
            f"{cluster.emulator_url}/_emulator/assign", json={"droplet_id": DROPLET[2]}
        ).raise_for_status()
    repaired = cluster.wait_for_holder(DROPLET[1], since=moved_at, timeout=15.0)
    assert repaired["source"] == "api"

    # Once a healthy eligible node exists, the sick leader resigns to it.
    healed_at = time.monotonic()
    cluster.set_web_health(2, True)
    lost = event_after(cluster, 1, "lost", healed_at)
    assert lost["reason"] == "unhealthy"
    gained = event_after(cluster, 2, "gained", healed_at)
    cluster.wait_for_holder(DROPLET[2], since=healed_at)
    assert_hook_env(hooks.wait_for(cluster, 1, "lost", lost["term"]), 1, "lost", "follower")
    assert_hook_env(hooks.wait_for(cluster, 2, "gained", gained["term"]), 2, "gained", "leader")
    assert_safe(cluster)
