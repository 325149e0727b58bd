"""Several addresses in the config: `[[addresses]]`, the single-address forms, and every
mistake as one line naming the key (and exit status 2 from the CLI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_config import GOOD, workdir, write

from sidecar import config
from sidecar.config import ManagedAddress

__all__ = ["workdir"]  # the fixture, imported for pytest


def top(line: str) -> str:
    """GOOD with `line` as a top-level key (GOOD ends inside a [[peers]] table)."""
    return GOOD.replace("node_id = 1\n", f"node_id = 1\n{line}\n")


TWO = top("droplet_id = 1001") + '[[addresses]]\naddress = "203.0.113.10"\n'
TWO += '[[addresses]]\naddress = "2001:DB8:0::10"\n'


def test_addresses_of_both_families(workdir: Path) -> None:
    loaded = config.load(write(workdir, TWO), env={})
    assert loaded.addresses == (
        ManagedAddress("203.0.113.10", "ipv4"),
        ManagedAddress("2001:db8::10", "ipv6"),  # normalised
    )
    assert loaded.floating_ip is not None
    assert (loaded.floating_ip.address, loaded.floating_ip.droplet_id) == ("203.0.113.10", 1001)


def test_single_forms_still_work_and_may_be_ipv6(workdir: Path) -> None:
    for section, address, family in (
        ("floating_ip", "203.0.113.10", "ipv4"),
        ("reserved_ip", "2001:db8::10", "ipv6"),
    ):
        text = GOOD + f'[{section}]\naddress = "{address}"\ndroplet_id = 7\n'
        loaded = config.load(write(workdir, text), env={})
        assert loaded.addresses == (ManagedAddress(address, family),)
        assert loaded.floating_ip is not None and loaded.floating_ip.droplet_id == 7


def test_no_address_at_all_is_a_node_without_an_ip(workdir: Path) -> None:
    loaded = config.load(write(workdir, GOOD), env={})
    assert loaded.addresses == () and loaded.floating_ip is None


BAD = [
    ("wrong key", GOOD + '[[addresses]]\nadress = "203.0.113.10"\n', "addresses[0].adress"),
    ("unknown key", GOOD + "[[addresses]]\nfamily = 6\n", "addresses[0].family: unknown key"),
    ("missing key", GOOD + "[[addresses]]\n", "addresses[0].address: required key is missing"),
    (
        "bad address",
        GOOD + '[[addresses]]\naddress = "203.0.113.10"\n[[addresses]]\naddress = "2001:db8::x"\n',
        "addresses[1].address: '2001:db8::x' is not an IPv4 or IPv6 address",
    ),
    (
        "duplicate",
        GOOD
        + '[[addresses]]\naddress = "2001:db8::10"\n[[addresses]]\naddress = "2001:db8:0:0::10"\n',
        "addresses[1].address: 2001:db8::10 is already addresses[0]",
    ),
    ("empty list", top("addresses = []"), "addresses: the list is empty"),
    (
        "both forms",
        top('addresses = [{address = "203.0.113.10"}]')
        + '[floating_ip]\naddress = "203.0.113.11"\n',
        "addresses: give either [floating_ip] or [[addresses]]",
    ),
    (
        "droplet_id beside floating_ip",
        top("droplet_id = 5") + '[floating_ip]\naddress = "203.0.113.10"\n',
        "droplet_id: with [floating_ip], set floating_ip.droplet_id",
    ),
    (
        "budget too small to share",
        TWO + "[assigner]\nrequests_per_minute = 1\n",
        "assigner.requests_per_minute: 1 cannot be shared by 2 addresses",
    ),
]


@pytest.mark.parametrize(("case", "text", "message"), BAD, ids=[c[0] for c in BAD])
def test_mistakes_name_the_key(workdir: Path, case: str, text: str, message: str) -> None:
    with pytest.raises(config.ConfigError) as caught:
        config.load(write(workdir, text), env={})
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_check_config_exits_2_naming_the_wrong_key(workdir: Path) -> None:
    path = write(workdir, GOOD + '[[addresses]]\naddres = "203.0.113.10"\n')
    result = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "addresses[0].addres" in lines[0], result.stderr


def test_check_config_lists_the_addresses(workdir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "check-config", "--config", str(write(workdir, TWO))],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={"PATH": "/usr/bin:/bin", "DIGITALOCEAN_TOKEN": "dop_v1_x"},
    )
    assert result.returncode == 0, result.stderr
    assert "address 203.0.113.10 (ipv4)" in result.stdout
    assert "address 2001:db8::10 (ipv6)" in result.stdout
