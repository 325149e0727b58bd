"""The leader-only assigner, driven in virtual time against a scripted reserved-IP API.

`FakeDO` is a small stand-in for the API (shapes from the OpenAPI excerpt) behind
`httpx.MockTransport`, so the real `DigitalOceanClient` runs end to end, and each test
can script faults per request. Every test runs under `MockClock(autojump_threshold=0)`
(pytest-trio's `autojump_clock`), so hours of retries take milliseconds and every time
asserted is virtual time, never wall-clock speed.
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio
import trio.lowlevel
import trio.testing

from sidecar.assigner import Assigner, AssignerSettings, RequestBudget
from sidecar.emulator import Emulator, EmulatorSettings, build_app
from sidecar.emulator.faults import FaultUpdate
from sidecar.providers.digitalocean import (
    APIToken,
    DigitalOceanClient,
    DigitalOceanProvider,
    DigitalOceanSettings,
    TokenSource,
)

# Virtual time makes hours take milliseconds; a bug that loops without sleeping would hang.
pytestmark = pytest.mark.timeout(120)

TOKEN_TEXT = "dop_v1_" + "c0ffee" * 10
TOKEN = APIToken(TOKEN_TEXT)
IP = "203.0.113.10"
ME = 1001
OTHER = 1002
THIRD = 1003
REGION = {"name": "New York 3", "slug": "nyc3", "available": True, "features": [], "sizes": []}
CLIENT_SETTINGS = DigitalOceanSettings(
    api_url="http://127.0.0.1:1", metadata_url="http://127.0.0.1:1", request_timeout=300.0
)

Override = Callable[[httpx.Request], Awaitable[httpx.Response | None]]


def error(status: int, error_id: str, message: str, **headers: str) -> httpx.Response:
    return httpx.Response(status, json={"id": error_id, "message": message}, headers=headers)


class FakeDO:
    """The reserved-IP API for one IP, in trio time. `override` can answer any request first."""

    def __init__(self, holder: int | None, *, action_seconds: float = 2.0) -> None:
        self.holder = holder
        self.action_seconds = action_seconds
        self.lock_while_pending = True
        self.actions_never_finish = False
        self.fail_next_action = False
        self.actions_unknown = False  # reading an action by id answers 404
        self.override: Override | None = None
        self.token = TOKEN_TEXT  # any other bearer token is answered 401
        self.refused: list[float] = []  # when a request was refused for its token
        self.requests: list[tuple[float, str, str]] = []
        self.posts: list[tuple[float, int]] = []
        self._actions: dict[int, dict[str, Any]] = {}
        self._pending: int | None = None
        self._next_id = 500

    def reads(self) -> list[float]:
        return [t for t, method, path in self.requests if method == "GET" and path.endswith(IP)]

    def _settle(self, now: float) -> None:
        if self._pending is None:
            return
        action = self._actions[self._pending]
        if now >= action["done_at"]:
            if action["fails"]:
                action["status"] = "errored"
            else:
                action["status"] = "completed"
                self.holder = action["target"]
            self._pending = None

    def _action_body(self, action_id: int) -> dict[str, Any]:
        action = self._actions[action_id]
        return {
            "action": {
                "id": action_id,
                "status": action["status"],
                "type": "assign_ip",
                "started_at": "2026-11-29T12:00:00Z",
                "completed_at": None,
                "resource_id": 3405803786,
                "resource_type": "reserved_ip",
                "region": REGION,
                "region_slug": "nyc3",
            }
        }

    async def handler(self, request: httpx.Request) -> httpx.Response:
        now = trio.current_time()
        path = request.url.path
        self.requests.append((now, request.method, path))
        if request.headers["authorization"] != f"Bearer {self.token}":
            self.refused.append(now)
            return error(401, "unauthorized", "Unable to authenticate you.")
        if self.override is not None:
            answer = await self.override(request)
            if answer is not None:
                return answer
        self._settle(now)
        if request.method == "GET" and path == f"/v2/reserved_ips/{IP}":
            droplet = None if self.holder is None else {"id": self.holder, "name": "web"}
            locked = self._pending is not None and self.lock_while_pending
            body = {"ip": IP, "droplet": droplet, "region": REGION, "locked": locked}
            return httpx.Response(200, json={"reserved_ip": body, "links": {}})
        if request.method == "POST" and path == f"/v2/reserved_ips/{IP}/actions":
            payload = json.loads(request.content)
            assert payload["type"] == "assign", "the assigner never unassigns"
            if self._pending is not None and self.lock_while_pending:
                return error(422, "unprocessable_entity", "The reserved IP has a pending event.")
            if self.holder == payload["droplet_id"]:
                return error(422, "unprocessable_entity", "The reserved IP is already assigned.")
            self.posts.append((now, payload["droplet_id"]))
            self._next_id += 1
            done_at = float("inf") if self.actions_never_finish else now + self.action_seconds
            self._actions[self._next_id] = {
                "status": "in-progress",
                "target": payload["droplet_id"],
                "done_at": done_at,
                "fails": self.fail_next_action,
            }
            self.fail_next_action = False
            self._pending = self._next_id
            return httpx.Response(201, json=self._action_body(self._next_id))
        parts = path.split("/")
        if request.method == "GET" and parts[-2] == "actions":
            action_id = int(parts[-1])
            if self.actions_unknown or action_id not in self._actions:
                return error(404, "not_found", "The resource you requested could not be found.")
            return httpx.Response(200, json=self._action_body(action_id))
        return error(404, "not_found", "no such route")


class FakeLeadership:
    """The node's side of the seam: `gain()` hands out a fresh scope, `lose()` cancels it."""

    def __init__(self) -> None:
        self.leading = False
        self.paused = False  # a paused node: the scope is still open but the lease is gone
        self.scope: trio.CancelScope | None = None
        self.waits: list[float] = []
        self._changed = trio.Event()

    def is_leader(self) -> bool:
        return self.leading and not self.paused

    async def wait_until_leader(self) -> trio.CancelScope:
        self.waits.append(trio.current_time())
        while not self.leading:
            await self._changed.wait()
        assert self.scope is not None
        return self.scope

    def gain(self) -> None:
        self.leading = True
        self.scope = trio.CancelScope()
        self._changed.set()
        self._changed = trio.Event()

    def lose(self) -> None:
        self.leading = False
        assert self.scope is not None
        self.scope.cancel()


