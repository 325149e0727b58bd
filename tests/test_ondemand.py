"""The assigner's API client is built on its first call (when the node first leads), with
a CA bundle only where a URL is https."""

from __future__ import annotations

import contextlib
import functools
import json
import random
import ssl
from pathlib import Path

import httpx
import pytest
import trio
import trustme

from sidecar.emulator import Emulator, EmulatorSettings, build_app
from sidecar.ondemand import OnDemandClient, build_client
from sidecar.providers.digitalocean import (
    APIToken,
    DigitalOceanClient,
    DigitalOceanSettings,
    NetworkError,
    ProviderError,
    TokenSource,
)

TOKEN = "dop_v1_" + "5eed" * 16
IP = "203.0.113.10"
SETTINGS = DigitalOceanSettings(api_url="http://127.0.0.1:9", metadata_url="http://127.0.0.1:9")


def emulated_client_factory(built: list[DigitalOceanClient]) -> DigitalOceanClient:
    emulator = Emulator(TOKEN, EmulatorSettings(), clock=trio.current_time, rng=random.Random(1))
    emulator.state.add_droplet(1001, "nyc3")
    emulator.state.add_reserved_ip(IP, "nyc3", 1001)
    client = DigitalOceanClient(
        SETTINGS, APIToken(TOKEN), transport=httpx.ASGITransport(app=build_app(emulator))
    )
    built.append(client)
    return client


async def test_nothing_is_built_until_the_first_call_and_then_once() -> None:
    built: list[DigitalOceanClient] = []
    async with OnDemandClient(lambda: emulated_client_factory(built)) as provider:
        assert built == []  # a follower's assigner never gets further than this
        first = await provider.get_reserved_ip(IP)
        again = await provider.get_reserved_ip(IP)
        assert first.droplet_id == again.droplet_id == 1001
        assert len(built) == 1
    # Leaving closes the client it built.
    assert built[0]._api.is_closed and built[0]._metadata.is_closed


async def test_a_client_that_cannot_be_built_is_a_provider_error_and_is_tried_again() -> None:
    built: list[DigitalOceanClient] = []
    attempts = 0

    def build() -> DigitalOceanClient:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ValueError("ca_file '/etc/ca.pem': cannot load CA bundle (gone)")
        return emulated_client_factory(built)

    async with OnDemandClient(build) as provider:
        with pytest.raises(ProviderError, match="cannot set up the API client: ca_file"):
            await provider.get_reserved_ip(IP)
        assert (await provider.get_reserved_ip(IP)).droplet_id == 1001
    assert attempts == 2 and len(built) == 1


# ---------------------------------------------------------------------- build_client

RESERVED_IP = {
    "reserved_ip": {
        "ip": IP,
        "droplet": {"id": 1001, "name": "web", "status": "active"},
        "region": {"name": "New York 3", "slug": "nyc3", "available": True, "features": []},
        "locked": False,
    },
    "links": {},
}


async def serve(nursery: trio.Nursery, tls: ssl.SSLContext | None = None) -> int:
    """A loopback server answering the reserved-IP read and the metadata id; its port."""

    async def handle(stream: trio.abc.Stream) -> None:
        async with stream:
            head = b""
            with trio.move_on_after(5):
                while b"\r\n\r\n" not in head:
                    head += await stream.receive_some(4096)
            path = head.split(b" ", 2)[1]
            body = b"1001" if path.endswith(b"/id") else json.dumps(RESERVED_IP).encode()
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )

    async def guarded(stream: trio.abc.Stream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await handle(stream)  # a client refusing our certificate hangs up: fine

    if tls is None:
        server = functools.partial(trio.serve_tcp, guarded, 0, host="127.0.0.1")
    else:
        server = functools.partial(trio.serve_ssl_over_tcp, guarded, 0, tls, host="127.0.0.1")
    listeners = await nursery.start(server)
    listener = listeners[0]
    sock = listener.socket if tls is None else listener.transport_listener.socket
    return int(sock.getsockname()[1])


def token_source(tmp_path: Path) -> TokenSource:
    path = tmp_path / "do_token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return TokenSource(DigitalOceanSettings(token_file=str(path)))


async def test_build_client_speaks_http_and_verifies_https(tmp_path: Path) -> None:
    """Plain http needs no CA bundle; https still verifies: with `ca_file` for the API,
    and with the system's bundle for https metadata (so a private CA is refused there)."""
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    tokens = token_source(tmp_path)
    async with trio.open_nursery() as nursery:
        plain, secure = await serve(nursery), await serve(nursery, server_tls)
        both_http = DigitalOceanSettings(
            api_url=f"http://127.0.0.1:{plain}", metadata_url=f"http://127.0.0.1:{plain}"
        )
        async with build_client(both_http, tokens) as client:
            assert (await client.get_reserved_ip(IP)).droplet_id == 1001
            assert await client.metadata_droplet_id() == 1001
        https_api = DigitalOceanSettings(
            api_url=f"https://127.0.0.1:{secure}",
            ca_file=str(ca_file),
            metadata_url=f"http://127.0.0.1:{plain}",
        )
        async with build_client(https_api, tokens) as client:
            assert (await client.get_reserved_ip(IP)).droplet_id == 1001
            assert await client.metadata_droplet_id() == 1001
        https_metadata = DigitalOceanSettings(
            api_url=f"http://127.0.0.1:{plain}", metadata_url=f"https://127.0.0.1:{secure}"
        )
        async with build_client(https_metadata, tokens) as client:
            assert (await client.get_reserved_ip(IP)).droplet_id == 1001
            with pytest.raises(NetworkError):  # verified against the system CAs: refused
                await client.metadata_droplet_id()
        nursery.cancel_scope.cancel()
