"""The emulated account: droplets, reserved IPs, actions and the assignment history.

This module is pure bookkeeping with no HTTP in it, so the rules of the real API live in
one place and read as rules. Time is a number from an injected clock; an action's
completion is *computed* from it (`settle`) whenever anything is read or written, so no
background task is needed and a test under `trio.testing.MockClock` sees actions
complete exactly when the mock clock passes their deadline.

Two timelines are kept per IP: the current holder (what the API reports) and every
change with its clock time (what the edge needs to route "as of a moment ago", and what
tests read from `/_emulator/history`).

Droplets have events of their own (their boot, a backup, a resize), modelled as actions
that take time and move no IP: while one runs, the real API refuses to assign a reserved IP
to that droplet (422 "Droplet already has a pending event."), which is what a failover
meets when the standby happens to be backed up at that moment.
"""

from __future__ import annotations

import hashlib
import ipaddress
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal, get_args

from .settings import EmulatorSettings

Clock = Callable[[], float]

ActionKind = Literal["assign", "unassign"]
DropletEventKind = Literal["create", "reboot", "power_cycle", "backup", "snapshot", "resize"]
"""Droplet events the emulator can run; `create` is a new droplet's boot."""
ActionStatus = Literal["in-progress", "completed", "errored"]
AssignmentSource = Literal["initial", "api", "manual", "destroyed"]
Family = Literal["ipv4", "ipv6"]
DROPLET_EVENT_KINDS: tuple[DropletEventKind, ...] = get_args(DropletEventKind)

FIRST_ACTION_ID = 2_000_000_001
"""Real action ids are large integers; starting high catches clients that assume small ones."""


class EmulatorError(Exception):
    """A request the real API would refuse, with its status and error `id`."""

    def __init__(self, status: int, error_id: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_id = error_id
        self.message = message


def not_found(message: str = "The resource you requested could not be found.") -> EmulatorError:
    return EmulatorError(404, "not_found", message)


def unprocessable(message: str) -> EmulatorError:
    return EmulatorError(422, "unprocessable_entity", message)


def pending_droplet_event() -> EmulatorError:
    return unprocessable("Droplet already has a pending event.")


def default_public_ipv4(droplet_id: int) -> str:
    """A stable stand-in public address from the benchmark range 198.18.0.0/15."""
    return str(ipaddress.IPv4Address("198.18.0.0") + (droplet_id % 131_070) + 1)


def default_public_ipv6(droplet_id: int) -> str:
    """A stable stand-in public IPv6 address from the documentation range 2001:db8::/32."""
    return str(ipaddress.IPv6Address("2001:db8:d0::") + droplet_id)


def family_of(ip: str) -> Family:
    return "ipv6" if ipaddress.ip_address(ip).version == 6 else "ipv4"


@dataclass
class Droplet:
    """A droplet the account owns; `web_url` is where the edge sends its traffic.

    `public_ipv4` defaults to a stable address derived from the id; `private_ipv4` (the
    VPC address) is optional, as on a droplet created without one. `ipv6` is whether
    IPv6 is enabled on it (then it has a public IPv6 address, and only then can it take
    a reserved IPv6).
    """

    id: int
    region: str
    web_url: str | None = None
    name: str = ""
    tags: tuple[str, ...] = ()
    public_ipv4: str = ""
    private_ipv4: str | None = None
    created_epoch: float = field(default_factory=time.time)
    ipv6: bool = True

    def __post_init__(self) -> None:
        if not self.name:
            self.name = f"emulated-droplet-{self.id}"
        if not self.public_ipv4:
            self.public_ipv4 = default_public_ipv4(self.id)

    @property
    def addresses(self) -> tuple[str, ...]:
        private = () if self.private_ipv4 is None else (self.private_ipv4,)
        return (self.public_ipv4, *private)

    @property
    def public_ipv6(self) -> str | None:
        return default_public_ipv6(self.id) if self.ipv6 else None


@dataclass
class ReservedIP:
    """A reserved IP and the droplet it points at right now (after settling)."""

    ip: str
    region: str
    droplet_id: int | None = None
    reserved_epoch: float = field(default_factory=time.time)

    @property
    def family(self) -> Family:
        return family_of(self.ip)

    @property
    def project_id(self) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"fip-emulator:{self.ip}"))

    @property
    def resource_id(self) -> int:
        """The numeric id the real API puts in an action's `resource_id` for an IP: the
        address itself for IPv4; for IPv6 (128 bits do not fit) a stable 31-bit number,
        like the spec's example `758604968`."""
        if self.family == "ipv4":
            return int(ipaddress.IPv4Address(self.ip))
        digest = hashlib.sha256(self.ip.encode()).digest()
        return int.from_bytes(digest[:4], "big") & 0x7FFF_FFFF or 1


