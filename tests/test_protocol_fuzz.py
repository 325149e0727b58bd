"""Property tests for the wire codec: it never raises, never double-accepts, never trusts
an unauthenticated byte. Strategies are derived from the message structs' own fields, so a
field added to `messages.py` is fuzzed without touching this file."""

from __future__ import annotations

import hashlib
import hmac
import types
import typing
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.messages import Ack, Message
from sidecar.protocol import (
    MAGIC,
    MAX_PACKET_SIZE,
    MESSAGE_TYPES,
    MIN_KEY_BYTES,
    REPLAY_WINDOW,
    TAG_SIZE,
    Codec,
    DropReason,
    Envelope,
    MessageTooLarge,
)

# A hang guard, not a speed test: a window that shifted by a huge counter jump once made
# decode() run for minutes on a single packet.
pytestmark = pytest.mark.timeout(120)

KEY = bytes(range(100, 132))
NOW = 1_800_000_000.0

settings.register_profile(
    "protocol", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
PROFILE = settings.get_profile("protocol")

INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what msgpack can carry


def strategy_for(annotation: Any) -> st.SearchStrategy[Any]:
    """A strategy for one struct field type (the few kinds messages.py uses)."""
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return INT64
    if annotation is str:
        return st.text(max_size=200)  # long enough to exceed the packet limit
    if annotation is float:
        return st.floats(allow_nan=False)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return st.one_of([strategy_for(arm) for arm in typing.get_args(annotation)])
    if annotation is type(None):
        return st.none()
    raise NotImplementedError(f"no strategy for field type {annotation!r}; add one here")


def message_strategy(cls: type[Message]) -> st.SearchStrategy[Message]:
    fields = {f.name: strategy_for(f.type) for f in msgspec.structs.fields(cls)}
    return st.builds(cls, **fields)


MESSAGES: st.SearchStrategy[Message] = st.one_of([message_strategy(c) for c in MESSAGE_TYPES])


def make_codec(node_id: int, incarnation: int = 1) -> Codec:
    return Codec(node_id=node_id, key=KEY, peer_ids={1, 2, 3} - {node_id}, incarnation=incarnation)


def total_drops(codec: Codec) -> int:
    return sum(codec.drops.values())


@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_strategies_cover_every_message_type(data: st.DataObject) -> None:
    """Guards the fuzzers below against silently testing nothing."""
    assert len(MESSAGE_TYPES) == 5
    for cls in MESSAGE_TYPES:
        assert isinstance(data.draw(message_strategy(cls)), cls)


@PROFILE
@given(data=st.binary(max_size=2 * MAX_PACKET_SIZE))
def test_arbitrary_bytes_never_raise_and_count_one_drop(data: bytes) -> None:
    codec = make_codec(1)
    assert codec.decode(data, NOW) is None
    assert total_drops(codec) == 1
    assert codec.accepted == 0


@PROFILE
@given(
    body=st.binary(max_size=MAX_PACKET_SIZE), tag=st.binary(min_size=TAG_SIZE, max_size=TAG_SIZE)
)
def test_magic_prefixed_garbage_is_dropped(body: bytes, tag: bytes) -> None:
    codec = make_codec(1)
    assert codec.decode(MAGIC + body + tag, NOW) is None
    assert total_drops(codec) == 1


@PROFILE
@given(body=st.binary(max_size=MAX_PACKET_SIZE - len(MAGIC) - TAG_SIZE))
def test_authentic_garbage_body_never_raises(body: bytes) -> None:
    """Even a key holder sending arbitrary bytes cannot crash the decoder."""
    codec = make_codec(1)
    signed = MAGIC + body
    result = codec.decode(signed + hmac.new(KEY, signed, hashlib.sha256).digest(), NOW)
    assert total_drops(codec) + codec.accepted == 1
    if result is None:
        assert total_drops(codec) == 1


@PROFILE
@given(
    value=st.recursive(
        st.none()
        | st.booleans()
        | INT64
        | st.floats()
        | st.text(max_size=8)
        | st.binary(max_size=8),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=12,
    )
)
def test_authentic_arbitrary_msgpack_never_raises(value: object) -> None:
    """Structured msgpack (maps, arrays, odd types) with a valid MAC: dropped or accepted, once."""
    codec = make_codec(1)
    signed = MAGIC + msgspec.msgpack.encode(value)
    packet = signed + hmac.new(KEY, signed, hashlib.sha256).digest()
    codec.decode(packet, NOW)
    assert total_drops(codec) + codec.accepted == 1


@PROFILE
@given(msg=MESSAGES, incarnation=st.integers(0, 2**63 - 1), skew=st.floats(-60, 60))
def test_arbitrary_messages_round_trip(msg: Message, incarnation: int, skew: float) -> None:
    sender, receiver = make_codec(2, incarnation), make_codec(1)
    try:
        packet = sender.encode(msg, receiver=1, wall_now=NOW + skew)
    except MessageTooLarge:
        # Refused only if the packet really would be too large.
        envelope = Envelope(1, 2, 1, incarnation, 1, NOW + skew, msg)
        assert len(MAGIC) + len(msgspec.msgpack.encode(envelope)) + TAG_SIZE > MAX_PACKET_SIZE
        return
    assert len(packet) <= MAX_PACKET_SIZE
    decoded = receiver.decode(packet, NOW)
    assert decoded is not None, dict(receiver.drops)
    assert decoded.msg == msg
    assert type(decoded.msg) is type(msg)
    assert (decoded.sender, decoded.sent_at, decoded.incarnation) == (2, NOW + skew, incarnation)


@PROFILE
@given(msg=MESSAGES, data=st.data())
def test_random_bit_flips_are_always_dropped(msg: Message, data: st.DataObject) -> None:
    try:
        packet = make_codec(2).encode(msg, receiver=1, wall_now=NOW)
    except MessageTooLarge:
        return
    bits = data.draw(
        st.sets(st.integers(0, len(packet) * 8 - 1), min_size=1, max_size=8), label="bits"
    )
    flipped = bytearray(packet)
    for bit in bits:
        flipped[bit // 8] ^= 1 << (bit % 8)
    receiver = make_codec(1)
    assert receiver.decode(bytes(flipped), NOW) is None
    reason = next(r for r, n in receiver.drops.items() if n)
    assert reason in (DropReason.BAD_MAGIC, DropReason.BAD_MAC)
    assert total_drops(receiver) == 1


@PROFILE
@given(
    msg=MESSAGES,
    key=st.binary(min_size=MIN_KEY_BYTES, max_size=64).filter(lambda k: k != KEY),
    tag=st.binary(min_size=TAG_SIZE, max_size=TAG_SIZE),
)
def test_forgeries_are_never_accepted(msg: Message, key: bytes, tag: bytes) -> None:
    """Without the key, neither another key nor a guessed tag gets a packet through."""
    forger = Codec(node_id=2, key=key, peer_ids={1}, incarnation=1)
    try:
        forged = forger.encode(msg, receiver=1, wall_now=NOW)
    except MessageTooLarge:
        return
    receiver = make_codec(1)
    assert receiver.decode(forged, NOW) is None
    assert receiver.decode(forged[:-TAG_SIZE] + tag, NOW) is None
    assert receiver.accepted == 0
    assert receiver.drops[DropReason.BAD_MAC] == 2


@PROFILE
@given(
    count=st.integers(1, 3 * REPLAY_WINDOW),
    data=st.data(),
)
def test_random_deliveries_accept_each_counter_at_most_once(
    count: int, data: st.DataObject
) -> None:
    """Packets of one sender delivered with duplicates and in any order.

    The codec must agree exactly with the reference rule: a counter is accepted iff it was
    not accepted before and is less than REPLAY_WINDOW below the highest counter accepted.
    """
    sender, receiver = make_codec(2), make_codec(1)
    packets = [
        sender.encode(Ack(term=1, seq=i, promised=False), 1, NOW) for i in range(count)
    ]  # counters 1..count
    schedule = data.draw(
        st.lists(st.integers(0, count - 1), min_size=1, max_size=4 * count), label="schedule"
    )
    accepted_counters: set[int] = set()
    highest = 0
    for index in schedule:
        counter = index + 1
        expected = counter not in accepted_counters and counter > highest - REPLAY_WINDOW
        decoded = receiver.decode(packets[index], NOW)
        assert (decoded is not None) == expected, (counter, highest)
        if decoded is not None:
            assert decoded.msg.seq == index  # type: ignore[union-attr]
            accepted_counters.add(counter)
            highest = max(highest, counter)
    assert receiver.accepted == len(accepted_counters)
    assert receiver.drops[DropReason.REPLAY] == len(schedule) - len(accepted_counters)
    assert total_drops(receiver) == receiver.drops[DropReason.REPLAY]


ENVELOPES: st.SearchStrategy[Envelope] = st.builds(
    Envelope,
    version=st.sampled_from([0, 1, 1, 1, 2]),
    sender=st.integers(0, 4),
    receiver=st.integers(0, 4),
    incarnation=st.one_of(st.integers(0, 3), INT64),
    counter=st.one_of(st.integers(1, 3 * REPLAY_WINDOW), INT64),
    sent_at=st.one_of(st.floats(NOW - 100, NOW + 100), st.floats()),
    msg=MESSAGES,
)


@PROFILE
@given(envelopes=st.lists(ENVELOPES, min_size=1, max_size=20))
def test_key_holder_envelopes_never_raise(envelopes: list[Envelope]) -> None:
    """Any sequence of authentic envelopes, with any field values a buggy or hostile
    member could put in them: each is accepted or counted as one drop, never raises."""
    codec = make_codec(1)
    for count, env in enumerate(envelopes, start=1):
        signed = MAGIC + msgspec.msgpack.encode(env)
        codec.decode(signed + hmac.new(KEY, signed, hashlib.sha256).digest(), NOW)
        assert total_drops(codec) + codec.accepted == count


@PROFILE
@given(
    counters=st.lists(
        st.one_of(st.integers(1, 2 * REPLAY_WINDOW), st.integers(1, 2**64 - 1)),
        min_size=1,
        max_size=60,
    )
)
def test_arbitrary_counters_match_the_reference_window(counters: list[int]) -> None:
    """Counters as a key holder could choose them, including jumps of up to 2**64."""
    codec = make_codec(1)
    accepted: set[int] = set()
    highest = 0
    for counter in counters:
        env = Envelope(1, 2, 1, 7, counter, NOW, Ack(term=1, seq=counter, promised=False))
        signed = MAGIC + msgspec.msgpack.encode(env)
        decoded = codec.decode(signed + hmac.new(KEY, signed, hashlib.sha256).digest(), NOW)
        expected = counter not in accepted and counter > highest - REPLAY_WINDOW
        assert (decoded is not None) == expected, (counter, highest)
        if expected:
            accepted.add(counter)
            highest = max(highest, counter)
