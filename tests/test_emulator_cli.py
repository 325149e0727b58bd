"""The `emulate` flags: what they build, and one-line errors (exit 2) for mistakes."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from sidecar.emulator import cli


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_flags_build_the_account(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cli.TOKEN_ENV, "from-env")
    args = parse(
        "--reserved-ip", "203.0.113.10=nyc3:1001",
        "--reserved-ip", "203.0.113.20=nyc3",
        "--droplet", "1001=nyc3=http://127.0.0.1:8080/?a=b",
        "--droplet", "1002=nyc3",
        "--action-seconds", "0.25",
        "--action-404-seconds", "0.5",
        "--propagation-delay", "1.5",
        "--rate-limit-per-minute", "10",
        "--rate-limit-per-hour", "20",
        "--edge-reserved-ip", "203.0.113.20",
    )  # fmt: skip
    emulator = cli.build_emulator(args)
    assert emulator.token == "from-env"
    assert emulator.state.reserved_ips["203.0.113.10"].droplet_id == 1001
    assert emulator.state.reserved_ips["203.0.113.20"].droplet_id is None
    assert emulator.state.droplets[1001].web_url == "http://127.0.0.1:8080/?a=b"
    assert emulator.state.droplets[1002].web_url is None
    assert emulator.edge_ip == "203.0.113.20"
    settings = emulator.settings
    assert (settings.action_seconds, settings.action_404_seconds) == (0.25, 0.5)
    assert settings.propagation_delay == 1.5
    assert (settings.rate_limit_per_minute, settings.rate_limit_per_hour) == (10, 20)
    assert args.listen == "127.0.0.1:8089"


def test_json_droplets_and_token_scopes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cli.TOKEN_ENV, "scoped")
    droplet = (
        '{"id": 3001, "region": "nyc3", "tags": ["fip-cluster", "fip-cluster-node-1"],'
        ' "public_ipv4": "198.18.0.11", "private_ipv4": "198.18.1.11", "boot_seconds": 5}'
    )
    args = parse(
        "--droplet", droplet,
        "--token-scopes", "reserved_ip:read, droplet:read",
        "--metadata-listen", "198.18.0.100:80",
    )  # fmt: skip
    emulator = cli.build_emulator(args)
    made = emulator.state.droplets[3001]
    assert made.tags == ("fip-cluster", "fip-cluster-node-1")
    assert made.addresses == ("198.18.0.11", "198.18.1.11")
    assert emulator.state.is_booting(3001)
    grant = emulator.tokens.lookup("scoped")
    assert grant is not None and grant.scopes == {"reserved_ip:read", "droplet:read"}
    assert args.metadata_listen == "198.18.0.100:80"


def test_token_file_wins_and_is_stripped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cli.TOKEN_ENV, "from-env")
    token_file = tmp_path / "token"
    token_file.write_text("  from-file\n")
    assert cli.build_emulator(parse("--token-file", str(token_file))).token == "from-file"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ((), "no API token"),
        (("--token-file", "/nonexistent/token"), "cannot read"),
        (("--droplet", "1=nyc3", "--droplet", "1=nyc3"), "listed twice"),
        (("--reserved-ip", "203.0.113.10=nyc3:7"), "could not be found"),
        (("--droplet", "7=sfo3", "--reserved-ip", "203.0.113.10=nyc3:7"), "same region"),
        (("--reserved-ip", "not-an-ip=nyc3"), "IPv4"),
        (("--action-seconds", "-1"), "action_seconds must be >= 0"),
        (("--rate-limit-per-minute", "0"), "rate_limit_per_minute must be >= 1"),
        (("--edge-reserved-ip", "203.0.113.99"), "is not a --reserved-ip"),
        (("--tls-cert", "/tmp/cert.pem"), "go together"),
        (("--token-scopes", "everything"), "--token-scopes: scope 'everything'"),
        (("--token-scopes", ","), "at least one scope"),
        (("--droplet", '{"id": 1, "region": "nyc3", "public_ipv4": "x"}'), "public_ipv4 'x'"),
        (
            (
                "--droplet",
                '{"id": 1, "region": "nyc3", "public_ipv4": "198.18.0.1"}',
                "--droplet",
                '{"id": 2, "region": "nyc3", "private_ipv4": "198.18.0.1"}',
            ),
            "address 198.18.0.1 is droplet 1's",
        ),
    ],
)
def test_mistakes_exit_2_with_one_line(
    argv: tuple[str, ...],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if argv[:1] != ("--token-file",) and argv:
        monkeypatch.setenv(cli.TOKEN_ENV, "t")
    else:
        monkeypatch.delenv(cli.TOKEN_ENV, raising=False)
    assert cli.run(parse(*argv)) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and err.startswith("fip-sidecar emulate: ")


@pytest.mark.parametrize(
    "argv",
    [
        ("--listen", "8080"),
        ("--listen", "host:http"),
        ("--reserved-ip", "203.0.113.10"),
        ("--reserved-ip", "203.0.113.10=nyc3:abc"),
        ("--droplet", "abc=nyc3"),
        ("--droplet", "12"),
        ("--droplet", '{"id": 1}'),
        ("--droplet", '{"id": 1, "region": "nyc3", "colour": "red"}'),
        ("--metadata-listen", "80"),
    ],
)
def test_malformed_flags_are_usage_errors(argv: tuple[str, ...]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2
