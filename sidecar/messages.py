"""The election's messages, as plain typed structs.

These are what the sans-IO election core consumes and produces. They carry no
authentication and no addressing: `protocol.py` wraps each one in an authenticated,
replay-protected envelope that names the sender and the receiver. Keeping the
messages apart from the codec lets the core import them without importing anything
that touches keys, clocks or bytes.

Every field is small and fixed in meaning; see `election.py` for the rules that use them.
"""

from __future__ import annotations

import msgspec


class Ack(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    """A heartbeat's answer to the receiver's newest heartbeat, carried in the next one.

    It measures round-trip time and carries the promise. `promised` is true when the sender
    accepted the receiver as its leader on heartbeat `seq` and promises not to vote for
    anyone else until one lease timeout after it received it. `held` is how long (on the
    sender's clock) the answered heartbeat waited for this one, so the receiver measures
    RTT as `now - send time of seq - held`. Only RTT uses `held`; the lease arithmetic
    uses nothing but the receiver's own send time of `seq`.
    """

    seq: int
    promised: bool
    held: float


class Heartbeat(msgspec.Struct, tag="hb", frozen=True, forbid_unknown_fields=True):
    """Sent by every node to every peer every heartbeat interval.

    It tells the peer what the sender sees; a heartbeat with `leading` set is also the
    leader's request for a lease promise. Each heartbeat acknowledges (`ack`) the newest
    heartbeat heard from its receiver since the last one: a follower answers the leader's
    heartbeat at once with its own (so the promise travels as fast as a separate ack did),
    and everyone else's heartbeats are acknowledged in the next scheduled one.
    """

    term: int
    seq: int  # echoed by the receiver's next heartbeat, to match it to its send time
    leader_id: int | None  # whom the sender follows now (itself when leading)
    leading: bool  # the sender holds a valid leader lease and asks for promises
    eligible: bool  # may lead at all (a witness is not)
    healthy: bool  # its local service passes its health check
    viable: bool  # eligible, healthy, not stopping and sees a majority alive
    ready_to_preempt: bool  # viable for preempt_delay and allowed to preempt
    starting: bool = False  # eligible, healthy and within its start-up grace: wait for it
    ack: Ack | None = None  # the receiver's newest heartbeat not yet acknowledged


class VoteRequest(msgspec.Struct, tag="vreq", frozen=True, forbid_unknown_fields=True):
    """A candidate asks for a vote in `term`; resent until the round ends."""

    term: int
    seq: int


class VoteResponse(msgspec.Struct, tag="vresp", frozen=True, forbid_unknown_fields=True):
    """A vote, or a refusal with a short machine-readable reason (for logs and metrics)."""

    term: int
    seq: int
    granted: bool
    reason: str


class Resign(msgspec.Struct, tag="resign", frozen=True, forbid_unknown_fields=True):
    """The sender has stopped leading (shut-down, unhealthy service, or pre-emption).

    It has already given up its lease when it sends this, so receivers may release their
    promise to it at once: a planned hand-over costs a round trip instead of a timeout.
    """

    term: int
    reason: str


Message = Heartbeat | VoteRequest | VoteResponse | Resign
