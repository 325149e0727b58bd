"""What the droplet needs while it holds a reserved address, as idempotent "ensure" steps.

- IPv6: DigitalOcean only routes a reserved IPv6 to the droplet; the droplet must own it.
  The holder has it as a /128 (on `lo` by default, so no neighbour discovery or duplicate
  address detection is involved) and its IPv6 default route carries it as preferred
  source, so outbound IPv6 leaves from the reserved address; every other droplet has
  neither (an address left behind would make this droplet answer for it, and a source left
  behind would send replies to the new holder).
- IPv4: inbound traffic arrives on the anchor address with no guest change, but outbound
  leaves from the droplet's own address unless the default route goes through the anchor
  gateway. The holder routes through the anchor gateway, every other droplet through its
  public gateway (anchor traffic of a droplet that holds no reserved IPv4 goes nowhere).

Each step reads the kernel's state first and changes only what differs, so running one
twice, or a release on a droplet that never held the address, changes nothing. Every
change is returned as one sentence for the log.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field

from sidecar.guest.errors import EXIT_CONFIG, GuestError
from sidecar.guest.netlink import IPAddress, Netlink

DEFAULT_METADATA_URL = "http://169.254.169.254"


@dataclass(frozen=True)
class GuestSettings:
    """How the steps run on this droplet (command-line flags of `fip-guest`)."""

    ipv6_device: str = "lo"
    """Where a held reserved IPv6 goes as a /128."""
    ipv6_source: bool = True
    """Make a held reserved IPv6 the source of outbound IPv6 (default route `src`)."""
    ipv4_route: bool = True
    """Route IPv4 through the anchor gateway while a reserved IPv4 is held here."""
    metadata_url: str = DEFAULT_METADATA_URL
    anchor_gateway: ipaddress.IPv4Address | None = None
    """Given instead of asked from the metadata service."""
    public_gateway: ipaddress.IPv4Address | None = None


@dataclass
class Gateways:
    """The anchor and public IPv4 gateways, asked once (they never change on a droplet).
    The metadata client is imported on first use: an IPv6 step never needs it."""

    settings: GuestSettings
    _cache: dict[str, ipaddress.IPv4Address] = field(default_factory=dict)

    def anchor(self) -> ipaddress.IPv4Address:
        if self.settings.anchor_gateway is not None:
            return self.settings.anchor_gateway
        if "anchor" not in self._cache:
            from sidecar.guest.metadata import fetch_gateway

            self._cache["anchor"] = fetch_gateway(self.settings.metadata_url, "anchor_ipv4")
        return self._cache["anchor"]

    def public(self) -> ipaddress.IPv4Address:
        if self.settings.public_gateway is not None:
            return self.settings.public_gateway
        if "public" not in self._cache:
            from sidecar.guest.metadata import fetch_gateway

            self._cache["public"] = fetch_gateway(self.settings.metadata_url, "ipv4")
        return self._cache["public"]


def ensure_ipv6_address(
    net: Netlink, settings: GuestSettings, address: ipaddress.IPv6Address, *, present: bool
) -> list[str]:
    device = settings.ipv6_device
    if present:
        changed = net.add_host_address(device, address)
        return [f"added {address}/128 to {device}"] if changed else []
    changed = net.remove_host_address(device, address)
    return [f"removed {address}/128 from {device}"] if changed else []


def ensure_ipv6_source(
    net: Netlink,
    settings: GuestSettings,
    want: ipaddress.IPv6Address | None,
    managed: Iterable[ipaddress.IPv6Address],
) -> list[str]:
    """The IPv6 default routes' preferred source is `want`; with None, no longer any of
    `managed` (a source that is not one of ours, set by the operator, is left alone)."""
    if not settings.ipv6_source:
        return []
    routes = net.default_routes(socket.AF_INET6)
    if not routes:
        if want is None:
            return []
        raise GuestError(
            EXIT_CONFIG,
            "no IPv6 default route to give the source "
            f"{want}: is IPv6 enabled on this droplet? (--no-ipv6-source skips this step)",
        )
    ours = {str(a) for a in managed}
    done = []
    for route in routes:
        current = route.prefsrc
        if want is not None and (current is None or ipaddress.ip_address(current) != want):
            net.replace_default(route, gateway=None, prefsrc=str(want))
            done.append(f"outbound IPv6 now leaves from {want} (default via {route.gateway})")
        elif want is None and current is not None and str(ipaddress.ip_address(current)) in ours:
            net.replace_default(route, gateway=None, prefsrc=None)
            done.append(f"outbound IPv6 no longer leaves from {current}")
    return done


def ensure_ipv4_route(
    net: Netlink, settings: GuestSettings, gateways: Gateways, *, held: bool
) -> list[str]:
    """Default route via the anchor gateway while held; via the public one after, but only
    where it goes via the anchor gateway (an operator's own default route is left alone)."""
    if not settings.ipv4_route:
        return []
    routes = net.default_routes(socket.AF_INET)
    if not routes:
        raise GuestError(EXIT_CONFIG, "no IPv4 default route on this droplet to point elsewhere")
    route = routes[0]
    current = ipaddress.ip_address(route.gateway) if route.gateway else None
    anchor = gateways.anchor()
    if held and current != anchor:
        net.replace_default(route, gateway=str(anchor), prefsrc=None)
        return [f"IPv4 default route now via the anchor gateway {anchor} (was {current})"]
    if not held and current == anchor:
        public = gateways.public()
        net.replace_default(route, gateway=str(public), prefsrc=None)
        return [f"IPv4 default route back via the public gateway {public}"]
    return []


def hold(
    net: Netlink, settings: GuestSettings, gateways: Gateways, address: IPAddress
) -> list[str]:
    """Everything this droplet needs while it holds `address` (one hook's `gained`)."""
    if isinstance(address, ipaddress.IPv6Address):
        done = ensure_ipv6_address(net, settings, address, present=True)
        return done + ensure_ipv6_source(net, settings, address, [address])
    return ensure_ipv4_route(net, settings, gateways, held=True)


def release(
    net: Netlink, settings: GuestSettings, gateways: Gateways, address: IPAddress
) -> list[str]:
    """Undo `hold` for `address` (one hook's `lost`); nothing to do when it was not held."""
    if isinstance(address, ipaddress.IPv6Address):
        done = ensure_ipv6_source(net, settings, None, [address])
        return done + ensure_ipv6_address(net, settings, address, present=False)
    return ensure_ipv4_route(net, settings, gateways, held=False)
