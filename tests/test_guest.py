"""The droplet-side steps (`fip-guest`), for real, in network namespaces (root only).

Hosts d1 and d2 are droplets and a third host is the router that owns their public, anchor
and IPv6 gateways and sees where their traffic comes from (tests/chaos/guestnet.py). The
commands run in a droplet's namespace exactly as on a droplet, and what is asserted is what
the kernel and the router see: the /128 on the holder's `lo` and nowhere else, the router
reaching the reserved IPv6 only on the holder, the source address of a datagram from each
droplet (the reserved IPv6 from the holder only; the anchor address, which DigitalOcean
translates to the reserved IPv4, from the holder only), and an unchanged kernel state after
a repeated or unneeded step or a refused input.

Then the two ways to run them with an unprivileged sidecar: hooks through the README's sudo
rule (the real sudo, as an unprivileged user), hooks of real sidecars against the
emulator, and `fip-guest agent` following a real node's /status (and the `addresses`
contract of /status, from a scripted server). The real sidecars hold the reserved IPv6 as
well as the IPv4 (REAL_SIDECAR_FAMILIES).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from chaos import netns
from chaos.cluster import SidecarCluster, wait_until
from chaos.guestnet import (
    RESERVED_IPV6,
    GuestNet,
    anchor_of,
    fip_guest,
    guest_net,
    ipv6_of,
)
from chaos.netns import Host, Lab

from sidecar.guest.agent import Entry, parse_status
from sidecar.guest.cli import hook_request
from sidecar.guest.errors import GuestError

ROOT = Path(__file__).resolve().parent.parent
RESERVED_IPV4 = "203.0.113.10"
V4, V6 = socket.AF_INET, socket.AF_INET6
#: Generous bounds for a loaded 2-core machine (not speed assertions).
WAIT = 30.0
UNPRIVILEGED = 65534

netns_test = pytest.mark.netns


# --- what needs no namespace: the hook environment and the /status contract ----------------


def test_hook_environment_names_what_it_does() -> None:
    gained = {"FIP_EVENT": "address_gained", "FIP_ADDRESS": RESERVED_IPV6, "FIP_FAMILY": "ipv6"}
    assert hook_request(gained) == (True, ipaddress.ip_address(RESERVED_IPV6))
    lost = {"FIP_EVENT": "lost", "FIP_FLOATING_IP": RESERVED_IPV4}  # a sidecar of today
    request = hook_request(lost)
    assert request is not None and request[0] is False and str(request[1]) == RESERVED_IPV4
    assert hook_request({"FIP_EVENT": "leader_change"}) is None
    for env, message in (
        ({"FIP_EVENT": "gaind", "FIP_ADDRESS": RESERVED_IPV4}, "FIP_EVENT: 'gaind' is not one"),
        ({"FIP_EVENT": "address_gained"}, "FIP_ADDRESS is not set"),
        ({"FIP_EVENT": "address_gained", "FIP_ADDRESS": "2001:db8::x"}, "not an IP address"),
        ({"FIP_EVENT": "address_gained", "FIP_ADDRESS": "fe80::1%eth0"}, "cannot be a reserved"),
        ({"FIP_EVENT": "address_lost", "FIP_ADDRESS": "::"}, "cannot be a reserved"),
        (
            {"FIP_EVENT": "address_lost", "FIP_ADDRESS": RESERVED_IPV4, "FIP_FAMILY": "ipv6"},
            "FIP_FAMILY is 'ipv6' but FIP_ADDRESS 203.0.113.10 is ipv4",
        ),
    ):
        with pytest.raises(GuestError, match=re.escape(message)) as raised:
            hook_request(env)
        assert raised.value.exit_code == 64


def snapshot_entry(address: str, *, droplet: int, leading: bool, holder: int | None) -> Any:
    """One `/status` address entry with the fields of assigner.AssignerSnapshot."""
    return {
        "reserved_ip": address,
        "droplet_id": droplet,
        "leading": leading,
        "holder_droplet_id": holder,
        "holder_read_at": None,
        "locked": None,
        "last_assignment": None,
        "last_error": None,
        "consecutive_failures": 0,
        "requests_last_minute": 0,
        "requests_last_hour": 0,
    }


def test_status_addresses_and_the_floating_ip_fallback() -> None:
    v4 = snapshot_entry(RESERVED_IPV4, droplet=1001, leading=True, holder=1001)
    v6 = {
        **snapshot_entry(RESERVED_IPV6, droplet=1001, leading=True, holder=1002),
        "family": "ipv6",
    }
    held = [(str(e.address), e.held) for e in parse_status({"addresses": [v4, v6]})]
    assert held == [(RESERVED_IPV4, True), (RESERVED_IPV6, False)]
    # A sidecar without `addresses` (today's main) has one `floating_ip` section.
    assert parse_status({"floating_ip": v4}) == [Entry(ipaddress.ip_address(RESERVED_IPV4), True)]
    assert parse_status({"role": "follower"}) == []
    not_leading = snapshot_entry(RESERVED_IPV4, droplet=1001, leading=False, holder=1001)
    assert [e.held for e in parse_status({"floating_ip": not_leading})] == [False]
    for body, message in (
        ([], "not a JSON object"),
        ({"addresses": {"x": 1}}, "addresses: not a list"),
        ({"addresses": [{**v4, "leading": "yes"}]}, "addresses[0].leading"),
        ({"addresses": [{**v4, "droplet_id": True}]}, "addresses[0].droplet_id"),
        ({"addresses": [{**v4, "reserved_ip": "x"}]}, "addresses[0].reserved_ip"),
        ({"addresses": [{**v4, "family": "ipv6"}]}, "addresses[0].family 'ipv6'"),
        ({"floating_ip": {**v4, "holder_droplet_id": "1001"}}, "floating_ip.holder_droplet_id"),
    ):
        with pytest.raises(GuestError, match=re.escape(message)) as raised:
            parse_status(body)
        assert raised.value.exit_code == 76


# --- the lab -----------------------------------------------------------------------------------


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    reason = netns.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with netns.lab(tmp_path, "g") as the_lab:
        yield the_lab


@pytest.fixture
def droplets(lab: Lab) -> Iterator[tuple[GuestNet, Host, Host]]:
    d1, d2 = lab.add_host("d1", 1), lab.add_host("d2", 2)
    router = lab.add_host("rt", 100)
    with guest_net(lab, router, [d1, d2]) as net:
        yield net, d1, d2


def guest(
    net: GuestNet,
    host: Host,
    *args: str,
    env: Mapping[str, str] | None = None,
    as_user: int | None = None,
    metadata: bool = True,
) -> subprocess.CompletedProcess[str]:
    """`fip-guest ARGS` inside the host's namespace (as `as_user`, without capabilities)."""
    command = ["ip", "netns", "exec", host.ns]
    if as_user is not None:
        command += ["setpriv", f"--reuid={as_user}", f"--regid={as_user}", "--clear-groups"]
    command += [str(fip_guest()), *args]
    if metadata:
        command += ["--metadata-url", net.metadata_url]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **(env or {})},
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stderr


