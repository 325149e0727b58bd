"""Leader-only reconciler: make one reserved address point at this droplet, and keep it there.

One assigner per address (IPv4 or IPv6), each its own task with its own share of the
node's request budget, so one failing address never stalls another (`SharedLeadership`
hands each its own cancel scope per term). It speaks to the cloud only through the
neutral seam of `sidecar.providers.base`, and tells a listener when the address was read
pointing here (`address_gained`) and when this node let go of it (`address_lost`).

The assigner acts on the *current* state, never on counting events: whenever this node
leads, it reads who holds the IP and, if it is not this droplet, assigns it here (an assign
moves the IP directly, so it never unassigns first), follows the action to its end, and
then re-reads every `reconcile_interval` (jittered) to put the IP back if anything moved
it, which also repairs a late request from a previous leader.

Leadership reaches it through the `LeadershipView` seam: `wait_until_leader()` returns a
trio cancel scope that the node cancels the instant leadership is lost, so every request
in flight is abandoned at once. Because a paused process (SIGSTOP, GC, starved CPU) can
wake up inside that scope before the node has noticed its lease ran out, the assigner
also asks `is_leader()` (evaluated against the clock right then) immediately before every
assignment, with no await in between.

Errors never crash the node: network errors and 5xx back off exponentially with full
jitter; 422 (an action in progress) waits a few seconds; 429 waits as long as the API
says; 401/403/404 are configuration problems, logged at ERROR and retried slowly
(`config_error_retry_interval`), but a fix is picked up without a restart and without
waiting that out: a 401/403 re-reads the token file at once, and while it waits the
assigner checks every second (a stat, no API request) whether the token file changed, and
stops waiting when `retry_now()` is called (a config reload). Independently of all that,
a sliding-window request budget keeps one node well below DigitalOcean's per-token
limits (250/minute, 5,000/hour) even in a failure storm: a request waits for room in the
budget rather than exceed it.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Literal, NoReturn, Protocol, TypeVar

import msgspec
import trio

from sidecar.providers.base import (
    Busy,
    CredentialError,
    Family,
    Holding,
    NotFound,
    Operation,
    Provider,
    ProviderError,
    RateLimited,
    Rejected,
)

logger = logging.getLogger(__name__)

_Result = TypeVar("_Result", Holding, Operation)

# How long to wait when the leadership view hands back a scope that was already used.
_STALE_SCOPE_RETRY_DELAY = 0.1

# While waiting out a config error, how often to look (one stat) for a changed token file.
_FIX_POLL_INTERVAL = 1.0

# DigitalOcean's published per-token limits; a node's budget may not exceed them.
DO_REQUESTS_PER_MINUTE = 250
DO_REQUESTS_PER_HOUR = 5000


class LeadershipView(Protocol):
    """What the assigner needs to know about leadership (node.py implements it)."""

    def is_leader(self) -> bool:
        """Whether this node leads, evaluated against the clock right now."""
        ...

    async def wait_until_leader(self) -> trio.CancelScope:
        """Return when this node gains leadership.

        The returned scope is cancelled by the node the instant leadership is lost (it may
        already be cancelled by the time the caller enters it).
        """
        ...


class SharedLeadership:
    """One node's leadership handed to several assigners (one per address).

    A trio cancel scope can be entered once, so each assigner gets a scope of its own
    for each term; `ended()` cancels them all. The node's event listener calls it in the
    same step in which the node cancels its own term scope (`LostLeadership`), so every
    assigner stops at the same instant a single one would.
    """

    def __init__(self, view: LeadershipView) -> None:
        self._view = view
        self._term: trio.CancelScope | None = None
        self._scopes: list[trio.CancelScope] = []

    def is_leader(self) -> bool:
        return self._view.is_leader()

    async def wait_until_leader(self) -> trio.CancelScope:
        while True:
            term = await self._view.wait_until_leader()
            if not term.cancel_called:
                break
            await trio.sleep(_STALE_SCOPE_RETRY_DELAY)  # the view has not caught up yet
        if term is not self._term:
            self._term, self._scopes = term, []
        scope = trio.CancelScope()
        self._scopes.append(scope)
        return scope

    def ended(self) -> None:
        """Leadership was lost: cancel every scope handed out for the term."""
        for scope in self._scopes:
            scope.cancel()
        self._scopes = []


class RefreshableToken(Protocol):
    """The token source the client sends (`digitalocean.TokenSource` implements it)."""

    #: Counts token changes, so a waiter notices a refresh made by someone else (a reload).
    generation: int

    def changed_on_disk(self) -> bool:
        """Cheap: whether the token file differs from when it was last read."""
        ...

    def refresh(self) -> bool:
        """Re-read the token; True when it changed. Raises CredentialError, keeping the old
        one."""
        ...


class AssignerObserver(Protocol):
    """Metrics hooks (the lead wires Prometheus counters and histograms to these)."""

    def api_request(self, endpoint: str, status: str) -> None:
        """One API request finished; `status` is the HTTP code as text or `network_error`."""
        ...

    def assignment_finished(self, seconds: float, outcome: str) -> None:
        """An assignment ended; outcome is completed/errored/timeout/unknown/failed/cancelled."""
        ...


AddressEvent = Literal["address_gained", "address_lost"]
AddressListener = Callable[[AddressEvent], None]
"""Told, synchronously, when this node gains or loses the address (see `Assigner`)."""


class AssignerSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """The `[assigner]` config section. Durations are seconds.

    - `reconcile_interval`: how often a leader re-reads the IP to repair a move; each wait
      is scaled by a random factor in `1 ± reconcile_jitter`.
    - `action_poll_interval`: how often an assign action is polled until it ends.
    - `action_timeout`: give up following one action after this long, re-read and retry.
    - `backoff_base_delay`, `backoff_max_delay`: network errors and 5xx wait a uniformly
      random time in [0, min(max, base * 2**(failures - 1))] ("full jitter").
    - `unprocessable_delay`: after a 422, wait a random time in [d, 1.5 d] before
      re-reading (while the IP is locked by an action, it is re-read every
      `action_poll_interval`).
    - `config_error_retry_interval`: after 401/403/404 (a config problem), retry this slowly,
      or as soon as the token file changes or `retry_now()` is called (a reload).
    - `rate_limit_max_delay`: the longest wait a 429's headers can impose.
    - `cooloff_interval`: the least time between the starts of two assignments (the first
      one after gaining leadership is exempt), so two confused nodes cannot ping-pong fast.
    - `requests_per_minute`, `requests_per_hour`: this node's request budget, a share of
      DigitalOcean's 250/minute and 5,000/hour per token (shared by the whole cluster).
    """

    reconcile_interval: float = 10.0
    reconcile_jitter: float = 0.2
    action_poll_interval: float = 1.0
    action_timeout: float = 90.0
    backoff_base_delay: float = 0.5
    backoff_max_delay: float = 10.0
    unprocessable_delay: float = 2.0
    config_error_retry_interval: float = 60.0
    rate_limit_max_delay: float = 3600.0
    cooloff_interval: float = 5.0
    requests_per_minute: int = 60
    requests_per_hour: int = 1200

    def __post_init__(self) -> None:
        positive = {
            "reconcile_interval": self.reconcile_interval,
            "action_poll_interval": self.action_poll_interval,
            "action_timeout": self.action_timeout,
            "backoff_base_delay": self.backoff_base_delay,
            "backoff_max_delay": self.backoff_max_delay,
            "unprocessable_delay": self.unprocessable_delay,
            "config_error_retry_interval": self.config_error_retry_interval,
            "rate_limit_max_delay": self.rate_limit_max_delay,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0")
        if not 0 <= self.reconcile_jitter <= 0.5:
            raise ValueError("reconcile_jitter must be between 0 and 0.5")
        if self.cooloff_interval < 0:
            raise ValueError("cooloff_interval must be >= 0")
        if self.backoff_max_delay < self.backoff_base_delay:
            raise ValueError("backoff_max_delay must be >= backoff_base_delay")
        if not 1 <= self.requests_per_minute <= DO_REQUESTS_PER_MINUTE:
            raise ValueError(f"requests_per_minute must be between 1 and {DO_REQUESTS_PER_MINUTE}")
        if not 1 <= self.requests_per_hour <= DO_REQUESTS_PER_HOUR:
            raise ValueError(f"requests_per_hour must be between 1 and {DO_REQUESTS_PER_HOUR}")
        if self.requests_per_hour < self.requests_per_minute:
            raise ValueError("requests_per_hour must be >= requests_per_minute")


def _urgent_share(limit: int) -> int:
    """Room kept for urgent requests: a tenth, and never less than one failover's two
    requests (a read and the assign) unless the budget is too small to share."""
    return max(2, limit // 10) if limit >= 4 else 0


class RequestBudget:
    """At most `per_minute` requests in any 60 s and `per_hour` in any 3600 s (trio time).

    A sliding-window log rather than a token bucket: a bucket refilling at N/minute still
    lets 2N through in some 60 s window (a full bucket, then the refill), while this bound
    holds for every window, which is what DigitalOcean counts. It costs one float per
    request of the last hour (at most `per_hour` of them).

    A tenth of each window (at least two requests) is kept for *urgent* requests, the ones
    that move the IP after a failover (the first read and the assign). Routine ones
    (reconcile reads, action polls) stop short of it, so a storm of failovers spends the
    budget on routine work last, and the request that ends an outage never waits for room:
    measured with
    bench/downtime.py, one failover every ~4 s had made a new leader wait 11.8 s.
    """

    MINUTE = 60.0
    HOUR = 3600.0

    def __init__(self, per_minute: int, per_hour: int) -> None:
        if per_minute < 1 or per_hour < 1:
            raise ValueError("a request budget needs at least one request per window")
        self.per_minute = per_minute
        self.per_hour = per_hour
        self._urgent_minute = _urgent_share(per_minute)
        self._urgent_hour = _urgent_share(per_hour)
        self._sent: deque[float] = deque()

    def set_limits(self, per_minute: int, per_hour: int) -> None:
        """New limits (a reload); requests already sent stay counted."""
        if per_minute < 1 or per_hour < 1:
            raise ValueError("a request budget needs at least one request per window")
        self.per_minute, self.per_hour = per_minute, per_hour
        self._urgent_minute = _urgent_share(per_minute)
        self._urgent_hour = _urgent_share(per_hour)

    def _forget_old(self, now: float) -> None:
        while self._sent and self._sent[0] <= now - self.HOUR:
            self._sent.popleft()

    def _in_last_minute(self, now: float) -> int:
        count = 0
        for sent_at in reversed(self._sent):
            if sent_at <= now - self.MINUTE or count >= self.per_minute:
                break
            count += 1
        return count

    def wait_needed(self, now: float, *, urgent: bool = False) -> float:
        """Seconds until one more request fits both windows (0 when it fits now)."""
        self._forget_old(now)
        per_hour = self.per_hour if urgent else self.per_hour - self._urgent_hour
        per_minute = self.per_minute if urgent else self.per_minute - self._urgent_minute
        wait = 0.0
        if len(self._sent) >= per_hour:
            wait = self._sent[-per_hour] + self.HOUR - now
        if self._in_last_minute(now) >= per_minute:
            wait = max(wait, self._sent[-per_minute] + self.MINUTE - now)
        return max(0.0, wait)

    async def acquire(self, *, urgent: bool = False) -> None:
        """Wait until a request fits the budget, then count it as sent.

        Always a checkpoint (trio's convention), so a cancelled caller stops here even
        when the budget has room, before any request is built.
        """
        await trio.lowlevel.checkpoint()
        while True:
            now = trio.current_time()
            wait = self.wait_needed(now, urgent=urgent)
            if wait <= 0:
                self._sent.append(now)
                return
            await trio.sleep(wait)

    def used(self) -> tuple[int, int]:
        """(requests in the last minute, requests in the last hour)."""
        now = trio.current_time()
        self._forget_old(now)
        return self._in_last_minute(now), len(self._sent)


class AssignmentRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One assignment: wall-clock start/finish (epoch seconds), duration and outcome."""

    started_at: float
    finished_at: float | None = None
    duration_seconds: float | None = None
    outcome: str = "in-progress"
    action_id: int | None = None


class ErrorRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The last provider error: its type, its (token-free) message and HTTP status."""

    type: str
    message: str
    status: int | None
    at: float


class AssignerSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """What `/status` shows about one address. Times are epoch seconds. The address is
    "here" when `leading` and `holder_droplet_id == droplet_id`."""

    reserved_ip: str
    family: Family
    droplet_id: int
    leading: bool
    holder_droplet_id: int | None
    holder_read_at: float | None
    locked: bool | None
    last_assignment: AssignmentRecord | None
    last_error: ErrorRecord | None
    consecutive_failures: int
    requests_last_minute: int
    requests_last_hour: int


class _Hooks:
    """The assigner's side of each provider request: the budget before, the observer after.

    `prepaid`: the first request's budget was already taken (the assign, whose budget is
    taken before the last-moment leadership check, so nothing awaits between that check
    and the request leaving).
    """

    def __init__(
        self,
        budget: RequestBudget,
        observer: AssignerObserver | None,
        *,
        urgent: bool,
        prepaid: bool = False,
    ) -> None:
        self._budget = budget
        self._observer = observer
        self._urgent = urgent
        self._prepaid = prepaid

    async def before(self) -> None:
        if self._prepaid:
            self._prepaid = False
            return
        await self._budget.acquire(urgent=self._urgent)

    def after(self, endpoint: str, status: str) -> None:
        if self._observer is not None:
            self._observer.api_request(endpoint, status)


class Assigner:
    """Points `reserved_ip` at `droplet_id` while `leadership` says this node leads.

    `rng` drives every jitter (inject a seeded one for reproducible tests);
    `wall_clock` stamps the snapshot's times; `budget` may be shared with other users of
    the same token on this node; `tokens` is the token source the client sends, re-read
    after a 401/403 and watched while a config error is waited out.
    """

    def __init__(
        self,
        provider: Provider,
        reserved_ip: str,
        droplet_id: int,
        leadership: LeadershipView,
        settings: AssignerSettings,
        rng: random.Random,
        observer: AssignerObserver | None = None,
        *,
        budget: RequestBudget | None = None,
        wall_clock: Callable[[], float] = time.time,
        tokens: RefreshableToken | None = None,
        budget_shares: int = 1,
        on_event: AddressListener | None = None,
    ) -> None:
        if droplet_id <= 0:
            raise ValueError("droplet_id must be a positive integer")
        self._provider = provider
        self._ip = reserved_ip
        self._droplet_id = droplet_id
        self._leadership = leadership
        self._settings = settings
        self._rng = rng
        self._observer = observer
        if budget_shares < 1:
            raise ValueError("budget_shares must be >= 1")
        self._shares = budget_shares
        self._budget = budget or RequestBudget(*self._limits(settings))
        self._family: Family = "ipv6" if ipaddress.ip_address(reserved_ip).version == 6 else "ipv4"
        self._on_event = on_event
        # The last address event of this term (None: none yet).
        self._announced: AddressEvent | None = None
        self._wall_clock = wall_clock
        self._tokens = tokens
        self._token_problem: str | None = None  # the last token re-read error logged
        self._retry_now = trio.Event()
        self._log_fields: dict[str, object] = {
            "reserved_ip": reserved_ip,
            "droplet_id": droplet_id,
        }
        # State for /status.
        self._leading = False
        self._leading_term = False  # a term began and `leadership_lost` has not run
        self._holder: Holding | None = None
        self._holder_read_at: float | None = None
        self._last_assignment: AssignmentRecord | None = None
        self._last_error: ErrorRecord | None = None
        self._failures = 0

    # ------------------------------------------------------------------ public

    def update_settings(self, settings: AssignerSettings) -> None:
        """A reload: intervals and delays apply from the next wait, budget limits at once."""
        self._settings = settings
        self._budget.set_limits(*self._limits(settings))

    def _limits(self, settings: AssignerSettings) -> tuple[int, int]:
        """This address's share of the node's budget (each of `budget_shares` addresses
        gets an equal part, so all of them together stay within the node's)."""
        return (
            max(1, settings.requests_per_minute // self._shares),
            max(1, settings.requests_per_hour // self._shares),
        )

    def leadership_lost(self) -> None:
        """The node stopped leading: if this term's last word was not already "lost", say
        `address_lost` (it held the address or was working towards it). Idempotent; the
        node's event listener calls it at once, and `run()` again when its scope ends."""
        if self._leading_term and self._announced != "address_lost":
            self._announce("address_lost")
        self._leading_term = False

    def _announce(self, event: AddressEvent) -> None:
        self._announced = event
        logger.info(
            "address gained" if event == "address_gained" else "address lost",
            extra={**self._log_fields, "event": event, "family": self._family},
        )
        if self._on_event is not None:
            self._on_event(event)

    def snapshot(self) -> AssignerSnapshot:
        minute, hour = self._budget.used()
        return AssignerSnapshot(
            reserved_ip=self._ip,
            family=self._family,
            droplet_id=self._droplet_id,
            leading=self._leading,
            holder_droplet_id=None if self._holder is None else self._holder.droplet_id,
            holder_read_at=self._holder_read_at,
            locked=None if self._holder is None else self._holder.locked,
            last_assignment=self._last_assignment,
            last_error=self._last_error,
            consecutive_failures=self._failures,
            requests_last_minute=minute,
            requests_last_hour=hour,
        )

    def retry_now(self) -> None:
        """Something that may fix a config error happened (a reload): end the wait after a
        401/403/404 now instead of after `config_error_retry_interval`. The request budget
        still applies. If no such wait is under way, the next one ends at once."""
        self._retry_now.set()

    async def run(self) -> NoReturn:
        """Forever: wait for leadership, then reconcile until it is lost."""
        used: trio.CancelScope | None = None
        while True:
            scope = await self._leadership.wait_until_leader()
            if scope is used:
                # The view says "leader" but still holds the scope of the term that just
                # ended (a scope can be entered once): give it a moment to catch up.
                await trio.sleep(_STALE_SCOPE_RETRY_DELAY)
                continue
            used = scope
            self._leading = self._leading_term = True
            self._announced = None
            logger.info("gained leadership: taking the reserved IP", extra=self._log_fields)
            try:
                with scope:
                    await self._lead()
            finally:
                self._leading = False
                self.leadership_lost()
            logger.info("leadership lost: assigner stopped", extra=self._log_fields)
            # A misbehaving view returning cancelled scopes in a row must not spin us hot.
            await trio.lowlevel.checkpoint()

    # ------------------------------------------------------------------ the loop

    async def _lead(self) -> NoReturn:
        last_assign_started: float | None = None  # None: the first assignment is not delayed
        here = False  # the last read found the IP on this droplet: reads are routine
        while True:
            try:
                holder = await self._read_holder(urgent=not here)
            except ProviderError as exc:
                await self._back_off(exc)
                continue
            here = holder.droplet_id == self._droplet_id
            # `_leading_term` is False once the node said it lost leadership, even if this
            # read's answer arrived in the same instant: never announce after that.
            if here and self._leading_term and self._announced != "address_gained":
                self._announce("address_gained")
            elif not here and self._announced == "address_gained":
                self._announce("address_lost")  # seen pointing elsewhere
            if here:
                await trio.sleep(self._reconcile_delay())
                continue
            if holder.locked:
                # An action (a previous leader's, or ours) is in flight: a POST would 422.
                logger.info(
                    "reserved IP is locked by an action in progress; waiting",
                    extra={**self._log_fields, "holder": holder.droplet_id},
                )
                # Poll as often as we follow our own actions: the lock may clear any moment,
                # and every second waited here is a second of outage after a failover.
                await trio.sleep(self._settings.action_poll_interval)
                continue
            if last_assign_started is not None:
                wait = last_assign_started + self._settings.cooloff_interval - trio.current_time()
                if wait > 0:
                    await trio.sleep(wait)
                    continue  # the world may have changed meanwhile: read again
            await self._budget.acquire(urgent=True)
            # No await between this check and the request leaving: a paused node must not
            # act on leadership it held before the pause.
            if not self._leadership.is_leader():
                logger.warning(
                    "not leader by the clock any more; not assigning", extra=self._log_fields
                )
                await trio.sleep(self._settings.action_poll_interval)
                continue
            attempt_started = trio.current_time()
            logger.info(
                "assigning the reserved IP to this droplet",
                extra={**self._log_fields, "holder": holder.droplet_id},
            )
            try:
                await self._assign_and_follow()
            except ProviderError as exc:
                # The POST was refused or lost: no action of ours is known to exist, so
                # no cool-off. If one did start (a lost answer), the next read shows the
                # IP locked or already here, and neither path POSTs again.
                await self._back_off(exc)
            else:
                last_assign_started = attempt_started

    async def _read_holder(self, *, urgent: bool) -> Holding:
        holder = await self._request(
            self._provider.read(self._ip, _Hooks(self._budget, self._observer, urgent=urgent))
        )
        self._holder = holder
        self._holder_read_at = self._wall_clock()
        return holder

    async def _assign_and_follow(self) -> None:
        """POST the assign (budget already taken) and follow its action to the end."""
        started = trio.current_time()
        record = AssignmentRecord(started_at=self._wall_clock())
        self._last_assignment = record
        outcome = "cancelled"
        try:
            try:
                action = await self._request(
                    self._provider.assign(
                        self._ip,
                        self._droplet_id,
                        _Hooks(self._budget, self._observer, urgent=True, prepaid=True),
                    )
                )
            except ProviderError:
                outcome = "failed"
                raise
            record = msgspec.structs.replace(record, action_id=action.id)
            self._last_assignment = record
            outcome = await self._follow(action)
        finally:
            duration = trio.current_time() - started
            self._last_assignment = msgspec.structs.replace(
                record,
                finished_at=self._wall_clock(),
                duration_seconds=duration,
                outcome=outcome,
            )
            if self._observer is not None:
                self._observer.assignment_finished(duration, outcome)
        level = logging.INFO if outcome == "completed" else logging.WARNING
        logger.log(
            level,
            "assignment finished",
            extra={**self._log_fields, "outcome": outcome, "duration_seconds": duration},
        )

    async def _follow(self, action: Operation) -> str:
        """Poll the action until it ends, it vanishes (404) or `action_timeout` passes.

        Returns `completed`, `errored`, `timeout`, or `unknown` (vanished, or ended with a
        status the spec does not list); after any of them the caller re-reads the IP.
        """
        with trio.move_on_after(self._settings.action_timeout):
            while not action.done:
                await trio.sleep(self._settings.action_poll_interval)
                try:
                    action = await self._request(
                        self._provider.follow(
                            self._ip, action, _Hooks(self._budget, self._observer, urgent=False)
                        )
                    )
                except NotFound:
                    # Some actions are not (yet) visible by id; the IP itself is the truth.
                    return "unknown"
                except ProviderError as exc:
                    await self._back_off(exc)
            if action.status not in ("completed", "errored"):
                # Not in the spec (DigitalOcean once said `done`): it is over, but only the
                # IP can say how; the caller reads it next.
                logger.warning(
                    "action ended with an unknown status; reading the reserved IP",
                    extra={**self._log_fields, "action_status": action.status},
                )
                return "unknown"
            return action.status
        return "timeout"

    # ------------------------------------------------------------------ helpers

    async def _request(self, call: Awaitable[_Result]) -> _Result:
        """Await one provider call (its requests reach the observer through `_Hooks`) and
        count failures."""
        result = await call
        if self._last_error is not None:
            logger.info(
                "DigitalOcean API answering again; last error cleared",
                extra={
                    **self._log_fields,
                    "event": "api_recovered",
                    "after_failures": self._failures,
                },
            )
            self._last_error = None
        self._failures = 0
        return result

    async def _back_off(self, exc: ProviderError) -> None:
        """Wait as long as `exc` calls for; a config error's wait ends once a fix is likely."""
        delay = self._delay_after(exc)
        if isinstance(exc, Rejected | NotFound):
            await self._wait_for_fix(delay)
        else:
            await trio.sleep(delay)

    async def _wait_for_fix(self, delay: float) -> None:
        """Sleep `delay`, or less: until the token changes (the token file is checked every
        `_FIX_POLL_INTERVAL`, one stat each, no API request) or `retry_now()` is called."""
        generation = None if self._tokens is None else self._tokens.generation
        deadline = trio.current_time() + delay
        try:
            while (left := deadline - trio.current_time()) > 0:
                with trio.move_on_after(min(left, _FIX_POLL_INTERVAL)):
                    await self._retry_now.wait()
                if self._retry_now.is_set():
                    reason = "retry requested (config reload)"
                elif self._token_changed_since(generation):
                    reason = "the token file changed"
                else:
                    continue
                logger.info(
                    f"DigitalOcean API: {reason}; retrying now",
                    extra={**self._log_fields, "event": "config_error_retry"},
                )
                return
        finally:
            if self._retry_now.is_set():
                self._retry_now = trio.Event()

    def _token_changed_since(self, generation: int | None) -> bool:
        tokens = self._tokens
        if tokens is None:
            return False
        if tokens.changed_on_disk():
            self._refresh_token()
        return tokens.generation != generation

    def _refresh_token(self) -> bool:
        """Re-read the token; True when it changed. A bad file is logged (once per problem)
        and the token in use is kept."""
        if self._tokens is None:
            return False
        try:
            changed = self._tokens.refresh()
        except CredentialError as exc:
            if str(exc) != self._token_problem:
                self._token_problem = str(exc)
                logger.error(
                    "DigitalOcean token re-read failed; keeping the one in use",
                    extra={**self._log_fields, "event": "token_error", "reason": str(exc)},
                )
            return False
        self._token_problem = None
        return changed

    def _delay_after(self, exc: ProviderError) -> float:
        """Record the error, log it, and say how long to wait before trying again."""
        self._failures += 1
        self._last_error = ErrorRecord(
            type=exc.origin, message=str(exc), status=exc.status, at=self._wall_clock()
        )
        fields = {
            **self._log_fields,
            "error_type": exc.origin,
            "status": exc.status_label,
            "reason": str(exc),
            "consecutive_failures": self._failures,
        }
        settings = self._settings
        if isinstance(exc, Rejected | NotFound):
            if isinstance(exc, Rejected) and self._refresh_token():
                logger.warning(
                    "DigitalOcean API: token rejected; token_file holds a new token, "
                    "retrying with it",
                    extra=fields,
                )
                return 0.0
            what = "token rejected" if isinstance(exc, Rejected) else "not found"
            logger.error(
                f"DigitalOcean API: {what}; check the token, reserved IP and droplet id "
                f"(retrying in {settings.config_error_retry_interval:g} s, or as soon as "
                "token_file changes or the config is reloaded)",
                extra=fields,
            )
            return settings.config_error_retry_interval
        if isinstance(exc, Busy):
            logger.warning("DigitalOcean API: 422, an action is in progress; waiting", extra=fields)
            return self._unprocessable_delay()
        if isinstance(exc, RateLimited) and exc.retry_after is not None:
            # Honour the server, but never hammer it on a "retry after 0".
            delay = min(
                max(exc.retry_after, settings.backoff_base_delay), settings.rate_limit_max_delay
            )
            logger.warning(
                "DigitalOcean API: rate limited; waiting", extra={**fields, "delay": delay}
            )
            return delay
        ceiling = min(
            settings.backoff_max_delay,
            settings.backoff_base_delay * 2 ** min(self._failures - 1, 30),
        )
        delay = self._rng.uniform(0.0, ceiling)
        logger.warning(
            "DigitalOcean API request failed; backing off", extra={**fields, "delay": delay}
        )
        return delay

    def _reconcile_delay(self) -> float:
        jitter = self._settings.reconcile_jitter
        return self._settings.reconcile_interval * self._rng.uniform(1 - jitter, 1 + jitter)

    def _unprocessable_delay(self) -> float:
        base = self._settings.unprocessable_delay
        return self._rng.uniform(base, 1.5 * base)
