"""Droplet networking on lab hosts, for the guest steps (`fip-guest`).

A DigitalOcean droplet has, on `eth0`, its public IPv4 (default route via the public
gateway), an *anchor* IPv4 in another subnet (its anchor gateway is where outbound traffic
must go to leave as the reserved IPv4) and a public IPv6 (default route via the IPv6
gateway). `GuestNet` gives lab hosts the same shape, with one lab host as the "router"
that owns all three gateways:

    router  198.18.0.100/24 (public gw)  198.19.0.100/24 (anchor gw)  2001:db8:1::100/64
            lo: 198.18.255.1, 2001:db8:ff::1 (the "Internet": where sources are observed)
    host N  198.18.0.N/24  198.19.0.N/24 (anchor)  2001:db8:1::N/64
            default via 198.18.0.100, IPv6 default via 2001:db8:1::100

The router also serves the metadata paths the IPv4 step asks (`interfaces/public/0/
{ipv4,anchor_ipv4}/gateway`) with `python3 -m http.server`, and can route the reserved IPv6
to one host, as DigitalOcean does to the holder. Every address is from 198.18.0.0/15 or
2001:db8::/32 and lives inside the lab's own namespaces (IPv6 is turned on only in the
namespaces given here); everything is removed with the lab.
"""

from __future__ import annotations

import contextlib
import errno
import json
import socket
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .netns import Host, Lab, LabError, Process, run

ANCHOR_PREFIX = "198.19.0"
IPV6_PREFIX = "2001:db8:1::"
SINK_IPV4 = "198.18.255.1"
SINK_IPV6 = "2001:db8:ff::1"
SINK_PORT = 9999
METADATA_PORT = 8169
RESERVED_IPV6 = "2001:db8:f::10"
PROBE_TIMEOUT = 2.0


def anchor_of(host: Host) -> str:
    return f"{ANCHOR_PREFIX}.{host.port_index}"


def ipv6_of(host: Host) -> str:
    return f"{IPV6_PREFIX}{host.port_index}"


def _enable_ipv6(host: Host) -> None:
    """IPv6 on, with no duplicate address detection and no router advertisements: turned off
    before IPv6 comes up, so no address (link-local ones included) is ever tentative."""
    settings = [("accept_dad", 0), ("dad_transmits", 0), ("accept_ra", 0), ("disable_ipv6", 0)]
    for setting, value in settings:
        for key in ("all", "default", "lo", "eth0"):
            run(
                ["ip", "netns", "exec", host.ns, "sysctl", "-q", "-w",
                 f"net.ipv6.conf.{key}.{setting}={value}"]
            )  # fmt: skip


