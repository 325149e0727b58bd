"""Tests of the health checker against real local servers and real processes.

HTTP checks talk to a threaded `http.server` on 127.0.0.1 that the test controls; TCP
checks to sockets the test opens; command checks run real programs. Tests that drive
`run()` on a schedule use trio's MockClock with TCP probes of in-process listeners, so
only virtual time passes; the rest use `check_once()` and never assert on wall speed.
"""

from __future__ import annotations

import http.server
import os
import random
import signal
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import hypothesis.strategies as st
import msgspec
import pytest
import trio
import trio.testing
from hypothesis import given

from sidecar.health import (
    HealthChecker,
    HealthSettings,
    Hysteresis,
    describe_failure,
)
from sidecar.httpprobe import ProbeError
from sidecar.processes import sanitized_environment

pytestmark = pytest.mark.timeout(60)


# --- a controllable HTTP server -------------------------------------------------------------


class ServiceState:
    """What the fake service answers; changed by the test between checks."""

    def __init__(self) -> None:
        self.status = 200
        self.alternate = False  # flip between 200 and 503 on every request
        self.hang = threading.Event()  # while set, /healthz stalls (bounded) before answering
        self.release = threading.Event()
        self.hits: dict[str, int] = {}
        self.connections = 0  # accepted
        self.request_headers: list[dict[str, str]] = []
        self.lock = threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    server: ServiceServer

    def do_GET(self) -> None:
        state = self.server.state
        with state.lock:
            state.hits[self.path] = state.hits.get(self.path, 0) + 1
            state.request_headers.append({k.lower(): v for k, v in self.headers.items()})
            status = state.status
            if state.alternate:
                state.status = 503 if status == 200 else 200
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/bad")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path == "/bad":
            status = 503
        if state.hang.is_set():
            state.release.wait(timeout=20)
        body = b"ok\n" if status < 400 else b"not ok\n"
        self.send_response(status)
        self.send_header("Set-Cookie", "session=secret-ish; Path=/")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class ServiceServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    state: ServiceState

    def verify_request(self, request: object, client_address: object) -> bool:
        with self.state.lock:
            self.state.connections += 1
        return True


