"""`sidecar/exposition.py` checked against prometheus_client, which a node no longer imports:
its text parser reads everything we render back (names, types, labels, values), and its own
renderer, fed the same metrics, must produce the same bytes apart from `_created` samples."""

from __future__ import annotations

import math
import re
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import prometheus_client
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from sidecar.exposition import (
    CONTENT_TYPE,
    Counter,
    Histogram,
    MetricFamily,
    Registry,
    counter,
    format_value,
    gauge,
)

BUCKETS = (0.0005, 0.001, 0.01, 0.5, 1, 2.5, 10)
NASTY = ("back\\slash", 'quote"d', "new\nline", 'all \\" \n at once', "ünïcødé ✓ 日本", "", "}{,=")


def parse(registry: Registry) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(registry.render().decode())}


def by_labels(family: Any, sample_name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value for s in family.samples if s.name == sample_name
    }


class _Fixed:
    """A collector like sidecar.metrics' ones: families built at scrape time."""

    def __init__(self, families: Iterable[MetricFamily]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[MetricFamily]:
        yield from self.families


def test_content_type_is_text_0_0_4() -> None:
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
    assert CONTENT_TYPE == prometheus_client.exposition.CONTENT_TYPE_PLAIN_0_0_4


def test_counters_histograms_and_families_round_trip() -> None:
    registry = Registry()
    requests = registry.register(Counter("fip_api_requests", "API requests", ["code", "path"]))
    rtt = registry.register(Histogram("fip_rtt_seconds", "RTT", ["peer"], buckets=BUCKETS))
    requests.labels("200", "/a").inc()
    requests.labels("200", "/a").inc(2.5)
    requests.labels("500", "/b").inc()
    observed = {"2": [0.0001, 0.0005, 0.003, 0.7, 0.7, 99.0], "3": [2.5]}
    for peer, values in observed.items():
        for value in values:
            rtt.labels(peer).observe(value)
    leader = gauge("fip_is_leader", "1 while leading", value=1)
    alive = gauge("fip_peer_alive", "peer heard from", labels=["peer"])
    alive.add(["2"], 1)
    alive.add(["3"], 0)
    received = counter("fip_packets_received", "accepted", value=7)
    registry.register(_Fixed([leader, alive, received]))

    families = parse(registry)
    assert {name: f.type for name, f in families.items()} == {
        "fip_api_requests": "counter",
        "fip_rtt_seconds": "histogram",
        "fip_is_leader": "gauge",
        "fip_peer_alive": "gauge",
        "fip_packets_received": "counter",
    }
    assert families["fip_api_requests"].documentation == "API requests"
    assert by_labels(families["fip_api_requests"], "fip_api_requests_total") == {
        (("code", "200"), ("path", "/a")): 3.5,
        (("code", "500"), ("path", "/b")): 1.0,
    }
    assert by_labels(families["fip_packets_received"], "fip_packets_received_total") == {(): 7}
    assert by_labels(families["fip_is_leader"], "fip_is_leader") == {(): 1}
    assert by_labels(families["fip_peer_alive"], "fip_peer_alive") == {
        (("peer", "2"),): 1,
        (("peer", "3"),): 0,
    }

    hist = families["fip_rtt_seconds"]
    counts = by_labels(hist, "fip_rtt_seconds_count")
    sums = by_labels(hist, "fip_rtt_seconds_sum")
    buckets = by_labels(hist, "fip_rtt_seconds_bucket")
    for peer, values in observed.items():
        key = (("peer", peer),)
        assert counts[key] == len(values)
        assert sums[key] == sum(values)
        les = [dict(k)["le"] for k in buckets if dict(k)["peer"] == peer]
        assert les == [*map(format_value, BUCKETS), "+Inf"]  # every bound, in order
        previous = 0.0
        for le in les:
            got = buckets[(("le", le), ("peer", peer))]
            assert got == sum(1 for v in values if v <= float(le))  # cumulative, `le` inclusive
            assert got >= previous
            previous = got
        assert buckets[(("le", "+Inf"), ("peer", peer))] == counts[key]


def test_text_is_what_prometheus_client_renders_without_created() -> None:
    """Same metrics through both libraries: byte for byte, except the `_created` gauges
    prometheus_client adds (dropped on purpose: a node's start time is in its logs)."""
    ours = Registry()
    theirs = prometheus_client.CollectorRegistry()
    our_counter = ours.register(Counter("c", "a counter\\ with\nhelp", ["b", "a"]))
    their_counter = prometheus_client.Counter(
        "c", "a counter\\ with\nhelp", ["b", "a"], registry=theirs
    )
    our_hist = ours.register(Histogram("h_seconds", "hist", ["x"], buckets=BUCKETS))
    their_hist = prometheus_client.Histogram(
        "h_seconds", "hist", ["x"], buckets=BUCKETS, registry=theirs
    )
    for i, value in enumerate(NASTY):
        our_counter.labels(value, str(i)).inc(i)
        their_counter.labels(value, str(i)).inc(i)
        for observation in (0.0005, 0.2, 3.0, 1e9, 12345678.5, -1.0, math.inf):
            our_hist.labels(value).observe(observation)
            their_hist.labels(value).observe(observation)
    ours.register(Histogram("unused", "no children yet", ["a"], buckets=[1]))
    prometheus_client.Histogram("unused", "no children yet", ["a"], buckets=[1], registry=theirs)
    values = (0.0, -0.0, 1, 3.25, 1e-7, 12345678.0, 1e22, -1e20, math.inf, -math.inf, math.nan)

    class Families:
        def collect(self) -> Iterator[Any]:
            g = GaugeMetricFamily("g", 'a "gauge"', labels=["k"])
            for i, v in enumerate(values):
                g.add_metric([f"{NASTY[i % len(NASTY)]}{i}"], v)
            yield g
            yield CounterMetricFamily("n_total", "named with _total", value=4)
            yield GaugeMetricFamily("plain", "no labels", value=2)

    theirs.register(Families())  # type: ignore[arg-type]
    g = gauge("g", 'a "gauge"', labels=["k"])
    for i, v in enumerate(values):
        g.add([f"{NASTY[i % len(NASTY)]}{i}"], v)
    ours.register(_Fixed([g, counter("n_total", "named with _total", value=4)]))
    ours.register(_Fixed([gauge("plain", "no labels", value=2)]))

    expected = prometheus_client.exposition.generate_latest(theirs).decode()
    expected = re.sub(r"# HELP (\w+)_created .*\n# TYPE \1_created gauge\n(\1_created.*\n)*", "",
                      expected)  # fmt: skip
    assert "_created" not in expected
    assert ours.render().decode() == expected


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.0005, "0.0005"),
        (1, "1.0"),
        (120, "120.0"),
        (0.1, "0.1"),
        (1e-7, "1e-07"),
        (12345678.0, "1.2345678e+07"),
        (1e10, "1e+10"),
        (math.inf, "+Inf"),
        (-math.inf, "-Inf"),
        (math.nan, "NaN"),
    ],
)
def test_numbers_are_spelled_as_before(value: float, text: str) -> None:
    assert format_value(value) == text


