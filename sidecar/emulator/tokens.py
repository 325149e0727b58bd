"""API tokens the emulated account accepts, each with full access or custom scopes.

DigitalOcean tokens are either full access (every endpoint) or custom-scoped: each
endpoint names the scope it needs (the `security` block of its operation in the OpenAPI
spec, e.g. `reserved_ip:read` for `GET /v2/reserved_ips/{ip}`), and a token without it is
refused with 403. A revoked (or never issued) token gets 401. The README tells users to
give the sidecars a scoped token, so the emulator must refuse what that token cannot do.

Tokens are compared in constant time; the registry never prints them.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass

SCOPE_PATTERN = re.compile(r"[a-z][a-z0-9_]*:[a-z_]+")


@dataclass(frozen=True)
class Grant:
    """What one token may do: `scopes` None is full access."""

    scopes: frozenset[str] | None

    def allows(self, scope: str) -> bool:
        return self.scopes is None or scope in self.scopes


def parse_scopes(scopes: Iterable[str]) -> frozenset[str]:
    """Validated scope names (`resource:verb`), or a ValueError naming the bad one."""
    result = set()
    for scope in scopes:
        scope = scope.strip()
        if not SCOPE_PATTERN.fullmatch(scope):
            raise ValueError(f"scope {scope!r} is not of the form resource:verb")
        result.add(scope)
    if not result:
        raise ValueError("a custom-scoped token needs at least one scope")
    return frozenset(result)


class TokenRegistry:
    """The tokens in force; `grant` issues or re-scopes one, `revoke` takes it away."""

    def __init__(self) -> None:
        self._grants: dict[str, Grant] = {}

    def grant(self, token: str, scopes: Iterable[str] | None = None) -> Grant:
        if not token:
            raise ValueError("a token must not be empty")
        grant = Grant(None if scopes is None else parse_scopes(scopes))
        self._grants[token] = grant
        return grant

    def revoke(self, token: str) -> bool:
        """Revoke `token`; False when it was not in force."""
        found = self.lookup(token)
        if found is None:
            return False
        self._grants = {k: v for k, v in self._grants.items() if not _same(k, token)}
        return True

    def lookup(self, token: str) -> Grant | None:
        """The grant of `token`, checking every token in constant time each."""
        found: Grant | None = None
        for candidate, grant in self._grants.items():
            if _same(candidate, token):
                found = grant
        return found

    def __len__(self) -> int:
        return len(self._grants)


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
