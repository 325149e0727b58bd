"""The DigitalOcean provider: settings, token handling, shapes, every status, broken servers.

Shape cases run over `httpx.MockTransport`; network failures (refused, reset, garbage,
dribbled and huge bodies, TLS) run against small scripted servers on 127.0.0.1. Every
error path checks that the typed error is raised and that the token appears nowhere:
not in str/repr/args of the error, not in its formatted traceback, not in any log record.
"""

from __future__ import annotations

import email.utils
import functools
import json
import logging
import pickle
import socket
import ssl
import traceback
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio
import trio.testing
import trustme

from sidecar.emulator import Emulator, EmulatorSettings, build_app
from sidecar.providers.digitalocean import (
    Action,
    APIToken,
    DigitalOceanClient,
    DigitalOceanSettings,
    MalformedResponse,
    NetworkError,
    NotFound,
    ProviderError,
    RateLimited,
    ReservedIP,
    ServerError,
    TokenError,
    TokenSource,
    Unauthorized,
    UnexpectedStatus,
    Unprocessable,
    load_token,
)

TOKEN_TEXT = "dop_v1_" + "5ecret" * 10
TOKEN = APIToken(TOKEN_TEXT)
IP = "203.0.113.10"
LOCAL = DigitalOceanSettings(api_url="http://127.0.0.1:1", metadata_url="http://127.0.0.1:1")

REGION = {"name": "New York 3", "slug": "nyc3", "available": True, "features": [], "sizes": []}


def reserved_ip_body(
    droplet_id: int | None, *, locked: bool = False, key: str = "reserved_ip"
) -> dict[str, Any]:
    droplet = None if droplet_id is None else {"id": droplet_id, "name": "web", "status": "active"}
    return {
        key: {"ip": IP, "droplet": droplet, "region": REGION, "locked": locked, "project_id": "p"},
        "links": {},
    }


def action_body(action_id: int, status: str = "in-progress", **extra: Any) -> dict[str, Any]:
    body = {
        "id": action_id,
        "status": status,
        "type": "assign_ip",
        "started_at": "2026-11-29T12:00:00Z",
        "completed_at": None,
        "resource_id": 1234,
        "resource_type": "reserved_ip",
        "region": REGION,
        "region_slug": "nyc3",
    }
    body.update(extra)
    return {"action": body}


Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


def mock_client(
    handler: Handler,
    settings: DigitalOceanSettings = LOCAL,
    **kwargs: Any,
) -> DigitalOceanClient:
    return DigitalOceanClient(settings, TOKEN, transport=httpx.MockTransport(handler), **kwargs)


def assert_no_token(exc: BaseException, caplog: pytest.LogCaptureFixture | None = None) -> None:
    texts = [
        str(exc),
        repr(exc),
        repr(exc.args),
        repr(vars(exc)),
        "".join(traceback.format_exception(exc)),
    ]
    if caplog is not None:
        texts.append(caplog.text)
        texts.extend(repr(vars(record)) for record in caplog.records)
    for text in texts:
        assert TOKEN_TEXT not in text
        assert "5ecret5ecret" not in text


