"""Unit tests for PeerTracker: which process is a peer's current one, duplicates, clock
offsets, wrong keys and membership mismatches (sans-IO: times are plain numbers)."""

from __future__ import annotations

import pytest

from sidecar.peers import RECENT, PeerTracker, Verdict, Warning

SWITCH = 0.5  # lan's peer_timeout, what node.py passes as switch_after
SKEW = 60.0
WALL = 1_800_000_000.0
OURS = ((1, True), (2, True), (3, False))
GENUINE, OTHER, THIRD = 0x1111, 0x2222, 0x3333


def make_tracker() -> PeerTracker:
    return PeerTracker([2, 3], switch_after=SWITCH, max_clock_skew=SKEW, own_members=OURS)


def hear(
    tracker: PeerTracker,
    incarnation: int,
    now: float,
    *,
    peer: int = 2,
    offset: float = 0.0,
    source: str = "127.0.0.1:7402",
) -> Verdict:
    """An accepted packet from `peer` whose wall clock is `offset` s from ours."""
    return tracker.accepted(
        peer, incarnation, now, sent_at=WALL + now + offset, wall=WALL + now, source=source
    )


def talk(
    tracker: PeerTracker, incarnation: int, start: float, end: float, step: float = 0.1
) -> list[Verdict]:
    """Heartbeats from `incarnation` every `step` from `start` to `end` (inclusive)."""
    verdicts, now = [], start
    while now <= end + 1e-9:
        verdicts.append(hear(tracker, incarnation, now))
        now += step
    return verdicts


def events(warnings: list[Warning], kind: str) -> list[Warning]:
    return [w for w in warnings if w.fields.get("event") == kind]


# --- which process is the peer -----------------------------------------------------------


def test_the_first_process_heard_is_current_and_passes() -> None:
    tracker = make_tracker()
    assert talk(tracker, GENUINE, 0.0, 3.0) == [Verdict.PASS] * 31
    record = tracker.peers[2]
    assert (record.current, record.restarts) == (GENUINE, 0)
    assert tracker.duplicates(2, 3.0) == []
    assert tracker.take_warnings() == []


def test_a_new_process_after_switch_after_of_silence_is_a_restart() -> None:
    tracker = make_tracker()
    talk(tracker, GENUINE, 0.0, 1.0)
    assert hear(tracker, OTHER, 1.0 + SWITCH) is Verdict.RESTARTED
    assert tracker.peers[2].current == OTHER
    assert tracker.peers[2].restarts == 1
    assert talk(tracker, OTHER, 1.6, 3.0) == [Verdict.PASS] * 15
    assert tracker.take_warnings() == []  # a restart is not worth a warning
    assert tracker.duplicates(2, 3.0) == []


def test_the_old_process_coming_back_after_a_restart_is_the_duplicate() -> None:
    tracker = make_tracker()
    talk(tracker, GENUINE, 0.0, 1.0)
    assert hear(tracker, OTHER, 2.0) is Verdict.RESTARTED
    assert hear(tracker, GENUINE, 2.05) is Verdict.DUPLICATE  # the newcomer now talks
    assert hear(tracker, OTHER, 2.1) is Verdict.PASS


def test_a_second_process_while_the_current_one_talks_is_a_duplicate() -> None:
    tracker = make_tracker()
    talk(tracker, GENUINE, 0.0, 1.0)
    for step in range(20):
        now = 1.05 + 0.1 * step
        assert hear(tracker, OTHER, now, source="127.0.0.2:7402") is Verdict.DUPLICATE
        assert hear(tracker, GENUINE, now + 0.05) is Verdict.PASS
    record = tracker.peers[2]
    assert (record.current, record.restarts) == (GENUINE, 0)
    assert tracker.duplicates(2, 3.0) == [
        {"incarnation": f"{OTHER:016x}", "last_heard_age": 0.05, "source": "127.0.0.2:7402"}
    ]


def test_a_duplicate_is_warned_once_and_only_after_the_genuine_one_is_heard_again() -> None:
    tracker = make_tracker()
    talk(tracker, GENUINE, 0.0, 1.0)
    assert hear(tracker, OTHER, 1.02) is Verdict.DUPLICATE
    assert hear(tracker, OTHER, 1.04) is Verdict.DUPLICATE
    assert tracker.take_warnings() == []  # could still be a restart we saw first
    hear(tracker, GENUINE, 1.1)
    warnings = tracker.take_warnings()
    assert [w.fields for w in warnings] == [
        {
            "event": "duplicate_id",
            "peer": 2,
            "kept": f"{GENUINE:016x}",
            "dropped": f"{OTHER:016x}",
        }
    ]
    assert "two processes speak as node 2" in warnings[0].message
    for step in range(30):  # it goes on: no second warning
        hear(tracker, OTHER, 1.15 + 0.1 * step)
        hear(tracker, GENUINE, 1.2 + 0.1 * step)
    assert tracker.take_warnings() == []


