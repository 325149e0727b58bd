"""Prove it under faults: real fip-sidecar processes in network namespaces.

Three hosts (nodes 1 and 2 eligible, node 3 a witness) and the API emulator, each in its
own namespace on one bridge (198.18.0.0/24). Each test hurts the cluster the way a real
network or machine would, then `checker.check_run` reads every node's log and the
emulator's history: never two leaders at once, the witness never leads, the expected final
leader and IP holder, and bounded numbers of leadership changes and IP moves.

Waits are generous upper bounds (a loaded 2-core CI box) and never assertions of speed;
`bench/compare.py` measures speed. Needs root; skips with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from chaos import netns
from chaos.checker import NodeLog, check_run, read_events
from chaos.cluster import SidecarCluster, wait_until

from sidecar.config import PROFILES

F = TypeVar("F", bound=Callable[..., Any])


def scenario(test: F) -> F:
    """Marks for the real-process scenarios (the checker's own tests below run anywhere)."""
    marked: F = pytest.mark.slow(pytest.mark.netns(pytest.mark.timeout(300)(test)))
    return marked


LAN = PROFILES["lan"]
#: Generous bounds for things to happen on a loaded machine (not speed assertions).
ELECTION_WAIT = 30.0
IP_WAIT = 30.0
#: How long the loss-and-jitter soak runs; the 10-minute version is `bench/compare.py`.
SOAK_SECONDS = float(os.environ.get("FIP_CHAOS_SOAK_SECONDS", "60"))
#: Seconds a recovered ex-leader is watched for flapping (preempt_delay is 30 s by default).
NO_FLAP_WINDOW = 10.0
#: Logged monotonic stamps are rounded to microseconds.
ROUNDING = 1e-5


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SidecarCluster]:
    """A running 3-node cluster with node 1 leading and holding the IP; torn down always."""
    reason = netns.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with netns.lab(tmp_path) as lab:
        running = SidecarCluster(lab)
        running.start()
        assert running.wait_for_leader(1, ELECTION_WAIT), "node 1 never became the only leader"
        assert wait_until(lambda: running.ip_holder() == 1001, IP_WAIT), "IP never reached 1001"
        yield running


def _ip_on(cluster: SidecarCluster, droplet: int) -> bool:
    return wait_until(lambda: cluster.ip_holder() == droplet, IP_WAIT) is not None


@scenario
def test_leader_killed_with_sigkill_is_replaced(cluster: SidecarCluster) -> None:
    since = time.monotonic()
    cluster.kill(1)
    assert cluster.wait_for_leader(2, ELECTION_WAIT)
    assert _ip_on(cluster, 1002)
    cluster.check(
        since=since,
        final_leader=2,
        final_ip_holder=1002,
        min_leader_changes=1,
        max_leader_changes=1,
        min_ip_moves=1,
        max_ip_moves=1,
    ).assert_ok()


@scenario
def test_partitioned_leader_steps_down_within_a_lease_and_does_not_flap_back(
    cluster: SidecarCluster,
) -> None:
    leader_host = cluster.hosts[1]
    since = time.monotonic()
    cut_at = cluster.lab.link_down(leader_host)
    assert cluster.wait_for_leader(2, ELECTION_WAIT), "the majority side elected nobody"
    assert _ip_on(cluster, 1002)

    # The cut-off leader's lease was counted from a heartbeat sent before the cut.
    lost = wait_until(
        lambda: next(
            (
                e
                for e in read_events(cluster.processes[1].log_path)
                if e.get("event") == "lost" and e["mono"] >= cut_at
            ),
            None,
        ),
        ELECTION_WAIT,
    )
    assert lost is not None, "node 1 never logged losing leadership"
    assert lost["lease_ended_mono"] - cut_at <= LAN.lease_timeout + ROUNDING, lost

    cluster.lab.link_up(leader_host)
    assert wait_until(lambda: cluster.status(1), ELECTION_WAIT), "node 1 unreachable after link up"
    time.sleep(NO_FLAP_WINDOW)  # shorter than preempt_delay: node 1 must not take over
    assert cluster.leaders() == {2}
    cluster.check(
        since=since,
        final_leader=2,
        final_ip_holder=1002,
        min_leader_changes=1,
        max_leader_changes=1,
        min_ip_moves=1,
        max_ip_moves=1,
    ).assert_ok()


