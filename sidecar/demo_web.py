"""A tiny stand-in web service for demos and tests: one per emulated droplet.

It says which droplet answered (`hello from NAME`), so a `curl` through the emulator's edge
shows the floating IP move; its `/healthz` can be failed and recovered on demand
(`POST /fail`, `POST /recover`), so a health-driven failover can be shown without killing
anything. The standard library's threading HTTP server is enough for a handful of
requests a second and keeps this free of the sidecar's own runtime.

Run it: `python -m sidecar.demo_web --listen 127.0.0.1:8081 --name "droplet 1"`.
It prints one ready line (`demo web NAME listening on http://HOST:PORT`) once it accepts
connections, with the real port when port 0 was asked for.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType


class DemoService:
    """The service's state: its name and whether `/healthz` says it is healthy."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._healthy = True
        self._lock = threading.Lock()

    @property
    def healthy(self) -> bool:
        with self._lock:
            return self._healthy

    def set_healthy(self, healthy: bool) -> None:
        with self._lock:
            self._healthy = healthy


def _handler_for(service: DemoService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "fip-demo-web"

        def do_GET(self) -> None:
            if self.path == "/healthz":
                if service.healthy:
                    self._reply(200, "ok\n")
                else:
                    self._reply(503, f"{service.name} is failing (POST /recover to heal)\n")
            elif self.path.split("?", 1)[0] == "/":
                self._reply(200, f"hello from {service.name}\n")
            else:
                self._reply(404, "not found: try /, /healthz, POST /fail, POST /recover\n")

        def do_POST(self) -> None:
            if self.path == "/fail":
                service.set_healthy(False)
                self._reply(200, f"{service.name}: /healthz now fails\n")
            elif self.path == "/recover":
                service.set_healthy(True)
                self._reply(200, f"{service.name}: /healthz now passes\n")
            else:
                self._reply(404, "not found: POST /fail or /recover\n")

        def _reply(self, status: int, text: str) -> None:
            body = text.encode()
            self.send_response(status)
            self.send_header("content-type", "text/plain; charset=utf-8")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # one line per health check would drown the demo's own output

    return Handler


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def make_server(listen: tuple[str, int], service: DemoService) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(listen, _handler_for(service))
    server.daemon_threads = True
    return server


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar.demo_web", description=__doc__)
    parser.add_argument("--listen", type=parse_listen, default=("127.0.0.1", 8080))
    parser.add_argument("--name", default="demo", help="who answers, e.g. 'droplet 1'")
    args = parser.parse_args(argv)
    service = DemoService(args.name)
    try:
        server = make_server(args.listen, service)
    except OSError as exc:
        print(f"demo_web: cannot listen on {args.listen}: {exc.strerror}", file=sys.stderr)
        return 1

    def stop(signum: int, frame: FrameType | None) -> None:
        # shutdown() waits for serve_forever to return, so it must run in another thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = server.server_address[:2]
    print(f"demo web {args.name} listening on http://{host!s}:{port}", flush=True)
    with server:
        server.serve_forever(poll_interval=0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
