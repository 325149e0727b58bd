"""Running user-supplied commands (health checks and notify hooks) safely and boundedly.

Both kinds of command are written by the operator and may misbehave: hang, spawn children,
print megabytes, or log their environment. Everything here exists to contain that: a new
session per child so the whole group can be killed, output drained but capped, and an
environment without the sidecar's secrets.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import trio

#: The longest one-line summary of a command's output used in reasons and log fields.
SUMMARY_LIMIT = 120


#: Environment variable names never passed to a child. Health commands and hooks need
#: the FIP_* facts and ordinary variables (PATH, HOME, LANG ...), never the sidecar's
#: DigitalOcean token or cluster key: a child that logs its environment, or a hook
#: script taken over by someone else, must not be able to move the IP or forge packets.
SECRET_NAME_PATTERN = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)


def sanitized_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` without DIGITALOCEAN_TOKEN and anything named like a secret."""
    return {
        name: value
        for name, value in environ.items()
        if name != "DIGITALOCEAN_TOKEN" and not SECRET_NAME_PATTERN.search(name)
    }


@dataclass(frozen=True)
class ProcessOutcome:
    """How a bounded child process ended."""

    returncode: int  # negative: killed by that signal
    output: bytes  # the first `output_limit` bytes of stdout and stderr, interleaved
    output_bytes: int  # how many bytes it wrote in all
    timed_out: bool  # it ran past `time_limit` and its process group was killed


def kill_process_group(process: trio.Process) -> None:
    """SIGKILL the child's whole process group, not just the child.

    A shell script's own children would otherwise outlive it, keep our output pipe open
    and leak. The group id is the child's pid because it starts a new session; the
    kernel keeps that id reserved while any member of the group is alive.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


async def run_process_group(
    argv: Sequence[str],
    *,
    time_limit: float,
    env: Mapping[str, str],
    output_limit: int,
) -> ProcessOutcome:
    """Run `argv` in its own session, with stdin closed, for at most `time_limit` seconds.

    Output is drained to EOF but only the first `output_limit` bytes are kept, so a
    chatty child can neither block on a full pipe nor fill our memory. The run ends
    when the output reaches EOF and the child has exited. If that has not happened by
    the timeout (or the caller is cancelled), the child's whole process group is
    SIGKILLed: that also covers a child that exited while a descendant it left behind
    still holds the output pipe. Raises OSError when the program cannot be started.
    """
    process = await trio.lowlevel.open_process(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=dict(env),
    )
    assert process.stdout is not None
    kept = bytearray()
    total = 0
    finished = False
    try:
        with trio.move_on_after(time_limit):
            async for chunk in process.stdout:
                total += len(chunk)
                room = output_limit - len(kept)
                if room > 0:
                    kept += chunk[:room]
            await process.wait()
            finished = True
    finally:
        if not finished:
            kill_process_group(process)
        with trio.CancelScope(shield=True):
            await process.wait()  # reaps it; prompt after SIGKILL
            await process.stdout.aclose()
    assert process.returncode is not None  # waited for above
    return ProcessOutcome(
        returncode=process.returncode,
        output=bytes(kept),
        output_bytes=total,
        timed_out=not finished,
    )


def summarize_output(output: bytes, limit: int = SUMMARY_LIMIT) -> str:
    """A command's output squeezed onto one short line for a reason or a log field."""
    text = output.decode("utf-8", errors="replace")
    line = re.sub(r"\s+", " ", text).strip()
    return line if len(line) <= limit else line[: limit - 3] + "..."
