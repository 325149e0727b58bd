"""A reserved IPv4 and a reserved IPv6 held by one cluster, on real processes over loopback.

The emulator serves both (an IPv4 edge on 127.0.0.1, an IPv6 edge on ::1), each node's
config lists both under `[[addresses]]`, and each address has its own assigner. What the
tests believe comes from outside the sidecars: the emulator's history per address, the
edges' `x-fip-droplet` header, and what the hook scripts wrote. No assertion is about speed.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_failover_ip import ASSIGNER, DROPLET, FAST_HEALTH, TIMING, admin, settle_on_node_1
from test_hooks import read_env_dump, write_script

from sidecar.localcluster import DEFAULT_RESERVED_IP, LocalCluster, overlaps
from sidecar.status_cli import render

IP4 = DEFAULT_RESERVED_IP
IP6 = "2001:db8::10"


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., LocalCluster]]:
    """Start a two-address cluster (extra `emulate` flags allowed), stopped at teardown."""
    dumps = tmp_path / "hooks"
    dumps.mkdir()
    hook = write_script(
        tmp_path / "hook.sh", f'env -0 > "{dumps}/$FIP_NODE_ID.$FIP_EVENT.$FIP_FAMILY"\n'
    )
    started: list[LocalCluster] = []

    def make(*emulator_flags: str) -> LocalCluster:
        local = LocalCluster(
            tmp_path / "cluster",
            with_ip=True,
            reserved_ipv6=IP6,
            timing=TIMING,
            health=FAST_HEALTH,
            assigner=ASSIGNER,
            hooks={"on_address_gained": [hook], "on_address_lost": [hook]},
            emulator_flags=("--action-seconds", "0.5", *emulator_flags),
        )
        started.append(local)
        local.start()
        return local

    try:
        yield make
    finally:
        for local in started:
            local.stop()


@pytest.fixture
def cluster(make_cluster: Callable[..., LocalCluster]) -> LocalCluster:
    return make_cluster()


def hook_env(cluster: LocalCluster, node: int, event: str, family: str) -> dict[str, str]:
    """What node's hook saw for (event, family), waiting a bounded time for it."""
    path = cluster.workdir.parent / "hooks" / f"{node}.{event}.{family}"
    deadline = time.monotonic() + 20.0
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size > 0:
            time.sleep(0.1)  # the hook has finished writing
            return read_env_dump(path)
        time.sleep(0.05)
    raise AssertionError(f"no {event} hook for {family} on node {node}")


def edge_answers_from(url: str, droplet: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    with httpx.Client(trust_env=False, timeout=2.0) as client:
        while time.monotonic() < deadline:
            try:
                response = client.get(f"{url}/")
                last = (response.status_code, response.headers.get("x-fip-droplet"))
                if last == (200, str(droplet)):
                    return
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.05)
    raise AssertionError(f"{url} never answered from droplet {droplet}; last: {last}")


def address_status(cluster: LocalCluster, node: int) -> dict[str, dict[str, Any]]:
    status = cluster.status(node)
    assert status is not None, f"node {node} does not answer"
    return {entry["family"]: entry for entry in status["addresses"]}


def here(entry: dict[str, Any]) -> bool:
    return bool(entry["leading"] and entry["holder_droplet_id"] == entry["droplet_id"])


def test_both_addresses_follow_the_leader_and_hooks_see_each(cluster: LocalCluster) -> None:
    settle_on_node_1(cluster)
    cluster.wait_for_holder(DROPLET[1], ip=IP6)
    assert cluster.edge_url is not None and cluster.edge6_url is not None
    assert cluster.edge6_url.startswith("http://[::1]:")
    edge_answers_from(cluster.edge_url, DROPLET[1])
    edge_answers_from(cluster.edge6_url, DROPLET[1])
    for family, ip in (("ipv4", IP4), ("ipv6", IP6)):
        gained = hook_env(cluster, 1, "address_gained", family)
        assert (gained["FIP_EVENT"], gained["FIP_ADDRESS"], gained["FIP_FAMILY"]) == (
            "address_gained",
            ip,
            family,
        )
        assert gained["FIP_ROLE"] == "leader" and gained["FIP_FLOATING_IP"] == IP4
    status = cluster.status(1)
    assert status is not None and status["floating_ip"]["reserved_ip"] == IP4
    assert [e["reserved_ip"] for e in status["addresses"]] == [IP4, IP6]
    assert all(here(e) for e in status["addresses"])
    shown = render(status)
    assert f"address {IP4} (ipv4): here" in shown and f"address {IP6} (ipv6): here" in shown
    metrics = httpx.get(f"{cluster.members[1].status_url}/metrics", timeout=2.0).text
    assert f'fip_address_here{{address="{IP6}",family="ipv6"}} 1.0' in metrics
    assert f'address="{IP6}"' in metrics.split("fip_api_requests_total", 1)[1]

    stopped = cluster.kill(1, signal.SIGTERM)  # a resign: node 1's lost hooks run first
    assert cluster.wait_exit(1) == 0
    for family, ip in (("ipv4", IP4), ("ipv6", IP6)):
        lost = hook_env(cluster, 1, "address_lost", family)
        assert (lost["FIP_EVENT"], lost["FIP_ADDRESS"], lost["FIP_FAMILY"]) == (
            "address_lost",
            ip,
            family,
        )
        cluster.wait_for_holder(DROPLET[2], since=stopped, ip=ip)
        assert hook_env(cluster, 2, "address_gained", family)["FIP_ADDRESS"] == ip
    edge_answers_from(cluster.edge_url, DROPLET[2])
    edge_answers_from(cluster.edge6_url, DROPLET[2])
    entries = address_status(cluster, 2)
    assert here(entries["ipv4"]) and here(entries["ipv6"])
    assert overlaps(cluster.intervals()) == []


