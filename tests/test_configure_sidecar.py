"""terraform/files/configure_sidecar.py run as the droplet runs it, against a scripted HTTP
server on 127.0.0.1 standing in for GET /v2/droplets: every outcome has its own exit code and
one log line that names it (a wrong token is an error, not "not ready").
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "terraform" / "files" / "configure_sidecar.py"
TOKEN = "dop_v1_" + "ab" * 32
TAG = "fip-cluster"


def droplet(node_id: int, region: str, public: str, private: str) -> dict[str, Any]:
    return {
        "id": 400000000 + node_id,
        "region": {"slug": region},
        "tags": [TAG, f"{TAG}-node-{node_id}"],
        "networks": {
            "v4": [
                {"ip_address": public, "type": "public"},
                {"ip_address": private, "type": "private"},
            ]
        },
    }


CLUSTER = [
    droplet(1, "nyc3", "198.18.1.1", "198.19.0.1"),
    droplet(2, "nyc3", "198.18.1.2", "198.19.0.2"),
    droplet(3, "tor1", "198.18.2.3", "198.19.1.3"),
]


class Scripted(BaseHTTPRequestHandler):
    """Answers every request with the server's current (status, body); records requests."""

    def do_GET(self) -> None:
        server: Api = self.server  # type: ignore[assignment]
        server.requests.append((self.path, self.headers.get("Authorization", "")))
        status, body = server.answer
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return None


class Api(ThreadingHTTPServer):
    answer: tuple[int, bytes] = (200, b"{}")
    requests: list[tuple[str, str]]


@pytest.fixture
def api() -> Iterator[Api]:
    server = Api(("127.0.0.1", 0), Scripted)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def droplet_files(tmp_path: Path, api: Api) -> Path:
    """cluster.json for node 1, pointing at the scripted API; returns its path."""
    (tmp_path / "do_token").write_text(TOKEN + "\n")
    cluster = {
        "cluster_tag": TAG,
        "members": {"1": {"eligible": True}, "2": {"eligible": True}, "3": {"eligible": False}},
        "election_port": 7401,
        "status_listen": "127.0.0.1:9401",
        "profile": "lan",
        "reserved_ip": "203.0.113.10",
        "api_url": f"http://127.0.0.1:{api.server_address[1]}",
        "token_file": str(tmp_path / "do_token"),
        "config_file": str(tmp_path / "config.toml"),
        "node_id": 1,
        "health_url": "http://127.0.0.1:80/",
    }
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(cluster))
    return path


def run(cluster_file: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"FIP_SIDECAR_CLUSTER_FILE": str(cluster_file), "PATH": "/usr/bin:/bin"},
    )


def test_config_written_then_unchanged(api: Api, droplet_files: Path) -> None:
    api.answer = (200, json.dumps({"droplets": CLUSTER}).encode())
    first = run(droplet_files)
    assert (first.returncode, first.stderr.strip()) == (10, "configure_sidecar: config written")
    assert 'address = "198.19.0.2:7401"' in (droplet_files.parent / "config.toml").read_text()
    second = run(droplet_files)
    assert (second.returncode, second.stderr.strip()) == (0, "configure_sidecar: config unchanged")
    path, authorization = api.requests[0]
    assert path == f"/v2/droplets?tag_name={TAG}&per_page=200"
    assert authorization == f"Bearer {TOKEN}"


ERRORS = [
    pytest.param(401, b'{"id":"unauthorized","message":"Unable to authenticate you"}', 77,
                 "DigitalOcean API refused the token (HTTP 401", id="401"),
    pytest.param(403, b'{"id":"forbidden","message":"You are not authorized"}', 77,
                 "DigitalOcean API refused the token (HTTP 403", id="403"),
    pytest.param(500, b'{"id":"server_error","message":"oops"}', 69,
                 "DigitalOcean API failed: HTTP 500 from GET /v2/droplets", id="500"),
    pytest.param(429, b'{"id":"too_many_requests","message":"slow down"}', 69,
                 "DigitalOcean API failed: HTTP 429", id="429"),
    pytest.param(200, b"<html>captive portal</html>", 76,
                 "DigitalOcean API answered with something not JSON: <html>captive", id="garbage"),
    pytest.param(200, b'{"message": "no list"}', 76,
                 "DigitalOcean API answer has no droplet list", id="no-droplets"),
]  # fmt: skip


@pytest.mark.parametrize(("status", "body", "code", "line"), ERRORS)
def test_api_errors_have_their_own_exit_code_and_name_the_status(
    api: Api, droplet_files: Path, status: int, body: bytes, code: int, line: str
) -> None:
    api.answer = (status, body)
    result = run(droplet_files)
    assert result.returncode == code, result.stderr
    assert result.stderr.startswith(f"configure_sidecar: error: {line}"), result.stderr
    assert TOKEN not in result.stderr
    assert not (droplet_files.parent / "config.toml").exists()


def test_unreachable_api_is_unavailable(api: Api, droplet_files: Path) -> None:
    cluster = json.loads(droplet_files.read_text())
    port = api.server_address[1]
    api.shutdown()
    api.server_close()  # nothing listens on the port any more
    cluster["api_url"] = f"http://127.0.0.1:{port}"
    droplet_files.write_text(json.dumps(cluster))
    result = run(droplet_files)
    assert result.returncode == 69
    assert result.stderr.startswith("configure_sidecar: error: DigitalOcean API unreachable: ")


def test_waiting_for_the_token_or_the_peers_is_not_an_error(api: Api, droplet_files: Path) -> None:
    api.answer = (200, json.dumps({"droplets": CLUSTER[:1]}).encode())
    peers_missing = run(droplet_files)
    assert peers_missing.returncode == 75
    assert "not ready: no droplet tagged as node 2 yet" in peers_missing.stderr
    (droplet_files.parent / "do_token").unlink()
    token_missing = run(droplet_files)
    assert token_missing.returncode == 75
    assert "waiting for" in token_missing.stderr and "do_token to be placed" in token_missing.stderr
    assert len(api.requests) == 1  # no request without a token
