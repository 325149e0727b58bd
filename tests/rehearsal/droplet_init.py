#!/usr/bin/python3
"""PID 1 of a rehearsal droplet: mount its filesystem layers, say `ready`, then reap.

Started by `unshare --mount --pid --fork --kill-child --mount-proc` inside the droplet's
network namespace, so the droplet has its own mounts and process tree: overlays put the
files cloud-init wrote over /etc and /usr/local (the host's own stay untouched), and when
this process ends, the kernel ends every process of the droplet with it. That is how a
destroyed droplet takes its sidecar and web service along, and how cleanup leaves nothing.

argv[1] is JSON: {"overlays": [{"target", "upper", "work"}, ...], "max_seconds": N}.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time


def main() -> int:
    config = json.loads(sys.argv[1])
    for layer in config["overlays"]:
        options = f"lowerdir={layer['target']},upperdir={layer['upper']},workdir={layer['work']}"
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, layer["target"]], check=True
        )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("ready", flush=True)
    deadline = time.monotonic() + float(config["max_seconds"])
    while time.monotonic() < deadline:
        try:
            reaped, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            reaped = 0
        if reaped == 0:
            time.sleep(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
