"""Write this droplet's fip-sidecar config, filling in the peers' current addresses.

Why this runs on the droplet instead of Terraform templating the addresses: every member's
config names every other member's address, so templating them into user_data makes a
dependency cycle (droplet 1 needs droplet 2's address and the other way round), and any
replaced droplet would force a new user_data, and so a replacement, on all the others.
Instead Terraform writes the static part (`cluster.json`: node ids, eligibility, tags, the
reserved IP and, with enable_ipv6, the reserved IPv6, ports) and tags each droplet
`<cluster_tag>-node-<id>`; this script asks the DigitalOcean API (`droplet:read` and
`tag:read` scopes) for the tagged droplets and renders `config.toml`.
Membership stays static (the ids come from Terraform, never from droplet ids); only the
addresses are looked up: a peer in this droplet's region is reached on its private (VPC)
address, one in another region on its public address (VPCs are regional).

Runs on the droplet's own python3 (standard library only), from a systemd timer, so that a
replaced peer is picked up. Every outcome is one line on stderr (the journal). Exit codes:

- 0 config unchanged, 10 config written (the caller sends the sidecar SIGHUP);
- 75 waiting: the token is not placed yet, or the peers' droplets do not exist yet (normal
  during the first minutes; the systemd unit counts it as success);
- 77 the API refused the token (HTTP 401 or 403: wrong, revoked, or missing the
  `droplet:read` or `tag:read` scope), 69 the API is unavailable (unreachable, timeout,
  HTTP 429 or 5xx, or any other status), 76 the API answered something that is not a
  droplet list. These fail the unit, so that they are visible in `systemctl --failed`;
  the timer retries.

FIP_SIDECAR_CLUSTER_FILE overrides /etc/fip-sidecar/cluster.json (for tests and rehearsals).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CLUSTER_FILE = Path("/etc/fip-sidecar/cluster.json")
EXIT_UNCHANGED = 0
EXIT_CHANGED = 10
EXIT_UNAVAILABLE = 69  # sysexits EX_UNAVAILABLE
EXIT_TEMPORARY = 75  # EX_TEMPFAIL
EXIT_PROTOCOL = 76  # EX_PROTOCOL
EXIT_TOKEN_REFUSED = 77  # EX_NOPERM
SIDECAR_UID = 10001
# How much of an error body to quote: enough for DigitalOcean's {"id":..., "message":...}.
BODY_EXCERPT = 200


class NotReady(Exception):
    """The config cannot be written yet (token not placed, peers not created); retried."""


class ApiError(Exception):
    """The API call failed; `exit_code` says how (refused token, unavailable, bad answer)."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def toml_string(value: str) -> str:
    """A TOML basic string (JSON's escaping is a valid subset of TOML's)."""
    return json.dumps(value)


def node_id_of(droplet: Mapping[str, Any], cluster_tag: str) -> int | None:
    prefix = f"{cluster_tag}-node-"
    for tag in droplet.get("tags", []):
        if isinstance(tag, str) and tag.startswith(prefix) and tag[len(prefix) :].isdigit():
            return int(tag[len(prefix) :])
    return None


def address_of(droplet: Mapping[str, Any], kind: str) -> str | None:
    for network in droplet.get("networks", {}).get("v4", []):
        if network.get("type") == kind and network.get("ip_address"):
            return str(network["ip_address"])
    return None


def render_config(cluster: Mapping[str, Any], droplets: Sequence[Mapping[str, Any]]) -> str:
    """The TOML config for `cluster["node_id"]`, given the API's droplet objects."""
    by_id: dict[int, Mapping[str, Any]] = {}
    for droplet in droplets:
        node_id = node_id_of(droplet, cluster["cluster_tag"])
        if node_id is not None:
            if node_id in by_id:
                raise NotReady(f"two droplets carry the tag for node {node_id}")
            by_id[node_id] = droplet
    me = cluster["node_id"]
    if me not in by_id:
        raise NotReady(f"no droplet tagged as node {me} (this one) yet")
    my_region = by_id[me]["region"]["slug"]
    port = cluster["election_port"]
    lines = [
        "# Written by configure_sidecar.py from cluster.json and the DigitalOcean API.",
        f"node_id = {me}",
        f'bind = "0.0.0.0:{port}"',
        f"status_listen = {toml_string(cluster['status_listen'])}",
        'cluster_key_file = "/etc/fip-sidecar/cluster.key"',
        f"eligible = {'true' if cluster['members'][str(me)]['eligible'] else 'false'}",
        f"profile = {toml_string(cluster['profile'])}",
        "",
    ]
    for peer_id in sorted(int(key) for key in cluster["members"]):
        if peer_id == me:
            continue
        if peer_id not in by_id:
            raise NotReady(f"no droplet tagged as node {peer_id} yet")
        droplet = by_id[peer_id]
        same_region = droplet["region"]["slug"] == my_region
        address = address_of(droplet, "private" if same_region else "public")
        if address is None:
            raise NotReady(f"node {peer_id} has no address yet")
        eligible = cluster["members"][str(peer_id)]["eligible"]
        lines += [
            "[[peers]]",
            f"id = {peer_id}",
            f'address = "{address}:{port}"',
            f"eligible = {'true' if eligible else 'false'}",
            "",
        ]
    lines += address_lines(cluster)
    lines += [
        "[digitalocean]",
        'token_file = "/etc/fip-sidecar/do_token"',
        "",
    ]
    if cluster.get("health_url"):
        lines += ["[health]", f"http = {toml_string(cluster['health_url'])}", ""]
    return "\n".join(lines)


