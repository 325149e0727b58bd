"""A small HTTP/1.1 server on trio over h11, for a handful of read-only GET routes.

Why not an ASGI server: the status port answers three GET routes whose bodies are computed
on the spot. hypercorn (with h2, wsproto and priority) cost a node ~4 MiB of RSS for that;
h11 is already installed (httpx depends on it) and is a sans-IO HTTP/1.1 state machine,
so what is left here is the part h11 leaves to its user: sockets, timeouts and limits.

What a bad or hostile client can do, and what it costs:

- A malformed request gets its 4xx (h11's hint: 400, or 431 for an oversized head; 505
  for an HTTP version other than 1.x) and the connection is closed; the server goes on
  serving everyone else.
- A client that sends nothing, or trickles a request byte by byte (slowloris), is dropped
  once `request_timeout` has passed since the connection opened or since its previous
  response: the deadline covers the whole request, not each read.
- A client that does not read its response is dropped after `send_timeout`.
- At most `max_connections` connections are served at once; one more is answered 503 and
  closed at once, so a flood cannot grow memory without bound.
- A request body (GET has none; a POST gets 405) is read and thrown away up to
  `max_body_bytes`, so the answer reaches the client instead of a reset; a larger one is
  answered 413 and the connection closed.
- A route that raises is answered 500 and logged; nothing a client does ends the task
  that serves, so nothing a client does stops the node.

Keep-alive follows HTTP/1.1 (h11 decides): a health checker or Prometheus reusing its
connection costs no new TCP handshake per request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus

import h11
import trio

log = logging.getLogger(__name__)

#: What one receive reads at most; a status request fits in one.
_READ_SIZE = 16 * 1024
#: After a final response, how long (and how much) to drain what the client still sends,
#: so that closing does not reset the connection before the client has read the answer.
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Response:
    """What a route answers: a complete body (computed when the request arrives)."""

    body: bytes
    content_type: str
    status: int = 200


Route = Callable[[], Response]


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one client may cost.

    - `request_timeout`: seconds from the connection opening, or from the previous response,
      until a whole request (head and body) has arrived; an idle keep-alive connection is
      closed after this long too.
    - `send_timeout`: seconds a response may take to be written (a client that does not
      read cannot hold a connection longer).
    - `max_connections`: connections served at once; more are answered 503 and closed.
    - `max_head_bytes`: request line and headers together; more is answered 431.
    - `max_headers`: the number of header fields; more is answered 431.
    - `max_body_bytes`: a request body larger than this is answered 413.
    """

    request_timeout: float = 10.0
    send_timeout: float = 10.0
    max_connections: int = 32
    max_head_bytes: int = 8 * 1024
    max_headers: int = 64
    max_body_bytes: int = 64 * 1024


