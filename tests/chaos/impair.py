"""Userspace netem: relay Ethernet frames between two interfaces with delay, jitter and loss.

Why this exists: the CI kernel is built without `sch_netem` (`tc qdisc add ... netem`
answers "Specified qdisc kind is unknown"), so delay and jitter cannot come from tc. The
lab unplugs a host's switch port from the bridge and runs this relay between that port and
a fresh veth whose other end is plugged into the bridge; every frame the host sends (and,
with `--direction both`, every frame it receives) waits `delay +- jitter` seconds (uniform,
like netem's default) and is dropped with probability `loss`. Frames may be reordered,
as with netem jitter.

Standalone on purpose (stdlib only, run by path inside the switch namespace), and bounded:
it exits after `--max-seconds` even if nobody stops it.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
import select
import signal
import socket
import struct
import sys
import time

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4  # frames this socket (or another on the same interface) sent
READ_BATCH = 64
MAX_FRAME = 65535


def _ones_complement_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def with_l4_checksum(frame: bytes) -> bytes:
    """Fill in the UDP/TCP checksum of an IPv4 frame.

    A veth hands frames over with checksum offload pending (CHECKSUM_PARTIAL): the bytes a
    packet socket reads carry only the pseudo-header sum. Re-sent as they are, the receiver
    would drop them as corrupt, so the relay finishes the checksum as a NIC would.
    """
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return frame
    ihl = (frame[14] & 0x0F) * 4
    total_length = int.from_bytes(frame[16:18], "big")
    fragment = int.from_bytes(frame[20:22], "big") & 0x3FFF
    protocol = frame[23]
    start, end = 14 + ihl, 14 + total_length
    offsets = {17: 6, 6: 16}
    if fragment or protocol not in offsets or end > len(frame) or end - start < 8:
        return frame
    at = start + offsets[protocol]
    data = bytearray(frame)
    data[at : at + 2] = b"\0\0"
    pseudo = frame[26:34] + bytes([0, protocol]) + (end - start).to_bytes(2, "big")
    checksum = 0xFFFF - _ones_complement_sum(pseudo + bytes(data[start:end]))
    if protocol == 17 and checksum == 0:
        checksum = 0xFFFF
    data[at : at + 2] = checksum.to_bytes(2, "big")
    return bytes(data)


def open_port(ifname: str) -> socket.socket:
    port = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    port.bind((ifname, 0))
    port.setblocking(False)
    return port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host-port", required=True, help="interface towards the host")
    parser.add_argument("--switch-port", required=True, help="interface towards the bridge")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds")
    parser.add_argument("--jitter", type=float, default=0.0, help="seconds, uniform +-")
    parser.add_argument("--loss", type=float, default=0.0, help="probability 0..1")
    parser.add_argument(
        "--direction",
        choices=["out", "in", "both"],
        default="out",
        help="impair what the host sends (out, like netem on its interface), receives, or both",
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--max-seconds", type=float, default=3600.0)
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    host = open_port(args.host_port)
    switch = open_port(args.switch_port)
    forward_to = {host.fileno(): switch, switch.fileno(): host}
    impaired = {
        host.fileno(): args.direction in ("out", "both"),
        switch.fileno(): args.direction in ("in", "both"),
    }
    queue: list[tuple[float, int, socket.socket, bytes]] = []
    order = itertools.count()
    stopping = False
    counts = {"relayed": 0, "dropped": 0, "send_errors": 0}

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # Sockets are open: the lab now unplugs the host's port from the bridge and says "go",
    # so the host is never cut off for as long as this interpreter took to start.
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    deadline = time.monotonic() + args.max_seconds
    while not stopping and time.monotonic() < deadline:
        now = time.monotonic()
        wait = min(0.5, max(0.0, queue[0][0] - now)) if queue else 0.5
        try:
            readable, _, _ = select.select([host, switch], [], [], wait)
        except InterruptedError:
            continue
        for port in readable:
            for _ in range(READ_BATCH):
                try:
                    frame, address = port.recvfrom(MAX_FRAME)
                except BlockingIOError:
                    break
                if address[2] == PACKET_OUTGOING:
                    continue
                delay = 0.0
                if impaired[port.fileno()]:
                    if rng.random() < args.loss:
                        counts["dropped"] += 1
                        continue
                    delay = max(0.0, args.delay + rng.uniform(-args.jitter, args.jitter))
                due = time.monotonic() + delay
                out = forward_to[port.fileno()]
                heapq.heappush(queue, (due, next(order), out, with_l4_checksum(frame)))
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, out, frame = heapq.heappop(queue)
            try:
                out.send(frame)
                counts["relayed"] += 1
            except OSError:
                counts["send_errors"] += 1
    print(" ".join(f"{k}={v}" for k, v in counts.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
