"""What an operator sees when a node cannot start: one line naming the key or the address.

Real `fip-sidecar run` processes on loopback, each broken one way (issue 12, item 3). trio
wraps an error raised inside a nursery in an `ExceptionGroup`, which used to reach the
terminal as a 33-55 line traceback with exit 1; every case here must end with exit 2,
one plain line on stderr (besides the JSON log lines), the same text in a JSON `fatal`
log line, and no traceback.

Also: a second process with the same election address must refuse to start, although
the node's own sockets use SO_REUSEPORT (which would let a second process of the same
user share the port, and speak as the same node id, silently).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.cli import _startup_failure
from sidecar.localcluster import LocalCluster, free_port
from sidecar.protocol import generate_cluster_key
from sidecar.service import StartupError

#: Generous: a node that does not exit is the failure being tested, not slowness.
EXIT_WAIT = 45.0


def child_env() -> dict[str, str]:
    """This environment minus anything that would override the test's config files."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FIP_SIDECAR_") and k != "DIGITALOCEAN_TOKEN"
    }


def write_config(directory: Path, udp: int, status: int, extra: str = "", **keys: str) -> Path:
    """A two-member config (the peer never runs) with a 0600 key beside it."""
    key = directory / "cluster.key"
    key.write_text(generate_cluster_key() + "\n")
    key.chmod(0o600)
    bind = keys.get("bind", f"127.0.0.1:{udp}")
    config = directory / "node.toml"
    config.write_text(
        f'node_id = 1\nbind = "{bind}"\nstatus_listen = "127.0.0.1:{status}"\n'
        'cluster_key_file = "cluster.key"\n'
        f'[[peers]]\nid = 2\naddress = "127.0.0.1:{udp + 1 if udp < 65535 else udp - 1}"\n' + extra
    )
    return config


def run_node(
    config: Path, *, env: dict[str, str] | None = None, cwd: Path | None = None
) -> tuple[int, str]:
    """Run `fip-sidecar run` until it exits (bounded); (exit status, stderr)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "sidecar.cli", "run", "--config", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env() if env is None else env,
        cwd=cwd,
    )
    try:
        _, stderr = process.communicate(timeout=EXIT_WAIT)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate(timeout=10)
        raise AssertionError(
            f"the node did not exit within {EXIT_WAIT}s:\n{stderr[-3000:]}"
        ) from None
    return process.returncode, stderr


def assert_one_line(returncode: int, stderr: str, *expected: str) -> str:
    """Exit 2, one plain line naming `expected`, a JSON `fatal` line saying the same."""
    assert "Traceback" not in stderr, stderr
    plain = [line for line in stderr.splitlines() if line and not line.startswith("{")]
    assert len(plain) == 1, stderr
    line = plain[0]
    assert line.startswith("fip-sidecar: cannot start: "), line
    for text in expected:
        assert text in line, line
    fatal = [
        json.loads(line)
        for line in stderr.splitlines()
        if line.startswith("{") and json.loads(line).get("event") == "fatal"
    ]
    assert [f["error"] for f in fatal] == [line.removeprefix("fip-sidecar: cannot start: ")]
    assert returncode == 2, stderr
    return line


@pytest.fixture
def ports() -> tuple[int, int]:
    taken: set[int] = set()
    return free_port(socket.SOCK_DGRAM, taken), free_port(socket.SOCK_STREAM, taken)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback TCP port nobody listens on (an API or metadata service that is down)."""
    yield free_port(socket.SOCK_STREAM, set())


