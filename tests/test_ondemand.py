"""The assigner's API client is built on its first call (when the node first leads)."""

from __future__ import annotations

import random

import httpx
import pytest
import trio

from sidecar.digitalocean import APIToken, DigitalOceanClient, DigitalOceanSettings, ProviderError
from sidecar.emulator import Emulator, EmulatorSettings, build_app
from sidecar.ondemand import OnDemandProvider

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
    async with OnDemandProvider(lambda: emulated_client_factory(built)) as provider:
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

    async with OnDemandProvider(build) as provider:
        with pytest.raises(ProviderError, match="cannot set up the API client: ca_file"):
            await provider.get_reserved_ip(IP)
        assert (await provider.get_reserved_ip(IP)).droplet_id == 1001
    assert attempts == 2 and len(built) == 1
