#!/usr/bin/python3
"""`docker` on a rehearsal droplet: the few verbs cloud-init and fip-sidecar-apply use.

The rehearsal runs real processes, not containers, but the deployment's scripts speak
Docker (`docker run --restart unless-stopped ...` detached or in the foreground of a unit,
`docker container inspect`, `docker kill --signal HUP`, `docker restart`, `docker rm -f`).
This stand-in gives those verbs Docker's meaning for one machine: an image name maps to a
command (`images.json`, written by the test); a detached "container" is a supervisor process
that runs it as the image's user and restarts it when it exits (`--restart unless-stopped`,
Docker's doubling back-off from 100 ms); a foreground one becomes the command itself (the
unit's main process); `kill`, `restart`, `stop` and `rm` act on its main process. Every verb
is appended to the container's `events` file, so the test can say what a script did.

Standard library only: it runs on the droplet's own python3. State lives in
/usr/local/lib/docker-shim/containers/NAME/ (main.pid, supervisor.pid, events, log).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HOME = Path("/usr/local/lib/docker-shim")
IMAGES = HOME / "images.json"
CONTAINERS = HOME / "containers"
VALUE_OPTIONS = {
    "--name", "--network", "--restart", "--tmpfs", "--cap-drop", "--cap-add",
    "--security-opt", "--volume", "-v", "--env", "-e", "--user", "-u", "--publish", "-p",
}  # fmt: skip
FLAG_OPTIONS = {"--detach", "-d", "--read-only", "--rm", "--init", "--force", "-f"}
STOP_TIMEOUT = 10.0
MAX_LIFETIME = 3600.0
MAX_RESTARTS = 200


def fail(message: str, status: int = 1) -> int:
    print(f"docker (rehearsal stand-in): {message}", file=sys.stderr)
    return status


def note(container: Path, event: str) -> None:
    with (container / "events").open("a") as events:
        events.write(f"{time.monotonic():.3f} {event}\n")


def pid_in(path: Path) -> int | None:
    try:
        pid = int(path.read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def alive(container: Path) -> bool:
    return pid_in(container / "supervisor.pid") is not None


def run(argv: list[str]) -> int:
    options: dict[str, str] = {}
    detach = False
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        option, _, inline = argv[i].partition("=")
        if option in FLAG_OPTIONS:
            detach = detach or option in ("--detach", "-d")
            i += 1
        elif option in VALUE_OPTIONS:
            options[option] = inline if inline else argv[i + 1]
            i += 1 if inline else 2
        else:
            return fail(f"run: unsupported option {option}")
    if i >= len(argv):
        return fail("run: no image given")
    image, command = argv[i], argv[i + 1 :]
    images = json.loads(IMAGES.read_text())
    if image not in images:
        return fail(f"Unable to find image '{image}' locally", 125)
    name = options.get("--name") or f"container-{os.getpid()}"
    container = CONTAINERS / name
    if container.exists() and alive(container):
        return fail(f'Conflict. The container name "/{name}" is already in use.', 125)
    container.mkdir(parents=True, exist_ok=True)
    for stale in ("stopped", "restart", "main.pid"):
        (container / stale).unlink(missing_ok=True)
    spec = dict(images[image])
    if command:
        spec["argv"] = spec["entrypoint"] + command
    else:
        spec["argv"] = spec["entrypoint"] + spec.get("cmd", [])
    spec["restart"] = options.get("--restart", "no")
    (container / "spec.json").write_text(json.dumps(spec))
    note(container, f"run {image}")
    if not detach:
        return foreground(container, spec)
    subprocess.Popen(
        [sys.executable, __file__, "_supervise", name],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    if not wait_for(lambda: pid_in(container / "main.pid") is not None, 20.0):
        return fail(f"{name}: did not start")
    print(f"{name}-rehearsal-container")
    return 0


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def credentials(spec: dict[str, Any]) -> tuple[int | None, int | None]:
    user = spec.get("user")
    if not user:
        return None, None
    uid, gid = (int(part) for part in user.split(":"))
    return uid, gid


def foreground(container: Path, spec: dict[str, Any]) -> int:
    """`docker run` without --detach: the container's process takes this one's place (a
    systemd unit's main process), so its output and exit status are the unit's."""
    pid = str(os.getpid())
    (container / "supervisor.pid").write_text(pid)
    (container / "main.pid").write_text(pid)
    note(container, f"start {pid}")
    uid, gid = credentials(spec)
    if gid is not None and uid is not None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    os.chdir("/")
    os.execve(spec["argv"][0], spec["argv"], spec.get("env", {}))


def remove(container: Path) -> None:
    """`docker rm --force`: kill the container's processes and forget it."""
    (container / "stopped").touch()
    for name in ("main.pid", "supervisor.pid"):
        pid = pid_in(container / name)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
    note(container, "rm")
    for entry in ("main.pid", "supervisor.pid", "spec.json", "stopped", "restart"):
        (container / entry).unlink(missing_ok=True)


def supervise(name: str) -> int:
    """The container: run its command, restart it per its policy, until stopped."""
    container = CONTAINERS / name
    (container / "supervisor.pid").write_text(str(os.getpid()))
    spec = json.loads((container / "spec.json").read_text())
    uid, gid = credentials(spec)
    delay, deadline = 0.1, time.monotonic() + MAX_LIFETIME
    for _ in range(MAX_RESTARTS):
        started = time.monotonic()
        with (container / "log").open("ab") as log:
            child = subprocess.Popen(
                spec["argv"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=spec.get("env", {}),
                cwd="/",
                user=uid,
                group=gid,
                extra_groups=[] if uid is not None else None,
            )
        (container / "main.pid").write_text(str(child.pid))
        note(container, f"start {child.pid}")
        returncode = child.wait()
        note(container, f"exit {returncode}")
        if (container / "stopped").exists() or time.monotonic() > deadline:
            break
        if (container / "restart").exists():
            (container / "restart").unlink()
            continue
        if spec["restart"] not in ("always", "unless-stopped") and not (
            spec["restart"] == "on-failure" and returncode != 0
        ):
            break
        delay = 0.1 if time.monotonic() - started > 10.0 else min(delay * 2, 60.0)
        time.sleep(delay)
    (container / "main.pid").unlink(missing_ok=True)
    (container / "supervisor.pid").unlink(missing_ok=True)
    return 0


def signal_main(container: Path, signum: int) -> bool:
    pid = pid_in(container / "main.pid")
    if pid is None:
        return False
    os.kill(pid, signum)
    return True


def stop(container: Path, *, restart: bool) -> None:
    """Docker's stop: SIGTERM, then SIGKILL after STOP_TIMEOUT."""
    (container / ("restart" if restart else "stopped")).touch()
    pid = pid_in(container / "main.pid")
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    if not wait_for(lambda: pid_in(container / "main.pid") != pid, STOP_TIMEOUT):
        os.kill(pid, signal.SIGKILL)


def signal_number(value: str) -> int:
    name = value.upper().removeprefix("SIG")
    return int(name) if name.isdigit() else int(signal.Signals["SIG" + name])


def main(argv: list[str]) -> int:
    if not argv:
        return fail("no command")
    verb, rest = argv[0], argv[1:]
    if verb == "_supervise":
        return supervise(rest[0])
    if verb == "container" and rest[:1] == ["inspect"]:
        verb, rest = "inspect", rest[1:]
    if verb == "run":
        return run(rest)
    if verb == "exec" and len(rest) == 4 and rest[1] == "kill" and rest[3] == "1":
        # `docker exec NAME kill -HUP 1`: PID 1 of the container is its main process.
        verb, rest = "kill", ["--signal", rest[2].lstrip("-"), rest[0]]
    signum: int = signal.SIGKILL
    names: list[str] = []
    i = 0
    while i < len(rest):
        option, _, inline = rest[i].partition("=")
        if verb == "kill" and option in ("-s", "--signal"):
            signum = signal_number(inline or rest[i + 1])
            i += 1 if inline else 2
            continue
        if not option.startswith("-"):
            names.append(rest[i])
        i += 1
    if len(names) != 1:
        return fail(f"{verb}: expected one container name, got {names}")
    container = CONTAINERS / names[0]
    if not container.exists() or not alive(container):
        return fail(f"No such container: {names[0]}")
    if verb == "rm":
        remove(container)
        print(names[0])
        return 0
    if verb == "inspect":
        print(json.dumps([{"Name": "/" + names[0], "State": {"Running": True}}]))
        return 0
    if verb == "kill":
        note(container, f"kill {signal.Signals(signum).name}")
        if signum in (signal.SIGKILL, signal.SIGTERM):
            (container / "stopped").touch()  # Docker counts it as a manual stop
        return 0 if signal_main(container, signum) else fail(f"{names[0]} is not running")
    if verb in ("restart", "stop"):
        note(container, verb)
        old = pid_in(container / "main.pid")
        stop(container, restart=verb == "restart")
        if verb == "restart" and not wait_for(
            lambda: pid_in(container / "main.pid") not in (None, old), STOP_TIMEOUT + 10.0
        ):
            return fail(f"{names[0]}: did not restart")
        print(names[0])
        return 0
    return fail(f"unsupported command: docker {' '.join(argv)}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
