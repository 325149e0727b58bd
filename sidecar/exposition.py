"""Prometheus metrics in the text exposition format 0.0.4, without prometheus_client.

A node needs two instruments (counters and histograms with labels), families built at
scrape time by collectors, and one renderer. prometheus_client offers far more, and its
import alone pulls in gzip, http.server, wsgiref, mmap and friends: ~1.4 MiB of RSS on every
droplet for a few hundred lines of use. This module is that part, written for this process:

- the output matches what prometheus_client 0.2x rendered for the same metrics (names,
  `_total` on counters, label order, number spelling) minus its `_created` samples, so
  dashboards and alerts see the same series;
- observation is thread-safe: the election loop has a thread of its own and observes RTTs
  there while Trio's thread renders a scrape, so every child keeps its figures under a lock
  of its own and a render copies them in one step (a histogram's buckets, sum and count are
  always from the same instant).

Specification: https://prometheus.io/docs/instrumenting/exposition_formats/ (text 0.0.4).
"""

from __future__ import annotations

import math
import re
import threading
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from itertools import pairwise
from typing import Generic, Literal, Protocol, TypeVar

#: The `Content-Type` of a rendered registry.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")

Kind = Literal["counter", "gauge", "histogram"]
Labels = tuple[tuple[str, str], ...]


