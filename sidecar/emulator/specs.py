"""Droplets as an operator describes them: one JSON shape for the CLI and the admin API.

`fip-sidecar emulate --droplet '{"id": 1001, "region": "nyc3", "tags": ["web"], ...}'` and
`POST /_emulator/droplets` take the same object, so a test can start an account and later
replace a droplet (a new address after a rebuild) or add one, with the same words. Kept
apart from the web framework: the CLI parses it before anything heavy is imported.
"""

from __future__ import annotations

import msgspec

from .state import AccountState, Droplet


class DropletSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """A droplet: id and region, and optionally what the API shows about it.

    `boot_seconds` > 0 makes it boot first: status `new`, no addresses yet, and a
    `create` event that makes assigning a reserved IP to it a 422 until it ends.
    `ipv6` is whether IPv6 is enabled (only then can it take a reserved IPv6).
    """

    id: int
    region: str
    web_url: str | None = None
    name: str = ""
    tags: list[str] = []
    public_ipv4: str | None = None
    private_ipv4: str | None = None
    boot_seconds: float = 0.0
    ipv6: bool = True

    def add_to(self, state: AccountState, *, replace: bool = False) -> Droplet:
        """Add the droplet (or replace the one with this id); ValueError names the key."""
        if not self.region:
            raise ValueError(f"droplet {self.id}: region must not be empty")
        for tag in self.tags:
            if not tag or len(tag) > 255:
                raise ValueError(f"droplet {self.id}: tags must be 1 to 255 characters")
        return state.add_droplet(
            self.id,
            self.region,
            self.web_url,
            name=self.name,
            tags=tuple(self.tags),
            public_ipv4=self.public_ipv4,
            private_ipv4=self.private_ipv4,
            boot_seconds=self.boot_seconds,
            replace=replace,
            ipv6=self.ipv6,
        )


def decode_droplet(raw: str | bytes) -> DropletSpec:
    """A DropletSpec from JSON; ValueError with msgspec's message (it names the field)."""
    try:
        return msgspec.json.decode(raw, type=DropletSpec)
    except (msgspec.ValidationError, msgspec.DecodeError) as error:
        raise ValueError(f"droplet: {error}") from None
