"""The provider's client, built the first time the assigner calls it: when this node leads.

Every member with an address runs its assigners (any of them may come to lead), but only
the leader ever calls the API. A `DigitalOceanClient` holds two httpx clients (API and
metadata), each with its own TLS context and CA bundle: about 1.4 MiB of RSS (measured)
that a follower would carry for nothing. So the provider gets this stand-in, which builds
the real client on its first call and keeps it from then on; a follower never builds it.

`build_client` also spares the CA bundle where a URL is plain http (the metadata service
always, the emulator on loopback): no redirect is ever followed, so such a client never
meets https, and each bundle loaded costs ~1 MiB.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx

from sidecar.providers.digitalocean import (
    Action,
    DigitalOceanClient,
    DigitalOceanSettings,
    ProviderError,
    ReservedIP,
    TokenSource,
)

log = logging.getLogger(__name__)


def _plain_http_transport(url: str) -> httpx.AsyncHTTPTransport | None:
    """For an http URL, a transport whose TLS context trusts nothing (https fails closed)
    instead of loading the CA bundle; None for https (the client's own default)."""
    if urlsplit(url).scheme != "http":
        return None
    return httpx.AsyncHTTPTransport(verify=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), trust_env=False)


def build_client(settings: DigitalOceanSettings, tokens: TokenSource) -> DigitalOceanClient:
    """A `DigitalOceanClient` that loads a CA bundle only for an https URL."""
    api = _plain_http_transport(settings.api_url)
    metadata = _plain_http_transport(settings.metadata_url)
    if api is not None and metadata is None:
        # The API transport would serve metadata too: give https metadata the default one.
        metadata = httpx.AsyncHTTPTransport(trust_env=False)
    return DigitalOceanClient(settings, tokens, transport=api, metadata_transport=metadata)


class OnDemandClient:
    """The `DigitalOceanClient` calls `DigitalOceanProvider` makes, forwarded to a client
    `build()` makes on first use. Use it as an async context manager: leaving closes the
    client, if built.

    A client that cannot be built (a `ca_file` that became unreadable since start-up,
    where the service checks it) raises `ProviderError`, which the assigner logs and backs
    off from like any failed request, instead of ending the node.
    """

    def __init__(self, build: Callable[[], DigitalOceanClient]) -> None:
        self._build = build
        self._client: DigitalOceanClient | None = None

    def _get(self) -> DigitalOceanClient:
        if self._client is None:
            try:
                self._client = self._build()
            except ValueError as exc:
                raise ProviderError(
                    f"cannot set up the API client: {exc}", endpoint="client set-up"
                ) from None
            log.info("DigitalOcean API client built", extra={"event": "api_client_built"})
        return self._client

    async def get_reserved_ip(self, ip: str) -> ReservedIP:
        return await self._get().get_reserved_ip(ip)

    async def get_reserved_ipv6(self, ip: str) -> ReservedIP:
        return await self._get().get_reserved_ipv6(ip)

    async def assign(self, ip: str, droplet_id: int) -> Action:
        return await self._get().assign(ip, droplet_id)

    async def assign_ipv6(self, ip: str, droplet_id: int) -> Action:
        return await self._get().assign_ipv6(ip, droplet_id)

    async def get_ip_action(self, ip: str, action_id: int, *, fallback: bool = True) -> Action:
        return await self._get().get_ip_action(ip, action_id, fallback=fallback)

    async def get_action(self, action_id: int) -> Action:
        return await self._get().get_action(action_id)

    async def __aenter__(self) -> OnDemandClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()
