"""The DigitalOcean provider: a small trio-native client for the reserved-IP API and metadata.

It covers exactly what the sidecar needs: read a reserved IP (who holds it, its region,
whether an action locks it), list reserved IPs, assign and unassign, follow an action, the
same for a reserved IPv6 (`/v2/reserved_ipv6`: no `locked`, actions read through
`/v2/actions/{id}`), and read this droplet's id, region and "reserved IP active" flag from
the metadata service. `DigitalOceanProvider` at the end is the seam the assigner uses
(`sidecar.providers.base`): it picks the family's endpoints and translates this module's
errors into the seam's.
Every answer is decoded into a typed, frozen struct with strict types; every failure,
whatever library raised it, leaves this module as one of the `ProviderError` subclasses
below, carrying the HTTP status (or none, for a network failure) so the caller can decide
to back off, wait, or complain loudly, and can count requests by status code.

Why not `pydo`, the official client: measured on this project's machines, `pydo.aio` runs
on trio only through an azure-core transport. The stock `TrioRequestsTransport` runs
`requests` in a thread and ignores trio cancellation (a 0.3 s cancel took 2.0 s), which
breaks the promise that the assigner stops the instant leadership is lost; a hand-written
azure-core transport over httpx fixes that, but importing `pydo.aio` still raises the
process's peak RSS from ~28 MB to ~102 MB and start-up by ~0.3 s, and its bearer auth
refuses the local emulator's plain http unless every call passes `enforce_https=False`.
For about five calls, a typed httpx client checked against the official OpenAPI excerpt
(`do-openapi/`) is smaller, cancels at once (httpx runs on trio through anyio) and keeps
the token under our own control.

The token is the one secret here. It lives in an `APIToken` whose repr and str are
redacted, and it is attached to requests by an `httpx.Auth` that never formats it, taking
the current token of a `TokenSource` at each request, so a token file rotated in place is
used as soon as the source is refreshed (the assigner does that on a 401/403); it is
sent only over https, or plain http to a loopback API (the emulator on this machine), or to
another http URL only when the operator sets `allow_insecure_http` (and then a warning is
logged). Messages taken from API error bodies are scrubbed of the token before they reach
an exception, in case a server echoes it back.
"""

from __future__ import annotations

import email.utils
import ipaddress
import logging
import os
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping
from typing import Annotated, Any, Final, Literal, NamedTuple, Protocol, TypeVar
from urllib.parse import urlsplit

import httpx
import msgspec
import trio

from sidecar.providers import base
from sidecar.providers.base import NO_RESPONSE

logger = logging.getLogger(__name__)

DEFAULT_API_URL: Final = "https://api.digitalocean.com"
DEFAULT_METADATA_URL: Final = "http://169.254.169.254"
TOKEN_ENV_VAR: Final = "DIGITALOCEAN_TOKEN"

ApiFlavor = Literal["reserved_ip", "floating_ip"]
ActionStatus = Literal["in-progress", "completed", "errored"]
"""The statuses the spec lists. `Action.status` keeps whatever word the API sent: it once
answered `done` for `completed`, and a client that refused that would poll a finished
action until it gave up."""
# Any other non-empty word is accepted as "no longer running"; the caller reads the IP.
_StatusWire = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]

_MAX_PAGES: Final = 50  # list_reserved_ips stops here; 50 pages of 200 is far beyond any account
_MAX_MESSAGE_CHARS: Final = 300  # API error messages are cut to this length in exceptions
# RFC 6750 b64token; also guarantees the token can never break an HTTP header.
_TOKEN_PATTERN: Final = re.compile(r"[A-Za-z0-9._~+/-]+=*")
_REGION_PATTERN: Final = re.compile(r"[a-z0-9-]{1,32}")


# --------------------------------------------------------------------------- settings


