"""Unit tests for the FIP3 wire codec: round trips, every drop reason, and the freshness
rules that replaced the wall clock (echoed challenges, epochs, incarnations, windows).

Times are plain numbers: `now` is a node's monotonic clock, `WALL` the wall clock a sender
stamps (only carried along). Epochs last `EPOCH` seconds from a codec's `now` at creation.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

import msgspec
import pytest

from sidecar.messages import Ack, Heartbeat, Message, Resign, VoteRequest, VoteResponse
from sidecar.protocol import (
    MAGIC,
    MAX_ECHOES,
    MAX_PACKET_SIZE,
    MIN_PACKET_SIZE,
    PROTOCOL_VERSION,
    REPLAY_WINDOW,
    TAG_SIZE,
    Codec,
    Decoded,
    DropReason,
    EncodeError,
    Envelope,
    MessageTooLarge,
    Refused,
    generate_cluster_key,
    membership_digest,
    parse_cluster_key,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
WALL = 1_800_000_000.0
EPOCH = 1.0
MEMBERS = ((1, True), (2, True), (3, False))
DIGEST = membership_digest("test", MEMBERS)
OTHER_DIGEST = membership_digest("test", ((1, True), (2, True), (3, False), (4, True)))
#: A small message for tests about the envelope, where the message does not matter.
SMALL = VoteRequest(term=1, seq=1)
U63 = (1 << 63) - 1
U64 = (1 << 64) - 1

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
        starting=True,
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
    Heartbeat(
        term=7,
        seq=13,
        leader_id=2,
        leading=False,
        eligible=True,
        healthy=True,
        viable=True,
        ready_to_preempt=False,
        ack=Ack(seq=12, promised=True, held=0.0004),
    ),
    VoteRequest(term=8, seq=3),
    VoteResponse(term=8, seq=3, granted=False, reason="lease held"),
    Resign(term=8, reason="shutdown"),
]

Result = Decoded | Refused | DropReason


def make_codec(
    node_id: int,
    incarnation: int | None = None,
    *,
    key: bytes = KEY,
    now: float = 0.0,
    digests: tuple[int, ...] = (DIGEST,),
    peers: set[int] | None = None,
) -> Codec:
    """Node `node_id` of members {1, 2, 3}; incarnation 1000 + id unless given."""
    return Codec(
        node_id=node_id,
        key=key,
        peer_ids=({1, 2, 3} if peers is None else peers) - {node_id},
        incarnation=1000 + node_id if incarnation is None else incarnation,
        digests=digests,
        epoch_length=EPOCH,
        now=now,
    )


def send(sender: Codec, receiver: Codec, *, now: float, msg: Message = SMALL) -> Result:
    """`sender` encodes for `receiver` and `receiver` decodes, both at `now`."""
    return receiver.decode(sender.encode(msg, receiver.node_id, now=now, wall=WALL), now=now)


def connect(a: Codec, b: Codec, *, now: float = 0.0) -> None:
    """The handshake: one packet each way, after which both accept the other's packets."""
    send(a, b, now=now)
    assert isinstance(send(b, a, now=now), Decoded)
    assert a.knows(b.node_id) and b.knows(a.node_id)


def assert_refused(result: Result, reason: DropReason) -> Refused:
    assert isinstance(result, Refused), result
    assert result.reason is reason, result
    return result


def only_drop(codec: Codec) -> DropReason:
    """The single reason counted so far (fails if there is not exactly one drop)."""
    counted = {reason: n for reason, n in codec.drops.items() if n}
    assert sum(counted.values()) == 1, counted
    return next(iter(counted))


def peek(packet: bytes) -> Envelope:
    """What anyone on the path can read: the envelope is authenticated, not encrypted."""
    return msgspec.msgpack.decode(packet[len(MAGIC) : -TAG_SIZE], type=Envelope)


def signed_packet(envelope: Envelope | object, key: bytes = KEY) -> bytes:
    """A packet built by hand (as a key holder could), to reach the checks after the MAC."""
    body = MAGIC + msgspec.msgpack.encode(envelope)
    return body + hmac.new(key, body, hashlib.sha256).digest()


def envelope(**changes: object) -> Envelope:
    """From node 2 (incarnation 5) to node 1 as `make_codec(1)` makes it, fresh at now=0."""
    fields: dict[str, object] = {
        "version": PROTOCOL_VERSION,
        "sender": 2,
        "receiver": 1,
        "incarnation": 5,
        "epoch": 0,
        "counter": 1,
        "echo": ((1001, 0),),
        "digests": (DIGEST,),
        "sent_at": WALL,
        "msg": SMALL,
    }
    fields.update(changes)
    return Envelope(**fields)  # type: ignore[arg-type]


# --- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_type_round_trips(msg: Message) -> None:
    sender, receiver = make_codec(2, incarnation=77), make_codec(1)
    connect(sender, receiver)
    packet = sender.encode(msg, 1, now=0.5, wall=WALL)
    assert packet.startswith(MAGIC)
    assert len(packet) <= MAX_PACKET_SIZE

    decoded = receiver.decode(packet, now=0.7)

    assert decoded == Decoded(
        sender=2, incarnation=77, sent_at=WALL, digests=(DIGEST,), members=None, msg=msg
    )
    assert type(decoded.msg) is type(msg)
    assert receiver.accepted == 1
    assert receiver.drops[DropReason.STALE] == 1  # the handshake's first packet


def test_decode_accepts_bytearray_and_memoryview() -> None:
    sender, receiver = make_codec(2), make_codec(1)
    connect(sender, receiver)
    first = sender.encode(SMALL, 1, now=0.0, wall=WALL)
    second = sender.encode(SMALL, 1, now=0.0, wall=WALL)
    assert isinstance(receiver.decode(bytearray(first), now=0.0), Decoded)
    assert isinstance(receiver.decode(memoryview(second), now=0.0), Decoded)


def test_counters_start_at_one_and_count_per_receiver() -> None:
    codec = make_codec(1)
    to_2 = [peek(codec.encode(SMALL, 2, now=0.0, wall=WALL)).counter for _ in range(3)]
    to_3 = [peek(codec.encode(SMALL, 3, now=0.0, wall=WALL)).counter for _ in range(2)]
    assert to_2 == [1, 2, 3]
    assert to_3 == [1, 2]


