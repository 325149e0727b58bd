"""Custom-scoped and revoked tokens, and the `done` status fault, in-process.

The scopes each operation needs are the `security` blocks of the OpenAPI excerpt; the one
filter with a scope of its own is `tag_name` ("Requires `tag:read` scope").
"""

from __future__ import annotations

import trio
import trio.testing
from emulator.harness import IP, TOKEN, admin_client, api_client, assign, make_emulator

from sidecar.emulator import Emulator, EmulatorSettings

SCOPED = "scoped-test-token"
#: What the README tells users to give the sidecars, with the read scopes the control panel
#: requires alongside them.
README_SCOPES = [
    "reserved_ip:read",
    "reserved_ip:update",
    "droplet:read",
    "actions:read",
    "regions:read",
    "sizes:read",
    "image:read",
]


async def test_a_scoped_token_gets_403_outside_its_scopes() -> None:
    emulator = make_emulator()
    emulator.tokens.grant(SCOPED, ["reserved_ip:read"])
    async with api_client(emulator, token=SCOPED) as client:
        read = await client.get(f"/v2/reserved_ips/{IP}")
        listed = await client.get("/v2/reserved_ips")
        post = await assign(client, 1002)
        droplets = await client.get("/v2/droplets/1001")
        actions = await client.get("/v2/actions")
    assert (read.status_code, listed.status_code) == (200, 200)
    for refused in (post, droplets, actions):
        assert refused.status_code == 403, refused.request.url
        assert refused.json()["id"] == "forbidden"
        assert refused.headers["ratelimit-remaining"].isdigit()
    assert emulator.state.actions == {}, "a refused assign starts nothing"


async def test_the_readme_scopes_cannot_list_droplets_by_tag_without_tag_read() -> None:
    emulator = make_emulator()
    emulator.tokens.grant(SCOPED, README_SCOPES)
    async with api_client(emulator, token=SCOPED) as client:
        by_id = await client.get("/v2/droplets/1001")
        untagged = await client.get("/v2/droplets")
        by_tag = await client.get("/v2/droplets", params={"tag_name": "fip-cluster"})
        emulator.tokens.grant(SCOPED, [*README_SCOPES, "tag:read"])
        with_tag_read = await client.get("/v2/droplets", params={"tag_name": "fip-cluster"})
        post = await assign(client, 1002)
    assert (by_id.status_code, untagged.status_code) == (200, 200)
    assert by_tag.status_code == 403, "configure_sidecar.py's call needs tag:read"
    assert with_tag_read.status_code == 200
    assert post.status_code == 201


async def test_revoked_and_unknown_tokens_get_401_and_full_access_gets_everything() -> None:
    emulator = make_emulator()
    async with admin_client(emulator) as admin:
        granted = await admin.post("/_emulator/tokens", json={"token": SCOPED, "scopes": None})
        async with api_client(emulator, token=SCOPED) as client:
            before = await client.get("/v2/droplets", params={"tag_name": "x"})
            revoked = await admin.post("/_emulator/tokens/revoke", json={"token": SCOPED})
            after = await client.get(f"/v2/reserved_ips/{IP}")
        again = await admin.post("/_emulator/tokens/revoke", json={"token": SCOPED})
        bad_scope = await admin.post("/_emulator/tokens", json={"token": "t", "scopes": ["all"]})
        no_scope = await admin.post("/_emulator/tokens", json={"token": "t", "scopes": []})
    async with api_client(emulator) as client:
        original = await client.get("/v2/actions")
    assert granted.json() == {"tokens": 2, "scopes": None}
    assert before.status_code == 200, "full access includes tag:read"
    assert revoked.status_code == 200
    assert after.status_code == 401 and after.json()["id"] == "unauthorized"
    assert again.status_code == 404
    assert bad_scope.status_code == 400 and "resource:verb" in bad_scope.json()["message"]
    assert no_scope.status_code == 400
    assert original.status_code == 200, "the emulator's own token is untouched"


async def test_constructor_scopes() -> None:
    emulator = Emulator(TOKEN, EmulatorSettings(), token_scopes=["droplet:read"])
    emulator.state.add_droplet(1001, "nyc3")
    async with api_client(emulator) as client:
        droplet = await client.get("/v2/droplets/1001")
        actions = await client.get("/v2/actions")
    assert (droplet.status_code, actions.status_code) == (200, 403)


async def test_an_action_can_end_with_a_status_the_spec_does_not_list(
    autojump_clock: trio.testing.MockClock,
) -> None:
    emulator = make_emulator(action_seconds=1.0)
    async with api_client(emulator, checked=False) as client, admin_client(emulator) as admin:
        await admin.post("/_emulator/faults", json={"action_completed_status": "done"})
        action_id = (await assign(client, 1002)).json()["action"]["id"]
        running = (await client.get(f"/v2/actions/{action_id}")).json()["action"]
        await trio.sleep(1.0)
        via_ip = (await client.get(f"/v2/reserved_ips/{IP}/actions/{action_id}")).json()
        listed = (await client.get("/v2/actions")).json()["actions"]
        await admin.post("/_emulator/faults", json={"action_completed_status": ""})
        restored = (await client.get(f"/v2/actions/{action_id}")).json()["action"]
        bad = await admin.post("/_emulator/faults", json={"action_completed_status": "errored"})
    assert running["status"] == "in-progress"
    assert via_ip["action"]["status"] == "done"
    assert listed[0]["status"] == "done"
    assert restored["status"] == "completed"
    assert bad.status_code == 400
    assert emulator.state.reserved_ips[IP].droplet_id == 1002, "the move itself happened"
