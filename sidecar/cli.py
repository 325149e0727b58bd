"""`fip-sidecar run / check-config / keygen / status / emulate`.

Each command is a thin shell over a module that does the work, so every behaviour here is
also usable (and tested) as a library. Config mistakes, and anything else that stops a node
from starting (a port in use, a missing token), exit 2 with one line naming the key or the
address, never a traceback.

`emulate` and `demo` keep their flags in their own modules, loaded only when one of them
runs: a node (`run`) never imports the emulator or the local-cluster code.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from sidecar import __version__, config, files, logs, service
from sidecar.protocol import generate_cluster_key
from sidecar.providers.digitalocean import TOKEN_ENV_VAR, TokenError, TokenSource

log = logging.getLogger("sidecar")

EXIT_CONFIG = 2
EXIT_RUNTIME = 1

#: What stops a node at start-up because of its config or its machine, not a bug.
_STARTUP_ERRORS = (OSError, service.StartupError, TokenError)

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
        description="Validate everything a node would check at start (including that every "
        "file the config names exists and is readable), then print a summary.",
    )
    check.add_argument("--config", required=True, help="TOML config file")
    check.add_argument(
        "--user",
        help="check the files as this user (the one the node runs as; needs root)",
    )

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

    for name, delegated in _DELEGATED.items():
        # Its module parses its flags (and answers --help): see `_Delegated`.
        commands.add_parser(name, help=delegated.help, add_help=False)
    return parser


@dataclass(frozen=True)
class _Delegated:
    """A sub-command whose flags and work live in `module` (`add_arguments(parser)` and
    `run(args)`), imported only when the sub-command runs. `requires` are the packages of
    the `emulator` extra it needs, which a production install leaves out."""

    help: str
    description: str
    module: str
    requires: tuple[str, ...] = ("hypercorn", "starlette")

    def run(self, name: str, argv: Sequence[str]) -> int:
        missing = [p for p in self.requires if importlib.util.find_spec(p) is None]
        if missing:
            print(
                f"fip-sidecar {name}: needs the emulator extra ({', '.join(missing)} not "
                "installed): pip install 'fip-sidecar[emulator]', or the "
                "fip-sidecar-emulator image",
                file=sys.stderr,
            )
            return EXIT_CONFIG
        module = importlib.import_module(self.module)
        parser = argparse.ArgumentParser(prog=f"fip-sidecar {name}", description=self.description)
        module.add_arguments(parser)
        return int(module.run(parser.parse_args(argv)))


_DELEGATED = {
    "emulate": _Delegated(
        help="run the local DigitalOcean API emulator (for tests and demos)",
        description="A local stand-in for the reserved-IP slice of the DigitalOcean API, "
        "with an edge that forwards traffic for the IP to whichever droplet holds it.",
        module="sidecar.emulator.cli",
    ),
    "demo": _Delegated(
        help="run a local three-node cluster with the emulator, edge and web services",
        description="Start the emulator + edge, three tiny web services and three nodes on "
        "loopback, print what to try, and run until Ctrl-C (everything is torn down).",
        module="sidecar.localcluster",
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    delegated = _DELEGATED.get(args.command)
    if delegated is not None:
        return delegated.run(args.command, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
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
    return EXIT_RUNTIME


def _load(path: str) -> config.Config | None:
    try:
        return config.load(path)
    except config.ConfigError as exc:
        print(f"fip-sidecar: config error: {exc}", file=sys.stderr)
        return None


def _check_files(loaded: config.Config, user: str | None) -> bool:
    """Print every file problem (errors) and loose secret (warnings); False on an error."""
    try:
        problems = files.access_problems(files.referenced_files(loaded), user)
    except ValueError as exc:
        problems = [str(exc)]
    if loaded.floating_ip is not None and not problems:
        try:
            TokenSource(loaded.digitalocean)
        except TokenError as exc:
            if loaded.digitalocean.token_file is not None:
                problems.append(str(exc))
            else:
                print(
                    f"fip-sidecar: note: {TOKEN_ENV_VAR} is not set here; "
                    "the node needs it (or digitalocean.token_file)",
                    file=sys.stderr,
                )
    for problem in problems:
        print(f"fip-sidecar: config error: {problem}", file=sys.stderr)
    for warning in files.permission_warnings(loaded):
        print(f"fip-sidecar: warning: {warning.message}", file=sys.stderr)
    return not problems


def _check_config(args: argparse.Namespace) -> int:
    loaded = _load(args.config)
    if loaded is None or not _check_files(loaded, args.user):
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
    for managed in loaded.addresses:
        print(f"  address {managed.address} ({managed.family})")
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
    except (*_STARTUP_ERRORS, BaseExceptionGroup) as exc:
        failure = _startup_failure(exc)
        if failure is None:
            raise  # a bug, not a start-up mistake: its traceback is what a report needs
        log.error("cannot start", extra={"event": "fatal", "error": str(failure)})
        print(f"fip-sidecar: cannot start: {failure}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


def _startup_failure(exc: BaseException) -> BaseException | None:
    """The start-up mistake in `exc`, or None when `exc` holds anything else.

    Errors raised inside trio's nurseries arrive wrapped in (possibly nested) exception
    groups; a group made only of start-up errors is reported by its first one.
    """
    if isinstance(exc, BaseExceptionGroup):
        matched, rest = exc.split(_STARTUP_ERRORS)
        if matched is None or rest is not None:
            return None
        return _startup_failure(matched.exceptions[0])
    return exc if isinstance(exc, _STARTUP_ERRORS) else None


if __name__ == "__main__":
    sys.exit(main())
