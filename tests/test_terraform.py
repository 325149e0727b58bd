"""The DigitalOcean deployment in terraform/, checked without a cloud account.

No provider can be downloaded here, so `terraform validate/plan` cannot run. Instead every .tf
is parsed with python-hcl2 and the topology that the design depends on is asserted (three
droplets, the witness elsewhere, a reserved IP Terraform never assigns, a firewall that keeps
the election port inside the cluster, secrets marked sensitive), the cloud-init template is
rendered the way templatefile() renders it (and compared with the real terraform binary when
one is on PATH), the config it leads to is fed to `fip-sidecar check-config`, and checkov runs
its DigitalOcean policies.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import hcl2
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
TERRAFORM = ROOT / "terraform"
TEMPLATE = TERRAFORM / "cloud-init.yaml.tftpl"
CONFIGURE_SCRIPT = TERRAFORM / "files" / "configure_sidecar.py"
VENV_BIN = Path(sys.executable).parent
USER_DATA_LIMIT = 64 * 1024

ANYWHERE = ["0.0.0.0/0", "::/0"]
SENSITIVE_VARIABLES = {"do_token", "sidecar_do_token", "cluster_key"}
# Inputs as long as real ones get: a 71-character DO token, a 44-character key, long names.
SAMPLE_TOKEN = "dop_v1_" + "ab" * 32
SAMPLE_KEY = "3iQ+dIJM3cVPZKsjAMe/JVEX85sO0p03Ahni7cIhq8Y="


# --- parsing helpers ---------------------------------------------------------------------------


def tf_files() -> list[Path]:
    return sorted(TERRAFORM.glob("*.tf"))


@pytest.fixture(scope="module")
def parsed() -> dict[str, list[Any]]:
    """All blocks of all .tf files, merged by block type."""
    merged: dict[str, list[Any]] = {}
    for path in tf_files():
        with path.open() as handle:
            for block_type, blocks in hcl2.load(handle).items():
                merged.setdefault(block_type, []).extend(blocks)
    return merged


def resources(parsed: Mapping[str, list[Any]], kind: str) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for block in parsed.get("resource", []):
        for resource_kind, named in block.items():
            if resource_kind == kind:
                found.update(named)
    return found


def locals_of(parsed: Mapping[str, list[Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for block in parsed.get("locals", []):
        merged.update({k: v for k, v in block.items() if not k.startswith("__")})
    return merged


def single(value: Any) -> Any:
    """python-hcl2 wraps attribute values in one-element lists."""
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def resolve(value: Any, local_values: Mapping[str, Any]) -> Any:
    """Follow `${local.name}` references (as python-hcl2 renders them) to their values."""
    value = single(value)
    while isinstance(value, str) and (match := re.fullmatch(r"\$\{local\.(\w+)\}", value)):
        value = single(local_values[match[1]])
    if isinstance(value, list):
        return [resolve(item, local_values) for item in value]
    return value


def variables(parsed: Mapping[str, list[Any]]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for block in parsed.get("variable", []):
        found.update(block)
    return found


# --- topology ----------------------------------------------------------------------------------


def test_every_tf_file_parses_and_the_expected_files_exist() -> None:
    names = {path.name for path in tf_files()}
    assert {"versions.tf", "variables.tf", "main.tf", "firewall.tf", "outputs.tf"} <= names
    for path in tf_files():
        with path.open() as handle:
            assert hcl2.load(handle), path


def test_provider_and_terraform_versions(parsed: dict[str, list[Any]]) -> None:
    (terraform_block,) = parsed["terraform"]
    assert single(terraform_block["required_version"]) == ">= 1.5"
    providers = single(terraform_block["required_providers"])
    digitalocean = single(providers["digitalocean"])
    assert digitalocean["source"] == "digitalocean/digitalocean"
    assert digitalocean["version"] == "~> 2.0"


def test_three_droplets_two_eligible_in_primary_and_a_witness_elsewhere(
    parsed: dict[str, list[Any]],
) -> None:
    droplets = resources(parsed, "digitalocean_droplet")
    assert set(droplets) == {"eligible", "witness"}
    count = sum(int(single(d.get("count", [1]))) for d in droplets.values())
    assert count == 3
    assert single(droplets["eligible"]["count"]) == 2
    assert single(droplets["eligible"]["region"]) == "${var.primary_region}"
    assert single(droplets["witness"]["region"]) == "${var.witness_region}"
    # The regions must differ: enforced by a precondition (variable validations cannot look
    # at another variable before Terraform 1.9).
    preconditions = [
        single(p["condition"])
        for lifecycle in droplets["witness"]["lifecycle"]
        for p in lifecycle.get("precondition", [])
    ]
    assert "${var.witness_region != var.primary_region}" in preconditions


def test_node_ids_are_fixed_config_values_in_user_data(parsed: dict[str, list[Any]]) -> None:
    droplets = resources(parsed, "digitalocean_droplet")
    eligible_user_data = single(droplets["eligible"]["user_data"])
    witness_user_data = single(droplets["witness"]["user_data"])
    assert "'node_id': '${count.index + 1}'" in eligible_user_data
    assert "'node_id': 3" in witness_user_data
    assert ".id" not in re.sub(r"digitalocean_tag\.\w+(\[[^\]]*\])?\.id", "", eligible_user_data)
    members = single(locals_of(parsed)["members"])
    assert members == {"1": {"eligible": True}, "2": {"eligible": True}, "3": {"eligible": False}}


def test_reserved_ip_has_a_region_no_droplet_and_cannot_be_destroyed(
    parsed: dict[str, list[Any]],
) -> None:
    reserved = resources(parsed, "digitalocean_reserved_ip")
    assert len(reserved) == 1
    (ip,) = reserved.values()
    assert single(ip["region"]) == "${var.primary_region}"
    assert "droplet_id" not in ip
    assert single(ip["lifecycle"])["prevent_destroy"] == [True]
    assert resources(parsed, "digitalocean_reserved_ip_assignment") == {}
    assert resources(parsed, "digitalocean_floating_ip_assignment") == {}
    assert resources(parsed, "digitalocean_floating_ip") == {}


def firewall_rules(parsed: dict[str, list[Any]], direction: str) -> list[dict[str, Any]]:
    (firewall,) = resources(parsed, "digitalocean_firewall").values()
    local_values = locals_of(parsed)
    return [
        {key: resolve(value, local_values) for key, value in rule.items()}
        for rule in firewall[direction]
    ]


def test_firewall_covers_all_three_droplets(parsed: dict[str, list[Any]]) -> None:
    (firewall,) = resources(parsed, "digitalocean_firewall").values()
    ids = resolve(firewall["droplet_ids"], locals_of(parsed))
    assert "digitalocean_droplet.eligible[*].id" in ids
    assert "digitalocean_droplet.witness.id" in ids


def test_election_port_is_open_only_between_the_droplets(parsed: dict[str, list[Any]]) -> None:
    election = [r for r in firewall_rules(parsed, "inbound_rule") if r["protocol"] == "udp"]
    assert len(election) == 1
    (rule,) = election
    assert rule["port_range"] == "${tostring(var.election_port)}"
    assert set(rule) == {"protocol", "port_range", "source_droplet_ids"}
    assert "digitalocean_droplet.eligible[*].id" in rule["source_droplet_ids"]
    assert "digitalocean_droplet.witness.id" in rule["source_droplet_ids"]


def test_ssh_only_from_admin_cidr_and_http_from_anywhere(parsed: dict[str, list[Any]]) -> None:
    inbound = firewall_rules(parsed, "inbound_rule")
    by_port = {r.get("port_range"): r for r in inbound if r["protocol"] == "tcp"}
    assert set(by_port) == {"22", "80", "443"}
    assert by_port["22"]["source_addresses"] == ["${var.admin_cidr}"]
    assert set(by_port["22"]) == {"protocol", "port_range", "source_addresses"}
    for port in ("80", "443"):
        assert by_port[port]["source_addresses"] == ANYWHERE
    # Nothing else is open to the whole Internet.
    for rule in inbound:
        if rule.get("port_range") not in {"80", "443"}:
            assert not set(ANYWHERE) & set(rule.get("source_addresses", [])), rule


def test_outbound_allows_dns_https_ntp_and_election(parsed: dict[str, list[Any]]) -> None:
    outbound = {
        (r["protocol"], r.get("port_range")) for r in firewall_rules(parsed, "outbound_rule")
    }
    for needed in [("udp", "53"), ("tcp", "53"), ("tcp", "443"), ("udp", "123")]:
        assert needed in outbound
    assert ("udp", "${tostring(var.election_port)}") in outbound


def test_secret_variables_are_sensitive_and_have_no_real_default(
    parsed: dict[str, list[Any]],
) -> None:
    declared = variables(parsed)
    for name in SENSITIVE_VARIABLES:
        assert single(declared[name]["sensitive"]) is True, name
        assert single(declared[name].get("default", [""])) in ("", None), name
    outputs_text = (TERRAFORM / "outputs.tf").read_text()
    for name in SENSITIVE_VARIABLES:
        assert f"var.{name}" not in outputs_text


SECRET_PATTERNS = {
    "DigitalOcean token": re.compile(r"do[por]_v1_[0-9a-f]{16,}"),
    "base64 key of 32+ bytes": re.compile(
        r"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/]{43}=?(?![A-Za-z0-9+/])"
    ),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
}


def test_no_secret_literal_in_any_terraform_file() -> None:
    for path in sorted(p for p in TERRAFORM.rglob("*") if p.is_file()):
        text = path.read_text()
        for what, pattern in SECRET_PATTERNS.items():
            match = pattern.search(text)
            assert match is None, f"{path.relative_to(ROOT)}: looks like a {what}: {match}"


def test_secret_patterns_catch_what_they_are_for() -> None:
    assert SECRET_PATTERNS["DigitalOcean token"].search(SAMPLE_TOKEN)
    assert SECRET_PATTERNS["base64 key of 32+ bytes"].search(f'key = "{SAMPLE_KEY}"')


# --- cloud-init --------------------------------------------------------------------------------

_CONDITIONAL = re.compile(r"%\{ if (\w+) \}(.*?)%\{ endif \}", re.S)
_INTERPOLATION = re.compile(r"\$\{indent\((\d+), (\w+)\)\}|\$\{(\w+)\}")


def render_template(text: str, values: Mapping[str, Any]) -> str:
    """templatefile() for the forms the template uses: `${name}`, `${indent(n, name)}` and
    `%{ if name }...%{ endif }` without strip markers. Anything else fails loudly."""

    def interpolate(match: re.Match[str]) -> str:
        if match[1] is not None:
            return str(values[match[2]]).replace("\n", "\n" + " " * int(match[1]))
        value = values[match[3]]
        return json.dumps(value) if isinstance(value, bool) else str(value)

    unrolled = _CONDITIONAL.sub(lambda m: m[2] if values[m[1]] else "", text)
    leftovers = _INTERPOLATION.sub("", unrolled)
    assert "${" not in leftovers and "%{" not in leftovers, "template uses an unsupported form"
    return _INTERPOLATION.sub(interpolate, unrolled)


def cluster_settings(node_id: int, health_url: str) -> dict[str, Any]:
    """What main.tf's local.cluster_settings plus the per-node keys render to."""
    return {
        "cluster_tag": "fip-production-cluster",
        "members": {"1": {"eligible": True}, "2": {"eligible": True}, "3": {"eligible": False}},
        "election_port": 7401,
        "status_listen": "127.0.0.1:9401",
        "profile": "lan",
        "reserved_ip": "203.0.113.10",
        "api_url": "https://api.digitalocean.com",
        "token_file": "/etc/fip-sidecar/do_token",
        "config_file": "/etc/fip-sidecar/config.toml",
        "node_id": node_id,
        "health_url": health_url,
    }