def test_envelope_carries_incarnation_epoch_digests_and_the_wall_clock() -> None:
    codec = make_codec(2, incarnation=4242, now=100.0, digests=(DIGEST, OTHER_DIGEST))
    env = peek(codec.encode(SMALL, 1, now=103.5, wall=WALL + 7))
    assert (env.version, env.sender, env.receiver) == (PROTOCOL_VERSION, 2, 1)
    assert (env.incarnation, env.epoch) == (4242, 3)
    assert env.echo == ()  # never heard node 1
    assert env.digests == (DIGEST, OTHER_DIGEST)
    assert env.sent_at == WALL + 7
    assert env.members is None


def test_sent_at_is_carried_but_never_judged() -> None:
    """Freshness does not read the wall clock: any stamp is accepted and passed on."""
    sender, receiver = make_codec(2), make_codec(1)
    connect(sender, receiver)
    for wall in (0.0, -1e12, WALL + 1e9, WALL - 120.0, 1e300):
        packet = sender.encode(SMALL, 1, now=0.1, wall=wall)
        decoded = receiver.decode(packet, now=0.1)
        assert isinstance(decoded, Decoded) and decoded.sent_at == wall


@pytest.mark.parametrize("sent_at", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_sent_at_from_a_key_holder_is_passed_on(sent_at: float) -> None:
    receiver = make_codec(1)
    decoded = receiver.decode(signed_packet(envelope(sent_at=sent_at)), now=0.0)
    assert isinstance(decoded, Decoded)
    assert decoded.sent_at != decoded.sent_at or decoded.sent_at == sent_at  # nan != nan


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
        "config_mismatch",
        "replay",
        "duplicate_id",
        "receive_buffer_full",
    }
    with pytest.raises(TypeError):
        codec.drops[DropReason.REPLAY] = 5  # type: ignore[index]
    assert codec.accepted == 0


def test_count_drop_counts_a_decision_of_the_runtime() -> None:
    codec = make_codec(1)
    codec.count_drop(DropReason.DUPLICATE_ID)
    codec.count_drop(DropReason.DUPLICATE_ID)
    assert codec.drops[DropReason.DUPLICATE_ID] == 2
    assert codec.accepted == 0


# --- construction and encode errors ------------------------------------------------------


def test_short_key_rejected() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        Codec(node_id=1, key=b"x" * 31, peer_ids={2}, incarnation=1)


def test_own_id_in_peers_rejected() -> None:
    with pytest.raises(ValueError, match="own id"):
        Codec(node_id=1, key=KEY, peer_ids={1, 2}, incarnation=1)
    codec = make_codec(1)
    with pytest.raises(ValueError, match="own id"):
        codec.set_peers({1, 2})


@pytest.mark.parametrize("incarnation", [-1, 1 << 63, 1 << 64])
def test_incarnation_outside_63_bits_rejected(incarnation: int) -> None:
    with pytest.raises(ValueError, match="incarnation"):
        Codec(node_id=1, key=KEY, peer_ids={2}, incarnation=incarnation)


