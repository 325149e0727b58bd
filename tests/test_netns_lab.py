"""The namespace lab cleans up after itself however its process is stopped.

Benchmarks and chaos runs are often stopped from outside (`timeout`, a CI runner, an
operator's `kill`): SIGTERM's default action ends the process without running a single
`finally`, which left a lab's namespaces and every node and emulator in them running
(seen with `bench/compare.py`). This runs a real lab in a child process and stops it so.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from chaos import netns

CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from chaos import netns
    with netns.lab(Path(sys.argv[1]), tag="t") as lab:
        sleeper = lab.spawn(lab.add_host("h1", 1), "sleeper", ["sleep", "60"])
        print(lab.prefix, sleeper.pid, flush=True)
        time.sleep(60)
    """
)


@pytest.mark.skipif(netns.unavailable_reason() is not None, reason="no network namespaces")
def test_sigterm_tears_the_lab_down(tmp_path: Path) -> None:
    tests_dir = Path(__file__).resolve().parent
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), str(tests_dir)],
        stdout=subprocess.PIPE,
        text=True,
    )
    prefix, sleeper = "", 0
    try:
        assert child.stdout is not None
        prefix, pid_text = child.stdout.readline().split()
        sleeper = int(pid_text)
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == 128 + signal.SIGTERM
        assert [ns for ns in netns.list_namespaces() if ns.startswith(prefix)] == []
        with pytest.raises(ProcessLookupError):
            os.kill(sleeper, 0)  # killed and reaped by the lab, not left running
    finally:  # on failure, undo what the child left behind
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
        if sleeper:
            with contextlib.suppress(ProcessLookupError):
                os.kill(sleeper, signal.SIGKILL)
        for ns in netns.list_namespaces():
            if prefix and ns.startswith(prefix):
                netns.run(["ip", "netns", "del", ns], check=False)
