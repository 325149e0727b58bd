"""`fip-sidecar emulate`: run the DigitalOcean API emulator (and the edge) in the foreground.

The lead's `sidecar/cli.py` mounts `add_arguments` and `run` as the `emulate`
subcommand; `python -m sidecar.emulator` runs the same thing on its own. The token comes
from a file or `FIP_EMULATOR_TOKEN`, never from argv, like the sidecar's own token; its
scopes (`--token-scopes`) are not secret and may be given on the command line.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from .settings import EmulatorSettings
from .specs import DropletSpec, decode_droplet

if TYPE_CHECKING:
    from .emulator import Emulator
    from .server import TlsFiles

TOKEN_ENV = "FIP_EMULATOR_TOKEN"


class UsageError(Exception):
    """A bad flag value, reported as one line and exit status 2."""


@dataclass(frozen=True)
class IPSpec:
    ip: str
    region: str
    droplet_id: int | None


def host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return value


def reserved_ip_spec(value: str) -> IPSpec:
    ip, sep, rest = value.partition("=")
    region, _, holder = rest.partition(":")
    if not sep or not ip or not region or (holder and not holder.isdigit()):
        raise argparse.ArgumentTypeError(f"expected IP=REGION or IP=REGION:DROPLET, got {value!r}")
    return IPSpec(ip, region, int(holder) if holder else None)


def droplet_spec(value: str) -> DropletSpec:
    """`ID=REGION[=WEB_URL]`, or a JSON object with every attribute (see specs.py)."""
    if value.lstrip().startswith("{"):
        try:
            return decode_droplet(value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    parts = value.split("=", 2)
    if len(parts) < 2 or not parts[0].isdigit() or not parts[1]:
        raise argparse.ArgumentTypeError(f"expected ID=REGION[=WEB_URL] or JSON, got {value!r}")
    web_url = parts[2] if len(parts) == 3 and parts[2] else None
    return DropletSpec(id=int(parts[0]), region=parts[1], web_url=web_url)


def scope_list(value: str) -> list[str]:
    return [scope.strip() for scope in value.split(",") if scope.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `emulate` flags (defaults mirror the real API's limits)."""
    defaults = EmulatorSettings()
    parser.add_argument(
        "--listen",
        type=host_port,
        default="127.0.0.1:8089",
        help="HOST:PORT for the API, metadata and /_emulator/ admin (port 0: any)",
    )
    parser.add_argument(
        "--edge-listen",
        type=host_port,
        default=None,
        help="HOST:PORT for the edge that forwards to the IP's holder",
    )
    parser.add_argument(
        "--edge-reserved-ip",
        default=None,
        metavar="IP",
        help="the reserved IPv4 the edge serves (default: the first IPv4 --reserved-ip)",
    )
    parser.add_argument(
        "--edge6-listen",
        type=host_port,
        default=None,
        help="HOST:PORT (e.g. [::1]:8000) for the edge of the reserved IPv6",
    )
    parser.add_argument(
        "--edge-reserved-ipv6",
        default=None,
        metavar="IP",
        help="the reserved IPv6 the IPv6 edge serves (default: the first IPv6 --reserved-ip)",
    )
    parser.add_argument(
        "--forbid-mixed-families",
        action="store_true",
        help="refuse (422) to give a droplet a reserved IPv4 and a reserved IPv6 at once "
        "(undocumented on the real API; allowed by default)",
    )
    parser.add_argument(
        "--metadata-listen",
        type=host_port,
        default=None,
        help="HOST:PORT serving /metadata/v1/... about the droplet whose address asks "
        "(what a droplet finds at 169.254.169.254)",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help=f"file holding the token to accept (else env {TOKEN_ENV})",
    )
    parser.add_argument(
        "--token-scopes",
        type=scope_list,
        default=None,
        metavar="SCOPE[,SCOPE...]",
        help="make the token custom-scoped (e.g. reserved_ip:read,reserved_ip:update); "
        "default: full access",
    )
    parser.add_argument(
        "--reserved-ip",
        type=reserved_ip_spec,
        action="append",
        default=[],
        metavar="IP=REGION[:DROPLET]",
        help="a reserved IPv4 or IPv6 address (repeatable)",
    )
    parser.add_argument(
        "--droplet",
        type=droplet_spec,
        action="append",
        default=[],
        metavar="ID=REGION[=WEB_URL]|JSON",
        help="a droplet (repeatable); JSON also sets name, tags, public_ipv4, private_ipv4, "
        "boot_seconds, ipv6 (IPv6 enabled, default true)",
    )
    parser.add_argument(
        "--action-seconds",
        type=float,
        default=defaults.action_seconds,
        help="how long an action stays in-progress",
    )
    parser.add_argument(
        "--action-404-seconds",
        type=float,
        default=defaults.action_404_seconds,
        help="how long a new action answers 404",
    )
    parser.add_argument(
        "--propagation-delay",
        type=float,
        default=defaults.propagation_delay,
        help="seconds the edge lags behind a completed move",
    )
    parser.add_argument("--rate-limit-per-minute", type=int, default=defaults.rate_limit_per_minute)
    parser.add_argument("--rate-limit-per-hour", type=int, default=defaults.rate_limit_per_hour)
    parser.add_argument(
        "--edge-timeout",
        type=float,
        default=defaults.edge_timeout,
        help="seconds the edge waits for a web service before a 502",
    )
    parser.add_argument("--tls-cert", type=Path, default=None, help="serve the API over https")
    parser.add_argument("--tls-key", type=Path, default=None)