def gateway_of(net: GuestNet, host: Host, family: int) -> str:
    (route,) = net.default_routes(host, family)
    return str(route["gateway"])


def source_of(net: GuestNet, host: Host) -> str | None:
    (route,) = net.default_routes(host, V6)
    return route.get("prefsrc")


# --- the steps on their own --------------------------------------------------------------------


@netns_test
def test_reserved_ipv6_moves_with_the_holder(droplets: tuple[GuestNet, Host, Host]) -> None:
    net, d1, d2 = droplets
    assert net.source_seen(d1, V6) == ipv6_of(d1)
    ok(guest(net, d1, "gained", RESERVED_IPV6))
    net.route_reserved_ipv6_to(d1)
    assert f"{RESERVED_IPV6}" in net.addresses(d1)
    assert net.source_seen(d1, V6) == RESERVED_IPV6, "outbound IPv6 leaves from the reserved IP"
    assert net.answers_for(RESERVED_IPV6), "the holder takes the reserved IPv6 as its own"

    # The move: DigitalOcean routes it to d2; d1 loses it, d2 gains it (in either order).
    net.route_reserved_ipv6_to(d2)
    assert not net.answers_for(RESERVED_IPV6), "d2 does not answer before it gained it"
    ok(guest(net, d2, "gained", RESERVED_IPV6))
    ok(guest(net, d1, "lost", RESERVED_IPV6))
    assert RESERVED_IPV6 not in net.addresses(d1)
    assert RESERVED_IPV6 in net.addresses(d2)
    assert net.answers_for(RESERVED_IPV6)
    assert net.source_seen(d1, V6) == ipv6_of(d1)
    assert net.source_seen(d2, V6) == RESERVED_IPV6
    assert source_of(net, d1) is None and source_of(net, d2) == RESERVED_IPV6


