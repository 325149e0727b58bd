"""Real `fip-sidecar run` processes on loopback: elections, crashes, pauses, hand-overs.

Safety is checked from the nodes' own JSON logs, not from polling: each node's leadership
intervals ([gained.at_mono, min(lost.at_mono, lost.lease_ended_mono)), on the
CLOCK_MONOTONIC every process shares) must never overlap another node's. Polling /status
only tells us when to look. No assertion is about speed, except where the mechanism is
what is being tested (a resign hand-over versus waiting out a lease) and the margin is
several times the expected value.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.localcluster import LocalCluster, leadership_intervals, overlaps, read_events
from sidecar.messages import Heartbeat, Resign, VoteRequest
from sidecar.protocol import Codec, generate_cluster_key, parse_cluster_key

MakeCluster = Callable[..., LocalCluster]

#: Long enough that a failover by timeout is clearly distinguishable from a resign.
# A long lease makes "handed over by Resign" unmistakable from "waited out the promise"
# even on a loaded 2-core machine: a timeout hand-over would take at least 10 s.
SLOW_LEASE = {"heartbeat_interval": 0.1, "peer_timeout": 8.0, "lease_timeout": 10.0}


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[MakeCluster]:
    """Start clusters inside tmp_path; every process is stopped by PID at teardown."""
    started: list[LocalCluster] = []

    def make(**options: Any) -> LocalCluster:
        cluster = LocalCluster(tmp_path / f"cluster{len(started)}", **options)
        started.append(cluster)
        cluster.start()
        return cluster

    try:
        yield make
    finally:
        for cluster in started:
            cluster.stop()


def assert_safe(cluster: LocalCluster) -> None:
    """No two leadership intervals overlap, and no witness ever gained leadership."""
    intervals = cluster.intervals()
    assert overlaps(intervals) == [], intervals
    for node, member in cluster.members.items():
        if not member.eligible:
            assert cluster.events(node, "gained") == [], f"witness {node} led"


def gained_after(cluster: LocalCluster, node: int, since: float) -> dict[str, Any]:
    return cluster.wait_for_event(
        node, lambda e: e.get("event") == "gained" and e["at_mono"] > since, timeout=20.0
    )


# ---------------------------------------------------------------------- elections


def test_three_nodes_elect_node_1(make_cluster: MakeCluster) -> None:
    cluster = make_cluster()
    assert cluster.wait_for_leader(expect=1) == 1
    statuses = cluster.statuses()
    for node in (2, 3):
        body = statuses[node]
        assert body is not None
        assert body["role"] == "follower"
        assert body["leader_id"] == 1
    witness = statuses[3]
    assert witness is not None and witness["eligible"] is False
    assert len(cluster.events(1, "gained")) == 1
    assert_safe(cluster)


def test_acks_ride_in_heartbeats_six_datagrams_per_interval_and_rtt_still_measured(
    make_cluster: MakeCluster,
) -> None:
    """Three nodes send about 6 datagrams per heartbeat interval, not 12 (one ack per
    heartbeat): each heartbeat acknowledges the receiver's previous one. The bound is loose
    (a late wake-up only ever sends fewer), and RTT is still reported for every peer, on
    the leader and on the followers alike."""
    cluster = make_cluster()
    assert cluster.wait_for_leader(expect=1) == 1
    time.sleep(1.0)  # past the election's own burst of votes and hand-shakes
    per_interval = sum(per_heartbeat_interval(cluster, "packets_sent").values())
    print(f"\n{per_interval:.2f} datagrams per heartbeat interval (3 nodes)")
    assert per_interval < 9.0
    assert cluster.leaders() == [1]
    for node, rtts in peer_rtts(cluster).items():
        assert all(rtt is not None and 0 <= rtt < 1.0 for rtt in rtts.values()), (node, rtts)
    assert_safe(cluster)


def per_heartbeat_interval(
    cluster: LocalCluster, counter: str, seconds: float = 3.0
) -> dict[int, float]:
    """Per node, how much `/status` `packets.<counter>` grows per `lan` heartbeat interval."""

    def read() -> tuple[float, dict[int, int]]:
        statuses = cluster.statuses(timeout=2.0)
        assert all(s is not None for s in statuses.values()), statuses
        return time.monotonic(), {n: s["packets"][counter] for n, s in statuses.items()}

    start, before = read()
    time.sleep(seconds)
    end, after = read()
    intervals = (end - start) / 0.1  # lan heartbeat_interval
    return {n: (after[n] - before[n]) / intervals for n in after}


def peer_rtts(cluster: LocalCluster) -> dict[int, dict[int, float | None]]:
    """Per node, the RTT `/status` reports for each peer."""
    rtts = {}
    for node, body in cluster.statuses(timeout=2.0).items():
        assert body is not None
        rtts[node] = {peer["id"]: peer["rtt"] for peer in body["peers"]}
    return rtts


def test_an_idle_node_wakes_once_per_heartbeat_interval_and_rtt_stays_exact(
    make_cluster: MakeCluster,
) -> None:
    """A leader wakes for its heartbeats only (its acks wait in their buffers for the next
    one) and a follower for the leader's heartbeats only: about one wake-up per interval
    and node, where one per datagram was three on the leader and two on each follower.
    The bound is loose (an extra wake-up only ever comes from a late or extra packet).
    The round trips stay exact although acks wait: the kernel stamps their arrival."""
    cluster = make_cluster()
    assert cluster.wait_for_leader(expect=1) == 1
    time.sleep(1.0)  # past the election's own burst of votes and hand-shakes
    per_interval = per_heartbeat_interval(cluster, "wakeups")
    print(f"\nwake-ups per heartbeat interval: {per_interval}")
    assert all(rate < 1.5 for rate in per_interval.values()), per_interval
    assert cluster.leaders() == [1]
    for node, rtts in peer_rtts(cluster).items():
        # Loopback: well under the 0.1 s an ack may wait for its leader's next heartbeat.
        assert all(rtt is not None and 0 <= rtt < 0.05 for rtt in rtts.values()), (node, rtts)
    assert_safe(cluster)


def test_kill_9_of_the_leader_elects_node_2(make_cluster: MakeCluster) -> None:
    cluster = make_cluster()
    cluster.wait_for_leader(expect=1)
    before = cluster.kill(1, signal.SIGKILL)
    assert cluster.wait_for_leader(expect=2) == 2
    gained = gained_after(cluster, 2, before)
    assert gained["at_mono"] > before
    assert cluster.events(3, "gained") == []
    assert_safe(cluster)


def test_paused_leader_finds_its_lease_expired_and_never_overlaps(
    make_cluster: MakeCluster,
) -> None:
    cluster = make_cluster(timing={"preempt": False})
    cluster.wait_for_leader(expect=1)
    paused_at = cluster.pause(1)
    try:
        cluster.wait_for_leader(expect=2, agreed=False)
        new_gained = gained_after(cluster, 2, paused_at)
        # Stay paused well past the lease, so the old leader wakes up to a stale belief.
        time.sleep(1.0)
    finally:
        resumed_at = cluster.resume(1)
    lost = cluster.wait_for_event(
        1, lambda e: e.get("event") == "lost" and e["at_mono"] > paused_at, timeout=20.0
    )
    assert lost["reason"] == "lease_expired"
    # It noticed only after waking, but its lease had ended before node 2 took over.
    assert lost["at_mono"] >= resumed_at
    assert lost["lease_ended_mono"] < lost["at_mono"]
    assert lost["lease_ended_mono"] <= new_gained["at_mono"]
    # Back as a follower of node 2 (preempt is off), and no overlap anywhere.
    assert cluster.wait_for_leader(expect=2) == 2
    assert_safe(cluster)


def test_sigterm_of_the_leader_hands_over_by_resigning(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(timing=SLOW_LEASE)
    cluster.wait_for_leader(expect=1)
    sent_at = cluster.kill(1, signal.SIGTERM)
    assert cluster.wait_exit(1) == 0
    lost = cluster.wait_for_event(1, lambda e: e.get("event") == "lost")
    assert lost["reason"] == "shutdown"
    assert cluster.events(1, "stopped"), "a clean stop logs `stopped`"
    gained = gained_after(cluster, 2, sent_at)
    # Without the resign, node 2 would have to wait out its promise to node 1: about
    # lease_timeout (10 s) after node 1's last heartbeat. The resign makes it one round
    # trip; half the lease is a margin of many times the expected value.
    assert gained["at_mono"] - lost["at_mono"] < SLOW_LEASE["lease_timeout"] / 2
    assert_safe(cluster)


@pytest.mark.slow
def test_simultaneous_starts_never_elect_two_leaders(tmp_path: Path) -> None:
    """Three nodes started at the same instant, many times over: one leader at a time.

    Even trials release all three from SIGSTOP together once each has bound its port (the
    elections begin in the same millisecond); odd trials just spawn them back to back, so
    their start-up skew is whatever the machine's load makes it.
    """
    trials = int(os.environ.get("FIP_STARTUP_TRIALS", "50"))
    leaders: list[int] = []
    for trial in range(trials):
        cluster = LocalCluster(tmp_path / f"trial{trial}")
        try:
            cluster.start(synchronized=trial % 2 == 0)
            leaders.append(cluster.wait_for_leader())
            for node in cluster.nodes:
                cluster.kill(node, signal.SIGKILL)
                cluster.wait_exit(node)
            assert_safe(cluster)
        finally:
            cluster.stop()
    print(f"first leader per trial: {dict(Counter(leaders))}")  # shown with -s
    assert set(leaders) <= {1, 2}, leaders


def test_a_witness_never_leads_even_with_a_majority(make_cluster: MakeCluster) -> None:
    """Five members, two eligible: once both are gone the three witnesses form a majority,
    and still nobody may lead."""
    cluster = make_cluster(size=5, witnesses=[3, 4, 5])
    cluster.wait_for_leader(expect=1)
    cluster.kill(1)
    cluster.wait_for_leader(expect=2)
    gone_at = cluster.kill(2)
    for _ in range(30):  # 3 s: many peer timeouts and election rounds
        assert cluster.leaders() == []
        time.sleep(0.1)
    for node in (3, 4, 5):
        body = cluster.status(node)
        assert body is not None and body["role"] == "follower" and body["leader_id"] is None
        later = [e for e in cluster.events(node) if e.get("mono", 0) > gone_at]
        assert not any(e.get("event") in ("candidate", "gained") for e in later)
    assert_safe(cluster)


# ---------------------------------------------------------------------- hostile packets


def _forged_packets(cluster: LocalCluster, term: int) -> list[tuple[int, bytes]]:
    """(target node, datagram) pairs: garbage, and well-formed packets under a wrong key
    that would depose or confuse the leader if they were believed."""
    wrong_key = parse_cluster_key(generate_cluster_key())
    assert wrong_key != parse_cluster_key(cluster.key_path.read_text())
    packets: list[tuple[int, bytes]] = []
    for size in (0, 1, 7, 64, 200, 1400, 9000):
        packets.append((1, os.urandom(size)))
    wall = time.time()
    mono = time.monotonic()
    as_node_2 = Codec(2, wrong_key, [1, 3], incarnation=time.time_ns())
    as_node_1 = Codec(1, wrong_key, [2, 3], incarnation=time.time_ns())
    for _ in range(3):
        packets.append((1, as_node_2.encode(Resign(term + 10, "forged"), 1, now=mono, wall=wall)))
        packets.append(
            (
                1,
                as_node_2.encode(
                    Heartbeat(
                        term=term + 10,
                        seq=1,
                        leader_id=2,
                        leading=True,
                        eligible=True,
                        healthy=True,
                        viable=True,
                        ready_to_preempt=True,
                    ),
                    1,
                    now=mono,
                    wall=wall,
                ),
            )
        )
        packets.append((3, as_node_2.encode(VoteRequest(term + 10, 1), 3, now=mono, wall=wall)))
        packets.append((2, as_node_1.encode(Resign(term + 10, "forged"), 2, now=mono, wall=wall)))
    return packets


def test_forged_packets_are_dropped_counted_and_never_depose_the_leader(
    make_cluster: MakeCluster,
) -> None:
    cluster = make_cluster()
    cluster.wait_for_leader(expect=1)
    first = cluster.status(1)
    assert first is not None
    term = first["term"]
    dropped_before = {
        n: sum(body["packets"]["dropped"].values())
        for n, body in cluster.statuses().items()
        if body is not None
    }
    packets = _forged_packets(cluster, term)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for target, data in packets:
            sock.sendto(data, ("127.0.0.1", cluster.members[target].udp_port))
    time.sleep(1.0)  # longer than a lease: a believed Resign or term bump would show
    sent_to = {n: sum(1 for t, _ in packets if t == n) for n in cluster.nodes}
    statuses = cluster.statuses()
    for node, body in statuses.items():
        assert body is not None
        assert body["term"] == term, f"node {node} adopted a forged term"
        assert body["leader_id"] == 1
        dropped = body["packets"]["dropped"]
        assert sum(dropped.values()) - dropped_before[node] >= sent_to[node], dropped
    assert statuses[1] is not None and statuses[1]["packets"]["dropped"]["bad_mac"] >= 6
    assert cluster.events(1, "lost") == []
    assert_safe(cluster)


# ---------------------------------------------------------------------- config errors


@pytest.mark.parametrize("command", ["run", "check-config"])
def test_a_misspelt_key_exits_2_naming_it(tmp_path: Path, command: str) -> None:
    (tmp_path / "cluster.key").write_text(generate_cluster_key() + "\n")
    config = tmp_path / "node.toml"
    config.write_text(
        'node_id = 1\nbind = "127.0.0.1:7401"\ncluster_key_file = "cluster.key"\n'
        '[[peers]]\nid = 2\naddress = "127.0.0.1:7402"\n'
        "[timing]\nheartbeat_intervall = 0.1\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", command, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "timing.heartbeat_intervall" in lines[0]


# ---------------------------------------------------------------------- the log analysis itself


def test_interval_analysis_catches_an_overlap() -> None:
    """The checker above must be able to fail: feed it two overlapping leaders."""
    a = leadership_intervals(
        1,
        [
            {"event": "gained", "at_mono": 10.0, "term": 1},
            {"event": "lost", "at_mono": 12.0, "lease_ended_mono": 11.5, "reason": "x"},
        ],
    )
    b = leadership_intervals(2, [{"event": "gained", "at_mono": 11.4, "term": 2}])
    c = leadership_intervals(3, [{"event": "gained", "at_mono": 11.5, "term": 2}], [20.0])
    assert [i.end for i in a] == [11.5]
    assert len(overlaps(a + b)) == 1
    assert overlaps(a + c) == []
    assert c[0].end == 20.0  # killed: ends at the kill
    assert read_events(Path("/nonexistent/log")) == []
