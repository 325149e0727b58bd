"""The few kernel changes the guest steps make, over netlink (pyroute2).

Why netlink and not `ip`: the sidecar image has no iproute2 (and should not grow one for
four calls), while pyroute2 is pure Python, needs nothing from the image and reports the
kernel's own errno, which is what the exit codes are made from. Every method is
idempotent: adding an address that is there, or removing one that is not, changes nothing
and returns False.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

from sidecar.guest.errors import EXIT_CONFIG, EXIT_NOPERM, EXIT_OSERR, GuestError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
MAIN_TABLE = 254


@dataclass(frozen=True)
class DefaultRoute:
    """One default route of the main table, as the kernel holds it."""

    family: int  # socket.AF_INET or socket.AF_INET6
    gateway: str | None
    oif: int | None
    prefsrc: str | None
    priority: int | None
    protocol: int  # who made it (boot, static, dhcp, ...): kept across a replace


def _family(address: IPAddress) -> int:
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


def _failed(what: str, exc: NetlinkError) -> GuestError:
    if exc.code == errno.EPERM:
        return GuestError(EXIT_NOPERM, f"{what}: not permitted (needs CAP_NET_ADMIN)")
    return GuestError(EXIT_OSERR, f"{what}: {exc.args[-1] if exc.args else exc} (errno {exc.code})")


class Netlink:
    """An open rtnetlink socket; use as a context manager."""

    def __init__(self) -> None:
        self._ipr = IPRoute()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self._ipr.close()

    def device_index(self, name: str) -> int:
        found = self._ipr.link_lookup(ifname=name)
        if not found:
            raise GuestError(EXIT_CONFIG, f"no network device named {name!r} on this machine")
        index: int = found[0]
        return index

    def has_address(self, device: str, address: IPAddress) -> bool:
        index = self.device_index(device)
        for entry in self._ipr.get_addr(index=index, family=_family(address)):
            if ipaddress.ip_address(entry.get_attr("IFA_ADDRESS")) == address:
                return True
        return False

    def add_host_address(self, device: str, address: IPAddress) -> bool:
        """`address`/32 or /128 on `device` (no duplicate address detection); True if added."""
        index = self.device_index(device)
        if self.has_address(device, address):
            return False
        prefix = 128 if address.version == 6 else 32
        try:
            self._ipr.addr(
                "add", index=index, address=str(address), prefixlen=prefix, flags=IFA_F_NODAD
            )
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:
                return False
            raise _failed(f"adding {address}/{prefix} to {device}", exc) from None
        return True

    def remove_host_address(self, device: str, address: IPAddress) -> bool:
        """Remove `address` from `device`; True if it was there."""
        index = self.device_index(device)
        if not self.has_address(device, address):
            return False
        prefix = 128 if address.version == 6 else 32
        try:
            self._ipr.addr("del", index=index, address=str(address), prefixlen=prefix)
        except NetlinkError as exc:
            if exc.code == errno.EADDRNOTAVAIL:
                return False
            raise _failed(f"removing {address}/{prefix} from {device}", exc) from None
        return True

    def default_routes(self, family: int) -> list[DefaultRoute]:
        """The main table's default routes of `family`, lowest metric (the one used) first."""
        routes = []
        for entry in self._ipr.get_default_routes(family=family, table=MAIN_TABLE):
            routes.append(
                DefaultRoute(
                    family=family,
                    gateway=entry.get_attr("RTA_GATEWAY"),
                    oif=entry.get_attr("RTA_OIF"),
                    prefsrc=entry.get_attr("RTA_PREFSRC"),
                    priority=entry.get_attr("RTA_PRIORITY"),
                    protocol=entry["proto"],
                )
            )
        return sorted(routes, key=lambda r: r.priority or 0)

    def replace_default(
        self, route: DefaultRoute, *, gateway: str | None, prefsrc: str | None
    ) -> None:
        """Replace `route` (same metric and protocol, so it is that route that changes) with
        a new gateway (None: its own) and preferred source (None: none)."""
        dst = "::/0" if route.family == socket.AF_INET6 else "0.0.0.0/0"
        spec: dict[str, Any] = {
            "dst": dst,
            "family": route.family,
            "table": MAIN_TABLE,
            "proto": route.protocol,
        }
        if route.priority is not None:
            spec["priority"] = route.priority
        new_gateway = route.gateway if gateway is None else gateway
        if new_gateway is not None:
            spec["gateway"] = new_gateway
        # The device stays when the gateway does, and always for IPv6 (a link-local gateway
        # needs it); a new IPv4 gateway goes out of the device the kernel finds for it.
        if route.oif is not None and (gateway is None or route.family == socket.AF_INET6):
            spec["oif"] = route.oif
        if prefsrc is not None:
            spec["prefsrc"] = prefsrc
        try:
            self._ipr.route("replace", **spec)
        except NetlinkError as exc:
            via = spec.get("gateway", "its device")
            raise _failed(f"replacing the default route (via {via})", exc) from None
