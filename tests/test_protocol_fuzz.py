"""Property tests for the FIP3 codec: it never raises, never accepts a packet twice or a
packet not made for the receiving process, and never trusts an unauthenticated byte.

Strategies are derived from the message structs' own fields, so a field added to
`messages.py` is fuzzed without touching this file. The model-based test at the end runs
random schedules of sends, deliveries, replays, delays and restarts of either side against
the rules the module docstring states.
"""

from __future__ import annotations

import hashlib
import hmac
import types
import typing
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sidecar.messages import Message, VoteRequest
from sidecar.protocol import (
    MAGIC,
    MAX_ECHOES,
    MAX_PACKET_SIZE,
    MESSAGE_TYPES,
    MIN_KEY_BYTES,
    PROTOCOL_VERSION,
    REPLAY_WINDOW,
    TAG_SIZE,
    Codec,
    Decoded,
    DropReason,
    Envelope,
    MessageTooLarge,
    Refused,
)

# A hang guard, not a speed test: a window that shifted by a huge counter jump once made
# decode() run for minutes on a single packet.
pytestmark = pytest.mark.timeout(120)

KEY = bytes(range(100, 132))
WALL = 1_800_000_000.0
DIGEST = 77
EPOCH = 1.0

settings.register_profile(
    "protocol", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
PROFILE = settings.get_profile("protocol")

INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what msgpack can carry
U63 = st.integers(0, 2**63 - 1)


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
    if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
        return message_strategy(annotation)  # a struct inside a message (Heartbeat.ack)
    raise NotImplementedError(f"no strategy for field type {annotation!r}; add one here")


def message_strategy(cls: type[msgspec.Struct]) -> st.SearchStrategy[Any]:
    fields = {f.name: strategy_for(f.type) for f in msgspec.structs.fields(cls)}
    return st.builds(cls, **fields)


MESSAGES: st.SearchStrategy[Message] = st.one_of([message_strategy(c) for c in MESSAGE_TYPES])


def make_codec(node_id: int, incarnation: int = 1, *, now: float = 0.0) -> Codec:
    return Codec(
        node_id=node_id,
        key=KEY,
        peer_ids={1, 2, 3} - {node_id},
        incarnation=incarnation,
        digests=(DIGEST,),
        epoch_length=EPOCH,
        now=now,
    )


def connected(sender_incarnation: int = 2, *, now: float = 0.0) -> tuple[Codec, Codec]:
    """Node 2 and node 1 after the handshake: node 1 accepts node 2's next packet."""
    sender, receiver = make_codec(2, sender_incarnation, now=now), make_codec(1, now=now)
    receiver.decode(sender.encode(VoteRequest(1, 1), 1, now=now, wall=WALL), now=now)
    assert isinstance(
        sender.decode(receiver.encode(VoteRequest(1, 1), 2, now=now, wall=WALL), now=now), Decoded
    )
    return sender, receiver


def sign(body: bytes, key: bytes = KEY) -> bytes:
    signed = MAGIC + body
    return signed + hmac.new(key, signed, hashlib.sha256).digest()


def total_drops(codec: Codec) -> int:
    return sum(codec.drops.values())


def peek(packet: bytes) -> Envelope:
    return msgspec.msgpack.decode(packet[len(MAGIC) : -TAG_SIZE], type=Envelope)


@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_strategies_cover_every_message_type(data: st.DataObject) -> None:
    """Guards the fuzzers below against silently testing nothing."""
    assert len(MESSAGE_TYPES) == 4
    for cls in MESSAGE_TYPES:
        assert isinstance(data.draw(message_strategy(cls)), cls)


# --- anything at all ---------------------------------------------------------------------


@PROFILE
@given(data=st.binary(max_size=2 * MAX_PACKET_SIZE))
def test_arbitrary_bytes_never_raise_and_count_one_drop(data: bytes) -> None:
    codec = make_codec(1)
    assert isinstance(codec.decode(data, now=0.0), DropReason)
    assert total_drops(codec) == 1
    assert codec.accepted == 0


@PROFILE
@given(
    body=st.binary(max_size=MAX_PACKET_SIZE), tag=st.binary(min_size=TAG_SIZE, max_size=TAG_SIZE)
)
def test_magic_prefixed_garbage_is_dropped(body: bytes, tag: bytes) -> None:
    codec = make_codec(1)
    expected = (DropReason.TOO_SHORT, DropReason.BAD_MAC, DropReason.TOO_LARGE)
    assert codec.decode(MAGIC + body + tag, now=0.0) in expected
    assert total_drops(codec) == 1


@PROFILE
@given(body=st.binary(max_size=MAX_PACKET_SIZE - len(MAGIC) - TAG_SIZE), now=st.floats())
def test_authentic_garbage_body_never_raises(body: bytes, now: float) -> None:
    """Even a key holder sending arbitrary bytes, at any time, cannot crash the decoder."""
    codec = make_codec(1)
    result = codec.decode(sign(body), now=now)
    assert total_drops(codec) + codec.accepted == 1
    assert isinstance(result, Decoded) == (codec.accepted == 1)


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
            st.lists(inner, max_size=11) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=20,
    )
)
def test_authentic_arbitrary_msgpack_never_raises(value: object) -> None:
    """Structured msgpack (maps, arrays, odd types) with a valid MAC: one verdict, no raise."""
    codec = make_codec(1)
    codec.decode(sign(msgspec.msgpack.encode(value)), now=0.0)
    assert total_drops(codec) + codec.accepted == 1