class _ClientError(Exception):
    """The client sent something to answer with an error status, then close the connection."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class _Gone(Exception):
    """The client went away or ran out of time: close without answering."""


def _plain(status: int, text: str) -> Response:
    return Response(f"{text}\n".encode(), "text/plain; charset=utf-8", status)


def _encode(
    conn: h11.Connection, response: Response, *, head_only: bool, close: bool = False
) -> bytes:
    """The bytes of `response` on `conn` (its state advances as if they were sent)."""
    headers = [
        ("content-type", response.content_type),
        ("content-length", str(len(response.body))),
    ]
    if response.status == 405:
        headers.append(("allow", "GET, HEAD"))
    if close:
        headers.append(("connection", "close"))
    head = h11.Response(
        status_code=response.status, headers=headers, reason=HTTPStatus(response.status).phrase
    )
    data = conn.send(head) or b""
    if not head_only:  # h11 frames a HEAD answer without a body itself
        data += conn.send(h11.Data(data=response.body)) or b""
    return data + (conn.send(h11.EndOfMessage()) or b"")


class HTTPServer:
    """Serve `routes` (path -> route) for GET and HEAD; anything else is 404 or 405.

    `not_found` is the body of a 404 (say which routes exist). A query string is ignored
    when matching a path.
    """

    def __init__(
        self, routes: Mapping[str, Route], *, not_found: str, limits: Limits | None = None
    ) -> None:
        self._routes = dict(routes)
        self._not_found = _plain(404, not_found)
        self.limits = limits or Limits()
        self._connections = 0
        self.ports: list[int] = []

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on `host`:`port` and serve until cancelled; `ports` holds the bound
        ports (port 0 asks the kernel for one) once `task_status.started()` is called."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.ports = [listener.socket.getsockname()[1] for listener in listeners]
        task_status.started()
        # serve_listeners already rides out EMFILE and friends (it waits and accepts again).
        await trio.serve_listeners(self._serve_connection, listeners)

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        if self._connections >= self.limits.max_connections:
            await self._refuse_busy(stream)
            return
        self._connections += 1
        try:
            await self._converse(stream)
        except Exception:  # a bug here must cost one connection, never the server
            log.exception("status server: connection failed")
        finally:
            self._connections -= 1
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _refuse_busy(self, stream: trio.SocketStream) -> None:
        busy = _encode(
            h11.Connection(h11.SERVER),
            _plain(503, "too many connections"),
            head_only=False,
            close=True,
        )
        await self._send(stream, busy)
        with trio.CancelScope(shield=True):
            await stream.aclose()

    async def _converse(self, stream: trio.SocketStream) -> None:
        """Requests and responses on one connection, until either side ends it."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head_bytes)
        while True:
            try:
                request = await self._receive_request(stream, conn)
            except _Gone:
                return
            except _ClientError as exc:
                log.debug("status server: bad request", extra={"error": str(exc)})
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    error = _plain(exc.status, str(exc))
                    answer = _encode(conn, error, head_only=False, close=True)
                    if await self._send(stream, answer):
                        await self._linger(stream)
                return
            if request is None:  # the client closed between requests
                return
            response = self._respond(request)
            head_only = request.method == b"HEAD"
            if not await self._send(stream, _encode(conn, response, head_only=head_only)):
                return
            if conn.our_state is h11.MUST_CLOSE:
                await self._linger(stream)
                return
            conn.start_next_cycle()

    async def _receive_request(
        self, stream: trio.SocketStream, conn: h11.Connection
    ) -> h11.Request | None:
        """One whole request (its body read and dropped), within `request_timeout`;
        None when the client closed the connection cleanly before sending one."""
        request: h11.Request | None = None
        body_bytes = 0
        with trio.move_on_after(self.limits.request_timeout):
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    raise _ClientError(exc.error_status_hint, str(exc)) from None
                if event is h11.NEED_DATA:
                    try:
                        data = await stream.receive_some(_READ_SIZE)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        raise _Gone from None
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    if len(event.headers) > self.limits.max_headers:
                        raise _ClientError(431, "too many header fields")
                    if not event.http_version.startswith(b"1."):  # h11 parses any version
                        raise _ClientError(505, "only HTTP/1.0 and HTTP/1.1 are served")
                    request = event
                elif isinstance(event, h11.Data):
                    body_bytes += len(event.data)
                    if body_bytes > self.limits.max_body_bytes:
                        raise _ClientError(413, "request body too large")
                elif isinstance(event, h11.EndOfMessage):
                    return request
                elif isinstance(event, h11.ConnectionClosed):
                    if request is not None:  # closed half-way through a body
                        raise _Gone
                    return None
                else:  # h11.PAUSED cannot happen before our response; be safe anyway
                    raise _Gone
        raise _Gone  # timed out

    def _respond(self, request: h11.Request) -> Response:
        if request.method not in (b"GET", b"HEAD"):
            return _plain(405, "method not allowed: use GET or HEAD")
        path = request.target.split(b"?", 1)[0].decode("ascii", "replace")
        route = self._routes.get(path)
        if route is None:
            return self._not_found
        try:
            return route()
        except Exception:
            log.exception("status server: route failed", extra={"path": path})
            return _plain(500, "internal error (logged)")

    async def _send(self, stream: trio.SocketStream, data: bytes) -> bool:
        """Write `data` within `send_timeout`; False when the client is gone or too slow."""
        with trio.move_on_after(self.limits.send_timeout):
            try:
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return False
            return True
        return False

    async def _linger(self, stream: trio.SocketStream) -> None:
        """Half-close, then read (and drop) what the client still sends, briefly: closing
        with unread data would reset the connection and could lose the response."""
        with trio.move_on_after(_LINGER_SECONDS):
            try:
                await stream.send_eof()
                drained = 0
                while drained < _LINGER_BYTES:
                    data = await stream.receive_some(_READ_SIZE)
                    if not data:
                        return
                    drained += len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
