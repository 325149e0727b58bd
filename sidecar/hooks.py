"""Notify hooks: user commands run when this node gains or loses leadership or an address.

Like keepalived's `notify_master` / `notify_backup` scripts, hooks let an operator do
something local when the role changes: warm a cache, flip a feature flag, page someone.
They are advisory. The floating IP does not wait for them, and a slow or broken hook
must never delay the election: the election owner calls `HookRunner.notify()`, a plain
synchronous call that only appends to a bounded queue, and a separate task (`run()`)
executes the queued hooks one at a time, in order, each bounded by `hook_timeout`.

When hooks fall behind, the *oldest* pending event is dropped (and counted): by the time
a backlog has built up the old events are history, and a hook should act on the current
state it is told about (FIP_ROLE, FIP_LEADER_ID), never on counting events.

Each hook sees the sidecar's environment minus anything secret (see
`processes.sanitized_environment`), plus:

    FIP_EVENT        gained | lost | leader_change | address_gained | address_lost
    FIP_ROLE         leader | follower | candidate (the role after the event)
    FIP_TERM         the election term
    FIP_LEADER_ID    the leader's node id, empty when there is none
    FIP_NODE_ID      this node's id
    FIP_FLOATING_IP  the first configured address, empty when none is configured
    FIP_ADDRESS      the address of an address_* event (empty for the others)
    FIP_FAMILY       ipv4 | ipv6, the family of FIP_ADDRESS (empty for the others)

The address events are per address and come from its assigner: `address_gained` once it
has read the address pointing at this droplet (the moment to add an IPv6 /128 or point
the default route at the anchor gateway), `address_lost` when this node stops leading
after holding or working towards the address, or reads it pointing elsewhere (the moment
to undo that). Scripts must be idempotent: a lost may come without a gained before it.
"""

from __future__ import annotations

import logging
import os
import shlex
import time
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal, get_args

import msgspec
import trio

from sidecar.processes import run_process_group, sanitized_environment, summarize_output

logger = logging.getLogger(__name__)

HookEvent = Literal["gained", "lost", "leader_change", "address_gained", "address_lost"]
HookOutcome = Literal["ok", "failed", "timeout", "dropped"]
EVENTS: Final[tuple[HookEvent, ...]] = get_args(HookEvent)
OUTCOMES: Final[tuple[HookOutcome, ...]] = get_args(HookOutcome)

#: The `[hooks]` keys that hold a command, one per event.
HOOK_KEYS: Final[tuple[str, ...]] = tuple(f"on_{event}" for event in EVENTS)

#: How much of a hook's output is kept (bytes) and how much of it is logged (characters).
HOOK_OUTPUT_LIMIT = 16 * 1024
HOOK_LOG_OUTPUT_LIMIT = 1000


class HookSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """The `[hooks]` section. Each hook is an argv list (no shell); unset means none.

    `hook_timeout` bounds each run; a hook still running then is killed with its whole
    process group. `max_queue` bounds the events waiting behind a running hook.
    """

    on_gained: tuple[str, ...] | None = None
    """Run when this node becomes leader."""
    on_lost: tuple[str, ...] | None = None
    """Run when this node stops being leader (including when it resigns)."""
    on_leader_change: tuple[str, ...] | None = None
    """Run on this node whenever the cluster's leader changes (or is lost)."""
    on_address_gained: tuple[str, ...] | None = None
    """Run when an address was read pointing at this droplet (once per address and term)."""
    on_address_lost: tuple[str, ...] | None = None
    """Run when this node stops holding (or working towards) an address."""
    hook_timeout: float = 10.0
    """Seconds a hook may run before it is killed."""
    max_queue: int = 16
    """Pending events kept while a hook runs; beyond it the oldest is dropped."""

    def __post_init__(self) -> None:
        for name in HOOK_KEYS:
            argv = getattr(self, name)
            if argv is not None and (not argv or not argv[0]):
                raise ValueError(f"hooks.{name} must be a non-empty argv list")
        if not self.hook_timeout > 0:
            raise ValueError("hooks.hook_timeout must be > 0")
        if self.max_queue < 1:
            raise ValueError("hooks.max_queue must be >= 1")

    def command_for(self, event: HookEvent) -> tuple[str, ...] | None:
        command: tuple[str, ...] | None = getattr(self, f"on_{event}")
        return command


@dataclass(frozen=True)
class PendingHook:
    """One event waiting for its hook, with the facts as they were when it happened."""

    event: HookEvent
    role: str
    term: int
    leader_id: int | None
    argv: tuple[str, ...]
    queued_at: float  # trio.current_time()
    address: str = ""
    family: str = ""


class HookResult(msgspec.Struct, kw_only=True, frozen=True):
    """How the last hook run went, for `/status`."""

    event: HookEvent
    outcome: HookOutcome
    exit_code: int | None  # None when it could not start
    duration: float
    wall_time: float  # time.time() when it finished


