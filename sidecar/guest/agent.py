"""`fip-guest agent`: keep this droplet's guest state equal to what the local sidecar holds.

Level-triggered, like the assigner: every `interval` seconds it reads the sidecar's
`/status` and makes the kernel match it (a /128 present iff its reserved IPv6 is held
here, the anchor route iff a reserved IPv4 is held here), so a missed or failed change is
repaired on the next poll and nothing depends on counting events. It runs as a separate,
privileged process (CAP_NET_ADMIN only) so the sidecar keeps no privilege at all.

An address is held here when its `/status` entry says `leading` and `holder_droplet_id ==
droplet_id`. `/status` lists addresses under `addresses` (one entry per reserved address,
with `family`); a sidecar without it has one `floating_ip` section, read the same way.

When the sidecar does not answer for `down_after` seconds, the agent releases everything
it knows of: a sidecar that is down leads nothing (its peers take the addresses over
within a lease), and keeping the state would be wrong in both families (an IPv6 source
whose replies go to the new holder; an anchor route that carries no traffic once the
reserved IPv4 is elsewhere). A stop of the agent itself (SIGTERM) leaves the state as it
is: the sidecar may still lead, and the next agent start reconciles.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import Any

from sidecar.guest.errors import EXIT_PROTOCOL, EXIT_UNAVAILABLE, GuestError
from sidecar.guest.netlink import IPAddress, Netlink
from sidecar.guest.steps import (
    Gateways,
    GuestSettings,
    ensure_ipv4_route,
    ensure_ipv6_address,
    ensure_ipv6_source,
)

STATUS_TIMEOUT = 2.0


@dataclass(frozen=True)
class Entry:
    """One reserved address as `/status` reports it."""

    address: IPAddress
    held: bool


def _field(entry: Mapping[str, Any], name: str, kinds: tuple[type, ...], where: str) -> Any:
    value = entry.get(name)
    if not isinstance(value, kinds) or isinstance(value, bool) != (bool in kinds):
        raise GuestError(EXIT_PROTOCOL, f"/status {where}.{name}: unexpected value {value!r}")
    return value


def parse_status(body: Any) -> list[Entry]:
    """The reserved addresses in a `/status` answer, with whether each is held here."""
    if not isinstance(body, dict):
        raise GuestError(EXIT_PROTOCOL, "/status: the answer is not a JSON object")
    raw = body.get("addresses")
    where = "addresses[{}]"
    if raw is None:  # a sidecar from before `addresses`: one reserved IP, or none
        section = body.get("floating_ip")
        raw, where = ([] if section is None else [section]), "floating_ip"
    if not isinstance(raw, list):
        raise GuestError(EXIT_PROTOCOL, "/status addresses: not a list")
    entries = []
    for index, item in enumerate(raw):
        at = where.format(index)
        if not isinstance(item, dict):
            raise GuestError(EXIT_PROTOCOL, f"/status {at}: not an object")
        text = _field(item, "reserved_ip", (str,), at)
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise GuestError(EXIT_PROTOCOL, f"/status {at}.reserved_ip: {text!r}") from None
        droplet = _field(item, "droplet_id", (int,), at)
        leading = _field(item, "leading", (bool,), at)
        holder = item.get("holder_droplet_id")
        if holder is not None and (not isinstance(holder, int) or isinstance(holder, bool)):
            raise GuestError(EXIT_PROTOCOL, f"/status {at}.holder_droplet_id: {holder!r}")
        family = item.get("family", f"ipv{address.version}")
        if family != f"ipv{address.version}":
            raise GuestError(EXIT_PROTOCOL, f"/status {at}.family {family!r} for {address}")
        entries.append(Entry(address, leading and holder == droplet))
    return entries


def fetch_status(url: str) -> list[Entry]:
    target = url.rstrip("/") + "/status"
    try:
        with urllib.request.urlopen(target, timeout=STATUS_TIMEOUT) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        raise GuestError(EXIT_UNAVAILABLE, f"GET {target}: HTTP {exc.code}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise GuestError(EXIT_UNAVAILABLE, f"GET {target}: {reason}") from None
    try:
        body = json.loads(raw)
    except ValueError:
        raise GuestError(EXIT_PROTOCOL, f"GET {target}: not JSON") from None
    return parse_status(body)


def reconcile(
    net: Netlink, settings: GuestSettings, gateways: Gateways, entries: list[Entry]
) -> list[str]:
    """Make the kernel match `entries`. Raises the first GuestError after trying every step,
    so one failing step (say, an unreachable metadata service) never blocks the others."""
    done: list[str] = []
    errors: list[GuestError] = []

    def attempt(step: Callable[[], list[str]]) -> None:
        try:
            done.extend(step())
        except GuestError as exc:
            errors.append(exc)

    ipv6 = [e for e in entries if isinstance(e.address, ipaddress.IPv6Address)]
    held6 = [e.address for e in ipv6 if e.held and isinstance(e.address, ipaddress.IPv6Address)]
    managed = [e.address for e in ipv6 if isinstance(e.address, ipaddress.IPv6Address)]
    for address in held6:
        attempt(functools.partial(ensure_ipv6_address, net, settings, address, present=True))
    attempt(lambda: ensure_ipv6_source(net, settings, held6[0] if held6 else None, managed))
    for address in managed:
        if address not in held6:
            attempt(functools.partial(ensure_ipv6_address, net, settings, address, present=False))
    ipv4 = [e for e in entries if e.address.version == 4]
    if ipv4:
        held4 = any(e.held for e in ipv4)
        attempt(lambda: ensure_ipv4_route(net, settings, gateways, held=held4))
    if errors:
        errors[0].args = ("; ".join(done + [str(e) for e in errors]),)
        raise errors[0]
    return done


class Agent:
    """The polling loop; `run()` returns only when stopped (SIGTERM/SIGINT or `stop()`)."""

    def __init__(
        self,
        settings: GuestSettings,
        status_url: str,
        *,
        interval: float,
        down_after: float,
        log: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.status_url = status_url
        self.interval = interval
        self.down_after = down_after
        self.log = log
        self.clock = clock
        self.gateways = Gateways(settings)
        self.known: dict[IPAddress, Entry] = {}
        self._last_answer = clock()
        self._stopped = False
        self._last_problem: str | None = None

    def stop(self, *_: object) -> None:
        self._stopped = True

    def poll(self, net: Netlink) -> None:
        """One round: read /status (or decide the sidecar is down), then reconcile."""
        try:
            entries = fetch_status(self.status_url)
        except GuestError as exc:
            silent = self.clock() - self._last_answer
            self._problem(f"{exc} (no answer for {silent:.1f}s)")
            if silent < self.down_after or not any(e.held for e in self.known.values()):
                return
            entries = [Entry(e.address, False) for e in self.known.values()]
            self._problem(f"sidecar down for {self.down_after}s: releasing what it held")
        else:
            self._last_answer = self.clock()
            # Keep addresses that left the config as not held, so they are cleaned up.
            merged = {a: Entry(a, False) for a in self.known}
            merged.update({e.address: e for e in entries})
            entries = list(merged.values())
        self.known = {e.address: e for e in entries}
        try:
            for line in reconcile(net, self.settings, self.gateways, entries):
                self.log(line)
        except GuestError as exc:
            self._problem(str(exc))
        else:
            if self._last_problem is not None:
                self.log("in step with /status again")
                self._last_problem = None

    def _problem(self, text: str) -> None:
        if text != self._last_problem:  # one line per new problem, not one per poll
            self.log(text)
        self._last_problem = text

    def run(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        self.log(
            f"watching {self.status_url}/status every {self.interval}s "
            f"(releases after {self.down_after}s without an answer)"
        )
        with Netlink() as net:
            while not self._stopped:
                self.poll(net)
                deadline = self.clock() + self.interval
                while not self._stopped and self.clock() < deadline:
                    time.sleep(min(0.1, max(0.0, deadline - self.clock())))
        self.log("stopped; guest state left as it is")
        sys.stderr.flush()
