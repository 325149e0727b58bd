"""The wire codec: authenticated, replay-protected envelopes around election messages.

A packet is::

    b"FIP3" | msgpack(Envelope) | HMAC-SHA256(cluster key, b"FIP3" + body)   (32 bytes)

and never longer than `MAX_PACKET_SIZE` bytes, so it always fits in one UDP datagram
without IP fragmentation.

This module is sans-IO: no sockets, no clock reads and no trio. The caller passes both
clocks in: `now` (monotonic seconds, for freshness) and `wall` (seconds since the epoch,
only carried along so peers can report clock offsets), which keeps every rule testable
with plain numbers.

Why the checks run in the order they do (`Codec.decode`):

* Size and magic first: they are free, and they reject stray traffic (port scans, another
  protocol on the same port) before any cryptography is spent on it.
* The MAC is checked (in constant time) *before anything in the body is parsed*. Only
  holders of the cluster key can make a packet that reaches the msgpack parser, so a
  parser bug or a pathological body can only be triggered by a cluster member, never by
  anyone who can merely send UDP to the port.
* Addressing, freshness, membership and replay come last, and the replay window is only
  updated once every other check has passed, so a packet that is dropped for any other
  reason cannot burn a counter that a genuine packet will need later.

Freshness without the wall clock (why, and what it costs):

* Every process picks a random 63-bit `incarnation` at start, and numbers its *challenge
  epochs* on its own monotonic clock (a new epoch every `epoch_length` seconds). Every
  envelope carries the sender's (incarnation, epoch) and *echoes* the receiver's newest
  (incarnation, epoch) pairs the sender has seen (at most two incarnations, so a restart
  or a second process with the same id never starves the genuine one).
* A receiver accepts a packet only if it echoes the receiver's own incarnation with its
  current or previous epoch. So every accepted packet was made during the receiver's
  present lifetime and less than two epochs ago *by the receiver's own clock*. Within that,
  the per-(sender, incarnation) counter and its 64-slot window accept each packet once.
  A window may be forgotten once nothing from its incarnation was accepted for two epochs:
  every packet it ever accepted then echoes an epoch that is no longer accepted.
* Result: replays are refused across restarts of either side (the old design had a
  residual window of `max_clock_skew` after a receiver restarted), and no wall-clock step,
  skew or correction can make a genuine peer's packets stale or lock a restarted node out.
  The cost is one round trip after a restart or a long partition: a node must hear a
  peer's challenge before its packets count (its first packets are dropped as `stale`),
  and a link that loses everything in one direction for two epochs goes silent both ways,
  which is what an election needs to see anyway.
* Packets also carry the sender's *membership digests* (see `membership_digest`). A packet
  whose digests share none with the receiver's is refused as `config_mismatch`: nodes that
  disagree on who the members are never count, follow or vote for each other. Packets to a
  peer known to disagree also carry the sender's member list, so both can say how.
* `decode` never raises. What fails before or at the MAC is just counted; a packet that is
  authentic but refused (stale, mismatch, replay) comes back as `Refused`, with what the
  runtime needs to explain it (who sent it, which process, which membership).
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
    "MAX_ECHOES",
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
    "Refused",
    "generate_cluster_key",
    "membership_digest",
    "parse_cluster_key",
]

MAGIC = b"FIP3"
"""Marks our packets; bump the digit together with `PROTOCOL_VERSION` on a breaking change.

