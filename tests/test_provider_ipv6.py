"""Reserved IPv6 through the provider seam: against the emulator, and against scripted
servers for what the emulator never says (a missing `locked`, an action that 404s or
errors, a 429, a 422), with the assigner on top where the sequence of requests matters."""

from __future__ import annotations

import random
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from scripted import Step, scripted_server
from test_assigner import FakeLeadership, RecordingObserver

from sidecar.assigner import Assigner, AssignerSettings
from sidecar.emulator import Emulator, EmulatorSettings, build_app
from sidecar.providers import base
from sidecar.providers.digitalocean import (
    APIToken,
    DigitalOceanClient,
    DigitalOceanProvider,
    DigitalOceanSettings,
)

TOKEN_TEXT = "dop_v1_" + "6ecret" * 10
TOKEN = APIToken(TOKEN_TEXT)
IP6 = "2001:db8::10"
ME, OTHER = 1001, 1002
REGION = {"name": "New York 3", "slug": "nyc3", "available": True, "features": [], "sizes": []}
FAST = AssignerSettings(
    action_poll_interval=0.02,
    backoff_base_delay=0.01,
    backoff_max_delay=0.05,
    unprocessable_delay=0.02,
    reconcile_interval=60.0,
    cooloff_interval=0.0,
    config_error_retry_interval=60.0,
)


