"""Prometheus metrics for one node, in a registry of its own.

Most figures are read from the node at scrape time by a collector, so nothing has to be
kept in step with the election; only distributions (RTT, assignment duration) and per-call
counters (API requests, hooks) are observed as they happen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from sidecar.election import Role, View
from sidecar.exposition import Counter, Histogram, MetricFamily, Registry, counter, gauge
from sidecar.health import HealthChecker
from sidecar.hooks import HookRunner
from sidecar.protocol import DropReason

if TYPE_CHECKING:  # the assigner runs only on a node that manages an address
    from sidecar.assigner import AssignerSnapshot

_RTT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_ASSIGN_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)


class NodeSource(Protocol):
    """What the collector reads from a node at scrape time; `Node` satisfies it."""

    def view(self) -> View: ...
    def drop_counts(self) -> Mapping[str, int]: ...
    def counter_values(self) -> Mapping[str, int]: ...
    def peer_reports(self) -> Mapping[int, Mapping[str, object]]: ...


class _NodeCollector:
    def __init__(self, source: NodeSource) -> None:
        self._source = source

    def collect(self) -> Iterator[MetricFamily]:
        view = self._source.view()
        yield gauge(
            "fip_is_leader",
            "1 while this node holds a valid leader lease",
            value=1 if view.role is Role.LEADER else 0,
        )
        yield gauge("fip_term", "Current election term", value=view.term)
        yield gauge(
            "fip_leader_known",
            "1 when this node knows a live leader (itself included)",
            value=0 if view.leader_id is None else 1,
        )
        yield gauge(
            "fip_healthy", "1 while the local service passes its check", value=int(view.healthy)
        )
        alive = gauge("fip_peer_alive", "1 while the peer is heard from", labels=["peer"])
        rtt = gauge("fip_peer_rtt_seconds", "Latest heartbeat round trip", labels=["peer"])
        for peer in view.peers:
            alive.add([str(peer.id)], 1 if peer.alive else 0)
            if peer.rtt is not None:
                rtt.add([str(peer.id)], peer.rtt)
        yield alive
        yield rtt
        yield from self._peer_problems()
        drops = counter(
            "fip_packets_dropped", "Packets dropped on receipt, by reason", labels=["reason"]
        )
        drops_by_reason = self._source.drop_counts()
        for reason in DropReason:
            drops.add([str(reason)], drops_by_reason.get(reason, 0))
        yield drops
        counters = self._source.counter_values()
        for name, help_text in _COUNTERS.items():
            yield counter(f"fip_{name}", help_text, value=counters.get(name, 0))

    def _peer_problems(self) -> Iterator[MetricFamily]:
        offset = gauge(
            "fip_peer_clock_offset_seconds",
            "The peer's wall clock minus ours (informational: the election ignores it)",
            labels=["peer"],
        )
        refused = gauge(
            "fip_peer_refused",
            "1 while the peer's packets are refused, by kind (wrong_key, config_mismatch, stale)",
            labels=["peer", "kind"],
        )
        duplicates = gauge(
            "fip_peer_duplicate_processes",
            "Second processes heard recently that use the peer's node id",
            labels=["peer"],
        )
        for peer_id, report in sorted(self._source.peer_reports().items()):
            label = str(peer_id)
            value = report.get("clock_offset")
            if isinstance(value, float | int):
                offset.add([label], float(value))
            reason = report.get("refusing")
            for kind in ("wrong_key", "config_mismatch", "stale"):
                hit = isinstance(reason, str) and reason.startswith(kind)
                refused.add([label, kind], 1 if hit else 0)
            found = report.get("duplicates")
            duplicates.add([label], len(found) if isinstance(found, list) else 0)
        yield offset
        yield refused
        yield duplicates


class _HealthCollector:
    def __init__(self, checker: HealthChecker) -> None:
        self._checker = checker

    def collect(self) -> Iterator[MetricFamily]:
        state = self._checker.state
        checks = counter(
            "fip_health_checks", "Health checks of the local service by result", labels=["result"]
        )
        checks.add(["pass"], state.checks_total - state.failures_total)
        checks.add(["fail"], state.failures_total)
        yield checks
        yield counter(
            "fip_health_transitions",
            "Healthy/unhealthy changes after hysteresis",
            value=state.transitions,
        )


class _HookCollector:
    def __init__(self, hooks: HookRunner) -> None:
        self._hooks = hooks

    def collect(self) -> Iterator[MetricFamily]:
        runs = counter(
            "fip_hook_runs", "Notify hook runs by event and outcome", labels=["event", "outcome"]
        )
        for (event, outcome), count in sorted(self._hooks.counts().items()):
            runs.add([event, outcome], count)
        yield runs


class _AddressCollector:
    """Per address, read from its assigner at scrape time: is it here, and who holds it."""

    def __init__(self, snapshots: Callable[[], Sequence[AssignerSnapshot]]) -> None:
        self._snapshots = snapshots

    def collect(self) -> Iterator[MetricFamily]:
        here = gauge(
            "fip_address_here",
            "1 while this node leads and the address was last read pointing at its droplet",
            labels=["address", "family"],
        )
        failures = gauge(
            "fip_address_consecutive_failures",
            "API failures in a row for the address (0 once a request succeeds)",
            labels=["address", "family"],
        )
        for snap in self._snapshots():
            labels = [snap.reserved_ip, snap.family]
            held = snap.leading and snap.holder_droplet_id == snap.droplet_id
            here.add(labels, 1 if held else 0)
            failures.add(labels, snap.consecutive_failures)
        yield here
        yield failures


class AddressObserver:
    """The assigner's observer for one address: its requests and assignments, labelled."""

    def __init__(self, metrics: Metrics, address: str) -> None:
        self._metrics = metrics
        self._address = address

    def api_request(self, endpoint: str, status: str) -> None:
        self._metrics.api_requests.labels(endpoint, status, self._address).inc()

    def assignment_finished(self, seconds: float, outcome: str) -> None:
        self._metrics.assignment_duration.labels(outcome, self._address).observe(seconds)