3: acks ride in heartbeats (`Heartbeat.ack`) instead of separate `Ack` messages. A v2 node
drops v3 packets as `bad_magic` (and the other way round): upgrade every member together."""

PROTOCOL_VERSION = 3
TAG_SIZE = hashlib.sha256().digest_size  # 32
MAX_PACKET_SIZE = 512
"""Small enough never to be fragmented (IPv4 guarantees 576-byte datagrams)."""

MIN_PACKET_SIZE = len(MAGIC) + 1 + TAG_SIZE
"""An empty body can never be a valid envelope, so anything shorter is `too_short`."""

MIN_KEY_BYTES = 32
"""HMAC-SHA256 gains nothing from more, and a shorter key is guessable offline."""

REPLAY_WINDOW = 64
"""How far below the highest counter seen a late packet is still accepted (once)."""

MAX_ECHOES = 2
"""Incarnations of one peer whose challenges a node echoes: the newest two it has heard, so
a restarted peer and (briefly) its predecessor, or a genuine node and a duplicate, all keep
receiving packets they accept."""

_INCARNATIONS_REMEMBERED = 16
"""Incarnations of one peer whose newest challenge a node remembers (to tell a replay,
which never advances one, from the live process); a crash loop longer than this within
the capture of an attacker could again crowd the echoes, until the live process's next
packet."""

_WINDOWS_PER_SENDER = 4
"""Replay windows kept per sender: one per incarnation accepted in the last two epochs. A
fifth process within two epochs (a crash loop) waits until one of them has gone idle."""

_U63 = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]
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
    CONFIG_MISMATCH = "config_mismatch"
    REPLAY = "replay"
    DUPLICATE_ID = "duplicate_id"  # counted by the runtime: a second process with one id
    #: Counted by the runtime from the kernel's count (SO_RXQ_OVFL): datagrams that found
    #: their socket's buffer full, e.g. a flood between two of a leader's heartbeats.
    RECEIVE_BUFFER_FULL = "receive_buffer_full"


class EncodeError(ValueError):
    """The caller asked to send something that cannot be sent (a bug, not a network fault)."""


class MessageTooLarge(EncodeError):
    """The encoded packet would exceed `MAX_PACKET_SIZE` (e.g. a very long reason string)."""


class Envelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    """The authenticated body of every packet.

    `receiver` is inside the MAC so a packet captured on its way to one node cannot be
    replayed to another; `sender` is inside so nobody can speak for someone else. `echo`
    holds the receiver's (incarnation, epoch) pairs as the sender last heard them.
    `members` is only sent to a peer whose membership differs: (id, eligible) pairs.
    """

    version: int
    sender: int
    receiver: int
    incarnation: _U63
    epoch: Annotated[int, msgspec.Meta(ge=0)]
    counter: Annotated[int, msgspec.Meta(ge=1)]  # per (sender incarnation, receiver)
    echo: Annotated[tuple[tuple[_U63, int], ...], msgspec.Meta(max_length=MAX_ECHOES)]
    digests: Annotated[tuple[int, ...], msgspec.Meta(min_length=1, max_length=2)]
    sent_at: float
    msg: Message
    members: tuple[tuple[int, bool], ...] | None = None


@dataclass(frozen=True, slots=True)
class _Authentic:
    """What an authentic packet says about its sender, accepted or not."""

    sender: int
    incarnation: int
    sent_at: float  # the sender's wall clock: for clock-offset reports only
    digests: tuple[int, ...]
    members: tuple[tuple[int, bool], ...] | None


@dataclass(frozen=True, slots=True)
class Decoded(_Authentic):
    """A packet that passed every check: `msg` may be given to the election."""

    msg: Message


@dataclass(frozen=True, slots=True)
class Refused(_Authentic):
    """An authentic packet that must not reach the election, and why (already counted)."""

    reason: DropReason


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Envelope)


def membership_digest(cluster_name: str, members: Iterable[tuple[int, bool]]) -> int:
    """A 63-bit digest of one membership: the cluster's name and every (id, eligible).

    Two nodes agree on quorum arithmetic exactly when they share a digest, so this is what
    every packet carries; the member list itself only travels when digests differ.
    """
    canonical = msgspec.json.encode([cluster_name, sorted((int(i), bool(e)) for i, e in members)])
    return int.from_bytes(hashlib.sha256(canonical).digest()[:8], "big") >> 1


class _Window:
    """Replay state for one (sender, incarnation): highest counter and a 64-bit bitmap.

    Bit i of `seen` set means counter `highest - i` was accepted.
    """

    __slots__ = ("highest", "last_accepted", "seen")

    def __init__(self) -> None:
        self.highest = 0
        self.seen = 0
        self.last_accepted = -math.inf

    def check(self, counter: int) -> bool:
        """Whether `counter` is new; pure, does not record it."""
        if counter > self.highest:
            return True
        offset = self.highest - counter
        if offset >= REPLAY_WINDOW:
            return False
        return not (self.seen >> offset) & 1

    def record(self, counter: int, now: float) -> None:
        """Remember an accepted packet; call only after `check` and every other test passed."""
        if counter - self.highest >= REPLAY_WINDOW:
            # A jump past the whole window: nothing below is remembered. (Never shift by the
            # jump itself: a counter near 2**64 would need exabytes.)
            self.highest = counter
            self.seen = 1
        elif counter > self.highest:
            self.seen = ((self.seen << (counter - self.highest)) | 1) & _WINDOW_MASK
            self.highest = counter
        else:  # check() guaranteed 0 < highest - counter < REPLAY_WINDOW
            self.seen |= 1 << (self.highest - counter)
        self.last_accepted = now


class Codec:
    """One node's encoder/decoder: signs outgoing packets, checks and counts incoming ones.

    Not thread-safe and not meant to be: its caller serializes every call (the node holds
    its lock around each).
    `decode` never raises, whatever the bytes; it returns `Decoded`, `Refused` (authentic
    but not acceptable) or the `DropReason` of a packet that is not authentic, and counts
    every drop by reason.
    """

    def __init__(
        self,
        node_id: int,
        key: bytes,
        peer_ids: Iterable[int],
        incarnation: int,
        *,
        digests: Iterable[int] = (0,),
        epoch_length: float = 1.0,
        now: float = 0.0,
    ) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"cluster key must be at least {MIN_KEY_BYTES} bytes, got {len(key)}")
        if not 0 <= incarnation < 1 << 63:
            raise ValueError(f"incarnation must be in [0, 2**63), got {incarnation}")
        if not (math.isfinite(epoch_length) and epoch_length > 0):
            raise ValueError(f"epoch_length must be a positive number, got {epoch_length}")
        self._node_id = node_id
        self._incarnation = incarnation
        self._epoch_length = float(epoch_length)
        self._epoch_origin = now
        # Keyed once; .copy() per packet skips re-deriving the HMAC pads.
        self._mac = hmac.new(bytes(key), digestmod=hashlib.sha256)
        self._peers: frozenset[int] = frozenset()
        self._counters: dict[int, int] = {}
        self._learned: dict[int, dict[int, int]] = {}  # peer -> {incarnation: newest epoch}
        self._heard: dict[int, dict[int, int]] = {}  # the same, for the last 16 heard
        self._windows: dict[int, dict[int, _Window]] = {}  # sender -> {incarnation: window}
        self._digests: tuple[int, ...] = ()
        self._members: tuple[tuple[int, bool], ...] = ()
        self.set_peers(peer_ids)
        self.set_membership(tuple(digests), ())
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
    def digests(self) -> tuple[int, ...]:
        return self._digests

    @property
    def drops(self) -> Mapping[DropReason, int]:
        """Read-only live view: reason -> packets dropped for it (every reason present)."""
        return self._drops_view

    @property
    def accepted(self) -> int:
        """Packets that passed every check."""
        return self._accepted

    def count_drop(self, reason: DropReason, packets: int = 1) -> None:
        """Count a drop decided outside the codec (e.g. `DUPLICATE_ID` by the runtime)."""
        self._drops[reason] += packets

    def set_peers(self, peer_ids: Iterable[int]) -> None:
        """Change who may send and receive (a live membership change); state of others kept.

        Counters and replay windows of a removed peer are kept (an int and at most a few
        windows per id ever configured): if it is added back, our counters to it must go on
        where they were (its window still remembers our process, and would refuse counters
        from 1 as replays), and its packets from before cannot be accepted a second time.
        Only the challenges learned from it are forgotten; one round trip renews them.
        """
        peers = frozenset(peer_ids)
        if self._node_id in peers:
            raise ValueError(f"peer_ids must not contain this node's own id {self._node_id}")
        self._peers = peers
        for peer in peers:
            self._counters.setdefault(peer, 0)
        for gone in set(self._learned) - peers:
            del self._learned[gone]
        for gone in set(self._heard) - peers:
            del self._heard[gone]

    def set_membership(self, digests: tuple[int, ...], members: Iterable[tuple[int, bool]]) -> None:
        """Our membership digests (one, or two while a change is rolled out) and member list."""
        if not 1 <= len(digests) <= 2:
            raise ValueError("a node has one membership digest, or two during a change")
        self._digests = digests
        self._digests_set = frozenset(digests)
        self._members = tuple(sorted((int(i), bool(e)) for i, e in members))

    def epoch(self, now: float) -> int:
        """Our challenge epoch at `now` (monotonic): a pure function of the clock."""
        return max(0, int((now - self._epoch_origin) // self._epoch_length))

    def knows(self, peer: int) -> bool:
        """Whether we have heard `peer`'s challenge, i.e. whether it can accept our packets."""
        return bool(self._learned.get(peer))

    def encode(
        self,
        msg: Message,
        receiver: int,
        *,
        now: float,
        wall: float,
        include_members: bool = False,
    ) -> bytes:
        """Wrap `msg` for `receiver` at monotonic `now`, stamped with `wall` (`time.time()`).

        Raises `EncodeError` for an unknown receiver, a non-message or a non-finite time,
        and `MessageTooLarge` if the packet would exceed `MAX_PACKET_SIZE`; both are bugs
        in the caller, never caused by the network. The counter only advances for packets
        actually produced.
        """
        if not isinstance(msg, MESSAGE_TYPES):
            raise EncodeError(f"not an election message: {type(msg).__name__}")
        if receiver not in self._peers:
            raise EncodeError(f"receiver {receiver} is not a peer of node {self._node_id}")
        if not (math.isfinite(wall) and math.isfinite(now)):
            raise EncodeError(f"now and wall must be finite, got {now}, {wall}")
        counter = self._counters[receiver] + 1
        learned = self._learned.get(receiver, {})
        envelope = Envelope(
            version=PROTOCOL_VERSION,
            sender=self._node_id,
            receiver=receiver,
            incarnation=self._incarnation,
            epoch=self.epoch(now),
            counter=counter,
            echo=tuple(learned.items()),
            digests=self._digests,
            sent_at=float(wall),
            msg=msg,
            members=self._members if include_members else None,
        )
        signed = MAGIC + _ENCODER.encode(envelope)
        size = len(signed) + TAG_SIZE
        if size > MAX_PACKET_SIZE:
            raise MessageTooLarge(
                f"{type(msg).__name__} packet would be {size} bytes, limit {MAX_PACKET_SIZE}"
            )
        self._counters[receiver] = counter
        return signed + self._tag(signed)

    def decode(
        self, data: bytes | bytearray | memoryview, *, now: float
    ) -> Decoded | Refused | DropReason:
        """Check one received datagram at monotonic `now`; every drop is counted by reason.

        Only a `Decoded` may reach the election. A `Refused` was authentic (the runtime can
        explain it); a bare `DropReason` was not, or was not even a packet of ours."""
        checked = self._check(data, now)
        if isinstance(checked, DropReason):
            self._drops[checked] += 1
            return checked
        if isinstance(checked, Refused):
            self._drops[checked.reason] += 1
            return checked
        self._accepted += 1
        return checked

    def _tag(self, signed: bytes) -> bytes:
        mac = self._mac.copy()
        mac.update(signed)
        return mac.digest()

    def _check(
        self, data: bytes | bytearray | memoryview, now: float
    ) -> DropReason | Refused | Decoded:
        """Every test in order; updates replay state only when the packet is accepted."""
        if type(data) is not bytes:
            # len() of a memoryview counts items, not bytes; and a receive buffer may be
            # reused: work on an immutable copy.
            if memoryview(data).nbytes > MAX_PACKET_SIZE:
                return DropReason.TOO_LARGE
            data = bytes(data)
        size = len(data)
        if size < MIN_PACKET_SIZE:
            return DropReason.TOO_SHORT
        if size > MAX_PACKET_SIZE:
            return DropReason.TOO_LARGE
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
        self._learn(env.sender, env.incarnation, env.epoch, now)
        refusal = self._refusal(env, now)
        if refusal is not None:
            return Refused(
                env.sender, env.incarnation, env.sent_at, env.digests, env.members, refusal
            )
        windows = self._windows.setdefault(env.sender, {})
        window = windows.get(env.incarnation)
        if window is None:
            self._forget_idle_windows(windows, now)
            if len(windows) < _WINDOWS_PER_SENDER:
                window = windows[env.incarnation] = _Window()
        # No room (a crash loop: every window accepted a packet in the last two epochs): a
        # live window must not be evicted, or its packets could be accepted again; the new
        # process is refused until one goes idle, at most two epochs.
        if window is None or not window.check(env.counter):
            return Refused(
                env.sender,
                env.incarnation,
                env.sent_at,
                env.digests,
                env.members,
                DropReason.REPLAY,
            )
        window.record(env.counter, now)
        return Decoded(env.sender, env.incarnation, env.sent_at, env.digests, env.members, env.msg)

    def _refusal(self, env: Envelope, now: float) -> DropReason | None:
        # Written so that anything odd (an epoch from the future, a NaN) is refused too.
        current = self.epoch(now)
        for incarnation, epoch in env.echo:
            if incarnation == self._incarnation and current - 1 <= epoch <= current:
                break
        else:
            return DropReason.STALE
        if self._digests_set.isdisjoint(env.digests):
            return DropReason.CONFIG_MISMATCH
        return None

    def _learn(self, peer: int, incarnation: int, epoch: int, now: float) -> None:
        """Remember `peer`'s newest challenge per incarnation; echo the newest two.

        Learned even from packets we then refuse: after a restart or a partition that is the
        only way both sides get back to packets the other accepts. "Newest" is the
        incarnation whose challenge *advanced* most recently, not the one heard last: a
        replay carries an epoch we have already heard, so it never advances one, and
        replays of packets captured from earlier processes of the peer (a crash loop) cannot
        push the live process out of the echoes, nor reset what we know of its challenge.
        The incarnation whose packets we accept now is always echoed as well.
        """
        # Re-inserted whenever its epoch advances: the order is "advanced least recently first".
        heard = self._heard.setdefault(peer, {})
        if epoch > heard.get(incarnation, -1):
            heard.pop(incarnation, None)
            heard[incarnation] = epoch
            if len(heard) > _INCARNATIONS_REMEMBERED:
                del heard[next(iter(heard))]
        elif incarnation in self._learned.get(peer, {}):
            return  # the common case, every packet of an echoed process: nothing changes
        newest = list(heard)[-MAX_ECHOES:]
        live = self._live_incarnation(peer, now)
        if live is not None and live in heard and live not in newest:
            newest[0] = live
        self._learned[peer] = {i: heard[i] for i in newest}

    def _live_incarnation(self, peer: int, now: float) -> int | None:
        """The incarnation of `peer` we accepted a packet from most recently, within two
        epochs (None if there is none)."""
        windows = self._windows.get(peer, {})
        if not windows:
            return None
        newest = max(windows, key=lambda i: windows[i].last_accepted)
        return newest if now - windows[newest].last_accepted <= 2 * self._epoch_length else None

    def _forget_idle_windows(self, windows: dict[int, _Window], now: float) -> None:
        """Drop windows idle for over two epochs: every packet they accepted echoes an epoch
        that is no longer accepted, so none of them can come back. Never a live one."""
        horizon = 2 * self._epoch_length
        for key in [k for k, w in windows.items() if now - w.last_accepted > horizon]:
            del windows[key]


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
