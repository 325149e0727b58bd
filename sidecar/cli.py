"""`fip-sidecar run / check-config / keygen / status / emulate`.

Each command is a thin shell over a module that does the work, so every behaviour here is
also usable (and tested) as a library. Config mistakes exit 2 with one line naming the key.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Sequence

import trio

from sidecar import __version__, config, localcluster, logs, service
from sidecar.digitalocean import TokenError
from sidecar.protocol import generate_cluster_key

log = logging.getLogger("sidecar")

EXIT_CONFIG = 2
EXIT_RUNTIME = 1

DEFAULT_STATUS_URL = "http://127.0.0.1:9401"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fip-sidecar",
        description=(
            "Keep a DigitalOcean reserved (floating) IP on a healthy droplet: the sidecars "
            "elect one leader (bully priority, majority quorum, leases) and the leader points "
            "the IP at its own droplet."
        ),
    )
    parser.add_argument("--version", action="version", version=f"fip-sidecar {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run a node in the foreground",
        description=(
            "Run one cluster member until SIGTERM/SIGINT (a leader resigns first, so a planned "
            "stop hands over in one round trip). Logs are JSON lines on stderr."
        ),
    )
    run.add_argument("--config", required=True, help="TOML config file")
    run.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="overrides log_level from the config",
    )

    check = commands.add_parser(
        "check-config",
        help="validate a config file and exit 0, or 2 with the problem",
        description="Validate everything a node would check at start, then print a summary.",
    )
    check.add_argument("--config", required=True, help="TOML config file")

    commands.add_parser(
        "keygen",
        help="print a new random cluster key",
        description="Print a new 32-byte cluster key (base64). Save it to the file every "
        "member's cluster_key_file names, readable only by the sidecar.",
    )

    status = commands.add_parser(
        "status",
        help="show a node's /status for a person",
        description="Fetch /status from a running node and print role, lease, peers and the IP.",
    )
    status.add_argument(
        "--url",
        default=DEFAULT_STATUS_URL,
        help=f"the node's status address (default {DEFAULT_STATUS_URL})",
    )
    status.add_argument("--json", action="store_true", help="print the raw JSON")

    emulate = commands.add_parser(
        "emulate",
        help="run the local DigitalOcean API emulator (for tests and demos)",
        description="A local stand-in for the reserved-IP slice of the DigitalOcean API, "
        "with an edge that forwards traffic for the IP to whichever droplet holds it.",
    )
    from sidecar.emulator import cli as emulator_cli

    emulator_cli.add_arguments(emulate)

    demo = commands.add_parser(
        "demo",
        help="run a local three-node cluster with the emulator, edge and web services",
        description="Start the emulator + edge, three tiny web services and three nodes on "
        "loopback, print what to try, and run until Ctrl-C (everything is torn down).",
    )
    localcluster.add_arguments(demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    match args.command:
        case "run":
            return _run(args)
        case "check-config":
            return _check_config(args)
        case "keygen":
            print(generate_cluster_key())
            return 0
        case "status":
            from sidecar.status_cli import show_status

            return show_status(args.url, raw=args.json)
        case "emulate":
            from sidecar.emulator import cli as emulator_cli

            return emulator_cli.run(args)
        case "demo":
            return localcluster.run(args)
    return EXIT_RUNTIME


def _load(path: str) -> config.Config | None:
    try:
        return config.load(path)
    except config.ConfigError as exc:
        print(f"fip-sidecar: config error: {exc}", file=sys.stderr)
        return None


def _check_config(args: argparse.Namespace) -> int:
    loaded = _load(args.config)
    if loaded is None:
        return EXIT_CONFIG
    timing = loaded.timing
    print(f"ok: {loaded.source}")
    print(
        f"  node {loaded.node_id} ({'eligible' if loaded.eligible else 'witness'}), "
        f"{len(loaded.members)} members, quorum {loaded.quorum_text}"
    )
    if loaded.changing_membership:
        old, new = (sorted(m) for m in loaded.memberships)
        print(
            f"  membership change in progress: {old} -> {new}; finish it once every member "
            "runs this transition config (README: Changing membership)"
        )
    print(
        f"  profile {loaded.profile}: heartbeat {timing.heartbeat_interval}s, "
        f"lease {timing.lease_timeout}s, preempt {timing.preempt} after {timing.preempt_delay}s"
    )
    if loaded.floating_ip is not None:
        print(f"  floating IP {loaded.floating_ip.address}")
    eligible = sum(m.eligible for m in loaded.members)
    if eligible < loaded.quorum:
        print(
            f"  note: only {eligible} eligible members for a quorum of {loaded.quorum}: "
            "elections need a witness's vote (require_eligible_quorum = true forbids this)"
        )
    return 0


def _run(args: argparse.Namespace) -> int:
    loaded = _load(args.config)
    if loaded is None:
        return EXIT_CONFIG
    logs.setup(args.log_level or loaded.log_level, node_id=loaded.node_id)
    try:
        trio.run(functools.partial(service.serve, loaded, reload=lambda: config.load(args.config)))
    except (OSError, service.StartupError, TokenError) as exc:
        log.error("cannot start", extra={"event": "fatal", "error": str(exc)})
        print(f"fip-sidecar: cannot start: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    return 0


if __name__ == "__main__":
    sys.exit(main())