def _is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DigitalOceanSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """The `[digitalocean]` config section.

    - `api_url`: the API's base URL; the emulator's URL in tests and compose.
    - `token_file`: a file holding the API token; when unset, `DIGITALOCEAN_TOKEN` is used.
    - `metadata_url`: the droplet metadata service (no token is ever sent there).
    - `ca_file`: a PEM bundle to trust *instead of* the system CAs, for an emulator that
      serves https with its own CA.
    - `allow_insecure_http`: send the token over plain http to a non-loopback `api_url`
      (only sensible on a private test network; a warning is logged).
    - `request_timeout`: the longest one request may take, body included (a server
      dribbling a body byte by byte cannot stretch it).
    - `api_flavor`: `"reserved_ip"` (current API) or `"floating_ip"` (the legacy
      `/v2/floating_ips` paths and metadata keys, same shapes).
    - `max_response_bytes`: a larger body is refused as malformed, without reading it all.
    """

    api_url: str = DEFAULT_API_URL
    token_file: str | None = None
    metadata_url: str = DEFAULT_METADATA_URL
    ca_file: str | None = None
    allow_insecure_http: bool = False
    request_timeout: float = 10.0
    api_flavor: ApiFlavor = "reserved_ip"
    max_response_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        _check_base_url("api_url", self.api_url)
        _check_base_url("metadata_url", self.metadata_url)
        if not 0 < self.request_timeout <= 300:
            raise ValueError("request_timeout must be > 0 and <= 300 seconds")
        if self.max_response_bytes < 1024:
            raise ValueError("max_response_bytes must be at least 1024")
        if self.token_file is not None and not self.token_file.strip():
            raise ValueError(
                "token_file must not be empty (leave it out to use DIGITALOCEAN_TOKEN)"
            )
        if self.token_is_exposed() and not self.allow_insecure_http:
            raise ValueError(
                "api_url: plain http would send the API token unencrypted to a non-loopback "
                "host; use https (with ca_file for a private CA), a loopback address, or set "
                "allow_insecure_http = true on a private test network"
            )

    def token_is_exposed(self) -> bool:
        """True when the token would cross a network in clear text (http to a non-loopback host)."""
        parts = urlsplit(self.api_url)
        return parts.scheme == "http" and not _is_loopback_host(parts.hostname or "")


def _check_base_url(key: str, url: str) -> None:
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"{key}: not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{key}: must start with https:// or http://")
    if not parts.hostname:
        raise ValueError(f"{key}: has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{key}: must not contain credentials")
    if parts.query or parts.fragment:
        raise ValueError(f"{key}: must not contain a query or fragment")


# --------------------------------------------------------------------------- the token


class TokenError(base.CredentialError):
    """The API token could not be loaded; the message says where we looked, never the token."""