@pytest.mark.parametrize("length", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_epoch_length_rejected(length: float) -> None:
    with pytest.raises(ValueError, match="epoch_length"):
        Codec(node_id=1, key=KEY, peer_ids={2}, incarnation=1, epoch_length=length)


@pytest.mark.parametrize("digests", [(), (1, 2, 3)], ids=["none", "three"])
def test_one_or_two_membership_digests_only(digests: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="digest"):
        Codec(node_id=1, key=KEY, peer_ids={2}, incarnation=1, digests=digests)
    codec = make_codec(1)
    with pytest.raises(ValueError, match="digest"):
        codec.set_membership(digests, MEMBERS)


def test_encode_to_non_peer_or_self_raises() -> None:
    codec = make_codec(1)
    with pytest.raises(EncodeError, match="not a peer"):
        codec.encode(SMALL, receiver=9, now=0.0, wall=WALL)
    with pytest.raises(EncodeError, match="not a peer"):
        codec.encode(SMALL, receiver=1, now=0.0, wall=WALL)


@pytest.mark.parametrize(
    ("now", "wall"),
    [(float("nan"), WALL), (0.0, float("nan")), (float("inf"), WALL), (0.0, float("-inf"))],
)
def test_encode_rejects_non_finite_times(now: float, wall: float) -> None:
    codec = make_codec(1)
    with pytest.raises(EncodeError, match="finite"):
        codec.encode(SMALL, receiver=2, now=now, wall=wall)
    assert peek(codec.encode(SMALL, 2, now=0.0, wall=WALL)).counter == 1  # nothing burnt


def test_encode_rejects_non_message() -> None:
    with pytest.raises(EncodeError, match="not an election message"):
        make_codec(1).encode("hello", receiver=2, now=0.0, wall=WALL)  # type: ignore[arg-type]


def test_oversize_message_raises_and_does_not_burn_a_counter() -> None:
    sender, receiver = make_codec(2), make_codec(1)
    connect(sender, receiver)
    with pytest.raises(MessageTooLarge, match="limit 512"):
        sender.encode(Resign(term=1, reason="x" * MAX_PACKET_SIZE), 1, now=0.0, wall=WALL)
    packet = sender.encode(Resign(term=1, reason="ok"), 1, now=0.0, wall=WALL)
    assert peek(packet).counter == 2  # the handshake used 1
    assert isinstance(receiver.decode(packet, now=0.0), Decoded)


def test_largest_message_that_fits_is_exactly_at_the_limit() -> None:
    sender, receiver = make_codec(2), make_codec(1)
    connect(sender, receiver)
    fitting = None
    for length in range(MAX_PACKET_SIZE):
        try:
            fitting = sender.encode(Resign(term=1, reason="r" * length), 1, now=0.0, wall=WALL)
        except MessageTooLarge:
            break
    assert fitting is not None
    assert len(fitting) == MAX_PACKET_SIZE
    assert isinstance(receiver.decode(fitting, now=0.0), Decoded)


# --- packet size -------------------------------------------------------------------------

#: Members that fit in one packet at worst: two echoes, two digests, every integer at its
#: largest (ids near 2**63, counter near 2**64), the largest message the election sends.
#: With ids below 128 (one msgpack byte each) it is 77. Keep the README in step.
LARGEST_MEMBERSHIP_WORST_CASE = 21
LARGEST_MEMBERSHIP_SMALL_IDS = 77

#: The largest message of each kind the election sends, every integer at its maximum and
#: the longest reason string it uses.
WORST_MESSAGES: list[Message] = [
    Heartbeat(
        term=U63,
        seq=U63,
        leader_id=U63,
        leading=True,
        eligible=True,
        healthy=True,
        viable=True,
        ready_to_preempt=True,
        starting=True,
        ack=Ack(seq=U63, promised=True, held=1e308),
    ),
    VoteRequest(term=U63, seq=U63),
    VoteResponse(term=U63, seq=U63, granted=False, reason="lower_id_viable"),
    Resign(term=U63, reason="unhealthy"),
]


def worst_case_sender(members: list[tuple[int, bool]]) -> Codec:
    """Node 2 that heard two incarnations of node 1 at huge epochs, during a membership
    change (two digests), with its counter at the msgpack limit."""
    sender = make_codec(2, incarnation=U63, digests=(U63, U63 - 1))
    sender.set_membership((U63, U63 - 1), members)
    for incarnation in (U63, U63 - 1):
        env = envelope(sender=1, receiver=2, incarnation=incarnation, epoch=U64, echo=())
        sender.decode(signed_packet(env), now=0.0)  # stale, but its challenge is learned
    return sender


def worst_case_size(sender: Codec, msg: Message) -> int:
    sender._counters[1] = U64 - 1  # the next packet carries the largest counter
    try:
        packet = sender.encode(msg, 1, now=1e15, wall=-1.7e308, include_members=True)
    except MessageTooLarge:
        return MAX_PACKET_SIZE + 1
    env = peek(packet)
    assert len(env.echo) == MAX_ECHOES and len(env.digests) == 2 and env.counter == U64
    return len(packet)


@pytest.mark.parametrize("msg", WORST_MESSAGES, ids=lambda m: type(m).__name__)
def test_worst_case_packet_with_15_members_fits(msg: Message) -> None:
    members = [(U63 - i, True) for i in range(15)]
    assert worst_case_size(worst_case_sender(members), msg) <= MAX_PACKET_SIZE


@pytest.mark.parametrize(
    ("first_id", "documented"),
    [(U63 - 100, LARGEST_MEMBERSHIP_WORST_CASE), (1, LARGEST_MEMBERSHIP_SMALL_IDS)],
    ids=["huge-ids", "small-ids"],
)
def test_the_largest_membership_that_fits_is_as_documented(first_id: int, documented: int) -> None:
    largest = 0
    for count in range(1, 200):
        members = [(first_id + i, True) for i in range(count)]
        sender = worst_case_sender(members)
        if any(worst_case_size(sender, m) > MAX_PACKET_SIZE for m in WORST_MESSAGES):
            break
        largest = count
    print(f"largest member list that fits (ids from {first_id}): {largest}")
    assert largest >= 15
    assert largest == documented


# --- drops before and at the MAC (not authentic: a bare DropReason) ---------------------


def test_wrong_key_is_bad_mac() -> None:
    outsider, receiver = make_codec(2, key=OTHER_KEY), make_codec(1)
    assert receiver.decode(outsider.encode(SAMPLES[0], 1, now=0.0, wall=WALL), now=0.0) is (
        DropReason.BAD_MAC
    )
    assert only_drop(receiver) is DropReason.BAD_MAC


def test_protocol_1_packet_is_bad_magic() -> None:
    """A node still running the old protocol (FIP1) is told apart before any crypto."""
    packet = make_codec(2).encode(SMALL, 1, now=0.0, wall=WALL)
    receiver = make_codec(1)
    assert receiver.decode(b"FIP1" + packet[4:], now=0.0) is DropReason.BAD_MAGIC
    assert only_drop(receiver) is DropReason.BAD_MAGIC


def test_truncated_packets() -> None:
    packet = make_codec(2).encode(SAMPLES[0], 1, now=0.0, wall=WALL)
    for length in range(len(packet)):
        receiver = make_codec(1)
        expected = DropReason.TOO_SHORT if length < MIN_PACKET_SIZE else DropReason.BAD_MAC
        assert receiver.decode(packet[:length], now=0.0) is expected, length
        assert only_drop(receiver) is expected


def test_extended_packets() -> None:
    packet = make_codec(2).encode(SAMPLES[0], 1, now=0.0, wall=WALL)
    for extra in (b"\x00", b"x" * 10, packet[-TAG_SIZE:]):
        receiver = make_codec(1)
        assert receiver.decode(packet + extra, now=0.0) is DropReason.BAD_MAC
        assert only_drop(receiver) is DropReason.BAD_MAC


def test_every_single_bit_flip_is_dropped() -> None:
    sender, receiver = make_codec(2), make_codec(1)
    connect(sender, receiver)
    packet = sender.encode(SAMPLES[0], 1, now=0.0, wall=WALL)
    for bit in range(len(packet) * 8):
        flipped = bytearray(packet)
        flipped[bit // 8] ^= 1 << (bit % 8)
        expected = DropReason.BAD_MAGIC if bit < len(MAGIC) * 8 else DropReason.BAD_MAC
        assert receiver.decode(bytes(flipped), now=0.0) is expected, bit
    assert receiver.accepted == 0
    assert isinstance(receiver.decode(packet, now=0.0), Decoded)  # the original is intact


def test_oversize_datagram_is_too_large() -> None:
    receiver = make_codec(1)
    assert receiver.decode(MAGIC + b"\x00" * MAX_PACKET_SIZE, now=0.0) is DropReason.TOO_LARGE
    assert only_drop(receiver) is DropReason.TOO_LARGE


def test_oversize_even_with_valid_mac_is_too_large() -> None:
    """The size limit holds on receive too, even for a (buggy) key holder."""
    receiver = make_codec(1)
    packet = signed_packet(envelope(msg=Resign(term=1, reason="r" * MAX_PACKET_SIZE)))
    assert len(packet) > MAX_PACKET_SIZE
    assert receiver.decode(packet, now=0.0) is DropReason.TOO_LARGE


def test_empty_datagram() -> None:
    receiver = make_codec(1)
    assert receiver.decode(b"", now=0.0) is DropReason.TOO_SHORT
    assert only_drop(receiver) is DropReason.TOO_SHORT


# --- authentic, but not for us (still a bare DropReason) ---------------------------------


def _fields() -> dict[str, object]:
    return msgspec.structs.asdict(envelope())


@pytest.mark.parametrize(
    "body",
    [
        {"version": 2, "sender": 2},  # a map, not the array an envelope is
        [2, 2, 1, 5, 0, 1, [[1001, 0]], [DIGEST], WALL],  # missing fields
        [*_fields().values(), None, "extra"],  # too many fields
        [2, 2, 1, 5, 0, "1", [[1001, 0]], [DIGEST], WALL, {"type": "ack"}],  # wrong type
        [*list(_fields().values())[:9], {"type": "nope", "term": 1}],  # unknown tag
        [*list(_fields().values())[:9], {"type": "ack", "term": 1}],  # incomplete message
    ],
    ids=["map", "missing", "extra", "wrong-type", "unknown-tag", "incomplete-msg"],
)
def test_authentic_but_malformed_body(body: object) -> None:
    receiver = make_codec(1)
    assert receiver.decode(signed_packet(body), now=0.0) is DropReason.MALFORMED
    assert only_drop(receiver) is DropReason.MALFORMED


@pytest.mark.parametrize(
    "changes",
    [
        {"counter": 0},
        {"counter": -1},
        {"incarnation": -1},
        {"incarnation": 1 << 63},
        {"epoch": -1},
        {"echo": ((1001, 0),) * (MAX_ECHOES + 1)},
        {"echo": ((-1, 0),)},
        {"digests": ()},
        {"digests": (1, 2, 3)},
    ],
    ids=[
        "counter-0",
        "counter-negative",
        "incarnation-negative",
        "incarnation-64-bit",
        "epoch-negative",
        "three-echoes",
        "echo-negative",
        "no-digest",
        "three-digests",
    ],
)
def test_out_of_range_fields_are_malformed(changes: dict[str, object]) -> None:
    receiver = make_codec(1)
    assert receiver.decode(signed_packet(envelope(**changes)), now=0.0) is DropReason.MALFORMED
    assert only_drop(receiver) is DropReason.MALFORMED


def test_body_that_is_not_msgpack_is_malformed() -> None:
    receiver = make_codec(1)
    raw = MAGIC + b"\xc1\xc1\xc1"  # 0xc1 is never valid msgpack
    packet = raw + hmac.new(KEY, raw, hashlib.sha256).digest()
    assert receiver.decode(packet, now=0.0) is DropReason.MALFORMED


def test_bad_version() -> None:
    receiver = make_codec(1)
    assert receiver.decode(signed_packet(envelope(version=1)), now=0.0) is DropReason.BAD_VERSION
    assert only_drop(receiver) is DropReason.BAD_VERSION


def test_unknown_sender() -> None:
    stranger = Codec(node_id=9, key=KEY, peer_ids={1}, incarnation=1)
    receiver = make_codec(1)
    packet = stranger.encode(SMALL, 1, now=0.0, wall=WALL)
    assert receiver.decode(packet, now=0.0) is DropReason.UNKNOWN_SENDER
    assert not receiver.knows(9)


def test_wrong_receiver() -> None:
    sender, node3 = make_codec(2), make_codec(3)
    packet_for_1 = sender.encode(SMALL, receiver=1, now=0.0, wall=WALL)
    assert node3.decode(packet_for_1, now=0.0) is DropReason.WRONG_RECEIVER
    assert only_drop(node3) is DropReason.WRONG_RECEIVER


def test_own_packet_reflected_back_is_from_self() -> None:
    codec = make_codec(1)
    packet = codec.encode(SMALL, receiver=2, now=0.0, wall=WALL)
    assert codec.decode(packet, now=0.0) is DropReason.FROM_SELF
    assert only_drop(codec) is DropReason.FROM_SELF


def test_packets_not_for_us_teach_no_challenge() -> None:
    """Only a packet addressed to us may tell us a peer's (incarnation, epoch)."""
    sender, node3 = make_codec(2), make_codec(3)
    node3.decode(sender.encode(SMALL, receiver=1, now=0.0, wall=WALL), now=0.0)
    assert not node3.knows(2)


# --- the handshake and epochs ------------------------------------------------------------


def test_a_fresh_codecs_first_packet_is_stale_and_one_packet_back_completes_the_handshake() -> None:
    a, b = make_codec(2), make_codec(1)
    assert not a.knows(1) and not b.knows(2)

    first = assert_refused(send(a, b, now=0.0), DropReason.STALE)
    assert (first.sender, first.incarnation) == (2, 1002)  # who it was is still reported
    assert b.knows(2) and not a.knows(1)

    reply = send(b, a, now=0.1)  # echoes a's challenge: accepted at once
    assert isinstance(reply, Decoded)
    assert a.knows(1)

    assert isinstance(send(a, b, now=0.2), Decoded)
    assert (a.accepted, b.accepted) == (1, 1)
    assert b.drops[DropReason.STALE] == 1


def test_no_echo_is_stale() -> None:
    receiver = make_codec(1)
    assert_refused(receiver.decode(signed_packet(envelope(echo=())), now=0.0), DropReason.STALE)


def test_foreign_echo_is_stale() -> None:
    """An echo of another incarnation of ours (a previous process) proves nothing now."""
    receiver = make_codec(1, incarnation=1001)
    for echo in [((1000, 0),), ((1002, 0), (0, 0)), ((U63, 0),)]:
        result = receiver.decode(signed_packet(envelope(echo=echo)), now=0.0)
        assert_refused(result, DropReason.STALE)
    assert receiver.accepted == 0


@pytest.mark.parametrize("epoch", [3, 4, 10**9, U63], ids=["next", "two-ahead", "far", "max"])
def test_echo_of_an_epoch_from_the_future_is_stale(epoch: int) -> None:
    receiver = make_codec(1)
    now = 2.5  # epoch 2
    packet = signed_packet(envelope(echo=((1001, epoch),)))
    assert_refused(receiver.decode(packet, now=now), DropReason.STALE)


def test_current_and_previous_epoch_accepted_two_epochs_old_refused() -> None:
    receiver = make_codec(1)  # epoch n covers [n, n + 1)

    def fresh(echoed: int, now: float, counter: int) -> bool:
        env = envelope(counter=counter, echo=((1001, echoed),))
        return isinstance(receiver.decode(signed_packet(env), now=now), Decoded)

    assert fresh(5, 5.0, 1)  # current, from its first instant
    assert fresh(5, 5.999, 2)
    assert fresh(5, 6.0, 3)  # previous
    assert fresh(5, 6.999, 4)
    assert not fresh(5, 7.0, 5)  # two epochs old
    assert not fresh(5, 100.0, 6)
    assert not fresh(5, 4.999, 7)  # one epoch ahead of the receiver's clock
    assert receiver.drops[DropReason.STALE] == 3


def test_epochs_follow_the_codecs_own_monotonic_clock() -> None:
    codec = Codec(node_id=1, key=KEY, peer_ids={2}, incarnation=1, epoch_length=0.5, now=10.0)
    assert [codec.epoch(t) for t in (10.0, 10.49, 10.5, 11.0, 13.26)] == [0, 0, 1, 2, 6]
    assert codec.epoch(9.0) == 0  # never negative, even for a time before the start


def test_steady_traffic_never_goes_stale_across_many_epochs() -> None:
    a, b = make_codec(2, now=3.3), make_codec(1, now=0.0)  # epochs not aligned
    connect(a, b, now=3.3)
    now = 3.3
    for step in range(300):
        now += (0.1, 0.37, 0.55, 0.9)[step % 4]  # under one epoch between packets
        assert isinstance(send(a, b, now=now), Decoded), now
        assert isinstance(send(b, a, now=now + 0.01), Decoded), now
    assert now > 100 * EPOCH
    assert a.drops[DropReason.STALE] == 0 and b.drops[DropReason.STALE] == 1


def test_a_packet_delayed_past_two_epochs_is_stale() -> None:
    a, b = make_codec(2), make_codec(1)
    connect(a, b, now=0.0)
    delayed = a.encode(SMALL, 1, now=0.9, wall=WALL)  # echoes b's epoch 0
    assert isinstance(send(a, b, now=1.5), Decoded)
    assert_refused(b.decode(delayed, now=2.0), DropReason.STALE)


def test_two_epochs_of_silence_need_one_new_round_trip() -> None:
    a, b = make_codec(2), make_codec(1)
    connect(a, b, now=0.0)
    assert_refused(send(a, b, now=2.5), DropReason.STALE)  # a's echo of b is too old...
    assert isinstance(send(b, a, now=2.6), Decoded)  # ... but b learned a's epoch from it
    assert isinstance(send(a, b, now=2.7), Decoded)


def test_a_refused_packet_does_not_burn_its_counter() -> None:
    """Freshness is checked before the replay window: the same packet, once it is fresh
    (here: its echo names an epoch that had not begun), is accepted."""
    receiver = make_codec(1)
    early = signed_packet(envelope(counter=1, echo=((1001, 3),)))
    assert_refused(receiver.decode(early, now=0.5), DropReason.STALE)
    assert isinstance(receiver.decode(early, now=3.5), Decoded)
    assert_refused(receiver.decode(early, now=3.6), DropReason.REPLAY)


def test_dropped_packet_does_not_touch_replay_state() -> None:
    """A packet failing a late check (here: wrong receiver) must not consume its counter."""
    receiver = make_codec(1)
    assert receiver.decode(signed_packet(envelope(counter=1, receiver=3)), now=0.0) is (
        DropReason.WRONG_RECEIVER
    )
    assert isinstance(receiver.decode(signed_packet(envelope(counter=1)), now=0.0), Decoded)


# --- restarts ----------------------------------------------------------------------------


@pytest.mark.parametrize("new_incarnation", [7, 2000, 0, U63], ids=["lower", "higher", "0", "max"])
def test_a_receiver_restart_refuses_every_packet_captured_before_it(new_incarnation: int) -> None:
    """Packets to node 1's first process, delivered or not, are all dead to its next one,
    at any time after the restart. (FIP1 accepted each once within max_clock_skew.)"""
    sender, receiver = make_codec(2), make_codec(1, incarnation=1001)
    connect(sender, receiver)
    captured = []
    for step in range(40):
        now = step * 0.1
        packet = sender.encode(SAMPLES[step % len(SAMPLES)], 1, now=now, wall=WALL)
        captured.append(packet)
        if step % 3:  # a third never arrived: fresh counters the window has not seen
            assert isinstance(receiver.decode(packet, now=now), Decoded)
        if step % 5 == 0:
            assert isinstance(send(receiver, sender, now=now), Decoded)

    for index, restart_at in enumerate((4.0, 4.05, 5.0, 120.0)):
        incarnation = new_incarnation - index if new_incarnation else index
        restarted = make_codec(1, incarnation=incarnation, now=restart_at)
        for packet in captured:
            assert_refused(restarted.decode(packet, now=restart_at), DropReason.STALE)
        assert restarted.accepted == 0
        # ... and the live sender gets through after one packet back.
        connect(sender, restarted, now=restart_at)


@pytest.mark.parametrize("new_incarnation", [5, 5000, 0, U63], ids=["lower", "higher", "0", "max"])
def test_a_sender_restart_is_accepted_after_one_round_trip(new_incarnation: int) -> None:
    """Whatever the random incarnation: there is no order between incarnations."""
    old, receiver = make_codec(2, incarnation=1002), make_codec(1)
    connect(old, receiver)
    for t in (0.1, 0.2, 0.3):
        assert isinstance(send(old, receiver, now=t), Decoded)

    new = make_codec(2, incarnation=new_incarnation, now=0.4)
    assert_refused(send(new, receiver, now=0.4), DropReason.STALE)
    reply = receiver.encode(SMALL, 2, now=0.45, wall=WALL)
    assert {inc for inc, _ in peek(reply).echo} == {1002, new_incarnation}  # both are echoed
    assert isinstance(new.decode(reply, now=0.45), Decoded)
    assert isinstance(send(new, receiver, now=0.5), Decoded)
    for t in (0.6, 0.7):  # its counters start at 1 again: a new window
        assert isinstance(send(new, receiver, now=t), Decoded)


def test_replay_windows_are_per_incarnation() -> None:
    receiver = make_codec(1)
    first, second = make_codec(2, incarnation=10), make_codec(2, incarnation=20)
    connect(first, receiver)
    connect(second, receiver)
    p1 = first.encode(SMALL, 1, now=0.1, wall=WALL)
    p2 = second.encode(SMALL, 1, now=0.1, wall=WALL)
    assert peek(p1).counter == peek(p2).counter == 2
    assert isinstance(receiver.decode(p1, now=0.1), Decoded)
    assert isinstance(receiver.decode(p2, now=0.1), Decoded)
    assert_refused(receiver.decode(p1, now=0.2), DropReason.REPLAY)
    assert_refused(receiver.decode(p2, now=0.2), DropReason.REPLAY)


def test_an_old_incarnations_packets_are_replays_while_fresh_and_stale_after() -> None:
    old, receiver = make_codec(2, incarnation=10), make_codec(1)
    connect(old, receiver)
    captured = [old.encode(SMALL, 1, now=0.2, wall=WALL) for _ in range(5)]
    for packet in captured:
        assert isinstance(receiver.decode(packet, now=0.2), Decoded)
    new = make_codec(2, incarnation=11, now=0.5)
    connect(new, receiver, now=0.5)
    for packet in captured:
        assert_refused(receiver.decode(packet, now=1.5), DropReason.REPLAY)
        assert_refused(receiver.decode(packet, now=2.0), DropReason.STALE)


def test_idle_windows_are_forgotten_safely() -> None:
    """Once an incarnation has been idle for two epochs its window may go: every packet it
    ever had accepted echoes an epoch that is no longer accepted."""
    receiver = make_codec(1)
    captured: list[bytes] = []
    now = 0.0
    for incarnation in range(100, 140):  # a node restarting forty times, 2.5 epochs apart
        sender = make_codec(2, incarnation=incarnation, now=now)
        connect(sender, receiver, now=now)
        for step in range(5):
            packet = sender.encode(SMALL, 1, now=now + 0.1 * step, wall=WALL)
            captured.append(packet)
            assert isinstance(receiver.decode(packet, now=now + 0.1 * step), Decoded)
        now += 2.5
    assert len(receiver._windows[2]) <= 2  # bounded: only the recent ones are kept
    for packet in captured[-5:]:  # the newest incarnation, still fresh: remembered
        assert_refused(receiver.decode(packet, now=now - 2.0), DropReason.REPLAY)
    for packet in captured:
        assert not isinstance(receiver.decode(packet, now=now), Decoded)
    assert receiver.accepted == 40 * 5


def test_many_live_incarnations_never_let_a_packet_through_twice() -> None:
    """More incarnations than the receiver keeps windows for, all within two epochs (a
    crash loop): a packet of one whose window would have to go must not count twice."""
    receiver = make_codec(1)
    captured: list[bytes] = []
    for index in range(8):
        now = 0.1 * index
        sender = make_codec(2, incarnation=500 + index, now=now)
        send(sender, receiver, now=now)
        send(receiver, sender, now=now)
        packet = sender.encode(SMALL, 1, now=now, wall=WALL)
        captured.append(packet)
        receiver.decode(packet, now=now)
    accepted = receiver.accepted
    for packet in captured:
        for t in (0.8, 1.0, 1.9):
            assert not isinstance(receiver.decode(packet, now=t), Decoded)
    assert receiver.accepted == accepted
    # ... and the newest incarnation gets a window once the older ones have gone idle.
    newest = make_codec(2, incarnation=900, now=2.9)
    connect(newest, receiver, now=2.9)
    assert isinstance(send(newest, receiver, now=3.0), Decoded)


# --- what a node echoes ------------------------------------------------------------------


def test_echoes_keep_the_two_most_recently_heard_incarnations() -> None:
    receiver = make_codec(1)
    heard = 0

    def hear(incarnation: int, epoch: int) -> None:
        nonlocal heard
        heard += 1
        env = envelope(incarnation=incarnation, epoch=epoch, counter=heard)
        assert isinstance(receiver.decode(signed_packet(env), now=0.01 * heard), Decoded)

    def echoed() -> tuple[tuple[int, int], ...]:
        return peek(receiver.encode(SMALL, 2, now=0.0, wall=WALL)).echo

    hear(10, 4)
    assert echoed() == ((10, 4),)
    hear(20, 1)
    hear(30, 7)
    assert set(echoed()) == {(20, 1), (30, 7)}
    hear(20, 2)  # heard again: now the most recent, and its newest epoch
    hear(40, 0)
    assert set(echoed()) == {(20, 2), (40, 0)}
    hear(40, 0)
    hear(20, 1)  # an older epoch (a late or replayed packet) never moves the echo back
    assert set(echoed()) == {(20, 2), (40, 0)}
    assert len(echoed()) == MAX_ECHOES
    assert peek(receiver.encode(SMALL, 3, now=0.0, wall=WALL)).echo == ()  # per peer


def test_replayed_packets_of_old_incarnations_never_evict_the_live_one() -> None:
    """An attacker with packets captured from two earlier processes of node 2 replays
    them: node 1 must keep echoing node 2's live process, or node 2 would refuse every
    packet from node 1 (a lock-out by replay)."""
    receiver = make_codec(1)
    old_packets = []
    for index, incarnation in enumerate((21, 22)):
        now = 3.0 * index
        old = make_codec(2, incarnation=incarnation, now=now)
        connect(old, receiver, now=now)
        old_packets.append(old.encode(SMALL, 1, now=now, wall=WALL))
    live = make_codec(2, incarnation=23, now=10.0)
    connect(live, receiver, now=10.0)
    for step in range(20):
        now = 10.0 + 0.1 * step
        assert isinstance(send(live, receiver, now=now), Decoded)
        for packet in old_packets:
            assert_refused(receiver.decode(packet, now=now), DropReason.STALE)
        assert isinstance(send(receiver, live, now=now), Decoded), step


def test_set_peers_forgets_removed_peers_and_keeps_the_others() -> None:
    a, b, c = make_codec(1, peers={1, 2, 3, 4}), make_codec(2), make_codec(3)
    connect(b, a)
    connect(c, a)
    a.set_peers({2, 4})
    assert a.peer_ids == frozenset({2, 4})
    assert a.knows(2) and not a.knows(3)
    assert isinstance(send(b, a, now=0.1), Decoded)  # node 2 unaffected
    assert send(c, a, now=0.1) is DropReason.UNKNOWN_SENDER
    with pytest.raises(EncodeError, match="not a peer"):
        a.encode(SMALL, 3, now=0.1, wall=WALL)
    a.set_peers({2, 3, 4})  # node 3 is back: it must hear our challenge again
    assert not a.knows(3)
    connect(c, a, now=0.2)
    assert isinstance(send(a, c, now=0.2), Decoded)


def test_a_peer_removed_and_added_again_still_accepts_our_packets() -> None:
    """Two reloads (remove node 3, add it back) while node 3 kept node 1 as a peer: node 1's
    counters to node 3 must go on from where they were, or node 3's replay window (which
    remembers node 1's process) refuses everything as a replay."""
    a, c = make_codec(1), make_codec(3)
    connect(a, c)
    for step in range(3 * REPLAY_WINDOW):
        assert isinstance(send(a, c, now=0.001 * step), Decoded)
    a.set_peers({2})
    a.set_peers({2, 3})
    connect(c, a, now=0.5)
    for step in range(5):
        assert isinstance(send(a, c, now=0.5 + 0.01 * step), Decoded), step


def test_a_peer_removed_and_added_again_cannot_replay_its_old_packets() -> None:
    a, c = make_codec(1), make_codec(3)
    connect(c, a)
    captured = [c.encode(SMALL, 1, now=0.1, wall=WALL) for _ in range(5)]
    for packet in captured:
        assert isinstance(a.decode(packet, now=0.1), Decoded)
    a.set_peers({2})
    a.set_peers({2, 3})
    for packet in captured:
        assert not isinstance(a.decode(packet, now=0.2), Decoded)


# --- membership --------------------------------------------------------------------------


def test_membership_digest_is_order_independent_and_63_bits() -> None:
    members = [(3, False), (1, True), (2, True)]
    assert membership_digest("c", members) == membership_digest("c", sorted(members))
    assert membership_digest("c", members) == membership_digest("c", reversed(members))
    assert membership_digest("c", iter(members)) == membership_digest("c", tuple(members))
    for name in ("", "c", "prod"):
        assert 0 <= membership_digest(name, members) < 1 << 63


def test_membership_digest_changes_with_name_ids_and_eligibility() -> None:
    base = membership_digest("prod", MEMBERS)
    variants = {
        "name": membership_digest("prod2", MEMBERS),
        "name case": membership_digest("Prod", MEMBERS),
        "id added": membership_digest("prod", (*MEMBERS, (4, True))),
        "id removed": membership_digest("prod", MEMBERS[:2]),
        "id renumbered": membership_digest("prod", ((1, True), (2, True), (4, False))),
        "eligibility": membership_digest("prod", ((1, True), (2, True), (3, True))),
        "eligibility swapped": membership_digest("prod", ((1, True), (2, False), (3, True))),
    }
    assert base not in variants.values(), variants
    assert len(set(variants.values())) == len(variants)


def test_disjoint_digests_are_a_config_mismatch_after_the_handshake() -> None:
    """Stale is checked first: a mismatched peer's first packet is stale like anyone's."""
    a, b = make_codec(2, digests=(OTHER_DIGEST,)), make_codec(1)
    assert_refused(send(a, b, now=0.0), DropReason.STALE)
    refused = assert_refused(send(b, a, now=0.0), DropReason.CONFIG_MISMATCH)
    assert (refused.sender, refused.incarnation, refused.digests) == (1, 1001, (DIGEST,))
    refused = assert_refused(send(a, b, now=0.1), DropReason.CONFIG_MISMATCH)
    assert refused.digests == (OTHER_DIGEST,)
    assert a.accepted == b.accepted == 0


def test_sharing_one_digest_is_enough_during_a_change() -> None:
    old_only, changing, new_only = (
        make_codec(1, digests=(DIGEST,)),
        make_codec(2, digests=(DIGEST, OTHER_DIGEST)),
        make_codec(3, digests=(OTHER_DIGEST,)),
    )
    connect(changing, old_only)
    connect(changing, new_only)
    for a, b in ((changing, old_only), (old_only, changing), (changing, new_only)):
        assert isinstance(send(a, b, now=0.1), Decoded)
    send(old_only, new_only, now=0.1)
    assert_refused(send(new_only, old_only, now=0.1), DropReason.CONFIG_MISMATCH)


def test_a_mismatched_packet_counts_once_the_membership_agrees() -> None:
    """Refused before the replay window: after a reload to the same membership it counts."""
    a, b = make_codec(2, digests=(OTHER_DIGEST,)), make_codec(1)
    send(a, b, now=0.0)
    send(b, a, now=0.0)
    packet = a.encode(SMALL, 1, now=0.1, wall=WALL)
    assert_refused(b.decode(packet, now=0.1), DropReason.CONFIG_MISMATCH)
    b.set_membership((DIGEST, OTHER_DIGEST), MEMBERS)
    assert isinstance(b.decode(packet, now=0.2), Decoded)


def test_members_travel_only_when_asked_and_survive_decoding() -> None:
    a, b = make_codec(2), make_codec(1)
    a.set_membership((DIGEST,), [(3, False), (1, True), (2, True)])
    connect(a, b)
    plain = b.decode(a.encode(SMALL, 1, now=0.1, wall=WALL), now=0.1)
    assert isinstance(plain, Decoded) and plain.members is None
    packet = a.encode(SMALL, 1, now=0.1, wall=WALL, include_members=True)
    assert peek(packet).members == MEMBERS  # sorted by id
    decoded = b.decode(packet, now=0.1)
    assert isinstance(decoded, Decoded)
    assert decoded.members == MEMBERS
    assert all(type(e) is bool for _, e in decoded.members)


def test_members_reach_a_peer_that_disagrees() -> None:
    theirs = ((1, True), (2, True), (3, False), (4, True))
    a, b = make_codec(2, digests=(OTHER_DIGEST,)), make_codec(1)
    a.set_membership((OTHER_DIGEST,), theirs)
    send(a, b, now=0.0)
    send(b, a, now=0.0)
    refused = assert_refused(
        b.decode(a.encode(SMALL, 1, now=0.1, wall=WALL, include_members=True), now=0.1),
        DropReason.CONFIG_MISMATCH,
    )
    assert refused.members == theirs


# --- replay ------------------------------------------------------------------------------


@pytest.fixture
def pair() -> tuple[Codec, Codec]:
    sender, receiver = make_codec(2), make_codec(1)
    connect(sender, receiver)
    return sender, receiver


def test_identical_packet_twice_is_replay(pair: tuple[Codec, Codec]) -> None:
    sender, receiver = pair
    packet = sender.encode(SAMPLES[0], 1, now=0.1, wall=WALL)
    assert isinstance(receiver.decode(packet, now=0.1), Decoded)
    refused = assert_refused(receiver.decode(packet, now=0.5), DropReason.REPLAY)
    assert (refused.sender, refused.incarnation) == (2, 1002)
    assert receiver.accepted == 1


def test_reordering_within_window_accepted_exactly_once(pair: tuple[Codec, Codec]) -> None:
    sender, receiver = pair
    packets = [sender.encode(SMALL, 1, now=0.1, wall=WALL) for _ in range(REPLAY_WINDOW)]
    order = list(reversed(packets))  # newest first: the oldest is 63 below the highest
    assert all(isinstance(receiver.decode(p, now=0.1), Decoded) for p in order)
    assert all(isinstance(receiver.decode(p, now=0.1), Refused) for p in packets)
    assert receiver.drops[DropReason.REPLAY] == REPLAY_WINDOW


def test_packet_beyond_window_is_rejected(pair: tuple[Codec, Codec]) -> None:
    sender, receiver = pair
    packets = [sender.encode(SMALL, 1, now=0.1, wall=WALL) for _ in range(REPLAY_WINDOW + 1)]
    assert isinstance(receiver.decode(packets[-1], now=0.1), Decoded)
    assert_refused(receiver.decode(packets[0], now=0.1), DropReason.REPLAY)  # 64 below
    assert isinstance(receiver.decode(packets[1], now=0.1), Decoded)  # 63 below: fine


def test_big_jump_forward_clears_the_window() -> None:
    receiver = make_codec(1)

    def accepted(counter: int) -> bool:
        result = receiver.decode(signed_packet(envelope(counter=counter)), now=0.0)
        return isinstance(result, Decoded)

    assert [accepted(c) for c in (1, 10_000, 9_999, 9_999, 1)] == [True, True, True, False, False]
    assert receiver.drops[DropReason.REPLAY] == 2


def test_huge_counter_jumps_are_handled_without_blowing_up() -> None:
    """A key holder's counter near the msgpack limit must not make the window shift by it."""
    receiver = make_codec(1)

    def accepted(counter: int, incarnation: int = 5) -> bool:
        env = envelope(counter=counter, incarnation=incarnation)
        return isinstance(receiver.decode(signed_packet(env), now=0.0), Decoded)

    assert [accepted(c) for c in (1, U64, U64 - 1, U64, 2)] == [True, True, True, False, False]
    # and likewise for the first packet of another incarnation
    assert [accepted(c, 6) for c in (U64, U64 - 63, U64 - 64)] == [True, True, False]


def test_replay_state_is_per_sender() -> None:
    node2, node3, receiver = make_codec(2), make_codec(3), make_codec(1)
    connect(node2, receiver)
    connect(node3, receiver)
    assert peek(node2.encode(SMALL, 1, now=0.0, wall=WALL)).counter == 2
    assert isinstance(send(node2, receiver, now=0.1), Decoded)
    assert isinstance(send(node3, receiver, now=0.1), Decoded)  # the same counter: fine


# --- forgery -----------------------------------------------------------------------------


def test_forged_frames_without_the_key_are_never_accepted() -> None:
    """Everything an outsider can build without the key: correct fields (it can read the
    echo off the wire), wrong keys, guessed or empty tags, and spliced genuine tags."""
    receiver = make_codec(1)
    real = make_codec(2)
    connect(real, receiver)
    bodies = [
        MAGIC + msgspec.msgpack.encode(envelope(counter=c, msg=m))
        for c, m in enumerate(SAMPLES, start=10)
    ]
    tags = [b"\x00" * TAG_SIZE, b"\xff" * TAG_SIZE, hashlib.sha256(b"guess").digest()]
    tags += [hmac.new(k, b, hashlib.sha256).digest() for b in bodies for k in (OTHER_KEY, b"")]
    tags += [real.encode(m, 3, now=0.0, wall=WALL)[-TAG_SIZE:] for m in SAMPLES]
    tags += [real.encode(m, 1, now=0.0, wall=WALL)[-TAG_SIZE:] for m in SAMPLES]
    tags += [hashlib.sha256(KEY + b).digest() for b in bodies]  # naive keyed hash, not HMAC
    attempts = 0
    for body in bodies:
        for tag in tags:
            assert receiver.decode(body + tag, now=0.0) is DropReason.BAD_MAC
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
