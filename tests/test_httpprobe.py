"""Tests of the HTTP health probe (sidecar/httpprobe.py) against real servers on loopback.

Each test runs a raw socket server in a thread on 127.0.0.1 (or ::1) whose per-connection
behaviour the test writes out byte by byte: keep-alive, `Connection: close`, closing idle
connections without a word, oversized heads, endless bodies, garbage, TLS. The server
counts the connections it accepts and keeps every request head, so the tests check what
went over the wire, not what the client believes it did.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from sidecar.health import HTTP_BODY_LIMIT, HealthChecker, HealthSettings
from sidecar.httpprobe import HTTPProbe

pytestmark = pytest.mark.timeout(60)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nSet-Cookie: session=abc; Path=/\r\n\r\nok\n"


class Conn:
    """One accepted connection, as the test's handler sees it."""

    def __init__(self, sock: socket.socket, server: RawServer) -> None:
        self.sock = sock
        self.server = server
        self.buffer = b""
        self.client_closed = threading.Event()  # read_request saw EOF (or a reset)

    def read_request(self) -> bytes | None:
        """The next request head (GETs have no body); None at EOF or on a reset."""
        while b"\r\n\r\n" not in self.buffer:
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                self.client_closed.set()
                return None
            self.buffer += data
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        with self.server.lock:
            self.server.requests.append(head)
        return head

    def answer(self, response: bytes) -> bool:
        """Read one request and send `response` to it; False when none came (EOF)."""
        return self.read_request() is not None and self.send(response)

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
        except OSError:  # the client stopped reading and closed: expected in some tests
            return False
        return True

    def saw_eof(self, timeout: float = 5.0) -> bool:
        """Whether the client closed its end within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except TimeoutError:
            return False
        except OSError:
            return True


Handler = Callable[[Conn], None]


class RawServer:
    """A thread accepting connections on loopback; each is served by `handler` in a thread."""

    def __init__(
        self, handler: Handler, *, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.host = host
        self.handler = handler
        self.tls = tls
        self.accepted = 0
        self.requests: list[bytes] = []
        self.conns: list[Conn] = []
        self.lock = threading.Lock()
        self.tls_errors: list[str] = []
        self.alpn: list[str | None] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{host}:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.accepted += 1
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        if self.tls is not None:
            try:
                sock = self.tls.wrap_socket(sock, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                self.tls_errors.append(str(exc))
                sock.close()
                return
            self.alpn.append(sock.selected_alpn_protocol())
        conn = Conn(sock, self)
        with self.lock:
            self.conns.append(conn)
        try:
            self.handler(conn)
        finally:
            sock.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., RawServer]]:
    servers: list[RawServer] = []

    def start(handler: Handler, **kwargs: object) -> RawServer:
        server = RawServer(handler, **kwargs)  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def keep_alive(conn: Conn) -> None:
    while conn.read_request() is not None:
        conn.send(OK)


def settings(url: str) -> HealthSettings:
    return HealthSettings(http=url, check_interval=6.0, check_timeout=5.0)


async def checks(url: str, n: int) -> list[str]:
    async with HealthChecker(settings(url)) as checker:
        return [(await checker.check_once()).reason for _ in range(n)]


def headers_of(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}


# --- keep-alive and reconnecting ------------------------------------------------------------


async def test_keep_alive_reuses_one_connection(serve: Callable[..., RawServer]) -> None:
    server = serve(keep_alive)
    assert await checks(server.url + "/healthz", 5) == ["status 200"] * 5
    assert server.accepted == 1 and len(server.requests) == 5
    for head in server.requests:
        assert head.startswith(b"GET /healthz HTTP/1.1\r\n")
        headers = headers_of(head)
        assert headers["host"] == f"127.0.0.1:{server.port}"
        assert headers["user-agent"] == "fip-sidecar-health"
        # The service set a cookie on every answer; none is ever sent back.
        assert "cookie" not in headers and "authorization" not in headers


async def test_connection_close_reconnects_every_check(serve: Callable[..., RawServer]) -> None:
    def close_after_each(conn: Conn) -> None:
        conn.answer(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\nok\n")

    server = serve(close_after_each)
    assert await checks(server.url + "/", 4) == ["status 200"] * 4
    assert server.accepted == 4


async def test_http10_body_until_eof_then_reconnect(serve: Callable[..., RawServer]) -> None:
    def http10(conn: Conn) -> None:
        conn.answer(b"HTTP/1.0 204 No Content\r\n\r\n")

    server = serve(http10)
    assert await checks(server.url + "/", 3) == ["status 204"] * 3
    assert server.accepted == 3


async def test_idle_connection_closed_between_checks_is_no_failure(
    serve: Callable[..., RawServer],
) -> None:
    """The server keeps nothing idle: it answers as if keep-alive, then hangs up."""

    def hang_up_after_answer(conn: Conn) -> None:
        conn.answer(OK)

    server = serve(hang_up_after_answer)
    async with HealthChecker(settings(server.url + "/")) as checker:
        for _ in range(4):
            assert (await checker.check_once()).reason == "status 200"
            await trio.sleep(0.05)  # the FIN arrives between checks, as with an idle timeout
    assert server.accepted == 4


async def test_stale_connection_closed_as_the_request_arrives_is_retried_once(
    serve: Callable[..., RawServer],
) -> None:
    """The race the pre-check cannot see: the server reads the request on a kept
    connection and closes it without answering (its idle timeout fired just then)."""

    def answer_only_the_first(conn: Conn) -> None:
        conn.answer(OK)
        conn.read_request()  # the next request on this connection is never answered

    server = serve(answer_only_the_first)
    assert await checks(server.url + "/", 4) == ["status 200"] * 4
    # Checks 2-4 each found their connection stale and retried on a new one.
    assert server.accepted == 4 and len(server.requests) == 7


async def test_reset_on_a_kept_connection_is_retried(serve: Callable[..., RawServer]) -> None:
    def reset_the_second(conn: Conn) -> None:
        conn.answer(OK)
        if conn.read_request() is not None:  # abortive close: the client sees ECONNRESET
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    server = serve(reset_the_second)
    assert await checks(server.url + "/", 3) == ["status 200"] * 3
    assert server.accepted == 3


async def test_fresh_connection_closed_without_answer_fails_without_retry(
    serve: Callable[..., RawServer],
) -> None:
    def never_answer(conn: Conn) -> None:
        conn.read_request()

    server = serve(never_answer)
    assert await checks(server.url + "/", 2) == ["connection closed without a response"] * 2
    assert server.accepted == 2  # one connection per check: no retry of a fresh one


async def test_unsolicited_408_before_close_is_not_read_as_the_answer(
    serve: Callable[..., RawServer],
) -> None:
    """Some servers send "408 Request Timeout" on an idle kept connection, then close."""

    def timeout_idle(conn: Conn) -> None:
        if conn.answer(OK):
            time.sleep(0.02)
            conn.send(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n\r\n")

    server = serve(timeout_idle)
    async with HealthChecker(settings(server.url + "/")) as checker:
        for _ in range(3):
            assert (await checker.check_once()).reason == "status 200"
            await trio.sleep(0.1)
    assert server.accepted == 3


async def test_unasked_bytes_after_a_response_end_the_connection(
    serve: Callable[..., RawServer],
) -> None:
    """Bytes after a complete response answer no request: the next check must not take
    them for its answer (here a stray 503 in the same write as the first 200)."""

    def stray_answer(conn: Conn) -> None:
        first = conn is conn.server.conns[0]
        if first and conn.read_request() is not None:
            conn.send(OK + b"HTTP/1.1 503 Stray\r\nContent-Length: 0\r\n\r\n")
        keep_alive(conn)

    server = serve(stray_answer)
    assert await checks(server.url + "/", 3) == ["status 200"] * 3
    assert server.accepted == 2


# --- limits and bad answers -----------------------------------------------------------------


async def test_oversized_head_fails_fast_with_a_reason(serve: Callable[..., RawServer]) -> None:
    def huge_header(conn: Conn) -> None:
        conn.answer(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (1024 * 1024) + b"\r\n\r\n")

    server = serve(huge_header)
    async with HealthChecker(settings(server.url + "/")) as checker:
        started = trio.current_time()
        result = await checker.check_once()
        assert trio.current_time() - started < 4.0  # not the 5 s timeout
    assert not result.ok
    assert result.reason == "bad response: head over 16384 bytes"


async def test_body_over_the_limit_is_not_read_and_not_reused(
    serve: Callable[..., RawServer],
) -> None:
    big = 4 * 1024 * 1024

    def endless(conn: Conn) -> None:
        while conn.read_request() is not None:
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {big}\r\n\r\n".encode()
            if not conn.send(head + b"x" * big):
                return

    server = serve(endless)
    assert big > 4 * HTTP_BODY_LIMIT
    assert await checks(server.url + "/", 2) == ["status 200"] * 2
    assert server.accepted == 2


async def test_body_within_the_limit_keeps_the_connection(
    serve: Callable[..., RawServer],
) -> None:
    def sized(conn: Conn) -> None:
        body = b"y" * HTTP_BODY_LIMIT
        while conn.read_request() is not None:
            conn.send(f"HTTP/1.1 503 Busy\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)

    server = serve(sized)
    assert await checks(server.url + "/", 3) == ["status 503"] * 3
    assert server.accepted == 1


@pytest.mark.parametrize(
    "answer",
    [b"garbage\r\n\r\n", b"HTTP/1.1 abc OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n"],
)
async def test_malformed_response_is_a_bad_response(
    serve: Callable[..., RawServer], answer: bytes
) -> None:
    def malformed(conn: Conn) -> None:
        if conn.answer(answer):
            conn.saw_eof()

    server = serve(malformed)
    [reason] = await checks(server.url + "/", 1)
    assert reason.startswith("bad response: "), reason


async def test_informational_response_is_skipped(serve: Callable[..., RawServer]) -> None:
    def early_hints(conn: Conn) -> None:
        while conn.read_request() is not None:
            conn.send(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" + OK)

    server = serve(early_hints)
    assert await checks(server.url + "/", 2) == ["status 200"] * 2
    assert server.accepted == 1


# --- addressing, closing, reloads -----------------------------------------------------------


def test_host_header_and_target() -> None:
    cases = {
        "http://127.0.0.1/": ("127.0.0.1", 80, "127.0.0.1"),
        "http://Example.COM:80/x": ("example.com", 80, "example.com"),
        "https://example.com:8443/x": ("example.com", 8443, "example.com:8443"),
        "https://[::1]/": ("::1", 443, "[::1]"),
        "http://[::1]:8080/": ("::1", 8080, "[::1]:8080"),
    }
    for url, expected in cases.items():
        probe = HTTPProbe(url, body_limit=1)
        assert (probe.host, probe.port, probe.host_header) == expected, url


def ipv6_loopback_works() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback_works(), reason="no IPv6 loopback on this machine")
async def test_ipv6_literal(serve: Callable[..., RawServer]) -> None:
    server = serve(keep_alive, host="::1")
    assert await checks(server.url + "/v6?x=1", 2) == ["status 200"] * 2
    assert server.accepted == 1
    assert server.requests[0].startswith(b"GET /v6?x=1 HTTP/1.1\r\n")
    assert headers_of(server.requests[0])["host"] == f"[::1]:{server.port}"


async def test_aclose_closes_the_connection(serve: Callable[..., RawServer]) -> None:
    server = serve(keep_alive)
    checker = HealthChecker(settings(server.url + "/"))
    assert (await checker.check_once()).ok
    await checker.aclose()
    assert await trio.to_thread.run_sync(server.conns[0].client_closed.wait, 5.0)


async def test_reload_to_another_url_never_reuses_the_old_connection(
    serve: Callable[..., RawServer],
) -> None:
    old, new = serve(keep_alive), serve(keep_alive)
    async with HealthChecker(settings(old.url + "/old")) as checker:
        assert (await checker.check_once()).ok
        checker.reconfigure(settings(new.url + "/new"))
        assert (await checker.check_once()).ok
        assert await trio.to_thread.run_sync(old.conns[0].client_closed.wait, 5.0)
        # Same host and port, another path: a new URL is a new probe too.
        checker.reconfigure(settings(new.url + "/other"))
        assert (await checker.check_once()).ok
    assert [len(old.requests), len(new.requests)] == [1, 2]
    assert new.requests[0].startswith(b"GET /new ") and new.requests[1].startswith(b"GET /other ")


# --- TLS ------------------------------------------------------------------------------------


def tls_material(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext] | None:
    """(server context with a self-signed cert for 127.0.0.1, client context trusting it)."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.set_alpn_protocols(["http/1.1"])
    client = ssl.create_default_context()
    try:
        import trustme
    except ImportError:
        openssl = shutil.which("openssl")
        if openssl is None:
            return None
        cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
        request = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        subject = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
        files = ["-keyout", str(key), "-out", str(cert)]
        subprocess.run([openssl, *request, *subject, *files], check=True, capture_output=True)
        server.load_cert_chain(cert, key)
        client.load_verify_locations(cert)
        return server, client
    ca = trustme.CA()
    ca.issue_cert("127.0.0.1").configure_cert(server)
    ca.configure_trust(client)
    return server, client


