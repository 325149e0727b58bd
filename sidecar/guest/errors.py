"""The guest steps' one error type and its exit codes (sysexits.h numbers).

Every failure of a guest step is a `GuestError` whose `exit_code` says which kind it is, so
a hook's `fip_hook_runs_total{outcome="failed"}` line, a systemd unit's status or a shell
caller can tell a typo from a missing capability from an unreachable metadata service
without parsing the message.
"""

from __future__ import annotations

from typing import Final

EXIT_OK: Final = 0
EXIT_USAGE: Final = 64  # bad input: an address, a family, an event, an argument
EXIT_UNAVAILABLE: Final = 69  # the metadata service or /status could not be read
EXIT_OSERR: Final = 71  # the kernel refused a change for another reason
EXIT_PROTOCOL: Final = 76  # the metadata service or /status answered something unexpected
EXIT_NOPERM: Final = 77  # no CAP_NET_ADMIN: run as root, via sudo, or with the capability
EXIT_CONFIG: Final = 78  # this machine is not as configured: no such device, no default route


class GuestError(Exception):
    """A guest step failed; the message names what and why, `exit_code` the kind."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
