"""The files a config names (issue 12, items 6 and 7).

One rule for every path: relative to the config file's directory, whatever the working
directory (`token_file` used to follow the working directory while `cluster_key_file`
followed the config). `check-config` checks that every referenced file exists and is
readable (or, for a command, executable) by the user the node runs as, and both
`check-config` and `run` warn about a secret file other users can read or rewrite.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sidecar import config
from sidecar.localcluster import free_port
from sidecar.protocol import generate_cluster_key

TOKEN = "dop_v1_" + "5e" * 32


def child_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FIP_SIDECAR_") and k != "DIGITALOCEAN_TOKEN"
    }


def make_files(directory: Path, *, key_mode: int = 0o600, token_mode: int = 0o600) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cluster.key").write_text(generate_cluster_key() + "\n")
    (directory / "cluster.key").chmod(key_mode)
    (directory / "do_token").write_text(TOKEN + "\n")
    (directory / "do_token").chmod(token_mode)


def config_text(udp: int = 7401, status: int = 9401, api: int = 1, extra: str = "") -> str:
    """Every path relative: the key, the token and (in `extra`) whatever else."""
    return (
        f'node_id = 1\nbind = "127.0.0.1:{udp}"\nstatus_listen = "127.0.0.1:{status}"\n'
        'cluster_key_file = "cluster.key"\n'
        '[[peers]]\nid = 2\naddress = "127.0.0.1:7402"\n'
        '[floating_ip]\naddress = "203.0.113.10"\ndroplet_id = 1001\n'
        f'[digitalocean]\napi_url = "http://127.0.0.1:{api}"\ntoken_file = "do_token"\n' + extra
    )


def check_config(
    path: Path, *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "check-config", "--config", str(path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
        cwd=cwd,
    )


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory that is not the config's."""
    other = tmp_path / "cwd"
    other.mkdir()
    monkeypatch.chdir(other)
    return other


# ---------------------------------------------------------------------- one path rule


def test_every_relative_path_is_relative_to_the_config_file(
    tmp_path: Path, elsewhere: Path
) -> None:
    etc = tmp_path / "etc"
    make_files(etc)
    extra = (
        'ca_file = "certs/ca.pem"\n'
        '[health]\ncommand = ["./check.sh", "--quick"]\n'
        '[hooks]\non_gained = ["hooks/notify", "gained"]\non_lost = ["logger", "lost"]\n'
        'on_leader_change = ["/usr/bin/true"]\n'
    )
    (etc / "node.toml").write_text(config_text(extra=extra))
    loaded = config.load(etc / "node.toml", env={})
    assert loaded.cluster_key_file == etc / "cluster.key"
    assert loaded.digitalocean.token_file == str(etc / "do_token")
    assert loaded.digitalocean.ca_file == str(etc / "certs/ca.pem")
    assert loaded.health.command == (str(etc / "check.sh"), "--quick")
    assert loaded.hooks.on_gained == (str(etc / "hooks/notify"), "gained")
    assert loaded.hooks.on_lost == ("logger", "lost")  # a bare name is looked up in PATH
    assert loaded.hooks.on_leader_change == ("/usr/bin/true",)
    # The same rule for a path given in the environment.
    moved = config.load(
        etc / "node.toml", env={"FIP_SIDECAR_DIGITALOCEAN__TOKEN_FILE": "secrets/tok"}
    )
    assert moved.digitalocean.token_file == str(etc / "secrets/tok")


def test_a_node_started_elsewhere_finds_its_relative_token_file(tmp_path: Path) -> None:
    """The real process, started from another directory: it runs (it used to exit with
    `cannot read the DigitalOcean token file 'do_token'`)."""
    etc, cwd = tmp_path / "etc", tmp_path / "cwd"
    make_files(etc)
    cwd.mkdir()
    taken: set[int] = set()
    udp, status = free_port(socket.SOCK_DGRAM, taken), free_port(socket.SOCK_STREAM, taken)
    api = free_port(socket.SOCK_STREAM, taken)  # nobody listens: the assigner just backs off
    (etc / "node.toml").write_text(config_text(udp, status, api))
    with RunningNode(etc / "node.toml", cwd, tmp_path / "node.log") as log:
        body = wait_for_status(status, log)
    assert body["node_id"] == 1
    assert not [e for e in read_log(log) if e.get("event") == "fatal"]


# ---------------------------------------------------------------------- check-config


@pytest.mark.parametrize(
    ("extra", "key", "missing"),
    [
        ("", "digitalocean.token_file", "do_token"),
        ('ca_file = "ca.pem"\n', "digitalocean.ca_file", "ca.pem"),
        ('[health]\ncommand = ["./check.sh"]\n', "health.command", "check.sh"),
        ('[hooks]\non_lost = ["./notify", "lost"]\n', "hooks.on_lost", "notify"),
        ('[hooks]\non_gained = ["no-such-program-fip"]\n', "hooks.on_gained", "PATH"),
    ],
    ids=["token_file", "ca_file", "health_command", "hook_path", "hook_in_path"],
)
def test_check_config_names_every_missing_file(
    tmp_path: Path, elsewhere: Path, extra: str, key: str, missing: str
) -> None:
    etc = tmp_path / "etc"
    make_files(etc)
    if key == "digitalocean.token_file":
        (etc / "do_token").unlink()
    (etc / "node.toml").write_text(config_text(extra=extra))
    done = check_config(etc / "node.toml", cwd=elsewhere)
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if "config error" in line]
    assert len(errors) == 1, done.stderr
    assert key in errors[0] and missing in errors[0], errors[0]
    assert "Traceback" not in done.stderr