@netns_test
def test_ipv4_outbound_leaves_through_the_anchor_gateway_on_the_holder_only(
    droplets: tuple[GuestNet, Host, Host],
) -> None:
    net, d1, d2 = droplets
    router = net.router
    assert net.source_seen(d1, V4) == d1.address
    ok(guest(net, d1, "gained", RESERVED_IPV4))
    assert gateway_of(net, d1, V4) == anchor_of(router)
    assert net.source_seen(d1, V4) == anchor_of(d1), "DigitalOcean translates it to the IP"
    ok(guest(net, d2, "gained", RESERVED_IPV4))
    ok(guest(net, d1, "lost", RESERVED_IPV4))
    assert gateway_of(net, d1, V4) == router.address
    assert net.source_seen(d1, V4) == d1.address
    assert net.source_seen(d2, V4) == anchor_of(d2)


@netns_test
def test_every_step_is_idempotent(droplets: tuple[GuestNet, Host, Host]) -> None:
    net, d1, _ = droplets
    before = net.snapshot(d1)
    for address in (RESERVED_IPV6, RESERVED_IPV4):
        assert "nothing to change" in ok(guest(net, d1, "lost", address)), "never held"
    assert net.snapshot(d1) == before
    for address in (RESERVED_IPV6, RESERVED_IPV4):
        ok(guest(net, d1, "gained", address))
    held = net.snapshot(d1)
    for address in (RESERVED_IPV6, RESERVED_IPV4):
        assert "nothing to change" in ok(guest(net, d1, "gained", address))
    assert net.snapshot(d1) == held
    assert len(net.default_routes(d1, V4)) == len(net.default_routes(d1, V6)) == 1
    for _ in range(2):
        for address in (RESERVED_IPV6, RESERVED_IPV4):
            ok(guest(net, d1, "lost", address))
    assert net.snapshot(d1) == before


@netns_test
def test_an_operators_own_default_route_is_left_alone_on_loss(
    droplets: tuple[GuestNet, Host, Host],
) -> None:
    net, d1, _ = droplets
    netns.run(["ip", "-n", d1.ns, "addr", "add", "198.18.0.201/24", "dev", "eth0"])
    netns.run(["ip", "-n", d1.ns, "route", "replace", "default", "via", "198.18.0.254"])
    ok(guest(net, d1, "lost", RESERVED_IPV4))
    assert gateway_of(net, d1, V4) == "198.18.0.254"


BAD_INPUT = [
    pytest.param(["gained", "203.0.113.300"], None, 64, "ADDRESS: not an IP address", id="address"),
    pytest.param(["hook"], {"FIP_EVENT": "address_gained", "FIP_ADDRESS": RESERVED_IPV6,
                            "FIP_FAMILY": "ipv4"}, 64, "FIP_FAMILY is 'ipv4'", id="family"),
    pytest.param(["hook"], {"FIP_EVENT": "promoted", "FIP_ADDRESS": RESERVED_IPV6}, 64,
                 "FIP_EVENT: 'promoted' is not one of", id="event"),
    pytest.param(["hook"], {"FIP_EVENT": "address_gained"}, 64, "FIP_ADDRESS is not set",
                 id="no-address"),
    pytest.param(["gained", RESERVED_IPV6, "--ipv6-device", "eth9"], None, 78,
                 "no network device named 'eth9'", id="device"),
    pytest.param(["gained", RESERVED_IPV4, "--metadata-url", "http://198.18.0.100:9"], None, 69,
                 "metadata service: GET http://198.18.0.100:9/metadata/v1/interfaces/public/0/"
                 "anchor_ipv4/gateway", id="metadata-down"),
]  # fmt: skip


@netns_test
@pytest.mark.parametrize(("args", "env", "code", "message"), BAD_INPUT)
def test_bad_input_fails_with_its_exit_code_and_changes_nothing(
    droplets: tuple[GuestNet, Host, Host],
    args: list[str],
    env: dict[str, str] | None,
    code: int,
    message: str,
) -> None:
    net, d1, _ = droplets
    before = net.snapshot(d1)
    explicit_metadata = "--metadata-url" in args
    result = guest(net, d1, *args, env=env, metadata=not explicit_metadata)
    assert result.returncode == code, result.stderr
    assert message in result.stderr and result.stderr.startswith("fip-guest: error: ")
    assert "Traceback" not in result.stderr
    assert net.snapshot(d1) == before


