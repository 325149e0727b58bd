"""Three nodes in one Trio program (the library API), with /status, /metrics and the CLI view."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from sidecar import config
from sidecar.election import GainedLeadership, LostLeadership, Role
from sidecar.metrics import Metrics
from sidecar.node import Node
from sidecar.protocol import generate_cluster_key
from sidecar.status import StatusApp, serve_status
from sidecar.status_cli import render


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cluster_configs(tmp_path: Path, eligible: dict[int, bool]) -> list[config.Config]:
    key = tmp_path / "cluster.key"
    key.write_text(generate_cluster_key())
    udp = {i: free_port(socket.SOCK_DGRAM) for i in eligible}
    configs = []
    for me in eligible:
        lines = [
            f"node_id = {me}",
            f'bind = "127.0.0.1:{udp[me]}"',
            f'status_listen = "127.0.0.1:{free_port(socket.SOCK_STREAM)}"',
            f'cluster_key_file = "{key}"',
            f"eligible = {str(eligible[me]).lower()}",
        ]
        for other, other_eligible in eligible.items():
            if other != me:
                lines += [
                    "[[peers]]",
                    f"id = {other}",
                    f'address = "127.0.0.1:{udp[other]}"',
                    f"eligible = {str(other_eligible).lower()}",
                ]
        path = tmp_path / f"node{me}.toml"
        path.write_text("\n".join(lines) + "\n")
        configs.append(config.load(path, env={}))
    return configs


@pytest.fixture
async def three_nodes(tmp_path: Path) -> AsyncIterator[list[Node]]:
    nodes = [Node(c) for c in cluster_configs(tmp_path, {1: True, 2: True, 3: False})]
    async with trio.open_nursery() as nursery:
        for node in nodes:
            await nursery.start(node.run)
        yield nodes
        nursery.cancel_scope.cancel()


async def wait_for_leader(nodes: list[Node]) -> Node:
    with trio.fail_after(10):
        while True:
            leaders = [n for n in nodes if n.is_leader()]
            if leaders:
                return leaders[0]
            await trio.sleep(0.02)


async def test_library_api_elects_node_1_and_publishes_events(three_nodes: list[Node]) -> None:
    events = three_nodes[0].subscribe()
    leader = await wait_for_leader(three_nodes)
    assert leader.config.node_id == 1
    with trio.fail_after(5):
        scope = await leader.wait_until_leader()
    assert not scope.cancel_called
    with trio.fail_after(5):
        async for event in events:
            if isinstance(event, GainedLeadership):
                break
    assert all(n.view().leader_id == 1 for n in three_nodes)


async def test_resign_cancels_leadership_scope_and_hands_over(three_nodes: list[Node]) -> None:
    leader = await wait_for_leader(three_nodes)
    scope = await leader.wait_until_leader()
    events = leader.subscribe()
    leader.request_shutdown()
    with trio.fail_after(5):
        async for event in events:
            if isinstance(event, LostLeadership):
                break
    assert scope.cancel_called
    new_leader = await wait_for_leader(three_nodes[1:])
    assert new_leader.config.node_id == 2
    assert three_nodes[2].view().role is not Role.LEADER  # the witness never leads


async def test_status_and_metrics_endpoints(three_nodes: list[Node]) -> None:
    await wait_for_leader(three_nodes)
    node = three_nodes[0]
    metrics = Metrics()
    metrics.watch(node)
    app = StatusApp(node, metrics)
    app.add_section("broken", lambda: 1 / 0)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_status, app, node.config.status_listen)
        base = f"http://{node.config.status_listen}"
        async with httpx.AsyncClient(base_url=base, timeout=5) as client:
            assert (await client.get("/healthz")).text == "ok\n"
            assert (await client.get("/nope")).status_code == 404
            assert (await client.post("/status")).status_code == 405
            status = (await client.get("/status")).json()
            metrics_text = (await client.get("/metrics")).text
        nursery.cancel_scope.cancel()

    assert status["node_id"] == 1 and status["role"] == "leader" and status["leader_id"] == 1
    assert isinstance(status["term"], int) and status["term"] >= 1
    assert status["eligible"] is True and status["healthy"] is True
    assert 0 < status["lease_remaining"] <= 0.6
    assert status["broken"] == {"error": "ZeroDivisionError"}
    peers = {p["id"]: p for p in status["peers"]}
    assert set(peers) == {2, 3}
    assert peers[3]["eligible"] is False and peers[2]["alive"] is True
    for peer in peers.values():
        assert isinstance(peer["last_heard_age"], float)
        assert set(peer) >= {"id", "alive", "eligible", "healthy"}

    families = {f.name: f for f in text_string_to_metric_families(metrics_text)}
    assert families["fip_is_leader"].samples[0].value == 1
    assert families["fip_term"].samples[0].value >= 1
    assert {s.labels["reason"] for s in families["fip_packets_dropped"].samples} >= {
        "bad_mac",
        "replay",
        "malformed",
    }
    for name in (
        "fip_peer_alive",
        "fip_elections",
        "fip_leader_changes",
        "fip_heartbeat_rtt_seconds",
        "fip_api_requests",
        "fip_assignment_duration_seconds",
    ):
        assert name in families, name

    text = render(status)
    assert text.startswith("node 1: leader (term")
    assert "lease:" in text and "peer" in text