class APIToken:
    """A DigitalOcean API token that refuses to be printed.

    `repr()` and `str()` are redacted; only `reveal()` (called by the request auth, and
    nowhere that formats text) returns the value.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not 0 < len(value) <= 4096 or not _TOKEN_PATTERN.fullmatch(value):
            raise TokenError(
                "the DigitalOcean token is malformed (expected one word of letters, digits "
                "and ._~+/-=, at most 4096 characters)"
            )
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "APIToken(<redacted>)"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("APIToken cannot be pickled")


def load_token(
    settings: DigitalOceanSettings, environ: Mapping[str, str] | None = None
) -> APIToken:
    """Load the token from `settings.token_file`, or else from `DIGITALOCEAN_TOKEN`.

    Raises `TokenError` naming the file or variable it looked at; the message never
    contains the token (nor the file's contents).
    """
    env = os.environ if environ is None else environ
    if settings.token_file is not None:
        path = settings.token_file
        try:
            with open(path, encoding="utf-8") as handle:
                raw = handle.read(8192)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise TokenError(f"digitalocean.token_file: cannot read {path!r}: {reason}") from None
        except UnicodeDecodeError:
            raise TokenError(f"digitalocean.token_file: {path!r} is not UTF-8 text") from None
        value, where = raw.strip(), f"digitalocean.token_file {path!r}"
    else:
        value, where = (
            env.get(TOKEN_ENV_VAR, "").strip(),
            f"the environment variable {TOKEN_ENV_VAR}",
        )
        if not value:
            raise TokenError(
                f"no DigitalOcean token: {TOKEN_ENV_VAR} is not set and digitalocean.token_file "
                "is not configured"
            )
    if not value:
        raise TokenError(f"no DigitalOcean token: {where} is empty")
    try:
        return APIToken(value)
    except TokenError:
        raise TokenError(f"the DigitalOcean token in {where} is malformed") from None


class TokenSource:
    """Where the API token comes from, re-readable so a rotated token is picked up.

    With `token_file`, `refresh()` reads the file again (the assigner calls it on a 401 or
    403 and while it waits after one, and a config reload may call it too); `current()` is
    the token every request carries. With `DIGITALOCEAN_TOKEN` the token is fixed for the
    process's life (nothing outside can change a running process's environment), so
    `refresh()` never changes it. A file that cannot be read or holds no valid token keeps
    the current token (a rotation half done must not stop a working node); the error is
    raised so the caller can report it.
    """

    def __init__(
        self, settings: DigitalOceanSettings, environ: Mapping[str, str] | None = None
    ) -> None:
        self._settings = settings
        self._environ = os.environ if environ is None else environ
        self._signature = self._file_signature()
        self._token = load_token(settings, self._environ)
        self._previous: APIToken | None = None
        #: How many times the token has changed; a waiter compares it to notice a refresh.
        self.generation = 0

    @property
    def rereadable(self) -> bool:
        """Whether `refresh()` can ever change the token (a token file, not the env var)."""
        return self._settings.token_file is not None

    def current(self) -> APIToken:
        return self._token

    def secrets(self) -> tuple[APIToken, ...]:
        """The current token and the one it replaced, both to be masked in any message."""
        return (self._token,) if self._previous is None else (self._token, self._previous)

    def changed_on_disk(self) -> bool:
        """A cheap check (one stat): the token file differs from when it was last read."""
        return self.rereadable and self._file_signature() != self._signature

    def refresh(self) -> bool:
        """Read the token source again; True when the token changed.

        Raises `TokenError` (naming the file, never the token) when the file cannot be
        read or holds no valid token; the current token stays in use.
        """
        if not self.rereadable:
            return False
        self._signature = self._file_signature()
        token = load_token(self._settings, self._environ)
        if token.reveal() == self._token.reveal():
            return False
        self._previous, self._token = self._token, token
        self.generation += 1
        logger.info(
            "DigitalOcean token re-read: it changed",
            extra={"event": "token_changed", "token_file": self._settings.token_file},
        )
        return True

    def _file_signature(self) -> tuple[int, int, int, int] | None:
        if self._settings.token_file is None:
            return None
        try:
            info = os.stat(self._settings.token_file)
        except OSError:
            return None
        return (info.st_ino, info.st_dev, info.st_size, info.st_mtime_ns)

    def __repr__(self) -> str:
        return f"TokenSource(token_file={self._settings.token_file!r})"


class _FixedToken:
    """A token given directly (tests, library use): the `TokenSource` shape, never changing."""

    def __init__(self, token: APIToken) -> None:
        self._token = token

    def current(self) -> APIToken:
        return self._token

    def secrets(self) -> tuple[APIToken, ...]:
        return (self._token,)


class _BearerAuth(httpx.Auth):
    """Adds `Authorization: Bearer ...` at send time, with the source's current token (so
    a rotated token is used from the next request on); never formats it."""

    def __init__(self, tokens: TokenSource | _FixedToken) -> None:
        self._tokens = tokens

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = "Bearer " + self._tokens.current().reveal()
        yield request

    def __repr__(self) -> str:
        return "_BearerAuth(<redacted>)"


# --------------------------------------------------------------------------- errors


class ProviderError(base.CallError):
    """Any failure of a provider call. `status` is the HTTP status, or None when no answer came.

    `endpoint` is the method and path template (`GET /v2/reserved_ips/{ip}`), never a
    full URL with data in it. `status_label` is what request counters use.
    """

    def __init__(
        self,
        message: str,
        *,
        endpoint: str,
        status: int | None = None,
        api_id: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.endpoint = endpoint
        self.status = status
        self.api_id = api_id
        self.request_id = request_id


class Unauthorized(ProviderError):
    """401/403: the token is missing, wrong, revoked or lacks a scope. An operator must act."""


class NotFound(ProviderError):
    """404: the reserved IP, droplet or action does not exist (for this token)."""


class Unprocessable(ProviderError):
    """422: usually an action is already in progress on the IP or droplet; wait and retry."""


class RateLimited(ProviderError):
    """429: over DigitalOcean's request budget.

    `retry_after` is the number of seconds to wait (from `Retry-After`, else computed from
    `ratelimit-reset`), `reset_at` the epoch second from `ratelimit-reset`; either may be
    None when the server did not say.
    """

    def __init__(
        self,
        message: str,
        *,
        endpoint: str,
        status: int | None = 429,
        api_id: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        reset_at: float | None = None,
    ) -> None:
        super().__init__(
            message, endpoint=endpoint, status=status, api_id=api_id, request_id=request_id
        )
        self.retry_after = retry_after
        self.reset_at = reset_at


class ServerError(ProviderError):
    """5xx: DigitalOcean failed; retry with backoff."""


class NetworkError(ProviderError):
    """No (complete) HTTP answer: refused, reset, TLS failure, or the request timed out."""


class MalformedResponse(ProviderError):
    """An answer we cannot trust: bad JSON, a wrong shape, a missing field, a huge body."""


class UnexpectedStatus(ProviderError):
    """Any other status (a redirect, 400, 409, ...): not part of this API's contract."""


_STATUS_ERRORS: Final[dict[int, type[ProviderError]]] = {
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    422: Unprocessable,
}


# --------------------------------------------------------------------------- results


class ReservedIP(msgspec.Struct, frozen=True, kw_only=True):
    """A reserved IP as read now. `droplet_id` is None when it is not assigned.

    `locked` is None for a reserved IPv6: its object has no such field (an action in
    progress shows only as a 422 on the next POST, or in `/v2/actions/{id}`).
    """

    ip: str
    droplet_id: int | None
    region: str
    locked: bool | None
    http_status: int = 200


class Action(msgspec.Struct, frozen=True, kw_only=True):
    """An API action (assign/unassign); poll it until `status` is not `in-progress`.

    `status` is usually one of `ActionStatus`, but may be a word the spec does not list.
    """

    id: int
    status: str
    type: str
    started_at: str | None = None
    completed_at: str | None = None
    resource_id: int | None = None
    region: str | None = None
    http_status: int = 200

    @property
    def done(self) -> bool:
        return self.status != "in-progress"


