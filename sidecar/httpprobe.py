"""A minimal HTTP/1.1 GET client for health checks: h11 over one kept-alive Trio stream.

Why not httpx: a node checks its service once a second for its whole life, and through
httpx + httpcore (request and response models, the connection pool, anyio, cookie and
header machinery) one check cost ~0.7 ms of CPU on Trio's thread, a third of an idle
node's cost (issue 13). A health check needs none of that: one GET of one URL, the status
code, and the connection kept for the next check. h11 is the sans-IO state machine httpx
uses underneath (and `httpserver.py` serves with), so what is left here is sockets,
keep-alive and limits.

What it sends: `GET <path?query>` with `Host`, `User-Agent: fip-sidecar-health` and
`Accept: */*`, nothing else: no cookies (nothing the service sets is kept), no
credentials, no proxy (the environment is never read), and redirects are never followed
(a 3xx is just a status). Timeouts are the caller's: it runs `get()` in a cancel scope.

What a misbehaving service can cost: a response head over `MAX_HEAD_BYTES` fails the check
(h11 stops buffering) instead of growing memory; at most `body_limit` bytes of a body are
read, then the connection is closed rather than drained.
"""

from __future__ import annotations

import select
import ssl
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import h11
import trio

#: A response's status line and headers together may not exceed this (bytes).
MAX_HEAD_BYTES = 16 * 1024
#: What one receive reads at most; a health answer usually fits in one.
_READ_SIZE = 16 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}
#: Characters left as they are in a request target; anything else (a space, non-ASCII
#: text) is percent-encoded, as a browser would, because h11 refuses it raw.
_TARGET_SAFE = "/?:@!$&'()*+,;=%~[]"


class ProbeError(Exception):
    """The service's answer could not be used; `str()` is the reason for a failed check."""


class _Stale(Exception):
    """A reused connection was closed by the server before any byte of the response."""


@dataclass(slots=True)
class _Connection:
    tcp: trio.SocketStream
    stream: trio.abc.Stream  # `tcp`, or a TLS stream over it
    h11: h11.Connection


