"""The rehearsal's first half without namespaces: Terraform renders every droplet's user_data.

tests/test_rehearsal.py runs these files in namespace droplets (root only); rendering needs
only the terraform binary, so it is checked here on any machine that has one.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from rehearsal.hcl import HCLScanError, parse_body
from rehearsal.render import RenderError, render_user_data, terraform_binary

USER_DATA_LIMIT = 64 * 1024
VARIABLES = {
    "do_token": "terraform-token",
    "sidecar_do_token": "dop_v1_sidecar",
    "cluster_key": base64.b64encode(bytes(range(32))).decode(),
    "ssh_key_fingerprints": ["aa:bb"],
    "admin_cidr": "203.0.113.7/32",
    "sidecar_image": "registry.example.com/fip-sidecar:1",
}
KNOWN = {"digitalocean_reserved_ip.service.ip_address": "203.0.113.10"}
needs_terraform = pytest.mark.skipif(
    terraform_binary() is None, reason="NO TERRAFORM ON THIS MACHINE: cannot render user_data"
)

SAMPLE = """
# a comment with { braces
locals {
  text = "a } and ${jsonencode({ x = "}" })} end" // trailing
  doc  = <<-EOT
    { not a block
    EOT
  list = [
    1, # inside
    { y = 2 },
  ]
  escaped = "$${not_interpolated} \\" quote"
}
resource "kind" "name" {
  count = 2
  nested {
    a = 1
  }
}
"""


def test_the_scanner_keeps_expressions_verbatim() -> None:
    attributes, blocks = parse_body(SAMPLE)
    assert attributes == {}
    assert [(b.type, b.labels) for b in blocks] == [("locals", ()), ("resource", ("kind", "name"))]
    values, _ = parse_body(blocks[0].body)
    assert values["text"] == '"a } and ${jsonencode({ x = "}" })} end"'
    assert values["doc"].startswith("<<-EOT") and values["doc"].endswith("EOT")
    assert values["list"].startswith("[") and values["list"].endswith("]")
    assert values["escaped"] == '"$${not_interpolated} \\" quote"'
    resource, nested = parse_body(blocks[1].body)
    assert resource == {"count": "2"}
    assert [(b.type, b.body.strip()) for b in nested] == [("nested", "a = 1")]


@pytest.mark.parametrize(
    "broken", ['x = "open', "x = (1", "x = <<EOT\nnever closed\n", "= 1", "x = [1}"]
)
def test_the_scanner_says_what_it_cannot_walk(broken: str) -> None:
    with pytest.raises(HCLScanError):
        parse_body(broken)


@needs_terraform
def test_terraform_renders_every_droplets_user_data(tmp_path: Path) -> None:
    rendered = render_user_data(tmp_path, VARIABLES, KNOWN)
    assert [(u.resource, u.node_id) for u in rendered] == [
        ("digitalocean_droplet.eligible[0]", 1),
        ("digitalocean_droplet.eligible[1]", 2),
        ("digitalocean_droplet.witness[0]", 3),
    ]
    for user_data in rendered:
        assert len(user_data.text.encode()) < USER_DATA_LIMIT
        cluster = json.loads(user_data.files["/etc/fip-sidecar/cluster.json"]["content"])
        assert cluster["reserved_ip"] == "203.0.113.10"
        token = user_data.files["/etc/fip-sidecar/do_token"]["content"]
        assert token.strip() == VARIABLES["sidecar_do_token"]
        assert "/usr/local/sbin/fip-sidecar-apply" in user_data.files


@needs_terraform
def test_the_variables_validations_run_while_rendering(tmp_path: Path) -> None:
    with pytest.raises(RenderError, match="cluster_key must be base64"):
        render_user_data(tmp_path, {**VARIABLES, "cluster_key": "short"}, KNOWN)
    with pytest.raises(RenderError, match="rehearsal_known_after_apply"):
        render_user_data(tmp_path / "again", VARIABLES, {})


@needs_terraform
def test_enable_ipv6_renders_the_address_and_the_guest_agent_on_the_eligible_pair(
    tmp_path: Path,
) -> None:
    known = {**KNOWN, "digitalocean_reserved_ipv6.service[0].ip": "2001:db8:f::10"}
    variables = {**VARIABLES, "enable_ipv6": True, "guest_agent_interval": 0.5}
    rendered = render_user_data(tmp_path, variables, known)
    for user_data in rendered:
        assert len(user_data.text.encode()) < USER_DATA_LIMIT
        cluster = json.loads(user_data.files["/etc/fip-sidecar/cluster.json"]["content"])
        assert cluster["reserved_ipv6"] == "2001:db8:f::10"
        unit = user_data.files.get("/etc/systemd/system/fip-guest.service")
        if user_data.node_id == 3:
            assert unit is None
            continue
        assert unit is not None
        assert "--entrypoint fip-guest registry.example.com/fip-sidecar:1 agent" in unit["content"]
        assert "--interval 0.5 --ipv6-device lo --no-ipv4-route" in unit["content"]
    # Off (the default), the IPv6 lookup is never needed: no unit, an empty address.
    (first, *_) = render_user_data(tmp_path / "off", VARIABLES, KNOWN)
    assert "/etc/systemd/system/fip-guest.service" not in first.files
    assert (
        json.loads(first.files["/etc/fip-sidecar/cluster.json"]["content"])["reserved_ipv6"] == ""
    )
