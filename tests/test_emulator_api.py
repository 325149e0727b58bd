"""The emulated `/v2/` API, in-process under trio's mock clock.

Every response here is also validated against DigitalOcean's OpenAPI excerpt and checked
for the rate-limit headers by the harness's response hook.
"""

from __future__ import annotations

import trio
import trio.testing
from emulator.harness import FAR_IP, IP, SPARE_IP, admin_client, api_client, assign, make_emulator

REGION_KEYS = {"name", "slug", "features", "available", "sizes"}
DROPLET_REQUIRED = {"name", "region", "size", "image"}


async def test_get_reserved_ip_shows_holder_region_and_lock() -> None:
    emulator = make_emulator()
    async with api_client(emulator) as client:
        response = await client.get(f"/v2/reserved_ips/{IP}")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()["reserved_ip"]
    assert body["ip"] == IP
    assert body["locked"] is False
    assert body["droplet"]["id"] == 1001
    assert body["droplet"].keys() >= DROPLET_REQUIRED
    assert body["region"].keys() >= REGION_KEYS and body["region"]["slug"] == "nyc3"
    assert body["droplet"]["region"].keys() >= REGION_KEYS


async def test_unassigned_ip_has_null_droplet() -> None:
    async with api_client(make_emulator()) as client:
        body = (await client.get(f"/v2/reserved_ips/{SPARE_IP}")).json()
    assert body["reserved_ip"]["droplet"] is None


async def test_list_has_meta_and_page_links() -> None:
    async with api_client(make_emulator()) as client:
        whole = (await client.get("/v2/reserved_ips")).json()
        first = (await client.get("/v2/reserved_ips", params={"per_page": 1})).json()
        second = (await client.get("/v2/reserved_ips", params={"per_page": 1, "page": 2})).json()
    assert [r["ip"] for r in whole["reserved_ips"]] == [IP, SPARE_IP, FAR_IP]
    assert whole["meta"] == {"total": 3}
    assert whole["links"] == {}
    assert [r["ip"] for r in first["reserved_ips"]] == [IP]
    assert set(first["links"]["pages"]) == {"last", "next"}
    assert "page=3" in first["links"]["pages"]["last"]
    assert [r["ip"] for r in second["reserved_ips"]] == [SPARE_IP]
    assert set(second["links"]["pages"]) == {"first", "prev", "last", "next"}


async def test_legacy_floating_ip_paths_use_floating_ip_keys() -> None:
    emulator = make_emulator(action_seconds=0.0)
    async with api_client(emulator) as client:
        one = await client.get(f"/v2/floating_ips/{IP}")
        many = await client.get("/v2/floating_ips")
        posted = await client.post(
            f"/v2/floating_ips/{SPARE_IP}/actions", json={"type": "assign", "droplet_id": 1002}
        )
        action_id = posted.json()["action"]["id"]
        read = await client.get(f"/v2/floating_ips/{SPARE_IP}/actions/{action_id}")
    assert one.json()["floating_ip"]["droplet"]["id"] == 1001
    assert len(many.json()["floating_ips"]) == 3
    assert posted.status_code == 201
    assert posted.json()["action"]["resource_type"] == "floating_ip"
    assert read.json()["action"]["status"] == "completed"


async def test_missing_or_wrong_token_is_401_with_error_body() -> None:
    emulator = make_emulator()
    async with api_client(emulator, token=None) as anonymous:
        missing = await anonymous.get(f"/v2/reserved_ips/{IP}")
        basic = await anonymous.get(f"/v2/reserved_ips/{IP}", headers={"Authorization": "Basic x"})
    async with api_client(emulator, token="not-the-token") as stranger:
        wrong = await stranger.post(f"/v2/reserved_ips/{IP}/actions", json={"type": "unassign"})
    for response in (missing, basic, wrong):
        assert response.status_code == 401
        assert response.json()["id"] == "unauthorized"
        assert response.json()["message"]
    assert emulator.state.actions == {}


async def test_assign_stays_in_progress_then_moves_the_ip(
    autojump_clock: trio.testing.MockClock,
) -> None:
    emulator = make_emulator(action_seconds=3.0)
    async with api_client(emulator) as client:
        started = trio.current_time()
        posted = await assign(client, 1002)
        assert posted.status_code == 201
        action = posted.json()["action"]
        assert action["status"] == "in-progress"
        assert action["type"] == "assign_ip"
        assert action["completed_at"] is None
        assert action["resource_type"] == "reserved_ip"
        assert action["region_slug"] == "nyc3"
        assert isinstance(action["resource_id"], int)
        assert action["region"].keys() >= REGION_KEYS

        await trio.sleep(2.9)
        during = (await client.get(f"/v2/reserved_ips/{IP}")).json()["reserved_ip"]
        assert during["droplet"]["id"] == 1001, "the IP moves only when the action completes"
        assert during["locked"] is True
        pending = (await client.get(f"/v2/actions/{action['id']}")).json()["action"]
        assert pending["status"] == "in-progress"

        await trio.sleep(0.2)
        done = (await client.get(f"/v2/reserved_ips/{IP}/actions/{action['id']}")).json()
        after = (await client.get(f"/v2/reserved_ips/{IP}")).json()["reserved_ip"]
    assert done["action"]["status"] == "completed"
    assert done["action"]["completed_at"] is not None
    assert after["droplet"]["id"] == 1002 and after["locked"] is False
    entry = emulator.state.history[-1]
    assert (entry.droplet_id, entry.previous_droplet_id, entry.source) == (1002, 1001, "api")
    assert entry.action_id == action["id"]
    assert entry.completed_clock - started == 3.0


