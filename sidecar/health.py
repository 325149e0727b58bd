"""Checks of the local web service, with rise/fall hysteresis.

A node may lead only while the service it fronts is healthy, so this module answers one
question for the election: "is the local service healthy right now?". It probes the
service the way haproxy and keepalived do (an HTTP status, a TCP connect, or a command's
exit code) on a fixed interval, and only changes its answer after `rise` consecutive
passes or `fall` consecutive failures: one slow response must not move the floating IP,
because every move is a short outage for everybody.

Nothing a probe does can raise out of `HealthChecker.run()`: every exception becomes a
failed check with a short reason ("status 503", "timeout", "connection refused",
"exit 1: ...") that `/status` and the logs show.

HTTP checks run through `httpprobe.py` (h11 over one kept-alive connection), command
checks through `processes.py`, shared with the notify hooks.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import shlex
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

import msgspec
import trio

from sidecar.httpprobe import HTTPProbe, ProbeError
from sidecar.processes import run_process_group, sanitized_environment, summarize_output

logger = logging.getLogger(__name__)

CheckKind = Literal["http", "tcp", "command", "none"]

#: How much of a command's output goes into a check's reason (characters).
REASON_OUTPUT_LIMIT = 120
#: How much of an HTTP body is read before the response is dropped (bytes); the status is
#: all that counts, the cap only stops a misbehaving endpoint from streaming forever.
HTTP_BODY_LIMIT = 64 * 1024
#: How much of a health command's output is kept in memory (bytes).
COMMAND_OUTPUT_LIMIT = 4096
#: The first check waits a random fraction of this share of the interval, so that nodes
#: started together (compose, cloud-init) do not probe a shared dependency in lockstep.
FIRST_CHECK_JITTER_SHARE = 0.1


class HealthSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """The `[health]` section: what to probe, how often, and how much evidence to require.

    Set at most one of `http`, `tcp` and `command`. With none of them set there is
    nothing to probe and the service counts as always healthy: the node's eligibility
    then depends only on the sidecar itself being alive (useful for a witness, or for a
    service whose failure is already visible as the droplet dying).

    `check_timeout` must be shorter than `check_interval` so checks never overlap and the
    interval is a real rate. The defaults (1 s interval, rise 2, fall 3) notice a dead
    service in about 3 s and trust a recovered one after about 2 s, like haproxy's.
    """

    http: str | None = None
    """URL to GET, e.g. "http://127.0.0.1:8080/healthz". Redirects are not followed."""
    http_expect_status: tuple[int, int] = (200, 399)
    """Inclusive range of HTTP statuses that count as a pass, `[low, high]`."""
    tcp: str | None = None
    """"host:port" (or "[v6]:port") that must accept a TCP connection."""
    command: tuple[str, ...] | None = None
    """argv list (no shell) that must exit 0, e.g. ["pg_isready", "-q"]."""
    check_interval: float = 1.0
    """Seconds from the start of one check to the start of the next."""
    check_timeout: float = 0.8
    """Seconds a single check may take before it counts as failed ("timeout")."""
    rise: int = 2
    """Consecutive passes needed to become healthy."""
    fall: int = 3
    """Consecutive failures needed to become unhealthy."""
    start_healthy: bool = False
    """Whether a node counts as healthy before its first `rise` passes. Off by default so
    a freshly started node cannot win an election in front of a service still booting."""

    def __post_init__(self) -> None:
        chosen = [name for name in ("http", "tcp", "command") if getattr(self, name) is not None]
        if len(chosen) > 1:
            raise ValueError(
                f"health: set only one of http, tcp, command (got {', '.join(chosen)})"
            )
        if self.http is not None:
            _validate_http_url(self.http)
        low, high = self.http_expect_status
        if not 100 <= low <= high <= 599:
            raise ValueError(
                "health.http_expect_status must be [low, high] with 100 <= low <= high <= 599"
            )
        if self.tcp is not None:
            parse_host_port(self.tcp, key="health.tcp")
        if self.command is not None and (not self.command or not self.command[0]):
            raise ValueError("health.command must be a non-empty argv list")
        if not self.check_interval > 0:
            raise ValueError("health.check_interval must be > 0")
        if not self.check_timeout > 0:
            raise ValueError("health.check_timeout must be > 0")
        if not self.check_timeout < self.check_interval:
            raise ValueError("health.check_timeout must be < health.check_interval")
        if self.rise < 1:
            raise ValueError("health.rise must be >= 1")
        if self.fall < 1:
            raise ValueError("health.fall must be >= 1")

    @property
    def kind(self) -> CheckKind:
        if self.http is not None:
            return "http"
        if self.tcp is not None:
            return "tcp"
        if self.command is not None:
            return "command"
        return "none"

    @property
    def target(self) -> str | None:
        """What is probed, as a person would write it (for /status and logs)."""
        if self.command is not None:
            return shlex.join(self.command)
        return self.http or self.tcp


def _validate_http_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("health.http must be an http:// or https:// URL with a host")
    # The checker never sends credentials, and a URL is shown in /status and logs.
    if parts.username is not None or parts.password is not None:
        raise ValueError("health.http must not contain credentials (user:password@)")


def parse_host_port(value: str, *, key: str) -> tuple[str, int]:
    """Split "host:port" or "[v6]:port"; raise ValueError naming `key` when malformed."""
    host, sep, port_text = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f'{key} must be "host:port" with a port in 1..65535 (got {value!r})')
    return host, int(port_text)


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one probe: pass or fail, and a short reason a person can act on."""

    ok: bool
    reason: str


