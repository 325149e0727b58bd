"""Unit tests for the wire codec: round trips, every drop reason, replay and freshness rules."""

from __future__ import annotations

import base64
import hashlib
import hmac

import msgspec
import pytest

from sidecar.messages import Ack, Heartbeat, Message, Resign, VoteRequest, VoteResponse
from sidecar.protocol import (
    MAGIC,
    MAX_PACKET_SIZE,
    PROTOCOL_VERSION,
    REPLAY_WINDOW,
    TAG_SIZE,
    Codec,
    Decoded,
    DropReason,
    EncodeError,
    Envelope,
    MessageTooLarge,
    generate_cluster_key,
    parse_cluster_key,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
NOW = 1_800_000_000.0
SKEW = 60.0

SAMPLES: list[Message] = [
    Heartbeat(
        term=7,
        seq=12,
        leader_id=1,
        leading=True,
        eligible=True,
        healthy=True,
        viable=True,
        ready_to_preempt=False,
    ),
    Heartbeat(
        term=0,
        seq=0,
        leader_id=None,
        leading=False,
        eligible=False,
        healthy=False,
        viable=False,
        ready_to_preempt=False,
    ),
    Ack(term=7, seq=12, promised=True),
    VoteRequest(term=8, seq=3),
    VoteResponse(term=8, seq=3, granted=False, reason="lease held"),
    Resign(term=8, reason="shutdown"),
]


def make_codec(node_id: int, key: bytes = KEY, incarnation: int = 1000) -> Codec:
    return Codec(
        node_id=node_id,
        key=key,
        peer_ids={1, 2, 3} - {node_id},
        incarnation=incarnation,
        max_clock_skew=SKEW,
    )


def only_drop(codec: Codec) -> DropReason:
    """The single reason counted so far (fails if there is not exactly one drop)."""
    counted = {reason: n for reason, n in codec.drops.items() if n}
    assert sum(counted.values()) == 1, counted
    return next(iter(counted))


def signed_packet(envelope: Envelope, key: bytes = KEY) -> bytes:
    """A packet built by hand (as a key holder could), to reach the checks after the MAC."""
    body = MAGIC + msgspec.msgpack.encode(envelope)
    return body + hmac.new(key, body, hashlib.sha256).digest()


def envelope(**changes: object) -> Envelope:
    fields: dict[str, object] = {
        "version": PROTOCOL_VERSION,
        "sender": 2,
        "receiver": 1,
        "incarnation": 5,
        "counter": 1,
        "sent_at": NOW,
        "msg": Ack(term=1, seq=1, promised=False),
    }
    fields.update(changes)
    return Envelope(**fields)  # type: ignore[arg-type]


# --- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_type_round_trips(msg: Message) -> None:
    sender, receiver = make_codec(2, incarnation=77), make_codec(1)
    packet = sender.encode(msg, receiver=1, wall_now=NOW)
    assert packet.startswith(MAGIC)
    assert len(packet) <= MAX_PACKET_SIZE

    decoded = receiver.decode(packet, wall_now=NOW + 0.5)

    assert decoded == Decoded(sender=2, msg=msg, sent_at=NOW, incarnation=77)
    assert receiver.accepted == 1
    assert sum(receiver.drops.values()) == 0


def test_decode_accepts_bytearray_and_memoryview() -> None:
    sender, receiver = make_codec(2), make_codec(1)
    first = sender.encode(SAMPLES[2], 1, NOW)
    second = sender.encode(SAMPLES[2], 1, NOW)
    assert receiver.decode(bytearray(first), NOW) is not None
    assert receiver.decode(memoryview(second), NOW) is not None


def test_counters_start_at_one_and_count_per_receiver() -> None:
    codec = make_codec(1)
    decode = msgspec.msgpack.Decoder(Envelope).decode

    def counter_of(packet: bytes) -> int:
        return decode(packet[len(MAGIC) : -TAG_SIZE]).counter

    to_2 = [counter_of(codec.encode(SAMPLES[2], 2, NOW)) for _ in range(3)]
    to_3 = [counter_of(codec.encode(SAMPLES[2], 3, NOW)) for _ in range(2)]

    assert to_2 == [1, 2, 3]
    assert to_3 == [1, 2]


def test_drops_every_reason_present_and_read_only() -> None:
    codec = make_codec(1)
    assert dict(codec.drops) == dict.fromkeys(DropReason, 0)
    assert {r.value for r in DropReason} == {
        "too_short",
        "too_large",
        "bad_magic",
        "bad_mac",
        "malformed",
        "bad_version",
        "unknown_sender",
        "from_self",
        "wrong_receiver",
        "stale",
        "replay",
    }
    with pytest.raises(TypeError):
        codec.drops[DropReason.REPLAY] = 5  # type: ignore[index]
    assert codec.accepted == 0


# --- construction and encode errors ------------------------------------------------------


def test_short_key_rejected() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        Codec(node_id=1, key=b"x" * 31, peer_ids={2}, incarnation=1)


def test_own_id_in_peers_rejected() -> None:
    with pytest.raises(ValueError, match="own id"):
        Codec(node_id=1, key=KEY, peer_ids={1, 2}, incarnation=1)


@pytest.mark.parametrize("skew", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_clock_skew_rejected(skew: float) -> None:
    with pytest.raises(ValueError, match="max_clock_skew"):
        Codec(node_id=1, key=KEY, peer_ids={2}, incarnation=1, max_clock_skew=skew)


def test_encode_to_non_peer_or_self_raises() -> None:
    codec = make_codec(1)
    with pytest.raises(EncodeError, match="not a peer"):
        codec.encode(SAMPLES[2], receiver=9, wall_now=NOW)
    with pytest.raises(EncodeError, match="not a peer"):
        codec.encode(SAMPLES[2], receiver=1, wall_now=NOW)


def test_encode_rejects_non_message_and_non_finite_time() -> None:
    codec = make_codec(1)
    with pytest.raises(EncodeError, match="not an election message"):
        codec.encode("hello", receiver=2, wall_now=NOW)  # type: ignore[arg-type]
    with pytest.raises(EncodeError, match="finite"):
        codec.encode(SAMPLES[2], receiver=2, wall_now=float("nan"))


def test_oversize_message_raises_and_does_not_burn_a_counter() -> None:
    sender, receiver = make_codec(2), make_codec(1)
    with pytest.raises(MessageTooLarge, match="limit 512"):
        sender.encode(Resign(term=1, reason="x" * MAX_PACKET_SIZE), receiver=1, wall_now=NOW)
    packet = sender.encode(Resign(term=1, reason="ok"), receiver=1, wall_now=NOW)
    assert msgspec.msgpack.decode(packet[len(MAGIC) : -TAG_SIZE], type=Envelope).counter == 1
    assert receiver.decode(packet, NOW) is not None


def test_largest_message_that_fits_is_exactly_at_the_limit() -> None:
    sender, receiver = make_codec(2), make_codec(1)
    fitting = None
    for length in range(MAX_PACKET_SIZE):
        try:
            fitting = sender.encode(Resign(term=1, reason="r" * length), 1, NOW)
        except MessageTooLarge:
            break
    assert fitting is not None
    assert len(fitting) == MAX_PACKET_SIZE
    assert receiver.decode(fitting, NOW) is not None


# --- drop reasons ------------------------------------------------------------------------


def test_wrong_key_is_bad_mac() -> None:
    outsider, receiver = make_codec(2, key=OTHER_KEY), make_codec(1)
    assert receiver.decode(outsider.encode(SAMPLES[0], 1, NOW), NOW) is None
    assert only_drop(receiver) is DropReason.BAD_MAC


def test_receiver_mismatch() -> None:
    sender, node3 = make_codec(2), make_codec(3)
    packet_for_1 = sender.encode(SAMPLES[2], receiver=1, wall_now=NOW)
    assert node3.decode(packet_for_1, NOW) is None
    assert only_drop(node3) is DropReason.WRONG_RECEIVER


def test_own_packet_reflected_back_is_from_self() -> None:
    codec = make_codec(1)
    packet = codec.encode(SAMPLES[2], receiver=2, wall_now=NOW)
    assert codec.decode(packet, NOW) is None
    assert only_drop(codec) is DropReason.FROM_SELF


def test_unknown_sender() -> None:
    stranger = Codec(node_id=9, key=KEY, peer_ids={1}, incarnation=1)
    receiver = make_codec(1)
    assert receiver.decode(stranger.encode(SAMPLES[2], 1, NOW), NOW) is None
    assert only_drop(receiver) is DropReason.UNKNOWN_SENDER


def test_bad_version() -> None:
    receiver = make_codec(1)
    assert receiver.decode(signed_packet(envelope(version=2)), NOW) is None
    assert only_drop(receiver) is DropReason.BAD_VERSION


@pytest.mark.parametrize(
    "body",
    [
        {"version": 1, "sender": 2},  # missing fields
        {**msgspec.structs.asdict(envelope()), "extra": 1},  # unknown field
        {**msgspec.structs.asdict(envelope()), "counter": "1"},  # wrong type
        {**msgspec.structs.asdict(envelope()), "msg": {"type": "nope", "term": 1}},  # bad tag
        {**msgspec.structs.asdict(envelope()), "msg": {"type": "ack", "term": 1}},  # short msg
        [1, 2, 1, 5, 1, NOW, None],  # an array, not a map
    ],
    ids=["missing", "unknown-field", "wrong-type", "unknown-tag", "incomplete-msg", "array"],
)
def test_authentic_but_malformed_body(body: object) -> None:
    receiver = make_codec(1)
    raw = MAGIC + msgspec.msgpack.encode(body)
    packet = raw + hmac.new(KEY, raw, hashlib.sha256).digest()
    assert receiver.decode(packet, NOW) is None
    assert only_drop(receiver) is DropReason.MALFORMED


def test_body_that_is_not_msgpack_is_malformed() -> None:
    receiver = make_codec(1)
    raw = MAGIC + b"\xc1\xc1\xc1"  # 0xc1 is never valid msgpack
    assert receiver.decode(raw + hmac.new(KEY, raw, hashlib.sha256).digest(), NOW) is None
    assert only_drop(receiver) is DropReason.MALFORMED


def test_truncated_packets() -> None:
    packet = make_codec(2).encode(SAMPLES[0], 1, NOW)
    for length in range(len(packet)):
        receiver = make_codec(1)
        assert receiver.decode(packet[:length], NOW) is None
        expected = DropReason.TOO_SHORT if length < len(MAGIC) + 1 + TAG_SIZE else None
        reason = only_drop(receiver)
        if expected is not None:
            assert reason is expected, length
        else:
            assert reason is DropReason.BAD_MAC, length


def test_extended_packets() -> None:
    packet = make_codec(2).encode(SAMPLES[0], 1, NOW)
    for extra in (b"\x00", b"x" * 10, packet[-TAG_SIZE:]):
        receiver = make_codec(1)
        assert receiver.decode(packet + extra, NOW) is None
        assert only_drop(receiver) is DropReason.BAD_MAC


def test_every_single_bit_flip_is_dropped() -> None:
    packet = make_codec(2).encode(SAMPLES[0], 1, NOW)
    for bit in range(len(packet) * 8):
        flipped = bytearray(packet)
        flipped[bit // 8] ^= 1 << (bit % 8)
        receiver = make_codec(1)
        assert receiver.decode(bytes(flipped), NOW) is None
        expected = DropReason.BAD_MAGIC if bit < len(MAGIC) * 8 else DropReason.BAD_MAC
        assert only_drop(receiver) is expected, bit


def test_oversize_datagram_is_too_large() -> None:
    receiver = make_codec(1)
    assert receiver.decode(MAGIC + b"\x00" * MAX_PACKET_SIZE, NOW) is None
    assert only_drop(receiver) is DropReason.TOO_LARGE


def test_oversize_even_with_valid_mac_is_too_large() -> None:
    """The size limit holds on receive too, even for a (buggy) key holder."""
    receiver = make_codec(1)
    packet = signed_packet(envelope(msg=Resign(term=1, reason="r" * MAX_PACKET_SIZE)))
    assert len(packet) > MAX_PACKET_SIZE
    assert receiver.decode(packet, NOW) is None
    assert only_drop(receiver) is DropReason.TOO_LARGE


def test_bad_magic() -> None:
    packet = make_codec(2).encode(SAMPLES[2], 1, NOW)
    receiver = make_codec(1)
    assert receiver.decode(b"FIP2" + packet[4:], NOW) is None
    assert only_drop(receiver) is DropReason.BAD_MAGIC


def test_empty_datagram() -> None:
    receiver = make_codec(1)
    assert receiver.decode(b"", NOW) is None
    assert only_drop(receiver) is DropReason.TOO_SHORT


# --- freshness ---------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [-SKEW - 0.001, SKEW + 0.001, -1e9, 1e9])
def test_skewed_sent_at_is_stale(offset: float) -> None:
    sender, receiver = make_codec(2), make_codec(1)
    packet = sender.encode(SAMPLES[2], 1, wall_now=NOW + offset)
    assert receiver.decode(packet, wall_now=NOW) is None
    assert only_drop(receiver) is DropReason.STALE


@pytest.mark.parametrize("offset", [-SKEW, SKEW, 0.0])
def test_skew_at_the_limit_is_accepted(offset: float) -> None:
    sender, receiver = make_codec(2), make_codec(1)
    packet = sender.encode(SAMPLES[2], 1, wall_now=NOW + offset)
    assert receiver.decode(packet, wall_now=NOW) is not None


@pytest.mark.parametrize("sent_at", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_sent_at_is_stale(sent_at: float) -> None:
    receiver = make_codec(1)
    assert receiver.decode(signed_packet(envelope(sent_at=sent_at)), NOW) is None
    assert only_drop(receiver) is DropReason.STALE


def test_stale_packet_does_not_burn_its_counter() -> None:
    receiver = make_codec(1)
    early = signed_packet(envelope(counter=1, sent_at=NOW + 2 * SKEW))
    assert receiver.decode(early, NOW) is None
    assert only_drop(receiver) is DropReason.STALE
    assert receiver.decode(early, NOW + 2 * SKEW) is not None  # same packet, now in time


# --- replay ------------------------------------------------------------------------------


def test_identical_packet_twice_is_replay() -> None:
    sender, receiver = make_codec(2), make_codec(1)
    packet = sender.encode(SAMPLES[0], 1, NOW)
    assert receiver.decode(packet, NOW) is not None
    assert receiver.decode(packet, NOW + 1) is None
    assert only_drop(receiver) is DropReason.REPLAY
    assert receiver.accepted == 1


def test_reordering_within_window_accepted_exactly_once() -> None:
    sender, receiver = make_codec(2), make_codec(1)
    packets = [sender.encode(SAMPLES[2], 1, NOW) for _ in range(REPLAY_WINDOW)]
    order = list(reversed(packets))  # newest first: the oldest is 63 below the highest
    assert all(receiver.decode(p, NOW) is not None for p in order)
    assert all(receiver.decode(p, NOW) is None for p in packets)
    assert receiver.accepted == REPLAY_WINDOW
    assert receiver.drops[DropReason.REPLAY] == REPLAY_WINDOW


def test_packet_beyond_window_is_rejected() -> None:
    sender, receiver = make_codec(2), make_codec(1)
    packets = [sender.encode(SAMPLES[2], 1, NOW) for _ in range(REPLAY_WINDOW + 1)]
    assert receiver.decode(packets[-1], NOW) is not None  # counter 65 arrives first
    assert receiver.decode(packets[0], NOW) is None  # counter 1 is 64 below: too old
    assert only_drop(receiver) is DropReason.REPLAY
    assert receiver.decode(packets[1], NOW) is not None  # counter 2 is 63 below: fine


def test_big_jump_forward_clears_the_window() -> None:
    receiver = make_codec(1)
    assert receiver.decode(signed_packet(envelope(counter=1)), NOW) is not None
    assert receiver.decode(signed_packet(envelope(counter=10_000)), NOW) is not None
    assert receiver.decode(signed_packet(envelope(counter=9_999)), NOW) is not None
    assert receiver.decode(signed_packet(envelope(counter=9_999)), NOW) is None
    assert receiver.decode(signed_packet(envelope(counter=1)), NOW) is None
    assert receiver.drops[DropReason.REPLAY] == 2


def test_huge_counter_jumps_are_handled_without_blowing_up() -> None:
    """A key holder's counter near the msgpack limit must not make the window shift by it."""
    receiver = make_codec(1)
    top = 2**64 - 1
    assert receiver.decode(signed_packet(envelope(counter=1)), NOW) is not None
    assert receiver.decode(signed_packet(envelope(counter=top)), NOW) is not None
    assert receiver.decode(signed_packet(envelope(counter=top - 1)), NOW) is not None
    assert receiver.decode(signed_packet(envelope(counter=top)), NOW) is None
    assert receiver.decode(signed_packet(envelope(counter=2)), NOW) is None
    assert receiver.drops[DropReason.REPLAY] == 2
    # and likewise for the first packet of a new incarnation
    assert receiver.decode(signed_packet(envelope(incarnation=6, counter=top)), NOW) is not None
    assert receiver.decode(signed_packet(envelope(incarnation=6, counter=top - 63)), NOW)
    assert receiver.decode(signed_packet(envelope(incarnation=6, counter=top - 64)), NOW) is None


@pytest.mark.parametrize(
    "changes",
    [{"counter": 0}, {"counter": -1}, {"counter": -(2**63)}, {"incarnation": -1}],
    ids=["counter-0", "counter-negative", "counter-min", "incarnation-negative"],
)
def test_out_of_range_counter_or_incarnation_is_malformed(changes: dict[str, int]) -> None:
    receiver = make_codec(1)
    assert receiver.decode(signed_packet(envelope(**changes)), NOW) is None
    assert only_drop(receiver) is DropReason.MALFORMED


def test_replay_state_is_per_sender() -> None:
    node2, node3, receiver = make_codec(2), make_codec(3), make_codec(1)
    assert receiver.decode(node2.encode(SAMPLES[2], 1, NOW), NOW) is not None
    assert receiver.decode(node3.encode(SAMPLES[2], 1, NOW), NOW) is not None  # counter 1 too
    assert receiver.accepted == 2


def test_older_incarnation_is_stale() -> None:
    old, new, receiver = make_codec(2, incarnation=100), make_codec(2, incarnation=200), None
    receiver = make_codec(1)
    old_packet = old.encode(SAMPLES[2], 1, NOW)
    assert receiver.decode(new.encode(SAMPLES[2], 1, NOW), NOW) is not None
    assert receiver.decode(old_packet, NOW + 1) is None
    assert only_drop(receiver) is DropReason.STALE


def test_newer_incarnation_is_accepted_and_resets_the_window() -> None:
    old, receiver = make_codec(2, incarnation=100), make_codec(1)
    for _ in range(2 * REPLAY_WINDOW):  # the old process got far beyond one window
        assert receiver.decode(old.encode(SAMPLES[2], 1, NOW), NOW) is not None
    restarted = make_codec(2, incarnation=200)
    fresh = [restarted.encode(SAMPLES[2], 1, NOW + 1) for _ in range(3)]  # counters 1, 2, 3
    assert [receiver.decode(p, NOW + 1) is not None for p in reversed(fresh)] == [True] * 3
    assert receiver.decode(fresh[0], NOW + 1) is None
    assert only_drop(receiver) is DropReason.REPLAY
    # ... and the old process's packets are now stale, even with fresh counters.
    assert receiver.decode(old.encode(SAMPLES[2], 1, NOW + 1), NOW + 1) is None
    assert receiver.drops[DropReason.STALE] == 1


def test_lower_incarnation_accepted_after_long_silence() -> None:
    """A sender whose clock stepped back across a restart is not locked out forever.

    Once nothing from the remembered incarnation has been accepted for 2 x max_clock_skew,
    all of that incarnation's packets are stale by their own sent_at, so forgetting it is safe.
    """
    receiver = make_codec(1)
    old = make_codec(2, incarnation=500)
    old_packets = [old.encode(SAMPLES[2], 1, NOW) for _ in range(3)]
    assert receiver.decode(old_packets[0], NOW) is not None

    stepped_back = make_codec(2, incarnation=400)
    later = NOW + 2 * SKEW - 1
    assert receiver.decode(stepped_back.encode(SAMPLES[2], 1, later), later) is None
    assert only_drop(receiver) is DropReason.STALE

    later = NOW + 2 * SKEW + 1
    assert receiver.decode(stepped_back.encode(SAMPLES[2], 1, later), later) is not None
    # The old incarnation's captured packets cannot come back: they are stale by sent_at.
    assert receiver.decode(old_packets[1], later) is None
    assert receiver.drops[DropReason.STALE] == 2


def test_dropped_packet_does_not_touch_replay_state() -> None:
    """A packet failing a late check (here: wrong receiver) must not consume its counter."""
    receiver = make_codec(1)
    wrong = signed_packet(envelope(counter=1, receiver=3))
    assert receiver.decode(wrong, NOW) is None
    assert receiver.decode(signed_packet(envelope(counter=1)), NOW) is not None


# --- forgery -----------------------------------------------------------------------------


def test_forged_frames_without_the_key_are_never_accepted() -> None:
    """Everything an outsider can build without the key: wrong keys, guessed or empty tags,
    and spliced tags from real packets of other (sender, receiver, counter) combinations."""
    receiver = make_codec(1)
    real = make_codec(2)
    bodies = [
        MAGIC + msgspec.msgpack.encode(envelope(counter=c, msg=m))
        for c, m in enumerate(SAMPLES, start=1)
    ]
    tags = [b"\x00" * TAG_SIZE, b"\xff" * TAG_SIZE, hashlib.sha256(b"guess").digest()]
    tags += [hmac.new(k, b, hashlib.sha256).digest() for b in bodies for k in (OTHER_KEY, b"")]
    tags += [real.encode(m, 3, NOW)[-TAG_SIZE:] for m in SAMPLES]  # genuine tags, other bodies
    tags += [hashlib.sha256(KEY + b).digest() for b in bodies]  # naive keyed hash, not HMAC
    attempts = 0
    for body in bodies:
        for tag in tags:
            assert receiver.decode(body + tag, NOW) is None
            attempts += 1
    assert receiver.accepted == 0
    assert receiver.drops[DropReason.BAD_MAC] == attempts


# --- keys --------------------------------------------------------------------------------


def test_generated_key_parses_to_32_random_bytes() -> None:
    first, second = generate_cluster_key(), generate_cluster_key()
    assert first != second
    assert len(parse_cluster_key(first)) == 32
    assert base64.b64decode(first, validate=True) == parse_cluster_key(first)


def test_parse_key_accepts_whitespace_urlsafe_and_missing_padding() -> None:
    raw = bytes([0xFB, 0xFF]) * 20  # encodes with '+' and '/' (or '-' and '_')
    standard = base64.b64encode(raw).decode()
    urlsafe = base64.urlsafe_b64encode(raw).decode()
    assert "+" in standard or "/" in standard
    assert parse_cluster_key(f"  {standard}\n") == raw
    assert parse_cluster_key(urlsafe.rstrip("=")) == raw
    assert parse_cluster_key(standard[:20] + "\n" + standard[20:]) == raw


@pytest.mark.parametrize(
    "text",
    ["", "   \n", "not base64 at all!!!", "Zm9v" * 5 + "é", "QUJD*" + "A" * 40],
    ids=["empty", "blank", "punctuation", "non-ascii", "bad-char"],
)
def test_parse_key_rejects_non_base64_without_echoing_it(text: str) -> None:
    with pytest.raises(ValueError, match="cluster key") as caught:
        parse_cluster_key(text)
    if text.strip():
        assert text.strip() not in str(caught.value)
    assert caught.value.__cause__ is None


def test_parse_key_rejects_short_key_without_echoing_it() -> None:
    short = base64.b64encode(b"s3cr3t-but-short-0123456789ab").decode()
    with pytest.raises(ValueError, match="29 bytes; at least 32") as caught:
        parse_cluster_key(short)
    assert short not in str(caught.value)