@pytest.fixture
def service() -> Iterator[tuple[str, ServiceState]]:
    server = ServiceServer(("127.0.0.1", 0), Handler)
    server.state = ServiceState()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.state
    finally:
        server.state.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def free_port() -> int:
    """A loopback port nothing listens on (bound then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_settings(url: str, **overrides: object) -> HealthSettings:
    # Generous timeout: these tests count results, they do not race the machine.
    fields: dict[str, object] = {"http": url, "check_interval": 6.0, "check_timeout": 5.0}
    fields.update(overrides)
    return HealthSettings(**fields)  # type: ignore[arg-type]


# --- settings -------------------------------------------------------------------------------


def test_defaults() -> None:
    s = HealthSettings()
    assert (s.check_interval, s.check_timeout, s.rise, s.fall) == (1.0, 0.8, 2, 3)
    assert s.http_expect_status == (200, 399)
    assert s.start_healthy is False
    assert s.kind == "none" and s.target is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"http": "http://127.0.0.1/", "tcp": "127.0.0.1:80"}, "set only one of"),
        ({"check_timeout": 1.0}, "health.check_timeout must be < health.check_interval"),
        ({"check_interval": 0.0}, "health.check_interval must be > 0"),
        ({"check_timeout": -1.0}, "health.check_timeout must be > 0"),
        ({"rise": 0}, "health.rise must be >= 1"),
        ({"fall": 0}, "health.fall must be >= 1"),
        ({"tcp": "127.0.0.1"}, "health.tcp must be"),
        ({"tcp": "127.0.0.1:70000"}, "health.tcp must be"),
        ({"http": "ftp://127.0.0.1/"}, "health.http must be an http"),
        ({"http": "http://u:p@127.0.0.1/"}, "must not contain credentials"),
        ({"http_expect_status": [399, 200]}, "health.http_expect_status"),
        ({"command": []}, "health.command must be a non-empty argv list"),
    ],
)
def test_invalid_settings_name_the_field(fields: dict[str, object], message: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=message):
        msgspec.convert(fields, HealthSettings)


def test_settings_decode_from_config_shapes() -> None:
    s = msgspec.convert(
        {"command": ["pg_isready", "-q"], "rise": 1, "http_expect_status": [200, 299]},
        HealthSettings,
    )
    assert s.kind == "command" and s.target == "pg_isready -q"
    assert s.http_expect_status == (200, 299)
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.convert({"intervall": 1.0}, HealthSettings)
    assert HealthSettings(tcp="[::1]:8080").kind == "tcp"


# --- hysteresis (pure) ----------------------------------------------------------------------


def test_hysteresis_counts_exactly() -> None:
    h = Hysteresis(rise=2, fall=3, healthy=False)
    assert [h.record(True), h.record(True)] == [False, True]
    assert h.healthy
    assert [h.record(False), h.record(False), h.record(False)] == [False, False, True]
    assert not h.healthy and h.transitions == 2


@pytest.mark.parametrize("start_healthy", [True, False])
def test_alternating_results_never_transition(start_healthy: bool) -> None:
    h = Hysteresis(rise=2, fall=2, healthy=start_healthy)
    for i in range(200):
        assert not h.record(i % 2 == 0)
    assert h.healthy is start_healthy and h.transitions == 0


@given(
    rise=st.integers(1, 5),
    fall=st.integers(1, 5),
    start=st.booleans(),
    results=st.lists(st.booleans(), max_size=60),
)
def test_hysteresis_transitions_only_after_a_full_run(
    rise: int, fall: int, start: bool, results: list[bool]
) -> None:
    """Every transition ends a run of `rise` passes (or `fall` failures) in a row."""
    h = Hysteresis(rise=rise, fall=fall, healthy=start)
    for i, ok in enumerate(results):
        before = h.healthy
        changed = h.record(ok)
        assert changed == (h.healthy != before)
        if changed:
            needed = rise if ok else fall
            run = results[max(0, i - needed + 1) : i + 1]
            assert len(run) == needed and all(r == ok for r in run)
            assert h.healthy is ok


# --- HTTP -----------------------------------------------------------------------------------


async def test_http_503_makes_unhealthy_only_after_fall_then_recovers_after_rise(
    service: tuple[str, ServiceState],
) -> None:
    url, state = service
    async with HealthChecker(http_settings(url + "/healthz", rise=2, fall=3)) as checker:
        assert not checker.healthy  # start_healthy defaults to false
        assert (await checker.check_once()).reason == "status 200"
        assert not checker.healthy  # one pass is not enough
        await checker.check_once()
        assert checker.healthy

        state.status = 503
        for _ in range(2):
            result = await checker.check_once()
            assert (result.ok, result.reason) == (False, "status 503")
            assert checker.healthy
        await checker.check_once()
        assert not checker.healthy
        snapshot = checker.state
        assert snapshot.consecutive_failures == 3 and snapshot.transitions == 2
        assert snapshot.last_reason == "status 503" and snapshot.last_ok is False

        state.status = 204
        await checker.check_once()
        assert not checker.healthy
        await checker.check_once()
        assert checker.healthy
        assert checker.state.transitions == 3
        assert checker.state.checks_total == 7 and checker.state.failures_total == 3
        assert state.hits["/healthz"] == 7


async def test_http_flapping_service_never_transitions(
    service: tuple[str, ServiceState],
) -> None:
    url, state = service
    state.alternate = True
    for start_healthy in (True, False):
        settings = http_settings(url + "/healthz", rise=2, fall=2, start_healthy=start_healthy)
        async with HealthChecker(settings) as checker:
            reasons = [(await checker.check_once()).reason for _ in range(12)]
            assert set(reasons) == {"status 200", "status 503"}
            assert checker.healthy is start_healthy and checker.state.transitions == 0


async def test_http_timeout_counts_as_failure(service: tuple[str, ServiceState]) -> None:
    url, state = service
    state.hang.set()
    settings = http_settings(url + "/healthz", check_interval=1.0, check_timeout=0.3)
    async with HealthChecker(settings) as checker:
        started = trio.current_time()
        result = await checker.check_once()
        assert (result.ok, result.reason) == (False, "timeout")
        assert trio.current_time() - started >= 0.3
        assert checker.state.consecutive_failures == 1


async def test_http_connection_refused() -> None:
    async with HealthChecker(http_settings(f"http://127.0.0.1:{free_port()}/")) as checker:
        result = await checker.check_once()
    assert (result.ok, result.reason) == (False, "connection refused")


async def test_http_redirect_is_not_followed(service: tuple[str, ServiceState]) -> None:
    url, state = service
    strict = http_settings(url + "/redirect", http_expect_status=(200, 299))
    async with HealthChecker(strict) as checker:
        result = await checker.check_once()
    assert (result.ok, result.reason) == (False, "status 302")
    # With the default range a 3xx is a pass, like haproxy's; still not followed.
    async with HealthChecker(http_settings(url + "/redirect")) as checker:
        result = await checker.check_once()
    assert (result.ok, result.reason) == (True, "status 302")
    assert state.hits.get("/bad", 0) == 0


async def test_http_sends_no_cookies_or_credentials_and_ignores_proxy_env(
    service: tuple[str, ServiceState], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, state = service
    # A proxy from the environment must not be used for a local check (it would refuse).
    proxy = f"http://127.0.0.1:{free_port()}"
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    async with HealthChecker(http_settings(url + "/healthz")) as checker:
        for _ in range(3):
            result = await checker.check_once()
            assert (result.ok, result.reason) == (True, "status 200")
    assert len(state.request_headers) == 3
    for headers in state.request_headers:
        assert "cookie" not in headers and "authorization" not in headers


async def test_http_server_closing_after_each_answer_costs_a_connection_per_check(
    service: tuple[str, ServiceState],
) -> None:
    """`http.server` answers HTTP/1.0-style and closes: every check reconnects, none fails."""
    url, state = service
    async with HealthChecker(http_settings(url + "/healthz?probe=1")) as checker:
        reasons = [(await checker.check_once()).reason for _ in range(4)]
    assert reasons == ["status 200"] * 4
    assert state.connections == 4 and state.hits == {"/healthz?probe=1": 4}
    host = url.removeprefix("http://")
    for headers in state.request_headers:
        assert headers["host"] == host and headers["user-agent"] == "fip-sidecar-health"


# --- TCP ------------------------------------------------------------------------------------


async def test_tcp_open_and_closed_port() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        settings = HealthSettings(tcp=f"127.0.0.1:{port}", check_interval=6.0, check_timeout=5.0)
        async with HealthChecker(settings) as checker:
            result = await checker.check_once()
            assert (result.ok, result.reason) == (True, "connected")
    settings = HealthSettings(tcp=f"127.0.0.1:{free_port()}", check_interval=6, check_timeout=5)
    async with HealthChecker(settings) as checker:
        result = await checker.check_once()
    assert (result.ok, result.reason) == (False, "connection refused")


async def serve_accept_and_close(listeners: list[trio.SocketListener]) -> None:
    async def close(stream: trio.SocketStream) -> None:
        await stream.aclose()

    await trio.serve_listeners(close, listeners)


async def test_run_calls_on_change_only_after_hysteresis_in_virtual_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """run() on its schedule: 2 passes to rise, 3 failures to fall, one callback each."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    settings = HealthSettings(tcp=f"127.0.0.1:{port}", check_interval=1.0, check_timeout=0.5)
    checker = HealthChecker(settings, rng=random.Random(1))
    calls: list[tuple[bool, int]] = []
    changed = trio.Event()

    def on_change(healthy: bool) -> None:
        calls.append((healthy, checker.state.checks_total))
        changed.set()

    async with trio.open_nursery() as nursery:
        server_scope = trio.CancelScope()

        async def serve() -> None:
            with server_scope:
                await serve_accept_and_close(listeners)

        nursery.start_soon(serve)
        nursery.start_soon(checker.run, on_change)
        with trio.fail_after(30):
            await changed.wait()
        assert calls == [(True, 2)]

        # The service goes away: its port now refuses connections.
        server_scope.cancel()
        for listener in listeners:
            await listener.aclose()
        changed = trio.Event()
        went_down = trio.current_time()
        with trio.fail_after(30):
            await changed.wait()
        assert calls == [(True, 2), (False, 5)]
        assert checker.state.last_reason == "connection refused"
        # Three checks, one interval apart, the first within one interval of the outage.
        assert 2.0 <= trio.current_time() - went_down <= 3.0 + 1e-9
        await trio.sleep(9.5)  # nine more failures: no more callbacks
        assert len(calls) == 2 and checker.state.consecutive_failures == 12
        nursery.cancel_scope.cancel()