async def test_unassign_completes_to_nobody(autojump_clock: trio.testing.MockClock) -> None:
    emulator = make_emulator(action_seconds=1.0)
    async with api_client(emulator) as client:
        posted = await client.post(f"/v2/reserved_ips/{IP}/actions", json={"type": "unassign"})
        assert posted.json()["action"]["type"] == "unassign_ip"
        await trio.sleep(1.0)
        body = (await client.get(f"/v2/reserved_ips/{IP}")).json()
        again = await client.post(f"/v2/reserved_ips/{IP}/actions", json={"type": "unassign"})
    assert body["reserved_ip"]["droplet"] is None
    assert emulator.state.history[-1].droplet_id is None
    assert again.status_code == 422


async def test_422_while_the_ip_has_an_action_in_progress(
    autojump_clock: trio.testing.MockClock,
) -> None:
    emulator = make_emulator(action_seconds=2.0)
    async with api_client(emulator) as client:
        assert (await assign(client, 1002)).status_code == 201
        busy = await client.post(f"/v2/reserved_ips/{IP}/actions", json={"type": "unassign"})
        await trio.sleep(2.0)
        back = await assign(client, 1001)
    assert busy.status_code == 422
    assert busy.json()["id"] == "unprocessable_entity"
    assert back.status_code == 201


async def test_422_while_the_target_droplet_has_an_action_in_progress(
    autojump_clock: trio.testing.MockClock,
) -> None:
    emulator = make_emulator(action_seconds=2.0)
    emulator.state.manual_assign(IP, None)
    async with api_client(emulator) as client:
        assert (await assign(client, 1002, SPARE_IP)).status_code == 201
        busy = await assign(client, 1002, IP)
    assert busy.status_code == 422
    assert "pending" in busy.json()["message"]


async def test_refusals_match_the_real_api() -> None:
    emulator = make_emulator()
    async with api_client(emulator) as client:
        to_holder = await assign(client, 1001)
        other_region = await assign(client, 2001)
        droplet_busy_with_ip = await assign(client, 1001, SPARE_IP)
        unknown_droplet = await assign(client, 4242)
        unknown_ip = await client.get("/v2/reserved_ips/203.0.113.99")
        unknown_ip_post = await assign(client, 1002, "203.0.113.99")
        unknown_action = await client.get("/v2/actions/12345")
        unknown_path = await client.get("/v2/volumes")
        not_json = await client.post(f"/v2/reserved_ips/{IP}/actions", content=b"{nope")
        bad_type = await client.post(f"/v2/reserved_ips/{IP}/actions", json={"type": "grab"})
        no_droplet = await client.post(f"/v2/reserved_ips/{IP}/actions", json={"type": "assign"})
    for response in (to_holder, other_region, droplet_busy_with_ip, bad_type, no_droplet):
        assert response.status_code == 422, response.text
        assert response.json()["id"] == "unprocessable_entity"
    for response in (unknown_droplet, unknown_ip, unknown_ip_post, unknown_action, unknown_path):
        assert response.status_code == 404, response.text
        assert response.json()["id"] == "not_found"
    assert not_json.status_code == 400
    assert not_json.json()["id"] == "bad_request"
    assert emulator.state.actions == {}


async def test_new_action_briefly_404s_when_configured(
    autojump_clock: trio.testing.MockClock,
) -> None:
    emulator = make_emulator(action_seconds=5.0, action_404_seconds=1.0)
    async with api_client(emulator) as client:
        action_id = (await assign(client, 1002)).json()["action"]["id"]
        early = await client.get(f"/v2/actions/{action_id}")
        early_ip = await client.get(f"/v2/reserved_ips/{IP}/actions/{action_id}")
        await trio.sleep(1.0)
        later = await client.get(f"/v2/actions/{action_id}")
        wrong_ip = await client.get(f"/v2/reserved_ips/{SPARE_IP}/actions/{action_id}")
    assert early.status_code == early_ip.status_code == 404
    assert later.status_code == 200
    assert wrong_ip.status_code == 404


async def test_action_lists_are_newest_first(autojump_clock: trio.testing.MockClock) -> None:
    emulator = make_emulator(action_seconds=1.0)
    async with api_client(emulator) as client:
        first = (await assign(client, 1002)).json()["action"]["id"]
        await trio.sleep(1.0)
        second = (await assign(client, 1001)).json()["action"]["id"]
        for_ip = (await client.get(f"/v2/reserved_ips/{IP}/actions")).json()
        everywhere = (await client.get("/v2/actions", params={"per_page": 1})).json()
        none_here = (await client.get(f"/v2/reserved_ips/{SPARE_IP}/actions")).json()
    assert [a["id"] for a in for_ip["actions"]] == [second, first]
    assert [a["status"] for a in for_ip["actions"]] == ["in-progress", "completed"]
    assert for_ip["meta"] == {"total": 2}
    assert [a["id"] for a in everywhere["actions"]] == [second]
    assert "next" in everywhere["links"]["pages"]
    assert none_here == {"actions": [], "links": {}, "meta": {"total": 0}}


async def test_errored_action_leaves_the_ip_alone(autojump_clock: trio.testing.MockClock) -> None:
    emulator = make_emulator(action_seconds=1.0)
    async with api_client(emulator) as client:
        emulator_faults = {"action_error_rate": 1.0}
        async with admin_client(emulator) as admin:
            assert (await admin.post("/_emulator/faults", json=emulator_faults)).status_code == 200
        action_id = (await assign(client, 1002)).json()["action"]["id"]
        await trio.sleep(1.0)
        action = (await client.get(f"/v2/actions/{action_id}")).json()["action"]
        holder = (await client.get(f"/v2/reserved_ips/{IP}")).json()["reserved_ip"]["droplet"]
    assert action["status"] == "errored"
    assert action["completed_at"] is not None
    assert holder["id"] == 1001
    assert [e.source for e in emulator.state.history] == ["initial"]