@given(st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(2**60), 2**60))
def test_numbers_match_prometheus_client(value: float) -> None:
    assert format_value(value) == floatToGoString(value)


def test_escaping_round_trips_nasty_help_and_label_values() -> None:
    registry = Registry()
    help_text = 'help with \\ backslash, "quotes", a\nnewline, ünïcødé and a trailing \\'
    requests = registry.register(Counter("nasty", help_text, ["v"]))
    for i, value in enumerate(NASTY):
        requests.labels(value).inc(i + 1)
    family = parse(registry)["nasty"]
    assert family.documentation == help_text
    assert by_labels(family, "nasty_total") == {
        (("v", value),): i + 1 for i, value in enumerate(NASTY)
    }
    text = registry.render().decode()
    assert "\n\n" not in text and text.count("\n") == 2 + len(NASTY)  # newlines all escaped


label_value = st.text(max_size=20)
observation = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        st.tuples(label_value, label_value), st.lists(observation, max_size=15), max_size=6
    ),
    # The parser strips each line, so HELP text that starts or ends with blanks comes back
    # without them (prometheus_client renders it the same way: not ours to test).
    st.text(max_size=40).map(str.strip),
)
def test_random_labels_and_observations_round_trip(
    observed: dict[tuple[str, str], list[float]], help_text: str
) -> None:
    registry = Registry()
    hist = registry.register(Histogram("h", help_text, ["a", "b"], buckets=BUCKETS))
    total = registry.register(Counter("n", help_text, ["a", "b"]))
    for (a, b), values in observed.items():
        child, count = hist.labels(a, b), total.labels(a, b)
        for value in values:
            child.observe(value)
            count.inc(abs(value))
    families = parse(registry)
    assert families["h"].documentation == help_text
    counts = by_labels(families["h"], "h_count")
    sums = by_labels(families["h"], "h_sum")
    buckets = by_labels(families["h"], "h_bucket")
    totals = by_labels(families["n"], "n_total")
    assert len(counts) == len(observed)
    for (a, b), values in observed.items():
        key = (("a", a), ("b", b))
        assert counts[key] == len(values)
        expected_sum = 0.0
        expected_total = 0.0
        for value in values:  # the same additions in the same order: the same float
            expected_sum += value
            expected_total += abs(value)
        assert sums[key] == expected_sum
        assert totals[key] == expected_total
        for bound in [*BUCKETS, math.inf]:
            got = buckets[(("a", a), ("b", b), ("le", format_value(bound)))]
            assert got == sum(1 for v in values if v <= bound)