def test_check_config_accepts_a_complete_config(tmp_path: Path, elsewhere: Path) -> None:
    etc = tmp_path / "etc"
    make_files(etc)
    script = etc / "check.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o700)
    (etc / "node.toml").write_text(config_text(extra='[health]\ncommand = ["./check.sh"]\n'))
    done = check_config(etc / "node.toml", cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok: ")
    assert done.stderr == ""


def test_check_config_a_malformed_token_file(tmp_path: Path) -> None:
    make_files(tmp_path)
    (tmp_path / "do_token").write_text("two words\n")
    (tmp_path / "node.toml").write_text(config_text())
    done = check_config(tmp_path / "node.toml")
    assert done.returncode == 2
    assert "digitalocean.token_file" in done.stderr and "malformed" in done.stderr
    assert "two words" not in done.stderr


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user can traverse (tmp_path's parents are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="fip-ops-files-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="checking as another user needs root")
def test_check_config_as_the_user_the_node_runs_as(shared_dir: Path) -> None:
    make_files(shared_dir)  # 0600, owned by root
    config_path = shared_dir / "node.toml"
    config_path.write_text(config_text())
    config_path.chmod(0o644)
    as_root = check_config(config_path)
    assert as_root.returncode == 0, as_root.stderr
    as_nobody = check_config(config_path, "--user", "nobody")
    assert as_nobody.returncode == 2
    errors = [line for line in as_nobody.stderr.splitlines() if "config error" in line]
    assert len(errors) == 2, as_nobody.stderr
    assert "cluster_key_file" in errors[0] and "not readable by user nobody" in errors[0]
    assert "digitalocean.token_file" in errors[1] and "not readable by user nobody" in errors[1]
    # Handed to nobody, the same files pass (and are private again).
    nobody = int(subprocess.run(["id", "-u", "nobody"], capture_output=True, text=True).stdout)
    for name in ("cluster.key", "do_token"):
        os.chown(shared_dir / name, nobody, -1)
    again = check_config(config_path, "--user", "nobody")
    assert again.returncode == 0, again.stderr
    assert os.geteuid() == 0  # the check switched back
    unknown = check_config(config_path, "--user", "no-such-user-fip")
    assert unknown.returncode == 2 and "--user" in unknown.stderr


# ---------------------------------------------------------------------- loose secrets


@pytest.mark.parametrize(
    ("key_mode", "token_mode", "expected"),
    [
        (0o600, 0o600, []),
        (0o640, 0o400, []),  # a group may read a secret on purpose
        (0o644, 0o600, [("cluster_key_file", "read by every user")]),
        (0o600, 0o660, [("digitalocean.token_file", "rewritten by other users")]),
        (
            0o604,
            0o644,
            [
                ("cluster_key_file", "read by every user"),
                ("digitalocean.token_file", "read by every user"),
            ],
        ),
    ],
    ids=["private", "group_readable", "key_world_readable", "token_group_writable", "both"],
)
def test_check_config_warns_about_secrets_others_can_read_or_rewrite(
    tmp_path: Path, key_mode: int, token_mode: int, expected: list[tuple[str, str]]
) -> None:
    make_files(tmp_path, key_mode=key_mode, token_mode=token_mode)
    (tmp_path / "node.toml").write_text(config_text())
    done = check_config(tmp_path / "node.toml")
    assert done.returncode == 0, done.stderr  # a warning, not a refusal
    warnings = [
        line for line in done.stderr.splitlines() if line.startswith("fip-sidecar: warning:")
    ]
    assert len(warnings) == len(expected), done.stderr
    for line, (key, problem) in zip(warnings, expected, strict=True):
        assert key in line and problem in line and "chmod 600" in line, line


def test_run_warns_about_a_world_readable_cluster_key(tmp_path: Path) -> None:
    make_files(tmp_path, key_mode=0o644)
    taken: set[int] = set()
    udp, status = free_port(socket.SOCK_DGRAM, taken), free_port(socket.SOCK_STREAM, taken)
    api = free_port(socket.SOCK_STREAM, taken)
    (tmp_path / "node.toml").write_text(config_text(udp, status, api))
    with RunningNode(tmp_path / "node.toml", tmp_path, tmp_path / "node.log") as log:
        wait_for_status(status, log)
    warnings = [e for e in read_log(log) if e.get("event") == "insecure_file"]
    assert [(w["level"], w["key"]) for w in warnings] == [("WARNING", "cluster_key_file")]
    assert "can be read by every user" in warnings[0]["message"]


# ---------------------------------------------------------------------- helpers


class RunningNode:
    """`fip-sidecar run` in the background, logging to `log`; SIGTERM (then SIGKILL) by PID."""

    def __init__(self, config_path: Path, cwd: Path, log: Path) -> None:
        self.argv = [sys.executable, "-m", "sidecar.cli", "run", "--config", str(config_path)]
        self.cwd, self.log = cwd, log
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Path:
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=child_env(),
                cwd=self.cwd,
            )
        return self.log

    def __exit__(self, *exc_info: object) -> None:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def read_log(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def wait_for_status(port: int, log: Path, timeout: float = 20.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    with httpx.Client(trust_env=False, timeout=1.0) as client:
        while time.monotonic() < deadline:
            try:
                response = client.get(f"http://127.0.0.1:{port}/status")
            except httpx.HTTPError:
                time.sleep(0.1)
                continue
            body = response.json()
            assert isinstance(body, dict)
            return body
    raise AssertionError(f"no /status within {timeout}s; log:\n{log.read_text()[-3000:]}")