@pytest.mark.parametrize("mode", ["error", "hang"])
def test_a_failing_ipv6_api_never_stalls_the_ipv4(cluster: LocalCluster, mode: str) -> None:
    settle_on_node_1(cluster)
    cluster.wait_for_holder(DROPLET[1], ip=IP6)
    broken: dict[str, Any] = {"path_prefixes": ["/v2/reserved_ipv6"]}
    if mode == "error":
        broken |= {"error_rate": 1.0, "error_status": 500}
    else:
        broken |= {"outage_mode": "hang", "outage_seconds": 600.0}
    admin(cluster, "POST", "faults", broken)

    killed = cluster.kill(1)
    moved = cluster.wait_for_holder(DROPLET[2], since=killed, ip=IP4)
    assert moved["source"] == "api"
    assert cluster.holder(IP6) == DROPLET[1], "the IPv6 API is down: nothing moved it"
    assert cluster.edge_url is not None
    edge_answers_from(cluster.edge_url, DROPLET[2])
    deadline = time.monotonic() + 30.0
    entries = address_status(cluster, 2)
    while time.monotonic() < deadline and not (
        here(entries["ipv4"]) and entries["ipv6"]["last_error"] is not None
    ):
        time.sleep(0.2)
        entries = address_status(cluster, 2)
    assert here(entries["ipv4"]) and entries["ipv4"]["last_error"] is None, entries["ipv4"]
    assert not here(entries["ipv6"]) and entries["ipv6"]["last_error"] is not None
    assert cluster.holder(IP6) == DROPLET[1]

    admin(cluster, "POST", "faults", {"clear": True})
    cluster.wait_for_holder(DROPLET[2], since=killed, ip=IP6, timeout=40.0)
    assert cluster.edge6_url is not None
    edge_answers_from(cluster.edge6_url, DROPLET[2])


def test_an_api_that_refuses_both_families_on_one_droplet_stalls_nothing(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    """`--forbid-mixed-families`: the API's other possible answer. Whichever address
    reaches the droplet first keeps it; the other reports its 422 per address and keeps
    retrying, and the first is never disturbed."""
    cluster = make_cluster("--forbid-mixed-families")
    cluster.wait_for_leader(expect=1, timeout=20.0 + TIMING["preempt_delay"])
    deadline = time.monotonic() + 30.0
    entries = address_status(cluster, 1)
    while time.monotonic() < deadline and not (
        any(here(e) for e in entries.values())
        and any(
            "reserved IPV" in (e["last_error"] or {}).get("message", "")
            for e in entries.values()
            if not here(e)
        )
    ):  # a first 422 may be "pending event" (both POSTs at once); then the family rule
        time.sleep(0.2)
        entries = address_status(cluster, 1)
    held = [family for family, e in entries.items() if here(e)]
    refused = [family for family, e in entries.items() if not here(e)]
    assert len(held) == 1 and len(refused) == 1, entries
    assert entries[refused[0]]["last_error"]["status"] == 422
    assert "reserved IPV" in entries[refused[0]]["last_error"]["message"]
    holders = {ip: cluster.holder(ip) for ip in (IP4, IP6)}
    assert sorted(holders.values(), key=str) == [DROPLET[1], None], holders
    assert hook_env(cluster, 1, "address_gained", held[0])["FIP_FAMILY"] == held[0]