def test_nan_is_counted_in_inf_so_inf_still_equals_count() -> None:
    registry = Registry()
    hist = registry.register(Histogram("h", "h", buckets=[1]))
    hist.labels().observe(math.nan)
    hist.labels().observe(0.5)
    family = parse(registry)["h"]
    assert by_labels(family, "h_bucket") == {(("le", "1.0"),): 1, (("le", "+Inf"),): 2}
    assert by_labels(family, "h_count") == {(): 2}
    assert math.isnan(by_labels(family, "h_sum")[()])


def test_metrics_without_labels_are_exposed_at_zero_from_the_start() -> None:
    registry = Registry()
    registry.register(Counter("c_total", "c"))
    registry.register(Histogram("h", "h", buckets=[1, 2]))
    labelled = registry.register(Counter("l", "labelled, no child yet", ["x"]))
    families = parse(registry)
    assert by_labels(families["c"], "c_total") == {(): 0}
    assert by_labels(families["h"], "h_count") == {(): 0}
    assert families["l"].samples == [] and families["l"].type == "counter"
    labelled.labels("y").inc()
    assert by_labels(parse(registry)["l"], "l_total") == {(("x", "y"),): 1}


def test_mistakes_are_refused_when_made() -> None:
    with pytest.raises(ValueError, match="metric name"):
        Counter("bad-name", "x")
    with pytest.raises(ValueError, match="label name"):
        Counter("c", "x", ["bad label"])
    with pytest.raises(ValueError, match="label name"):
        Counter("c", "x", ["__reserved"])
    with pytest.raises(ValueError, match="repeated"):
        Counter("c", "x", ["a", "a"])
    with pytest.raises(ValueError, match="label name"):
        Histogram("h", "x", ["le"], buckets=[1])
    with pytest.raises(ValueError, match="increase"):
        Histogram("h", "x", buckets=[1, 1])
    with pytest.raises(ValueError, match="increase"):
        Histogram("h", "x", buckets=[2, 1])
    with pytest.raises(ValueError, match="either"):
        gauge("g", "x", value=1, labels=["a"])
    c = Counter("c", "x", ["a"])
    with pytest.raises(ValueError, match="expected labels"):
        c.labels("a", "b")
    with pytest.raises(TypeError, match="must be str"):
        c.labels(1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="only goes up"):
        c.labels("a").inc(-1)
    g = gauge("g", "x", labels=["a", "b"])
    with pytest.raises(ValueError, match="expected labels"):
        g.add(["a"], 1)


