"""The demo web service: says who answered, and its health can be failed and recovered."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator

import httpx
import pytest

from sidecar.demo_web import DemoService, make_server


@pytest.fixture
def base_url() -> Iterator[str]:
    server = make_server(("127.0.0.1", 0), DemoService("droplet 7"))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host!s}:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_answers_with_its_name_and_toggles_health(base_url: str) -> None:
    with httpx.Client(base_url=base_url, trust_env=False, timeout=5) as client:
        assert client.get("/").text == "hello from droplet 7\n"
        assert client.get("/healthz").status_code == 200
        assert client.post("/fail").status_code == 200
        assert client.get("/healthz").status_code == 503
        assert client.get("/").status_code == 200  # failing health, still serving
        assert client.post("/recover").status_code == 200
        assert client.get("/healthz").status_code == 200
        assert client.get("/nope").status_code == 404
        assert client.post("/nope").status_code == 404


@pytest.mark.timeout(60)
def test_runs_as_a_module_and_stops_on_sigterm() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "sidecar.demo_web", "--listen", "127.0.0.1:0", "--name", "d1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("demo web d1 listening on http://127.0.0.1:")
        url = line.split()[-1]
        assert httpx.get(url + "/", trust_env=False, timeout=5).text == "hello from d1\n"
        process.terminate()
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
