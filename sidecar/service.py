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

import msgspec
import trio

from sidecar import files
from sidecar.assigner import Assigner
from sidecar.config import Address, Config
from sidecar.digitalocean import DigitalOceanClient, ProviderError, TokenSource
from sidecar.election import Event, GainedLeadership, LeaderChanged, LostLeadership
from sidecar.health import HealthChecker
from sidecar.hooks import HookRunner
from sidecar.metrics import Metrics
from sidecar.node import EventListener, Node
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


async def _droplet_id(config: Config, client: DigitalOceanClient) -> int:
    assert config.floating_ip is not None
    if config.floating_ip.droplet_id is not None:
        return config.floating_ip.droplet_id
    try:
        with trio.fail_after(30):
            return await client.metadata_droplet_id()
    except (ProviderError, trio.TooSlowError) as exc:
        raise StartupError(
            "floating_ip.droplet_id: not set and the metadata service did not answer "
            f"({exc}); set it, or check digitalocean.metadata_url"
        ) from None


async def serve(config: Config) -> None:
    """Run the sidecar until SIGTERM/SIGINT; a leader resigns before the process ends.

    What can be checked before the node joins the election is checked first (the status
    port, the API token), so those mistakes end the process before it sends a packet.
    """
    for warning in files.permission_warnings(config):
        log.warning(warning.message, extra={"event": "insecure_file", "key": warning.key})
    _check_status_port(config.status_listen)
    tokens = None if config.floating_ip is None else TokenSource(config.digitalocean)
    node = Node(config)
    metrics = Metrics()
    metrics.watch(node)
    node.rtt_observer = lambda peer, rtt: metrics.rtt.labels(str(peer)).observe(rtt)
    app = StatusApp(node, metrics)

    health = HealthChecker(config.health)
    node.set_healthy(health.healthy)
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

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, node)
        await nursery.start(_run_node_then_stop_all, node, hooks, nursery.cancel_scope)
        await nursery.start(serve_status, app, config.status_listen)
        nursery.start_soon(health.run, node.set_healthy)
        nursery.start_soon(hooks.run)
        if tokens is not None:
            await nursery.start(_run_assigner, config, tokens, node, metrics, app)


async def _run_assigner(
    config: Config,
    tokens: TokenSource,
    node: Node,
    metrics: Metrics,
    app: StatusApp,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    assert config.floating_ip is not None
    async with DigitalOceanClient(config.digitalocean, tokens) as client:
        droplet_id = await _droplet_id(config, client)
        assigner = Assigner(
            client,
            config.floating_ip.address,
            droplet_id,
            node,
            config.assigner,
            random.Random(),
            metrics,
            tokens=tokens,
        )
        app.add_section("floating_ip", lambda: msgspec.to_builtins(assigner.snapshot()))
        task_status.started()
        await assigner.run()


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