class HealthState(msgspec.Struct, kw_only=True, frozen=True):
    """A snapshot of the checker for `/status` and `/metrics`; encodes to JSON as is."""

    healthy: bool
    kind: CheckKind
    target: str | None
    last_ok: bool | None  # None until the first check
    last_reason: str | None
    last_check_wall_time: float | None  # time.time() of the last check's start
    last_check_duration: float | None  # seconds the last check took
    consecutive_passes: int
    consecutive_failures: int
    transitions: int
    checks_total: int
    failures_total: int


class Hysteresis:
    """Turns a stream of pass/fail results into a stable healthy/unhealthy answer.

    Kept apart from the probing so the rule can be tested exhaustively without IO:
    healthy after `rise` consecutive passes, unhealthy after `fall` consecutive failures.
    """

    def __init__(self, *, rise: int, fall: int, healthy: bool) -> None:
        self.rise = rise
        self.fall = fall
        self.healthy = healthy
        self.consecutive_passes = 0
        self.consecutive_failures = 0
        self.transitions = 0

    def record(self, ok: bool) -> bool:
        """Count one result; return True when it changed `healthy`."""
        if ok:
            self.consecutive_passes += 1
            self.consecutive_failures = 0
            flip = not self.healthy and self.consecutive_passes >= self.rise
        else:
            self.consecutive_failures += 1
            self.consecutive_passes = 0
            flip = self.healthy and self.consecutive_failures >= self.fall
        if flip:
            self.healthy = not self.healthy
            self.transitions += 1
        return flip


