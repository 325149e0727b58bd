"""One typed configuration from a TOML file, `FIP_SIDECAR_*` environment variables and flags.

Every mistake becomes one `ConfigError` whose message names the key (as a dotted path such
as `peers[1].address`) and says how to fix it, because an HA tool that starts with a wrong
config is worse than one that refuses to start. msgspec does the typing and rejects unknown
keys; this module adds the cross-field rules msgspec cannot know (unique peers, quorum,
timing relations) and the precedence: flags > environment > file > profile defaults.

One rule for every path in a config (`cluster_key_file`, `digitalocean.token_file`,
`digitalocean.ca_file`, and the program of `health.command` and of each hook when it
contains a `/`): a relative path is relative to the directory of the config file, never
to the working directory, so a node finds the same files whoever starts it from where.
A bare program name (no `/`) is looked up in `PATH`, as a shell would.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec

from sidecar.assigner import AssignerSettings
from sidecar.election import Member, Timing
from sidecar.health import HealthSettings
from sidecar.hooks import HOOK_KEYS, HookSettings
from sidecar.protocol import membership_digest, parse_cluster_key
from sidecar.providers.base import Family
from sidecar.providers.digitalocean import DigitalOceanSettings

ENV_PREFIX = "FIP_SIDECAR_"

#: Timing profiles, like memberlist's LAN/WAN configs. Each field's trade-off is in the README.
PROFILES: dict[str, Timing] = {
    # ~0.7 s from a crash to a new leader; tolerates single lost packets and 100 ms of jitter.
    "lan": Timing(
        heartbeat_interval=0.1,
        peer_timeout=0.5,
        lease_timeout=0.6,
        max_drift=0.1,
        vote_retry_interval=0.025,
        election_round=0.3,
        preempt=True,
        preempt_delay=30.0,
        startup_grace=1.5,
    ),
    # Half the lan timings: ~0.35 s failover, like keepalived at a 0.1 s advert interval,
    # for twice the packets and idle CPU. Still rides out five lost heartbeats in a row.
    "fast": Timing(
        heartbeat_interval=0.05,
        peer_timeout=0.25,
        lease_timeout=0.3,
        max_drift=0.1,
        vote_retry_interval=0.0125,
        election_round=0.15,
        preempt=True,
        preempt_delay=30.0,
        startup_grace=1.5,
    ),
    # For members spread over regions with lossy, slow links: ~3.5 s failover, far fewer packets.
    "wan": Timing(
        heartbeat_interval=0.5,
        peer_timeout=2.5,
        lease_timeout=3.0,
        max_drift=0.1,
        vote_retry_interval=0.125,
        election_round=1.5,
        preempt=True,
        preempt_delay=60.0,
        startup_grace=6.0,
    ),
}


class ConfigError(Exception):
    """A configuration mistake; the message names the key and the fix, on one line."""


class PeerSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    id: int
    address: str
    eligible: bool = True
    #: A membership change is being rolled out: this member is in the new membership only
    #: (`joining`) or in the old one only (`leaving`). See the README: Changing membership.
    joining: bool = False
    leaving: bool = False


class TimingOverrides(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """Any field set here replaces the profile's value."""

    heartbeat_interval: float | None = None
    peer_timeout: float | None = None
    lease_timeout: float | None = None
    max_drift: float | None = None
    vote_retry_interval: float | None = None
    election_round: float | None = None
    preempt: bool | None = None
    preempt_delay: float | None = None
    startup_grace: float | None = None


class FloatingIpSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    address: str
    droplet_id: int | None = None  # None: ask the metadata service


class AddressSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """One `[[addresses]]` entry: a reserved IPv4 or IPv6 address the leader holds."""

    address: str


@dataclass(frozen=True)
class ManagedAddress:
    """A reserved address as the runtime uses it: normalised text and its family."""

    address: str
    family: Family


class FileSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """The file's shape, exactly as an operator writes it."""

    node_id: int
    bind: str
    peers: list[PeerSettings]
    #: Part of the membership digest: two clusters that share a key never mix.
    cluster_name: str = "fip-sidecar"
    joining: bool = False
    leaving: bool = False
    status_listen: str = "127.0.0.1:9401"
    cluster_key_file: str | None = None
    eligible: bool = True
    profile: Literal["lan", "fast", "wan"] = "lan"
    timing: TimingOverrides = msgspec.field(default_factory=TimingOverrides)
    max_clock_skew: float = 60.0
    #: Refuse a membership whose eligible members alone cannot form a quorum (so losing
    #: the witness would stop every election).
    require_eligible_quorum: bool = False
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    floating_ip: FloatingIpSettings | None = None
    reserved_ip: FloatingIpSettings | None = None  # the API's newer name; same meaning
    #: Several addresses (IPv4 and/or IPv6), instead of one `[floating_ip]`.
    addresses: list[AddressSettings] | None = None
    #: This droplet's id for `[[addresses]]` (None: ask the metadata service).
    droplet_id: int | None = None
    digitalocean: DigitalOceanSettings = msgspec.field(default_factory=DigitalOceanSettings)
    assigner: AssignerSettings = msgspec.field(default_factory=AssignerSettings)
    health: HealthSettings = msgspec.field(default_factory=HealthSettings)
    hooks: HookSettings = msgspec.field(default_factory=HookSettings)


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Config:
    """The validated configuration the runtime uses; secrets already loaded."""

    node_id: int
    bind: Address
    status_listen: Address
    eligible: bool
    peers: tuple[PeerSettings, ...]
    peer_addresses: Mapping[int, Address]
    cluster_key: bytes
    timing: Timing
    profile: str
    max_clock_skew: float
    log_level: str
    #: The first managed address and the droplet id: what the single-address code reads.
    floating_ip: FloatingIpSettings | None
    digitalocean: DigitalOceanSettings
    assigner: AssignerSettings
    health: HealthSettings
    hooks: HookSettings
    source: str
    cluster_name: str = "fip-sidecar"
    #: One membership, or (old, new) while a change is rolled out.
    memberships: tuple[frozenset[int], ...] = ()
    #: The cluster key file as resolved (None when the key came from the environment).
    cluster_key_file: Path | None = None
    #: Every reserved address the leader holds, in config order (the first is `floating_ip`).
    addresses: tuple[ManagedAddress, ...] = ()

    @property
    def members(self) -> list[Member]:
        return [Member(self.node_id, self.eligible)] + [
            Member(p.id, p.eligible) for p in self.peers
        ]

    @property
    def member_list(self) -> tuple[tuple[int, bool], ...]:
        """(id, eligible) of every member listed, sorted: what a mismatched peer is told."""
        return tuple(sorted((m.id, m.eligible) for m in self.members))

    @property
    def membership_digests(self) -> tuple[int, ...]:
        eligible = dict(self.member_list)
        return tuple(
            membership_digest(self.cluster_name, [(i, eligible[i]) for i in members])
            for members in self.memberships
        )

    @property
    def changing_membership(self) -> bool:
        return len(self.memberships) == 2

    @property
    def quorum(self) -> int:
        """The majority of the newest membership (a change also needs the old one's)."""
        return len(self.memberships[-1]) // 2 + 1

    @property
    def quorum_text(self) -> str:
        parts = [f"{len(m) // 2 + 1} of {len(m)}" for m in self.memberships]
        return " and ".join(parts) if len(parts) == 1 else f"{parts[0]} (old) and {parts[1]} (new)"

    def __repr__(self) -> str:  # never show the key
        return f"Config(node_id={self.node_id}, bind={self.bind}, source={self.source!r})"


def parse_address(text: str, key: str) -> Address:
    """`host:port` or `[v6]:port`; the host must be an IP literal or `localhost`."""
    match = re.fullmatch(
        r"\[(?P<v6>[^\]]+)\]:(?P<port>\d+)|(?P<host>[^:\[\]]+):(?P<port4>\d+)", text
    )
    if match is None:
        raise ConfigError(f"{key}: {text!r} is not HOST:PORT (use [ADDR]:PORT for IPv6)")
    host = match["v6"] or match["host"]
    port = int(match["port"] or match["port4"])
    if not 0 < port < 65536:
        raise ConfigError(f"{key}: port {port} is out of range 1-65535")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(f"{key}: {host!r} is not an IP address") from None
    return Address(host, port)


_MSGSPEC_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")


def _describe_validation_error(err: msgspec.ValidationError) -> str:
    """Turn msgspec's message into `key: problem`, with the key as the operator wrote it."""
    text = str(err)
    match = _MSGSPEC_PATH.search(text)
    path = match["path"].lstrip(".") if match else ""
    problem = _MSGSPEC_PATH.sub("", text)
    unknown = re.fullmatch(r"Object contains unknown field `(?P<name>[^`]+)`", problem)
    if unknown:
        key = f"{path}.{unknown['name']}" if path else unknown["name"]
        return f"{key}: unknown key (check the spelling; see the README's configuration reference)"
    missing = re.fullmatch(r"Object missing required field `(?P<name>[^`]+)`", problem)
    if missing:
        key = f"{path}.{missing['name']}" if path else missing["name"]
        return f"{key}: required key is missing"
    return f"{path or '(top level)'}: {problem[0].lower()}{problem[1:]}"


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """`FIP_SIDECAR_NODE_ID=2` sets `node_id`; `FIP_SIDECAR_TIMING__LEASE_TIMEOUT` a nested key.

    Values are read as TOML values when they parse (numbers, booleans, arrays), else as strings.
    """
    result: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CLUSTER_KEY":
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        try:
            value: Any = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        target = result
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = value
    return result


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def resolve_path(base_dir: Path, value: str) -> str:
    """A path from the config: relative ones are relative to the config file's directory."""
    return value if os.path.isabs(value) else str(base_dir / value)