# Wire shapes (only the fields we use; unknown fields are ignored, missing ones are errors).


class _RegionWire(msgspec.Struct):
    slug: str


class _DropletWire(msgspec.Struct):
    id: int


class _ReservedIPWire(msgspec.Struct):
    ip: str
    region: _RegionWire
    droplet: _DropletWire | None
    locked: bool


class _MaybeDropletWire(msgspec.Struct):
    # The spec's "null" alternative for an unassigned IPv6 is an object type marked
    # nullable: an empty object is read as "no droplet" rather than refused.
    id: int | None = None


class _ReservedIPv6Wire(msgspec.Struct):
    ip: str
    region_slug: str
    droplet: _MaybeDropletWire | None = None


class _ReservedIPv6Envelope(msgspec.Struct):
    reserved_ipv6: _ReservedIPv6Wire


class _ReservedIPEnvelope(msgspec.Struct):
    reserved_ip: _ReservedIPWire | msgspec.UnsetType = msgspec.UNSET
    floating_ip: _ReservedIPWire | msgspec.UnsetType = msgspec.UNSET


class _Pages(msgspec.Struct):
    next: str | None = None


class _Links(msgspec.Struct):
    pages: _Pages | None = None


class _ReservedIPListEnvelope(msgspec.Struct):
    reserved_ips: list[_ReservedIPWire] | msgspec.UnsetType = msgspec.UNSET
    floating_ips: list[_ReservedIPWire] | msgspec.UnsetType = msgspec.UNSET
    links: _Links | None = None


class _ActionWire(msgspec.Struct):
    id: int
    status: _StatusWire
    type: str
    started_at: str | None = None
    completed_at: str | None = None
    resource_id: int | None = None
    region_slug: str | None = None


class _ActionEnvelope(msgspec.Struct):
    action: _ActionWire


class _ErrorBody(msgspec.Struct):
    id: str
    message: str
    request_id: str | None = None


class _AssignRequest(msgspec.Struct, tag_field="type", tag="assign"):
    droplet_id: int


class _UnassignRequest(msgspec.Struct, tag_field="type", tag="unassign"):
    pass


_T = TypeVar("_T")

ResponseObserver = Callable[[str, str, str], None]
"""`on_response(method, path_template, status)`: status is the code as text, or `network_error`."""


class _Answer(NamedTuple):
    status: int
    body: bytes
    headers: httpx.Headers


# --------------------------------------------------------------------------- the client


def _ssl_context(ca_file: str) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"ca_file {ca_file!r}: cannot load CA bundle ({exc})") from None


