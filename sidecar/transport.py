"""The election's UDP sockets: one per peer, plus one for everything else.

Every socket is bound to the same election address (SO_REUSEPORT). Each peer's socket is
also *connected* to that peer, and Linux delivers a datagram to the socket whose connected
address matches its source before any unconnected one. So a flood from strangers fills
only the catch-all socket's receive buffer, and a peer's heartbeats keep their own buffer
and their own turn in the scheduler: measured here, a 10,000 packet/s flood through one
shared socket overflowed its buffer and cost a starved leader its lease. Packets from a
peer behind NAT (source port rewritten) simply arrive on the catch-all socket.

SO_REUSEPORT would also let a second process of the same user share the port silently
(a second `fip-sidecar run` with the same config, speaking as the same node id), so
`open()` first binds the address once *without* it: that fails with EADDRINUSE if any
socket holds the port, and the process refuses to start (`BindError`).

Every socket asks the kernel to stamp each datagram with its arrival (SO_TIMESTAMPNS):
a packet that is not urgent waits in its buffer for the node's next wake-up (see
`Election.wake_on`), and the stamp still tells when it came, for round trips. And with
SO_RXQ_OVFL each datagram says how many the socket had dropped for a full buffer, so
those are counted too (a flood now mostly ends there, between two wake-ups).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

log = logging.getLogger(__name__)

#: Linux's SO_TIMESTAMPNS (and SCM_TIMESTAMPNS, the same number) and SO_RXQ_OVFL on every
#: architecture Python's wheels are built for; Python's socket module names neither.
_SO_TIMESTAMPNS = 35
_SO_RXQ_OVFL = 40
_TIMESPEC = struct.Struct("@ll")
_DROPS = struct.Struct("@I")
_ANCILLARY_SIZE = socket.CMSG_SPACE(_TIMESPEC.size) + socket.CMSG_SPACE(_DROPS.size)


class BindError(OSError):
    """The election address (config key `bind`) cannot be bound; the message names it."""

    def __str__(self) -> str:
        return str(self.strerror)


def bind_problem(exc: OSError) -> str:
    """Why a bind failed, in words an operator acts on (the caller adds the address)."""
    match exc.errno:
        case errno.EADDRINUSE:
            return "is already in use"
        case errno.EADDRNOTAVAIL:
            return "is not an address of this machine"
        case errno.EACCES:
            return "needs privileges (a port below 1024 needs CAP_NET_BIND_SERVICE)"
    return f"cannot be bound: {exc.strerror or exc}"


def _show(bind: tuple[str, int]) -> str:
    return f"[{bind[0]}]:{bind[1]}" if ":" in bind[0] else f"{bind[0]}:{bind[1]}"


@dataclass
class ElectionSockets:
    """The catch-all socket and the per-peer connected sockets, all non-blocking."""

    catch_all: socket.socket
    peers: dict[int, socket.socket] = field(default_factory=dict)
    addresses: dict[int, tuple[str, int]] = field(default_factory=dict)

    bind: tuple[str, int] = ("", 0)

    @classmethod
    def open(cls, bind: tuple[str, int], peers: Mapping[int, tuple[str, int]]) -> ElectionSockets:
        family = socket.AF_INET6 if ":" in bind[0] else socket.AF_INET
        try:
            _bound(family, bind, reuse_port=False).close()  # is anyone else on this port?
        except OSError as exc:
            hint = (
                " (is another fip-sidecar running with this config?)"
                if exc.errno == errno.EADDRINUSE
                else ""
            )
            raise BindError(exc.errno, f"bind: {_show(bind)} {bind_problem(exc)}{hint}") from None
        sockets = cls(_bound(family, bind), bind=bind)
        try:
            sockets.update(peers)
        except OSError:
            sockets.close()
            raise
        return sockets

    def update(
        self, peers: Mapping[int, tuple[str, int]]
    ) -> tuple[list[socket.socket], list[socket.socket]]:
        """Follow a new peer list (a reload): reconnect moved peers, open sockets for new
        ones, drop those of removed ones. Returns (opened, dropped); the caller closes the
        dropped ones once nothing waits on them."""
        opened: list[socket.socket] = []
        closed: list[socket.socket] = []
        for peer_id in set(self.peers) - set(peers):
            sock = self.peers.pop(peer_id)
            closed.append(sock)
        for peer_id in set(self.addresses) - set(peers):
            del self.addresses[peer_id]
        family = self.catch_all.family
        for peer_id, address in peers.items():
            self.addresses[peer_id] = address
            if peer_id not in self.peers:
                try:
                    self.peers[peer_id] = _bound(family, self.bind)
                except OSError as exc:  # no SO_REUSEPORT here: share the catch-all socket
                    log.warning("per-peer sockets unavailable", extra={"error": str(exc)})
                    continue
                opened.append(self.peers[peer_id])
            self.peers[peer_id].connect(
                address
            )  # reconnecting a UDP socket just moves it to the new peer
        return opened, closed

    def peer_of(self, sock: socket.socket) -> int | None:
        """The peer a connected socket belongs to (None for the catch-all)."""
        return next((p for p, s in self.peers.items() if s is sock), None)

    def peer_at(self, source: object) -> int | None:
        """The peer whose configured address `source` (a recvfrom address) is, if any."""
        if not isinstance(source, tuple):
            return None
        return next((p for p, a in self.addresses.items() if a == tuple(source[:2])), None)

    def readable(self) -> list[socket.socket]:
        return [self.catch_all, *self.peers.values()]

    def send(self, peer_id: int, data: bytes) -> None:
        """Send now or raise OSError (a full buffer is a lost datagram, never a wait)."""
        sock = self.peers.get(peer_id)
        if sock is not None:
            sock.send(data)
        else:
            self.catch_all.sendto(data, self.addresses[peer_id])

    def close(self) -> None:
        for sock in self.readable():
            with contextlib.suppress(OSError):
                sock.close()


class Datagram(NamedTuple):
    data: bytes
    source: object
    #: When it arrived, by the wall clock (None if the kernel did not stamp it).
    arrived: float | None
    #: How many datagrams the socket had dropped for a full buffer before this one, as a
    #: 32-bit count that wraps (None when it had dropped none yet).
    drops: int | None


def receive(sock: socket.socket, size: int) -> Datagram:
    """One datagram of at most `size` bytes. Raises BlockingIOError when none waits."""
    data, ancillary, _flags, source = sock.recvmsg(size, _ANCILLARY_SIZE)
    arrived = drops = None
    for level, kind, payload in ancillary:
        if level != socket.SOL_SOCKET:
            continue
        if kind == _SO_TIMESTAMPNS and len(payload) >= _TIMESPEC.size:
            seconds, nanoseconds = _TIMESPEC.unpack_from(payload)
            arrived = seconds + nanoseconds * 1e-9
        elif kind == _SO_RXQ_OVFL and len(payload) >= _DROPS.size:
            (drops,) = _DROPS.unpack_from(payload)
    return Datagram(data, source, arrived, drops)


def _bound(family: int, bind: tuple[str, int], *, reuse_port: bool = True) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if sys.platform == "linux":
            sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
            sock.setsockopt(socket.SOL_SOCKET, _SO_RXQ_OVFL, 1)
        sock.bind(bind)
    except OSError:
        sock.close()
        raise
    return sock