async def test_https_self_signed_fails_verification(
    serve: Callable[..., RawServer], tmp_path: Path
) -> None:
    material = tls_material(tmp_path)
    if material is None:
        pytest.skip("neither trustme nor openssl is available")
    server_ctx, _ = material
    server = serve(keep_alive, tls=server_ctx)
    [reason] = await checks(server.url + "/", 1)
    assert "certificate verify failed" in reason, reason
    assert server.requests == []


async def test_https_with_trusted_cert_keeps_alive_and_offers_http11(
    serve: Callable[..., RawServer], tmp_path: Path
) -> None:
    material = tls_material(tmp_path)
    if material is None:
        pytest.skip("neither trustme nor openssl is available")
    server_ctx, client_ctx = material
    server = serve(keep_alive, tls=server_ctx)
    probe = HTTPProbe(server.url + "/tls", body_limit=HTTP_BODY_LIMIT, ssl_context=client_ctx)
    try:
        assert [await probe.get() for _ in range(3)] == [200] * 3
    finally:
        await probe.aclose()
    assert server.accepted == 1 and server.alpn == ["http/1.1"]
    assert headers_of(server.requests[0])["host"] == f"127.0.0.1:{server.port}"


async def test_http_check_builds_no_tls_context(
    serve: Callable[..., RawServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An http check must not load the CA bundle (~1.2 MiB of RSS per node)."""

    def refuse(*args: object, **kwargs: object) -> ssl.SSLContext:
        raise AssertionError("an http check built a TLS context")

    monkeypatch.setattr(ssl, "create_default_context", refuse)
    monkeypatch.setattr(ssl, "SSLContext", refuse)
    server = serve(keep_alive)
    assert await checks(server.url + "/", 2) == ["status 200"] * 2