class HealthChecker:
    """Probes the local service every `check_interval` and reports healthy/unhealthy.

    Use it from one task: `await checker.run(on_change)` runs until cancelled, calling
    `on_change(healthy)` synchronously on each transition and once at the first verdict
    (never for the initial state,
    which is `settings.start_healthy`, or True when nothing is probed). Other tasks read
    `checker.state` (an immutable snapshot). Exceptions raised by `on_change` are bugs of
    the caller and propagate.

    `check_once()` runs a single probe and feeds the hysteresis; `run()` is just that on a
    schedule. The HTTP connection is reused across checks (keep-alive keeps a check cheap)
    and closed when `run()` ends or by `aclose()`.
    """

    def __init__(self, settings: HealthSettings, *, rng: random.Random | None = None) -> None:
        self.settings = settings
        self._rng = rng or random.Random()
        always_healthy = settings.kind == "none"
        self._hysteresis = Hysteresis(
            rise=settings.rise,
            fall=settings.fall,
            healthy=always_healthy or settings.start_healthy,
        )
        self._verdict_reached = always_healthy or settings.start_healthy
        self._last: CheckResult | None = None
        self._last_wall_time: float | None = None
        self._last_duration: float | None = None
        self._checks_total = 0
        self._failures_total = 0
        self._http: HTTPProbe | None = None

    @property
    def healthy(self) -> bool:
        return self._hysteresis.healthy

    @property
    def verdict_pending(self) -> bool:
        """No verdict yet: a check is configured and the node does not start healthy."""
        return not self._verdict_reached

    @property
    def first_verdict_within(self) -> float:
        """About when the first verdict is due: `rise` passes, the last one may time out."""
        s = self.settings
        return s.rise * s.check_interval + s.check_timeout

    @property
    def state(self) -> HealthState:
        h = self._hysteresis
        return HealthState(
            healthy=h.healthy,
            kind=self.settings.kind,
            target=self.settings.target,
            last_ok=None if self._last is None else self._last.ok,
            last_reason=None if self._last is None else self._last.reason,
            last_check_wall_time=self._last_wall_time,
            last_check_duration=self._last_duration,
            consecutive_passes=h.consecutive_passes,
            consecutive_failures=h.consecutive_failures,
            transitions=h.transitions,
            checks_total=self._checks_total,
            failures_total=self._failures_total,
        )

    async def run(self, on_change: Callable[[bool], None]) -> None:
        """Check forever on a fixed rate; call `on_change(healthy)` on transitions only."""
        try:
            if self.settings.kind == "none":
                await trio.sleep_forever()
            interval = self.settings.check_interval
            await trio.sleep(self._rng.uniform(0, interval * FIRST_CHECK_JITTER_SHARE))
            next_start = trio.current_time()
            while True:
                changed = await self._check_and_record()
                if self._first_verdict(changed) or changed:
                    on_change(self._hysteresis.healthy)
                # Fixed rate from each check's start; if a check overran (it cannot, as
                # timeout < interval, but the process may have been paused), skip ahead
                # rather than firing a burst of catch-up checks.
                next_start = max(next_start + interval, trio.current_time())
                await trio.sleep_until(next_start)
        finally:
            with trio.CancelScope(shield=True):
                await self.aclose()

    def _first_verdict(self, changed: bool) -> bool:
        """True once, when the evidence first settles either way (rise passes or fall
        failures), so a node that started unhealthy learns its verdict is in."""
        h = self._hysteresis
        if self._verdict_reached:
            return False
        settled = changed or h.consecutive_passes >= h.rise or h.consecutive_failures >= h.fall
        self._verdict_reached = settled
        return settled

    async def check_once(self) -> CheckResult:
        """Run one probe, record it, and return its result (no transition callback)."""
        await self._check_and_record()
        assert self._last is not None
        return self._last

    def reconfigure(self, settings: HealthSettings) -> bool:
        """Take new settings (a reload) while `run` is stopped; counts are kept. The verdict
        stays as it is until new evidence moves it, except that removing the check makes the
        service count as healthy. Returns True when that changed the verdict."""
        self.settings = settings
        h = self._hysteresis
        h.rise, h.fall = settings.rise, settings.fall
        h.consecutive_passes = h.consecutive_failures = 0
        if settings.kind == "none" and not h.healthy:
            h.healthy = True
            self._verdict_reached = True
            return True
        return False

    async def aclose(self) -> None:
        if self._http is not None:
            probe, self._http = self._http, None
            await probe.aclose()

    async def __aenter__(self) -> HealthChecker:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _check_and_record(self) -> bool:
        """Probe once; return True when the healthy/unhealthy answer changed."""
        self._last_wall_time = time.time()
        started = trio.current_time()
        result = await self._probe()
        self._last_duration = trio.current_time() - started
        self._last = result
        self._checks_total += 1
        if not result.ok:
            self._failures_total += 1
        was_failing = self._hysteresis.consecutive_failures > 0
        changed = self._hysteresis.record(result.ok)
        fields = {
            "check_kind": self.settings.kind,
            "target": self.settings.target,
            "ok": result.ok,
            "reason": result.reason,
            "consecutive_passes": self._hysteresis.consecutive_passes,
            "consecutive_failures": self._hysteresis.consecutive_failures,
        }
        if changed:
            healthy = self._hysteresis.healthy
            message = "service became healthy" if healthy else "service became unhealthy"
            logger.warning(message, extra={**fields, "healthy": healthy})
        elif not result.ok and not was_failing:
            logger.info("health check failed", extra=fields)
        else:
            logger.debug("health check", extra=fields)
        return changed

    async def _probe(self) -> CheckResult:
        """Run the configured probe within `check_timeout`; never raises (except Cancelled)."""
        try:
            with trio.move_on_after(self.settings.check_timeout):
                return await self._probe_unbounded()
            return CheckResult(False, "timeout")
        except Exception as exc:  # a probe must never take the checker down
            return CheckResult(False, describe_failure(exc))

    async def _probe_unbounded(self) -> CheckResult:
        s = self.settings
        if s.http is not None:
            # A probe (and its connection) belongs to one URL: after a reload to another
            # one, nothing may reach the old host, port or scheme.
            if self._http is None or self._http.url != s.http:
                await self.aclose()
                self._http = HTTPProbe(s.http, body_limit=HTTP_BODY_LIMIT)
            status = await self._http.get()
            low, high = s.http_expect_status
            return CheckResult(low <= status <= high, f"status {status}")
        if s.tcp is not None:
            return await _probe_tcp(s.tcp)
        if s.command is not None:
            return await _probe_command(s.command, time_limit=s.check_timeout)
        return CheckResult(True, "no check configured")


