"""The provider's client, built the first time the assigner calls it: when this node leads.

Every member with a `[floating_ip]` runs an assigner (any of them may come to lead), but
only the leader ever calls the API. A `DigitalOceanClient` holds two httpx clients, each
with its own TLS context and CA bundle: about 1.4 MiB of RSS (measured) that a follower
would carry for nothing. So the assigner gets this stand-in, which builds the real client
on its first call and keeps it from then on; a follower never builds it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sidecar.digitalocean import Action, DigitalOceanClient, ProviderError, ReservedIP

log = logging.getLogger(__name__)


class OnDemandProvider:
    """The `assigner.ReservedIPProvider` calls, forwarded to a client `build()` makes on
    first use. Use it as an async context manager: leaving closes the client, if built.

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

    async def assign(self, ip: str, droplet_id: int) -> Action:
        return await self._get().assign(ip, droplet_id)

    async def get_ip_action(self, ip: str, action_id: int, *, fallback: bool = True) -> Action:
        return await self._get().get_ip_action(ip, action_id, fallback=fallback)

    async def get_action(self, action_id: int) -> Action:
        return await self._get().get_action(action_id)

    async def __aenter__(self) -> OnDemandProvider:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()