class DigitalOceanClient:
    """Typed, trio-native access to the reserved-IP API and the droplet metadata service.

    Use it as `async with DigitalOceanClient(settings, token) as client:` or call
    `aclose()`; `token` is an `APIToken`, or a `TokenSource` whose current token each
    request carries (so a refreshed token is used from the next request on). `transport`
    replaces the network (an `httpx.ASGITransport` over the emulator, or an
    `httpx.MockTransport`); it also serves metadata unless
    `metadata_transport` is given. `on_response` is told about every request.
    `wall_clock` (epoch seconds) turns `ratelimit-reset` into a delay.

    Every method raises only `ProviderError` subclasses (and `ValueError` for an invalid
    argument, a programming error). Cancellation is immediate: requests run on trio.
    """

    def __init__(
        self,
        settings: DigitalOceanSettings,
        token: APIToken | TokenSource,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        metadata_transport: httpx.AsyncBaseTransport | None = None,
        on_response: ResponseObserver | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(token, APIToken | TokenSource):
            raise TypeError("token must be an APIToken or a TokenSource (see load_token)")
        if settings.token_is_exposed():
            if not settings.allow_insecure_http:  # settings validate this too; be certain
                raise ValueError("api_url: refusing to send the API token over plain http")
            logger.warning(
                "sending the DigitalOcean token over plain http (allow_insecure_http is set)",
                extra={"api_url": settings.api_url},
            )
        self._settings = settings
        self._tokens = token if isinstance(token, TokenSource) else _FixedToken(token)
        self._on_response = on_response
        self._wall_clock = wall_clock
        collection = "reserved_ips" if settings.api_flavor == "reserved_ip" else "floating_ips"
        self._collection = collection
        self._metadata_key = settings.api_flavor
        verify: ssl.SSLContext | bool = (
            _ssl_context(settings.ca_file) if settings.ca_file is not None else True
        )
        self._api = httpx.AsyncClient(
            base_url=settings.api_url.rstrip("/"),
            auth=_BearerAuth(self._tokens),
            # identity: a compressed body could expand far past max_response_bytes per chunk
            headers={
                "Accept": "application/json",
                "Accept-Encoding": "identity",
                "User-Agent": "fip-sidecar",
            },
            timeout=settings.request_timeout,
            verify=verify,
            transport=transport,
            follow_redirects=False,
            trust_env=False,
        )
        self._metadata = httpx.AsyncClient(
            base_url=settings.metadata_url.rstrip("/"),
            headers={"Accept-Encoding": "identity", "User-Agent": "fip-sidecar"},
            timeout=settings.request_timeout,
            transport=metadata_transport if metadata_transport is not None else transport,
            follow_redirects=False,
            trust_env=False,
        )

    def __repr__(self) -> str:
        return (
            f"DigitalOceanClient(api_url={self._settings.api_url!r}, "
            f"api_flavor={self._settings.api_flavor!r})"
        )

    async def __aenter__(self) -> DigitalOceanClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self._api.aclose()
            await self._metadata.aclose()

    # ------------------------------------------------------------------ reserved IPs

    async def get_reserved_ip(self, ip: str) -> ReservedIP:
        """Read one reserved IP: its holder (droplet id or None), region and lock."""
        endpoint = f"GET /v2/{self._collection}/{{ip}}"
        answer = await self._call(self._api, "GET", f"/v2/{self._collection}/{_ip(ip)}", endpoint)
        envelope = self._decode(answer.body, _ReservedIPEnvelope, endpoint, answer.status)
        wire = getattr(envelope, self._metadata_key)
        if wire is msgspec.UNSET:
            raise MalformedResponse(
                f"the answer has no {self._metadata_key!r} object",
                endpoint=endpoint,
                status=answer.status,
            )
        return _reserved_ip(wire, answer.status)

    async def list_reserved_ips(self) -> list[ReservedIP]:
        """All reserved IPs of the account (follows pagination, at most 50 pages of 200)."""
        endpoint = f"GET /v2/{self._collection}"
        result: list[ReservedIP] = []
        for page in range(1, _MAX_PAGES + 1):
            answer = await self._call(
                self._api,
                "GET",
                f"/v2/{self._collection}",
                endpoint,
                params={"per_page": 200, "page": page},
            )
            envelope = self._decode(answer.body, _ReservedIPListEnvelope, endpoint, answer.status)
            items = getattr(envelope, self._collection)
            if items is msgspec.UNSET:
                raise MalformedResponse(
                    f"the answer has no {self._collection!r} list",
                    endpoint=endpoint,
                    status=answer.status,
                )
            result.extend(_reserved_ip(item, answer.status) for item in items)
            links = envelope.links
            if links is None or links.pages is None or not links.pages.next or not items:
                return result
        raise MalformedResponse(
            f"more than {_MAX_PAGES} pages of reserved IPs", endpoint=endpoint, status=None
        )

    async def assign(self, ip: str, droplet_id: int) -> Action:
        """Start moving `ip` to `droplet_id` (no unassign needed first); returns the action."""
        if droplet_id <= 0:
            raise ValueError("droplet_id must be a positive integer")
        return await self._post_action(ip, _AssignRequest(droplet_id=droplet_id))

    async def unassign(self, ip: str) -> Action:
        """Start detaching `ip` from whatever droplet holds it; returns the action."""
        return await self._post_action(ip, _UnassignRequest())

    # ------------------------------------------------------------------ reserved IPv6

    async def get_reserved_ipv6(self, ip: str) -> ReservedIP:
        """Read one reserved IPv6: its holder and region (`locked` is None: no such field)."""
        endpoint = "GET /v2/reserved_ipv6/{ip}"
        answer = await self._call(self._api, "GET", f"/v2/reserved_ipv6/{_ipv6(ip)}", endpoint)
        wire = self._decode(answer.body, _ReservedIPv6Envelope, endpoint, answer.status)
        found = wire.reserved_ipv6
        return ReservedIP(
            ip=found.ip,
            droplet_id=None if found.droplet is None else found.droplet.id,
            region=found.region_slug,
            locked=None,
            http_status=answer.status,
        )

    async def assign_ipv6(self, ip: str, droplet_id: int) -> Action:
        """Start moving a reserved IPv6 to `droplet_id`; follow it with `get_action`."""
        if droplet_id <= 0:
            raise ValueError("droplet_id must be a positive integer")
        return await self._post_ipv6_action(ip, _AssignRequest(droplet_id=droplet_id))

    async def unassign_ipv6(self, ip: str) -> Action:
        """Start detaching a reserved IPv6 from its droplet."""
        return await self._post_ipv6_action(ip, _UnassignRequest())

    async def _post_ipv6_action(
        self, ip: str, request: _AssignRequest | _UnassignRequest
    ) -> Action:
        endpoint = "POST /v2/reserved_ipv6/{ip}/actions"
        path = f"/v2/reserved_ipv6/{_ipv6(ip)}/actions"
        answer = await self._call(
            self._api, "POST", path, endpoint, content=msgspec.json.encode(request)
        )
        return _action(
            self._decode(answer.body, _ActionEnvelope, endpoint, answer.status).action,
            answer.status,
        )

    # ------------------------------------------------------------------ actions

    async def get_ip_action(self, ip: str, action_id: int, *, fallback: bool = True) -> Action:
        """Read an action through the IP's actions; on 404, try `/v2/actions/{id}` if `fallback`.

        Callers that budget their requests pass `fallback=False` and call `get_action`
        themselves, since the fallback is a second request.
        """
        endpoint = f"GET /v2/{self._collection}/{{ip}}/actions/{{action_id}}"
        path = f"/v2/{self._collection}/{_ip(ip)}/actions/{_positive(action_id)}"
        try:
            answer = await self._call(self._api, "GET", path, endpoint)
        except NotFound:
            if not fallback:
                raise
            return await self.get_action(action_id)
        return _action(
            self._decode(answer.body, _ActionEnvelope, endpoint, answer.status).action,
            answer.status,
        )

    async def get_action(self, action_id: int) -> Action:
        """Read any action by id (`/v2/actions/{id}`)."""
        endpoint = "GET /v2/actions/{action_id}"
        path = f"/v2/actions/{_positive(action_id)}"
        answer = await self._call(self._api, "GET", path, endpoint)
        return _action(
            self._decode(answer.body, _ActionEnvelope, endpoint, answer.status).action,
            answer.status,
        )

    async def _post_action(self, ip: str, request: _AssignRequest | _UnassignRequest) -> Action:
        endpoint = f"POST /v2/{self._collection}/{{ip}}/actions"
        path = f"/v2/{self._collection}/{_ip(ip)}/actions"
        answer = await self._call(
            self._api, "POST", path, endpoint, content=msgspec.json.encode(request)
        )
        return _action(
            self._decode(answer.body, _ActionEnvelope, endpoint, answer.status).action,
            answer.status,
        )

    # ------------------------------------------------------------------ metadata

    async def metadata_droplet_id(self) -> int:
        """This droplet's id, from `/metadata/v1/id`."""
        text, endpoint, status = await self._metadata_text("/metadata/v1/id")
        if not text.isdigit() or len(text) > 19 or int(text) <= 0:
            raise MalformedResponse(
                "the droplet id is not a positive integer", endpoint=endpoint, status=status
            )
        return int(text)

    async def metadata_region(self) -> str:
        """This droplet's region slug, from `/metadata/v1/region`."""
        text, endpoint, status = await self._metadata_text("/metadata/v1/region")
        if not _REGION_PATTERN.fullmatch(text):
            raise MalformedResponse(
                "the region is not a region slug", endpoint=endpoint, status=status
            )
        return text

    async def metadata_reserved_ip_active(self) -> bool:
        """Whether the metadata service says a reserved IP is attached to this droplet."""
        text, endpoint, status = await self._metadata_text(
            f"/metadata/v1/{self._metadata_key}/ipv4/active"
        )
        if text not in ("true", "false"):
            raise MalformedResponse("expected 'true' or 'false'", endpoint=endpoint, status=status)
        return text == "true"

    async def _metadata_text(self, path: str) -> tuple[str, str, int]:
        endpoint = f"GET {path}"
        answer = await self._call(self._metadata, "GET", path, endpoint)
        try:
            return answer.body.decode("ascii").strip(), endpoint, answer.status
        except UnicodeDecodeError:
            raise MalformedResponse(
                "not ASCII text", endpoint=endpoint, status=answer.status
            ) from None

    # ------------------------------------------------------------------ plumbing

    async def _call(
        self,
        client: httpx.AsyncClient,
        method: str,
        path: str,
        endpoint: str,
        *,
        params: dict[str, int] | None = None,
        content: bytes | None = None,
    ) -> _Answer:
        """One request, body included, within `request_timeout`; errors become ProviderErrors."""
        label = NO_RESPONSE
        headers = {"Content-Type": "application/json"} if content is not None else None
        try:
            with trio.fail_after(self._settings.request_timeout):
                async with client.stream(
                    method, path, params=params, content=content, headers=headers
                ) as response:
                    label = str(response.status_code)
                    body = await self._read_capped(response, endpoint)
                    answer = _Answer(response.status_code, body, response.headers)
        except trio.TooSlowError:
            raise NetworkError(
                f"no complete answer within {self._settings.request_timeout:g} s",
                endpoint=endpoint,
                status=None if label == NO_RESPONSE else int(label),
            ) from None
        except httpx.TimeoutException as exc:
            raise NetworkError(
                f"timed out ({type(exc).__name__})",
                endpoint=endpoint,
                status=None if label == NO_RESPONSE else int(label),
            ) from None
        except httpx.DecodingError:
            raise MalformedResponse(
                "the body's content encoding is invalid", endpoint=endpoint, status=int(label)
            ) from None
        except httpx.HTTPError as exc:
            raise NetworkError(
                f"{type(exc).__name__}: {self._scrub(str(exc)) or 'no detail'}",
                endpoint=endpoint,
                status=None if label == NO_RESPONSE else int(label),
            ) from None
        except OSError as exc:  # a transport that lets a raw socket error through
            raise NetworkError(
                f"{type(exc).__name__}: {exc.strerror or 'no detail'}", endpoint=endpoint
            ) from None
        finally:
            if self._on_response is not None:
                self._on_response(method, endpoint.split(" ", 1)[1], label)
        if 200 <= answer.status < 300:
            return answer
        raise self._error(answer, endpoint)

    async def _read_capped(self, response: httpx.Response, endpoint: str) -> bytes:
        limit = self._settings.max_response_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise MalformedResponse(
                f"the body is {declared} bytes, over the {limit}-byte limit",
                endpoint=endpoint,
                status=response.status_code,
            )
        chunks: list[bytes] = []
        size = 0
        stream: AsyncIterator[bytes] = response.aiter_bytes()
        async for chunk in stream:
            size += len(chunk)
            if size > limit:
                raise MalformedResponse(
                    f"the body is over the {limit}-byte limit",
                    endpoint=endpoint,
                    status=response.status_code,
                )
            chunks.append(chunk)
        return b"".join(chunks)

    def _decode(self, body: bytes, kind: type[_T], endpoint: str, status: int) -> _T:
        try:
            return msgspec.json.decode(body, type=kind, strict=True)
        except RecursionError:  # msgspec on absurdly deep nesting
            raise MalformedResponse(
                "unexpected answer: nested too deeply", endpoint=endpoint, status=status
            ) from None
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            # msgspec's messages name the path and the expected type, not the data.
            raise MalformedResponse(
                f"unexpected answer: {self._scrub(str(exc))}", endpoint=endpoint, status=status
            ) from None

    def _error(self, answer: _Answer, endpoint: str) -> ProviderError:
        api_id = request_id = None
        message = f"HTTP {answer.status}"
        try:
            body = msgspec.json.decode(answer.body, type=_ErrorBody)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            pass
        else:
            api_id, request_id = self._scrub(body.id), self._scrub(body.request_id or "") or None
            message = f"{api_id}: {self._scrub(body.message)}"
        request_id = request_id or self._scrub(answer.headers.get("x-request-id", "")) or None
        common: dict[str, Any] = {
            "endpoint": endpoint,
            "status": answer.status,
            "api_id": api_id,
            "request_id": request_id,
        }
        if answer.status == 429:
            retry_after, reset_at = self._rate_limit_delay(answer.headers)
            return RateLimited(message, retry_after=retry_after, reset_at=reset_at, **common)
        if answer.status >= 500:
            return ServerError(message, **common)
        error_type = _STATUS_ERRORS.get(answer.status, UnexpectedStatus)
        return error_type(message, **common)

    def _rate_limit_delay(self, headers: httpx.Headers) -> tuple[float | None, float | None]:
        """(seconds to wait, reset epoch) from `Retry-After` and `ratelimit-reset`."""
        now = self._wall_clock()
        reset_at: float | None = None
        raw_reset = headers.get("ratelimit-reset", "").strip()
        if raw_reset.isdigit() and len(raw_reset) <= 12:
            reset_at = float(raw_reset)
        retry_after: float | None = None
        raw_retry = headers.get("retry-after", "").strip()
        if raw_retry.isdigit() and len(raw_retry) <= 9:
            retry_after = float(raw_retry)
        elif raw_retry:
            try:
                when = email.utils.parsedate_to_datetime(raw_retry)
            except (TypeError, ValueError, IndexError):
                when = None
            if when is not None and when.tzinfo is not None:
                retry_after = max(0.0, when.timestamp() - now)
        if retry_after is None and reset_at is not None:
            retry_after = max(0.0, reset_at - now)
        return retry_after, reset_at

    def _scrub(self, text: str) -> str:
        """Cut server-supplied text to size, drop control characters, and mask the token."""
        for token in self._tokens.secrets():
            text = text.replace(token.reveal(), "<redacted>")
        text = "".join(ch if ch.isprintable() else " " for ch in text[: _MAX_MESSAGE_CHARS * 2])
        return text[:_MAX_MESSAGE_CHARS]


def _ip(value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ValueError(f"not an IPv4 address: {value!r}") from None


def _ipv6(value: str) -> str:
    try:
        return ipaddress.IPv6Address(value).compressed
    except ValueError:
        raise ValueError(f"not an IPv6 address: {value!r}") from None


def _positive(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"not a positive integer id: {value!r}")
    return value


def _reserved_ip(wire: _ReservedIPWire, status: int) -> ReservedIP:
    return ReservedIP(
        ip=wire.ip,
        droplet_id=None if wire.droplet is None else wire.droplet.id,
        region=wire.region.slug,
        locked=wire.locked,
        http_status=status,
    )


def _action(wire: _ActionWire, status: int) -> Action:
    return Action(
        id=wire.id,
        status=wire.status,
        type=wire.type,
        started_at=wire.started_at,
        completed_at=wire.completed_at,
        resource_id=wire.resource_id,
        region=wire.region_slug,
        http_status=status,
    )


# --------------------------------------------------------------------------- the seam

_R = TypeVar("_R", ReservedIP, Action)


def _translate(exc: ProviderError) -> base.ProviderError:
    """This module's error as the assigner's vocabulary (`providers.base`) names it."""
    common: dict[str, Any] = {
        "endpoint": exc.endpoint,
        "status": exc.status,
        "origin": type(exc).__name__,
    }
    message = exc.message
    if isinstance(exc, Unauthorized):
        return base.Rejected(message, **common)
    if isinstance(exc, NotFound):
        return base.NotFound(message, **common)
    if isinstance(exc, Unprocessable):
        return base.Busy(message, **common)
    if isinstance(exc, RateLimited):
        return base.RateLimited(message, retry_after=exc.retry_after, **common)
    return base.Unavailable(message, **common)


class ReservedAddressCalls(Protocol):
    """The `DigitalOceanClient` calls the provider makes: the client itself, or a stand-in
    that builds it on first use (`sidecar.ondemand.OnDemandClient`)."""

    async def get_reserved_ip(self, ip: str) -> ReservedIP: ...
    async def get_reserved_ipv6(self, ip: str) -> ReservedIP: ...
    async def assign(self, ip: str, droplet_id: int) -> Action: ...
    async def assign_ipv6(self, ip: str, droplet_id: int) -> Action: ...
    async def get_ip_action(self, ip: str, action_id: int, *, fallback: bool = True) -> Action: ...
    async def get_action(self, action_id: int) -> Action: ...


class DigitalOceanProvider:
    """`providers.base.Provider` over a `DigitalOceanClient`, for both address families.

    A reserved IPv4 has a `locked` flag and its own actions endpoint; an action that
    endpoint does not know yet (404) is read once more through `/v2/actions/{id}`. A
    reserved IPv6 has neither: it is read without a lock (`locked` None) and its actions
    are followed through `/v2/actions/{id}` alone (scope `actions:read`).
    """

    def __init__(self, client: ReservedAddressCalls) -> None:
        self._client = client

    def __repr__(self) -> str:
        return f"DigitalOceanProvider({self._client!r})"

    async def read(self, address: str, hooks: base.RequestHooks) -> base.Holding:
        client = self._client
        if _is_ipv6(address):
            found = await _send(
                hooks, "get_reserved_ipv6", lambda: client.get_reserved_ipv6(address)
            )
        else:
            found = await _send(hooks, "get_reserved_ip", lambda: client.get_reserved_ip(address))
        return base.Holding(
            address=found.ip,
            droplet_id=found.droplet_id,
            locked=found.locked,
            http_status=found.http_status,
        )

    async def assign(
        self, address: str, droplet_id: int, hooks: base.RequestHooks
    ) -> base.Operation:
        client = self._client
        if _is_ipv6(address):
            action = await _send(
                hooks, "assign_ipv6", lambda: client.assign_ipv6(address, droplet_id)
            )
        else:
            action = await _send(hooks, "assign", lambda: client.assign(address, droplet_id))
        return _operation(action)

    async def follow(
        self, address: str, operation: base.Operation, hooks: base.RequestHooks
    ) -> base.Operation:
        client = self._client
        if _is_ipv6(address):
            action = await _send(hooks, "get_action", lambda: client.get_action(operation.id))
            return _operation(action)
        try:
            action = await _send(
                hooks,
                "get_ip_action",
                lambda: client.get_ip_action(address, operation.id, fallback=False),
            )
        except base.NotFound:
            action = await _send(hooks, "get_action", lambda: client.get_action(operation.id))
        return _operation(action)


def _is_ipv6(address: str) -> bool:
    return ":" in address


async def _send(hooks: base.RequestHooks, endpoint: str, call: Callable[[], Awaitable[_R]]) -> _R:
    """One request: announced before and after, its error translated at this boundary."""
    await hooks.before()
    try:
        result = await call()
    except ProviderError as exc:
        hooks.after(endpoint, exc.status_label)
        raise _translate(exc) from None
    hooks.after(endpoint, str(result.http_status))
    return result


def _operation(action: Action) -> base.Operation:
    return base.Operation(id=action.id, status=action.status, http_status=action.http_status)