class GuestNet:
    """Gateways, anchor addresses and IPv6 on lab hosts; `router` must not be one of them."""

    def __init__(self, lab: Lab, router: Host, droplets: Sequence[Host]) -> None:
        self.lab = lab
        self.router = router
        self.droplets = list(droplets)
        ns = router.ns
        _enable_ipv6(router)
        run(["ip", "-n", ns, "addr", "add", f"{anchor_of(router)}/24", "dev", "eth0"])
        run(["ip", "-n", ns, "addr", "add", f"{ipv6_of(router)}/64", "dev", "eth0", "nodad"])
        run(["ip", "-n", ns, "addr", "add", f"{SINK_IPV4}/32", "dev", "lo"])
        run(["ip", "-n", ns, "addr", "add", f"{SINK_IPV6}/128", "dev", "lo", "nodad"])
        for host in self.droplets:
            _enable_ipv6(host)
            run(["ip", "-n", host.ns, "addr", "add", f"{anchor_of(host)}/24", "dev", "eth0"])
            run(["ip", "-n", host.ns, "addr", "add", f"{ipv6_of(host)}/64", "dev", "eth0", "nodad"])
            run(["ip", "-n", host.ns, "route", "replace", "default", "via", router.address])
            run(["ip", "-n", host.ns, "-6", "route", "replace", "default", "via", ipv6_of(router)])
        self.metadata_dir = lab.workdir / "metadata-root"
        self.write_metadata(public=router.address, anchor=anchor_of(router))
        self.metadata: Process = lab.spawn(
            router,
            "metadata",
            [sys.executable, "-m", "http.server", "--bind", router.address,
             "--directory", str(self.metadata_dir), str(METADATA_PORT)],
        )  # fmt: skip
        self._sinks: dict[int, socket.socket] = {
            socket.AF_INET: self._sink(socket.AF_INET, SINK_IPV4),
            socket.AF_INET6: self._sink(socket.AF_INET6, SINK_IPV6),
        }
        self.wait_for_metadata()
        for host in self.droplets:  # neighbours resolved both ways before any test probes
            for family in (socket.AF_INET, socket.AF_INET6):
                self._warm_up(host, family)

    @property
    def metadata_url(self) -> str:
        return f"http://{self.router.address}:{METADATA_PORT}"

    def write_metadata(self, *, public: str, anchor: str) -> None:
        """What `interfaces/public/0/{ipv4,anchor_ipv4}/gateway` answer (any text, for tests)."""
        for kind, text in (("ipv4", public), ("anchor_ipv4", anchor)):
            path = self.metadata_dir / "metadata/v1/interfaces/public/0" / kind / "gateway"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)

    def wait_for_metadata(self, attempts: int = 100) -> None:
        for _ in range(attempts):
            with contextlib.suppress(OSError, LabError):
                self.lab.http_get_text(
                    self.router, METADATA_PORT, "/metadata/v1/interfaces/public/0/ipv4/gateway"
                )
                return
            if not self.metadata.running():
                break
            time.sleep(0.1)
        raise LabError(f"the metadata server did not start (see {self.metadata.log_path})")

    def _sink(self, family: int, address: str) -> socket.socket:
        sink = self.lab.open_socket(self.router, family, socket.SOCK_DGRAM)
        sink.bind((address, SINK_PORT))
        sink.settimeout(PROBE_TIMEOUT)
        return sink

    def close(self) -> None:
        for sink in self._sinks.values():
            sink.close()

    # ------------------------------------------------------------------ observe
    def source_seen(self, host: Host, family: int) -> str:
        """Send one UDP datagram from `host` to the router's sink, with no source address
        chosen by the sender (the kernel's route decides); return the source the router saw."""
        nonce = uuid.uuid4().bytes
        target = SINK_IPV6 if family == socket.AF_INET6 else SINK_IPV4
        with self.lab.open_socket(host, family, socket.SOCK_DGRAM) as sender:
            sender.sendto(nonce, (target, SINK_PORT))
        sink = self._sinks[family]
        for _ in range(100):  # skip datagrams of earlier probes that arrived late
            data, peer = sink.recvfrom(64)
            if data == nonce:
                return str(peer[0])
        raise LabError(f"no probe from {host.name} reached the router")

    def _warm_up(self, host: Host, family: int, attempts: int = 10) -> None:
        for _ in range(attempts):
            with contextlib.suppress(TimeoutError):
                self.source_seen(host, family)
                return
        raise LabError(f"{host.name} cannot reach the router over {family!r}")

    def route_reserved_ipv6_to(self, host: Host, address: str = RESERVED_IPV6) -> None:
        """What DigitalOcean does on an assign: route the reserved IPv6 to that droplet."""
        run(["ip", "-n", self.router.ns, "-6", "route", "replace", f"{address}/128",
             "via", ipv6_of(host)])  # fmt: skip

    def answers_for(self, address: str = RESERVED_IPV6) -> bool:
        """Whether the host the router sends `address` to takes it as its own: a UDP packet to
        a closed port comes back as "port unreachable" only from the address's owner (a
        host without the address drops it: it does not forward)."""
        with self.lab.open_socket(self.router, socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.settimeout(PROBE_TIMEOUT)
            probe.connect((address, 9))
            probe.send(b"?")
            try:
                probe.recv(16)
            except ConnectionRefusedError:
                return True
            except TimeoutError:
                return False
            except OSError as exc:
                if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
                    return False
                raise
        return False

    def addresses(self, host: Host, device: str = "lo") -> set[str]:
        shown = run(["ip", "-n", host.ns, "-j", "addr", "show", "dev", device]).stdout
        return {a["local"] for link in json.loads(shown) for a in link.get("addr_info", [])}

    def default_routes(self, host: Host, family: int) -> list[dict[str, Any]]:
        flag = "-6" if family == socket.AF_INET6 else "-4"
        shown = run(["ip", "-n", host.ns, flag, "-j", "route", "show", "default"]).stdout
        routes: list[dict[str, Any]] = json.loads(shown)
        return routes

    def snapshot(self, host: Host) -> str:
        """Every address (but link-local ones, whose DAD flags change by themselves) and
        every route of `host`: what the guest steps could change, to compare before/after."""
        links = json.loads(run(["ip", "-n", host.ns, "-j", "addr"]).stdout)
        addresses = sorted(
            (link["ifname"], a["local"], a["prefixlen"])
            for link in links
            for a in link.get("addr_info", [])
            if a.get("scope") != "link"
        )
        routes = [run(["ip", "-n", host.ns, "-j", flag, "route"]).stdout for flag in ("-4", "-6")]
        return json.dumps(addresses) + "\n" + "\n".join(routes)


@contextlib.contextmanager
def guest_net(lab: Lab, router: Host, droplets: Sequence[Host]) -> Iterator[GuestNet]:
    net = GuestNet(lab, router, droplets)
    try:
        yield net
    finally:
        net.close()


def fip_guest() -> Path:
    """The `fip-guest` executable of the environment running the tests."""
    return Path(sys.executable).parent / "fip-guest"