@pytest.fixture(autouse=True)
def _debug_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Capture everything, httpx's and httpcore's debug logs included, for the leak checks."""
    with caplog.at_level(logging.DEBUG):
        yield


# --------------------------------------------------------------------------- settings


def test_settings_defaults_are_the_real_api() -> None:
    settings = DigitalOceanSettings()
    assert settings.api_url == "https://api.digitalocean.com"
    assert settings.metadata_url == "http://169.254.169.254"
    assert settings.allow_insecure_http is False
    assert settings.api_flavor == "reserved_ip"


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8080", "http://127.9.9.9", "http://[::1]:80", "http://localhost:1"]
)
def test_plain_http_is_allowed_to_loopback(url: str) -> None:
    assert not DigitalOceanSettings(api_url=url).token_is_exposed()


@pytest.mark.parametrize(
    "url", ["http://198.18.0.5:8080", "http://emulator:8080", "http://[2001:db8::1]"]
)
def test_plain_http_elsewhere_is_refused_unless_allowed(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ValueError, match="allow_insecure_http"):
        DigitalOceanSettings(api_url=url)
    with pytest.raises(msgspec.ValidationError, match="allow_insecure_http"):
        msgspec.convert({"api_url": url}, DigitalOceanSettings)
    settings = DigitalOceanSettings(api_url=url, allow_insecure_http=True)
    DigitalOceanClient(settings, TOKEN)
    assert any(
        r.levelno == logging.WARNING and "plain http" in r.getMessage() for r in caplog.records
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"api_url": "ftp://127.0.0.1"}, "https://"),
        ({"api_url": "https://"}, "no host"),
        ({"api_url": "https://user:pw@api.example"}, "credentials"),
        ({"api_url": "https://api.example/?x=1"}, "query"),
        ({"api_url": "https://api.example:99999"}, "valid URL"),
        ({"metadata_url": "169.254.169.254"}, "metadata_url"),
        ({"request_timeout": 0}, "request_timeout"),
        ({"max_response_bytes": 10}, "max_response_bytes"),
        ({"token_file": " "}, "token_file"),
        ({"api_flavor": "elastic_ip"}, "api_flavor"),
        ({"api_token": "x"}, "api_token"),
    ],
)
def test_settings_reject_mistakes_naming_the_key(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=message):
        msgspec.convert(fields, DigitalOceanSettings)


def test_https_with_an_unloadable_ca_file_fails_at_construction(tmp_path: Path) -> None:
    settings = DigitalOceanSettings(
        api_url="https://198.18.0.2", ca_file=str(tmp_path / "none.pem")
    )
    with pytest.raises(ValueError, match="ca_file"):
        DigitalOceanClient(settings, TOKEN)


# --------------------------------------------------------------------------- token


def test_token_is_redacted_everywhere() -> None:
    assert TOKEN_TEXT not in repr(TOKEN)
    assert TOKEN_TEXT not in str(TOKEN)
    assert TOKEN_TEXT not in f"{TOKEN}"
    with pytest.raises(TypeError):
        pickle.dumps(TOKEN)
    client = DigitalOceanClient(LOCAL, TOKEN)
    assert TOKEN_TEXT not in repr(client)
    assert TOKEN_TEXT not in repr(vars(client))
    assert TOKEN_TEXT not in repr(client._api.auth)
    assert TOKEN_TEXT not in repr(client._api.headers)
    assert TOKEN.reveal() == TOKEN_TEXT


def test_load_token_from_file_and_env(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN_TEXT + "\n")
    assert load_token(DigitalOceanSettings(token_file=str(path)), {}).reveal() == TOKEN_TEXT
    assert (
        load_token(DigitalOceanSettings(), {"DIGITALOCEAN_TOKEN": f" {TOKEN_TEXT} "}).reveal()
        == TOKEN_TEXT
    )
    # The file wins over the environment when configured.
    env = {"DIGITALOCEAN_TOKEN": "other"}
    assert load_token(DigitalOceanSettings(token_file=str(path)), env).reveal() == TOKEN_TEXT


def test_token_source_rereads_the_file_and_keeps_the_old_token_on_a_bad_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "token"
    path.write_text("dop_v1_old\n")
    tokens = TokenSource(DigitalOceanSettings(token_file=str(path)), {})
    assert tokens.rereadable and tokens.current().reveal() == "dop_v1_old"
    assert not tokens.changed_on_disk() and not tokens.refresh() and tokens.generation == 0
    path.write_text(TOKEN_TEXT + "\n")
    assert tokens.changed_on_disk()
    assert tokens.refresh() and tokens.current().reveal() == TOKEN_TEXT
    assert tokens.generation == 1 and not tokens.changed_on_disk()
    # Half a rotation (the file gone, or empty) keeps the token in use, and says why.
    path.unlink()
    with pytest.raises(TokenError, match=r"digitalocean\.token_file"):
        tokens.refresh()
    path.write_text("\n")
    with pytest.raises(TokenError, match="empty"):
        tokens.refresh()
    assert tokens.current().reveal() == TOKEN_TEXT and tokens.generation == 1
    assert TOKEN_TEXT not in repr(tokens)


def test_token_source_from_the_environment_is_fixed() -> None:
    tokens = TokenSource(DigitalOceanSettings(), {"DIGITALOCEAN_TOKEN": TOKEN_TEXT})
    assert not tokens.rereadable
    assert not tokens.changed_on_disk() and not tokens.refresh()
    assert tokens.current().reveal() == TOKEN_TEXT


async def test_the_client_sends_the_refreshed_token_and_masks_the_old_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN_TEXT + "\n")
    tokens = TokenSource(DigitalOceanSettings(token_file=str(path)), {})
    sent: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers["authorization"])
        # A server echoing every token it ever saw: both must be masked.
        message = "bad tokens " + TOKEN_TEXT + " dop_v1_new"
        return httpx.Response(401, json={"id": "unauthorized", "message": message})

    async with DigitalOceanClient(LOCAL, tokens, transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(Unauthorized):
            await client.get_reserved_ip(IP)
        path.write_text("dop_v1_new\n")
        assert tokens.refresh()
        with pytest.raises(Unauthorized) as caught:
            await client.get_reserved_ip(IP)
    assert sent == [f"Bearer {TOKEN_TEXT}", "Bearer dop_v1_new"]
    assert_no_token(caught.value)
    assert "dop_v1_new" not in str(caught.value)


def test_load_token_errors_name_the_place_and_never_the_token(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(TokenError, match="missing") as caught:
        load_token(DigitalOceanSettings(token_file=str(missing)), {})
    assert "No such file" in str(caught.value)
    with pytest.raises(TokenError, match="DIGITALOCEAN_TOKEN"):
        load_token(DigitalOceanSettings(), {})
    with pytest.raises(TokenError, match="DIGITALOCEAN_TOKEN"):
        load_token(DigitalOceanSettings(), {"DIGITALOCEAN_TOKEN": "   "})
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(TokenError, match="empty"):
        load_token(DigitalOceanSettings(token_file=str(empty)), {})
    # A token that would break an HTTP header is refused without being shown.
    bad = tmp_path / "bad"
    bad.write_text(TOKEN_TEXT + " " + TOKEN_TEXT)
    with pytest.raises(TokenError, match="malformed") as caught:
        load_token(DigitalOceanSettings(token_file=str(bad)), {})
    assert_no_token(caught.value)
    with pytest.raises(TokenError) as caught:
        load_token(DigitalOceanSettings(), {"DIGITALOCEAN_TOKEN": TOKEN_TEXT + "\r\nX: y"})
    assert_no_token(caught.value)


# --------------------------------------------------------------------------- shapes


async def test_get_reserved_ip_reads_holder_region_lock_and_sends_the_token() -> None:
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=reserved_ip_body(1001, locked=True))

    async with mock_client(handler) as client:
        result = await client.get_reserved_ip(IP)
    assert result == ReservedIP(ip=IP, droplet_id=1001, region="nyc3", locked=True, http_status=200)
    assert seen[0].method == "GET"
    assert seen[0].url.path == f"/v2/reserved_ips/{IP}"
    assert seen[0].headers["authorization"] == f"Bearer {TOKEN_TEXT}"


async def test_unassigned_ip_has_no_droplet() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=reserved_ip_body(None))

    async with mock_client(handler) as client:
        assert (await client.get_reserved_ip(IP)).droplet_id is None


async def test_list_follows_pagination() -> None:
    pages: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        page = request.url.params["page"]
        pages.append(page)
        assert request.url.params["per_page"] == "200"
        item = reserved_ip_body(int(page))["reserved_ip"]
        links = (
            {"pages": {"next": "https://api.digitalocean.com/v2/reserved_ips?page=2"}}
            if page == "1"
            else {}
        )
        return httpx.Response(
            200, json={"reserved_ips": [item], "links": links, "meta": {"total": 2}}
        )

    async with mock_client(handler) as client:
        result = await client.list_reserved_ips()
    assert [r.droplet_id for r in result] == [1, 2]
    assert pages == ["1", "2"]


async def test_assign_and_unassign_post_the_documented_bodies() -> None:
    bodies: list[Any] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == f"/v2/reserved_ips/{IP}/actions"
        assert request.headers["content-type"] == "application/json"
        bodies.append(json.loads(request.content))
        return httpx.Response(201, json=action_body(7, type="assign_ip"))

    async with mock_client(handler) as client:
        action = await client.assign(IP, 1001)
        await client.unassign(IP)
    assert action.id == 7 and action.status == "in-progress" and not action.done
    assert action.http_status == 201 and action.region == "nyc3"
    assert bodies == [{"type": "assign", "droplet_id": 1001}, {"type": "unassign"}]


async def test_get_ip_action_falls_back_to_actions_endpoint() -> None:
    paths: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        if request.url.path.startswith("/v2/reserved_ips/"):
            return httpx.Response(404, json={"id": "not_found", "message": "gone"})
        return httpx.Response(200, json=action_body(9, "completed"))

    async with mock_client(handler) as client:
        action = await client.get_ip_action(IP, 9)
        assert action == Action(
            id=9,
            status="completed",
            type="assign_ip",
            started_at="2026-11-29T12:00:00Z",
            resource_id=1234,
            region="nyc3",
        )
        assert action.done
        with pytest.raises(NotFound):
            await client.get_ip_action(IP, 9, fallback=False)
    assert paths == [
        f"/v2/reserved_ips/{IP}/actions/9",
        "/v2/actions/9",
        f"/v2/reserved_ips/{IP}/actions/9",
    ]


async def test_legacy_floating_ip_flavor_uses_the_old_paths_and_keys() -> None:
    paths: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        if request.url.path.endswith("/active"):
            return httpx.Response(200, text="true")
        if request.method == "POST":
            return httpx.Response(201, json=action_body(3))
        return httpx.Response(200, json=reserved_ip_body(5, key="floating_ip"))

    settings = msgspec.structs.replace(LOCAL, api_flavor="floating_ip")
    async with mock_client(handler, settings) as client:
        assert (await client.get_reserved_ip(IP)).droplet_id == 5
        await client.assign(IP, 5)
        assert await client.metadata_reserved_ip_active() is True
    assert paths == [
        f"/v2/floating_ips/{IP}",
        f"/v2/floating_ips/{IP}/actions",
        "/metadata/v1/floating_ip/ipv4/active",
    ]


async def test_metadata_calls_never_carry_the_token() -> None:
    seen: list[httpx.Request] = []
    answers = {
        "/meta/droplets/1001/metadata/v1/id": "1001",
        "/meta/droplets/1001/metadata/v1/region": "nyc3\n",
        "/meta/droplets/1001/metadata/v1/reserved_ip/ipv4/active": "false",
    }

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, text=answers[request.url.path])

    settings = DigitalOceanSettings(
        api_url="http://127.0.0.1:1", metadata_url="http://198.18.0.9/meta/droplets/1001"
    )
    async with mock_client(handler, settings) as client:
        assert await client.metadata_droplet_id() == 1001
        assert await client.metadata_region() == "nyc3"
        assert await client.metadata_reserved_ip_active() is False
    assert len(seen) == 3
    assert all("authorization" not in r.headers for r in seen)


@pytest.mark.parametrize(
    ("path", "text"),
    [
        ("id", "abc"),
        ("id", "-5"),
        ("id", "0"),
        ("id", "9" * 30),
        ("region", "NYC 3"),
        ("active", "yes"),
    ],
)
async def test_malformed_metadata(path: str, text: str) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=text)

    async with mock_client(handler) as client:
        call = {
            "id": client.metadata_droplet_id,
            "region": client.metadata_region,
            "active": client.metadata_reserved_ip_active,
        }[path]
        with pytest.raises(MalformedResponse):
            await call()


async def test_invalid_arguments_are_value_errors_before_any_request() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no request expected")

    async with mock_client(handler) as client:
        with pytest.raises(ValueError):
            await client.get_reserved_ip("203.0.113.10/../../v2/account")
        with pytest.raises(ValueError):
            await client.assign(IP, 0)
        with pytest.raises(ValueError):
            await client.get_action(-1)


# --------------------------------------------------------------------------- statuses


ERROR_CASES = [
    (301, UnexpectedStatus),
    (400, UnexpectedStatus),
    (401, Unauthorized),
    (403, Unauthorized),
    (404, NotFound),
    (409, UnexpectedStatus),
    (422, Unprocessable),
    (429, RateLimited),
    (500, ServerError),
    (502, ServerError),
    (503, ServerError),
]


@pytest.mark.parametrize(("status", "error_type"), ERROR_CASES)
@pytest.mark.parametrize(
    "body",
    [
        b'{"id":"some_id","message":"it failed","request_id":"r-1"}',
        b"<html>Bad Gateway</html>",
        b"",
        b'{"id": 5}',
        # A server echoing the token back: the message is scrubbed.
        ('{"id":"unauthorized","message":"bad token ' + TOKEN_TEXT + '"}').encode(),
    ],
    ids=["error-body", "html", "empty", "wrong-shape", "echoes-token"],
)
async def test_every_status_becomes_its_typed_error(
    status: int,
    error_type: type[ProviderError],
    body: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    observed: list[tuple[str, str, str]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        headers = {"location": "https://198.18.0.1/"} if status == 301 else {}
        return httpx.Response(status, content=body, headers=headers)

    calls = [
        lambda c: c.get_reserved_ip(IP),
        lambda c: c.list_reserved_ips(),
        lambda c: c.assign(IP, 1001),
        lambda c: c.unassign(IP),
        lambda c: c.get_ip_action(IP, 5, fallback=False),
        lambda c: c.get_action(5),
        lambda c: c.metadata_droplet_id(),
    ]
    async with mock_client(handler, on_response=lambda *a: observed.append(a)) as client:
        for call in calls:
            with pytest.raises(error_type) as caught:
                await call(client)
            error = caught.value
            assert isinstance(error, ProviderError)
            assert error.status == status
            assert error.status_label == str(status)
            if body.startswith(b'{"id":"some_id"'):
                assert error.api_id == "some_id"
                assert error.request_id == "r-1"
                assert "it failed" in str(error)
            assert_no_token(error, caplog)
    assert [o[2] for o in observed] == [str(status)] * len(calls)
    assert observed[0][:2] == ("GET", "/v2/reserved_ips/{ip}")
    assert observed[2][:2] == ("POST", "/v2/reserved_ips/{ip}/actions")


async def test_unprocessable_keeps_the_api_id_and_message() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            422,
            json={"id": "unprocessable_entity", "message": "Droplet already has a pending event."},
        )

    async with mock_client(handler) as client:
        with pytest.raises(Unprocessable) as caught:
            await client.assign(IP, 1001)
    assert caught.value.api_id == "unprocessable_entity"
    assert "pending event" in caught.value.message


@pytest.mark.parametrize(
    ("headers", "retry_after", "reset_at"),
    [
        ({"retry-after": "17", "ratelimit-reset": "1700000100"}, 17.0, 1700000100.0),
        ({"ratelimit-reset": "1700000045"}, 45.0, 1700000045.0),
        ({"ratelimit-reset": "1699999000"}, 0.0, 1699999000.0),
        ({"retry-after": email.utils.formatdate(1700000030, usegmt=True)}, 30.0, None),
        ({"retry-after": "soon"}, None, None),
        ({}, None, None),
    ],
)
async def test_rate_limited_carries_the_wait(
    headers: dict[str, str], retry_after: float | None, reset_at: float | None
) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            429,
            json={"id": "too_many_requests", "message": "API rate limit exceeded."},
            headers={"ratelimit-limit": "250", "ratelimit-remaining": "0", **headers},
        )

    async with mock_client(handler, wall_clock=lambda: 1700000000.0) as client:
        with pytest.raises(RateLimited) as caught:
            await client.get_reserved_ip(IP)
    assert caught.value.retry_after == retry_after
    assert caught.value.reset_at == reset_at


# --------------------------------------------------------------------------- malformed answers


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"",
        b"[]",
        b'{"reserved_ip": null}',
        b'{"floating_ip": {"ip": "203.0.113.10"}}',
        b'{"reserved_ip": {"ip": "203.0.113.10", "droplet": null, "region": {"slug": "nyc3"}}}',
        b'{"reserved_ip": {"ip": "203.0.113.10", "droplet": {"id": "1001"}, '
        b'"region": {"slug": "nyc3"}, "locked": false}}',
        b'{"reserved_ip": {"ip": "203.0.113.10", "droplet": {"name": "x"}, '
        b'"region": {"slug": "nyc3"}, "locked": false}}',
        b'{"reserved_ip": {"ip": "203.0.113.10", "droplet": null, "region": "nyc3", "locked": 1}}',
        b'{"reserved_ip": {"ip": "203.0.113.10", "droplet": null, "locked": false}}',
        b'{"reserved_ip": ' * 5000,
    ],
    ids=lambda body: body[:40].decode(errors="replace"),
)
async def test_malformed_reserved_ip_answers(body: bytes, caplog: pytest.LogCaptureFixture) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body)

    async with mock_client(handler) as client:
        with pytest.raises(MalformedResponse) as caught:
            await client.get_reserved_ip(IP)
    assert caught.value.status == 200
    assert_no_token(caught.value, caplog)


@pytest.mark.parametrize(
    "action",
    [
        {"id": 1, "type": "assign_ip"},
        {"id": 1, "status": 7, "type": "assign_ip"},
        {"id": 1, "status": "", "type": "assign_ip"},
        {"id": "1", "status": "completed", "type": "assign_ip"},
        {"status": "completed", "type": "assign_ip"},
    ],
)
async def test_malformed_actions(action: dict[str, Any]) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(201, json={"action": action})

    async with mock_client(handler) as client:
        with pytest.raises(MalformedResponse):
            await client.assign(IP, 1001)


async def test_an_unknown_action_status_is_kept_and_means_finished() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(201, json=action_body(1, "done"))

    async with mock_client(handler) as client:
        action = await client.assign(IP, 1001)
    assert action.status == "done" and action.done


async def test_huge_bodies_are_refused_without_reading_them_all() -> None:
    produced = 0

    async def endless() -> Any:
        nonlocal produced
        for _ in range(10_000):
            produced += 65536
            yield b" " * 65536

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/declared"):
            return httpx.Response(200, headers={"content-length": str(10**9)}, content=b"{}")
        return httpx.Response(200, content=endless())

    settings = msgspec.structs.replace(LOCAL, max_response_bytes=1_000_000)
    async with mock_client(handler, settings) as client:
        with pytest.raises(MalformedResponse, match="limit"):
            await client.get_reserved_ip(IP)
        with pytest.raises(MalformedResponse, match="limit"):
            await client._call(client._api, "GET", "/declared", "GET /declared")
    assert produced <= 2_000_000


async def test_transport_exceptions_become_network_errors(caplog: pytest.LogCaptureFixture) -> None:
    failures: list[Exception] = [
        httpx.ConnectError("connection refused"),
        httpx.ReadTimeout("read timed out"),
        httpx.RemoteProtocolError("peer closed connection"),
        httpx.ProxyError("proxy said no"),
        ConnectionResetError(104, "Connection reset by peer"),
    ]
    observed: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        raise failures.pop(0)

    async with mock_client(handler, on_response=lambda m, p, s: observed.append(s)) as client:
        for _ in range(5):
            with pytest.raises(NetworkError) as caught:
                await client.get_reserved_ip(IP)
            assert caught.value.status is None
            assert_no_token(caught.value, caplog)
    assert observed == ["network_error"] * 5


async def test_a_hanging_request_times_out_and_is_cancellable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cancelled_at: list[float] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        try:
            await trio.sleep_forever()
        finally:
            cancelled_at.append(trio.current_time())

    settings = msgspec.structs.replace(LOCAL, request_timeout=7.0)
    async with mock_client(handler, settings) as client:
        start = trio.current_time()
        with pytest.raises(NetworkError, match="within 7 s"):
            await client.get_reserved_ip(IP)
        assert trio.current_time() - start == pytest.approx(7.0)
        # An outer cancel scope wins at once, with no virtual time passing.
        with trio.move_on_after(2.0) as scope:
            await client.get_reserved_ip(IP)
        assert scope.cancelled_caught
        assert cancelled_at == [pytest.approx(start + 7.0), pytest.approx(start + 9.0)]


# --------------------------------------------------------------------------- real sockets


ServerScript = Callable[[trio.SocketStream], Awaitable[None]]


async def serve_once(
    nursery: trio.Nursery, script: ServerScript, tls: ssl.SSLContext | None = None
) -> int:
    """A one-connection-at-a-time scripted HTTP server on 127.0.0.1; returns its port."""

    async def handle(stream: trio.SocketStream) -> None:
        conn: trio.abc.Stream = stream
        if tls is not None:
            conn = trio.SSLStream(stream, tls, server_side=True)
            try:
                await conn.do_handshake()
            except trio.BrokenResourceError:
                return
        try:
            await _read_request_head(conn)
            await script(conn)  # type: ignore[arg-type]
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(conn)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def _read_request_head(stream: trio.abc.Stream) -> bytes:
    data = b""
    with trio.fail_after(10):
        while b"\r\n\r\n" not in data and len(data) < 65536:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            data += chunk
    return data


def local_settings(port: int, scheme: str = "http", **fields: Any) -> DigitalOceanSettings:
    base = f"{scheme}://127.0.0.1:{port}"
    return DigitalOceanSettings(api_url=base, metadata_url=base, **fields)


async def test_refused_connection_is_a_network_error(caplog: pytest.LogCaptureFixture) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    async with DigitalOceanClient(local_settings(port), TOKEN) as client:
        with pytest.raises(NetworkError) as caught:
            await client.get_reserved_ip(IP)
    assert_no_token(caught.value, caplog)


async def _close_at_once(stream: trio.SocketStream) -> None:
    return None


async def _garbage(stream: trio.SocketStream) -> None:
    await stream.send_all(b"SMTP READY\r\n\r\n")


async def _truncated(stream: trio.SocketStream) -> None:
    await stream.send_all(b'HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{"reserved_ip":')


async def _dribble(stream: trio.SocketStream) -> None:
    await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
    for _ in range(600):  # bounded: at most 60 s, the client gives up after 0.5 s
        await stream.send_all(b" ")
        await trio.sleep(0.1)


async def _huge_chunked(stream: trio.SocketStream) -> None:
    await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b" " * 65536
    for _ in range(200):  # 13 MB at most; the client stops at its 1 MB limit
        await stream.send_all(b"%x\r\n%s\r\n" % (len(chunk), chunk))


async def _headers_only_hang(stream: trio.SocketStream) -> None:
    await trio.sleep(60)


@pytest.mark.parametrize(
    ("script", "error_type"),
    [
        (_close_at_once, NetworkError),
        (_garbage, NetworkError),
        (_truncated, NetworkError),
        (_dribble, NetworkError),
        (_headers_only_hang, NetworkError),
        (_huge_chunked, MalformedResponse),
    ],
)
async def test_broken_servers_give_typed_errors(
    script: ServerScript, error_type: type[ProviderError], caplog: pytest.LogCaptureFixture
) -> None:
    async with trio.open_nursery() as nursery:
        port = await serve_once(nursery, script)
        settings = local_settings(port, request_timeout=0.5, max_response_bytes=1_000_000)
        async with DigitalOceanClient(settings, TOKEN) as client:
            with pytest.raises(error_type) as caught:
                await client.get_reserved_ip(IP)
        assert_no_token(caught.value, caplog)
        nursery.cancel_scope.cancel()


async def test_a_real_server_sees_the_bearer_token() -> None:
    heads: list[bytes] = []

    async def script(stream: trio.SocketStream) -> None:
        body = json.dumps(reserved_ip_body(1001)).encode()
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )

    async def handle(stream: trio.SocketStream) -> None:
        heads.append(await _read_request_head(stream))
        await script(stream)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        async with DigitalOceanClient(local_settings(port), TOKEN) as client:
            assert (await client.get_reserved_ip(IP)).droplet_id == 1001
        nursery.cancel_scope.cancel()
    assert f"authorization: Bearer {TOKEN_TEXT}".lower().encode() in heads[0].lower()


async def test_https_with_a_private_ca(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))

    async def script(stream: trio.SocketStream) -> None:
        body = json.dumps(reserved_ip_body(7)).encode()
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )

    async with trio.open_nursery() as nursery:
        port = await serve_once(nursery, script, tls=server_context)
        trusted = local_settings(port, "https", ca_file=str(ca_file))
        async with DigitalOceanClient(trusted, TOKEN) as client:
            assert (await client.get_reserved_ip(IP)).droplet_id == 7
        # Without the CA the certificate is not trusted: a network error, nothing sent.
        async with DigitalOceanClient(local_settings(port, "https"), TOKEN) as client:
            with pytest.raises(NetworkError) as caught:
                await client.get_reserved_ip(IP)
        assert_no_token(caught.value, caplog)
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- the emulator


def emulated(
    settings: DigitalOceanSettings | None = None, **emulator_settings: Any
) -> tuple[Emulator, DigitalOceanClient]:
    """An in-process emulator on the trio clock (droplets 1001, 1002; IP held by 1001)."""
    epoch = 1_800_000_000.0
    emulator = Emulator(
        TOKEN_TEXT,
        EmulatorSettings(**emulator_settings),
        clock=trio.current_time,
        wall_clock=lambda: epoch + trio.current_time(),
    )
    emulator.state.add_droplet(1001, "nyc3")
    emulator.state.add_droplet(1002, "nyc3")
    emulator.state.add_reserved_ip(IP, "nyc3", 1001)
    client = DigitalOceanClient(
        settings or LOCAL,
        TOKEN,
        transport=httpx.ASGITransport(app=build_app(emulator)),
        wall_clock=lambda: epoch + trio.current_time(),
    )
    return emulator, client


async def test_assign_flow_against_the_emulator(autojump_clock: trio.testing.MockClock) -> None:
    emulator, client = emulated(action_seconds=2.0)
    async with client:
        before = await client.get_reserved_ip(IP)
        assert (before.droplet_id, before.region, before.locked) == (1001, "nyc3", False)
        assert [r.ip for r in await client.list_reserved_ips()] == [IP]
        action = await client.assign(IP, 1002)
        assert action.status == "in-progress" and action.http_status == 201
        assert (await client.get_reserved_ip(IP)).locked
        with pytest.raises(Unprocessable):  # an action is in progress
            await client.assign(IP, 1002)
        await trio.sleep(2.5)
        assert (await client.get_ip_action(IP, action.id)).status == "completed"
        assert (await client.get_action(action.id)).status == "completed"
        after = await client.get_reserved_ip(IP)
        assert (after.droplet_id, after.locked) == (1002, False)
        with pytest.raises(Unprocessable):  # assigning to the holder
            await client.assign(IP, 1002)
        with pytest.raises(NotFound):
            await client.get_reserved_ip("203.0.113.99")
        with pytest.raises(NotFound):
            await client.assign(IP, 4242)
        unassign = await client.unassign(IP)
        await trio.sleep(2.5)
        assert (await client.get_ip_action(IP, unassign.id)).status == "completed"
        assert (await client.get_reserved_ip(IP)).droplet_id is None
    assert [entry.droplet_id for entry in emulator.state.history] == [1001, 1002, None]


async def test_metadata_and_legacy_paths_against_the_emulator(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = DigitalOceanSettings(
        api_url="http://127.0.0.1:1",
        metadata_url="http://127.0.0.1:1/metadata/droplets/1001",
        api_flavor="floating_ip",
    )
    _, client = emulated(settings)
    async with client:
        assert await client.metadata_droplet_id() == 1001
        assert await client.metadata_region() == "nyc3"
        assert await client.metadata_reserved_ip_active() is True
        assert (await client.get_reserved_ip(IP)).droplet_id == 1001
        assert [r.ip for r in await client.list_reserved_ips()] == [IP]


async def test_emulator_errors_are_typed(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    emulator, client = emulated(rate_limit_per_minute=3, action_404_seconds=5.0)
    async with client:
        action = await client.assign(IP, 1002)
        with pytest.raises(NotFound):  # the replica has not seen the new action yet
            await client.get_ip_action(IP, action.id)
        with pytest.raises(RateLimited) as caught:
            await client.get_reserved_ip(IP)
        assert caught.value.retry_after is not None and 0 < caught.value.retry_after <= 60
        assert caught.value.reset_at is not None
        assert_no_token(caught.value, caplog)
    bad_client = DigitalOceanClient(
        LOCAL, APIToken("not-the-token"), transport=httpx.ASGITransport(app=build_app(emulator))
    )
    async with bad_client:
        await trio.sleep(61)
        with pytest.raises(Unauthorized):
            await bad_client.get_reserved_ip(IP)
