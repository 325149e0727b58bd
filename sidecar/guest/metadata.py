"""The two gateways the IPv4 step needs, from the droplet metadata service.

A reserved IPv4 reaches a droplet on its *anchor* address (no guest change is needed for
inbound traffic); outbound traffic leaves with the reserved IPv4 as its source only when the
default route goes through the anchor gateway. So on gain the default route points at
`interfaces/public/0/anchor_ipv4/gateway`, and on loss back at `interfaces/public/0/ipv4/
gateway`. Both are fixed for a droplet's life, so a caller may cache them. Standard library
only: one short GET each, from a process that does nothing else meanwhile.
"""

from __future__ import annotations

import ipaddress
import urllib.error
import urllib.request
from typing import Final, Literal

from sidecar.guest.errors import EXIT_PROTOCOL, EXIT_UNAVAILABLE, GuestError

TIMEOUT: Final = 3.0
GatewayKind = Literal["ipv4", "anchor_ipv4"]


def gateway_url(base_url: str, kind: GatewayKind) -> str:
    return f"{base_url.rstrip('/')}/metadata/v1/interfaces/public/0/{kind}/gateway"


def fetch_gateway(base_url: str, kind: GatewayKind) -> ipaddress.IPv4Address:
    """The gateway's address; GuestError naming the URL when it cannot be had."""
    url = gateway_url(base_url, kind)
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            raw = response.read(256)
    except urllib.error.HTTPError as exc:
        raise GuestError(
            EXIT_UNAVAILABLE, f"metadata service: GET {url}: HTTP {exc.code}"
        ) from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise GuestError(EXIT_UNAVAILABLE, f"metadata service: GET {url}: {reason}") from None
    text = raw.decode("utf-8", "replace").strip()
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise GuestError(
            EXIT_PROTOCOL, f"metadata service: GET {url}: not an IPv4 address: {text[:60]!r}"
        ) from None