def _resolve_program(base_dir: Path, argv: tuple[str, ...] | None) -> tuple[str, ...] | None:
    if not argv or "/" not in argv[0]:
        return argv  # a bare name is looked up in PATH
    return (resolve_path(base_dir, argv[0]), *argv[1:])


def _resolve_paths(raw: FileSettings, base_dir: Path) -> FileSettings:
    """Apply the one path rule (see the module docstring) to every path in the file."""
    do = raw.digitalocean
    hooks = raw.hooks
    return msgspec.structs.replace(
        raw,
        cluster_key_file=None
        if raw.cluster_key_file is None
        else resolve_path(base_dir, raw.cluster_key_file),
        digitalocean=msgspec.structs.replace(
            do,
            token_file=None if do.token_file is None else resolve_path(base_dir, do.token_file),
            ca_file=None if do.ca_file is None else resolve_path(base_dir, do.ca_file),
        ),
        health=msgspec.structs.replace(
            raw.health, command=_resolve_program(base_dir, raw.health.command)
        ),
        hooks=msgspec.structs.replace(
            hooks,
            **{key: _resolve_program(base_dir, getattr(hooks, key)) for key in HOOK_KEYS},
        ),
    )


def _load_key(raw: FileSettings, env: Mapping[str, str]) -> bytes:
    text = env.get(ENV_PREFIX + "CLUSTER_KEY")
    where = f"environment variable {ENV_PREFIX}CLUSTER_KEY"
    if text is None:
        if raw.cluster_key_file is None:
            raise ConfigError(
                f"cluster_key_file: required (or set {ENV_PREFIX}CLUSTER_KEY); "
                "make one with `fip-sidecar keygen > cluster.key`"
            )
        path = Path(raw.cluster_key_file)  # already resolved by _resolve_paths
        where = f"cluster_key_file {str(path)!r}"
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(
                f"cluster_key_file: cannot read {str(path)!r}: {exc.strerror}"
            ) from None
    try:
        return parse_cluster_key(text)
    except ValueError as exc:
        raise ConfigError(f"cluster_key_file: {where}: {exc}") from None


def _timing(raw: FileSettings) -> Timing:
    overrides = {k: v for k, v in msgspec.structs.asdict(raw.timing).items() if v is not None}
    timing = dataclasses.replace(PROFILES[raw.profile], **overrides)
    problems = timing.problems()
    if problems:
        raise ConfigError("timing." + problems[0])
    return timing


def _check_membership(raw: FileSettings) -> dict[int, Address]:
    seen: dict[int, str] = {raw.node_id: "node_id"}
    addresses: dict[int, Address] = {}
    bind = parse_address(raw.bind, "bind")
    for index, peer in enumerate(raw.peers):
        key = f"peers[{index}]"
        if peer.id in seen:
            raise ConfigError(
                f"{key}.id: {peer.id} is already used by {seen[peer.id]}; ids must be unique"
            )
        seen[peer.id] = f"{key}.id"
        address = parse_address(peer.address, f"{key}.address")
        if address in addresses.values() or address == bind:
            raise ConfigError(
                f"{key}.address: {peer.address} is listed twice; each member needs its own"
            )
        addresses[peer.id] = address
    if not raw.eligible and not any(p.eligible for p in raw.peers):
        raise ConfigError("eligible: no member is eligible, so nobody could ever lead")
    for index, peer in enumerate(raw.peers):
        if peer.joining and peer.leaving:
            raise ConfigError(f"peers[{index}]: a member is joining or leaving, not both")
    if raw.joining and raw.leaving:
        raise ConfigError("joining: this node is joining or leaving, not both")
    members = len(raw.peers) + 1
    eligible = int(raw.eligible) + sum(p.eligible for p in raw.peers)
    if raw.require_eligible_quorum and eligible < members // 2 + 1:
        raise ConfigError(
            f"require_eligible_quorum: only {eligible} of {members} members are eligible, "
            f"fewer than the quorum of {members // 2 + 1}; add eligible members or unset it"
        )
    return addresses