@dataclass
class Action:
    """An assign or unassign that takes `action_seconds` to complete, or a droplet event
    (`ip` None, `target_droplet_id` the droplet) that takes as long as it was given."""

    id: int
    kind: ActionKind | DropletEventKind
    ip: str | None
    region: str
    resource_id: int
    resource_type: str
    target_droplet_id: int | None
    source_droplet_id: int | None
    started_clock: float
    started_epoch: float
    completes_clock: float
    visible_from_clock: float
    will_error: bool = False
    status: ActionStatus = "in-progress"

    @property
    def api_type(self) -> str:
        if self.ip is None:
            return self.kind
        return "assign_ip" if self.kind == "assign" else "unassign_ip"

    @property
    def completed_epoch(self) -> float:
        return self.started_epoch + (self.completes_clock - self.started_clock)

    def involves_droplet(self, droplet_id: int) -> bool:
        return droplet_id in (self.target_droplet_id, self.source_droplet_id)


@dataclass(frozen=True)
class Assignment:
    """One change of holder that took effect (`droplet_id` None means unassigned)."""

    reserved_ip: str
    droplet_id: int | None
    previous_droplet_id: int | None
    action_id: int | None
    source: AssignmentSource
    requested_clock: float
    requested_epoch: float
    completed_clock: float
    completed_epoch: float


