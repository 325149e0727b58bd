"""`python -m sidecar.emulator` as a real process on loopback, with two real web services.

Real sockets and real time: every wait is bounded, every process is ours and is killed
by PID in `finally`. Assertions are about order and membership, never about speed.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
import trustme
from emulator.harness import IP, TOKEN
from emulator.openapi import check_response, spec_present

REPO = Path(__file__).resolve().parents[1]
READY_TIMEOUT = 30.0

WEB_SERVER = """
import http.server, sys
name = sys.argv[1].encode()
class Handler(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):
        self.send_response(200)
        self.send_header("content-length", str(len(name)))
        self.end_headers()
    def do_GET(self):
        self.do_HEAD()
        self.wfile.write(name)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


async def read_line(process: trio.Process) -> str:
    """The first line a child prints; on failure, show what it wrote to stderr."""
    assert process.stdout is not None and process.stderr is not None
    buffer = b""
    with trio.move_on_after(READY_TIMEOUT):
        while b"\n" not in buffer:
            chunk = await process.stdout.receive_some(4096)
            if not chunk:
                break
            buffer += chunk
    if b"\n" not in buffer:
        errors = b""
        with trio.move_on_after(1.0):
            errors = await process.stderr.receive_some(65536)
        pytest.fail(f"no ready line from {process.args!r}: {buffer!r} stderr: {errors!r}")
    return buffer.split(b"\n", 1)[0].decode()


async def stop(process: trio.Process) -> int | None:
    """SIGTERM, then SIGKILL after 10 s; returns the exit status seen after SIGTERM."""
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    with trio.move_on_after(10.0):
        return await process.wait()
    process.kill()
    await process.wait()
    return None


@asynccontextmanager
async def spawned(*args: str, env: dict[str, str] | None = None) -> AsyncIterator[trio.Process]:
    process = await trio.lowlevel.open_process(
        list(args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )
    try:
        yield process
    finally:
        await stop(process)


def emulator_command(*extra: str) -> list[str]:
    return [sys.executable, "-m", "sidecar.emulator", "--listen", "127.0.0.1:0", *extra]


async def poll_action(api: httpx.AsyncClient, action_id: int) -> dict[str, object]:
    """Read an action until it is no longer in progress (at most 200 reads, 20 s)."""
    with trio.move_on_after(20.0):
        for _ in range(200):
            action: dict[str, object] = (await api.get(f"/v2/actions/{action_id}")).json()["action"]
            if action["status"] != "in-progress":
                return action
            await trio.sleep(0.1)
    pytest.fail(f"action {action_id} never completed")


async def test_emulator_and_edge_over_real_sockets() -> None:
    async with (
        spawned(sys.executable, "-c", WEB_SERVER, "web1") as web1,
        spawned(sys.executable, "-c", WEB_SERVER, "web2") as web2,
    ):
        port1, port2 = int(await read_line(web1)), int(await read_line(web2))
        command = emulator_command(
            "--edge-listen", "127.0.0.1:0",
            "--reserved-ip", f"{IP}=nyc3:1001",
            "--droplet", f"1001=nyc3=http://127.0.0.1:{port1}",
            "--droplet", f"1002=nyc3=http://127.0.0.1:{port2}",
            "--action-seconds", "0.5",
        )  # fmt: skip
        async with spawned(*command, env={"FIP_EMULATOR_TOKEN": TOKEN}) as emulator:
            ready = await read_line(emulator)
            words = ready.split()
            assert words[:3] == ["emulator", "listening", "on"] and words[4:6] == ["edge", "on"]
            api_url, edge_url = words[3], words[6]
            async with (
                httpx.AsyncClient(
                    base_url=api_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
                ) as api,
                httpx.AsyncClient(base_url=edge_url, timeout=10) as edge,
            ):
                got = await api.get(f"/v2/reserved_ips/{IP}")
                assert got.status_code == 200
                assert int(got.headers["ratelimit-remaining"]) < int(got.headers["ratelimit-limit"])
                if spec_present():
                    check_response("GET", got.url.path, 200, got.json(), dict(got.headers))

                first = await edge.get("/")
                assert (first.text, first.headers["x-fip-droplet"]) == ("web1", "1001")
                assert first.headers.get_list("date") == [first.headers["date"]]
                head = await edge.head("/")
                assert (head.status_code, head.headers["content-length"]) == (200, "4")
                assert head.headers["x-fip-droplet"] == "1001"

                before = time.monotonic()
                posted = await api.post(
                    f"/v2/reserved_ips/{IP}/actions", json={"type": "assign", "droplet_id": 1002}
                )
                assert posted.status_code == 201
                action = await poll_action(api, posted.json()["action"]["id"])
                after = time.monotonic()
                assert action["status"] == "completed"

                history = (await api.get("/_emulator/history")).json()
                moved = history[-1]
                assert (moved["droplet_id"], moved["source"]) == (1002, "api")
                assert before <= moved["completed_monotonic"] <= after, (
                    "completed_monotonic is CLOCK_MONOTONIC, comparable across processes"
                )
                meta = await api.get("/metadata/droplets/1002/metadata/v1/reserved_ip/ipv4/active")
                assert meta.text == "true"

                second = await edge.get("/")
                assert (second.text, second.headers["x-fip-droplet"]) == ("web2", "1002")

                await stop(web2)
                broken = await edge.get("/")
                assert broken.status_code == 502

                await api.post("/_emulator/assign", json={"droplet_id": None})
                nobody = await edge.get("/")
                assert nobody.status_code == 503

            assert await stop(emulator) == 0, "SIGTERM stops the emulator cleanly"


async def test_serves_https_with_the_given_certificate(tmp_path: Path) -> None:
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1", "localhost")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    certificate.private_key_and_cert_chain_pem.write_to_path(str(cert))
    certificate.private_key_pem.write_to_path(str(key))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    command = emulator_command(
        "--token-file", str(token_file),
        "--tls-cert", str(cert), "--tls-key", str(key),
        "--reserved-ip", f"{IP}=nyc3",
    )  # fmt: skip
    async with spawned(*command) as emulator:
        ready = await read_line(emulator)
        api_url = ready.split()[3]
        assert api_url.startswith("https://127.0.0.1:")
        trust = ssl.create_default_context()
        authority.configure_trust(trust)
        async with httpx.AsyncClient(
            base_url=api_url, verify=trust, headers={"Authorization": f"Bearer {TOKEN}"}
        ) as api:
            response = await api.get(f"/v2/reserved_ips/{IP}")
        assert response.status_code == 200
        assert response.json()["reserved_ip"]["droplet"] is None
