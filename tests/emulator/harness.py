"""An emulator driven in-process: no sockets, the trio clock as its clock.

Every response of the API client goes through `check_response` (when the OpenAPI
excerpt is present), so each test that touches `/v2/` also proves the shapes, and every
`/v2/` response is checked for the rate-limit headers whether or not the excerpt is there.
"""

from __future__ import annotations

import random
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio

from sidecar.emulator import Emulator, EmulatorSettings, build_app

from .openapi import check_response, spec_present

TOKEN = "emulator-test-token"
IP = "203.0.113.10"
SPARE_IP = "203.0.113.20"
FAR_IP = "203.0.113.30"
IP6 = "2001:db8::10"
BASE_URL = "http://emulator.test"
RATE_HEADERS = ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset")


def make_emulator(**settings: Any) -> Emulator:
    """Droplets 1001, 1002 (nyc3) and 2001 (sfo3); IP held by 1001, a spare, a far IP;
    IP6, an unassigned reserved IPv6 in nyc3.

    Must be called inside trio: the emulator's clock is `trio.current_time`.
    """
    emulator = Emulator(
        TOKEN, EmulatorSettings(**settings), clock=trio.current_time, rng=random.Random(7)
    )
    emulator.state.add_droplet(1001, "nyc3", "http://web1.test")
    emulator.state.add_droplet(1002, "nyc3", "http://web2.test")
    emulator.state.add_droplet(2001, "sfo3", None)
    emulator.state.add_reserved_ip(IP, "nyc3", 1001)
    emulator.state.add_reserved_ip(SPARE_IP, "nyc3")
    emulator.state.add_reserved_ip(FAR_IP, "sfo3")
    emulator.state.add_reserved_ip(IP6, "nyc3")
    return emulator


checked_files: set[str] = set()
"""Spec response files that at least one emulator response was validated against."""


async def _check(response: httpx.Response) -> None:
    path = response.request.url.path
    if not path.startswith("/v2/"):
        return
    for name in RATE_HEADERS:
        assert re.fullmatch(r"\d+", response.headers.get(name, "")), (
            f"{response.request.method} {path} -> {response.status_code} lacks {name}"
        )
    await response.aread()
    if spec_present():
        checked_files.add(
            check_response(
                response.request.method,
                path,
                response.status_code,
                response.json(),
                dict(response.headers),
            )
        )


@asynccontextmanager
async def api_client(
    emulator: Emulator, *, token: str | None = TOKEN, checked: bool = True
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the `/v2/` API; `checked=False` skips the spec checks, for faults that
    make the emulator answer off-spec on purpose (as the real API once did)."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=build_app(emulator)),
        base_url=BASE_URL,
        headers=headers,
        event_hooks={"response": [_check] if checked else []},
    ) as client:
        yield client


@asynccontextmanager
async def admin_client(emulator: Emulator) -> AsyncIterator[httpx.AsyncClient]:
    """A client for the token-less `/_emulator/` and metadata endpoints."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=build_app(emulator)), base_url=BASE_URL
    ) as client:
        yield client


async def assign(client: httpx.AsyncClient, droplet_id: int, ip: str = IP) -> httpx.Response:
    collection = "reserved_ipv6" if ":" in ip else "reserved_ips"
    return await client.post(
        f"/v2/{collection}/{ip}/actions", json={"type": "assign", "droplet_id": droplet_id}
    )
