"""The wire codec: authenticated, replay-protected envelopes around election messages.

A packet is::

    b"FIP1" | msgpack(Envelope) | HMAC-SHA256(cluster key, b"FIP1" + body)   (32 bytes)

and never longer than `MAX_PACKET_SIZE` bytes, so it always fits in one UDP datagram
without IP fragmentation.

This module is sans-IO: no sockets, no clock reads and no trio. The caller passes the wall
clock in (`wall_now`, seconds since the epoch, i.e. `time.time()`), which keeps every rule
here testable with plain numbers.

Why the checks run in the order they do (`Codec.decode`):

* Size and magic first: they are free, and they reject stray traffic (port scans, another
  protocol on the same port) before any cryptography is spent on it.
* The MAC is checked (in constant time) *before anything in the body is parsed*. Only
  holders of the cluster key can make a packet that reaches the msgpack parser, so a
  parser bug or a pathological body can only be triggered by a cluster member, never by
  anyone who can merely send UDP to the port.
* Addressing, freshness and replay come last, and the replay window is only updated once
  every other check has passed, so a packet that is dropped for any other reason cannot
  burn a counter that a genuine packet will need later.

Replay protection, and what it does not cover:

* Every envelope carries the sender's `incarnation` (the wall clock in nanoseconds when
  that process started, so it grows across restarts without any state on disk) and a
  per-receiver `counter` that starts at 1 for every incarnation.
* A receiver keeps, per sender, the newest incarnation it has seen, the highest counter and
  a 64-entry sliding bitmap below it. Each counter is accepted at most once; modest
  reordering (up to 63 packets) is accepted; anything older is dropped as a replay.
* `sent_at` bounds how long a captured packet is useful at all: a packet whose `sent_at` is
  more than `max_clock_skew` away from the receiver's clock is `stale`. This is also what
  lets replay state be forgotten safely (see `_Window.admits_incarnation`).
* Residual window: a receiver that restarts forgets its replay state. A packet addressed to
  it that was captured within the last `max_clock_skew` seconds can then be replayed to the
  new process once (its window then refuses the repeat). Closing this would need the
  receiver's incarnation in every packet, i.e. a handshake after each restart. A smaller
  `max_clock_skew` shrinks that window; clocks kept in sync by NTP allow a few seconds.
  The election tolerates this: a restarted node casts no vote for one lease timeout, and
  a replayed heartbeat only repeats what a live peer said moments before.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import secrets
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated

import msgspec

from sidecar.messages import Message

__all__ = [
    "MAGIC",
    "MAX_PACKET_SIZE",
    "MESSAGE_TYPES",
    "MIN_KEY_BYTES",
    "PROTOCOL_VERSION",
    "REPLAY_WINDOW",
    "TAG_SIZE",
    "Codec",
    "Decoded",
    "DropReason",
    "EncodeError",
    "Envelope",
    "MessageTooLarge",
    "generate_cluster_key",
    "parse_cluster_key",
]

MAGIC = b"FIP1"
"""Marks our packets; bump the digit together with `PROTOCOL_VERSION` on a breaking change."""

PROTOCOL_VERSION = 1
TAG_SIZE = hashlib.sha256().digest_size  # 32
MAX_PACKET_SIZE = 512
"""Small enough never to be fragmented (IPv4 guarantees 576-byte datagrams)."""

MIN_PACKET_SIZE = len(MAGIC) + 1 + TAG_SIZE
"""An empty body can never be a valid envelope, so anything shorter is `too_short`."""

MIN_KEY_BYTES = 32
"""HMAC-SHA256 gains nothing from more, and a shorter key is guessable offline."""

REPLAY_WINDOW = 64
"""How far below the highest counter seen a late packet is still accepted (once)."""

_WINDOW_MASK = (1 << REPLAY_WINDOW) - 1

MESSAGE_TYPES: tuple[type[Message], ...] = typing.get_args(Message)


class DropReason(StrEnum):
    """Why `Codec.decode` refused a packet; the values are used as /metrics labels."""

    TOO_SHORT = "too_short"
    TOO_LARGE = "too_large"
    BAD_MAGIC = "bad_magic"
    BAD_MAC = "bad_mac"
    MALFORMED = "malformed"
    BAD_VERSION = "bad_version"
    UNKNOWN_SENDER = "unknown_sender"
    FROM_SELF = "from_self"
    WRONG_RECEIVER = "wrong_receiver"
    STALE = "stale"
    REPLAY = "replay"


class EncodeError(ValueError):
    """The caller asked to send something that cannot be sent (a bug, not a network fault)."""


class MessageTooLarge(EncodeError):
    """The encoded packet would exceed `MAX_PACKET_SIZE` (e.g. a very long reason string)."""


class Envelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The authenticated body of every packet.

    `receiver` is inside the MAC so a packet captured on its way to one node cannot be
    replayed to another; `sender` is inside so nobody can speak for someone else.
    """

    version: int
    sender: int
    receiver: int
    incarnation: Annotated[int, msgspec.Meta(ge=0)]
    counter: Annotated[int, msgspec.Meta(ge=1)]  # per (sender incarnation, receiver)
    sent_at: float
    msg: Message


