"""Real processes on loopback: a second process speaking as node 1, and wall clocks that are
off or step (issue 12 items 1 and 2, issue 10 item 5).

On the old protocol (FIP1) freshness came from the wall clock and the highest incarnation
(the start time in ns) won: a second `fip-sidecar run` with node 1's config, even one that
lived 0.3 s, locked the genuine node 1 out for 120 s (2 IP moves); a node restarted with
its clock set back was refused as stale; a +120 s step on the leader was a failover.
FIP3 (echoed challenges, random incarnations, `sidecar/peers.py`) must keep the genuine
node leading with 0 IP moves, say what happened in one WARNING per cause, and show it in
/status (`peers[].duplicates`, `peers[].clock_offset`).

Clocks are faked per process with Debian's libfaketime (LD_PRELOAD, monotonic clock left
alone, the offset read from a file on every call so a running process can be stepped).
Every process here is started by this file and stopped by PID.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sidecar.localcluster import LocalCluster, Member, read_events
from sidecar.peers import RECENT

pytestmark = pytest.mark.timeout(240)

FAKETIME_LIBRARIES = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
#: A second loopback address for the duplicate: another "host" with the same config.
OTHER_LOOPBACK = "127.0.0.2"
STEP = 120.0
#: So that a pre-emption (FIP1's answer to a lock-out ending) shows within a test, and so
#: that a cold start that elected node 2 first (old main, issue 10) settles on node 1 soon.
SHORT_PREEMPT = {"preempt_delay": 2.0}


def _faketime_library() -> str:
    if not FAKETIME_LIBRARIES:
        pytest.skip("libfaketime is not installed (Debian package faketime; ./dev test adds it)")
    return FAKETIME_LIBRARIES[0]


@contextlib.contextmanager
def _environ(changes: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration (children inherit them), then restore."""
    saved = {key: os.environ.get(key) for key in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class SkewableCluster(LocalCluster):
    """A LocalCluster whose members in `faked` run under libfaketime; `set_clock(node, s)`
    sets (or steps, while it runs) that member's wall-clock offset in seconds."""

    def __init__(self, workdir: Path, *, faked: tuple[int, ...], **options: Any) -> None:
        super().__init__(workdir, **options)
        self.faked = faked
        self.library = _faketime_library() if faked else ""
        for node in faked:
            self.set_clock(node, 0.0)

    def clock_file(self, node: int) -> Path:
        return self.workdir / f"node{node}.faketime"

    def set_clock(self, node: int, offset: float) -> None:
        path = self.clock_file(node)
        path.with_suffix(".tmp").write_text(f"{offset:+.0f}\n")
        path.with_suffix(".tmp").replace(path)  # never a half-written offset

    def _spawn(self, member: Member) -> None:
        if member.id not in self.faked:
            super()._spawn(member)
            return
        fake = {
            "LD_PRELOAD": self.library,
            "FAKETIME_TIMESTAMP_FILE": str(self.clock_file(member.id)),
            "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        }
        with _environ(fake):
            super()._spawn(member)


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., SkewableCluster]]:
    made: list[SkewableCluster] = []

    def make(faked: tuple[int, ...] = (), **options: Any) -> SkewableCluster:
        cluster = SkewableCluster(tmp_path / f"cluster{len(made)}", faked=faked, **options)
        made.append(cluster)
        cluster.start()
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            cluster.stop()


# ---------------------------------------------------------------------- what we watch


@dataclass
class Watch:
    """What every /status poll of the cluster said, and what the nodes logged, since `since`."""

    cluster: LocalCluster
    since: float = field(default_factory=time.monotonic)
    moves_before: int = 0
    #: (observer, peer) -> polls in which the observer did not count the peer alive
    not_alive: dict[tuple[int, int], int] = field(default_factory=dict)
    leaders_seen: set[int | None] = field(default_factory=set)
    duplicates_seen: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    #: (observer, peer) -> (when, clock_offset) from every poll that showed one
    offsets_seen: dict[tuple[int, int], list[tuple[float, float]]] = field(default_factory=dict)

    @classmethod
    def start(cls, cluster: LocalCluster) -> Watch:
        return cls(cluster, moves_before=len(cluster.emulator_history()))

    def poll_for(self, seconds: float, interval: float = 0.1) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.poll()
            time.sleep(interval)

    def poll(self) -> None:
        at = time.monotonic()
        for node, body in self.cluster.statuses().items():
            if body is None:
                continue
            self.leaders_seen.add(body.get("leader_id"))
            for peer in body["peers"]:
                key = (node, peer["id"])
                if not peer["alive"]:
                    self.not_alive[key] = self.not_alive.get(key, 0) + 1
                for duplicate in peer.get("duplicates") or []:
                    self.duplicates_seen.setdefault(node, []).append(duplicate)
                if peer.get("clock_offset") is not None:
                    self.offsets_seen.setdefault(key, []).append((at, peer["clock_offset"]))

    def ip_moves(self) -> int:
        return len(self.cluster.emulator_history()) - self.moves_before

    def logged(self, node: int, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.cluster.events(node, kind) if e.get("mono", 0.0) > self.since]

    def assert_node_1_kept_everything(self) -> None:
        """0 IP moves, node 1 never lost the lead, nobody changed leader: checked first,
        because that is what the old protocol got wrong."""
        assert self.ip_moves() == 0, f"the IP moved: {self.cluster.emulator_history()[-3:]}"
        assert self.logged(1, "lost") == [], self.logged(1, "lost")
        for node in (2, 3):  # a restarted node learning that node 1 leads is no change
            changes = [e for e in self.logged(node, "leader_changed") if e["current"] != 1]
            assert changes == [], changes
        assert self.leaders_seen == {1}, self.leaders_seen
        assert self.cluster.leader() == 1