async def _probe_tcp(target: str) -> CheckResult:
    host, port = parse_host_port(target, key="health.tcp")
    stream = await trio.open_tcp_stream(host, port)
    await stream.aclose()
    return CheckResult(True, "connected")


async def _probe_command(argv: Sequence[str], *, time_limit: float) -> CheckResult:
    # The checker's own cancel scope has the same deadline; whichever fires first, the
    # runner kills the command's whole process group before returning.
    outcome = await run_process_group(
        argv,
        time_limit=time_limit,
        env=sanitized_environment(os.environ),
        output_limit=COMMAND_OUTPUT_LIMIT,
    )
    if outcome.timed_out:
        return CheckResult(False, "timeout")
    code = outcome.returncode
    summary = summarize_output(outcome.output)
    if code == 0:
        return CheckResult(True, "exit 0")
    what = f"killed by signal {-code}" if code < 0 else f"exit {code}"
    return CheckResult(False, _truncate(f"{what}: {summary}") if summary else what)


def describe_failure(exc: BaseException) -> str:
    """A short, stable reason for a failed probe, from anywhere in the exception chain.

    trio wraps the interesting OSError several layers deep (an ExceptionGroup of
    connection attempts inside an OSError; an SSL error inside a BrokenResourceError), so
    this looks through causes, contexts, groups and exception arguments before falling
    back to the outermost exception's text.
    """
    chain = list(_exception_chain(exc))
    for item in chain:
        if isinstance(item, ConnectionRefusedError):
            return "connection refused"
    for item in chain:
        if isinstance(item, TimeoutError):
            return "timeout"
    for item in chain:
        if isinstance(item, OSError) and item.errno is not None:
            text = item.strerror or errno.errorcode.get(item.errno, str(item.errno))
            return _truncate(text.lower())
    for item in chain:
        if isinstance(item, ProbeError):  # its text is the reason: "bad response: ..."
            return _truncate(str(item))
    for item in chain:
        if isinstance(item, OSError) and str(item):
            return _truncate(f"{type(item).__name__}: {item}")
    return _truncate(f"{type(exc).__name__}: {exc}")


def _exception_chain(exc: BaseException, limit: int = 32) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo and len(seen) < limit:
        item = todo.pop(0)
        if id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        if isinstance(item, BaseExceptionGroup):
            todo.extend(item.exceptions)
        todo.extend(arg for arg in item.args if isinstance(arg, BaseException))
        todo.extend(e for e in (item.__cause__, item.__context__) if e is not None)


def _truncate(text: str, limit: int = REASON_OUTPUT_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
