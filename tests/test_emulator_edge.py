"""The edge, in-process: two web services as ASGI apps, the mock clock as time."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import trio
import trio.testing
from emulator.harness import IP, api_client, assign, make_emulator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sidecar.emulator import Emulator, build_edge_app


def web_service(name: str) -> Starlette:
    """A web service that says who it is and echoes what it was sent."""

    async def echo(request: Request) -> Response:
        return JSONResponse(
            {
                "served_by": name,
                "method": request.method,
                "path": request.url.path,
                "query": request.url.query,
                "body": (await request.body()).decode(),
                "x_test": request.headers.get("x-test"),
                "forwarded_for": request.headers.get("x-forwarded-for"),
            },
            status_code=201 if request.method == "POST" else 200,
            headers={"x-served-by": name},
        )

    return Starlette(routes=[Route("/{path:path}", echo, methods=["GET", "POST"])])


@asynccontextmanager
async def edge_client(emulator: Emulator) -> AsyncIterator[httpx.AsyncClient]:
    mounts = {
        "http://web1.test": httpx.ASGITransport(app=web_service("web1")),
        "http://web2.test": httpx.ASGITransport(app=web_service("web2")),
    }
    async with (
        httpx.AsyncClient(mounts=mounts) as upstream,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=build_edge_app(emulator, upstream)),
            base_url=f"http://{IP}",
        ) as client,
    ):
        yield client


def refused_url() -> str:
    """A loopback URL nothing listens on (the port was just free)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def test_forwards_to_the_holder_with_method_path_query_body() -> None:
    emulator = make_emulator()
    async with edge_client(emulator) as edge:
        response = await edge.post("/orders/7?x=1", content=b"hello", headers={"x-test": "yes"})
    assert response.status_code == 201
    assert response.headers["x-fip-droplet"] == "1001"
    assert response.headers["x-served-by"] == "web1"
    assert response.json() == {
        "served_by": "web1",
        "method": "POST",
        "path": "/orders/7",
        "query": "x=1",
        "body": "hello",
        "x_test": "yes",
        "forwarded_for": "127.0.0.1",
    }


async def test_follows_the_ip_when_the_action_completes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    emulator = make_emulator(action_seconds=2.0)
    async with edge_client(emulator) as edge, api_client(emulator) as api:
        await assign(api, 1002)
        await trio.sleep(1.9)
        during = await edge.get("/")
        await trio.sleep(0.1)
        after = await edge.get("/")
    assert during.headers["x-fip-droplet"] == "1001"
    assert after.headers["x-fip-droplet"] == "1002"
    assert after.json()["served_by"] == "web2"


async def test_propagation_delay_keeps_the_old_route_for_a_while(
    autojump_clock: trio.testing.MockClock,
) -> None:
    emulator = make_emulator(action_seconds=1.0, propagation_delay=3.0)
    async with edge_client(emulator) as edge, api_client(emulator) as api:
        await assign(api, 1002)
        await trio.sleep(1.0)
        holder = (await api.get(f"/v2/reserved_ips/{IP}")).json()["reserved_ip"]["droplet"]["id"]
        lagging = await edge.get("/")
        await trio.sleep(2.9)
        still_lagging = await edge.get("/")
        await trio.sleep(0.1)
        converged = await edge.get("/")
    assert holder == 1002
    assert lagging.headers["x-fip-droplet"] == still_lagging.headers["x-fip-droplet"] == "1001"
    assert converged.headers["x-fip-droplet"] == "1002"


async def test_503_when_nobody_holds_the_ip() -> None:
    emulator = make_emulator()
    emulator.state.manual_assign(IP, None)
    async with edge_client(emulator) as edge:
        response = await edge.get("/")
    assert response.status_code == 503
    assert f"no droplet holds reserved IP {IP}" in response.text
    assert "x-fip-droplet" not in response.headers


async def test_502_when_the_holders_web_service_fails() -> None:
    emulator = make_emulator()
    emulator.state.add_droplet(1003, "nyc3", refused_url())
    emulator.state.add_droplet(1004, "nyc3", None)
    async with edge_client(emulator) as edge:
        emulator.state.manual_assign(IP, 1003)
        refused = await edge.get("/")
        emulator.state.manual_assign(IP, 1004)
        no_service = await edge.get("/")
    assert refused.status_code == 502
    assert "droplet 1003" in refused.text and "ConnectError" in refused.text
    assert no_service.status_code == 502
    assert "no web service" in no_service.text
