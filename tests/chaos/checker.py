"""Judge a chaos run from what the processes wrote, not from what the test hoped.

Inputs: every node's JSON log (one object per line, `mono` = CLOCK_MONOTONIC, shared by
all processes on the machine) and the emulator's assignment history. A node believes it
leads from `gained.at_mono` until `min(lost.at_mono, lost.lease_ended_mono)`; a process
killed while leading stops believing at the kill (the harness records it), and one that
was restarted without a `lost` line stopped at its last line before `started`.

Checks: no two nodes lead at the same instant; a witness never leads; the final leader
and IP holder are the expected ones; the number of leadership changes and IP moves in the
window is within bounds; every assignment the emulator received came from a node that
led at the time (within the network transit tolerance). On failure, `Verdict.assert_ok`
raises with a merged timeline of every node and the emulator, relative to the window start.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Events worth showing in a timeline (plus every warning and error).
TIMELINE_EVENTS = {"started", "stopped", "gained", "lost", "leader_changed", "candidate", "signal"}

#: Seconds between a leader sending an API request and the emulator stamping it.
DEFAULT_TRANSIT_TOLERANCE = 0.25


@dataclass(frozen=True)
class NodeLog:
    node_id: int
    eligible: bool
    droplet_id: int
    path: Path
    deaths: tuple[float, ...] = ()


@dataclass(frozen=True)
class Leadership:
    """One stretch of time a node believed it was leader; `open` = still leading at the end."""

    node_id: int
    start: float
    end: float
    open: bool
    how_ended: str


@dataclass
class Verdict:
    problems: list[str]
    leaderships: list[Leadership]
    moves: list[dict[str, Any]]
    timeline: str
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def leader_changes(self, since: float, until: float) -> int:
        return sum(1 for lead in self.leaderships if since <= lead.start <= until)

    def assert_ok(self) -> None:
        if self.problems:
            raise AssertionError(
                "chaos check failed:\n  - "
                + "\n  - ".join(self.problems)
                + "\n\nmerged timeline:\n"
                + self.timeline
            )


def read_events(path: Path) -> list[dict[str, Any]]:
    """The JSON objects with a `mono` stamp, in file order; other lines are skipped."""
    events = []
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict) and isinstance(event.get("mono"), int | float):
            events.append(event)
    return events


def leaderships(log: NodeLog, events: Sequence[dict[str, Any]], until: float) -> list[Leadership]:
    found: list[Leadership] = []
    start: float | None = None
    last_seen = 0.0

    def death_after(t: float) -> float | None:
        later = [d for d in log.deaths if d >= t]
        return min(later) if later else None

    for event in events:
        kind = event.get("event")
        if kind == "started" and start is not None:
            died = death_after(start)
            end = died if died is not None and died <= event["mono"] else last_seen
            found.append(Leadership(log.node_id, start, end, False, "process died"))
            start = None
        elif kind == "gained" and start is None:
            start = float(event.get("at_mono", event["mono"]))
        elif kind == "lost" and start is not None:
            end = min(
                float(event.get("at_mono", event["mono"])),
                float(event.get("lease_ended_mono", event["mono"])),
            )
            found.append(Leadership(log.node_id, start, end, False, str(event.get("reason"))))
            start = None
        last_seen = float(event["mono"])
    if start is not None:
        died = death_after(start)
        if died is not None:
            found.append(Leadership(log.node_id, start, died, False, "process killed"))
        else:
            found.append(Leadership(log.node_id, start, max(until, last_seen), True, "still"))
    return found


def _overlaps(leads: Sequence[Leadership]) -> list[str]:
    problems = []
    ordered = sorted(leads, key=lambda lead: lead.start)
    for i, first in enumerate(ordered):
        for second in ordered[i + 1 :]:
            if second.start >= first.end:
                break
            if second.node_id != first.node_id:
                problems.append(
                    f"two leaders: node {first.node_id} [{first.start:.3f}, {first.end:.3f}] and "
                    f"node {second.node_id} [{second.start:.3f}, {second.end:.3f}] overlap by "
                    f"{min(first.end, second.end) - second.start:.3f}s"
                )
    return problems


def _led_at(leads: Iterable[Leadership], node_id: int, t: float, tolerance: float) -> bool:
    return any(
        lead.node_id == node_id and lead.start <= t <= lead.end + tolerance for lead in leads
    )


def check_run(
    logs: Sequence[NodeLog],
    history: Sequence[dict[str, Any]],
    *,
    since: float,
    until: float,
    final_leader: int | None = None,
    final_ip_holder: int | None = None,
    min_leader_changes: int = 0,
    max_leader_changes: int | None = None,
    min_ip_moves: int = 0,
    max_ip_moves: int | None = None,
    transit_tolerance: float = DEFAULT_TRANSIT_TOLERANCE,
) -> Verdict:
    """Everything the module docstring lists; `final_*` and bounds apply to [since, until]."""
    problems: list[str] = []
    all_events: dict[int, list[dict[str, Any]]] = {
        log.node_id: read_events(log.path) for log in logs
    }
    leads: list[Leadership] = []
    for log in logs:
        mine = leaderships(log, all_events[log.node_id], until)
        leads += mine
        if not log.eligible and mine:
            problems.append(f"witness node {log.node_id} led {len(mine)} time(s)")
    problems += _overlaps(leads)

    changes = sum(1 for lead in leads if since <= lead.start <= until)
    if changes < min_leader_changes:
        problems.append(f"{changes} leadership change(s), expected at least {min_leader_changes}")
    if max_leader_changes is not None and changes > max_leader_changes:
        problems.append(f"{changes} leadership change(s), expected at most {max_leader_changes}")
    if final_leader is not None:
        at_end = sorted({lead.node_id for lead in leads if lead.open})
        if at_end != [final_leader]:
            problems.append(f"leader(s) at the end: {at_end}, expected [{final_leader}]")

    node_of_droplet = {log.droplet_id: log.node_id for log in logs}
    moves = [
        entry
        for entry in history
        if entry.get("completed_monotonic") is not None
        and entry.get("source") != "initial"
        and since <= entry["completed_monotonic"] <= until
    ]
    if len(moves) < min_ip_moves:
        problems.append(f"{len(moves)} IP move(s), expected at least {min_ip_moves}")
    if max_ip_moves is not None and len(moves) > max_ip_moves:
        problems.append(f"{len(moves)} IP move(s), expected at most {max_ip_moves}")
    if final_ip_holder is not None:
        done = [e for e in history if e.get("completed_monotonic") is not None]
        holder = done[-1]["droplet_id"] if done else None
        if holder != final_ip_holder:
            problems.append(f"IP held by droplet {holder} at the end, expected {final_ip_holder}")
    for entry in history:
        if entry.get("source") not in (None, "api"):
            continue  # manual moves through the admin endpoint are the test's own doing
        node = node_of_droplet.get(entry["droplet_id"])
        requested = entry.get("requested_monotonic")
        if node is None or requested is None:
            continue
        if not _led_at(leads, node, requested, transit_tolerance):
            problems.append(
                f"assignment to droplet {entry['droplet_id']} requested at {requested:.3f} "
                f"while node {node} was not leader"
            )
    return Verdict(problems, leads, moves, timeline(all_events, history, logs, since))


def timeline(
    events: dict[int, list[dict[str, Any]]],
    history: Sequence[dict[str, Any]],
    logs: Sequence[NodeLog],
    origin: float,
) -> str:
    """Every node's notable lines, kills and the emulator's moves on one time axis."""
    rows: list[tuple[float, str]] = []
    for node_id, node_events in events.items():
        for event in node_events:
            kind = event.get("event")
            level = str(event.get("level", "")).upper()
            if kind not in TIMELINE_EVENTS and level not in ("WARNING", "ERROR", "CRITICAL"):
                continue
            extras = {
                k: v
                for k, v in event.items()
                if k in ("term", "role", "leader", "reason", "previous", "current", "at_mono",
                         "lease_ended_mono", "error")
            }  # fmt: skip
            rows.append(
                (
                    event["mono"],
                    f"node {node_id} {kind or level}: {event.get('message', '')} {extras}",
                )
            )
    for log in logs:
        rows += [(t, f"node {log.node_id} KILLED by the harness") for t in log.deaths]
    for entry in history:
        if entry.get("requested_monotonic") is not None:
            what = f"assign -> droplet {entry['droplet_id']} requested ({entry.get('source')})"
            rows.append((entry["requested_monotonic"], f"emulator: {what}"))
        if entry.get("completed_monotonic") is not None:
            rows.append(
                (entry["completed_monotonic"], f"emulator: IP now on droplet {entry['droplet_id']}")
            )
    rows.sort(key=lambda row: row[0])
    return "\n".join(f"{t - origin:+10.3f}  {text}" for t, text in rows)
