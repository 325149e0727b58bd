"""Serving the emulator (and optionally the edge) with hypercorn on trio."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from .app import build_app
from .edge import build_edge_app
from .emulator import Emulator
from .metadata import build_metadata_app
from .state import Family

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsFiles:
    """A certificate chain and its key, for serving the API over https."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class ServingAt:
    """Where the servers listen (the real ports, when port 0 was asked for)."""

    api_url: str
    edge_url: str | None
    metadata_url: str | None = None
    edge6_url: str | None = None


def hypercorn_config(listen: str, tls: TlsFiles | None) -> Config:
    config = Config()
    config.bind = [listen]
    config.accesslog = None
    config.errorlog = logger
    if tls is not None:
        config.certfile = str(tls.cert)
        config.keyfile = str(tls.key)
    return config


async def serve(
    emulator: Emulator,
    *,
    listen: str,
    edge_listen: str | None = None,
    edge6_listen: str | None = None,
    metadata_listen: str | None = None,
    tls: TlsFiles | None = None,
    task_status: trio.TaskStatus[ServingAt] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; `task_status.started` gets the URLs once all listen.

    TLS applies to the API port only: the edge stands for plain traffic to the IP, and
    the metadata service is plain http on the platform too.
    """
    async with (
        httpx.AsyncClient(trust_env=False, follow_redirects=False) as client,
        trio.open_nursery() as nursery,
    ):
        api_binds: list[str] = await nursery.start(
            hypercorn_serve, build_app(emulator), hypercorn_config(listen, tls)
        )
        edges: dict[Family, str] = {}
        wanted: tuple[tuple[Family, str | None], ...] = (
            ("ipv4", edge_listen),
            ("ipv6", edge6_listen),
        )
        for family, edge_at in wanted:
            if edge_at is None:
                continue
            edge_config = hypercorn_config(edge_at, None)
            # The edge passes on the web service's own `date` and `server` headers.
            edge_config.include_date_header = False
            edge_config.include_server_header = False
            edge_binds: list[str] = await nursery.start(
                hypercorn_serve, build_edge_app(emulator, client, family), edge_config
            )
            edges[family] = edge_binds[0]
        metadata_url = None
        if metadata_listen is not None:
            metadata_binds: list[str] = await nursery.start(
                hypercorn_serve,
                build_metadata_app(emulator),
                hypercorn_config(metadata_listen, None),
            )
            metadata_url = metadata_binds[0]
        task_status.started(
            ServingAt(api_binds[0], edges.get("ipv4"), metadata_url, edges.get("ipv6"))
        )