def read_token(args: argparse.Namespace) -> str:
    if args.token_file is not None:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except OSError as error:
            raise UsageError(
                f"--token-file: cannot read {args.token_file}: {error.strerror}"
            ) from None
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise UsageError(f"no API token: give --token-file or set {TOKEN_ENV}")
    return token


def build_emulator(args: argparse.Namespace) -> Emulator:
    """An emulator from parsed flags; every mistake becomes a one-line UsageError."""
    from .emulator import Emulator  # the web framework loads only when the emulator runs

    settings = EmulatorSettings(
        action_seconds=args.action_seconds,
        action_404_seconds=args.action_404_seconds,
        propagation_delay=args.propagation_delay,
        rate_limit_per_minute=args.rate_limit_per_minute,
        rate_limit_per_hour=args.rate_limit_per_hour,
        edge_timeout=args.edge_timeout,
        allow_mixed_families=not args.forbid_mixed_families,
    )
    try:
        settings.validate()
        try:
            emulator = Emulator(
                read_token(args),
                settings,
                token_scopes=args.token_scopes,
                edge_ip=args.edge_reserved_ip,
                edge_ipv6=args.edge_reserved_ipv6,
            )
        except ValueError as error:
            raise UsageError(f"--token-scopes: {error}") from None
        for droplet in args.droplet:
            droplet.add_to(emulator.state)
        for spec in args.reserved_ip:
            emulator.state.add_reserved_ip(spec.ip, spec.region, spec.droplet_id)
    except ValueError as error:
        raise UsageError(str(error)) from None
    for flag, ip, family in (
        ("--edge-reserved-ip", args.edge_reserved_ip, "ipv4"),
        ("--edge-reserved-ipv6", args.edge_reserved_ipv6, "ipv6"),
    ):
        if ip is None:
            continue
        reserved = emulator.state.reserved_ips.get(ip)
        if reserved is None:
            raise UsageError(f"{flag} {ip} is not a --reserved-ip")
        if reserved.family != family:
            raise UsageError(f"{flag} {ip} is not an {family.upper()} address")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    return emulator


async def serve_until_signalled(
    emulator: Emulator, args: argparse.Namespace, tls: TlsFiles | None
) -> None:
    from .server import ServingAt, serve

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            serving: ServingAt = await nursery.start(
                partial(
                    serve,
                    emulator,
                    listen=args.listen,
                    edge_listen=args.edge_listen,
                    edge6_listen=args.edge6_listen,
                    metadata_listen=args.metadata_listen,
                    tls=tls,
                )
            )
            line = f"emulator listening on {serving.api_url}"
            if serving.edge_url is not None:
                line += f" edge on {serving.edge_url}"
            if serving.edge6_url is not None:
                line += f" edge6 on {serving.edge6_url}"
            if serving.metadata_url is not None:
                line += f" metadata on {serving.metadata_url}"
            print(line, flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def run(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT; 0 on a clean stop, 2 on a usage error."""
    try:
        emulator = build_emulator(args)
    except UsageError as error:
        print(f"fip-sidecar emulate: {error}", file=sys.stderr)
        return 2
    from .server import TlsFiles

    tls = TlsFiles(args.tls_cert, args.tls_key) if args.tls_cert is not None else None
    try:
        trio.run(serve_until_signalled, emulator, args, tls)
    except OSError as error:
        print(f"fip-sidecar emulate: cannot listen: {error}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar.emulator", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