def address_lines(cluster: Mapping[str, Any]) -> list[str]:
    """The reserved addresses the leader holds: one `[floating_ip]` for the IPv4 alone (the
    form every sidecar version reads, so a deployment without IPv6 keeps its config byte for
    byte), `[[addresses]]` for the IPv4 and the reserved IPv6 (enable_ipv6)."""
    addresses = [cluster["reserved_ip"]]
    if cluster.get("reserved_ipv6"):
        addresses.append(cluster["reserved_ipv6"])
    if len(addresses) == 1:
        return ["[floating_ip]", f"address = {toml_string(addresses[0])}", ""]
    lines = []
    for address in addresses:
        lines += ["[[addresses]]", f"address = {toml_string(address)}", ""]
    return lines


def excerpt(body: bytes) -> str:
    text = body[:BODY_EXCERPT].decode("utf-8", "replace")
    return " ".join(text.split())


def fetch_droplets(api_url: str, token: str, tag: str) -> list[dict[str, Any]]:
    """The droplets carrying `tag`; raises ApiError naming the status code on any failure."""
    url = f"{api_url}/v2/droplets?tag_name={urllib.parse.quote(tag)}&per_page=200"
    request = urllib.request.Request(
        url, headers={"Authorization": f"Bearer {token}", "Accept": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        detail = f"HTTP {exc.code} from GET /v2/droplets: {excerpt(exc.read())}"
        if exc.code in (401, 403):
            raise ApiError(
                EXIT_TOKEN_REFUSED,
                f"DigitalOcean API refused the token ({detail}); check the token and its "
                "droplet:read and tag:read scopes",
            ) from None
        raise ApiError(EXIT_UNAVAILABLE, f"DigitalOcean API failed: {detail}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ApiError(
            EXIT_UNAVAILABLE, f"DigitalOcean API unreachable: {type(exc).__name__}: {reason}"
        ) from None
    try:
        body = json.loads(raw)
    except ValueError:
        raise ApiError(
            EXIT_PROTOCOL, f"DigitalOcean API answered with something not JSON: {excerpt(raw)}"
        ) from None
    droplets = body.get("droplets") if isinstance(body, dict) else None
    if not isinstance(droplets, list) or not all(isinstance(d, dict) for d in droplets):
        raise ApiError(
            EXIT_PROTOCOL, f"DigitalOcean API answer has no droplet list: {excerpt(raw)}"
        )
    return droplets


def write_if_changed(path: Path, text: str) -> bool:
    """Atomically replace `path` with `text` (mode 0600, owned by the sidecar user)."""
    try:
        if path.read_text() == text:
            return False
    except FileNotFoundError:
        pass
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".config.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(temporary, 0o600)
    if os.geteuid() == 0:
        os.chown(temporary, SIDECAR_UID, SIDECAR_UID)
    os.replace(temporary, path)
    return True


def main() -> int:
    cluster_file = Path(os.environ.get("FIP_SIDECAR_CLUSTER_FILE", CLUSTER_FILE))
    cluster = json.loads(cluster_file.read_text())
    token_file = Path(cluster["token_file"])
    try:
        token = token_file.read_text().strip()
        if not token:
            raise NotReady(f"{token_file} is empty")
        droplets = fetch_droplets(cluster["api_url"], token, cluster["cluster_tag"])
        text = render_config(cluster, droplets)
    except FileNotFoundError:
        print(f"configure_sidecar: waiting for {token_file} to be placed", file=sys.stderr)
        return EXIT_TEMPORARY
    except NotReady as exc:
        print(f"configure_sidecar: not ready: {exc}", file=sys.stderr)
        return EXIT_TEMPORARY
    except ApiError as exc:
        print(f"configure_sidecar: error: {exc}", file=sys.stderr)
        return exc.exit_code
    changed = write_if_changed(Path(cluster["config_file"]), text)
    print(f"configure_sidecar: config {'written' if changed else 'unchanged'}", file=sys.stderr)
    return EXIT_CHANGED if changed else EXIT_UNCHANGED


if __name__ == "__main__":
    sys.exit(main())