@netns_test
def test_a_metadata_answer_that_is_no_address_and_a_missing_route_are_named(
    droplets: tuple[GuestNet, Host, Host],
) -> None:
    net, d1, _ = droplets
    net.write_metadata(public="<html>", anchor="not-an-ip")
    result = guest(net, d1, "gained", RESERVED_IPV4)
    assert result.returncode == 76 and "not an IPv4 address: 'not-an-ip'" in result.stderr
    netns.run(["ip", "-n", d1.ns, "-6", "route", "del", "default"])
    result = guest(net, d1, "gained", RESERVED_IPV6)
    assert result.returncode == 78 and "no IPv6 default route" in result.stderr
    # With the source step off, the /128 alone is fine.
    ok(guest(net, d1, "gained", RESERVED_IPV6, "--no-ipv6-source"))


@netns_test
def test_without_cap_net_admin_nothing_changes(droplets: tuple[GuestNet, Host, Host]) -> None:
    net, d1, _ = droplets
    before = net.snapshot(d1)
    for address in (RESERVED_IPV6, RESERVED_IPV4):
        result = guest(net, d1, "gained", address, as_user=UNPRIVILEGED)
        assert result.returncode == 77, result.stderr
        assert "needs CAP_NET_ADMIN" in result.stderr
    assert net.snapshot(d1) == before


# --- way 1: hooks through the README's sudo rule ----------------------------------------------


def readme_sudoers() -> list[str]:
    """The sudoers lines the README documents (its ```sudoers block)."""
    text = (ROOT / "README.md").read_text()
    (block,) = re.findall(r"```sudoers\n(.*?)```", text, re.S)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