@scenario
def test_loss_and_jitter_on_every_host_change_nothing(cluster: SidecarCluster) -> None:
    since = time.monotonic()
    for seed, host in enumerate(cluster.hosts.values()):
        cluster.lab.impair(host, delay=0.020, jitter=0.010, loss=0.05, seed=seed)
    time.sleep(SOAK_SECONDS)
    for host in cluster.hosts.values():
        cluster.lab.clear_impairment(host)
    assert cluster.leaders() == {1}
    cluster.check(
        since=since,
        final_leader=1,
        final_ip_holder=1001,
        max_leader_changes=0,
        max_ip_moves=0,
    ).assert_ok()


@scenario
def test_failover_works_with_the_witness_behind_a_slow_wan_link(cluster: SidecarCluster) -> None:
    # 50 ms each way: the witness is 100 ms of round trip away, as in another region.
    cluster.lab.impair(cluster.hosts[3], delay=0.050, direction="both")
    time.sleep(3.0)
    assert cluster.leaders() == {1}, "a slow witness link alone must not move the leader"
    since = time.monotonic()
    cluster.kill(1)
    assert cluster.wait_for_leader(2, ELECTION_WAIT)
    assert _ip_on(cluster, 1002)
    cluster.check(
        since=since,
        final_leader=2,
        final_ip_holder=1002,
        min_leader_changes=1,
        max_leader_changes=1,
        max_ip_moves=1,
    ).assert_ok()


# ---------------------------------------------------------------------- the checker itself
def _write_log(path: Path, events: list[dict[str, Any]]) -> Path:
    path.write_text("not json: a startup banner\n" + "".join(json.dumps(e) + "\n" for e in events))
    return path


def _gained(at: float) -> dict[str, Any]:
    return {"event": "gained", "mono": at, "at_mono": at}


def _lost(at: float, lease_ended: float) -> dict[str, Any]:
    return {"event": "lost", "mono": at, "at_mono": at, "lease_ended_mono": lease_ended}


def test_checker_passes_a_clean_handover(tmp_path: Path) -> None:
    logs = [
        NodeLog(1, True, 1001, _write_log(tmp_path / "1", [_gained(10.0), _lost(20.5, 20.0)])),
        NodeLog(2, True, 1002, _write_log(tmp_path / "2", [_gained(20.2)])),
        NodeLog(3, False, 1003, _write_log(tmp_path / "3", [])),
    ]
    history = [
        {"droplet_id": 1002, "source": "api", "requested_monotonic": 20.3,
         "completed_monotonic": 20.8},
    ]  # fmt: skip
    verdict = check_run(
        logs, history, since=15.0, until=30.0, final_leader=2, final_ip_holder=1002,
        min_leader_changes=1, max_leader_changes=1, min_ip_moves=1, max_ip_moves=1,
    )  # fmt: skip
    verdict.assert_ok()


def test_checker_catches_overlap_witness_and_rogue_assignment(tmp_path: Path) -> None:
    logs = [
        # Node 1 noticed late, but its lease ended at 20.4: still past node 2's start.
        NodeLog(1, True, 1001, _write_log(tmp_path / "1", [_gained(10.0), _lost(21.0, 20.4)])),
        NodeLog(2, True, 1002, _write_log(tmp_path / "2", [_gained(20.2)])),
        NodeLog(3, False, 1003, _write_log(tmp_path / "3", [_gained(25.0), _lost(25.5, 25.5)])),
    ]
    history = [
        {"droplet_id": 1001, "source": "api", "requested_monotonic": 22.0,
         "completed_monotonic": 22.5},
    ]  # fmt: skip
    verdict = check_run(logs, history, since=15.0, until=30.0, final_leader=2, max_ip_moves=0)
    problems = "\n".join(verdict.problems)
    assert "two leaders: node 1" in problems and "node 2" in problems
    assert "witness node 3 led" in problems
    assert "requested at 22.000 while node 1 was not leader" in problems
    assert "1 IP move(s), expected at most 0" in problems
    with pytest.raises(AssertionError, match="merged timeline"):
        verdict.assert_ok()


def test_checker_ends_a_killed_leaders_term_at_the_kill(tmp_path: Path) -> None:
    logs = [
        NodeLog(1, True, 1001, _write_log(tmp_path / "1", [_gained(10.0)]), deaths=(20.0,)),
        NodeLog(2, True, 1002, _write_log(tmp_path / "2", [_gained(20.6)])),
    ]
    check_run(logs, [], since=15.0, until=30.0, final_leader=2).assert_ok()
    alive = [NodeLog(1, True, 1001, logs[0].path), logs[1]]
    assert not check_run(alive, [], since=15.0, until=30.0).ok