def _memberships(raw: FileSettings) -> tuple[frozenset[int], ...]:
    """The old and new membership of a change in progress, or the one membership."""
    everyone = [(raw.node_id, raw.eligible, raw.joining, raw.leaving)] + [
        (p.id, p.eligible, p.joining, p.leaving) for p in raw.peers
    ]
    old = frozenset(i for i, _, joining, _ in everyone if not joining)
    new = frozenset(i for i, _, _, leaving in everyone if not leaving)
    if not old:
        raise ConfigError("joining: every member is joining; the old membership would be empty")
    if not any(eligible for i, eligible, _, leaving in everyone if not leaving):
        raise ConfigError("leaving: no eligible member would remain after the change")
    return (old,) if old == new else (old, new)


def load(
    path: str | Path,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Read, merge and validate; raise ConfigError with a one-line message on any mistake."""
    env = os.environ if env is None else env
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {str(path)!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config: {str(path)!r} is not valid TOML: {exc}") from None
    data = _merge(_merge(data, _env_overrides(env)), overrides or {})
    try:
        raw = msgspec.convert(data, FileSettings)
    except msgspec.ValidationError as exc:
        raise ConfigError(_describe_validation_error(exc)) from None
    return _validate(raw, path, env)


def _managed_address(text: str, key: str) -> ManagedAddress:
    try:
        parsed = ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(f"{key}: {text!r} is not an IPv4 or IPv6 address") from None
    return ManagedAddress(parsed.compressed, "ipv4" if parsed.version == 4 else "ipv6")


def _addresses(raw: FileSettings) -> tuple[tuple[ManagedAddress, ...], FloatingIpSettings | None]:
    """The managed addresses (either one `[floating_ip]`/`[reserved_ip]` or a list of
    `[[addresses]]`) and the single-address view of them (first address, droplet id)."""
    if raw.floating_ip is not None and raw.reserved_ip is not None:
        raise ConfigError("reserved_ip: give either [floating_ip] or [reserved_ip], not both")
    single = raw.floating_ip or raw.reserved_ip
    section = "floating_ip" if raw.floating_ip else "reserved_ip"
    if single is not None and raw.addresses is not None:
        raise ConfigError(
            f"addresses: give either [{section}] or [[addresses]], not both "
            "(list every address under [[addresses]])"
        )
    if single is not None:
        if raw.droplet_id is not None:
            raise ConfigError(f"droplet_id: with [{section}], set {section}.droplet_id instead")
        managed = _managed_address(single.address, f"{section}.address")
        return (managed,), msgspec.structs.replace(single, address=managed.address)
    if raw.addresses is None:
        if raw.droplet_id is not None:
            raise ConfigError("droplet_id: set only with [[addresses]] (no address is listed)")
        return (), None
    if not raw.addresses:
        raise ConfigError("addresses: the list is empty; list at least one address or drop it")
    result: list[ManagedAddress] = []
    for index, entry in enumerate(raw.addresses):
        managed = _managed_address(entry.address, f"addresses[{index}].address")
        if managed in result:
            raise ConfigError(
                f"addresses[{index}].address: {managed.address} is already "
                f"addresses[{result.index(managed)}]; list each address once"
            )
        result.append(managed)
    first = FloatingIpSettings(address=result[0].address, droplet_id=raw.droplet_id)
    return tuple(result), first


def _check_budget(raw: FileSettings, addresses: int) -> None:
    """Each address gets an equal share of the node's request budget: at least one each."""
    for key in ("requests_per_minute", "requests_per_hour"):
        limit = getattr(raw.assigner, key)
        if addresses > limit:
            raise ConfigError(
                f"assigner.{key}: {limit} cannot be shared by {addresses} addresses "
                "(each needs at least one request); raise it"
            )


def _validate(raw: FileSettings, path: Path, env: Mapping[str, str]) -> Config:
    raw = _resolve_paths(raw, path.absolute().parent)
    managed, floating_ip = _addresses(raw)
    _check_budget(raw, len(managed))
    if not raw.max_clock_skew > 0:
        raise ConfigError("max_clock_skew: must be > 0 seconds")
    addresses = _check_membership(raw)
    return Config(
        node_id=raw.node_id,
        bind=parse_address(raw.bind, "bind"),
        status_listen=parse_address(raw.status_listen, "status_listen"),
        eligible=raw.eligible,
        peers=tuple(raw.peers),
        peer_addresses=addresses,
        cluster_key=_load_key(raw, env),
        cluster_key_file=None
        if ENV_PREFIX + "CLUSTER_KEY" in env or raw.cluster_key_file is None
        else Path(raw.cluster_key_file),
        timing=_timing(raw),
        profile=raw.profile,
        max_clock_skew=raw.max_clock_skew,
        log_level=raw.log_level,
        floating_ip=floating_ip,
        digitalocean=raw.digitalocean,
        assigner=raw.assigner,
        health=raw.health,
        hooks=raw.hooks,
        source=str(path),
        cluster_name=raw.cluster_name,
        memberships=_memberships(raw),
        addresses=managed,
    )