ENVELOPES: st.SearchStrategy[Envelope] = st.builds(
    Envelope,
    version=st.sampled_from([0, 1, 2, PROTOCOL_VERSION, PROTOCOL_VERSION, PROTOCOL_VERSION + 1]),
    sender=st.integers(0, 4),
    receiver=st.integers(0, 4),
    incarnation=st.one_of(st.integers(0, 3), U63),
    epoch=st.one_of(st.integers(0, 5), st.integers(0, 2**64 - 1)),
    counter=st.one_of(st.integers(1, 3 * REPLAY_WINDOW), st.integers(1, 2**64 - 1)),
    echo=st.lists(
        st.tuples(st.one_of(st.just(1), U63), st.one_of(st.integers(-2, 6), INT64)),
        max_size=MAX_ECHOES,
    ).map(tuple),
    digests=st.lists(st.one_of(st.just(DIGEST), INT64), min_size=1, max_size=2).map(tuple),
    sent_at=st.floats(),
    msg=MESSAGES,
    members=st.none() | st.lists(st.tuples(INT64, st.booleans()), max_size=5).map(tuple),
)


@PROFILE
@given(
    envelopes=st.lists(ENVELOPES, min_size=1, max_size=20),
    times=st.lists(st.floats(-10, 10), min_size=20, max_size=20),
)
@example(  # an accepted one, so the checks on accepted envelopes always run
    envelopes=[
        Envelope(
            version=PROTOCOL_VERSION,
            sender=2,
            receiver=1,
            incarnation=7,
            epoch=0,
            counter=1,
            echo=((1, 0),),
            digests=(DIGEST,),
            sent_at=0.0,
            msg=VoteRequest(term=1, seq=1),
        )
    ],
    times=[0.0] * 20,
)
def test_key_holder_envelopes_never_raise(envelopes: list[Envelope], times: list[float]) -> None:
    """Any sequence of authentic envelopes, with any field values a buggy or hostile member
    could put in them: each is accepted or counted as one drop, and none is accepted
    unless it echoes the receiver's own incarnation at its current or previous epoch."""
    codec = make_codec(1)
    count = 0
    for env, now in zip(envelopes, times, strict=False):
        try:
            packet = sign(msgspec.msgpack.encode(env))
        except OverflowError:  # an integer msgpack cannot carry: nobody could send it
            continue
        count += 1
        result = codec.decode(packet, now=now)
        current = codec.epoch(now)
        if isinstance(result, Decoded):
            assert any(i == 1 and current - 1 <= e <= current for i, e in env.echo), env
            assert set(env.digests) & {DIGEST}
            assert (env.sender, env.receiver, env.version) in {
                (2, 1, PROTOCOL_VERSION),
                (3, 1, PROTOCOL_VERSION),
            }
        assert total_drops(codec) + codec.accepted == count