def test_a_third_process_gets_its_own_warning() -> None:
    tracker = make_tracker()
    talk(tracker, GENUINE, 0.0, 1.0)
    hear(tracker, OTHER, 1.05)
    hear(tracker, GENUINE, 1.1)
    hear(tracker, THIRD, 1.15)
    hear(tracker, GENUINE, 1.2)
    assert [w.fields["dropped"] for w in tracker.take_warnings()] == [
        f"{OTHER:016x}",
        f"{THIRD:016x}",
    ]


def test_a_duplicate_heard_in_the_same_instant_is_not_yet_reported() -> None:
    """Same batch as the genuine packet: wait until the genuine one is heard *after* it."""
    tracker = make_tracker()
    talk(tracker, GENUINE, 0.0, 1.0)
    hear(tracker, OTHER, 1.05)
    hear(tracker, GENUINE, 1.05)
    assert tracker.take_warnings() == []
    hear(tracker, GENUINE, 1.15)
    assert len(events(tracker.take_warnings(), "duplicate_id")) == 1


def test_a_brief_duplicate_causes_no_restart_of_the_genuine_one() -> None:
    """A second process that lives 0.3 s (e.g. it failed on the status port): the genuine
    node is PASS throughout, never RESTARTED, and nothing is left afterwards."""
    tracker = make_tracker()
    talk(tracker, GENUINE, 0.0, 1.0)
    for step in range(3):
        assert hear(tracker, OTHER, 1.03 + 0.1 * step) is Verdict.DUPLICATE
    assert talk(tracker, GENUINE, 1.1, 10.0) == [Verdict.PASS] * 90
    assert tracker.peers[2].restarts == 0
    assert len(events(tracker.take_warnings(), "duplicate_id")) == 1
    assert tracker.duplicates(2, 10.0) == []
    assert tracker.peers[2].others == {}  # forgotten RECENT after its last packet


def test_a_duplicate_that_never_hears_us_shows_up_through_refused_packets() -> None:
    """At another address it never gets our challenge: all its packets are refused as
    stale, and that is how it is found."""
    tracker = make_tracker()
    talk(tracker, GENUINE, 0.0, 1.0)
    for step in range(10):
        tracker.refused(2, OTHER, 1.02 + 0.1 * step, "stale", source="127.0.0.2:7402")
        assert hear(tracker, GENUINE, 1.05 + 0.1 * step) is Verdict.PASS
    warnings = events(tracker.take_warnings(), "duplicate_id")
    assert len(warnings) == 1 and warnings[0].fields["dropped"] == f"{OTHER:016x}"
    assert tracker.duplicates(2, 2.0)[0]["source"] == "127.0.0.2:7402"
    assert tracker.refusal(2, 2.0) is None  # the genuine node is counted: nothing to explain


def test_refused_packets_of_a_successor_after_silence_are_not_a_duplicate() -> None:
    """A restart's first packets are refused (the handshake): not a second process."""
    tracker = make_tracker()
    talk(tracker, GENUINE, 0.0, 1.0)
    tracker.refused(2, OTHER, 1.0 + SWITCH, "stale")
    assert hear(tracker, OTHER, 1.0 + SWITCH + 0.01) is Verdict.RESTARTED
    assert tracker.take_warnings() == []
    assert tracker.peers[2].others == {}


def test_a_duplicate_that_comes_back_after_being_forgotten_is_warned_again() -> None:
    tracker = make_tracker()
    talk(tracker, GENUINE, 0.0, 1.0)
    hear(tracker, OTHER, 1.05)
    talk(tracker, GENUINE, 1.1, 1.1 + RECENT + 1)
    assert len(events(tracker.take_warnings(), "duplicate_id")) == 1
    later = 1.1 + RECENT + 1.05
    hear(tracker, OTHER, later)
    hear(tracker, GENUINE, later + 0.05)
    assert len(events(tracker.take_warnings(), "duplicate_id")) == 1


def test_duplicates_are_listed_only_while_recent() -> None:
    tracker = make_tracker()
    hear(tracker, GENUINE, 0.0)
    hear(tracker, OTHER, 0.1, source="127.0.0.2:7402")
    assert len(tracker.duplicates(2, 0.1 + RECENT - 0.01)) == 1
    assert tracker.duplicates(2, 0.1 + RECENT) == []


