"""Assemble one sidecar from its parts and run them in one nursery.

The node (election) is the spine; the health checker feeds it, and the assigner, hooks and
metrics hang off its leadership. Only this module knows all the parts, so each part stays
testable alone and `cli.py` stays a thin shell.
"""

from __future__ import annotations

import logging
import random
import signal
import socket
import ssl
from collections.abc import Callable

import msgspec
import trio

from sidecar import files
from sidecar.assigner import (
    AddressEvent,
    AddressListener,
    Assigner,
    AssignerSnapshot,
    SharedLeadership,
)
from sidecar.config import Address, Config, ConfigError, ManagedAddress
from sidecar.election import Event, GainedLeadership, LeaderChanged, LostLeadership
from sidecar.health import HealthChecker
from sidecar.hooks import HookRunner
from sidecar.metrics import Metrics
from sidecar.node import EventListener, Node
from sidecar.ondemand import OnDemandClient, build_client
from sidecar.providers.digitalocean import (
    DigitalOceanProvider,
    ProviderError,
    TokenError,
    TokenSource,
)
from sidecar.reload import plan as reload_plan
from sidecar.status import StatusApp, serve_status
from sidecar.transport import bind_problem

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The sidecar cannot start (e.g. the droplet id cannot be discovered); exit non-zero."""


def _check_status_port(listen: Address) -> None:
    """Fail before the node speaks if the status port is taken: a process that joins the
    election and dies a moment later costs the cluster more than one that never started."""
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
            probe.bind((listen.host, listen.port))
    except OSError as exc:
        raise StartupError(f"status_listen: {listen} {bind_problem(exc)}") from None


def _hook_listener(hooks: HookRunner) -> EventListener:
    def on_event(event: Event, node: Node) -> None:
        view = node.view()
        match event:
            case GainedLeadership():
                hooks.notify("gained", str(view.role), event.term, view.leader_id)
            case LostLeadership():
                hooks.notify("lost", str(view.role), event.term, view.leader_id)
            case LeaderChanged():
                hooks.notify("leader_change", str(view.role), event.term, event.current)

    return on_event


def _leadership_lost_listener(
    leadership: SharedLeadership, assigners: list[Assigner]
) -> EventListener:
    """In the node's own `LostLeadership` step: stop every assigner, and have each queue
    its `address_lost` beside the node's `lost`."""

    def on_event(event: Event, node: Node) -> None:
        if isinstance(event, LostLeadership):
            leadership.ended()
            for assigner in assigners:
                assigner.leadership_lost()

    return on_event


def _address_listener(hooks: HookRunner, node: Node, address: ManagedAddress) -> AddressListener:
    def on_event(event: AddressEvent) -> None:
        view = node.view()
        hooks.notify(
            event,
            str(view.role),
            view.term,
            view.leader_id,
            address=address.address,
            family=address.family,
        )

    return on_event


def _check_ca_file(config: Config) -> None:
    """Fail at start on a CA bundle that does not load: the API client that needs it is
    built only when this node first leads (see `ondemand.py`), too late to refuse to start."""
    ca_file = config.digitalocean.ca_file
    if not config.addresses or ca_file is None:
        return
    try:
        ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"digitalocean.ca_file: cannot load {ca_file} ({exc})") from None


async def _droplet_id(config: Config, tokens: TokenSource) -> int:
    assert config.floating_ip is not None
    if config.floating_ip.droplet_id is not None:
        return config.floating_ip.droplet_id
    try:
        with trio.fail_after(30):
            async with build_client(config.digitalocean, tokens) as client:
                return await client.metadata_droplet_id()
    except (ProviderError, trio.TooSlowError) as exc:
        raise StartupError(
            "floating_ip.droplet_id (droplet_id with [[addresses]]): not set and the "
            "metadata service did not answer "
            f"({exc}); set it, or check digitalocean.metadata_url"
        ) from None


async def serve(config: Config, *, reload: Callable[[], Config] | None = None) -> None:
    """Run the sidecar until SIGTERM/SIGINT; a leader resigns before the process ends.

    What can be checked before the node joins the election is checked first (the status
    port, the API token), so those mistakes end the process before it sends a packet.
    With `reload` (how to read the config again), SIGHUP applies the new config live where
    it can and refuses it whole where it cannot (see `sidecar/reload.py`).
    """
    for warning in files.permission_warnings(config):
        log.warning(warning.message, extra={"event": "insecure_file", "key": warning.key})
    _check_status_port(config.status_listen)
    _check_ca_file(config)
    tokens = None if config.floating_ip is None else TokenSource(config.digitalocean)
    node = Node(config)
    metrics = Metrics()
    metrics.watch(node)
    node.rtt_observer = lambda peer, rtt: metrics.rtt.labels(str(peer)).observe(rtt)
    app = StatusApp(node, metrics)

    health = HealthChecker(config.health)
    node.set_healthy(health.healthy)
    if health.verdict_pending:
        node.expect_health_verdict(health.first_verdict_within)
    metrics.watch_health(health)
    app.add_section("health", lambda: msgspec.to_builtins(health.state))

    hooks = HookRunner(
        config.hooks,
        config.node_id,
        None if config.floating_ip is None else config.floating_ip.address,
    )
    node.add_listener(_hook_listener(hooks))
    metrics.watch_hooks(hooks)
    app.add_section(
        "hooks",
        lambda: {"pending": hooks.pending, "last": msgspec.to_builtins(hooks.last_result)},
    )
    running = _Running(config, node, health, hooks)
    app.add_section("reload", running.summary)

    async with trio.open_nursery() as nursery:
        running.nursery = nursery
        nursery.start_soon(_stop_on_signal, node)
        if reload is not None:
            nursery.start_soon(_reload_on_signal, running, reload)
        await nursery.start(_run_node_then_stop_all, node, hooks, nursery.cancel_scope)
        await nursery.start(serve_status, app, config.status_listen)
        running.start_health()
        nursery.start_soon(hooks.run)
        if tokens is not None:
            running.tokens = tokens
            running.assigners = await nursery.start(
                _run_assigners, config, tokens, node, metrics, app, hooks
            )


