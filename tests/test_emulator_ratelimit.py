"""The sliding-window rate limiter against its definition, over random request times."""

from __future__ import annotations

import bisect

from hypothesis import example, given, settings
from hypothesis import strategies as st

from sidecar.emulator.ratelimit import HOUR, MINUTE, RateLimiter


@settings(max_examples=200, deadline=None)
@given(
    gaps=st.lists(st.floats(min_value=0.0, max_value=90.0), min_size=1, max_size=300),
    per_minute=st.integers(min_value=1, max_value=12),
    per_hour=st.integers(min_value=1, max_value=40),
)
@example(gaps=[1.1446708981012108, 60.0], per_minute=1, per_hour=2)  # a float window edge
def test_allows_exactly_what_fits_both_windows(
    gaps: list[float], per_minute: int, per_hour: int
) -> None:
    limiter = RateLimiter(per_minute, per_hour)
    accepted: list[float] = []
    now = 1000.0
    for gap in gaps:
        now += gap
        in_minute = len(accepted) - bisect.bisect_right(accepted, now - MINUTE)
        in_hour = len(accepted) - bisect.bisect_right(accepted, now - HOUR)
        decision = limiter.check("token", now)
        fits = in_minute < per_minute and in_hour < per_hour
        assert decision.allowed == fits
        if fits:
            accepted.append(now)
            assert decision.retry_after_seconds == 0
        else:
            assert decision.retry_after_seconds >= 1
        assert decision.limit == per_hour
        # A refusal says 0 remaining whichever window refused it (the documented sample).
        assert decision.remaining == (per_hour - (in_hour + 1) if fits else 0)
        assert decision.reset_clock >= now
        assert set(decision.headers(0.0)) >= {"ratelimit-limit", "ratelimit-remaining"}
        assert ("retry-after" in decision.headers(0.0)) == (not fits)


def test_retry_after_is_when_the_oldest_request_leaves_the_window() -> None:
    limiter = RateLimiter(per_minute=2, per_hour=100)
    assert limiter.check("t", 0.0).allowed
    assert limiter.check("t", 10.0).allowed
    refused = limiter.check("t", 20.0)
    assert not refused.allowed and refused.retry_after_seconds == 40
    assert limiter.check("t", 60.0).allowed, "the request at 0.0 has left the minute"
    assert limiter.check("other", 60.0).remaining == 99, "each token has its own windows"