def test_records_are_per_peer() -> None:
    tracker = make_tracker()
    hear(tracker, GENUINE, 0.0, peer=2)
    assert hear(tracker, OTHER, 0.1, peer=3) is Verdict.PASS
    assert (tracker.peers[2].current, tracker.peers[3].current) == (GENUINE, OTHER)


def test_set_peers_keeps_known_records_and_forgets_removed_ones() -> None:
    tracker = make_tracker()
    hear(tracker, GENUINE, 0.0, peer=2, offset=5.0)
    hear(tracker, OTHER, 0.0, peer=3)
    tracker.set_peers([2, 4])
    assert sorted(tracker.peers) == [2, 4]
    assert tracker.peers[2].current == GENUINE
    assert tracker.peers[2].clock_offset == pytest.approx(5.0)
    assert tracker.peers[4].current is None


# --- clock offsets -----------------------------------------------------------------------


def test_the_first_sample_sets_the_offset_and_jitter_is_smoothed() -> None:
    tracker = make_tracker()
    hear(tracker, GENUINE, 0.0, offset=0.3)
    assert tracker.peers[2].clock_offset == pytest.approx(0.3)
    hear(tracker, GENUINE, 0.1, offset=0.8)  # within a second: smoothed (weight 0.2)
    assert tracker.peers[2].clock_offset == pytest.approx(0.4)
    for step in range(100):
        hear(tracker, GENUINE, 0.2 + 0.1 * step, offset=0.8)
    assert tracker.peers[2].clock_offset == pytest.approx(0.8, abs=1e-6)


def test_a_step_replaces_the_estimate_at_once() -> None:
    tracker = make_tracker()
    talk(tracker, GENUINE, 0.0, 1.0)
    hear(tracker, GENUINE, 1.1, offset=120.0)
    assert tracker.peers[2].clock_offset == pytest.approx(120.0)
    hear(tracker, GENUINE, 1.2, offset=-3.0)
    assert tracker.peers[2].clock_offset == pytest.approx(-3.0)


def test_an_offset_past_max_clock_skew_is_warned_once_naming_peer_and_offset() -> None:
    tracker = make_tracker()
    talk(tracker, GENUINE, 0.0, 1.0)
    assert tracker.take_warnings() == []
    for step in range(50):
        hear(tracker, GENUINE, 1.1 + 0.1 * step, offset=120.0)
    warnings = tracker.take_warnings()
    assert [w.fields for w in warnings] == [{"event": "clock_offset", "peer": 2, "offset": 120.0}]
    assert "peer 2's wall clock is +120.0s from ours" in warnings[0].message
    assert "max_clock_skew 60s" in warnings[0].message


def test_an_offset_within_max_clock_skew_is_not_warned() -> None:
    tracker = make_tracker()
    for step in range(20):
        hear(tracker, GENUINE, 0.1 * step, offset=-SKEW)
    assert tracker.take_warnings() == []
    assert tracker.peers[2].clock_offset == pytest.approx(-SKEW)


def test_a_clock_that_recovers_rearms_the_warning() -> None:
    """Back within half of max_clock_skew, a later step is warned again (and a wobble near
    the limit is not warned twice)."""
    tracker = make_tracker()
    hear(tracker, GENUINE, 0.0, offset=-120.0)
    hear(tracker, GENUINE, 0.1, offset=-50.0)  # better, but not within half: still armed off
    hear(tracker, GENUINE, 0.2, offset=-61.0)
    assert len(events(tracker.take_warnings(), "clock_offset")) == 1
    hear(tracker, GENUINE, 0.3, offset=0.2)  # corrected
    assert tracker.peers[2].clock_offset == pytest.approx(0.2)
    hear(tracker, GENUINE, 0.4, offset=90.0)
    warnings = events(tracker.take_warnings(), "clock_offset")
    assert [w.fields["offset"] for w in warnings] == [90.0]


def test_a_restarted_process_with_a_skewed_clock_is_warned() -> None:
    tracker = make_tracker()
    talk(tracker, GENUINE, 0.0, 1.0)
    assert hear(tracker, OTHER, 2.0, offset=-120.0) is Verdict.RESTARTED
    assert tracker.peers[2].clock_offset == pytest.approx(-120.0)
    assert [w.fields["offset"] for w in tracker.take_warnings()] == [-120.0]


def test_a_duplicates_clock_never_touches_the_genuine_estimate() -> None:
    tracker = make_tracker()
    talk(tracker, GENUINE, 0.0, 1.0)
    for step in range(10):
        hear(tracker, OTHER, 1.05 + 0.1 * step, offset=500.0)
        hear(tracker, GENUINE, 1.1 + 0.1 * step)
    assert tracker.peers[2].clock_offset == pytest.approx(0.0)
    assert events(tracker.take_warnings(), "clock_offset") == []


