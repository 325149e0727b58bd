"""A paced UDP flood from a lab host: pre-built packets, sent round-robin at a fixed rate.

Why a separate process: the test process keeps polling `/status` during the flood, and a
sender sharing its interpreter (and GIL) would slow both. Stdlib only, run by path inside
the attacker's namespace (`ip netns exec`), like `impair.py`.

Input (a JSON file): `{"packets": [[host, port, base64 payload], ...]}`. The packets are
sent in order, cycling through the list, so the caller labels each entry with the drop
reason it expects and multiplies by the per-entry counts printed at the end.

Bounded twice: at most `rate * seconds` packets, and never past `seconds` of wall time
(an overloaded machine sends fewer, and the printed rate says so). Prints one JSON object:
`{"sent": [per-entry counts], "errors": n, "seconds": elapsed, "rate": achieved pps,
"max_burst": most packets sent back to back after the pacer fell behind}`.
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import sys
import time

#: How long the pacer sleeps when it is ahead of schedule (the kernel rounds it up a bit).
PACE_SLEEP = 0.0005


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--packets", required=True, help="JSON file of [host, port, base64]")
    parser.add_argument("--rate", type=float, required=True, help="packets per second")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--bind", default="0.0.0.0", help="source address")
    args = parser.parse_args(argv)

    with open(args.packets, encoding="utf-8") as file:
        entries = json.load(file)["packets"]
    targets = [(str(host), int(port)) for host, port, _ in entries]
    payloads = [base64.b64decode(data) for _, _, data in entries]
    count = len(payloads)
    limit = int(args.rate * args.seconds)
    sent = [0] * count
    errors = 0
    max_burst = 0

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.settimeout(1.0)  # a blocked sendto must not outlive the deadline by much
    sock.bind((args.bind, 0))
    sendto = sock.sendto

    start = time.monotonic()
    deadline = start + args.seconds
    total = 0
    now = start
    while total < limit and now < deadline:
        due = min(limit, int((now - start) * args.rate) + 1)
        max_burst = max(max_burst, due - total)
        while total < due:
            index = total % count
            try:
                sendto(payloads[index], targets[index])
                sent[index] += 1
            except OSError:
                errors += 1
            total += 1
        time.sleep(PACE_SLEEP)
        now = time.monotonic()
    elapsed = time.monotonic() - start
    sock.close()
    delivered = sum(sent)
    json.dump(
        {
            "sent": sent,
            "errors": errors,
            "seconds": elapsed,
            "rate": delivered / elapsed,
            "max_burst": max_burst,
        },
        sys.stdout,
    )
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