# --- round trips and forgeries -----------------------------------------------------------


@PROFILE
@given(
    msg=MESSAGES,
    incarnation=U63,
    wall=st.floats(allow_nan=False, allow_infinity=False),
    start=st.floats(-1e6, 1e6),
    include_members=st.booleans(),
)
def test_arbitrary_messages_round_trip(
    msg: Message, incarnation: int, wall: float, start: float, include_members: bool
) -> None:
    sender, receiver = connected(incarnation, now=start)
    sender.set_membership((DIGEST,), [(3, False), (1, True), (2, True)])
    try:
        packet = sender.encode(msg, 1, now=start + 0.5, wall=wall, include_members=include_members)
    except MessageTooLarge:
        # Refused only if the packet really would be too large.
        env = Envelope(PROTOCOL_VERSION, 2, 1, incarnation, 0, 2, ((1, 0),), (DIGEST,), wall, msg)
        assert len(MAGIC) + len(msgspec.msgpack.encode(env)) + TAG_SIZE > MAX_PACKET_SIZE
        return
    assert len(packet) <= MAX_PACKET_SIZE
    decoded = receiver.decode(packet, now=start + 0.9)
    assert isinstance(decoded, Decoded), decoded
    assert decoded.msg == msg
    assert type(decoded.msg) is type(msg)
    assert (decoded.sender, decoded.incarnation, decoded.digests) == (2, incarnation, (DIGEST,))
    assert decoded.sent_at == wall
    assert decoded.members == (((1, True), (2, True), (3, False)) if include_members else None)