def test_cluster_settings_sample_matches_main_tf(parsed: dict[str, list[Any]]) -> None:
    declared = set(single(locals_of(parsed)["cluster_settings"]))
    assert declared | {"node_id", "health_url"} == set(cluster_settings(1, ""))


def template_values(node_id: int, *, token: bool, web: bool) -> dict[str, Any]:
    health = "http://127.0.0.1:80/" if web else ""
    return {
        "cluster_json": json.dumps(cluster_settings(node_id, health), separators=(",", ":")),
        "cluster_key": SAMPLE_KEY,
        "token_in_user_data": token,
        "sidecar_do_token": SAMPLE_TOKEN if token else "",
        "sidecar_image": "registry.example.com/some-team/fip-sidecar@sha256:" + "0" * 64,
        "run_web": web,
        "web_image": "registry.example.com/some-team/a-rather-long-web-image-name:2026.11.29",
        "configure_script": CONFIGURE_SCRIPT.read_text(),
    }


SAMPLES = [
    pytest.param(1, True, True, id="eligible-with-token"),
    pytest.param(2, False, True, id="eligible-token-placed-later"),
    pytest.param(3, True, False, id="witness-with-token"),
    pytest.param(3, False, False, id="witness-token-placed-later"),
]


def files_of(document: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {entry["path"]: entry for entry in document["write_files"]}


@pytest.mark.parametrize(("node_id", "token", "web"), SAMPLES)
def test_cloud_init_renders_valid_yaml_under_64_kib(node_id: int, token: bool, web: bool) -> None:
    rendered = render_template(TEMPLATE.read_text(), template_values(node_id, token=token, web=web))
    size = len(rendered.encode())
    print(f"user_data for node {node_id} (token={token}): {size} bytes")
    assert size < USER_DATA_LIMIT
    assert rendered.startswith("#cloud-config\n")
    document = yaml.safe_load(rendered)
    files = files_of(document)
    assert files["/etc/fip-sidecar/cluster.key"]["permissions"] == "0600"
    assert files["/etc/fip-sidecar/cluster.key"]["content"].strip() == SAMPLE_KEY
    if token:
        assert files["/etc/fip-sidecar/do_token"]["permissions"] == "0600"
        assert files["/etc/fip-sidecar/do_token"]["content"].strip() == SAMPLE_TOKEN
    else:
        assert "/etc/fip-sidecar/do_token" not in files
        assert SAMPLE_TOKEN not in rendered
    script = files["/usr/local/lib/fip-sidecar/configure_sidecar.py"]["content"]
    assert script.rstrip() == CONFIGURE_SCRIPT.read_text().rstrip()
    cluster = json.loads(files["/etc/fip-sidecar/cluster.json"]["content"])
    assert cluster["node_id"] == node_id
    apply = files["/usr/local/sbin/fip-sidecar-apply"]["content"]
    assert "--network host" in apply and "--restart unless-stopped" in apply
    runcmd = [" ".join(map(str, command)) for command in document["runcmd"]]
    assert "chown -R 10001:10001 /etc/fip-sidecar" in runcmd
    web_commands = [c for c in runcmd if c.startswith("docker run") and "--name web" in c]
    assert len(web_commands) == (1 if web else 0)
    if web:
        assert "--network host" in web_commands[0]
        assert "--restart unless-stopped" in web_commands[0]


def terraform_binary() -> str | None:
    return shutil.which("terraform") or shutil.which("tofu")


def hcl_string(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


@pytest.mark.skipif(terraform_binary() is None, reason="no terraform or tofu binary on PATH")
@pytest.mark.parametrize(("node_id", "token", "web"), SAMPLES[:2])
def test_python_rendering_matches_real_templatefile(
    node_id: int, token: bool, web: bool, tmp_path: Path
) -> None:
    values = template_values(node_id, token=token, web=web)
    for name, value in values.items():
        (tmp_path / f"{name}.txt").write_text(value if isinstance(value, str) else "")
    arguments = ", ".join(
        f"{name} = {hcl_string(value)}"
        if isinstance(value, bool)
        else f'{name} = file("{tmp_path / (name + ".txt")}")'
        for name, value in values.items()
    )
    expression = f'jsonencode(templatefile("{TEMPLATE}", {{ {arguments} }}))\n'
    binary = terraform_binary()
    assert binary is not None
    result = subprocess.run(
        [binary, "console"],
        input=expression,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        env={**os.environ, "TF_CLI_CONFIG_FILE": "/dev/null", "CHECKPOINT_DISABLE": "1"},
        check=True,
    )
    rendered_by_terraform = json.loads(json.loads(result.stdout))
    assert rendered_by_terraform == render_template(TEMPLATE.read_text(), values)


# --- the config a droplet ends up with ---------------------------------------------------------


@pytest.fixture(scope="module")
def configure() -> ModuleType:
    spec = importlib.util.spec_from_file_location("configure_sidecar", CONFIGURE_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def api_droplet(node_id: int, region: str, public: str, private: str) -> dict[str, Any]:
    """A droplet as GET /v2/droplets returns it (the fields the script reads)."""
    return {
        "id": 400000000 + node_id,
        "region": {"slug": region},
        "tags": ["fip-production-cluster", f"fip-production-cluster-node-{node_id}", "web"],
        "networks": {
            "v4": [
                {"ip_address": public, "type": "public"},
                {"ip_address": private, "type": "private"},
            ]
        },
    }


API_DROPLETS = [
    api_droplet(1, "nyc3", "198.18.1.1", "198.19.0.1"),
    api_droplet(2, "nyc3", "198.18.1.2", "198.19.0.2"),
    api_droplet(3, "tor1", "198.18.2.3", "198.19.1.3"),
]


def peers_of(text: str) -> dict[int, tuple[str, bool]]:
    return {p["id"]: (p["address"], p["eligible"]) for p in tomllib.loads(text)["peers"]}


def test_eligible_node_reaches_its_pair_privately_and_the_witness_publicly(
    configure: ModuleType,
) -> None:
    text = configure.render_config(cluster_settings(1, "http://127.0.0.1:80/"), API_DROPLETS)
    config = tomllib.loads(text)
    assert config["node_id"] == 1 and config["eligible"] is True
    assert peers_of(text) == {2: ("198.19.0.2:7401", True), 3: ("198.18.2.3:7401", False)}
    assert config["floating_ip"] == {"address": "203.0.113.10"}
    assert config["health"] == {"http": "http://127.0.0.1:80/"}
    assert config["status_listen"] == "127.0.0.1:9401"


def test_witness_reaches_both_eligible_nodes_publicly(configure: ModuleType) -> None:
    text = configure.render_config(cluster_settings(3, ""), API_DROPLETS)
    config = tomllib.loads(text)
    assert config["eligible"] is False and "health" not in config
    assert peers_of(text) == {1: ("198.18.1.1:7401", True), 2: ("198.18.1.2:7401", True)}


def test_missing_or_duplicated_members_are_not_ready(configure: ModuleType) -> None:
    settings = cluster_settings(1, "")
    with pytest.raises(configure.NotReady, match="node 3"):
        configure.render_config(settings, API_DROPLETS[:2])
    with pytest.raises(configure.NotReady, match="node 2"):
        configure.render_config(settings, [*API_DROPLETS, API_DROPLETS[1]])


def rendered_configs(configure: ModuleType) -> Iterator[tuple[int, str]]:
    for node_id in (1, 2, 3):
        health = "" if node_id == 3 else "http://127.0.0.1:80/"
        yield node_id, configure.render_config(cluster_settings(node_id, health), API_DROPLETS)


def test_rendered_configs_pass_fip_sidecar_check_config(
    configure: ModuleType, tmp_path: Path
) -> None:
    """The config a droplet ends up with is one the sidecar accepts (secret paths redirected)."""
    token_file = tmp_path / "do_token"
    token_file.write_text(SAMPLE_TOKEN)
    env = {
        **os.environ,
        "FIP_SIDECAR_CLUSTER_KEY": SAMPLE_KEY,
        "FIP_SIDECAR_DIGITALOCEAN__TOKEN_FILE": str(token_file),
    }
    for node_id, text in rendered_configs(configure):
        path = tmp_path / f"node{node_id}.toml"
        path.write_text(text)
        result = subprocess.run(
            [str(VENV_BIN / "fip-sidecar"), "check-config", "--config", str(path)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert result.returncode == 0, (node_id, result.stdout, result.stderr)


def test_config_is_written_only_when_it_changes(configure: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    assert configure.write_if_changed(path, "a = 1\n") is True
    assert path.stat().st_mode & 0o777 == 0o600
    assert configure.write_if_changed(path, "a = 1\n") is False
    assert configure.write_if_changed(path, "a = 2\n") is True
    assert path.read_text() == "a = 2\n"


# --- external checkers ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_checkov_passes_with_only_justified_skips() -> None:
    for path in tf_files():
        for line in path.read_text().splitlines():
            if "checkov:skip" in line:
                assert re.search(r"#checkov:skip=CKV_\w+:\S.{10,}", line), line
    result = subprocess.run(
        [
            str(VENV_BIN / "checkov"),
            "-d",
            str(TERRAFORM),
            "--quiet",
            "--compact",
            "--skip-download",
            "--framework",
            "terraform",
        ],
        capture_output=True,
        text=True,
        timeout=540,
        # No Prisma Cloud lookups: this machine reaches only package registries.
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    print(result.stdout[-2000:])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Failed checks: 0" in result.stdout


@pytest.mark.skipif(terraform_binary() is None, reason="no terraform or tofu binary on PATH")
def test_terraform_fmt_is_clean() -> None:
    binary = terraform_binary()
    assert binary is not None
    result = subprocess.run(
        [binary, "fmt", "-check", "-diff", "-recursive", str(TERRAFORM)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TF_CLI_CONFIG_FILE": "/dev/null", "CHECKPOINT_DISABLE": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