class Hooks:
    """RequestHooks that only record (no budget)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []

    async def before(self) -> None:
        await trio.lowlevel.checkpoint()

    def after(self, endpoint: str, status: str) -> None:
        self.requests.append((endpoint, status))


def ipv6_body(droplet_id: int | None, **extra: Any) -> dict[str, Any]:
    droplet = None if droplet_id is None else {"id": droplet_id, "name": "web"}
    return {
        "reserved_ipv6": {
            "ip": IP6,
            "region_slug": "nyc3",
            "reserved_at": "2026-11-20T11:08:30Z",
            "droplet": droplet,
            **extra,
        }
    }


def action(action_id: int, status: str) -> dict[str, Any]:
    return {
        "action": {
            "id": action_id,
            "status": status,
            "type": "assign_ip",
            "started_at": "2026-11-29T12:00:00Z",
            "completed_at": None,
            "resource_id": 758604968,
            "resource_type": "reserved_ipv6",
            "region": REGION,
            "region_slug": "nyc3",
        }
    }


READ = Step("GET", f"/v2/reserved_ipv6/{IP6}", 200, ipv6_body(OTHER))
POST = Step("POST", f"/v2/reserved_ipv6/{IP6}/actions", 201, action(77, "in-progress"))


def provider_for(url: str) -> DigitalOceanProvider:
    settings = DigitalOceanSettings(api_url=url, metadata_url=url, request_timeout=5.0)
    return DigitalOceanProvider(DigitalOceanClient(settings, TOKEN))


async def run_assigner(steps: list[Step], seconds: float = 10.0) -> Any:
    """Lead with an assigner against `steps` until all are answered and it has read the
    address on this droplet (every script here ends with that read)."""
    async with scripted_server(steps) as (url, script):
        leadership, observer = FakeLeadership(), RecordingObserver()
        assigner = Assigner(
            provider_for(url), IP6, ME, leadership, FAST, random.Random(1), observer
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(assigner.run)
            leadership.gain()
            with trio.move_on_after(seconds):
                await script.wait_until_left(0)
                for _ in range(1000):  # the last answer reaches the assigner
                    if assigner.snapshot().holder_droplet_id == ME:
                        break
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        return script, assigner.snapshot(), observer


# --------------------------------------------------------------------------- the provider


async def test_reads_an_ipv6_without_locked_and_an_empty_droplet_object() -> None:
    empty_droplet = {"reserved_ipv6": {**ipv6_body(None)["reserved_ipv6"], "droplet": {}}}
    steps = [READ, Step("GET", f"/v2/reserved_ipv6/{IP6}", 200, empty_droplet)]
    async with scripted_server(steps) as (url, script):
        hooks = Hooks()
        held = await provider_for(url).read(IP6, hooks)
        empty = await provider_for(url).read(IP6, hooks)
    assert held == base.Holding(address=IP6, droplet_id=OTHER, locked=None)
    assert empty.droplet_id is None and empty.locked is None
    assert hooks.requests == [("get_reserved_ipv6", "200")] * 2
    assert not script.unexpected


async def test_follows_through_the_actions_endpoint_only() -> None:
    steps = [
        POST,
        Step("GET", "/v2/actions/77", 200, action(77, "in-progress")),
        Step("GET", "/v2/actions/77", 200, action(77, "completed")),
    ]
    async with scripted_server(steps) as (url, script):
        provider, hooks = provider_for(url), Hooks()
        operation = await provider.assign(IP6, ME, hooks)
        assert (operation.id, operation.done) == (77, False)
        operation = await provider.follow(IP6, operation, hooks)
        assert not operation.done
        operation = await provider.follow(IP6, operation, hooks)
    assert operation.status == "completed"
    assert [method for method, _, _ in script.seen] == ["POST", "GET", "GET"]
    assert script.seen[0][2] == b'{"type":"assign","droplet_id":1001}'
    assert hooks.requests == [("assign_ipv6", "201"), ("get_action", "200"), ("get_action", "200")]


@pytest.mark.parametrize(
    ("step", "kind"),
    [
        (Step("GET", "/v2/actions/77", 404, {"id": "not_found", "message": "gone"}), base.NotFound),
        (
            Step(
                "GET",
                "/v2/actions/77",
                429,
                {"id": "too_many_requests", "message": "slow down"},
                {"retry-after": "7"},
            ),
            base.RateLimited,
        ),
        (
            Step("GET", "/v2/actions/77", 401, {"id": "unauthorized", "message": "no"}),
            base.Rejected,
        ),
        (
            Step("GET", "/v2/actions/77", 500, {"id": "server_error", "message": "x"}),
            base.Unavailable,
        ),
    ],
)
async def test_errors_leave_the_provider_in_the_seams_words(
    step: Step, kind: type[base.ProviderError]
) -> None:
    async with scripted_server([step]) as (url, _):
        with pytest.raises(kind) as caught:
            await provider_for(url).follow(
                IP6, base.Operation(id=77, status="in-progress"), Hooks()
            )
    assert caught.value.status == step.status
    if isinstance(caught.value, base.RateLimited):
        assert caught.value.retry_after == 7.0
    assert TOKEN_TEXT not in str(caught.value)


async def test_a_422_on_assign_is_busy() -> None:
    refused = Step(
        "POST",
        f"/v2/reserved_ipv6/{IP6}/actions",
        422,
        {
            "id": "unprocessable_entity",
            "message": "The droplet already has a reserved IP assigned.",
        },
    )
    async with scripted_server([refused]) as (url, _):
        with pytest.raises(base.Busy, match="already has a reserved IP"):
            await provider_for(url).assign(IP6, ME, Hooks())


async def test_against_the_emulator(autojump_clock: trio.testing.MockClock) -> None:
    emulator = Emulator(TOKEN_TEXT, EmulatorSettings(action_seconds=2.0), clock=trio.current_time)
    emulator.state.add_droplet(ME, "nyc3")
    emulator.state.add_droplet(OTHER, "nyc3")
    emulator.state.add_reserved_ip(IP6, "nyc3", OTHER)
    settings = DigitalOceanSettings(api_url="http://127.0.0.1:1", metadata_url="http://127.0.0.1:1")
    client = DigitalOceanClient(
        settings, TOKEN, transport=httpx.ASGITransport(app=build_app(emulator))
    )
    provider, hooks = DigitalOceanProvider(client), Hooks()
    async with client:
        before = await provider.read(IP6, hooks)
        assert (before.droplet_id, before.locked) == (OTHER, None)
        operation = await provider.assign(IP6, ME, hooks)
        with pytest.raises(base.Busy):  # the address has an action in progress
            await provider.assign(IP6, ME, hooks)
        await trio.sleep(2.5)
        assert (await provider.follow(IP6, operation, hooks)).status == "completed"
        assert (await provider.read(IP6, hooks)).droplet_id == ME
        with pytest.raises(base.NotFound):
            await provider.read("2001:db8::99", hooks)
        unassign = await client.unassign_ipv6(IP6)
        await trio.sleep(2.5)
        assert (await client.get_action(unassign.id)).status == "completed"
        assert (await client.get_reserved_ipv6(IP6)).droplet_id is None
    assert [e.droplet_id for e in emulator.state.history] == [OTHER, ME, None]


# --------------------------------------------------------------------------- the assigner


async def test_assigner_moves_an_ipv6_in_progress_then_completed() -> None:
    steps = [
        READ,
        POST,
        Step("GET", "/v2/actions/77", 200, action(77, "in-progress")),
        Step("GET", "/v2/actions/77", 200, action(77, "completed")),
        Step("GET", f"/v2/reserved_ipv6/{IP6}", 200, ipv6_body(ME)),
    ]
    script, snapshot, observer = await run_assigner(steps)
    assert not script.unexpected, script.unexpected
    assert snapshot.holder_droplet_id == ME and snapshot.locked is None
    assert snapshot.last_assignment.outcome == "completed"
    assert ("assign_ipv6", "201") in observer.requests


async def test_assigner_errored_action_reads_and_tries_again() -> None:
    steps = [
        READ,
        POST,
        Step("GET", "/v2/actions/77", 200, action(77, "errored")),
        READ,
        Step("POST", f"/v2/reserved_ipv6/{IP6}/actions", 201, action(78, "in-progress")),
        Step("GET", "/v2/actions/78", 200, action(78, "completed")),
        Step("GET", f"/v2/reserved_ipv6/{IP6}", 200, ipv6_body(ME)),
    ]
    script, _, observer = await run_assigner(steps)
    assert not script.unexpected, script.unexpected
    assert [o for _, o in observer.assignments] == ["errored", "completed"]


async def test_assigner_action_404_means_read_the_address() -> None:
    steps = [
        READ,
        POST,
        Step("GET", "/v2/actions/77", 404, {"id": "not_found", "message": "gone"}),
        Step("GET", f"/v2/reserved_ipv6/{IP6}", 200, ipv6_body(ME)),
    ]
    script, snapshot, observer = await run_assigner(steps)
    assert not script.unexpected, script.unexpected
    assert [o for _, o in observer.assignments] == ["unknown"]
    assert snapshot.holder_droplet_id == ME


async def test_assigner_waits_out_a_429_and_a_422() -> None:
    steps = [
        Step("GET", f"/v2/reserved_ipv6/{IP6}", 429, {"id": "too_many_requests", "message": "m"},
             {"retry-after": "0"}),
        READ,
        Step("POST", f"/v2/reserved_ipv6/{IP6}/actions", 422,
             {"id": "unprocessable_entity", "message": "The reserved IP has a pending event."}),
        READ,
        POST,
        Step("GET", "/v2/actions/77", 200, action(77, "completed")),
        Step("GET", f"/v2/reserved_ipv6/{IP6}", 200, ipv6_body(ME)),
    ]  # fmt: skip
    script, snapshot, _ = await run_assigner(steps)
    assert not script.unexpected, script.unexpected
    assert snapshot.holder_droplet_id == ME and snapshot.last_error is None