async def test_nothing_to_check_is_always_healthy(autojump_clock: trio.testing.MockClock) -> None:
    checker = HealthChecker(HealthSettings())
    calls: list[bool] = []
    with trio.move_on_after(100):
        await checker.run(calls.append)
    assert checker.healthy and calls == []
    assert checker.state.kind == "none" and checker.state.checks_total == 0


# --- command --------------------------------------------------------------------------------


def command_settings(*argv: str, **overrides: object) -> HealthSettings:
    fields: dict[str, object] = {"command": argv, "check_interval": 11.0, "check_timeout": 10.0}
    fields.update(overrides)
    return HealthSettings(**fields)  # type: ignore[arg-type]


async def test_command_exit_codes() -> None:
    async with HealthChecker(command_settings("true")) as checker:
        assert (await checker.check_once()).reason == "exit 0"
    script = "echo 'database   is\n down' >&2; exit 1"
    async with HealthChecker(command_settings("sh", "-c", script)) as checker:
        result = await checker.check_once()
    assert (result.ok, result.reason) == (False, "exit 1: database is down")


async def test_command_output_is_truncated_in_the_reason() -> None:
    settings = command_settings("sh", "-c", "head -c 100000 /dev/zero | tr '\\0' x; exit 3")
    async with HealthChecker(settings) as checker:
        result = await checker.check_once()
    assert result.reason.startswith("exit 3: xxx") and len(result.reason) <= 120