class HookRunner:
    """Queues hook events without blocking and runs them one at a time, in order.

    `notify()` is for the election owner; `run()` is a task in the node's nursery and runs
    until cancelled (cancelling it kills a running hook's process group). `counts()` and
    `last_result` are for `/metrics` and `/status`.
    """

    def __init__(
        self,
        settings: HookSettings,
        node_id: int,
        floating_ip: str | None,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.node_id = node_id
        self.floating_ip = floating_ip
        self._base_env = sanitized_environment(os.environ if environ is None else environ)
        self._pending: deque[PendingHook] = deque()
        self._wakeup = trio.Event()
        self._busy = False
        self._went_idle = trio.Event()
        self._counts: Counter[tuple[HookEvent, HookOutcome]] = Counter()
        self.last_result: HookResult | None = None

    def notify(
        self,
        event: HookEvent,
        role: str,
        term: int,
        leader_id: int | None,
        *,
        address: str = "",
        family: str = "",
    ) -> None:
        """Queue the hook for `event`, if one is configured. Never blocks or awaits.

        `address` and `family` belong to the address events. A full queue drops its
        oldest entry (counted as "dropped") to make room.
        """
        if event not in EVENTS:
            raise ValueError(f"unknown hook event {event!r}; expected one of {EVENTS}")
        argv = self.settings.command_for(event)
        if argv is None:
            return
        if len(self._pending) >= self.settings.max_queue:
            dropped = self._pending.popleft()
            self._counts[dropped.event, "dropped"] += 1
            logger.warning(
                "hook queue full, dropped the oldest event",
                extra={
                    "hook_event": dropped.event,
                    "term": dropped.term,
                    "max_queue": self.settings.max_queue,
                },
            )
        self._pending.append(
            PendingHook(
                event=event,
                role=role,
                term=term,
                leader_id=leader_id,
                argv=argv,
                queued_at=trio.current_time(),
                address=address,
                family=family,
            )
        )
        self._wakeup.set()

    @property
    def pending(self) -> int:
        """Events waiting (not counting a hook that is running)."""
        return len(self._pending)

    def counts(self) -> dict[tuple[HookEvent, HookOutcome], int]:
        """Runs by (event, outcome), every combination present, zeros included."""
        return {(e, o): self._counts[e, o] for e in EVENTS for o in OUTCOMES}

    async def run(self) -> None:
        """Execute queued hooks forever, one at a time, oldest first."""
        while True:
            while not self._pending:
                self._busy = False
                self._went_idle.set()  # wakes every current waiter ...
                self._went_idle = trio.Event()  # ... and arms the next round
                self._wakeup = trio.Event()
                await self._wakeup.wait()
            self._busy = True
            await self._execute(self._pending.popleft())

    async def wait_idle(self) -> None:
        """Return once every queued hook has run, e.g. the `lost` hook of a shutdown resign."""
        await trio.lowlevel.checkpoint()
        while self._pending or self._busy:
            await self._went_idle.wait()

    def environment_for(self, hook: PendingHook) -> dict[str, str]:
        return {
            **self._base_env,
            "FIP_EVENT": hook.event,
            "FIP_ROLE": hook.role,
            "FIP_TERM": str(hook.term),
            "FIP_LEADER_ID": "" if hook.leader_id is None else str(hook.leader_id),
            "FIP_NODE_ID": str(self.node_id),
            "FIP_FLOATING_IP": self.floating_ip or "",
            "FIP_ADDRESS": hook.address,
            "FIP_FAMILY": hook.family,
        }

    async def _execute(self, hook: PendingHook) -> None:
        started = trio.current_time()
        fields: dict[str, object] = {
            "hook_event": hook.event,
            "role": hook.role,
            "term": hook.term,
            "leader": hook.leader_id,
            "command": shlex.join(hook.argv),
            "address": hook.address or None,
            "queued_for": round(started - hook.queued_at, 3),
        }
        outcome: HookOutcome
        exit_code: int | None = None
        try:
            result = await run_process_group(
                hook.argv,
                time_limit=self.settings.hook_timeout,
                env=self.environment_for(hook),
                output_limit=HOOK_OUTPUT_LIMIT,
            )
        except OSError as exc:  # not found, not executable, ...
            outcome = "failed"
            fields["error"] = f"{type(exc).__name__}: {exc.strerror or exc}"
        else:
            exit_code = result.returncode
            outcome = "timeout" if result.timed_out else "ok" if exit_code == 0 else "failed"
            fields["exit_code"] = exit_code
            fields["output"] = summarize_output(result.output, HOOK_LOG_OUTPUT_LIMIT)
            fields["output_bytes"] = result.output_bytes
        duration = trio.current_time() - started
        fields["outcome"] = outcome
        fields["duration"] = round(duration, 3)
        self._counts[hook.event, outcome] += 1
        self.last_result = HookResult(
            event=hook.event,
            outcome=outcome,
            exit_code=exit_code,
            duration=duration,
            wall_time=time.time(),
        )
        if outcome == "ok":
            logger.info("hook finished", extra=fields)
        elif outcome == "timeout":
            fields["hook_timeout"] = self.settings.hook_timeout
            logger.warning("hook timed out and was killed", extra=fields)
        else:
            logger.warning("hook failed", extra=fields)
