"""The emulator's HTTP face: API, metadata service and admin endpoints on one port."""

from __future__ import annotations

from starlette.applications import Starlette

from .admin import admin_routes
from .api import api_routes
from .emulator import Emulator
from .metadata import metadata_routes


def build_app(emulator: Emulator) -> Starlette:
    """An ASGI app over `emulator`; serve it with hypercorn or drive it with httpx."""
    return Starlette(
        routes=[*api_routes(emulator), *metadata_routes(emulator), *admin_routes(emulator)]
    )