def format_value(value: float) -> str:
    """A sample value or `le` bound as prometheus_client (after Go) spells it.

    `repr` gives the shortest string that reads back as the same float; Go switches to an
    exponent for numbers of 1e7 and more, and bucket bounds are matched as label strings,
    so `le` values must be spelled exactly as before (`0.0005`, `1.0`, `+Inf`).
    """
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    text = repr(value)
    dot = text.find(".")
    if value > 0 and dot > 6:
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _escape_label_value(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _check_names(name: str, label_names: Sequence[str], reserved: tuple[str, ...] = ()) -> None:
    """Refuse at construction what a scraper would refuse at every scrape."""
    if not _METRIC_NAME.match(name):
        raise ValueError(f"invalid metric name {name!r}")
    for label in label_names:
        if not _LABEL_NAME.match(label) or label.startswith("__") or label in reserved:
            raise ValueError(f"invalid label name {label!r} for {name}")
    if len(set(label_names)) != len(label_names):
        raise ValueError(f"repeated label name in {name}: {list(label_names)}")


class MetricFamily:
    """One metric's HELP, TYPE and samples, as a collector builds it at scrape time.

    For a counter, `name` is without `_total` (a trailing `_total` is dropped, as
    prometheus_client's CounterMetricFamily does); the rendered name carries it.
    Either pass `value` (a family without labels) or `label_names` and `add`.
    """

    def __init__(
        self,
        kind: Kind,
        name: str,
        help_text: str,
        *,
        value: float | None = None,
        label_names: Sequence[str] = (),
    ) -> None:
        if kind == "counter" and name.endswith("_total"):
            name = name[: -len("_total")]
        _check_names(name, label_names)
        if value is not None and label_names:
            raise ValueError(f"{name}: pass either value or label names")
        self.kind: Kind = kind
        self.name = name
        self.help_text = help_text
        self.label_names = tuple(label_names)
        #: (name suffix, labels, value) in the order they are rendered.
        self.samples: list[tuple[str, Labels, float]] = []
        if value is not None:
            self.samples.append((self._suffix(), (), value))

    def _suffix(self) -> str:
        return "_total" if self.kind == "counter" else ""

    def add(self, label_values: Sequence[str], value: float) -> None:
        """One sample with these label values (in `label_names` order)."""
        if len(label_values) != len(self.label_names):
            raise ValueError(f"{self.name}: expected labels {self.label_names}")
        labels = tuple(zip(self.label_names, label_values, strict=True))
        self.samples.append((self._suffix(), labels, value))

    def render(self) -> str:
        exposed = self.name + self._suffix()
        lines = [
            f"# HELP {exposed} {_escape_help(self.help_text)}\n",
            f"# TYPE {exposed} {self.kind}\n",
        ]
        for suffix, labels, value in self.samples:
            if labels:
                pairs = ",".join(f'{k}="{_escape_label_value(v)}"' for k, v in sorted(labels))
                lines.append(f"{self.name}{suffix}{{{pairs}}} {format_value(value)}\n")
            else:
                lines.append(f"{self.name}{suffix} {format_value(value)}\n")
        return "".join(lines)


def gauge(
    name: str, help_text: str, *, value: float | None = None, labels: Sequence[str] = ()
) -> MetricFamily:
    """A gauge family for a collector (prometheus_client's GaugeMetricFamily)."""
    return MetricFamily("gauge", name, help_text, value=value, label_names=labels)


def counter(
    name: str, help_text: str, *, value: float | None = None, labels: Sequence[str] = ()
) -> MetricFamily:
    """A counter family for a collector, whose count lives elsewhere (in the node)."""
    return MetricFamily("counter", name, help_text, value=value, label_names=labels)


class Collector(Protocol):
    """Anything that yields families when a scrape comes in."""

    def collect(self) -> Iterable[MetricFamily]: ...


class _CounterChild:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError(f"a counter only goes up (inc by {amount})")
        with self._lock:
            self._value += amount

    def value(self) -> float:
        with self._lock:
            return self._value


class _HistogramChild:
    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._lock = threading.Lock()
        self._bounds = bounds
        #: Observations per bucket, not cumulative: `observe` touches one slot.
        self._counts = [0] * len(bounds)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        # The first bound >= value. NaN compares false with every bound: it goes to +Inf, as
        # Go's client does, so +Inf still equals the count (prometheus_client counts NaN in
        # no bucket and no count, only in the sum).
        index = len(self._bounds) - 1 if math.isnan(value) else bisect_left(self._bounds, value)
        with self._lock:
            self._counts[index] += 1
            self._sum += value

    def snapshot(self) -> tuple[list[int], float]:
        """Bucket counts (not cumulative) and sum, copied at one instant."""
        with self._lock:
            return list(self._counts), self._sum


_Child = TypeVar("_Child", _CounterChild, _HistogramChild)


class _Labelled(Generic[_Child]):
    """Children by label values, created on first use, from any thread."""

    def __init__(self, name: str, help_text: str, label_names: Sequence[str]) -> None:
        self.name = name
        self.help_text = help_text
        self.label_names = tuple(label_names)
        self._lock = threading.Lock()  # guards the dict, not the children's figures
        self._children: dict[tuple[str, ...], _Child] = {}
        if not self.label_names:  # exposed at zero from the start, as prometheus_client does
            self.labels()

    def _new_child(self) -> _Child:
        raise NotImplementedError

    def labels(self, *values: str) -> _Child:
        """The child for these label values (in `label_names` order)."""
        with self._lock:
            child = self._children.get(values)
            if child is None:
                if len(values) != len(self.label_names):
                    raise ValueError(f"{self.name}: expected labels {self.label_names}: {values}")
                if not all(isinstance(v, str) for v in values):
                    raise TypeError(f"{self.name}: label values must be str: {values!r}")
                child = self._children[values] = self._new_child()
            return child

    def _items(self) -> list[tuple[tuple[str, ...], _Child]]:
        with self._lock:
            return list(self._children.items())


class Counter(_Labelled[_CounterChild]):
    """A counter observed as things happen: `labels(...).inc()`; exposed as `<name>_total`."""

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> None:
        if name.endswith("_total"):
            name = name[: -len("_total")]
        _check_names(name, label_names)
        super().__init__(name, help_text, label_names)

    def _new_child(self) -> _CounterChild:
        return _CounterChild()

    def collect(self) -> Iterable[MetricFamily]:
        family = counter(self.name, self.help_text, labels=self.label_names)
        for values, child in self._items():
            family.add(values, child.value())
        yield family


class Histogram(_Labelled[_HistogramChild]):
    """A distribution: `labels(...).observe(x)` counts x in the first bucket whose bound
    is >= x (`le`); `+Inf` is added when missing, so it always equals the count."""

    def __init__(
        self,
        name: str,
        help_text: str,
        label_names: Sequence[str] = (),
        *,
        buckets: Sequence[float],
    ) -> None:
        _check_names(name, label_names, reserved=("le",))
        bounds = [float(b) for b in buckets]
        if not bounds or any(math.isnan(b) for b in bounds):
            raise ValueError(f"{name}: buckets must be numbers")
        if any(a >= b for a, b in pairwise(bounds)):
            raise ValueError(f"{name}: buckets must increase: {bounds}")
        if bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.bounds = tuple(bounds)
        self._le = tuple(format_value(b) for b in self.bounds)
        super().__init__(name, help_text, label_names)

    def _new_child(self) -> _HistogramChild:
        return _HistogramChild(self.bounds)

    def collect(self) -> Iterable[MetricFamily]:
        family = MetricFamily("histogram", self.name, self.help_text)
        for values, child in self._items():
            counts, total = child.snapshot()
            labels = tuple(zip(self.label_names, values, strict=True))
            cumulative = 0
            for le, count in zip(self._le, counts, strict=True):
                cumulative += count
                family.samples.append(("_bucket", (*labels, ("le", le)), cumulative))
            family.samples.append(("_count", labels, cumulative))
            family.samples.append(("_sum", labels, total))
        yield family


_C = TypeVar("_C", bound=Collector)


class Registry:
    """Collectors, rendered in the order they were registered."""

    def __init__(self) -> None:
        self._collectors: list[Collector] = []

    def register(self, collector: _C) -> _C:
        """Add `collector` (a Counter, a Histogram, or anything with `collect`); returns it."""
        self._collectors.append(collector)
        return collector

    def collect(self) -> Iterable[MetricFamily]:
        for collector in list(self._collectors):
            yield from collector.collect()

    def render(self) -> bytes:
        """The whole registry as a `/metrics` body (UTF-8, content type `CONTENT_TYPE`)."""
        return "".join(family.render() for family in self.collect()).encode()