class _Running:
    """The parts a reload may touch, and the outcome of the last reload (for /status)."""

    def __init__(self, config: Config, node: Node, health: HealthChecker, hooks: HookRunner):
        self.config = config
        self.node = node
        self.health = health
        self.hooks = hooks
        self.assigners: list[Assigner] = []
        self.tokens: TokenSource | None = None
        self.nursery: trio.Nursery | None = None
        self._health_scope = trio.CancelScope()
        self.reloads = 0
        self.last: dict[str, object] | None = None

    def summary(self) -> dict[str, object]:
        return {"reloads": self.reloads, "last": self.last}

    def start_health(self) -> None:
        assert self.nursery is not None
        self._health_scope = scope = trio.CancelScope()

        async def run_health() -> None:
            with scope:
                await self.health.run(self.node.set_healthy)

        self.nursery.start_soon(run_health)

    def refresh_token(self) -> None:
        """Every reload re-reads the token file (a rotated token), whatever else changed,
        and lets an assigner waiting out a 401/403/404 try again at once."""
        if self.tokens is not None:
            try:
                self.tokens.refresh()
            except TokenError as exc:
                log.error("reload: token not re-read", extra={"event": "token", "error": str(exc)})
        for assigner in self.assigners:
            assigner.retry_now()

    async def apply(self, new: Config) -> None:
        """Apply `new` if every difference can be applied live; else refuse it whole."""
        self.refresh_token()
        change = reload_plan(self.config, new)
        self.reloads += 1
        if change.refused:
            self.last = {"outcome": "refused", "restart_needed": list(change.restart_only)}
            log.error(
                "reload refused: these settings only change with a restart; "
                "still running on the previous config",
                extra={"event": "reload_refused", "restart_needed": list(change.restart_only)},
            )
            return
        if change.membership_changed or "max_clock_skew" in change.live:
            await self.node.reconfigure(new)
        if "health" in change.live:
            self._health_scope.cancel()
            if self.health.reconfigure(new.health):
                self.node.set_healthy(self.health.healthy)
            self.start_health()
        if "hooks" in change.live:
            self.hooks.settings = new.hooks
        if "assigner" in change.live:
            for assigner in self.assigners:
                assigner.update_settings(new.assigner)
        if "log_level" in change.live:
            logging.getLogger().setLevel(new.log_level.upper())
        self.config = new
        self.last = {"outcome": "applied", "changed": list(change.live)}
        log.info(
            "config reloaded",
            extra={"event": "reloaded", "changed": list(change.live), "quorum": new.quorum_text},
        )


async def _reload_on_signal(running: _Running, reload: Callable[[], Config]) -> None:
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            log.info("SIGHUP received; reloading the config", extra={"event": "signal"})
            try:
                new = reload()
            except ConfigError as exc:
                running.refresh_token()
                running.reloads += 1
                running.last = {"outcome": "error", "error": str(exc)}
                log.error(
                    "reload refused: config error; still running on the previous config",
                    extra={"event": "reload_refused", "error": str(exc)},
                )
                continue
            await running.apply(new)


async def _run_assigners(
    config: Config,
    tokens: TokenSource,
    node: Node,
    metrics: Metrics,
    app: StatusApp,
    hooks: HookRunner,
    *,
    task_status: trio.TaskStatus[list[Assigner]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """One assigner per address, each its own task with its own share of the request
    budget, so one failing address never holds up another; one client (one token), built
    when this node first leads (see `ondemand.py`)."""
    droplet_id = await _droplet_id(config, tokens)
    async with OnDemandClient(lambda: build_client(config.digitalocean, tokens)) as client:
        provider = DigitalOceanProvider(client)
        leadership = SharedLeadership(node)
        assigners = [
            Assigner(
                provider,
                address.address,
                droplet_id,
                leadership,
                config.assigner,
                random.Random(),
                metrics.for_address(address.address),
                tokens=tokens,
                budget_shares=len(config.addresses),
                on_event=_address_listener(hooks, node, address),
            )
            for address in config.addresses
        ]
        node.add_listener(_leadership_lost_listener(leadership, assigners))

        def snapshots() -> list[AssignerSnapshot]:
            return [assigner.snapshot() for assigner in assigners]

        metrics.watch_addresses(snapshots)
        app.add_section("floating_ip", lambda: msgspec.to_builtins(assigners[0].snapshot()))
        app.add_section("addresses", lambda: msgspec.to_builtins(snapshots()))
        task_status.started(assigners)
        async with trio.open_nursery() as nursery:
            for assigner in assigners:
                nursery.start_soon(assigner.run)


async def _run_node_then_stop_all(
    node: Node,
    hooks: HookRunner,
    everything: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The node decides when the process ends: once it has resigned, stopped, and the
    hooks its resignation queued (an operator's `on_lost`) have run or timed out."""
    await node.run(task_status=task_status)
    with trio.move_on_after(hooks.settings.hook_timeout + 1):
        await hooks.wait_idle()
    everything.cancel()


async def _stop_on_signal(node: Node) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info(
                "signal received; resigning and stopping",
                extra={"event": "signal", "signal": signal.Signals(signum).name},
            )
            node.request_shutdown()
            return