class RecordingObserver:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.assignments: list[tuple[float, str]] = []

    def api_request(self, endpoint: str, status: str) -> None:
        self.requests.append((endpoint, status))

    def assignment_finished(self, seconds: float, outcome: str) -> None:
        self.assignments.append((seconds, outcome))


def start(
    nursery: trio.Nursery,
    fake: FakeDO,
    leadership: FakeLeadership,
    settings: AssignerSettings | None = None,
    *,
    observer: RecordingObserver | None = None,
    wall_clock: Callable[[], float] | None = None,
    seed: int = 7,
    tokens: TokenSource | None = None,
) -> Assigner:
    extra: dict[str, Any] = {} if wall_clock is None else {"wall_clock": wall_clock}
    client = DigitalOceanClient(
        CLIENT_SETTINGS,
        TOKEN if tokens is None else tokens,
        transport=httpx.MockTransport(fake.handler),
        **extra,
    )
    assigner = Assigner(
        DigitalOceanProvider(client),
        IP,
        ME,
        leadership,
        settings or AssignerSettings(),
        random.Random(seed),
        observer,
        tokens=tokens,
    )
    nursery.start_soon(assigner.run)
    return assigner


async def lead_for(
    seconds: float, fake: FakeDO, leadership: FakeLeadership, **options: Any
) -> Assigner:
    """Run an assigner that gains leadership at once, for `seconds` of (virtual) time."""
    async with trio.open_nursery() as nursery:
        assigner = start(nursery, fake, leadership, **options)
        leadership.gain()
        await trio.sleep(seconds)
        nursery.cancel_scope.cancel()
    return assigner


# --------------------------------------------------------------------------- the happy paths


async def test_assigns_once_then_only_reconciles(autojump_clock: trio.testing.MockClock) -> None:
    fake, leadership, observer = FakeDO(holder=OTHER), FakeLeadership(), RecordingObserver()
    async with trio.open_nursery() as nursery:
        assigner = start(nursery, fake, leadership, observer=observer)
        await trio.sleep(1)
        assert fake.requests == []  # not leader: silent
        t0 = trio.current_time()
        leadership.gain()
        await trio.sleep(100)
        snapshot = assigner.snapshot()
        nursery.cancel_scope.cancel()
    assert fake.posts == [(t0, ME)]
    assert fake.holder == ME
    assert snapshot.leading and snapshot.holder_droplet_id == ME
    assert snapshot.last_assignment is not None
    assert snapshot.last_assignment.outcome == "completed"
    assert 2.0 <= (snapshot.last_assignment.duration_seconds or 0) <= 3.0
    assert snapshot.consecutive_failures == 0 and snapshot.last_error is None
    assert [outcome for _, outcome in observer.assignments] == ["completed"]
    assert ("assign", "201") in observer.requests
    assert ("get_reserved_ip", "200") in observer.requests
    assert ("get_ip_action", "200") in observer.requests
    # After the move: one read per reconcile interval, 10 s +- 20 %.
    reads = [t for t in fake.reads() if t > t0 + 5]
    gaps = [b - a for a, b in itertools.pairwise(reads)]
    assert gaps and all(8.0 <= gap <= 12.0 for gap in gaps)