async def test_missing_command_is_a_failed_check_not_an_error() -> None:
    async with HealthChecker(command_settings("/nonexistent/check")) as checker:
        result = await checker.check_once()
    assert (result.ok, result.reason) == (False, "no such file or directory")


def process_is_gone(pid: int) -> bool:
    """True when `pid` no longer runs (absent, or a zombie awaiting its reaper)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def kill_if_running(pid: int) -> None:
    if not process_is_gone(pid):
        os.kill(pid, signal.SIGKILL)


async def test_hanging_command_and_its_children_are_killed_at_timeout(tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"
    script = f'sleep 300 & echo "$$ $!" > {pids_file}.tmp; mv {pids_file}.tmp {pids_file}; wait'
    settings = command_settings("sh", "-c", script, check_interval=2.0, check_timeout=1.0)
    try:
        async with HealthChecker(settings) as checker:
            started = trio.current_time()
            result = await checker.check_once()
            assert trio.current_time() - started >= 1.0
        assert (result.ok, result.reason) == (False, "timeout")
        # The script may be killed before it wrote its pids on a very slow machine.
        if pids_file.exists():
            pids = [int(p) for p in pids_file.read_text().split()]
            for _ in range(100):  # bounded: SIGKILL is delivered almost at once
                if all(process_is_gone(pid) for pid in pids):
                    break
                await trio.sleep(0.05)
            assert all(process_is_gone(pid) for pid in pids)
    finally:
        if pids_file.exists():
            for pid in pids_file.read_text().split():
                kill_if_running(int(pid))


async def test_hanging_command_times_out_at_exactly_check_timeout_virtual(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = command_settings("sleep", "1000", check_interval=1.0, check_timeout=0.8)
    async with HealthChecker(settings) as checker:
        started = trio.current_time()
        result = await checker.check_once()
        assert (result.ok, result.reason) == (False, "timeout")
        assert trio.current_time() - started == pytest.approx(0.8)
        assert checker.state.last_check_duration == pytest.approx(0.8)


def test_commands_do_not_inherit_secrets() -> None:
    env = sanitized_environment(
        {
            "PATH": "/usr/bin",
            "DIGITALOCEAN_TOKEN": "dop_v1_x",
            "FIP_SIDECAR_CLUSTER_KEY": "k",
            "aws_secret_access_key": "s",
            "GITHUB_TOKEN_FOR_CI": "t",
            "DB_PASSWORD": "p",
            "LANG": "C.UTF-8",
        }
    )
    assert env == {"PATH": "/usr/bin", "LANG": "C.UTF-8"}


def test_describe_failure_finds_the_buried_cause() -> None:
    inner = ConnectionRefusedError(111, "Connection refused")
    group = ExceptionGroup("all attempts failed", [inner])
    outer = OSError("all attempts to connect failed")
    outer.__cause__ = group
    assert describe_failure(RuntimeError(outer)) == "connection refused"
    assert describe_failure(ValueError("x" * 500)).endswith("...")


def test_describe_failure_names_tls_and_bad_responses() -> None:
    verify = ssl.SSLCertVerificationError(
        1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate"
    )
    broken = trio.BrokenResourceError()
    broken.__cause__ = verify
    reason = describe_failure(ExceptionGroup("nursery", [ExceptionGroup("inner", [broken])]))
    assert "certificate verify failed" in reason
    bad = ProbeError("bad response: " + "x" * 500)
    bad.__cause__ = ValueError("h11's own words")
    reason = describe_failure(bad)
    assert reason.startswith("bad response: x") and len(reason) == 120
