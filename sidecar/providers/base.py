"""The neutral provider seam: what the assigner asks of a cloud, in the assigner's words.

Three calls cover a failover: read who holds an address, ask for it to be assigned to a
droplet, and follow the operation that started until it ends. A provider adapter turns
its library's results and errors into the types below at its boundary (the way
pip-audit's `VulnerabilityService` hides each backend), so the assigner never imports a
cloud's client and one cloud's quirks (DigitalOcean's IPv4 `locked` flag, its IPv6
addresses that have none) stay in that cloud's module.

Every request a provider sends is announced through `RequestHooks`: `before()` is awaited
immediately before it (the caller's request budget, and its last-moment leadership check),
`after()` is told its outcome (request counters). A call that sends a second request (a
fallback endpoint) announces both, so a caller's budget counts what really went out.
"""

from __future__ import annotations

from typing import Literal, Protocol

import msgspec

Family = Literal["ipv4", "ipv6"]

#: A status label for a request that got no HTTP answer at all (refused, reset, timed out).
NO_RESPONSE = "network_error"


class Holding(msgspec.Struct, frozen=True, kw_only=True):
    """Who an address points at, as read now.

    `locked` is True while an operation on the address is known to run, False when the
    provider says none does, and None when the provider cannot tell (DigitalOcean's
    reserved IPv6 has no such flag): then the caller simply tries, and a refusal (`Busy`)
    says the same thing one request later.
    """

    address: str
    droplet_id: int | None
    locked: bool | None
    http_status: int = 200


class Operation(msgspec.Struct, frozen=True, kw_only=True):
    """A started change (an assign); follow it until `done`.

    `status` is the provider's word; `completed` and `errored` are the outcomes the
    assigner knows, and any other word that is not `in-progress` means "over, read the
    address to learn how".
    """

    id: int
    status: str
    http_status: int = 200

    @property
    def done(self) -> bool:
        return self.status != "in-progress"


class RequestHooks(Protocol):
    """The caller's side of every request a provider sends."""

    async def before(self) -> None:
        """Awaited immediately before a request leaves; may wait (a budget) or raise."""
        ...

    def after(self, endpoint: str, status: str) -> None:
        """A request finished; `status` is the HTTP code as text or `network_error`."""
        ...


class Provider(Protocol):
    """Reserved addresses of one cloud account (one token), any family."""

    async def read(self, address: str, hooks: RequestHooks) -> Holding:
        """Who holds `address` now (one request)."""
        ...

    async def assign(self, address: str, droplet_id: int, hooks: RequestHooks) -> Operation:
        """Start pointing `address` at `droplet_id` (one request; no unassign first)."""
        ...

    async def follow(self, address: str, operation: Operation, hooks: RequestHooks) -> Operation:
        """Read `operation` again (one request, or two when the first endpoint 404s)."""
        ...


# --------------------------------------------------------------------------- errors


class CallError(Exception):
    """What every failed API call says, here and in each provider's own errors: the call
    (`endpoint`, a method and path template, never a URL with data in it), the HTTP status
    (None when no answer came) and a message. Subclasses set the three attributes."""

    message: str
    endpoint: str
    status: int | None

    @property
    def status_label(self) -> str:
        """What request counters use."""
        return NO_RESPONSE if self.status is None else str(self.status)

    def __str__(self) -> str:
        where = self.endpoint if self.status is None else f"{self.endpoint} -> {self.status}"
        return f"{where}: {self.message}"


class ProviderError(CallError):
    """Any failure of a provider call, already free of secrets.

    `status` is the HTTP status, or None when no answer came; `endpoint` names the call
    (`GET /v2/reserved_ips/{ip}`), never a URL with data in it; `origin` is the provider's
    own name for the failure (`ServerError`, `NetworkError`), for people reading /status.
    """

    def __init__(
        self, message: str, *, endpoint: str, status: int | None = None, origin: str = ""
    ) -> None:
        super().__init__(message)
        self.message = message
        self.endpoint = endpoint
        self.status = status
        self.origin = origin or type(self).__name__


class Rejected(ProviderError):
    """The credentials are missing, wrong, revoked or lack a permission: an operator must act."""


class NotFound(ProviderError):
    """The address, droplet or operation does not exist (for these credentials)."""


class Busy(ProviderError):
    """Refused for now: an operation is in progress on the address or droplet, or the
    droplet cannot take this address at the moment. Wait and retry."""


class RateLimited(ProviderError):
    """Over the provider's request budget; `retry_after` seconds, when the provider said."""

    def __init__(
        self,
        message: str,
        *,
        endpoint: str,
        status: int | None = 429,
        origin: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, endpoint=endpoint, status=status, origin=origin)
        self.retry_after = retry_after


class Unavailable(ProviderError):
    """No usable answer: a network failure, a server error, or an answer we cannot trust.
    Retry with backoff."""


class CredentialError(ValueError):
    """The credentials could not be (re)loaded; the message says where, never the secret."""