@dataclass(frozen=True, slots=True)
class Decoded:
    """A packet that passed every check.

    `sent_at` is the sender's wall clock (for logs and rough one-way delay only; never use it
    for election timing). `incarnation` changes when the sender process restarts, so the
    consumer can reset anything it tracks per peer process (e.g. sequence numbers).
    """

    sender: int
    msg: Message
    sent_at: float
    incarnation: int


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Envelope)


class _Window:
    """Replay state for one sender: newest incarnation, highest counter, 64-bit bitmap.

    Bit i of `seen` set means counter `highest - i` was accepted in `incarnation`.
    """

    __slots__ = ("highest", "incarnation", "last_accepted_at", "seen")

    def __init__(self, incarnation: int) -> None:
        self.incarnation = incarnation
        self.highest = 0
        self.seen = 0
        self.last_accepted_at = -math.inf

    def admits_incarnation(self, incarnation: int, wall_now: float, forget_after: float) -> bool:
        """Whether a packet from `incarnation` may be looked at at all.

        Equal or newer: yes. Older: normally no (it is from a process that has been
        replaced). But if nothing from this sender was accepted for `forget_after` seconds
        (twice the allowed clock skew), every packet of the remembered incarnation is now
        stale by its own `sent_at`, so the memory protects nothing and may be dropped. This
        matters when a sender's clock stepped back across a restart: its new incarnation is
        then *lower* than the old one, and without this rule it would be locked out until
        the receiver itself restarted.
        """
        if incarnation >= self.incarnation:
            return True
        return wall_now - self.last_accepted_at > forget_after

    def check(self, incarnation: int, counter: int) -> bool:
        """Whether (incarnation, counter) is new; pure, does not record it."""
        if incarnation != self.incarnation:
            return True  # newer (or admitted older) incarnation: a fresh window
        if counter > self.highest:
            return True
        offset = self.highest - counter
        if offset >= REPLAY_WINDOW:
            return False
        return not (self.seen >> offset) & 1

    def record(self, incarnation: int, counter: int, wall_now: float) -> None:
        """Remember an accepted packet; call only after `check` and every other test passed."""
        if incarnation != self.incarnation or counter - self.highest >= REPLAY_WINDOW:
            # A new process, or a jump past the whole window: nothing below is remembered.
            # (Never shift by the jump itself: a counter near 2**64 would need exabytes.)
            self.incarnation = incarnation
            self.highest = counter
            self.seen = 1
        elif counter > self.highest:
            self.seen = ((self.seen << (counter - self.highest)) | 1) & _WINDOW_MASK
            self.highest = counter
        else:  # check() guaranteed 0 < highest - counter < REPLAY_WINDOW
            self.seen |= 1 << (self.highest - counter)
        self.last_accepted_at = wall_now