@PROFILE
@given(msg=MESSAGES, data=st.data())
def test_random_bit_flips_are_always_dropped(msg: Message, data: st.DataObject) -> None:
    sender, receiver = connected()
    try:
        packet = sender.encode(msg, receiver=1, now=0.0, wall=WALL)
    except MessageTooLarge:
        return
    bits = data.draw(
        st.sets(st.integers(0, len(packet) * 8 - 1), min_size=1, max_size=8), label="bits"
    )
    flipped = bytearray(packet)
    for bit in bits:
        flipped[bit // 8] ^= 1 << (bit % 8)
    assert receiver.decode(bytes(flipped), now=0.0) in (DropReason.BAD_MAGIC, DropReason.BAD_MAC)
    assert total_drops(receiver) == 2  # the handshake's stale first packet, and this
    assert receiver.accepted == 0


@PROFILE
@given(
    msg=MESSAGES,
    key=st.binary(min_size=MIN_KEY_BYTES, max_size=64).filter(lambda k: k != KEY),
    tag=st.binary(min_size=TAG_SIZE, max_size=TAG_SIZE),
    incarnation=U63,
)
def test_forgeries_are_never_accepted(
    msg: Message, key: bytes, tag: bytes, incarnation: int
) -> None:
    """Without the key nothing gets through, even with every field right: the forger read
    the receiver's live challenge off the wire and echoes it."""
    real, receiver = connected()
    echo = peek(real.encode(VoteRequest(1, 1), 1, now=0.0, wall=WALL)).echo
    assert echo == ((1, 0),)
    forged_env = Envelope(PROTOCOL_VERSION, 2, 1, incarnation, 0, 99, echo, (DIGEST,), WALL, msg)
    try:
        body = msgspec.msgpack.encode(forged_env)
    except OverflowError:
        return
    if len(MAGIC) + len(body) + TAG_SIZE > MAX_PACKET_SIZE:
        return
    before = total_drops(receiver)
    assert receiver.decode(sign(body, key), now=0.0) is DropReason.BAD_MAC
    assert receiver.decode(MAGIC + body + tag, now=0.0) is DropReason.BAD_MAC
    assert receiver.accepted == 0
    assert total_drops(receiver) == before + 2
    assert isinstance(receiver.decode(sign(body), now=0.0), Decoded)  # the key is all it lacked


# --- replay windows ----------------------------------------------------------------------


@PROFILE
@given(count=st.integers(1, 3 * REPLAY_WINDOW), data=st.data())
def test_random_deliveries_accept_each_counter_at_most_once(
    count: int, data: st.DataObject
) -> None:
    """Packets of one sender delivered with duplicates and in any order, within one epoch.

    The codec must agree exactly with the reference rule: a counter is accepted iff it was
    not accepted before and is less than REPLAY_WINDOW below the highest counter accepted.
    """
    sender, receiver = connected()
    packets = [
        sender.encode(VoteRequest(term=1, seq=i), 1, now=0.0, wall=WALL) for i in range(count)
    ]
    first = peek(packets[0]).counter
    schedule = data.draw(
        st.lists(st.integers(0, count - 1), min_size=1, max_size=4 * count), label="schedule"
    )
    accepted_counters: set[int] = set()
    highest = 0
    for index in schedule:
        counter = first + index
        expected = counter not in accepted_counters and counter > highest - REPLAY_WINDOW
        decoded = receiver.decode(packets[index], now=0.5)
        assert isinstance(decoded, Decoded) == expected, (counter, highest)
        if isinstance(decoded, Decoded):
            assert decoded.msg.seq == index  # type: ignore[union-attr]
            accepted_counters.add(counter)
            highest = max(highest, counter)
        else:
            assert isinstance(decoded, Refused) and decoded.reason is DropReason.REPLAY
    assert receiver.accepted == len(accepted_counters)
    assert receiver.drops[DropReason.REPLAY] == len(schedule) - len(accepted_counters)


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
        env = Envelope(
            PROTOCOL_VERSION, 2, 1, 7, 0, counter, ((1, 0),), (DIGEST,), WALL, VoteRequest(1, 1)
        )
        decoded = codec.decode(sign(msgspec.msgpack.encode(env)), now=0.0)
        expected = counter not in accepted and counter > highest - REPLAY_WINDOW
        assert isinstance(decoded, Decoded) == expected, (counter, highest)
        if expected:
            accepted.add(counter)
            highest = max(highest, counter)


@PROFILE
@given(
    gaps=st.lists(st.sampled_from([0.0, 0.05, 0.2, 0.5, 1.1, 2.5]), min_size=1, max_size=9),
    packets_each=st.integers(1, 4),
    replay_steps=st.lists(st.floats(0, 0.9), min_size=1, max_size=6),
    data=st.data(),
)
def test_a_crash_loop_and_replays_of_it_never_count_twice_nor_lock_out_the_survivor(
    gaps: list[float], packets_each: int, replay_steps: list[float], data: st.DataObject
) -> None:
    """Node 2 restarts over and over (each process completes the handshake and sends a few
    packets); an attacker captured everything. Replaying it at any time never gets a
    packet accepted twice, and the last process, talking with node 1 while the replays go
    on (a packet each way less than an epoch apart), has every packet accepted each way."""
    receiver = make_codec(1, 999)
    incarnations = data.draw(st.lists(U63, min_size=len(gaps), max_size=len(gaps), unique=True))
    captured: list[bytes] = []
    accepted: set[bytes] = set()

    def deliver(packet: bytes, at: float) -> Decoded | Refused | DropReason:
        result = receiver.decode(packet, now=at)
        if isinstance(result, Decoded):
            assert packet not in accepted, "accepted twice"
            accepted.add(packet)
        return result

    now = 0.0
    process = receiver
    for gap, incarnation in zip(gaps, incarnations, strict=True):
        now += gap
        process = make_codec(2, incarnation, now=now)
        receiver.decode(process.encode(VoteRequest(1, 1), 1, now=now, wall=WALL), now=now)
        process.decode(receiver.encode(VoteRequest(1, 1), 2, now=now, wall=WALL), now=now)
        for _ in range(packets_each):
            packet = process.encode(VoteRequest(1, 1), 1, now=now, wall=WALL)
            captured.append(packet)
            deliver(packet, now)
    survivor = process
    at = now
    for step in replay_steps:
        at += step
        for packet in captured:
            deliver(packet, at)
        # The survivor and node 1 keep talking: nothing the replays did may stop that,
        # except while a crash loop holds every window (the survivor is not accepted yet,
        # so not protected), which ends two epochs after the loop's last accepted packet.
        in_crash_loop = len(gaps) > 4 and at - now <= 2 * EPOCH
        reply = receiver.encode(VoteRequest(1, 2), 2, now=at, wall=WALL)
        if not isinstance(survivor.decode(reply, now=at), Decoded):
            assert in_crash_loop, "node 1 locked out"
        result = deliver(survivor.encode(VoteRequest(1, 2), 1, now=at, wall=WALL), at)
        if not isinstance(result, Decoded):
            assert isinstance(result, Refused) and result.reason is DropReason.REPLAY
            assert in_crash_loop, (result, gaps)


def test_replays_of_a_crash_loop_never_reset_what_is_known_of_the_live_process() -> None:
    """Found by the property above: five processes of node 2 start at one instant, the
    fifth finds every replay window taken; it keeps talking while an attacker replays the
    whole capture. Heard-last ordering let those replays push the survivor's challenge out
    of node 1's echoes and back in at its old epoch, so node 1's packets stayed stale for
    the survivor after the crash loop had ended."""
    receiver = make_codec(1, 999)
    captured: list[bytes] = []
    processes = []
    for incarnation in range(5):
        process = make_codec(2, incarnation, now=0.0)
        receiver.decode(process.encode(VoteRequest(1, 1), 1, now=0.0, wall=WALL), now=0.0)
        process.decode(receiver.encode(VoteRequest(1, 1), 2, now=0.0, wall=WALL), now=0.0)
        captured.append(process.encode(VoteRequest(1, 1), 1, now=0.0, wall=WALL))
        receiver.decode(captured[-1], now=0.0)
        processes.append(process)
    survivor = processes[-1]
    for at in (0.5, 1.25, 2.125, 3.0):
        for packet in captured:
            receiver.decode(packet, now=at)
        reply = receiver.encode(VoteRequest(1, 2), 2, now=at, wall=WALL)
        if at > 2 * EPOCH:  # the crash loop's windows have gone idle
            assert isinstance(survivor.decode(reply, now=at), Decoded), at
        receiver.decode(survivor.encode(VoteRequest(1, 2), 1, now=at, wall=WALL), now=at)


# --- the model: restarts, delays and replays ---------------------------------------------


@dataclass
class Sent:
    """A packet as it left its sender."""

    data: bytes
    sender: int
    receiver: int
    made_at: float


@dataclass
class Process:
    codec: Codec
    started: float


@dataclass
class RefWindow:
    accepted: set[int]
    last: float


class Reference:
    """The acceptance rule as the protocol's docstring states it, kept apart from the
    codec's bitmap and bookkeeping: accept iff the packet echoes the receiving process's
    incarnation at its current or previous epoch, and its counter was neither accepted by
    that process from that sender process nor is REPLAY_WINDOW below the highest one; a
    new sender process needs a free window (at most four, freed two epochs after their
    last accepted packet)."""

    LIMIT = 4

    def __init__(self) -> None:
        self.windows: dict[Codec, dict[int, RefWindow]] = {}  # receiving process -> by sender

    def judge(self, codec: Codec, env: Envelope, now: float) -> bool:
        current = codec.epoch(now)
        if not any(i == codec.incarnation and current - 1 <= e <= current for i, e in env.echo):
            return False
        windows = self.windows.setdefault(codec, {})
        window = windows.get(env.incarnation)
        if window is None:
            for inc in [i for i, w in windows.items() if now - w.last > 2 * EPOCH]:
                del windows[inc]
            if len(windows) >= self.LIMIT:
                return False
            window = windows[env.incarnation] = RefWindow(set(), now)
        if env.counter in window.accepted:
            return False
        if window.accepted and env.counter <= max(window.accepted) - REPLAY_WINDOW:
            return False
        window.accepted.add(env.counter)
        window.last = now
        return True


OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.sampled_from([(1, 2), (2, 1)]), st.booleans()),
        st.tuples(st.just("send"), st.sampled_from([(1, 2), (2, 1)]), st.just(True)),
        st.tuples(st.just("deliver_late"), st.integers(0, 10_000), st.booleans()),
        st.tuples(st.just("replay"), st.integers(0, 10_000), st.booleans()),
        st.tuples(
            st.just("wait"),
            st.sampled_from([0.01, 0.1, 0.3, 0.45, 0.9, 1.0, 1.5, 2.0, 5.0]),
            st.booleans(),
        ),
        st.tuples(st.just("restart"), st.sampled_from([1, 2]), st.booleans()),
    ),
    min_size=1,
    max_size=100,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations=OPERATIONS, incarnations=st.lists(U63, min_size=60, max_size=60, unique=True))
