"""A tiny real HTTP server on loopback that answers a scripted sequence of requests.

For the API paths the emulator does not (or should not) produce: a reserved IPv6 read
without `locked`, an action that 404s by id, a 429 with `Retry-After`, an action that
errors. Each step names the method and path it expects and the answer to give; a request
that does not match the next step gets a 599 and is recorded, so a test sees exactly what
the client sent, in order. Real sockets (h11 over trio), bounded by the test's timeouts.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import h11
import trio


@dataclass(frozen=True)
class Step:
    method: str
    path: str
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


class Script:
    """The steps still to answer and what was asked (`seen`: (method, path, body))."""

    def __init__(self, steps: list[Step]) -> None:
        self.steps = list(steps)
        self.seen: list[tuple[str, str, bytes]] = []
        self.unexpected: list[tuple[str, str]] = []
        self._answered = trio.Event()

    async def wait_until_left(self, steps: int) -> None:
        """Return once at most `steps` steps are still unanswered."""
        while len(self.steps) > steps:
            await self._answered.wait()
            self._answered = trio.Event()

    def answer(self, method: str, path: str, body: bytes) -> tuple[int, bytes, dict[str, str]]:
        self.seen.append((method, path, body))
        if not self.steps or (self.steps[0].method, self.steps[0].path) != (method, path):
            self.unexpected.append((method, path))
            return 599, b'{"id":"unexpected","message":"not in the script"}', {}
        step = self.steps.pop(0)
        self._answered.set()
        headers = {"ratelimit-limit": "250", "ratelimit-remaining": "200", **step.headers}
        payload = b"" if step.body is None else json.dumps(step.body).encode()
        return step.status, payload, headers


async def _serve_one(stream: trio.SocketStream, script: Script) -> None:
    connection = h11.Connection(h11.SERVER)
    request: h11.Request | None = None
    body = b""
    with trio.move_on_after(30):
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                connection.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                request, body = event, b""
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage) and request is not None:
                status, payload, headers = script.answer(
                    request.method.decode(), request.target.decode(), body
                )
                head = [(k, v) for k, v in headers.items()]
                head += [
                    ("content-type", "application/json"),
                    ("content-length", str(len(payload))),
                ]
                await stream.send_all(
                    connection.send(h11.Response(status_code=status, headers=head))
                )
                await stream.send_all(connection.send(h11.Data(data=payload)))
                await stream.send_all(connection.send(h11.EndOfMessage()))
                if connection.our_state is h11.MUST_CLOSE:
                    return
                connection.start_next_cycle()
                request = None
            elif isinstance(event, h11.ConnectionClosed):
                return


@asynccontextmanager
async def scripted_server(steps: list[Step]) -> AsyncIterator[tuple[str, Script]]:
    """Serve `steps` on 127.0.0.1 (any free port); yields (base URL, script)."""
    script = Script(steps)

    async def handler(stream: trio.SocketStream) -> None:
        try:
            await _serve_one(stream, script)
        except (trio.BrokenResourceError, h11.RemoteProtocolError):
            pass
        finally:
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        yield f"http://127.0.0.1:{port}", script
        nursery.cancel_scope.cancel()