def test_observers_on_other_threads_never_tear_a_render() -> None:
    """The election thread observes RTTs while Trio's thread renders scrapes. Observations
    are 0.5 or 2.0, so in a consistent snapshot the sum is determined by the buckets:
    sum == 0.5 * bucket(le=0.5) + 2.0 * (count - bucket(le=0.5)), and +Inf == count. Threads
    also create children (labels) while renders iterate them."""
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show up
    registry = Registry()
    hist = registry.register(Histogram("rtt", "rtt", ["peer"], buckets=BUCKETS))
    hits = registry.register(Counter("hits", "hits", ["peer"]))
    threads_n, per_thread = 4, 20_000
    start = threading.Barrier(threads_n + 1)
    done = threading.Event()
    renders: list[str] = []

    def observe(me: int) -> None:
        start.wait()
        for i in range(per_thread):
            peer = str(i % 3) if i % 2 else f"{me}-{i % 50}"  # shared and new children
            hist.labels(peer).observe(0.5 if i % 3 else 2.0)
            hits.labels(peer).inc()

    def render() -> None:
        start.wait()
        while not done.is_set():
            renders.append(registry.render().decode())

    observers = [threading.Thread(target=observe, args=(n,)) for n in range(threads_n)]
    renderer = threading.Thread(target=render)
    try:
        for thread in [*observers, renderer]:
            thread.start()
        for thread in observers:
            thread.join(timeout=120)
        done.set()
        renderer.join(timeout=120)
    finally:
        sys.setswitchinterval(old_interval)
    renders.append(registry.render().decode())
    assert len(renders) >= 10, "the renderer hardly ran: the test proves little"

    for text in renders:
        families = {f.name: f for f in text_string_to_metric_families(text)}
        counts = by_labels(families["rtt"], "rtt_count")
        sums = by_labels(families["rtt"], "rtt_sum")
        buckets = by_labels(families["rtt"], "rtt_bucket")
        for key, count in counts.items():
            ((_, peer),) = key
            low = buckets[(("le", "0.5"), ("peer", peer))]
            assert buckets[(("le", "+Inf"), ("peer", peer))] == count
            assert buckets[(("le", "1.0"), ("peer", peer))] == low  # nothing between
            assert sums[key] == 0.5 * low + 2.0 * (count - low), (peer, count, low)
    final = {f.name: f for f in text_string_to_metric_families(renders[-1])}
    assert sum(by_labels(final["rtt"], "rtt_count").values()) == threads_n * per_thread
    assert sum(by_labels(final["hits"], "hits_total").values()) == threads_n * per_thread


def test_a_nodes_metrics_name_each_family_once() -> None:
    """Every family of a node with every watcher, rendered once each: two HELP/TYPE blocks
    for one name (once an empty Counter beside its collector) fail strict parsers such as
    Go's expfmt and `promtool check metrics`."""
    from types import SimpleNamespace as NS

    from sidecar.election import Role
    from sidecar.metrics import Metrics

    class Source:
        def view(self) -> Any:
            peer = NS(id=2, alive=True, rtt=0.001)
            return NS(role=Role.LEADER, term=3, leader_id=1, healthy=True, peers=[peer])

        def drop_counts(self) -> dict[str, int]:
            return {"bad_mac": 2}

        def counter_values(self) -> dict[str, int]:
            return {"packets_received": 7}

        def peer_reports(self) -> dict[int, dict[str, object]]:
            return {2: {"clock_offset": 0.5, "refusing": "stale", "duplicates": []}}

    metrics = Metrics()
    metrics.watch(Source())
    metrics.watch_health(NS(state=NS(checks_total=5, failures_total=1, transitions=2)))
    metrics.watch_hooks(NS(counts=lambda: {("gained", "ok"): 3}))
    address = NS(reserved_ip="203.0.113.5", family="ipv4", leading=True, holder_droplet_id=1,
                 droplet_id=1, consecutive_failures=0)  # fmt: skip
    metrics.watch_addresses(lambda: [address])
    metrics.rtt.labels("2").observe(0.001)
    metrics.for_address("203.0.113.5").api_request("assign", "200")
    metrics.for_address("203.0.113.5").assignment_finished(1.5, "ok")
    text = metrics.registry.render().decode()
    helps = [line.split()[2] for line in text.splitlines() if line.startswith("# HELP ")]
    assert sorted(helps) == sorted(set(helps)), [h for h in helps if helps.count(h) > 1]
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert by_labels(families["fip_health_checks"], "fip_health_checks_total") == {
        (("result", "pass"),): 4,
        (("result", "fail"),): 1,
    }
    assert by_labels(families["fip_hook_runs"], "fip_hook_runs_total") == {
        (("event", "gained"), ("outcome", "ok")): 3
    }