class AccountState:
    """Everything the emulated account holds, with the real API's rules for changing it."""

    def __init__(
        self,
        settings: EmulatorSettings,
        *,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
    ) -> None:
        settings.validate()
        self.settings = settings
        self.clock = clock
        self.wall_clock = wall_clock
        self.droplets: dict[int, Droplet] = {}
        self.reserved_ips: dict[str, ReservedIP] = {}
        self.actions: dict[int, Action] = {}
        self.history: list[Assignment] = []
        self._next_action_id = FIRST_ACTION_ID

    # ---- setup -------------------------------------------------------------------------

    def add_droplet(
        self,
        droplet_id: int,
        region: str,
        web_url: str | None = None,
        *,
        name: str = "",
        tags: tuple[str, ...] = (),
        public_ipv4: str | None = None,
        private_ipv4: str | None = None,
        boot_seconds: float = 0.0,
        replace: bool = False,
        ipv6: bool = True,
    ) -> Droplet:
        """Add a droplet (or, with `replace`, change one's attributes in place).

        `boot_seconds` > 0 starts its `create` event: the droplet is `new`, has no
        addresses yet and cannot take a reserved IP until the event ends.
        """
        if droplet_id in self.droplets and not replace:
            raise ValueError(f"droplet {droplet_id} is listed twice")
        if droplet_id < 1:
            raise ValueError(f"droplet id must be a positive integer, got {droplet_id}")
        if not boot_seconds >= 0.0:
            raise ValueError(f"boot_seconds must be >= 0, got {boot_seconds!r}")
        old = self.droplets.get(droplet_id)
        droplet = Droplet(
            droplet_id,
            region,
            web_url,
            name=name,
            tags=tuple(tags),
            public_ipv4=_address("public_ipv4", public_ipv4) if public_ipv4 else "",
            private_ipv4=_address("private_ipv4", private_ipv4) if private_ipv4 else None,
            created_epoch=old.created_epoch if old is not None else self.wall_clock(),
            ipv6=ipv6,
        )
        if old is not None and old.region != region:
            raise ValueError(f"droplet {droplet_id}: a droplet cannot change region")
        for other in self.droplets.values():
            shared = set(other.addresses) & set(droplet.addresses)
            if other.id != droplet_id and shared:
                raise ValueError(
                    f"droplet {droplet_id}: address {min(shared)} is droplet {other.id}'s"
                )
        self.droplets[droplet_id] = droplet
        if boot_seconds > 0.0:
            self.start_droplet_event(droplet_id, "create", boot_seconds)
        return droplet

    def remove_droplet(self, droplet_id: int) -> None:
        """Destroy a droplet: its reserved IP is released (on the record, as `destroyed`)
        and actions still running on it end `errored`."""
        self.settle()
        self.droplet(droplet_id)
        for action in self._in_progress(lambda a: a.target_droplet_id == droplet_id):
            action.will_error = True
        for held in self.ips_of_droplet(droplet_id):
            now, epoch = self.clock(), self.wall_clock()
            self._apply(held, None, None, "destroyed", now, epoch, now, epoch)
        del self.droplets[droplet_id]

    def add_reserved_ip(self, ip: str, region: str, droplet_id: int | None = None) -> ReservedIP:
        """Add an IPv4 or IPv6 address, optionally already pointing at a droplet (recorded
        as `initial`)."""
        try:
            address = ipaddress.ip_address(ip).compressed
        except ValueError:
            raise ValueError(f"reserved IP {ip!r} is not an IPv4 or IPv6 address") from None
        if address in self.reserved_ips:
            raise ValueError(f"reserved IP {address} is listed twice")
        reserved = ReservedIP(address, region, reserved_epoch=self.wall_clock())
        self.reserved_ips[address] = reserved
        if droplet_id is not None:
            try:
                self._check_can_hold(reserved, droplet_id)
            except EmulatorError as error:
                del self.reserved_ips[address]
                raise ValueError(f"reserved IP {address}: {error.message}") from None
            now, epoch = self.clock(), self.wall_clock()
            self._apply(reserved, droplet_id, None, "initial", now, epoch, now, epoch)
        return reserved

    # ---- time --------------------------------------------------------------------------

    def settle(self) -> None:
        """Apply every action whose deadline has passed, in the order they finished."""
        now = self.clock()
        due = sorted(
            (a for a in self.actions.values() if a.status == "in-progress"),
            key=lambda a: (a.completes_clock, a.id),
        )
        for action in due:
            if action.completes_clock > now:
                break
            if action.will_error:
                action.status = "errored"
                continue
            action.status = "completed"
            if action.ip is None:
                continue  # a droplet event moves no IP
            reserved = self.reserved_ips[action.ip]
            self._apply(
                reserved,
                action.target_droplet_id,
                action.id,
                "api",
                action.started_clock,
                action.started_epoch,
                action.completes_clock,
                action.completed_epoch,
            )

    def epoch_of(self, clock_value: float) -> float:
        """Wall-clock seconds for a value of the emulator's clock."""
        return self.wall_clock() - (self.clock() - clock_value)

    # ---- reads -------------------------------------------------------------------------

    def reserved_ip(self, ip: str, family: Family | None = None) -> ReservedIP:
        """The address `ip` (any spelling of it); with `family`, only one of that family
        (`/v2/reserved_ips/` does not know IPv6 addresses, nor the reverse)."""
        self.settle()
        try:
            key = ipaddress.ip_address(ip).compressed
        except ValueError:
            raise not_found() from None
        reserved = self.reserved_ips.get(key)
        if reserved is None or (family is not None and reserved.family != family):
            raise not_found()
        return reserved

    def list_reserved_ips(self, family: Family = "ipv4") -> list[ReservedIP]:
        self.settle()
        return [r for r in self.reserved_ips.values() if r.family == family]

    def droplet(self, droplet_id: int) -> Droplet:
        droplet = self.droplets.get(droplet_id)
        if droplet is None:
            raise not_found()
        return droplet

    def list_droplets(self, *, tag: str | None = None, name: str | None = None) -> list[Droplet]:
        """Droplets by id, only those carrying `tag` or named `name` (case-insensitive)."""
        return [
            d
            for _, d in sorted(self.droplets.items())
            if (tag is None or tag in d.tags) and (name is None or d.name.lower() == name.lower())
        ]

    def droplet_at_address(self, address: str) -> Droplet | None:
        """The droplet with this public or private address (how metadata knows its caller)."""
        return next((d for d in self.droplets.values() if address in d.addresses), None)

    def is_booting(self, droplet_id: int) -> bool:
        """True while the droplet's `create` event runs (the API says status `new`)."""
        self.settle()
        return any(
            True
            for _ in self._in_progress(
                lambda a: a.ip is None and a.kind == "create" and a.target_droplet_id == droplet_id
            )
        )

    def ip_of_droplet(self, droplet_id: int, family: Family = "ipv4") -> ReservedIP | None:
        """The reserved IP of `family` this droplet holds now (at most one per family)."""
        return next((r for r in self.ips_of_droplet(droplet_id) if r.family == family), None)

    def ips_of_droplet(self, droplet_id: int) -> list[ReservedIP]:
        """Every reserved address this droplet holds now, IPv4 first."""
        self.settle()
        held = [r for r in self.reserved_ips.values() if r.droplet_id == droplet_id]
        return sorted(held, key=lambda r: r.family)

    def pending_action(self, ip: str) -> Action | None:
        self.settle()
        return next(self._in_progress(lambda a: a.ip == ip), None)

    def is_locked(self, ip: str) -> bool:
        return self.pending_action(ip) is not None

    def action(self, action_id: int, *, ip: str | None = None) -> Action:
        """An action by id; like the real API it may 404 for a moment after creation."""
        self.settle()
        action = self.actions.get(action_id)
        if action is None or (ip is not None and action.ip != ip):
            raise not_found()
        if self.clock() < action.visible_from_clock:
            raise not_found()
        return action

    def list_actions(self, *, ip: str | None = None) -> list[Action]:
        """Visible actions, newest first like the real API."""
        self.settle()
        now = self.clock()
        return sorted(
            (
                a
                for a in self.actions.values()
                if (ip is None or a.ip == ip) and now >= a.visible_from_clock
            ),
            key=lambda a: a.id,
            reverse=True,
        )

    def holder_at(self, ip: str, at_clock: float) -> int | None:
        """Who held `ip` at a past moment of the emulator's clock (None: nobody)."""
        self.settle()
        holder: int | None = None
        for entry in self.history:
            if entry.reserved_ip != ip:
                continue
            if entry.completed_clock > at_clock and entry.source != "initial":
                break  # an initial holder has held the IP since before time began
            holder = entry.droplet_id
        return holder

    # ---- writes ------------------------------------------------------------------------

    def start_action(
        self,
        ip: str,
        kind: ActionKind,
        droplet_id: int | None = None,
        *,
        resource_type: str = "reserved_ip",
        will_error: bool = False,
    ) -> Action:
        """Begin an assign/unassign, refusing it exactly where the real API does."""
        reserved = self.reserved_ip(ip)
        if self.pending_action(ip) is not None:
            raise unprocessable("The reserved IP already has a pending event.")
        if kind == "assign":
            if droplet_id is None:
                raise unprocessable("droplet_id is required to assign a reserved IP.")
            self._check_can_hold(reserved, droplet_id)
            if any(
                True for _ in self._in_progress(lambda a: self._blocks(a, reserved, droplet_id))
            ):
                raise pending_droplet_event()
        elif reserved.droplet_id is None:
            raise unprocessable("The reserved IP is not assigned to a droplet.")
        now, epoch = self.clock(), self.wall_clock()
        action = Action(
            id=self._next_action_id,
            kind=kind,
            ip=reserved.ip,
            region=reserved.region,
            resource_id=reserved.resource_id,
            resource_type=resource_type,
            target_droplet_id=droplet_id if kind == "assign" else None,
            source_droplet_id=reserved.droplet_id,
            started_clock=now,
            started_epoch=epoch,
            completes_clock=now + self.settings.action_seconds,
            visible_from_clock=now + self.settings.action_404_seconds,
            will_error=will_error,
        )
        self._next_action_id += 1
        self.actions[action.id] = action
        return action

    def start_droplet_event(
        self, droplet_id: int, kind: DropletEventKind, seconds: float
    ) -> Action:
        """Begin a droplet event lasting `seconds` (the real API refuses a second one)."""
        self.settle()
        droplet = self.droplet(droplet_id)
        if kind not in DROPLET_EVENT_KINDS:
            raise ValueError(f"droplet event type must be one of {', '.join(DROPLET_EVENT_KINDS)}")
        if not seconds > 0.0:
            raise ValueError(f"a droplet event lasts > 0 seconds, got {seconds!r}")
        if any(True for _ in self._in_progress(lambda a: a.involves_droplet(droplet_id))):
            raise pending_droplet_event()
        now, epoch = self.clock(), self.wall_clock()
        action = Action(
            id=self._next_action_id,
            kind=kind,
            ip=None,
            region=droplet.region,
            resource_id=droplet_id,
            resource_type="droplet",
            target_droplet_id=droplet_id,
            source_droplet_id=None,
            started_clock=now,
            started_epoch=epoch,
            completes_clock=now + seconds,
            visible_from_clock=now,
        )
        self._next_action_id += 1
        self.actions[action.id] = action
        return action

    def manual_assign(self, ip: str, droplet_id: int | None) -> Assignment:
        """An operator moving the IP by hand: instant, and blind to pending actions."""
        reserved = self.reserved_ip(ip)
        if droplet_id is not None:
            self._check_can_hold(reserved, droplet_id)
        now, epoch = self.clock(), self.wall_clock()
        return self._apply(reserved, droplet_id, None, "manual", now, epoch, now, epoch)

    # ---- internals ---------------------------------------------------------------------

    def _blocks(self, action: Action, reserved: ReservedIP, droplet_id: int) -> bool:
        """Whether `action`, in progress, makes assigning `reserved` to `droplet_id` a 422:
        any droplet event on it does, and a move of another address of the same family to
        or from it. Moves of the other family do not (undocumented, like holding both;
        with `allow_mixed_families` off the assign is refused anyway)."""
        if not action.involves_droplet(droplet_id):
            return False
        if action.ip is None:
            return True
        return family_of(action.ip) == reserved.family or not self.settings.allow_mixed_families

    def _in_progress(self, predicate: Callable[[Action], bool]) -> Iterator[Action]:
        return (a for a in self.actions.values() if a.status == "in-progress" and predicate(a))

    def _check_can_hold(self, reserved: ReservedIP, droplet_id: int) -> None:
        droplet = self.droplets.get(droplet_id)
        if droplet is None:
            raise not_found(f"Droplet {droplet_id} could not be found.")
        if reserved.droplet_id == droplet_id:
            raise unprocessable("The reserved IP is already assigned to this droplet.")
        if droplet.region != reserved.region:
            raise unprocessable(
                f"The droplet is in region {droplet.region}, the reserved IP in "
                f"{reserved.region}; they must be in the same region."
            )
        if reserved.family == "ipv6" and not droplet.ipv6:
            raise unprocessable("The droplet does not have IPv6 enabled.")
        for other in self._conflicts(reserved, droplet_id):
            if other.family == reserved.family:
                raise unprocessable("The droplet already has a reserved IP assigned.")
            raise unprocessable(
                f"The droplet already has a reserved {other.family.upper()} assigned."
            )

    def _conflicts(self, reserved: ReservedIP, droplet_id: int) -> list[ReservedIP]:
        """The addresses `droplet_id` holds that it could not keep beside `reserved`: one
        of the same family (at most one each), or any other when `allow_mixed_families`
        is off."""
        return [
            r
            for r in self.reserved_ips.values()
            if r.droplet_id == droplet_id
            and r.ip != reserved.ip
            and (r.family == reserved.family or not self.settings.allow_mixed_families)
        ]

    def _apply(
        self,
        reserved: ReservedIP,
        droplet_id: int | None,
        action_id: int | None,
        source: AssignmentSource,
        requested_clock: float,
        requested_epoch: float,
        completed_clock: float,
        completed_epoch: float,
    ) -> Assignment:
        if droplet_id is not None:
            # A droplet holds at most one reserved IP of a family. A pending action can
            # complete after an operator gave the droplet another IP by hand; the newer
            # move wins and the other IP is released, on the record.
            for other in self._conflicts(reserved, droplet_id):
                self._apply(
                    other,
                    None,
                    action_id,
                    source,
                    requested_clock,
                    requested_epoch,
                    completed_clock,
                    completed_epoch,
                )
        entry = Assignment(
            reserved_ip=reserved.ip,
            droplet_id=droplet_id,
            previous_droplet_id=reserved.droplet_id,
            action_id=action_id,
            source=source,
            requested_clock=requested_clock,
            requested_epoch=requested_epoch,
            completed_clock=completed_clock,
            completed_epoch=completed_epoch,
        )
        reserved.droplet_id = droplet_id
        self.history.append(entry)
        return entry


def _address(key: str, value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ValueError(f"{key} {value!r} is not an IPv4 address") from None
