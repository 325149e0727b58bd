"""The node's timer is a timerfd: readable once its monotonic deadline has passed."""

from __future__ import annotations

import math
import select
import time
from collections.abc import Iterator

import pytest

from sidecar.timerfd import Deadline


@pytest.fixture
def deadline() -> Iterator[Deadline]:
    timer = Deadline()
    try:
        yield timer
    finally:
        timer.close()


def readable(timer: Deadline, wait: float = 0.0) -> bool:
    return bool(select.select([timer], [], [], wait)[0])


def test_it_is_readable_only_once_the_deadline_has_passed(deadline: Deadline) -> None:
    assert not readable(deadline)  # never armed
    armed_at = time.monotonic()
    deadline.set(armed_at + 0.05)
    assert not readable(deadline)
    assert readable(deadline, wait=5.0)
    assert time.monotonic() >= armed_at + 0.05
    assert readable(deadline)  # it stays readable until it is set again


def test_setting_it_again_replaces_the_deadline_and_clears_the_expiry(
    deadline: Deadline,
) -> None:
    deadline.set(time.monotonic() - 1.0)  # already past: fires at once
    assert readable(deadline, wait=5.0)
    deadline.set(time.monotonic() + 60.0)
    assert not readable(deadline)
    assert deadline.when > time.monotonic()


def test_infinity_disarms_it(deadline: Deadline) -> None:
    deadline.set(time.monotonic() + 0.01)
    deadline.set(math.inf)
    assert not readable(deadline, wait=0.1)
    assert deadline.when == math.inf


def test_an_instant_at_the_clocks_origin_still_fires(deadline: Deadline) -> None:
    """Zero in a timerfd disarms it; the earliest instant must still fire, not hang."""
    deadline.set(0.0)
    assert readable(deadline, wait=5.0)
