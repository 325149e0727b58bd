"""Per-peer connected sockets keep a peer's packets apart from a stranger's flood."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from sidecar import transport
from sidecar.transport import ElectionSockets


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def pair() -> Iterator[tuple[ElectionSockets, ElectionSockets]]:
    a_port, b_port = free_udp_port(), free_udp_port()
    a = ElectionSockets.open(("127.0.0.1", a_port), {2: ("127.0.0.1", b_port)})
    b = ElectionSockets.open(("127.0.0.1", b_port), {1: ("127.0.0.1", a_port)})
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def receive(sock: socket.socket) -> bytes | None:
    try:
        return sock.recv(2048)
    except BlockingIOError:
        return None


def test_a_peer_lands_on_its_own_socket_and_a_stranger_on_the_catch_all(
    pair: tuple[ElectionSockets, ElectionSockets],
) -> None:
    a, b = pair
    b.send(1, b"from b")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
        stranger.sendto(b"from a stranger", a.catch_all.getsockname())
        a.peers[2].settimeout(5)
        a.catch_all.settimeout(5)
        assert a.peers[2].recv(2048) == b"from b"
        assert a.catch_all.recv(2048) == b"from a stranger"


def test_a_flooded_catch_all_buffer_does_not_drop_a_peers_packets(
    pair: tuple[ElectionSockets, ElectionSockets],
) -> None:
    a, b = pair
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
        stranger.setblocking(False)
        for _ in range(20_000):  # far more than a default receive buffer holds
            try:
                stranger.sendto(b"x" * 400, a.catch_all.getsockname())
            except BlockingIOError:
                break
    for n in range(50):
        b.send(1, f"heartbeat {n}".encode())
    a.peers[2].settimeout(5)
    got = [a.peers[2].recv(2048) for _ in range(50)]
    assert got == [f"heartbeat {n}".encode() for n in range(50)]
    assert receive(a.catch_all) == b"x" * 400  # the flood is there, in its own buffer


def test_every_datagram_comes_with_the_kernels_arrival_stamp(
    pair: tuple[ElectionSockets, ElectionSockets],
) -> None:
    """A packet that waits for the next wake-up still says when it came (for round trips):
    the stamp lies between the send and the read, however long it sat in the buffer."""
    a, b = pair
    before = time.time()
    a.send(2, b"stamped")
    time.sleep(0.2)  # it waits, as an ack waits for the leader's next heartbeat
    datagram = transport.receive(b.peers[1], 2048)
    after = time.time()
    assert datagram.data == b"stamped"
    assert datagram.source == a.bind
    assert datagram.arrived is not None
    assert before - 0.001 <= datagram.arrived <= after - 0.15, (before, datagram, after)
    assert datagram.drops is None  # nothing dropped yet
    with pytest.raises(BlockingIOError):
        transport.receive(b.peers[1], 2048)


def test_a_full_buffer_says_how_many_it_dropped(
    pair: tuple[ElectionSockets, ElectionSockets],
) -> None:
    """A datagram that finds its socket's buffer full is dropped by the kernel; the next one
    read says how many went (SO_RXQ_OVFL), so the node counts them as receive_buffer_full."""
    a, b = pair
    sock = b.peers[1]
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel's minimum, ~2 KiB
    for _ in range(200):
        a.send(2, b"y" * 400)
    first = transport.receive(sock, 2048)
    read = 1
    while True:
        try:
            transport.receive(sock, 2048)
        except BlockingIOError:
            break
        read += 1
    a.send(2, b"after")
    last = transport.receive(sock, 2048)
    assert last.data == b"after"
    assert last.drops is not None and last.drops > 0
    assert last.drops == 200 - read, (first.drops, last.drops, read)