def _all_counted(cluster: LocalCluster, peer: int, observers: tuple[int, ...] = (1, 2, 3)) -> bool:
    statuses = cluster.statuses()
    for node in observers:
        if node == peer:
            continue
        body = statuses.get(node)
        if body is None or not any(p["id"] == peer and p["alive"] for p in body["peers"]):
            return False
    return True


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until `predicate` holds (bounded); return how long it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.02)
    return time.monotonic() - start


# ---------------------------------------------------------------------- a duplicate node id


def _free_port(kind: int, host: str) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class Duplicate:
    process: subprocess.Popen[bytes]
    log_path: Path
    source: str

    def started(self, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in read_events(self.log_path):
                if event.get("event") == "started":
                    return event
            if self.process.poll() is not None:
                raise AssertionError(f"the duplicate exited: {self.log_path.read_text()}")
            time.sleep(0.01)
        raise AssertionError("the duplicate never logged `started`")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


@contextlib.contextmanager
def duplicate_of_node_1(cluster: LocalCluster) -> Iterator[Duplicate]:
    """`fip-sidecar run` with node 1's config and key on another address: a cloned droplet."""
    udp = _free_port(socket.SOCK_DGRAM, OTHER_LOOPBACK)
    status = _free_port(socket.SOCK_STREAM, OTHER_LOOPBACK)
    text = cluster.config_text(1)
    text = re.sub(r'(?m)^bind = ".*"$', f'bind = "{OTHER_LOOPBACK}:{udp}"', text)
    text = re.sub(
        r'(?m)^status_listen = ".*"$', f'status_listen = "{OTHER_LOOPBACK}:{status}"', text
    )
    assert f"{OTHER_LOOPBACK}:{udp}" in text and "node_id = 1" in text
    path = cluster.workdir / "duplicate1.toml"
    path.write_text(text)
    log_path = cluster.workdir / "duplicate1.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIP_SIDECAR_")}
    env.pop("DIGITALOCEAN_TOKEN", None)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "sidecar.cli", "run", "--config", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            start_new_session=True,
        )
    duplicate = Duplicate(process, log_path, f"{OTHER_LOOPBACK}:{udp}")
    try:
        yield duplicate
    finally:
        duplicate.stop(signal.SIGKILL)


@pytest.mark.parametrize("lifetime", [4.0, 0.3], ids=["runs-4s", "dies-after-0.3s"])
def test_a_second_process_with_node_1s_id_never_costs_it_the_lead(
    make_cluster: Callable[..., SkewableCluster], lifetime: float
) -> None:
    cluster = make_cluster(with_ip=True, timing=SHORT_PREEMPT)
    assert cluster.wait_stable(expect=1, timeout=60.0) == 1
    cluster.wait_for_holder(1001)
    genuine = cluster.events(1, "started")[-1].get("incarnation")
    watch = Watch.start(cluster)

    with duplicate_of_node_1(cluster) as duplicate:
        started = duplicate.started()
        copy = started.get("incarnation")
        while time.monotonic() < started["mono"] + lifetime:
            watch.poll()
            time.sleep(min(0.1, max(0.0, started["mono"] + lifetime - time.monotonic())))
        duplicate.stop(signal.SIGKILL if lifetime < 1 else signal.SIGTERM)
        lived = time.monotonic() - started["mono"]
    watch.poll_for(2.0)  # the aftermath: a lock-out would show here

    print(f"\nduplicate lived {lived:.2f} s after `started`; IP moves {watch.ip_moves()}")
    watch.assert_node_1_kept_everything()
    assert copy is not None and copy != genuine
    for observer in (2, 3):
        assert watch.not_alive.get((observer, 1), 0) == 0, f"node {observer} lost node 1"
        assert [e for e in watch.logged(observer, "peer_restarted") if e["peer"] == 1] == []
        warnings = watch.logged(observer, "duplicate_id")
        assert [(w["level"], w["peer"], w["kept"], w["dropped"]) for w in warnings] == [
            ("WARNING", 1, genuine, copy)
        ], warnings
        seen = [d for d in watch.duplicates_seen.get(observer, []) if d["incarnation"] == copy]
        assert seen and all(d["source"] == duplicate.source for d in seen), seen

    # Afterwards nothing is locked out, and the duplicate leaves /status once it is quiet.
    assert _all_counted(cluster, 1)
    _wait(
        lambda: all(
            not p.get("duplicates")
            for body in cluster.statuses().values()
            if body is not None
            for p in body["peers"]
        ),
        RECENT + 5,
        "the duplicate is still listed",
    )
    watch.assert_node_1_kept_everything()