_COUNTERS = {
    "packets_received": "Authenticated packets accepted",
    "packets_sent": "Packets sent to peers",
    "send_errors": "Sends that failed at the socket",
    "elections": "Times this node stood for election",
    "leadership_gained": "Times this node became leader",
    "leader_changes": "Changes of the leader this node sees (including to none)",
    "events_missed": "Events a slow subscriber missed",
    "wakeups": "Times the node woke to read packets or keep time (idle: one per heartbeat)",
}


class Metrics:
    """The node's registry, plus the observations other modules report into."""

    def __init__(self) -> None:
        self.registry = Registry()
        self.rtt = self.registry.register(
            Histogram(
                "fip_heartbeat_rtt_seconds",
                "Heartbeat round-trip time",
                ["peer"],
                buckets=_RTT_BUCKETS,
            )
        )
        self.api_requests = self.registry.register(
            Counter(
                "fip_api_requests",
                "DigitalOcean API requests by endpoint, status code and address",
                ["endpoint", "code", "address"],
            )
        )
        self.assignment_duration = self.registry.register(
            Histogram(
                "fip_assignment_duration_seconds",
                "From the assign request to the action's end, by outcome and address",
                ["outcome", "address"],
                buckets=_ASSIGN_BUCKETS,
            )
        )

    def watch(self, source: NodeSource) -> None:
        self.registry.register(_NodeCollector(source))

    def watch_health(self, checker: HealthChecker) -> None:
        self.registry.register(_HealthCollector(checker))

    def watch_hooks(self, hooks: HookRunner) -> None:
        self.registry.register(_HookCollector(hooks))

    def watch_addresses(self, snapshots: Callable[[], Sequence[AssignerSnapshot]]) -> None:
        self.registry.register(_AddressCollector(snapshots))

    def for_address(self, address: str) -> AddressObserver:
        """The observer one address's assigner reports to (see `AssignerObserver`)."""
        return AddressObserver(self, address)
