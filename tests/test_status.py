"""Three nodes in one Trio program (the library API), with /status, /metrics and the CLI view;
and the status port's HTTP server (`sidecar/httpserver.py`) against clients good and bad."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from sidecar import config
from sidecar import node as node_module
from sidecar.election import GainedLeadership, LostLeadership, Role
from sidecar.httpserver import HTTPServer, Limits, Response, Route
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


async def test_the_election_runs_while_trios_thread_is_blocked(three_nodes: list[Node]) -> None:
    """The election has a thread of its own: an embedding program that blocks Trio's thread
    for far longer than a lease (a slow listener, a synchronous call, a stuck task) costs
    the leader neither its lease nor its term, and no follower notices."""
    leader = await wait_for_leader(three_nodes)
    term = leader.view().term
    events = [node.subscribe() for node in three_nodes]
    sent_before = [node.counter_values()["packets_sent"] for node in three_nodes]
    time.sleep(3 * leader.config.timing.lease_timeout)  # noqa: ASYNC251 (the point: block Trio)
    assert leader.is_leader()
    sent = [
        node.counter_values()["packets_sent"] - before
        for node, before in zip(three_nodes, sent_before, strict=True)
    ]
    assert all(count >= 10 for count in sent), sent  # they kept heartbeating and acking
    await trio.sleep(0.3)  # let the events of the blocked time arrive, if there were any
    assert leader.is_leader() and leader.view().term == term
    assert all(node.view().leader_id == leader.config.node_id for node in three_nodes)
    for channel in events:
        with pytest.raises(trio.WouldBlock):
            event = channel.receive_nowait()
            pytest.fail(f"an event while Trio was blocked: {event}")


async def test_an_event_logged_late_says_the_term_it_happened_in(
    three_nodes: list[Node], caplog: pytest.LogCaptureFixture
) -> None:
    """Events are published on Trio's thread, after the loop thread queued them; by then
    the core may have moved on (here: to a higher term while Trio's thread was blocked).
    The log line must still say the event's own term, as the hooks' `FIP_TERM` does, or
    operators would read two terms for one loss."""
    leader = await wait_for_leader(three_nodes)
    term = leader.view().term
    with leader._lock:  # resign the way a loop wake-up would: the event is only queued
        leader._apply(leader.election.resign(leader._now(), "test"))
    caplog.set_level(logging.INFO, logger="sidecar.node")
    time.sleep(1.5)  # noqa: ASYNC251 (Trio blocked: another node wins a newer term meanwhile)
    assert leader.election.term > term
    await trio.sleep(0.3)  # the loop thread has handed the queued events to Trio's thread
    lost = next(r for r in caplog.records if r.__dict__.get("event") == "lost")
    assert lost.__dict__["term"] == term
    assert lost.__dict__["role"] != "leader"  # it may already stand again: a candidate


async def test_a_stalled_trio_thread_makes_the_node_unhealthy(three_nodes: list[Node]) -> None:
    """Health checks, the assigner and hooks run on Trio's thread: stalled for longer than
    `_TRIO_STALL_LIMIT`, the node reports itself unhealthy (a leader would hand over to a
    healthy peer), and healthy again once Trio runs."""
    leader = await wait_for_leader(three_nodes)
    assert leader.view().healthy
    time.sleep(node_module._TRIO_STALL_LIMIT + 1.5)  # noqa: ASYNC251 (the point: block Trio)
    assert not any(node.view().healthy for node in three_nodes)
    await trio.sleep(2 * node_module._TRIO_BEAT)
    assert all(node.view().healthy for node in three_nodes)
    # Whoever saw Trio again first was briefly the healthier one and may lead now.
    assert (await wait_for_leader(three_nodes)).config.eligible


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


# ---------------------------------------------------------------------- the HTTP server
# Real sockets on loopback against `sidecar.httpserver`, spoken to byte by byte (h11 on
# the client side parses the answers), so every limit is exercised as a client meets it.

TEST_LIMITS = Limits(request_timeout=0.5, send_timeout=2.0, max_connections=8)


def plain_routes() -> dict[str, Route]:
    def broken() -> Response:
        raise RuntimeError("a bug in a route")

    return {
        "/healthz": lambda: Response(b"ok\n", "text/plain"),
        "/big": lambda: Response(b"x" * 100_000, "application/octet-stream"),
        "/broken": broken,
    }


@pytest.fixture
async def server() -> AsyncIterator[tuple[HTTPServer, int]]:
    """An HTTPServer on an ephemeral loopback port, with short test limits."""
    http = HTTPServer(plain_routes(), not_found="no such route", limits=TEST_LIMITS)
    async with trio.open_nursery() as nursery:
        await nursery.start(http.serve, "127.0.0.1", 0)
        yield http, http.ports[0]
        nursery.cancel_scope.cancel()


class Client:
    """One TCP connection; `request` sends raw bytes and returns the parsed response."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, port: int) -> Client:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, method: str, target: str, headers: list[tuple[str, str]] | None = None,
                   body: bytes = b"") -> None:  # fmt: skip
        fields = [("host", "127.0.0.1"), *(headers or [])]
        if body:
            fields.append(("content-length", str(len(body))))
        data = self.conn.send(h11.Request(method=method, target=target, headers=fields)) or b""
        if body:
            data += self.conn.send(h11.Data(data=body)) or b""
        data += self.conn.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(data)

    async def response(self) -> tuple[h11.Response, bytes]:
        head: h11.Response | None = None
        body = b""
        with trio.fail_after(5):
            while True:
                event = self.conn.next_event()
                if event is h11.NEED_DATA:
                    self.conn.receive_data(await self.stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    head = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert head is not None
                    if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                        self.conn.start_next_cycle()
                    return head, body
                else:
                    raise AssertionError(f"unexpected {event!r}")

    async def request(self, method: str, target: str, **kw: Any) -> tuple[h11.Response, bytes]:
        await self.send(method, target, **kw)
        return await self.response()

    async def closed_by_server(self) -> bool:
        """True once the server has closed the connection (EOF or reset), bounded."""
        with trio.fail_after(5):
            while True:
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return True
                if not data:
                    return True


def header(response: h11.Response, name: str) -> str | None:
    for key, value in response.headers:
        if key.decode() == name:
            return value.decode()
    return None


async def raw_exchange(port: int, data: bytes) -> bytes:
    """Send `data` as is, half-close, and return everything the server answers."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        await stream.send_eof()
        answer = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                answer += chunk
        return answer


async def test_status_routes_answer_head_and_refuse_other_methods(
    three_nodes: list[Node],
) -> None:
    await wait_for_leader(three_nodes)
    node = three_nodes[0]
    metrics = Metrics()
    metrics.watch(node)
    app = StatusApp(node, metrics)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_status, app, node.config.status_listen)
        client = await Client.connect(node.config.status_listen.port)
        for path, content_type in (
            ("/healthz", "text/plain"),
            ("/status", "application/json"),
            ("/metrics", "text/plain; version="),
        ):
            got, body = await client.request("GET", path)
            assert got.status_code == 200 and body, path
            assert (header(got, "content-type") or "").startswith(content_type), path
            head, head_body = await client.request("HEAD", path)
            assert head.status_code == 200 and head_body == b"", path
            assert header(head, "content-type") == header(got, "content-type")
            if path == "/healthz":  # the others change between two requests
                assert header(head, "content-length") == str(len(body))
        for method in ("POST", "PUT", "DELETE", "OPTIONS"):
            refused, text = await client.request(method, "/status")
            assert refused.status_code == 405, method
            assert header(refused, "allow") == "GET, HEAD"
            assert b"GET" in text
        missing, text = await client.request("GET", "/nope")
        assert missing.status_code == 404
        assert text == b"not found: try /status, /metrics or /healthz\n"
        query, _ = await client.request("GET", "/healthz?verbose=1")
        assert query.status_code == 200
        nursery.cancel_scope.cancel()


async def test_keep_alive_serves_many_requests_on_one_connection(
    server: tuple[HTTPServer, int],
) -> None:
    _, port = server
    client = await Client.connect(port)
    for _ in range(20):
        response, body = await client.request("GET", "/healthz")
        assert response.status_code == 200 and body == b"ok\n"
        assert header(response, "connection") is None
    # A body sent with a refused method is read and dropped: the connection stays usable.
    refused, _ = await client.request("POST", "/healthz", body=b"a=1" * 1000)
    assert refused.status_code == 405
    big, body = await client.request("GET", "/big")
    assert big.status_code == 200 and len(body) == 100_000
    # The client asks to close: answered, then closed.
    last, _ = await client.request("GET", "/healthz", headers=[("connection", "close")])
    assert last.status_code == 200 and header(last, "connection") == "close"
    assert await client.closed_by_server()


async def test_malformed_requests_get_400_and_the_server_goes_on(
    server: tuple[HTTPServer, int],
) -> None:
    _, port = server
    for garbage in (
        b"GARBAGE\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: nope\r\n\r\n",
        b"\x00\xff\xfe binary junk \r\n\r\n",
    ):
        answer = await raw_exchange(port, garbage)
        assert answer.startswith(b"HTTP/1.1 400 "), (garbage, answer)
        assert b"connection: close" in answer.lower()
    assert (await raw_exchange(port, b"GET /healthz HTTP/9.9\r\n\r\n")).startswith(
        b"HTTP/1.1 505 HTTP Version Not Supported\r\n"
    )
    # Half a request and then EOF is malformed too; a connection closed unused is not.
    assert (await raw_exchange(port, b"GET /heal")).startswith(b"HTTP/1.1 400 ")
    assert await raw_exchange(port, b"") == b""
    client = await Client.connect(port)
    response, _ = await client.request("GET", "/healthz")
    assert response.status_code == 200


async def test_oversized_heads_and_bodies_are_refused(server: tuple[HTTPServer, int]) -> None:
    http, port = server
    huge = b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"
    assert (await raw_exchange(port, huge)).startswith(b"HTTP/1.1 431 ")
    many = b"GET /healthz HTTP/1.1\r\nHost: a\r\n" + b"X: 1\r\n" * 100 + b"\r\n"
    assert (await raw_exchange(port, many)).startswith(b"HTTP/1.1 431 ")
    client = await Client.connect(port)
    too_large, _ = await client.request(
        "POST", "/healthz", body=b"z" * (http.limits.max_body_bytes + 1)
    )
    assert too_large.status_code == 413
    assert await client.closed_by_server()
    client = await Client.connect(port)
    response, _ = await client.request("GET", "/healthz")
    assert response.status_code == 200


async def test_a_failing_route_is_a_500_not_a_dead_server(server: tuple[HTTPServer, int]) -> None:
    _, port = server
    client = await Client.connect(port)
    broken, body = await client.request("GET", "/broken")
    assert broken.status_code == 500 and b"a bug" not in body
    response, _ = await client.request("GET", "/healthz")
    assert response.status_code == 200


async def test_silent_and_trickling_clients_are_dropped_while_others_are_served(
    server: tuple[HTTPServer, int],
) -> None:
    _, port = server
    silent = await Client.connect(port)
    trickler = await trio.open_tcp_stream("127.0.0.1", port)
    request = b"GET /healthz HTTP/1.1\r\nHost: a\r\n" + b"X-Slow: 1\r\n" * 50 + b"\r\n"
    dropped_trickler = False

    async def trickle() -> None:
        nonlocal dropped_trickler
        # One byte every 50 ms: each read is fast, the whole request is not (a slowloris).
        with trio.fail_after(10):
            for byte in request:
                try:
                    await trickler.send_all(bytes([byte]))
                except trio.BrokenResourceError:
                    dropped_trickler = True
                    return
                await trio.sleep(0.05)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        served = 0
        with trio.fail_after(5):
            # Meanwhile other clients are served, on fresh connections and on a kept one.
            kept = await Client.connect(port)
            for _ in range(5):
                fresh = await Client.connect(port)
                assert (await fresh.request("GET", "/healthz"))[0].status_code == 200
                assert (await kept.request("GET", "/healthz"))[0].status_code == 200
                served += 2
                await trio.sleep(0.05)
        assert await silent.closed_by_server()
    assert served == 10
    assert dropped_trickler, "the slowloris client was never cut off"


async def test_connections_beyond_the_limit_get_503_and_capacity_comes_back(
    server: tuple[HTTPServer, int],
) -> None:
    http, port = server
    limit = http.limits.max_connections
    # Many clients at once, each a few requests: all served (under the limit).
    answers: list[int] = []

    async def one_client() -> None:
        client = await Client.connect(port)
        for _ in range(3):
            answers.append((await client.request("GET", "/healthz"))[0].status_code)
        await client.stream.aclose()

    async with trio.open_nursery() as nursery:
        for _ in range(limit):
            nursery.start_soon(one_client)
    assert answers == [200] * 3 * limit

    # Hold every slot with an idle connection, then one more is turned away at once.
    holders = [await Client.connect(port) for _ in range(limit)]
    for holder in holders:  # each is being served (its request answered) before the next
        assert (await holder.request("GET", "/healthz"))[0].status_code == 200
    extra = await Client.connect(port)
    assert (await extra.response())[0].status_code == 503
    for holder in holders:
        await holder.stream.aclose()
    with trio.fail_after(5):
        while True:  # the server notices the closes shortly
            client = await Client.connect(port)
            if (await client.request("GET", "/healthz"))[0].status_code == 200:
                break
            await trio.sleep(0.05)
