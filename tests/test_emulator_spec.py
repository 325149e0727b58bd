"""The emulator's responses against DigitalOcean's published OpenAPI excerpt.

Every `/v2/` response in the emulator tests is validated by the harness hook; this file
proves the checker itself can fail, and that one scenario produces every documented
(operation, status) pair the sidecar's client will meet, each validated.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
import yaml
from emulator import harness
from emulator.harness import IP, admin_client, api_client, assign, make_emulator
from emulator.openapi import MISSING_REASON, SPEC_DIR, check_response, spec_present

pytestmark = pytest.mark.skipif(not spec_present(), reason=MISSING_REASON)

RESERVED = "resources/reserved_ips/responses"
SHARED = "shared/responses"


HEADERS = {
    "ratelimit-limit": "5000",
    "ratelimit-remaining": "4999",
    "ratelimit-reset": "1444931833",
}


def example(relative: str) -> Any:
    content = yaml.safe_load((SPEC_DIR / relative).read_text())["content"]["application/json"]
    return content["schema"]["example"]


def test_spec_examples_pass_and_broken_bodies_fail() -> None:
    listed = example(f"{RESERVED}/reserved_ip_list.yml")
    check_response("GET", "/v2/reserved_ips", 200, listed, HEADERS)
    action = example(f"{RESERVED}/reserved_ip_action.yml")
    check_response("POST", f"/v2/reserved_ips/{IP}/actions", 201, action, HEADERS)

    broken_action = {"action": {**action["action"], "status": "done"}}
    with pytest.raises(AssertionError, match="not one of"):
        check_response("POST", f"/v2/reserved_ips/{IP}/actions", 201, broken_action, {})
    with pytest.raises(AssertionError, match="'total' is a required property"):
        check_response("GET", "/v2/reserved_ips", 200, {**listed, "meta": {}}, {})
    with pytest.raises(AssertionError, match="is not a 'ipv4'"):
        check_response("GET", f"/v2/reserved_ips/{IP}", 200, {"reserved_ip": {"ip": "x"}}, {})
    with pytest.raises(AssertionError, match="'message' is a required property"):
        check_response("GET", "/v2/actions/1", 404, {"id": "not_found"}, {})
    with pytest.raises(AssertionError, match=r"lacks \['reserved_ip'\]"):
        check_response("GET", f"/v2/floating_ips/{IP}", 200, {"ip": IP}, HEADERS)
    error = {"id": "not_found", "message": "m"}
    check_response("GET", "/v2/actions/1", 404, error, HEADERS)
    with pytest.raises(AssertionError, match="lacks header ratelimit-reset"):
        headers = {k: v for k, v in HEADERS.items() if k != "ratelimit-reset"}
        check_response("GET", "/v2/actions/1", 404, error, headers)
    with pytest.raises(AssertionError, match="is not an integer"):
        check_response("GET", "/v2/actions/1", 404, error, {**HEADERS, "ratelimit-limit": "x"})


async def test_every_documented_response_is_produced_and_valid(
    autojump_clock: trio.testing.MockClock,
) -> None:
    harness.checked_files.clear()
    emulator = make_emulator(action_seconds=1.0, rate_limit_per_minute=50)
    async with api_client(emulator) as client, admin_client(emulator) as admin:
        await client.get("/v2/reserved_ips")
        await client.get(f"/v2/reserved_ips/{IP}")
        action_id = (await assign(client, 1002)).json()["action"]["id"]
        await client.get(f"/v2/reserved_ips/{IP}/actions/{action_id}")
        await client.get(f"/v2/reserved_ips/{IP}/actions")
        await client.get(f"/v2/actions/{action_id}")
        await client.get("/v2/actions")
        await trio.sleep(1.0)
        await client.get(f"/v2/actions/{action_id}")  # completed, with completed_at
        await client.get("/v2/floating_ips")
        await assign(client, 1002)  # 422 (already the holder): the `default` error body
        await client.get("/v2/reserved_ips/203.0.113.99")  # 404
        await client.get("/v2/actions", headers={"Authorization": "Bearer wrong"})  # 401
        await admin.post("/_emulator/faults", json={"error_rate": 1.0, "error_status": 500})
        await client.get(f"/v2/reserved_ips/{IP}")  # 500
        await admin.post("/_emulator/faults", json={"clear": True, "force_429_seconds": 1.0})
        await client.get(f"/v2/reserved_ips/{IP}")  # 429
        await trio.sleep(1.0)
        await client.get("/v2/droplets", params={"tag_name": "x", "per_page": 1})
        await client.get("/v2/droplets/1001")
        await client.get("/v2/droplets/4242")  # 404
        emulator.tokens.grant("scoped", ["reserved_ip:read"])
        await client.get("/v2/droplets/1001", headers={"Authorization": "Bearer scoped"})  # 403
    produced = {path.split("specification/")[1] for path in harness.checked_files}
    assert produced >= {
        f"{RESERVED}/reserved_ip_list.yml",
        f"{RESERVED}/reserved_ip.yml",
        f"{RESERVED}/reserved_ip_action.yml",
        f"{RESERVED}/reserved_ip_actions.yml",
        "resources/actions/responses/action.yml",
        "resources/actions/responses/actions.yml",
        f"{SHARED}/unexpected_error.yml",
        f"{SHARED}/not_found.yml",
        f"{SHARED}/unauthorized.yml",
        f"{SHARED}/server_error.yml",
        f"{SHARED}/too_many_requests.yml",
        "resources/droplets/responses/all_droplets.yml",
        "resources/droplets/responses/existing_droplet.yml",
    }