@pytest.mark.parametrize("holder", [ME])
async def test_does_nothing_when_it_already_holds_the_ip(
    autojump_clock: trio.testing.MockClock, holder: int
) -> None:
    fake, leadership = FakeDO(holder=holder), FakeLeadership()
    await lead_for(300, fake, leadership)
    assert fake.posts == []
    assert 25 <= len(fake.reads()) <= 38
    assert all(method == "GET" for _, method, _ in fake.requests)


async def test_an_unassigned_ip_is_assigned(autojump_clock: trio.testing.MockClock) -> None:
    fake, leadership = FakeDO(holder=None), FakeLeadership()
    await lead_for(30, fake, leadership)
    assert [droplet for _, droplet in fake.posts] == [ME]
    assert fake.holder == ME


async def test_repairs_a_manual_reassignment_within_one_reconcile_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake, leadership = FakeDO(holder=OTHER), FakeLeadership()
    async with trio.open_nursery() as nursery:
        start(nursery, fake, leadership)
        leadership.gain()
        await trio.sleep(33.3)
        assert fake.holder == ME
        fake.holder = THIRD  # someone moved it in the control panel
        moved_at = trio.current_time()
        await trio.sleep(30)
        nursery.cancel_scope.cancel()
    assert len(fake.posts) == 2
    assert 0 < fake.posts[1][0] - moved_at <= 10.0 * 1.2
    assert fake.holder == ME


# --------------------------------------------------------------------------- errors


