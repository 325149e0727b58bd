"""`fip-guest`: the droplet-side steps of a reserved address, for hooks, sudo and a helper.

    fip-guest gained ADDRESS      make this droplet the holder of ADDRESS (IPv4 or IPv6)
    fip-guest lost ADDRESS        undo that (nothing to do when it was not held here)
    fip-guest hook                the same, from a sidecar hook's environment
    fip-guest agent               keep the guest state equal to the local /status, forever

A separate program rather than a `fip-sidecar` subcommand, so that a sudo rule or a
privileged container runs something small that never imports the sidecar's runtime, and
the sidecar itself keeps no privilege. Exit codes: see `sidecar.guest.errors`.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from sidecar.guest.errors import EXIT_NOPERM, EXIT_OK, EXIT_USAGE, GuestError

if TYPE_CHECKING:
    from sidecar.guest.netlink import IPAddress

PROG = "fip-guest"
CAP_NET_ADMIN = 12
#: Hook events that act, and whether the address is gained; the rest are no-ops.
HOOK_EVENTS = {"address_gained": True, "address_lost": False, "gained": True, "lost": False}
IGNORED_EVENTS = {"leader_change"}
DEFAULT_STATUS_URL = "http://127.0.0.1:9401"


def _say(text: str) -> None:
    print(f"{PROG}: {text}", file=sys.stderr, flush=True)


def _gateway(text: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IPv4 address: {text!r}") from None


def _bounded(low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not between {low} and {high}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--ipv6-device", default="lo", help="device a held reserved IPv6 goes on (default lo)"
    )
    common.add_argument(
        "--no-ipv6-source",
        action="store_true",
        help="do not make a held reserved IPv6 the source of outbound IPv6",
    )
    common.add_argument(
        "--no-ipv4-route",
        action="store_true",
        help="leave the IPv4 default route alone (outbound IPv4 keeps the droplet's address)",
    )
    common.add_argument(
        "--metadata-url",
        default=None,
        help="the droplet metadata service (default http://169.254.169.254)",
    )
    common.add_argument("--anchor-gateway", type=_gateway, help="instead of asking metadata")
    common.add_argument("--public-gateway", type=_gateway, help="instead of asking metadata")

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Droplet-side steps for a reserved address: a /128 and outbound source "
        "for IPv6, the anchor-gateway default route for IPv4. Needs CAP_NET_ADMIN.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in (("gained", "make this droplet the holder"), ("lost", "undo 'gained'")):
        command = commands.add_parser(name, parents=[common], help=text, description=text)
        command.add_argument("address", help="the reserved IPv4 or IPv6 address")
    commands.add_parser(
        "hook",
        parents=[common],
        help="act on a sidecar hook's FIP_EVENT, FIP_ADDRESS and FIP_FAMILY",
        description="For [hooks] on_address_gained / on_address_lost (also on_gained / "
        "on_lost with FIP_FLOATING_IP, from sidecars without address events).",
    )
    agent = commands.add_parser(
        "agent",
        parents=[common],
        help="keep the guest state equal to the local sidecar's /status",
        description="Poll /status and make the kernel match it (level-triggered).",
    )
    agent.add_argument("--status-url", default=DEFAULT_STATUS_URL)
    agent.add_argument("--interval", type=_bounded(0.2, 60.0), default=1.0, help="seconds")
    agent.add_argument(
        "--down-after",
        type=_bounded(1.0, 600.0),
        default=5.0,
        help="seconds without an answer after which the sidecar counts as down and "
        "everything it held is released (default 5)",
    )
    return parser


def has_net_admin() -> bool:
    """Whether this process may change addresses and routes (CapEff has CAP_NET_ADMIN)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except OSError:
        pass
    return os.geteuid() == 0


def parse_address(text: str, family: str | None, where: str) -> IPAddress:
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        raise GuestError(EXIT_USAGE, f"{where}: not an IP address: {text!r}") from None
    scoped = isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None
    special = address.is_link_local or address.is_loopback or address.is_multicast
    if scoped or special or address.is_unspecified:
        raise GuestError(EXIT_USAGE, f"{where}: {text!r} cannot be a reserved address")
    if family not in (None, "", f"ipv{address.version}"):
        raise GuestError(
            EXIT_USAGE, f"FIP_FAMILY is {family!r} but {where} {address} is ipv{address.version}"
        )
    return address


def hook_request(env: Mapping[str, str]) -> tuple[bool, IPAddress] | None:
    """(gained?, address) from a hook's environment; None for an event with nothing to do."""
    event = env.get("FIP_EVENT", "")
    if event in IGNORED_EVENTS:
        return None
    if event not in HOOK_EVENTS:
        known = ", ".join([*HOOK_EVENTS, *IGNORED_EVENTS])
        raise GuestError(EXIT_USAGE, f"FIP_EVENT: {event!r} is not one of {known}")
    name = "FIP_ADDRESS" if env.get("FIP_ADDRESS") else "FIP_FLOATING_IP"
    if not env.get(name):
        raise GuestError(EXIT_USAGE, f"FIP_EVENT={event} but FIP_ADDRESS is not set")
    return HOOK_EVENTS[event], parse_address(env[name], env.get("FIP_FAMILY"), name)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = _parser().parse_args(argv)
    environ = os.environ if env is None else env
    from sidecar.guest.steps import Gateways, GuestSettings

    settings = GuestSettings(
        ipv6_device=args.ipv6_device,
        ipv6_source=not args.no_ipv6_source,
        ipv4_route=not args.no_ipv4_route,
        anchor_gateway=args.anchor_gateway,
        public_gateway=args.public_gateway,
        **({"metadata_url": args.metadata_url} if args.metadata_url else {}),
    )
    try:
        if args.command == "hook":
            request = hook_request(environ)
            if request is None:
                _say(f"nothing to do for FIP_EVENT={environ.get('FIP_EVENT')}")
                return EXIT_OK
            gained, address = request
        elif args.command in ("gained", "lost"):
            gained, address = args.command == "gained", parse_address(args.address, None, "ADDRESS")
        if not has_net_admin():
            raise GuestError(
                EXIT_NOPERM,
                "needs CAP_NET_ADMIN: run it as root, through the sudo rule, or in the "
                "helper container (--cap-add NET_ADMIN); nothing was changed",
            )
        if args.command == "agent":
            from sidecar.guest.agent import Agent

            Agent(
                settings,
                args.status_url,
                interval=args.interval,
                down_after=args.down_after,
                log=_say,
            ).run()
            return EXIT_OK
        from sidecar.guest.netlink import Netlink
        from sidecar.guest.steps import hold, release

        with Netlink() as net:
            step = hold if gained else release
            done = step(net, settings, Gateways(settings), address)
    except GuestError as exc:
        _say(f"error: {exc}")
        return exc.exit_code
    verb = "gained" if gained else "lost"
    _say(f"{verb} {address}: " + ("; ".join(done) if done else "nothing to change"))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
