"""`fip-sidecar status`: a node's /status rendered for a person."""

from __future__ import annotations

import json
import sys
from typing import Any

import httpx


def _age(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}s ago"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f} ms"


def render(status: dict[str, Any]) -> str:
    """The status as a short report: who leads, this node's lease, each peer, the IP."""
    lines = [
        f"node {status['node_id']}: {status['role']} (term {status['term']}), "
        f"leader {status['leader_id'] if status['leader_id'] is not None else 'none'}",
        f"  eligible {status['eligible']}, healthy {status['healthy']}, viable {status['viable']}",
    ]
    if status.get("lease_remaining") is not None:
        lines.append(f"  lease: {status['lease_remaining']:.3f}s left")
    if status.get("waiting_for"):
        lines.append(f"  not leading: {status['waiting_for']}")
    if status.get("in_startup_quiet"):
        lines.append("  in start-up quiet period (casts no vote yet)")
    membership = status.get("membership")
    if isinstance(membership, dict):
        members = " -> ".join(
            "{" + ",".join(str(i) for i in m) + "}" for m in membership.get("members", [])
        )
        change = " (membership change in progress)" if membership.get("changing") else ""
        lines.append(f"  members {members}, quorum {membership.get('quorum')}{change}")
    lines.append("")
    lines.append(
        f"  {'peer':>4}  {'alive':<5}  {'eligible':<8}  {'healthy':<7}  "
        f"{'leader':<6}  {'last heard':<12}  {'rtt':<9}  clock"
    )
    problems: list[str] = []
    for peer in status["peers"]:
        leader = "-" if peer["leader_id"] is None else str(peer["leader_id"])
        offset = peer.get("clock_offset")
        clock = "-" if offset is None else f"{offset:+.3f}s"
        lines.append(
            f"  {peer['id']:>4}  {peer['alive']!s:<5}  {peer['eligible']!s:<8}  "
            f"{peer['healthy']!s:<7}  {leader:<6}  {_age(peer['last_heard_age']):<12}  "
            f"{_ms(peer['rtt']):<9}  {clock}"
        )
        if peer.get("not_counted"):
            problems.append(f"  peer {peer['id']} not counted: {peer['not_counted']}")
        elif peer.get("refusing"):
            problems.append(f"  peer {peer['id']}: {peer['refusing']}")
        for dup in peer.get("duplicates") or []:
            problems.append(
                f"  peer {peer['id']}: a SECOND PROCESS uses this id "
                f"(incarnation {dup['incarnation']}, from {dup.get('source') or 'unknown'}); "
                "its packets are dropped"
            )
    if problems:
        lines.append("")
        lines.extend(problems)
    addresses = status.get("addresses")
    several = isinstance(addresses, list) and len(addresses) > 1
    for section in ("health",) if several else ("health", "floating_ip"):
        if isinstance(status.get(section), dict):
            lines.append("")
            lines.append(f"  {section}:")
            lines.extend(f"    {key}: {value}" for key, value in status[section].items())
    if several and isinstance(addresses, list):
        for entry in addresses:
            here = entry.get("leading") and entry.get("holder_droplet_id") == entry.get(
                "droplet_id"
            )
            lines.append("")
            lines.append(
                f"  address {entry.get('reserved_ip')} ({entry.get('family')})"
                + (": here" if here else "")
            )
            lines.extend(
                f"    {key}: {value}"
                for key, value in entry.items()
                if key not in ("reserved_ip", "family")
            )
    return "\n".join(lines)


def show_status(url: str, *, raw: bool = False) -> int:
    try:
        response = httpx.get(url.rstrip("/") + "/status", timeout=3.0)
        response.raise_for_status()
        status = response.json()
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        print(f"fip-sidecar: cannot read {url}/status: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2) if raw else render(status))
    return 0