async def test_server_errors_back_off_exponentially_with_full_jitter(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake, leadership = FakeDO(holder=OTHER), FakeLeadership()
    failures = [500, 502, 503, 504, 0, 500, 500, 500, 500, 500, 500, 500]

    async def flaky(request: httpx.Request) -> httpx.Response | None:
        if request.method == "GET" and failures:
            status = failures.pop(0)
            if status == 0:
                raise httpx.ConnectError("connection refused")
            return error(status, "server_error", "Server Error")
        return None

    fake.override = flaky
    async with trio.open_nursery() as nursery:
        assigner = start(nursery, fake, leadership)
        leadership.gain()
        await trio.sleep(5)
        during = assigner.snapshot()
        await trio.sleep(120)
        after = assigner.snapshot()
        nursery.cancel_scope.cancel()
    assert during.consecutive_failures >= 3
    assert during.last_error is not None
    assert during.last_error.type in ("ServerError", "NetworkError")
    reads = fake.reads()
    gaps = [b - a for a, b in itertools.pairwise(reads[:13])]
    assert len(gaps) == 12
    for failures_so_far, gap in enumerate(gaps, start=1):
        assert 0.0 <= gap <= min(10.0, 0.5 * 2 ** (failures_so_far - 1)) + 1e-9
    assert sum(gaps[6:]) > 10.0  # jittered but growing: not a hot loop
    assert len(fake.posts) == 1 and fake.holder == ME
    assert after.consecutive_failures == 0


async def test_unprocessable_waits_and_retries(autojump_clock: trio.testing.MockClock) -> None:
    fake, leadership = FakeDO(holder=OTHER), FakeLeadership()
    refusals = 2
    refused_at: list[float] = []

    async def busy(request: httpx.Request) -> httpx.Response | None:
        nonlocal refusals
        if request.method == "POST" and refusals:
            refusals -= 1
            refused_at.append(trio.current_time())
            return error(422, "unprocessable_entity", "Droplet already has a pending event.")
        return None

    fake.override = busy
    assigner = await lead_for(60, fake, leadership)
    assert len(refused_at) == 2
    for refusal in refused_at:
        next_request = min(t for t, _, _ in fake.requests if t > refusal)
        assert 2.0 <= next_request - refusal <= 3.0
    # A refused POST started no action, so the retry waits out the 422 delay, not the
    # cool-off (which only spaces out assignments that really began).
    post_times = [t for t, method, _ in fake.requests if method == "POST"]
    assert len(post_times) == 3
    assert all(2.0 <= b - a < 5.0 for a, b in itertools.pairwise(post_times))
    assert fake.holder == ME
    assert assigner.snapshot().last_error is None  # cleared once the API answered again


async def test_a_refused_first_post_is_retried_without_the_cooloff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A 503 on the POST started no action: waiting out the 5 s cool-off would only
    lengthen the outage after a failover."""
    fake, leadership = FakeDO(holder=OTHER), FakeLeadership()
    refused = False

    async def once_unavailable(request: httpx.Request) -> httpx.Response | None:
        nonlocal refused
        if request.method == "POST" and not refused:
            refused = True
            return error(503, "service_unavailable", "try again")
        return None

    fake.override = once_unavailable
    async with trio.open_nursery() as nursery:
        start(nursery, fake, leadership)
        t0 = trio.current_time()
        leadership.gain()
        await trio.sleep(30)
        nursery.cancel_scope.cancel()
    assert refused and fake.holder == ME
    assert len(fake.posts) == 1
    assert fake.posts[0][0] - t0 < AssignerSettings().cooloff_interval


async def test_a_locked_ip_is_reread_every_poll_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Another node's action in flight: re-read at the action poll rate, then assign."""
    fake, leadership = FakeDO(holder=OTHER, action_seconds=4.5), FakeLeadership()
    fake.holder = None
    async with trio.open_nursery() as nursery:
        other_leadership = FakeLeadership()
        other = Assigner(  # a previous leader whose action is still running
            DigitalOceanProvider(
                DigitalOceanClient(
                    CLIENT_SETTINGS, TOKEN, transport=httpx.MockTransport(fake.handler)
                )
            ),
            IP,
            OTHER,
            other_leadership,
            AssignerSettings(),
            random.Random(1),
        )
        nursery.start_soon(other.run)
        other_leadership.gain()
        await trio.sleep(0.5)  # its POST is in, the IP is locked for 4.5 s
        other_leadership.lose()
        start(nursery, fake, leadership)
        leadership.gain()
        await trio.sleep(30)
        nursery.cancel_scope.cancel()
    assert [droplet for _, droplet in fake.posts] == [OTHER, ME]
    unlocked_at = fake.posts[0][0] + 4.5
    poll = AssignerSettings().action_poll_interval
    while_locked = [t for t in fake.reads() if fake.posts[0][0] < t <= fake.posts[1][0]]
    assert len(while_locked) >= 4
    assert all(b - a <= poll + 0.01 for a, b in itertools.pairwise(while_locked))
    assert fake.posts[1][0] - unlocked_at <= poll + 0.01
    assert fake.holder == ME


async def test_rate_limit_waits_for_retry_after(autojump_clock: trio.testing.MockClock) -> None:
    fake, leadership = FakeDO(holder=OTHER), FakeLeadership()
    limited_at: list[float] = []

    async def limited(request: httpx.Request) -> httpx.Response | None:
        if not limited_at:
            limited_at.append(trio.current_time())
            return error(
                429, "too_many_requests", "API rate limit exceeded.", **{"retry-after": "30"}
            )
        return None

    fake.override = limited
    await lead_for(60, fake, leadership)
    times = [t for t, _, _ in fake.requests]
    assert times[1] - times[0] == pytest.approx(30.0)
    assert fake.holder == ME


async def test_rate_limit_waits_until_ratelimit_reset(
    autojump_clock: trio.testing.MockClock,
) -> None:
    epoch = 1_800_000_000.0
    fake, leadership = FakeDO(holder=OTHER), FakeLeadership()
    limited_at: list[float] = []

    async def limited(request: httpx.Request) -> httpx.Response | None:
        if not limited_at:
            now = trio.current_time()
            limited_at.append(now)
            reset = str(int(epoch + now) + 45)
            return error(
                429, "too_many_requests", "API rate limit exceeded.", **{"ratelimit-reset": reset}
            )
        return None

    fake.override = limited
    await lead_for(100, fake, leadership, wall_clock=lambda: epoch + trio.current_time())
    times = [t for t, _, _ in fake.requests]
    assert 44.0 <= times[1] - times[0] <= 45.0
    assert fake.holder == ME


async def test_budget_is_never_exceeded_in_a_429_storm(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Every answer is a 429 saying "retry now": only the budget stops a hot loop."""
    fake, leadership = FakeDO(holder=OTHER), FakeLeadership()

    async def storm(request: httpx.Request) -> httpx.Response:
        return error(429, "too_many_requests", "API rate limit exceeded.", **{"retry-after": "0"})

    fake.override = storm
    # A small budget keeps the test quick (httpx costs ~2 ms a request); the logic is the same.
    settings = AssignerSettings(requests_per_minute=30, requests_per_hour=300)
    async with trio.open_nursery() as nursery:
        assigner = start(nursery, fake, leadership, settings)
        leadership.gain()
        await trio.sleep(2 * 3600)
        snapshot = assigner.snapshot()
        nursery.cancel_scope.cancel()
    times = [t for t, _, _ in fake.requests]
    # The budget binds (the loop wanted far more) ...
    assert len(times) >= 2 * settings.requests_per_hour - settings.requests_per_minute
    # ... and holds in every window, far below DigitalOcean's 250/min and 5,000/h.
    for i, now in enumerate(times):  # times are sorted: count each window with bisect
        assert i + 1 - bisect.bisect_right(times, now - 60) <= settings.requests_per_minute
        assert i + 1 - bisect.bisect_right(times, now - 3600) <= settings.requests_per_hour
    assert snapshot.requests_last_hour <= settings.requests_per_hour
    assert snapshot.requests_last_minute <= settings.requests_per_minute
    assert fake.posts == []


async def test_config_errors_are_logged_loudly_and_retried_slowly(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    fake, leadership = FakeDO(holder=OTHER), FakeLeadership()
    token_fixed = False

    async def unauthorized(request: httpx.Request) -> httpx.Response | None:
        if not token_fixed:
            return error(401, "unauthorized", "Unable to authenticate you.")
        return None

    fake.override = unauthorized
    with caplog.at_level(logging.DEBUG):
        async with trio.open_nursery() as nursery:
            assigner = start(nursery, fake, leadership)
            leadership.gain()
            await trio.sleep(200)
            broken = assigner.snapshot()
            token_fixed = True
            await trio.sleep(70)
            nursery.cancel_scope.cancel()
    first_four = [t for t, _, _ in fake.requests][:4]
    assert [b - a for a, b in itertools.pairwise(first_four)] == [60.0, 60.0, 60.0]
    assert broken.last_error is not None and broken.last_error.type == "Unauthorized"
    assert broken.consecutive_failures == 4
    errors = [
        r for r in caplog.records if r.levelno == logging.ERROR and r.name == "sidecar.assigner"
    ]
    assert len(errors) == 4 and "token" in errors[0].getMessage()
    assert fake.holder == ME
    everything = caplog.text + repr([vars(r) for r in caplog.records]) + repr(broken)
    assert TOKEN_TEXT not in everything and "c0ffeec0ffee" not in everything


async def test_a_changed_token_file_ends_the_wait_after_a_401(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """Issue 12, items 4 and 5: the token file is watched while a 401 is waited out (one
    stat a second, no request): touching it with the same token costs no request, a new
    token is used within a second instead of `config_error_retry_interval` later, and the
    error leaves the snapshot once the API answers."""
    path = tmp_path / "do_token"
    path.write_text("dop_v1_" + "0" * 64 + "\n")
    tokens = TokenSource(DigitalOceanSettings(token_file=str(path)), {})
    fake, leadership = FakeDO(holder=OTHER), FakeLeadership()
    async with trio.open_nursery() as nursery:
        assigner = start(nursery, fake, leadership, tokens=tokens)
        leadership.gain()
        await trio.sleep(10)
        info = path.stat()
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))  # same token
        await trio.sleep(10)
        broken = assigner.snapshot()
        rotated_at = trio.current_time()
        path.write_text(TOKEN_TEXT + "\n")
        await trio.sleep(10)
        fixed = assigner.snapshot()
        nursery.cancel_scope.cancel()
    assert fake.refused == [0.0]  # one refused read; the touch cost nothing
    assert broken.last_error is not None and broken.last_error.status == 401
    retried = next(t for t, _, _ in fake.requests if t > 0)
    assert rotated_at <= retried <= rotated_at + 1.0
    assert fake.holder == ME and tokens.generation == 1
    assert fixed.last_error is None and fixed.consecutive_failures == 0


async def test_a_reload_ends_the_wait_after_a_404(autojump_clock: trio.testing.MockClock) -> None:
    """Issue 12, item 5: an IP re-created after a 404 is used as soon as the config is
    reloaded (`retry_now()`), not a minute later; a reload with nothing fixed costs one
    request (and no more)."""
    fake, leadership = FakeDO(holder=OTHER), FakeLeadership()
    exists = False

    async def missing(request: httpx.Request) -> httpx.Response | None:
        if not exists and request.method == "GET":
            return error(404, "not_found", "The resource you requested could not be found.")
        return None

    fake.override = missing
    async with trio.open_nursery() as nursery:
        assigner = start(nursery, fake, leadership)
        leadership.gain()
        await trio.sleep(10)
        assigner.retry_now()  # a reload that fixed nothing
        await trio.sleep(10)
        broken = assigner.snapshot()
        exists = True
        assigner.retry_now()  # the reload after the IP was re-created
        await trio.sleep(10)
        fixed = assigner.snapshot()
        nursery.cancel_scope.cancel()
    assert fake.reads()[:3] == [0.0, 10.0, 20.0]
    assert [t for t, _ in fake.posts] == [20.0]
    assert broken.last_error is not None and broken.last_error.status == 404
    assert fake.holder == ME
    assert fixed.last_error is None


# --------------------------------------------------------------------------- actions


async def test_an_unknown_action_falls_back_to_reading_the_ip(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake, leadership, observer = FakeDO(holder=OTHER), FakeLeadership(), RecordingObserver()
    fake.actions_unknown = True
    await lead_for(30, fake, leadership, observer=observer)
    after_post = [path for _, method, path in fake.requests[2:5]]
    assert after_post == [
        f"/v2/reserved_ips/{IP}/actions/501",
        "/v2/actions/501",
        f"/v2/reserved_ips/{IP}",
    ]
    assert len(fake.posts) == 1 and fake.holder == ME
    assert observer.assignments[0][1] == "unknown"


async def test_an_action_that_never_ends_times_out_then_retries(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake, leadership, observer = FakeDO(holder=OTHER), FakeLeadership(), RecordingObserver()
    fake.actions_never_finish = True
    fake.lock_while_pending = False
    await lead_for(150, fake, leadership, observer=observer)
    assert len(fake.posts) == 2
    assert fake.posts[1][0] - fake.posts[0][0] == pytest.approx(90.0, abs=1.0)
    assert observer.assignments[0] == (pytest.approx(90.0), "timeout")


async def test_an_errored_action_is_retried_after_the_cooloff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake, leadership, observer = FakeDO(holder=OTHER), FakeLeadership(), RecordingObserver()
    fake.fail_next_action = True
    await lead_for(60, fake, leadership, observer=observer)
    assert [outcome for _, outcome in observer.assignments] == ["errored", "completed"]
    assert fake.posts[1][0] - fake.posts[0][0] == pytest.approx(5.0)
    assert fake.holder == ME


# --------------------------------------------------------------------------- leadership


async def test_losing_leadership_cancels_a_hanging_request_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake, leadership = FakeDO(holder=OTHER), FakeLeadership()
    cancelled_at: list[float] = []

    async def hang(request: httpx.Request) -> httpx.Response | None:
        try:
            await trio.sleep_forever()
        finally:
            cancelled_at.append(trio.current_time())

    fake.override = hang
    async with trio.open_nursery() as nursery:
        assigner = start(nursery, fake, leadership)
        leadership.gain()
        await trio.sleep(5)
        assert assigner.snapshot().leading
        lost_at = trio.current_time()
        leadership.lose()
        await trio.sleep(600)
        snapshot = assigner.snapshot()
        nursery.cancel_scope.cancel()
    # Cancelled at the very instant of the loss: no virtual time passed.
    assert cancelled_at[0] == lost_at
    assert leadership.waits[1] == lost_at  # the assigner was back waiting at once
    assert not snapshot.leading
    assert [t for t, _, _ in fake.requests] == [pytest.approx(lost_at - 5)]
    assert fake.posts == []


async def test_no_post_after_losing_leadership_mid_assignment(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake, leadership, observer = FakeDO(holder=OTHER), FakeLeadership(), RecordingObserver()
    cancelled_at: list[float] = []
    hang_posts = True

    async def hang_post(request: httpx.Request) -> httpx.Response | None:
        if request.method == "POST" and hang_posts:
            try:
                await trio.sleep_forever()
            finally:
                cancelled_at.append(trio.current_time())
        return None

    fake.override = hang_post
    async with trio.open_nursery() as nursery:
        assigner = start(nursery, fake, leadership, observer=observer)
        leadership.gain()
        await trio.sleep(3)
        lost_at = trio.current_time()
        leadership.lose()
        await trio.sleep(300)
        assert [t for t, _, _ in fake.requests if t >= lost_at] == []
        assert assigner.snapshot().last_assignment is not None
        assert assigner.snapshot().last_assignment.outcome == "cancelled"  # type: ignore[union-attr]
        # Regaining leadership starts over, and the first assignment skips the cool-off.
        hang_posts = False
        regained_at = trio.current_time()
        leadership.gain()
        await trio.sleep(30)
        nursery.cancel_scope.cancel()
    assert cancelled_at == [lost_at]
    posts = [t for t, method, _ in fake.requests if method == "POST"]
    assert posts == [pytest.approx(lost_at - 3), regained_at]
    assert observer.assignments[0] == (pytest.approx(3.0), "cancelled")
    assert fake.holder == ME


async def test_a_paused_node_never_posts(autojump_clock: trio.testing.MockClock) -> None:
    fake, leadership = FakeDO(holder=OTHER), FakeLeadership()
    async with trio.open_nursery() as nursery:
        start(nursery, fake, leadership)
        leadership.gain()
        leadership.paused = True  # the scope is open, but the lease ran out while paused
        await trio.sleep(120)
        assert fake.posts == []
        assert fake.reads()  # it may look, it must not touch
        leadership.paused = False
        resumed_at = trio.current_time()
        await trio.sleep(30)
        nursery.cancel_scope.cancel()
    assert len(fake.posts) == 1 and 0 <= fake.posts[0][0] - resumed_at <= 2.0
    assert fake.holder == ME


async def test_an_already_cancelled_scope_is_fine(autojump_clock: trio.testing.MockClock) -> None:
    fake, leadership = FakeDO(holder=OTHER), FakeLeadership()
    leadership.gain()
    assert leadership.scope is not None
    leadership.scope.cancel()  # lost again before the assigner even entered the scope
    async with trio.open_nursery() as nursery:
        start(nursery, fake, leadership)
        await trio.sleep(0.55)  # between two re-offers, so the order is deterministic
        leadership.leading = False
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert fake.requests == []
    # Entered the cancelled scope (nothing sent), then was re-offered the used scope every
    # 0.1 s without entering it again, until the view stopped claiming leadership.
    assert leadership.waits == pytest.approx([0.0, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])


async def test_a_view_that_hands_back_a_used_scope_does_not_crash_the_node(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake, leadership = FakeDO(holder=OTHER), FakeLeadership()
    async with trio.open_nursery() as nursery:
        start(nursery, fake, leadership)
        leadership.gain()
        await trio.sleep(10)
        leadership.lose()
        leadership.leading = True  # "leader" again by the clock, but still the old scope
        await trio.sleep(1)
        leadership.gain()  # the view catches up with a fresh scope
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert fake.holder == ME
    assert 5 <= len(leadership.waits) <= 15


# --------------------------------------------------------------------------- settings and budget


def test_settings_defaults() -> None:
    settings = AssignerSettings()
    assert settings.reconcile_interval == 10.0
    assert settings.action_timeout == 90.0
    assert (settings.backoff_base_delay, settings.backoff_max_delay) == (0.5, 10.0)
    assert settings.cooloff_interval == 5.0
    assert (settings.requests_per_minute, settings.requests_per_hour) == (60, 1200)


@pytest.mark.parametrize(
    "fields",
    [
        {"reconcile_interval": 0},
        {"reconcile_jitter": 0.9},
        {"action_timeout": -1},
        {"backoff_base_delay": 5, "backoff_max_delay": 1},
        {"requests_per_minute": 251},
        {"requests_per_hour": 5001},
        {"requests_per_minute": 100, "requests_per_hour": 50},
        {"cooloff_interval": -1},
        {"reconcile_every": 3},
    ],
)
def test_settings_reject_bad_values(fields: dict[str, Any]) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(fields, AssignerSettings)


def test_budget_windows_without_a_clock() -> None:
    budget = RequestBudget(per_minute=3, per_hour=5)
    assert budget.wait_needed(0.0, urgent=True) == 0.0
    budget._sent.extend([0.0, 1.0, 2.0])
    assert (
        budget.wait_needed(2.0, urgent=True) == 58.0
    )  # the 4th must wait until the 1st leaves the minute
    budget._sent.extend([60.0, 61.0])
    assert (
        budget.wait_needed(62.0, urgent=True) == 3538.0
    )  # the hour is full until the 1st is an hour old
    assert budget.wait_needed(3600.0, urgent=True) == 0.0


async def test_budget_spaces_a_burst(autojump_clock: trio.testing.MockClock) -> None:
    budget = RequestBudget(per_minute=10, per_hour=25)
    start_time = trio.current_time()
    times = []
    for _ in range(30):
        await budget.acquire(urgent=True)
        times.append(trio.current_time() - start_time)
    assert times[:10] == [0.0] * 10
    assert times[10:20] == [60.0] * 10
    assert times[20:25] == [120.0] * 5
    assert times[25:] == [3600.0] * 5


def test_routine_requests_leave_a_tenth_of_the_budget_to_urgent_ones() -> None:
    budget = RequestBudget(per_minute=10, per_hour=100)
    budget._sent.extend(float(t) for t in range(9))
    assert budget.wait_needed(9.0) == 52.0  # routine requests leave 2 of 10 to urgent ones
    assert budget.wait_needed(9.0, urgent=True) == 0.0
    budget._sent.append(9.0)
    assert budget.wait_needed(9.5, urgent=True) == 50.5  # the whole budget still binds


async def test_a_failover_storm_never_delays_the_assign_for_routine_requests(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Routine reads and polls of earlier stints fill the routine share; the next
    leadership's first read and assign still go out at once."""
    fake, leadership = FakeDO(holder=OTHER, action_seconds=0.5), FakeLeadership()
    settings = AssignerSettings(requests_per_minute=10, requests_per_hour=100)
    budget = RequestBudget(settings.requests_per_minute, settings.requests_per_hour)
    while budget.wait_needed(trio.current_time()) == 0:
        await budget.acquire()  # routine requests of earlier stints fill the routine share
    client = DigitalOceanClient(CLIENT_SETTINGS, TOKEN, transport=httpx.MockTransport(fake.handler))
    assigner = Assigner(
        DigitalOceanProvider(client), IP, ME, leadership, settings, random.Random(3), budget=budget
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(assigner.run)
        t0 = trio.current_time()
        leadership.gain()
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    assert fake.posts and fake.posts[0][0] == t0


# --------------------------------------------------------------------------- against the emulator

EPOCH = 1_800_000_000.0


def start_emulated(
    nursery: trio.Nursery,
    leadership: FakeLeadership,
    observer: RecordingObserver | None = None,
    **emulator_settings: Any,
) -> tuple[Emulator, Assigner]:
    """The real client and assigner against the in-process emulator (IP held by OTHER)."""
    emulator = Emulator(
        TOKEN_TEXT,
        EmulatorSettings(**emulator_settings),
        clock=trio.current_time,
        wall_clock=lambda: EPOCH + trio.current_time(),
        rng=random.Random(3),
    )
    for droplet in (ME, OTHER):
        emulator.state.add_droplet(droplet, "nyc3")
    emulator.state.add_reserved_ip(IP, "nyc3", OTHER)
    client = DigitalOceanClient(
        CLIENT_SETTINGS,
        TOKEN,
        transport=httpx.ASGITransport(app=build_app(emulator)),
        wall_clock=lambda: EPOCH + trio.current_time(),
    )
    assigner = Assigner(
        DigitalOceanProvider(client),
        IP,
        ME,
        leadership,
        AssignerSettings(),
        random.Random(5),
        observer,
    )
    nursery.start_soon(assigner.run)
    return emulator, assigner


def holders(emulator: Emulator) -> list[int | None]:
    emulator.state.settle()
    return [entry.droplet_id for entry in emulator.state.history]


async def test_emulator_assigns_and_repairs(autojump_clock: trio.testing.MockClock) -> None:
    leadership, observer = FakeLeadership(), RecordingObserver()
    async with trio.open_nursery() as nursery:
        emulator, assigner = start_emulated(nursery, leadership, observer, action_404_seconds=0.5)
        leadership.gain()
        await trio.sleep(30)
        assert holders(emulator) == [OTHER, ME]
        emulator.state.manual_assign(IP, OTHER)  # someone moves it by hand
        await trio.sleep(20)
        snapshot = assigner.snapshot()
        nursery.cancel_scope.cancel()
    assert holders(emulator) == [OTHER, ME, OTHER, ME]
    assert snapshot.holder_droplet_id == ME
    assert [outcome for _, outcome in observer.assignments] == ["completed", "completed"]


async def test_emulator_outage_and_forced_429_are_ridden_out_within_the_budget(
    autojump_clock: trio.testing.MockClock,
) -> None:
    leadership = FakeLeadership()
    async with trio.open_nursery() as nursery:
        emulator, assigner = start_emulated(nursery, leadership)
        now = trio.current_time()
        emulator.faults.update(FaultUpdate(outage_seconds=600.0), now)
        emulator.faults.update(FaultUpdate(force_429_seconds=900.0), now)
        leadership.gain()
        await trio.sleep(1200)
        nursery.cancel_scope.cancel()
    assert holders(emulator) == [OTHER, ME]
    counts = emulator.requests.describe()
    statuses = {row["status"] for row in counts["requests"]}
    assert 503 in statuses and 429 in statuses
    assert counts["total"] <= 1200  # the node's hourly budget, far under the API's limits
    assert assigner.snapshot().consecutive_failures == 0


async def test_emulator_hang_is_cancelled_when_leadership_is_lost(
    autojump_clock: trio.testing.MockClock,
) -> None:
    leadership = FakeLeadership()
    async with trio.open_nursery() as nursery:
        emulator, assigner = start_emulated(nursery, leadership)
        emulator.faults.update(
            FaultUpdate(outage_seconds=3600.0, outage_mode="hang"), trio.current_time()
        )
        leadership.gain()
        await trio.sleep(5)
        lost_at = trio.current_time()
        leadership.lose()
        await trio.lowlevel.checkpoint()
        await trio.lowlevel.checkpoint()
        assert not assigner.snapshot().leading
        assert trio.current_time() == lost_at
        nursery.cancel_scope.cancel()
    assert holders(emulator) == [OTHER]


async def test_an_action_ending_with_an_unknown_status_is_settled_by_reading_the_ip(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """DigitalOcean once answered `done` instead of `completed`: the assigner must not poll
    such an action until `action_timeout` (90 s) nor call it a failure; the IP says what
    happened."""
    leadership, observer = FakeLeadership(), RecordingObserver()
    async with trio.open_nursery() as nursery:
        emulator, assigner = start_emulated(nursery, leadership, observer, action_seconds=2.0)
        emulator.faults.update(FaultUpdate(action_completed_status="done"), trio.current_time())
        leadership.gain()
        await trio.sleep(10)
        snapshot = assigner.snapshot()
        nursery.cancel_scope.cancel()
    assert holders(emulator) == [OTHER, ME]
    assert [outcome for _, outcome in observer.assignments] == ["unknown"]
    assert observer.assignments[0][0] <= 3.0, "the first poll that says `done` ends it"
    assert snapshot.holder_droplet_id == ME, "the IP was read again after the action"
    assert snapshot.last_error is None