class HTTPProbe:
    """GETs one URL, again and again, over one connection kept alive between calls.

    `get()` returns the status code of one exchange or raises (OSError and
    `trio.BrokenResourceError` for network failures, `ProbeError` for an unusable
    answer). An https URL is verified against the system's CAs, with SNI and ALPN
    "http/1.1"; `ssl_context` replaces that context (tests trust their own CA; ALPN is
    set on it too). An http URL builds no TLS context at all, so it never loads the CA
    bundle (~1.2 MiB of RSS, measured).
    """

    def __init__(
        self, url: str, *, body_limit: int, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise ValueError(f"not an http(s) URL with a host: {url!r}")
        self.url = url
        self.host = parts.hostname  # lower-case, IPv6 without brackets
        default_port = _DEFAULT_PORTS[parts.scheme]
        self.port = parts.port or default_port
        bracketed = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = bracketed if self.port == default_port else f"{bracketed}:{self.port}"
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._request = h11.Request(
            method="GET",
            target=quote(target, safe=_TARGET_SAFE),
            headers=[
                ("Host", self.host_header),
                ("User-Agent", "fip-sidecar-health"),
                ("Accept", "*/*"),
            ],
        )
        self._body_limit = body_limit
        self._tls: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self._tls = ssl_context or ssl.create_default_context()
            self._tls.set_alpn_protocols(["http/1.1"])
        self._conn: _Connection | None = None

    async def get(self) -> int:
        """One GET; the status code of its final response."""
        conn = self._conn
        if conn is not None and _readable(conn.tcp):
            # Between two checks the server may only close the connection (EOF) or, as
            # some do on an idle timeout, send an unsolicited "408" and close: either way
            # it is unusable, and a 408 read as our answer would be a false failure.
            await self._drop()
            conn = None
        try:
            if conn is not None:
                try:
                    return await self._exchange(conn, reused=True)
                except _Stale:
                    # The server closed the kept connection while our request was on its
                    # way (its idle timeout raced our interval). Nothing of a response
                    # came back, so the GET was not answered: retry once on a fresh
                    # connection rather than report a failure of a healthy service.
                    await self._drop()
            conn = self._conn = await self._connect()
            return await self._exchange(conn, reused=False)
        except BaseException:  # including Cancelled: the connection's state is unknown
            await self._drop()
            raise

    async def aclose(self) -> None:
        """Close the kept connection, if any; a later `get()` opens a new one."""
        await self._drop()

    async def _connect(self) -> _Connection:
        tcp = await trio.open_tcp_stream(self.host, self.port)
        stream: trio.abc.Stream = tcp
        if self._tls is not None:
            # https_compatible: servers commonly close without a TLS close_notify.
            tls = trio.SSLStream(tcp, self._tls, server_hostname=self.host, https_compatible=True)
            try:
                await tls.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(tcp)
                raise
            stream = tls
        machine = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        return _Connection(tcp, stream, machine)

    async def _exchange(self, conn: _Connection, *, reused: bool) -> int:
        """Send the request and read the response; keep `conn` for the next call only when
        both sides allow it. Raises `_Stale` when a `reused` connection turns out closed
        before the first byte of a response."""
        machine = conn.h11
        data = (machine.send(self._request) or b"") + (machine.send(h11.EndOfMessage()) or b"")
        try:
            await conn.stream.send_all(data)
        except trio.BrokenResourceError:
            if reused:
                raise _Stale from None
            raise
        status: int | None = None
        received = 0  # bytes from the network, to tell a stale connection from a bad answer
        eof = False
        body = 0
        while True:
            try:
                event = machine.next_event()
            except h11.RemoteProtocolError as exc:
                if eof:  # h11's words for this are about its own states
                    what = "before a complete response" if received else "without a response"
                    raise ProbeError(f"connection closed {what}") from exc
                if exc.error_status_hint == 431:  # h11 says "Receive buffer too long"
                    raise ProbeError(f"bad response: head over {MAX_HEAD_BYTES} bytes") from exc
                raise ProbeError(f"bad response: {exc}") from exc
            if event is h11.NEED_DATA:
                try:
                    chunk = await conn.stream.receive_some(_READ_SIZE)
                except trio.BrokenResourceError:  # e.g. ECONNRESET
                    if reused and not received:
                        raise _Stale from None
                    raise
                if reused and not received and not chunk:
                    raise _Stale
                received += len(chunk)
                eof = not chunk
                machine.receive_data(bytes(chunk))  # no copy: it is bytes already
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += len(event.data)
                if body > self._body_limit:  # the status is all that counts: stop here
                    assert status is not None
                    await self._drop()
                    return status
            elif isinstance(event, h11.EndOfMessage):
                assert status is not None
                reusable = machine.our_state is h11.DONE and machine.their_state is h11.DONE
                if reusable and not machine.trailing_data[0]:
                    machine.start_next_cycle()
                else:  # "Connection: close", HTTP/1.0, a body that ended with EOF, or bytes
                    # after the response that no request asked for
                    await self._drop()
                return status
            elif not isinstance(event, h11.InformationalResponse):  # a 1xx: read on
                # Nothing else can come before EndOfMessage (h11 refuses a 101 we did not
                # ask for); should it, fail rather than loop without awaiting anything.
                raise ProbeError(f"bad response: unexpected {event!r}")

    async def _drop(self) -> None:
        if self._conn is not None:
            stream, self._conn = self._conn.stream, None
            with trio.CancelScope(shield=True):  # also runs while the check is cancelled
                await trio.aclose_forcefully(stream)


def _readable(tcp: trio.SocketStream) -> bool:
    """Whether the socket has anything to read (data or EOF) without waiting. (`poll`,
    not `select`: a descriptor numbered past FD_SETSIZE must not break the check.)"""
    poller = select.poll()
    poller.register(tcp.socket.fileno(), select.POLLIN)
    return bool(poller.poll(0))