def test_model_no_packet_counts_twice_or_for_another_process(
    operations: list[tuple[str, Any, bool]], incarnations: list[int]
) -> None:
    """Two nodes, random sends (delivered at once or held back), late deliveries, replays
    of anything ever sent, waits and restarts of either side. Whatever happens:

    * every verdict is the documented rule's (`Reference`), so in particular
    * no packet is accepted twice, by any process, nor by a process other than the one
      whose challenge its sender echoed, nor two epochs (of that process's clock) or more
      after it was made;
    * decode never raises, and one round trip each way always reconnects the two.
    """
    fresh = iter(incarnations)
    clock = 0.0
    nodes = {n: Process(make_codec(n, next(fresh), now=clock), clock) for n in (1, 2)}
    reference = Reference()
    sent: list[Sent] = []
    held: list[Sent] = []
    accepted: set[bytes] = set()

    def deliver(packet: Sent) -> None:
        process = nodes[packet.receiver]
        env = peek(packet.data)
        expected = reference.judge(process.codec, env, clock)
        result = process.codec.decode(packet.data, now=clock)
        assert isinstance(result, Decoded) == expected, (result, env, clock)
        if isinstance(result, Decoded):
            assert packet.data not in accepted, "accepted twice"
            accepted.add(packet.data)
            assert process.codec.incarnation in {i for i, _ in env.echo}
            assert clock - packet.made_at < 2 * EPOCH, "accepted two epochs late"
            assert packet.made_at >= process.started, "made before the receiver started"
        else:
            assert isinstance(result, Refused | DropReason)

    def send(source: int, target: int, *, at_once: bool) -> None:
        codec = nodes[source].codec
        data = codec.encode(VoteRequest(1, len(sent)), target, now=clock, wall=WALL)
        packet = Sent(data, source, target, clock)
        sent.append(packet)
        if at_once:
            deliver(packet)
        else:
            held.append(packet)

    for operation, argument, flag in operations:
        if operation == "send":
            send(*argument, at_once=flag)
        elif operation == "deliver_late" and held:
            deliver(held.pop(argument % len(held)))
        elif operation == "replay" and sent:
            deliver(sent[argument % len(sent)])
        elif operation == "wait":
            clock += argument
        elif operation == "restart":
            clock += 0.5 if flag else 0.0
            nodes[argument] = Process(make_codec(argument, next(fresh), now=clock), clock)

    # One packet from each side makes the next ones count, whatever happened before, unless
    # a crash loop filled a receiver's windows: then it takes up to two epochs more.
    for target in (1, 2):
        if len(reference.windows.get(nodes[target].codec, {})) >= Reference.LIMIT:
            clock += 2 * EPOCH + 0.01
    send(1, 2, at_once=True)
    send(2, 1, at_once=True)
    for source, target in ((1, 2), (2, 1)):
        before = nodes[target].codec.accepted
        send(source, target, at_once=True)
        assert nodes[target].codec.accepted == before + 1, "no reconnect after a round trip"
