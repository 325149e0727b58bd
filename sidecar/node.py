"""The Trio runtime around the election core: UDP sockets, and the calls into the core.

The election loop runs on a thread of its own (`_loop_in_thread`, started through
`trio.to_thread`) and reads every socket and keeps time: it sleeps in `epoll_wait`, with the
core's own `next_deadline` as its timeout, until then or until a socket the core calls
urgent (`Election.wake_on`) is readable, then drains *every* socket and steps the core once
with all it read. The urgent sockets and an eventfd to poke it sit in an epoll set of our
own. So an idle leader wakes once per heartbeat interval (its acks wait
in their buffers for its next heartbeat) and a follower once per leader heartbeat, instead
of once per datagram: a wake-up, not a datagram, is what an idle node's CPU goes on
(0.4-0.7 ms of interpreter and kernel each, starting with cold caches, against a few
microseconds to decode one more packet once awake).

Why a thread and not a Trio task: a bare wake-up costs 0.10 ms of CPU in a thread sleeping
in `epoll_wait` and 0.36 ms as a Trio task (`bench/wakeup_floor.py`, 10 a second), and an
idle node is little but wake-ups (10-20 % of its CPU went back); and the election keeps its
timing while Trio's thread is busy or blocked (a slow listener, a long synchronous call),
which no task can promise. Everything else stays in Trio: health changes, reloads and
shut-down arrive through `_drive`, which calls the core and pokes the loop to re-arm;
events are published to subscribers and listeners on Trio's thread, in order.

One lock (`_lock`, re-entrant) guards the core, the codec, the peer tracker and the
sockets: every call into the core, from either thread, holds it and sends what the core
returned before letting go, so no two calls interleave and nobody sees the core
half-updated. The loop holds it for one wake-up (well under a millisecond); Trio's side
holds it for one call.

Embedding programs (the assigner, hooks, another Trio program using this as a library)
get leadership three ways, all Trio-friendly: `subscribe()` yields every event on a memory
channel (a slow subscriber misses events rather than slowing the election, so act on the
current state); `is_leader()` reads the lease against the clock right now; and
`wait_until_leader()` returns a cancel scope that is cancelled the instant leadership ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import secrets
import select
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import trio

from sidecar.config import Address, Config
from sidecar.election import (
    Arrival,
    Election,
    Event,
    GainedLeadership,
    LeaderChanged,
    LostLeadership,
    Ready,
    Role,
    View,
)
from sidecar.messages import Heartbeat, Message
from sidecar.peers import PeerTracker, Verdict
from sidecar.protocol import MAX_PACKET_SIZE, Codec, Decoded, DropReason, MessageTooLarge, Refused
from sidecar.transport import Datagram, ElectionSockets, receive

log = logging.getLogger(__name__)

#: Readiness reported per `epoll_wait` of the loop (more wait for the next call).
_MAX_EVENTS = 16
#: How long shutting down waits for the loop thread to finish its wake-up (seconds).
_LOOP_EXIT_TIMEOUT = 2.0
#: Trio's thread shows it is alive this often (seconds)...
_TRIO_BEAT = 1.0
#: ...and after this long without a sign the node counts itself unhealthy (seconds): the
#: health checks, the assigner and the hooks all run there, so a node whose Trio thread is
#: wedged must not keep the lead on the strength of its election thread alone.
_TRIO_STALL_LIMIT = 3.0
#: Pending inputs (health changes, reloads, shut-down) for `_drive`.
_INPUT_BUFFER = 256
#: Datagrams read per socket and wake-up: a flood costs a bounded batch per wake-up, and a
#: flood on a socket that is not urgent wakes nobody (its excess overflows its own buffer).
_RECEIVE_BATCH = 64
_SUBSCRIBER_BUFFER = 64
#: RTT goes into the /metrics histogram at most this often per peer (seconds): a
#: histogram needs samples, not every ack (one observation per ack was 2-4 % of the CPU).
#: `/status` and the `fip_peer_rtt_seconds` gauge show the latest measurement anyway.
_RTT_SAMPLE_PERIOD = 1.0


@dataclass(frozen=True, slots=True)
class _HealthChanged:
    healthy: bool


@dataclass(frozen=True, slots=True)
class _Shutdown:
    pass


@dataclass(frozen=True, slots=True)
class _Reconfigure:
    config: Config
    addresses: dict[int, tuple[str, int]]
    done: trio.Event


_Input = _HealthChanged | _Shutdown | _Reconfigure


@dataclass(slots=True)
class Counters:
    """Packet and event counts for /metrics and /status (drops live in the codec)."""

    packets_received: int = 0
    packets_sent: int = 0
    send_errors: int = 0
    elections: int = 0
    leadership_gained: int = 0
    leader_changes: int = 0
    events_missed: int = 0
    wakeups: int = 0


EventListener = Callable[[Event, "Node"], None]


class Node:
    """A running cluster member. Create it, then `await node.run()` inside a nursery."""

    def __init__(self, config: Config, *, rng: random.Random | None = None) -> None:
        self.config = config
        # Random, not the start time: freshness comes from echoed challenges, so nothing
        # here depends on the wall clock (see protocol.py).
        self.codec = Codec(
            node_id=config.node_id,
            key=config.cluster_key,
            peer_ids=frozenset(config.peer_addresses),
            incarnation=secrets.randbits(63),
            digests=config.membership_digests,
            epoch_length=challenge_epoch(config),
        )
        self.codec.set_membership(config.membership_digests, config.member_list)
        self.tracker = PeerTracker(
            config.peer_addresses,
            switch_after=config.timing.peer_timeout,
            max_clock_skew=config.max_clock_skew,
            own_members=config.member_list,
        )
        self._rng = rng or random.Random()
        self.counters = Counters()
        self._election: Election | None = None
        #: Guards the core, codec, tracker and sockets (see the module docstring).
        self._lock = threading.RLock()
        #: Trio's clock, set by `run`; read from either thread (`_now`).
        self._clock: trio.abc.Clock | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        #: Events for Trio's thread to publish, in the core's order, each with its log
        #: fields: its own term, and the role and leader when it was queued (the core may
        #: have moved on by the time Trio's thread publishes it).
        self._pending: list[tuple[Event, dict[str, object]]] = []
        #: Set (under `_lock`) once the core has resigned for good or the node is closing:
        #: the loop thread must not touch it again.
        self._finished = False
        self._loop_running = False  # under `_lock`
        self._loop_exited = threading.Event()
        self._inputs_tx, self._inputs_rx = trio.open_memory_channel[_Input](_INPUT_BUFFER)
        self._subscribers: list[trio.MemorySendChannel[Event]] = []
        self._listeners: list[EventListener] = []
        self._lead_scope: trio.CancelScope | None = None
        self._leadership_changed = trio.Event()
        self._healthy_initially = True
        #: The local service's health as last reported, and whether Trio's thread has
        #: stalled: the core hears `healthy` only while both are well (`_health_for_core`).
        self._service_healthy = True
        self._trio_stalled = False
        self._trio_seen = -math.inf
        self._health_allowance: float | None = None
        self._elections_seen = 0
        self._sockets: ElectionSockets | None = None
        self._stopped = trio.Event()
        #: Called with (peer id, seconds) for an RTT measured from an acknowledged heartbeat,
        #: at most once per `_RTT_SAMPLE_PERIOD` per peer, e.g. by metrics.
        #: Called on the loop thread (under the lock), so it must be quick and thread-safe.
        self.rtt_observer: Callable[[int, float], None] | None = None
        self._rtt_sampled: dict[int, float] = {}
        #: What the loop thread waits on, as one epoll set: the timer, armed for the
        #: core's `next_deadline`, the sockets the core calls urgent (`wake_on`), and an
        #: eventfd by which Trio's side wakes it (`_poke`).
        self._wake_at = math.inf  # the core's next deadline, on Trio's clock
        self._poke_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._urgent = select.epoll()
        self._urgent.register(self._poke_fd, select.EPOLLIN)
        #: Every election socket, polled without waiting to find the ones to read (`_drain`).
        self._inbox = select.epoll()
        self._inbox_sockets: dict[int, socket.socket] = {}
        self._urgent_fds: set[int] = set()
        self._urgent_for: frozenset[int] | None = None
        self._urgent_stale = True
        #: The socket each peer's packets last came on (its own, or the catch-all's if a
        #: NAT rewrote its port), to wake for the right one.
        self._arrives_on: dict[int, socket.socket] = {}
        #: When the loop last drained the sockets: nothing still buffered arrived before.
        self._drained_at = -math.inf
        #: Per socket (fd), the kernel's count of datagrams dropped for a full buffer.
        self._overflows: dict[int, int] = {}

    # ------------------------------------------------------------------ embedding API

    @property
    def election(self) -> Election:
        if self._election is None:
            raise RuntimeError("the node is not running yet")
        return self._election

    def is_leader(self) -> bool:
        """Leader right now by the lease, even if the loop has not run since a pause."""
        with self._lock:
            return self._election is not None and (
                self._election.role_at(self._now()) is Role.LEADER
            )

    def view(self) -> View:
        with self._lock:
            return self.election.view(self._now())

    def peer_reports(self) -> dict[int, dict[str, object]]:
        """Per peer, what the election view does not say: its clock offset, why it is not
        counted (when it is not), and any second process speaking with its id."""
        with self._lock:
            return self._peer_reports(self._now())

    def _peer_reports(self, now: float) -> dict[int, dict[str, object]]:
        timeout = self.config.timing.peer_timeout
        reports: dict[int, dict[str, object]] = {}
        for peer_id, record in self.tracker.peers.items():
            alive = self._election is not None and self._election.peers[peer_id].alive(now, timeout)
            reason = self.tracker.refusal(peer_id, now)
            if reason is None and not alive:
                heard = self._election is not None and (
                    self._election.peers[peer_id].last_heard is not None
                )
                reason = "silent: nothing heard for peer_timeout" if heard else "never heard"
            offset = record.clock_offset
            reports[peer_id] = {
                "not_counted": None if alive else reason,
                "refusing": reason,
                "clock_offset": None if offset is None else round(offset, 3),
                "restarts": record.restarts,
                "duplicates": self.tracker.duplicates(peer_id, now),
            }
        return reports

    def drop_counts(self) -> Mapping[str, int]:
        with self._lock:
            return {str(reason): count for reason, count in self.codec.drops.items()}

    def counter_values(self) -> Mapping[str, int]:
        with self._lock:
            return dataclasses.asdict(self.counters)

    def to_monotonic(self, trio_time: float) -> float:
        """Convert a Trio clock reading to CLOCK_MONOTONIC, the clock logs share."""
        return time.monotonic() - (self._now() - trio_time)

    def _now(self) -> float:
        """Trio's clock, from either thread (`trio.current_time` works only on Trio's)."""
        assert self._clock is not None, "the node is not running yet"
        return self._clock.current_time()

    async def wait_until_leader(self) -> trio.CancelScope:
        """Return once this node leads, with a scope that is cancelled when it stops leading."""
        while True:
            if self.is_leader() and self._lead_scope is not None:
                return self._lead_scope
            await self._leadership_changed.wait()

    def subscribe(self) -> trio.MemoryReceiveChannel[Event]:
        """Every future event, on a channel; a full channel drops events (counted)."""
        send, receive = trio.open_memory_channel[Event](_SUBSCRIBER_BUFFER)
        self._subscribers.append(send)
        return receive

    def add_listener(self, listener: EventListener) -> None:
        """Call `listener(event, node)` synchronously for each event; it must not block."""
        self._listeners.append(listener)

    def expect_health_verdict(self, allowance: float) -> None:
        """Before `run`: the first health verdict is still to come, in about `allowance`
        seconds; until then the node announces `starting` so peers leave the cold start
        to it (bounded by startup_grace + allowance)."""
        self._health_allowance = allowance

    def set_healthy(self, healthy: bool) -> None:
        """The local service's health changed; safe to call from any task, never blocks."""
        if self._election is None:
            self._healthy_initially = healthy
            return
        try:
            self._inputs_tx.send_nowait(_HealthChanged(healthy))
        except trio.WouldBlock:
            log.warning("input queue full; health change deferred to the next check")

    async def reconfigure(self, config: Config) -> None:
        """Apply a reloaded config's peers and membership without stopping: moved peers
        are reconnected, new ones get a socket, removed ones are closed, and the election
        keeps its state (a leader keeps its lease). The caller checked that nothing else
        that needs a restart (bind, node id, key, timing) changed."""
        addresses = {
            peer_id: await self._resolve(address)
            for peer_id, address in config.peer_addresses.items()
        }
        done = trio.Event()
        await self._inputs_tx.send(_Reconfigure(config, addresses, done))
        await done.wait()

    def request_shutdown(self) -> None:
        """Resign if leading, tell the peers, and make `run` return."""
        try:
            self._inputs_tx.send_nowait(_Shutdown())
        except trio.WouldBlock:
            log.warning("input queue full while shutting down; leaving without resigning")
            self._stopped.set()

    # ------------------------------------------------------------------ running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, start the election, and run until `request_shutdown()`."""
        addresses = {
            peer_id: await self._resolve(address)
            for peer_id, address in self.config.peer_addresses.items()
        }
        bind = self.config.bind
        self._sockets = sockets = ElectionSockets.open((bind.host, bind.port), addresses)
        self._watch_inbox()
        self._clock = trio.lowlevel.current_clock()
        self._token = trio.lowlevel.current_trio_token()
        self._service_healthy = self._healthy_initially
        self._trio_seen = self._now()
        self._election = Election(
            self.config.node_id,
            self.config.members,
            self.config.timing,
            self._now(),
            self._rng,
            healthy=self._healthy_initially,
            memberships=self.config.memberships,
            health_pending=self._health_allowance is not None,
            health_allowance=self._health_allowance or 0.0,
        )
        log.info(
            "node started",
            extra={
                "event": "started",
                "bind": str(self.config.bind),
                "members": len(self.config.members),
                "quorum": self.config.quorum_text,
                "incarnation": f"{self.codec.incarnation:016x}",
                "eligible": self.config.eligible,
                "profile": self.config.profile,
            },
        )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._loop)
                nursery.start_soon(self._drive)
                nursery.start_soon(self._show_trio_alive)
                task_status.started()
                await self._stopped.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._stop_loop()
            self._urgent.close()
            self._inbox.close()
            os.close(self._poke_fd)
            sockets.close()
            if self._lead_scope is not None:
                self._lead_scope.cancel()
            for subscriber in self._subscribers:
                subscriber.close()
            log.info("node stopped", extra={"event": "stopped"})

    def _apply_config(self, change: _Reconfigure, now: float) -> Ready:
        config = change.config
        assert self._sockets is not None
        _opened, closed = self._sockets.update(change.addresses)
        self._watch_inbox()
        for sock in closed:
            if sock.fileno() in self._urgent_fds:
                self._urgent.unregister(sock)
                self._urgent_fds.discard(sock.fileno())
            self._overflows.pop(sock.fileno(), None)
            sock.close()
        self._arrives_on = {p: s for p, s in self._arrives_on.items() if p in change.addresses}
        self._urgent_stale = True
        self.codec.set_peers(config.peer_addresses)
        self.codec.set_membership(config.membership_digests, config.member_list)
        self.tracker.set_peers(config.peer_addresses)
        self.tracker.own_members = config.member_list
        self.tracker.max_clock_skew = config.max_clock_skew
        self.config = config
        return self.election.reconfigure(config.members, config.memberships, now)

    def _watch_inbox(self) -> None:
        """Make `_inbox` hold exactly the sockets open now (after opening or a reload)."""
        assert self._sockets is not None
        now_open = {sock.fileno(): sock for sock in self._sockets.readable()}
        for fd in self._inbox_sockets.keys() - now_open.keys():
            self._inbox.unregister(fd)
        for fd in now_open.keys() - self._inbox_sockets.keys():
            self._inbox.register(fd, select.EPOLLIN)
        self._inbox_sockets = now_open

    async def _resolve(self, address: Address) -> tuple[str, int]:
        infos = await trio.socket.getaddrinfo(address.host, address.port, type=socket.SOCK_DGRAM)
        host, port = infos[0][4][:2]
        return str(host), int(port)

    async def _loop(self) -> None:
        """Run the election loop on a thread of its own until the node stops.

        An exception in the loop ends up here, and so stops the node as a task's would.
        Cancelled (the node stops), it leaves the thread behind; `run` stops it."""
        try:
            await trio.to_thread.run_sync(
                self._loop_in_thread, abandon_on_cancel=True, limiter=trio.CapacityLimiter(1)
            )
        finally:
            self._stop_loop()

    def _loop_in_thread(self) -> None:
        """Sleep until the core's deadline, an urgent packet or a poke, then `_wake_up`."""
        with self._lock:
            if self._finished:
                return  # stopped before this thread got going: its files may be closed
            self._loop_running = True
        try:
            while True:
                with self._lock:
                    if self._finished:
                        return
                    self._wake_up()
                try:
                    ready = self._urgent.poll(self._wait_for(), _MAX_EVENTS)
                except (ValueError, OSError):
                    if self._finished:
                        return  # closed under us while stopping
                    raise
                if any(fd == self._poke_fd for fd, _ in ready):
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self._poke_fd)
        finally:
            self._loop_exited.set()

    def _wait_for(self) -> float:
        """Seconds `epoll_wait` may sleep: until the core's deadline (-1: until a packet or
        a poke). Python rounds it up to whole milliseconds, so the loop never wakes early;
        at worst a millisecond late, which every profile's timing allows for."""
        if self._wake_at == math.inf:
            return -1.0
        return max(0.0, self._wake_at - self._now())

    async def _show_trio_alive(self) -> None:
        """Tell the loop thread, every `_TRIO_BEAT`, that Trio's thread still runs."""
        while True:
            self._trio_seen = self._now()
            await trio.sleep(_TRIO_BEAT)

    def _check_trio(self, now: float, ready: Ready) -> None:
        """On the loop thread: a Trio thread silent for `_TRIO_STALL_LIMIT` makes the node
        unhealthy to the core (it hands over if it leads), until it shows up again."""
        stalled = now - self._trio_seen > _TRIO_STALL_LIMIT
        if stalled == self._trio_stalled:
            return
        self._trio_stalled = stalled
        if self.election.health_pending:
            return  # the first verdict, through `_drive`, will include the stall
        if stalled:
            log.warning(
                "Trio's thread is stalled; reporting unhealthy until it runs again",
                extra={"event": "trio_stalled", "silent": round(now - self._trio_seen, 3)},
            )
        else:
            log.info("Trio's thread runs again", extra={"event": "trio_recovered"})
        step = self.election.set_healthy(self._health_for_core(), now)
        ready.sends += step.sends
        ready.events += step.events

    def _health_for_core(self) -> bool:
        return self._service_healthy and not self._trio_stalled

    def _poke(self) -> None:
        """Wake the loop thread for a `_wake_up` now (from any thread)."""
        with contextlib.suppress(OSError):
            os.eventfd_write(self._poke_fd, 1)

    def _stop_loop(self) -> None:
        """Tell the loop thread to return, and wait until it has if it runs: nothing may
        close its sockets or epoll set under it. It holds the lock for a wake-up at most."""
        with self._lock:
            self._finished = True
            running = self._loop_running
        self._poke()
        if running and not self._loop_exited.wait(_LOOP_EXIT_TIMEOUT):
            log.error("the election loop thread did not stop")

    def _wake_up(self) -> None:
        """Drain every socket, step the core once with all of it, send, re-arm the loop.

        Called with `_lock` held, on the loop thread: nothing else can touch the core until
        it returns. Peers that turned out to be new processes are told first."""
        self.counters.wakeups += 1
        now = self._now()
        wall = time.time()
        arrivals, restarted = self._drain(now, wall)
        self._log_warnings()
        election = self.election
        ready = Ready()
        self._check_trio(now, ready)
        for sender in restarted:
            step = election.peer_restarted(sender, now)
            ready.sends += step.sends
            ready.events += step.events
        step = election.receive(arrivals, now)
        ready.sends += step.sends
        ready.events += step.events
        for sender, msg, _ in arrivals:
            if isinstance(msg, Heartbeat) and msg.ack is not None:
                self._sample_rtt(sender, now)
        self.counters.packets_received += len(arrivals)
        self._count_elections(now)
        self._apply(ready)
        self._rearm(now)
        if self._pending:
            assert self._token is not None
            with contextlib.suppress(trio.RunFinishedError):  # only while stopping
                self._token.run_sync_soon(self._publish_pending)

    def _drain(self, now: float, wall: float) -> tuple[list[Arrival], list[int]]:
        """Read up to a batch from every socket: what authenticates, oldest first, with its
        arrival on our clock (from the kernel's stamp, clamped to since the last drain),
        and the peers that turned out to be new processes.

        Which sockets hold datagrams comes from `_inbox` (every socket, polled without
        waiting), not from reading each one until it fails: idle, each peer's socket holds
        one datagram, so one poll, a read per peer and a poll that finds nothing replace a
        failed read (and its exception) per socket. A socket still readable on the second
        poll is busy (a flood, a burst) and is read until empty or its batch is spent."""
        assert self._sockets is not None
        since = self._drained_at
        self._drained_at = now
        arrivals: list[tuple[float, int, Message]] = []
        restarted: list[int] = []
        budget = dict.fromkeys(self._inbox_sockets, _RECEIVE_BATCH)
        reads = 1  # per socket in the first round; then up to its whole remaining batch
        while True:
            ready = [fd for fd, _ in self._inbox.poll(0, _MAX_EVENTS) if budget.get(fd)]
            if not ready:
                break
            for fd in ready:
                sock = self._inbox_sockets[fd]
                for _ in range(min(reads, budget[fd])):
                    budget[fd] -= 1
                    try:
                        datagram = receive(sock, MAX_PACKET_SIZE + 1)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        continue  # e.g. ECONNREFUSED reported for an earlier send: not ours
                    self._take(sock, datagram, now, wall, since, arrivals, restarted)
            reads = _RECEIVE_BATCH
        arrivals.sort(key=lambda arrival: arrival[0])
        return [(sender, msg, arrived) for arrived, sender, msg in arrivals], restarted

    def _take(
        self,
        sock: socket.socket,
        datagram: Datagram,
        now: float,
        wall: float,
        since: float,
        arrivals: list[tuple[float, int, Message]],
        restarted: list[int],
    ) -> None:
        """Check one datagram; an accepted one joins `arrivals`, stamped for the core."""
        assert self._sockets is not None
        if datagram.drops is not None:
            self._count_overflow(sock, datagram.drops)
        source, stamp = datagram.source, datagram.arrived
        result = self.codec.decode(datagram.data, now=now)
        if isinstance(result, DropReason):
            if result is DropReason.BAD_MAC:
                self._bad_mac(self._sockets.peer_of(sock), source, now)
            return
        if isinstance(result, Refused):
            self._refused(result, now, source)
            return
        if self._admit(result, now, wall, source, restarted):
            if self._arrives_on.get(result.sender) is not sock:
                # A peer's packets moved socket (a NAT): wake for the new one.
                self._arrives_on[result.sender] = sock
                self._urgent_stale = True
            arrived = now if stamp is None else now - max(0.0, wall - stamp)
            arrivals.append((max(arrived, since), result.sender, result.msg))

    def _count_overflow(self, sock: socket.socket, drops: int) -> None:
        """The kernel's drop count for `sock` moved: count the difference (it wraps)."""
        seen = self._overflows.get(sock.fileno(), 0)
        if drops != seen:
            self._overflows[sock.fileno()] = drops
            self.codec.count_drop(DropReason.RECEIVE_BUFFER_FULL, (drops - seen) & 0xFFFFFFFF)

    def _rearm(self, now: float) -> None:
        """Point the loop at the core's next deadline and at the sockets it calls urgent.

        The epoll set is changed only when the urgent peers, or the socket one of them
        arrives on, changed."""
        election = self.election
        self._wake_at = election.next_deadline(now)
        urgent = election.wake_on(now)
        if urgent == self._urgent_for and not self._urgent_stale:
            return
        self._urgent_for, self._urgent_stale = urgent, False
        assert self._sockets is not None
        if urgent is None:
            wanted = self._sockets.readable()
        else:
            wanted = [
                self._arrives_on.get(peer) or self._sockets.peers.get(peer, self._sockets.catch_all)
                for peer in urgent
            ]
        fds = {sock.fileno() for sock in wanted}
        for fd in self._urgent_fds - fds:
            self._urgent.unregister(fd)
        for fd in fds - self._urgent_fds:
            self._urgent.register(fd, select.EPOLLIN)
        self._urgent_fds = fds

    def _sample_rtt(self, peer: int, now: float) -> None:
        rtt = self.election.peers[peer].rtt
        if rtt is None or self.rtt_observer is None:
            return
        if now - self._rtt_sampled.get(peer, -math.inf) >= _RTT_SAMPLE_PERIOD:
            self._rtt_sampled[peer] = now
            self.rtt_observer(peer, rtt)

    def _admit(
        self, packet: Decoded, now: float, wall: float, source: object, restarted: list[int]
    ) -> bool:
        """Pass an accepted packet on only if it is from the peer's current process."""
        verdict = self.tracker.accepted(
            packet.sender,
            packet.incarnation,
            now,
            sent_at=packet.sent_at,
            wall=wall,
            source=_address_text(source),
        )
        if verdict is Verdict.DUPLICATE:
            self.codec.count_drop(DropReason.DUPLICATE_ID)
            return False
        if verdict is Verdict.RESTARTED:
            log.info(
                "peer restarted",
                extra={"event": "peer_restarted", "peer": packet.sender},
            )
            restarted.append(packet.sender)
        return True

    def _refused(self, packet: Refused, now: float, source: object) -> None:
        if packet.reason is DropReason.CONFIG_MISMATCH:
            self.tracker.mismatch(packet.sender, now, packet.digests, packet.members)
        else:
            self.tracker.refused(
                packet.sender, packet.incarnation, now, packet.reason, _address_text(source)
            )

    def _bad_mac(self, peer: int | None, source: object, now: float) -> None:
        """Attribute a packet that failed the MAC to a peer when it came from its address."""
        address = _address_text(source)
        if peer is None and self._sockets is not None:
            peer = self._sockets.peer_at(source)
        if peer is not None and address is not None:
            self.tracker.bad_mac(peer, address, now)

    def _log_warnings(self) -> None:
        for warning in self.tracker.take_warnings():
            log.warning(warning.message, extra=warning.fields)

    async def _drive(self) -> None:
        """Health, reloads and shut-down: every input of the core but packets and time.

        Each is applied under the lock on Trio's thread; then the loop thread is poked to
        drain, tick and re-arm (its timer and epoll set are its own), and what the call
        published goes out here, after what the loop queued before it."""
        election = self.election
        while True:
            item = await self._inputs_rx.receive()
            if isinstance(item, _HealthChanged):
                log.info(
                    "local service health changed",
                    extra={"event": "health", "healthy": item.healthy},
                )
            with self._lock:
                now = self._now()
                match item:
                    case _HealthChanged(healthy):
                        self._service_healthy = healthy
                        ready = election.set_healthy(self._health_for_core(), now)
                    case _Reconfigure():
                        ready = self._apply_config(item, now)
                    case _Shutdown():
                        ready = election.shutdown(now)
                        self._finished = True  # resigned: the loop must not answer any more
                self._count_elections(now)
                self._apply(ready)
            self._poke()
            self._publish_pending()
            if isinstance(item, _Reconfigure):
                item.done.set()
            elif isinstance(item, _Shutdown):
                self._stopped.set()
                return

    def _count_elections(self, now: float) -> None:
        """Every round the core started, even several within one call (churn shows)."""
        started = self.election.elections - self._elections_seen
        if started > 0:
            self._elections_seen = self.election.elections
            self.counters.elections += started
            log.info(
                "standing for election",
                extra={
                    **self._log_fields(self.election.term, now),
                    "event": "candidate",
                    "rounds": started,
                },
            )

    def _apply(self, ready: Ready) -> None:
        """Send what the core returned, and queue its events for `_publish_pending`."""
        self._pending += [(event, self._log_fields(event.term, event.at)) for event in ready.events]
        assert self._sockets is not None
        wall = time.time()
        now = self._now()
        for out in ready.sends:
            try:
                data = self.codec.encode(
                    out.msg,
                    out.to,
                    now=now,
                    wall=wall,
                    include_members=self.tracker.wants_members(out.to, now),
                )
            except MessageTooLarge:
                log.error("message too large to send", extra={"to": out.to})
                continue
            try:
                self._sockets.send(out.to, data)
                self.counters.packets_sent += 1
            except OSError as exc:
                # A full buffer, a firewall, a missing route or a peer's ICMP "port
                # unreachable" must not stop the election; liveness notices the silence.
                self.counters.send_errors += 1
                log.debug("send failed", extra={"to": out.to, "error": exc.strerror})

    # ------------------------------------------------------------------ events

    def _log_fields(self, term: int, at: float) -> dict[str, object]:
        """`term`, and the role and leader the core gives for `at` (with `_lock` held)."""
        election = self.election
        return {"term": term, "role": str(election.role_at(at)), "leader": election.leader_at(at)}

    def _publish_pending(self) -> None:
        """On Trio's thread: publish what the core returned, in its order, outside the
        lock (a listener may read the node, and a slow one must not hold up the loop)."""
        with self._lock:
            pending, self._pending = self._pending, []
        for event, state in pending:
            self._publish(event, state)

    def _publish(self, event: Event, state: dict[str, object]) -> None:
        match event:
            case GainedLeadership():
                self.counters.leadership_gained += 1
                self._lead_scope = trio.CancelScope()
                log.info(
                    "gained leadership",
                    extra={
                        **state,
                        "event": "gained",
                        "at_mono": self.to_monotonic(event.at),
                        "lease_until_mono": self.to_monotonic(event.lease_until),
                    },
                )
            case LostLeadership():
                if self._lead_scope is not None:
                    self._lead_scope.cancel()
                    self._lead_scope = None
                log.warning(
                    "lost leadership",
                    extra={
                        **state,
                        "event": "lost",
                        "reason": event.reason,
                        "at_mono": self.to_monotonic(event.at),
                        "lease_ended_mono": self.to_monotonic(event.lease_ended_at),
                    },
                )
            case LeaderChanged():
                self.counters.leader_changes += 1
                log.info(
                    "leader changed",
                    extra={
                        **state,
                        "event": "leader_changed",
                        "previous": event.previous,
                        "current": event.current,
                    },
                )
        if isinstance(event, GainedLeadership | LostLeadership):
            self._leadership_changed.set()
            self._leadership_changed = trio.Event()
        for listener in self._listeners:
            try:
                listener(event, self)
            except Exception:
                log.exception("event listener failed", extra={"listener": repr(listener)})
        for subscriber in list(self._subscribers):
            try:
                subscriber.send_nowait(event)
            except trio.WouldBlock:
                self.counters.events_missed += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.remove(subscriber)


def challenge_epoch(config: Config) -> float:
    """How long a challenge lasts: ten heartbeats (1 s with `lan`), at least 0.5 s.

    Packets older than two epochs by the receiver's clock are refused, so this bounds how
    late a delayed packet may count; peers learn a new epoch from the next heartbeat.
    """
    return max(0.5, 10 * config.timing.heartbeat_interval)


def _address_text(source: object) -> str | None:
    if isinstance(source, tuple) and len(source) >= 2:
        host, port = source[0], source[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return None
