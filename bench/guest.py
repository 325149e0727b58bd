"""How long the droplet-side steps take, in droplet-shaped namespaces (root only).

Two figures, each over many trials (median, p99, max):

- one `fip-guest gained` / `lost` run, as a hook runs it (process start, netlink, and for
  IPv4 the two metadata lookups), for the reserved IPv6 and the IPv4 anchor route;
- the agent's reaction: from a scripted `/status` flipping "held" to the kernel showing the
  change (the /128 present or gone), polled every 5 ms, with `--interval` as given.

    sudo .venv/bin/python bench/guest.py --trials 50 --interval 1.0
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from chaos import netns
from chaos.guestnet import RESERVED_IPV6, GuestNet, fip_guest, guest_net

RESERVED_IPV4 = "203.0.113.10"
STATUS_PORT = 9401


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def _line(what: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (
        f"{what}: n={len(ms)} median {statistics.median(ms):.1f} ms, "
        f"p99 {_percentile(ms, 0.99):.1f} ms, max {max(ms):.1f} ms"
    )


def _step(net: GuestNet, host: netns.Host, verb: str, address: str) -> float:
    began = time.monotonic()
    done = subprocess.run(
        ["ip", "netns", "exec", host.ns, str(fip_guest()), verb, address,
         "--metadata-url", net.metadata_url],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    took = time.monotonic() - began
    if done.returncode != 0:
        raise SystemExit(f"fip-guest {verb} {address}: {done.stderr}")
    return took


def _status_file(directory: Path, held: bool) -> None:
    entry = {
        "reserved_ip": RESERVED_IPV6, "droplet_id": 1001, "leading": held,
        "holder_droplet_id": 1001 if held else 1002, "family": "ipv6",
    }  # fmt: skip
    temporary = directory / "status.tmp"
    temporary.write_text(json.dumps({"addresses": [entry]}))
    temporary.replace(directory / "status")  # served by http.server as /status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--interval", type=float, default=1.0, help="the agent's --interval")
    parser.add_argument("--max-seconds", type=float, default=900.0)
    args = parser.parse_args(argv)
    reason = netns.unavailable_reason()
    if reason is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.max_seconds
    with tempfile.TemporaryDirectory() as workdir, netns.lab(Path(workdir), "gb") as lab:
        d1, router = lab.add_host("d1", 1), lab.add_host("rt", 100)
        with guest_net(lab, router, [d1]) as net:
            runs: dict[str, list[float]] = {}
            for _ in range(args.trials):
                if time.monotonic() > deadline:
                    break
                for address in (RESERVED_IPV6, RESERVED_IPV4):
                    for verb in ("gained", "lost"):
                        runs.setdefault(f"{verb} {address}", []).append(
                            _step(net, d1, verb, address)
                        )
            for what, values in runs.items():
                print(_line(f"fip-guest {what}", values))

            served = Path(workdir) / "status-root"
            served.mkdir()
            _status_file(served, held=False)
            lab.spawn(
                d1, "status",
                [sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                 "--directory", str(served), str(STATUS_PORT)],
            )  # fmt: skip
            agent = lab.spawn(
                d1, "agent",
                [str(fip_guest()), "agent", "--status-url", f"http://127.0.0.1:{STATUS_PORT}",
                 "--interval", str(args.interval), "--metadata-url", net.metadata_url],
            )  # fmt: skip
            time.sleep(2 * args.interval + 1)
            reactions: list[float] = []
            held = False
            for _ in range(args.trials):
                if time.monotonic() > deadline or not agent.running():
                    break
                held = not held
                # At a random point of the agent's cycle: flipping right after it was seen
                # to act would always wait one whole interval.
                time.sleep(random.uniform(0, args.interval))
                began = time.monotonic()
                _status_file(served, held)
                limit = began + 10 * args.interval + 5
                while (RESERVED_IPV6 in net.addresses(d1)) != held:
                    if time.monotonic() > limit:
                        raise SystemExit(f"the agent did not follow (see {agent.log_path})")
                    time.sleep(0.005)
                reactions.append(time.monotonic() - began)
            print(_line(f"agent reaction (--interval {args.interval})", reactions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