@pytest.mark.parametrize("sent_at", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_stamp_is_ignored(sent_at: float) -> None:
    tracker = make_tracker()
    hear(tracker, GENUINE, 0.0, offset=2.0)
    tracker.accepted(2, GENUINE, 0.1, sent_at=sent_at, wall=WALL)
    assert tracker.peers[2].clock_offset == pytest.approx(2.0)
    assert tracker.take_warnings() == []


# --- wrong keys and refusals -------------------------------------------------------------


def test_bad_macs_from_a_peers_address_are_a_wrong_key_warned_once() -> None:
    tracker = make_tracker()
    for step in range(20):
        tracker.bad_mac(2, "127.0.0.1:7402", 0.1 * step)
    warnings = tracker.take_warnings()
    assert [w.fields for w in warnings] == [
        {"event": "wrong_key", "peer": 2, "source": "127.0.0.1:7402"}
    ]
    assert "peer 2's address 127.0.0.1:7402" in warnings[0].message
    assert tracker.refusal(2, 2.0) == ("wrong_key: packets from 127.0.0.1:7402 fail authentication")
    assert tracker.refusal(3, 2.0) is None
    assert tracker.refusal(2, 1.9 + RECENT) is None  # it stopped


def test_stale_is_a_reason_only_while_the_peer_is_not_heard() -> None:
    tracker = make_tracker()
    tracker.refused(2, GENUINE, 0.0, "stale")
    assert tracker.refusal(2, 0.1) is not None and tracker.refusal(2, 0.1).startswith("stale")
    talk(tracker, GENUINE, 0.2, 1.0)
    tracker.refused(2, GENUINE, 1.05, "stale")  # one late packet while it is heard: fine
    assert tracker.refusal(2, 1.1) is None


def test_a_replay_refusal_is_not_a_stale_reason() -> None:
    tracker = make_tracker()
    tracker.refused(2, GENUINE, 0.0, "replay")
    assert tracker.refusal(2, 0.1) is None


# --- membership mismatch -----------------------------------------------------------------


THEIRS = ((1, True), (2, False), (3, False), (4, True), (5, True))


def test_a_mismatch_is_warned_once_with_the_differences() -> None:
    tracker = make_tracker()
    tracker.mismatch(2, 0.0, (0xABC,), None)
    assert tracker.take_warnings() == []  # waits for the member list (it comes next)
    for step in range(20):
        tracker.mismatch(2, 0.1 + 0.1 * step, (0xABC,), THEIRS)
    warnings = tracker.take_warnings()
    assert [w.fields for w in warnings] == [
        {
            "event": "config_mismatch",
            "peer": 2,
            "their_digests": ["0000000000000abc"],
            "only_theirs": [4, 5],
            "only_ours": [],
            "eligibility_differs": [2],
        }
    ]
    assert "peer 2 runs a different membership" in warnings[0].message
    reason = tracker.refusal(2, 2.0)
    assert reason is not None and reason.startswith("config_mismatch")
    assert "only_theirs [4, 5]" in reason and "eligibility_differs [2]" in reason
    assert tracker.wants_members(2, 2.0) and not tracker.wants_members(3, 2.0)


def test_a_peer_that_never_sends_its_members_is_warned_after_a_while() -> None:
    tracker = make_tracker()
    for step in range(25):
        tracker.mismatch(2, 0.1 * step, (0xABC,), None)
    warnings = events(tracker.take_warnings(), "config_mismatch")
    assert len(warnings) == 1
    assert "only_theirs" not in warnings[0].fields  # nothing known to compare


def test_a_new_mismatch_is_warned_again_and_an_ended_one_clears() -> None:
    tracker = make_tracker()
    tracker.mismatch(2, 0.0, (0xABC,), THEIRS)
    tracker.mismatch(2, 0.1, (0xABC,), THEIRS)
    assert len(tracker.take_warnings()) == 1
    other = ((1, True), (2, True))
    tracker.mismatch(2, 0.2, (0xDEF,), other)  # it changed its config again: say so
    warnings = tracker.take_warnings()
    assert [w.fields["their_digests"] for w in warnings] == [["0000000000000def"]]
    assert warnings[0].fields["only_ours"] == [3]
    assert tracker.refusal(2, 0.2 + RECENT) is None  # no mismatched packet for a while
    assert not tracker.wants_members(2, 0.2 + RECENT)
    tracker.mismatch(2, 10.0, (0xDEF,), other)  # back after it had ended: a new episode
    assert len(tracker.take_warnings()) == 1
