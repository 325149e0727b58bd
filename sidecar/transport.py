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
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


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
        sockets = cls(_bound(family, bind), addresses=dict(peers))
        try:
            for peer_id, address in peers.items():
                try:
                    sock = _bound(family, bind)
                except OSError as exc:  # no SO_REUSEPORT here: share the catch-all socket
                    log.warning("per-peer sockets unavailable", extra={"error": str(exc)})
                    break
                sockets.peers[peer_id] = sock
                sock.connect(address)
        except OSError:
            sockets.close()
            raise
        return sockets

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


def _bound(family: int, bind: tuple[str, int], *, reuse_port: bool = True) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(bind)
    except OSError:
        sock.close()
        raise
    return sock