@pytest.fixture
def sudo_rule() -> Iterator[Path]:
    """The README's rule for uid 65534 and this environment's fip-guest, in /etc/sudoers.d."""
    if subprocess.run(["which", "sudo", "visudo"], capture_output=True).returncode != 0:
        message = "SUDO IS MISSING: the sudo rule was NOT tested (apt-get install sudo)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    lines = [
        line.replace("/opt/fip-sidecar/bin/fip-guest", str(fip_guest())).replace(
            "fip-sidecar ALL", f"#{UNPRIVILEGED} ALL"
        )
        for line in readme_sudoers()
    ]
    path = Path(f"/etc/sudoers.d/fipt-{os.getpid()}-guest")
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o440)
    try:
        checked = subprocess.run(["visudo", "-c", "-f", str(path)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        yield path
    finally:
        path.unlink(missing_ok=True)


def sudo(host: Host, *args: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """`sudo -n ARGS` as uid 65534 in the host's namespace, with the hook's environment."""
    return subprocess.run(
        ["ip", "netns", "exec", host.ns, "setpriv", f"--reuid={UNPRIVILEGED}",
         f"--regid={UNPRIVILEGED}", "--clear-groups", "sudo", "-n", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **env},
    )  # fmt: skip


@netns_test
def test_the_readme_sudo_rule_runs_the_hook_and_nothing_else(
    droplets: tuple[GuestNet, Host, Host], sudo_rule: Path
) -> None:
    net, d1, _ = droplets
    (rule,) = [line for line in readme_sudoers() if "NOPASSWD" in line]
    assert rule.endswith(" hook"), "the rule pins the argument list"
    hook = [str(fip_guest()), "hook"]
    # The hook's environment as a sidecar sets it; sudo keeps only what the rule lists.
    event = {"FIP_EVENT": "address_gained", "FIP_ADDRESS": RESERVED_IPV6, "FIP_FAMILY": "ipv6",
             "FIP_NODE_ID": "1", "FIP_ROLE": "leader"}  # fmt: skip
    result = sudo(d1, *hook, env=event)
    assert result.returncode == 0, result.stderr
    assert RESERVED_IPV6 in net.addresses(d1) and source_of(net, d1) == RESERVED_IPV6
    result = sudo(d1, *hook, env={**event, "FIP_EVENT": "address_lost"})
    assert result.returncode == 0, result.stderr
    assert RESERVED_IPV6 not in net.addresses(d1) and source_of(net, d1) is None
    # The rule allows that command line and nothing else.
    for other in (
        [str(fip_guest()), "gained", RESERVED_IPV6],
        [str(fip_guest()), "hook", "--ipv6-device", "eth0"],
        ["/bin/sh", "-c", "id"],
    ):
        refused = sudo(d1, *other, env=event)
        assert refused.returncode == 1, (other, refused.stderr)
        assert "a password is required" in refused.stderr, refused.stderr
    assert RESERVED_IPV6 not in net.addresses(d1)


# --- real sidecars against the emulator: hooks, and the agent on their /status ---------------


#: The families the real-sidecar tests drive; the assertions below are written per family.
REAL_SIDECAR_FAMILIES = ("ipv4", "ipv6")


class GuestCluster(SidecarCluster):
    """A chaos cluster holding one reserved address of each of REAL_SIDECAR_FAMILIES, whose
    nodes run `hook_argv` (if any) on gaining and losing an address."""

    hook_argv: Sequence[str] = ()

    def _start_emulator(self) -> None:
        if "ipv6" in REAL_SIDECAR_FAMILIES:
            self.api.extra_reserved_ips = [RESERVED_IPV6]
        super()._start_emulator()

    def config_text(self, node: int) -> str:
        text = super().config_text(node)
        if "ipv6" in REAL_SIDECAR_FAMILIES:
            droplet = self.specs[node].droplet_id
            single = f'[floating_ip]\naddress = "{RESERVED_IPV4}"\ndroplet_id = {droplet}\n'
            assert single in text, text
            text = f"droplet_id = {droplet}\n" + text.replace(single, "")
            for address in (RESERVED_IPV4, RESERVED_IPV6):
                text += f'\n[[addresses]]\naddress = "{address}"\n'
        if self.hook_argv:
            events = ("address_gained", "address_lost")
            argv = json.dumps(list(self.hook_argv))
            text += "\n[hooks]\n" + "".join(f"on_{event} = {argv}\n" for event in events)
        return text


@contextlib.contextmanager
def cluster_with_droplets(lab: Lab, *, hooks: bool) -> Iterator[tuple[GuestCluster, GuestNet]]:
    """Three real sidecars (node 3 a witness) in droplet-shaped hosts; the emulator's host is
    the router. Node 1 leads and holds the IPv4 when this yields."""
    cluster = GuestCluster(lab)
    with guest_net(lab, cluster.api_host, [cluster.hosts[1], cluster.hosts[2]]) as net:
        if hooks:
            cluster.hook_argv = [str(fip_guest()), "hook", "--metadata-url", net.metadata_url]
        cluster.start()
        assert cluster.wait_for_leader(1, WAIT), "node 1 never became the only leader"
        assert wait_until(lambda: cluster.ip_holder() == 1001, WAIT), "the IP never reached 1001"
        yield cluster, net


def holds(net: GuestNet, host: Host, family: str) -> bool:
    """Whether `host` is set up as the holder of the reserved address of `family`, as the
    router sees it: outbound traffic leaves from the reserved IPv6 / the anchor address."""
    if family == "ipv6":
        return RESERVED_IPV6 in net.addresses(host) and net.source_seen(host, V6) == RESERVED_IPV6
    return gateway_of(net, host, V4) == anchor_of(net.router) and net.source_seen(
        host, V4
    ) == anchor_of(host)


def only_holder(net: GuestNet, holder: Host, other: Host) -> bool:
    """Wait until `holder` holds every family and `other` none (False after WAIT)."""

    def settled() -> bool:
        return all(
            holds(net, holder, family) and not holds(net, other, family)
            for family in REAL_SIDECAR_FAMILIES
        )

    return wait_until(settled, WAIT, interval=0.2) is not None


@netns_test
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_hooks_of_real_sidecars_move_the_guest_state(lab: Lab) -> None:
    with cluster_with_droplets(lab, hooks=True) as (cluster, net):
        n1, n2 = cluster.hosts[1], cluster.hosts[2]
        assert only_holder(net, n1, n2), cluster.processes[1].log_path.read_text()
        # A planned stop: node 1 resigns and runs its loss hook; node 2 gains.
        lab.kill(cluster.processes[1], signal.SIGTERM)
        assert cluster.wait_for_leader(2, WAIT)
        assert only_holder(net, n2, n1), cluster.processes[2].log_path.read_text()
        assert net.source_seen(n1, V4) == n1.address and source_of(net, n1) is None
        assert "anchor gateway" in cluster.processes[2].log_path.read_text()


def start_agent(lab: Lab, net: GuestNet, host: Host, status_url: str, name: str) -> netns.Process:
    argv = [str(fip_guest()), "agent", "--status-url", status_url, "--interval", "0.2",
            "--down-after", "2", "--metadata-url", net.metadata_url]  # fmt: skip
    return lab.spawn(host, name, argv)


@netns_test
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_agent_follows_a_real_nodes_status_and_releases_when_it_dies(lab: Lab) -> None:
    with cluster_with_droplets(lab, hooks=False) as (cluster, net):
        n1, n2 = cluster.hosts[1], cluster.hosts[2]
        agents = {
            node: start_agent(lab, net, cluster.hosts[node],
                              f"http://{cluster.hosts[node].address}:9400", f"agent{node}")
            for node in (1, 2)
        }  # fmt: skip
        assert only_holder(net, n1, n2), agents[1].log_path.read_text()
        # A crash: no hook can run on node 1; its agent notices the sidecar is gone.
        cluster.kill(1)
        assert cluster.wait_for_leader(2, WAIT)
        assert only_holder(net, n2, n1), agents[1].log_path.read_text()
        assert gateway_of(net, n1, V4) == net.router.address
        assert "releasing what it held" in agents[1].log_path.read_text()
        assert all(agent.running() for agent in agents.values())


class ScriptedStatus(BaseHTTPRequestHandler):
    """Answers GET /status with the server's `body` (the /status contract, scripted)."""

    def do_GET(self) -> None:
        server: StatusServer = self.server  # type: ignore[assignment]
        body = server.body if isinstance(server.body, bytes) else json.dumps(server.body).encode()
        self.send_response(200 if self.path == "/status" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return None


class StatusServer(ThreadingHTTPServer):
    body: Any = {}


@contextlib.contextmanager
def scripted_status(lab: Lab, host: Host, port: int) -> Iterator[StatusServer]:
    """A /status server on 127.0.0.1:port inside the host's namespace (its loopback, like the
    sidecar's status_listen), served from a thread of this process."""
    listener = lab.open_socket(host, socket.AF_INET, socket.SOCK_STREAM)
    server = StatusServer(("127.0.0.1", port), ScriptedStatus, bind_and_activate=False)
    server.socket.close()
    server.socket = listener
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.server_bind()
    server.server_activate()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@netns_test
@pytest.mark.timeout(300)
def test_the_agent_follows_the_addresses_contract_for_both_families(
    lab: Lab, droplets: tuple[GuestNet, Host, Host]
) -> None:
    net, d1, _ = droplets
    anchor_gateway = anchor_of(net.router)

    def status(*, v4: bool, v6: bool) -> dict[str, Any]:
        return {
            "role": "leader",
            "addresses": [
                {**snapshot_entry(RESERVED_IPV4, droplet=1001, leading=v4,
                                  holder=1001 if v4 else 1002), "family": "ipv4"},
                {**snapshot_entry(RESERVED_IPV6, droplet=1001, leading=v6,
                                  holder=1001 if v6 else 1002), "family": "ipv6"},
            ],
        }  # fmt: skip

    def settled(*, v4: bool, v6: bool) -> bool:
        def check() -> bool:
            return (
                (RESERVED_IPV6 in net.addresses(d1)) == v6
                and (source_of(net, d1) == RESERVED_IPV6) == v6
                and (gateway_of(net, d1, V4) == anchor_gateway) == v4
            )

        return wait_until(check, WAIT) is not None

    with scripted_status(lab, d1, 9401) as server:
        server.body = status(v4=False, v6=True)
        agent = start_agent(lab, net, d1, "http://127.0.0.1:9401", "agent")
        assert settled(v4=False, v6=True), agent.log_path.read_text()
        assert net.source_seen(d1, V6) == RESERVED_IPV6
        server.body = status(v4=True, v6=False)
        assert settled(v4=True, v6=False), agent.log_path.read_text()
        assert net.source_seen(d1, V6) == ipv6_of(d1)
        server.body = status(v4=True, v6=True)
        assert settled(v4=True, v6=True)
        # Someone removes the /128 by hand: the next poll puts it back (level-triggered).
        netns.run(["ip", "-n", d1.ns, "addr", "del", f"{RESERVED_IPV6}/128", "dev", "lo"])
        assert settled(v4=True, v6=True)
        # A garbled answer is reported and changes nothing (the sidecar still answers).
        server.body = b"<html>"
        wait_until(lambda: "not JSON" in agent.log_path.read_text(), WAIT)
        assert settled(v4=True, v6=True)
    # The sidecar is gone (nothing listens): after --down-after everything is released.
    assert settled(v4=False, v6=False), agent.log_path.read_text()
    assert agent.running()
    lab.kill(agent, signal.SIGTERM)
    assert agent.popen.returncode == 0
    assert "guest state left as it is" in agent.log_path.read_text()