class Codec:
    """One node's encoder/decoder: signs outgoing packets, checks and counts incoming ones.

    Not thread-safe and not meant to be: one task owns it (the node's socket loop).
    `decode` never raises, whatever the bytes; it returns None and counts a `DropReason`.
    """

    def __init__(
        self,
        node_id: int,
        key: bytes,
        peer_ids: Iterable[int],
        incarnation: int,
        max_clock_skew: float = 60.0,
    ) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"cluster key must be at least {MIN_KEY_BYTES} bytes, got {len(key)}")
        peers = frozenset(peer_ids)
        if node_id in peers:
            raise ValueError(f"peer_ids must not contain this node's own id {node_id}")
        if incarnation < 0:
            raise ValueError(f"incarnation must be >= 0, got {incarnation}")
        if not (math.isfinite(max_clock_skew) and max_clock_skew > 0):
            raise ValueError(f"max_clock_skew must be a positive number, got {max_clock_skew}")
        self._node_id = node_id
        self._peers = peers
        self._incarnation = incarnation
        self._max_clock_skew = float(max_clock_skew)
        # Keyed once; .copy() per packet skips re-deriving the HMAC pads.
        self._mac = hmac.new(bytes(key), digestmod=hashlib.sha256)
        # Per-receiver counters: a peer's window is not diluted by traffic to other peers.
        self._counters: dict[int, int] = dict.fromkeys(peers, 0)
        self._windows: dict[int, _Window] = {}
        self._drops: dict[DropReason, int] = dict.fromkeys(DropReason, 0)
        self._drops_view: Mapping[DropReason, int] = types.MappingProxyType(self._drops)
        self._accepted = 0

    @property
    def node_id(self) -> int:
        return self._node_id

    @property
    def peer_ids(self) -> frozenset[int]:
        return self._peers

    @property
    def incarnation(self) -> int:
        return self._incarnation

    @property
    def drops(self) -> Mapping[DropReason, int]:
        """Read-only live view: reason -> packets dropped for it (every reason present)."""
        return self._drops_view

    @property
    def accepted(self) -> int:
        """Packets that passed every check."""
        return self._accepted

    def encode(self, msg: Message, receiver: int, wall_now: float) -> bytes:
        """Wrap `msg` for `receiver`, stamped with `wall_now` (seconds, `time.time()`).

        Raises `EncodeError` for an unknown receiver, a non-message or a non-finite time,
        and `MessageTooLarge` if the packet would exceed `MAX_PACKET_SIZE`; both are bugs
        in the caller, never caused by the network. The counter only advances for packets
        actually produced.
        """
        if not isinstance(msg, MESSAGE_TYPES):
            raise EncodeError(f"not an election message: {type(msg).__name__}")
        if receiver not in self._peers:
            raise EncodeError(f"receiver {receiver} is not a peer of node {self._node_id}")
        if not math.isfinite(wall_now):
            raise EncodeError(f"wall_now must be finite, got {wall_now}")
        counter = self._counters[receiver] + 1
        envelope = Envelope(
            version=PROTOCOL_VERSION,
            sender=self._node_id,
            receiver=receiver,
            incarnation=self._incarnation,
            counter=counter,
            sent_at=float(wall_now),
            msg=msg,
        )
        signed = MAGIC + _ENCODER.encode(envelope)
        size = len(signed) + TAG_SIZE
        if size > MAX_PACKET_SIZE:
            raise MessageTooLarge(
                f"{type(msg).__name__} packet would be {size} bytes, limit {MAX_PACKET_SIZE}"
            )
        self._counters[receiver] = counter
        return signed + self._tag(signed)

    def decode(self, data: bytes | bytearray | memoryview, wall_now: float) -> Decoded | None:
        """Check one received datagram; return it decoded, or None after counting the drop."""
        reason_or_envelope = self._check(data, wall_now)
        if isinstance(reason_or_envelope, DropReason):
            self._drops[reason_or_envelope] += 1
            return None
        env = reason_or_envelope
        self._accepted += 1
        return Decoded(
            sender=env.sender, msg=env.msg, sent_at=env.sent_at, incarnation=env.incarnation
        )

    def _tag(self, signed: bytes) -> bytes:
        mac = self._mac.copy()
        mac.update(signed)
        return mac.digest()

    def _check(
        self, data: bytes | bytearray | memoryview, wall_now: float
    ) -> DropReason | Envelope:
        """Every test in order; updates replay state only when the packet is accepted."""
        size = memoryview(data).nbytes  # len() of a memoryview counts items, not bytes
        if size < MIN_PACKET_SIZE:
            return DropReason.TOO_SHORT
        if size > MAX_PACKET_SIZE:
            return DropReason.TOO_LARGE
        data = bytes(data)  # a receive buffer may be reused: work on an immutable copy
        if data[: len(MAGIC)] != MAGIC:
            return DropReason.BAD_MAGIC
        signed, tag = data[:-TAG_SIZE], data[-TAG_SIZE:]
        if not hmac.compare_digest(self._tag(signed), tag):
            return DropReason.BAD_MAC
        try:
            env = _DECODER.decode(signed[len(MAGIC) :])
        except (msgspec.DecodeError, ValueError, TypeError, OverflowError):
            # DecodeError covers ValidationError; the rest only guard against surprises
            # from a key holder's bytes, so that decode() keeps its never-raises promise.
            return DropReason.MALFORMED
        if env.version != PROTOCOL_VERSION:
            return DropReason.BAD_VERSION
        if env.sender == self._node_id:
            return DropReason.FROM_SELF  # our own packet reflected back, or a duplicate id
        if env.sender not in self._peers:
            return DropReason.UNKNOWN_SENDER
        if env.receiver != self._node_id:
            return DropReason.WRONG_RECEIVER
        # Written as "not within" so that a NaN on either side counts as stale.
        if not abs(wall_now - env.sent_at) <= self._max_clock_skew:
            return DropReason.STALE
        window = self._windows.get(env.sender)
        if window is not None and not window.admits_incarnation(
            env.incarnation, wall_now, 2 * self._max_clock_skew
        ):
            return DropReason.STALE
        if window is not None and not window.check(env.incarnation, env.counter):
            return DropReason.REPLAY
        if window is None:
            window = self._windows[env.sender] = _Window(env.incarnation)
        window.record(env.incarnation, env.counter, wall_now)
        return env


def generate_cluster_key() -> str:
    """A new random cluster key: 32 bytes from `secrets`, standard base64 (44 characters)."""
    return base64.b64encode(secrets.token_bytes(MIN_KEY_BYTES)).decode("ascii")


def parse_cluster_key(text: str) -> bytes:
    """Decode a cluster key from its text form (a key file or an environment variable).

    Whitespace anywhere is ignored (trailing newlines, wrapped lines), both the standard and
    the URL-safe base64 alphabets are accepted, and missing `=` padding is tolerated. The
    errors never include the text itself: it may be a real key with a typo in it.
    """
    compact = "".join(text.split())
    if not compact:
        raise ValueError("cluster key is empty (generate one with `fip-sidecar keygen`)")
    standard = compact.replace("-", "+").replace("_", "/")
    standard += "=" * (-len(standard) % 4)
    try:
        key = base64.b64decode(standard.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ValueError(
            "cluster key is not valid base64 (generate one with `fip-sidecar keygen`)"
        ) from None
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(
            f"cluster key decodes to {len(key)} bytes; at least {MIN_KEY_BYTES} are required"
            " (generate one with `fip-sidecar keygen`)"
        )
    return key