def ip_section(api_port: int, *, droplet_id: bool = True, token_file: str | None = None) -> str:
    lines = ["[floating_ip]", 'address = "203.0.113.10"']
    if droplet_id:
        lines.append("droplet_id = 1001")
    lines += [
        "[digitalocean]",
        f'api_url = "http://127.0.0.1:{api_port}"',
        f'metadata_url = "http://127.0.0.1:{api_port}"',
    ]
    if token_file is not None:
        lines.append(f"token_file = {json.dumps(token_file)}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- the eight cases


def test_udp_port_in_use(tmp_path: Path, ports: tuple[int, int]) -> None:
    udp, status = ports
    config = write_config(tmp_path, udp, status)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", udp))
        assert_one_line(*run_node(config), f"bind: 127.0.0.1:{udp} is already in use")


def test_status_port_in_use(tmp_path: Path, ports: tuple[int, int]) -> None:
    udp, status = ports
    config = write_config(tmp_path, udp, status)
    with socket.create_server(("127.0.0.1", status)):
        assert_one_line(*run_node(config), f"status_listen: 127.0.0.1:{status} is already in use")


def test_bind_address_not_on_this_machine(tmp_path: Path, ports: tuple[int, int]) -> None:
    udp, status = ports
    # A benchmark-range address no interface here has: the bind fails, nothing is sent.
    config = write_config(tmp_path, udp, status, bind=f"198.18.0.1:{udp}")
    assert_one_line(*run_node(config), f"bind: 198.18.0.1:{udp} is not an address of this machine")


def test_no_token(tmp_path: Path, ports: tuple[int, int], closed_port: int) -> None:
    config = write_config(tmp_path, *ports, extra=ip_section(closed_port))
    assert_one_line(*run_node(config), "DIGITALOCEAN_TOKEN", "digitalocean.token_file")


def test_token_file_missing(tmp_path: Path, ports: tuple[int, int], closed_port: int) -> None:
    missing = tmp_path / "no_such_token"
    config = write_config(tmp_path, *ports, extra=ip_section(closed_port, token_file=str(missing)))
    assert_one_line(*run_node(config), "digitalocean.token_file", str(missing))


def test_relative_token_file_missing_names_the_resolved_path(
    tmp_path: Path, ports: tuple[int, int], closed_port: int
) -> None:
    """Started from another directory, the error names the path next to the config."""
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    config = write_config(config_dir, *ports, extra=ip_section(closed_port, token_file="do_token"))
    assert_one_line(
        *run_node(config, cwd=elsewhere), "digitalocean.token_file", str(config_dir / "do_token")
    )


def test_droplet_id_without_a_metadata_service(
    tmp_path: Path, ports: tuple[int, int], closed_port: int
) -> None:
    token = tmp_path / "do_token"
    token.write_text("dop_v1_" + "ab" * 32 + "\n")
    token.chmod(0o600)
    extra = ip_section(closed_port, droplet_id=False, token_file=str(token))
    config = write_config(tmp_path, *ports, extra=extra)
    assert_one_line(*run_node(config), "floating_ip.droplet_id", "digitalocean.metadata_url")


def test_ca_file_that_does_not_load(
    tmp_path: Path, ports: tuple[int, int], closed_port: int
) -> None:
    """The API client is built only when the node first leads; its CA bundle is still
    checked at start, where a mistake can end the process before it joins the election."""
    token = tmp_path / "do_token"
    token.write_text("dop_v1_" + "ab" * 32 + "\n")
    token.chmod(0o600)
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text(
        "-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n"
    )
    extra = (
        ip_section(closed_port, token_file=str(token)) + f"ca_file = {json.dumps(str(ca_file))}\n"
    )
    config = write_config(tmp_path, *ports, extra=extra)
    assert_one_line(*run_node(config), "digitalocean.ca_file", str(ca_file))


# ---------------------------------------------------------------------- a second process


def test_a_second_process_on_the_same_election_address_refuses_to_start(
    tmp_path: Path,
) -> None:
    """SO_REUSEPORT lets sockets of one user share a port; the probe bind must not."""
    with LocalCluster(tmp_path / "cluster", size=2) as cluster:
        cluster.wait_for_leader(expect=1)
        first = cluster.members[1]
        # The same config but its own status port, so only the election port can clash.
        status = free_port(socket.SOCK_STREAM, {first.status_port})
        twin = tmp_path / "twin.toml"
        twin.write_text(
            first.config_path.read_text().replace(
                f"127.0.0.1:{first.status_port}", f"127.0.0.1:{status}"
            )
        )
        line = assert_one_line(
            *run_node(twin),
            f"bind: 127.0.0.1:{first.udp_port} is already in use",
            "is another fip-sidecar running with this config?",
        )
        assert first.running(), "the genuine node must be untouched"
        assert cluster.status(1) is not None
        assert cluster.events(1, "lost") == [], line
    assert first.process is not None and first.process.returncode in (0, -signal.SIGTERM)


def test_only_start_up_errors_are_shortened_a_bug_keeps_its_traceback() -> None:
    leaf = StartupError("status_listen: 127.0.0.1:9401 is already in use")
    nested = ExceptionGroup("outer", [ExceptionGroup("inner", [leaf])])
    assert _startup_failure(nested) is leaf
    assert _startup_failure(leaf) is leaf
    mixed = ExceptionGroup("outer", [leaf, KeyError("a bug")])
    assert _startup_failure(mixed) is None
    assert _startup_failure(ExceptionGroup("bug", [ZeroDivisionError()])) is None