# ---------------------------------------------------------------------- wall clocks


def test_a_node_restarted_with_its_clock_set_back_is_counted_again_at_once(
    make_cluster: Callable[..., SkewableCluster],
) -> None:
    """Node 2 crashes and comes back with its wall clock 120 s behind (e.g. corrected from
    a bad NTP server). The offset is set before the process starts: the new process is
    already skewed, as after a reboot."""
    cluster = make_cluster(faked=(2,), with_ip=True, timing=SHORT_PREEMPT)
    assert cluster.wait_stable(expect=1, timeout=60.0) == 1
    cluster.wait_for_holder(1001)
    watch = Watch.start(cluster)

    killed = cluster.kill(2)
    cluster.wait_exit(2)
    _wait(lambda: not _all_counted(cluster, 2), 5.0, "node 2 still counted after its death")
    cluster.set_clock(2, -STEP)
    cluster.start_node(2, wait=False)
    rejoin = _wait(lambda: _all_counted(cluster, 2), 30.0, "node 2 not counted again")
    counted_at = time.monotonic()
    watch.poll_for(2.0)

    started = cluster.events(2, "started")[-1]
    restarted = [e for n in (1, 3) for e in watch.logged(n, "peer_restarted") if e.get("peer") == 2]
    print(
        f"\nnode 2 (clock {-STEP:+.0f} s): counted again {counted_at - killed:.2f} s after "
        f"the kill, {counted_at - started['mono']:.3f} s after its `started` line (polled); "
        "by the peers' `peer_restarted` lines: "
        + ", ".join(f"{e['mono'] - started['mono']:.3f} s" for e in restarted)
    )
    watch.assert_node_1_kept_everything()
    # Within a lease or two of its start (lease_timeout 0.6 s); FIP1 never let it back.
    assert counted_at - started["mono"] < 5.0, rejoin
    assert len(restarted) == 2 and all(e["mono"] - started["mono"] < 1.2 for e in restarted)
    for observer in (1, 3):
        warnings = [w for w in watch.logged(observer, "clock_offset") if w["peer"] == 2]
        assert len(warnings) == 1 and warnings[0]["level"] == "WARNING", warnings
        assert warnings[0]["offset"] == pytest.approx(-STEP, abs=2.0)
        assert "peer 2's wall clock is -120" in warnings[0]["message"]
        offsets = [offset for _, offset in watch.offsets_seen.get((observer, 2), [])]
        assert offsets and offsets[-1] == pytest.approx(-STEP, abs=2.0), offsets
    body = cluster.status(2)
    assert body is not None and body["leader_id"] == 1 and body["role"] == "follower"


def test_a_wall_clock_step_on_the_leader_moves_nothing(
    make_cluster: Callable[..., SkewableCluster],
) -> None:
    """Node 1 leads; its wall clock jumps +120 s while it runs, then is corrected back.
    preempt_delay is short so that a correction-driven pre-emption (FIP1: 30 s later)
    would show within the test."""
    cluster = make_cluster(faked=(1,), with_ip=True, timing=SHORT_PREEMPT)
    assert cluster.wait_stable(expect=1, timeout=60.0) == 1
    cluster.wait_for_holder(1001)
    watch = Watch.start(cluster)
    watch.poll_for(1.0)

    stepped = time.monotonic()
    cluster.set_clock(1, STEP)
    watch.poll_for(4.0)
    watch.assert_node_1_kept_everything()  # FIP1: a failover 0.5 s after the step
    corrected = time.monotonic()
    cluster.set_clock(1, 0.0)
    watch.poll_for(4.0)  # past preempt_delay: FIP1 pre-empted back here
    watch.assert_node_1_kept_everything()

    for observer in (2, 3):
        assert watch.not_alive.get((observer, 1), 0) == 0, f"node {observer} lost node 1"
        warnings = [w for w in watch.logged(observer, "clock_offset") if w["peer"] == 1]
        assert [(w["level"], round(w["offset"])) for w in warnings][:1] == [("WARNING", 120)]
        assert "peer 1's wall clock is +120" in warnings[0]["message"]
        seen = watch.offsets_seen[(observer, 1)]
        after_step = [(t, o) for t, o in seen if stepped < t < corrected and abs(o - STEP) < 2]
        assert after_step, seen
        assert abs(seen[-1][1]) < 2.0, seen  # the correction shows too
        print(
            f"\nnode 1's +{STEP:.0f} s step showed in node {observer}'s /status "
            f"{after_step[0][0] - stepped:.2f} s after it (first poll); IP moves {watch.ip_moves()}"
        )
    # The leader itself sees both peers 120 s behind while its clock is ahead.
    for peer in (2, 3):
        offsets = [round(w["offset"]) for w in watch.logged(1, "clock_offset") if w["peer"] == peer]
        assert offsets[:1] == [-120], offsets
