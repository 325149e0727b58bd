"""Every config mistake exits 2 with one line that names the key."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sidecar import config
from sidecar.protocol import generate_cluster_key

GOOD = textwrap.dedent(
    """
    node_id = 1
    bind = "127.0.0.1:7401"
    status_listen = "127.0.0.1:9401"
    cluster_key_file = "cluster.key"

    [[peers]]
    id = 2
    address = "127.0.0.1:7402"

    [[peers]]
    id = 3
    address = "127.0.0.1:7403"
    eligible = false
    """
)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "cluster.key").write_text(generate_cluster_key() + "\n")
    return tmp_path


def write(workdir: Path, text: str) -> Path:
    path = workdir / "node.toml"
    path.write_text(text)
    return path


def test_good_config_loads(workdir: Path) -> None:
    loaded = config.load(write(workdir, GOOD), env={})
    assert loaded.node_id == 1
    assert loaded.quorum == 2
    assert [m.eligible for m in loaded.members] == [True, True, False]
    assert loaded.timing == config.PROFILES["lan"]
    assert "cluster_key" not in repr(loaded) and str(loaded.cluster_key) not in repr(loaded)


BAD_CASES = [
    # (description, edit to apply to GOOD, key the message must name)
    ("unknown top-level key", GOOD + "nod_id = 3\n", "nod_id"),
    ("unknown peer key", GOOD.replace("eligible = false", "elegible = false"), "peers[1].elegible"),
    ("wrong type", GOOD.replace("node_id = 1", 'node_id = "one"'), "node_id"),
    ("missing node_id", GOOD.replace("node_id = 1\n", ""), "node_id"),
    ("bad bind", GOOD.replace('"127.0.0.1:7401"', '"127.0.0.1"'), "bind"),
    ("port out of range", GOOD.replace("127.0.0.1:7402", "127.0.0.1:70000"), "peers[0].address"),
    ("hostname not IP", GOOD.replace("127.0.0.1:7402", "node-two:7402"), "peers[0].address"),
    ("duplicate id", GOOD.replace("id = 3", "id = 2"), "peers[1].id"),
    ("peer uses own id", GOOD.replace("id = 2", "id = 1"), "peers[0].id"),
    ("duplicate address", GOOD.replace("127.0.0.1:7403", "127.0.0.1:7402"), "peers[1].address"),
    ("unknown profile", GOOD + 'profile = "fast"\n', "profile"),
    ("bad timing", GOOD + "[timing]\nlease_timeout = 0.05\n", "timing."),
    ("unknown timing key", GOOD + "[timing]\nlease = 1\n", "timing.lease"),
    ("missing key file", GOOD.replace("cluster.key", "missing.key"), "cluster_key_file"),
    ("no key at all", GOOD.replace('cluster_key_file = "cluster.key"\n', ""), "cluster_key_file"),
    (
        "nobody eligible",
        GOOD.replace("node_id = 1", "node_id = 1\neligible = false").replace(
            "id = 2\naddress", "id = 2\neligible = false\naddress"
        ),
        "eligible",
    ),
    ("bad floating ip", GOOD + '[floating_ip]\naddress = "not-an-ip"\n', "floating_ip.address"),
    (
        "both ip sections",
        GOOD + '[floating_ip]\naddress = "203.0.113.10"\n[reserved_ip]\naddress = "203.0.113.10"\n',
        "reserved_ip",
    ),
    (
        "token over plain http",
        GOOD + '[digitalocean]\napi_url = "http://198.18.0.9:8080"\n',
        "digitalocean",
    ),
    (
        "health timeout",
        GOOD + '[health]\nhttp = "http://127.0.0.1:8080/"\n'
        "check_interval = 1.0\ncheck_timeout = 2.0\n",
        "health",
    ),
    ("unknown health key", GOOD + "[health]\nurl = 1\n", "health.url"),
    ("bad assigner value", GOOD + "[assigner]\nreconcile_interval = -1\n", "assigner"),
    ("not toml", "node_id = = 1\n", "--config"),
    (
        "eligible quorum required",
        GOOD.replace("id = 2\naddress", "id = 2\neligible = false\naddress")
        .replace("eligible = false\n\n", "eligible = true\n\n")
        .replace("node_id = 1", "node_id = 1\nrequire_eligible_quorum = true"),
        "require_eligible_quorum",
    ),
]


@pytest.mark.parametrize(("case", "text", "key"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_config_names_the_key(workdir: Path, case: str, text: str, key: str) -> None:
    with pytest.raises(config.ConfigError) as caught:
        config.load(write(workdir, text), env={})
    message = str(caught.value)
    assert key in message, f"{case}: {message!r} does not name {key!r}"
    assert "\n" not in message


def test_short_key_rejected_without_showing_it(workdir: Path) -> None:
    (workdir / "cluster.key").write_text("c2hvcnQ=\n")  # base64 of "short"
    with pytest.raises(config.ConfigError) as caught:
        config.load(write(workdir, GOOD), env={})
    assert "cluster_key_file" in str(caught.value)
    assert "c2hvcnQ" not in str(caught.value)


def test_environment_overrides_file(workdir: Path) -> None:
    env = {
        "FIP_SIDECAR_NODE_ID": "1",
        "FIP_SIDECAR_TIMING__PREEMPT": "false",
        "FIP_SIDECAR_STATUS_LISTEN": "127.0.0.1:9999",
        "FIP_SIDECAR_CLUSTER_KEY": generate_cluster_key(),
    }
    loaded = config.load(write(workdir, GOOD.replace("cluster.key", "absent.key")), env=env)
    assert loaded.timing.preempt is False
    assert loaded.status_listen.port == 9999


def test_unknown_environment_variable_is_named(workdir: Path) -> None:
    with pytest.raises(config.ConfigError) as caught:
        config.load(write(workdir, GOOD), env={"FIP_SIDECAR_NODEID": "2"})
    assert "nodeid" in str(caught.value)


def test_legacy_and_new_ip_section_names(workdir: Path) -> None:
    for section in ("floating_ip", "reserved_ip"):
        text = GOOD + f'[{section}]\naddress = "203.0.113.10"\ndroplet_id = 1001\n'
        loaded = config.load(write(workdir, text), env={})
        assert loaded.floating_ip is not None
        assert loaded.floating_ip.address == "203.0.113.10"


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_cli_exits_2_with_one_line(workdir: Path, command: str) -> None:
    path = write(workdir, GOOD + "nod_id = 3\n")
    result = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", command, "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nod_id" in lines[0], result.stderr


def test_check_config_ok(workdir: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sidecar.cli",
            "check-config",
            "--config",
            str(write(workdir, GOOD)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    assert "quorum 2" in result.stdout
