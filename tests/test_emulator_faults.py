"""Rate limits, injected faults and the admin endpoints, in-process under the mock clock."""

from __future__ import annotations

import time

import trio
import trio.testing
from emulator.harness import IP, SPARE_IP, TOKEN, admin_client, api_client, assign, make_emulator


async def test_rate_limit_headers_count_down_and_reset_is_epoch() -> None:
    emulator = make_emulator(rate_limit_per_hour=100)
    async with api_client(emulator) as client:
        responses = [await client.get(f"/v2/reserved_ips/{IP}") for _ in range(3)]
    assert [r.headers["ratelimit-limit"] for r in responses] == ["100"] * 3
    assert [r.headers["ratelimit-remaining"] for r in responses] == ["99", "98", "97"]
    reset = int(responses[0].headers["ratelimit-reset"])
    assert time.time() < reset <= time.time() + 3601


async def test_per_minute_budget_gives_429_with_retry_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    emulator = make_emulator(rate_limit_per_minute=5)
    async with api_client(emulator) as client:
        allowed = [await client.get("/v2/reserved_ips") for _ in range(5)]
        await trio.sleep(30.0)
        refused = await client.get("/v2/reserved_ips")
        refused_again = await client.get(
            "/v2/reserved_ips", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        await trio.sleep(30.0)
        again = await client.get("/v2/reserved_ips")
    assert all(r.status_code == 200 for r in allowed)
    assert refused.status_code == 429
    assert refused.json()["id"] == "too_many_requests"
    assert refused.headers["retry-after"] == "30"
    assert refused.headers["ratelimit-remaining"] == "0", "a per-minute refusal says 0 too"
    assert int(allowed[-1].headers["ratelimit-remaining"]) > 0, "successes show the hour's"
    assert refused_again.status_code == 429, "refusals are not counted, nor forgiven"
    assert again.status_code == 200


async def test_per_hour_budget_and_separate_buckets_per_token(
    autojump_clock: trio.testing.MockClock,
) -> None:
    emulator = make_emulator(rate_limit_per_minute=100, rate_limit_per_hour=4)
    async with api_client(emulator) as client:
        for _ in range(4):
            assert (await client.get("/v2/actions")).status_code == 200
            await trio.sleep(120.0)
        refused = await client.get("/v2/actions")
        other_token = await client.get("/v2/actions", headers={"Authorization": "Bearer other"})
        await trio.sleep(3600.0 - 4 * 120.0 + 1.0)
        recovered = await client.get("/v2/actions")
    assert refused.status_code == 429
    assert refused.headers["ratelimit-remaining"] == "0"
    assert 0 < int(refused.headers["retry-after"]) <= 3600
    assert other_token.status_code == 401, "another token has its own budget"
    assert recovered.status_code == 200


async def test_injected_errors_outage_and_forced_429(
    autojump_clock: trio.testing.MockClock,
) -> None:
    emulator = make_emulator()
    async with api_client(emulator) as client, admin_client(emulator) as admin:
        await admin.post("/_emulator/faults", json={"error_rate": 1.0, "error_status": 500})
        server_error = await client.get(f"/v2/reserved_ips/{IP}")
        await admin.post("/_emulator/faults", json={"error_status": 503})
        unavailable = await client.get(f"/v2/reserved_ips/{IP}")
        await admin.post("/_emulator/faults", json={"clear": True, "outage_seconds": 10.0})
        outage = await client.get(f"/v2/reserved_ips/{IP}")
        metadata_during_outage = await admin.get("/metadata/droplets/1001/metadata/v1/id")
        await trio.sleep(10.0)
        after_outage = await client.get(f"/v2/reserved_ips/{IP}")
        await admin.post("/_emulator/faults", json={"force_429_seconds": 5.0})
        forced = await client.get(f"/v2/reserved_ips/{IP}")
        await trio.sleep(5.0)
        after_forced = await client.get(f"/v2/reserved_ips/{IP}")
    assert (server_error.status_code, server_error.json()["id"]) == (500, "server_error")
    assert (unavailable.status_code, unavailable.json()["id"]) == (503, "service_unavailable")
    assert outage.status_code == 503
    assert metadata_during_outage.text == "1001", "faults never touch the metadata service"
    assert after_outage.status_code == 200
    assert forced.status_code == 429
    assert forced.headers["retry-after"] == "5"
    assert after_forced.status_code == 200


async def test_hanging_outage_and_latency_delay_answers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    emulator = make_emulator()
    async with api_client(emulator) as client, admin_client(emulator) as admin:
        deadline = trio.current_time() + 7.0
        faults = {"outage_mode": "hang", "outage_until_monotonic": deadline}
        described = (await admin.post("/_emulator/faults", json=faults)).json()
        hung = await client.get(f"/v2/reserved_ips/{IP}")
        answered_at = trio.current_time()
        await admin.post("/_emulator/faults", json={"latency_seconds": 2.5})
        before = trio.current_time()
        slow = await client.get(f"/v2/reserved_ips/{IP}")
        latency = trio.current_time() - before
    assert described["outage_until_monotonic"] == deadline
    assert described["outage_mode"] == "hang"
    assert hung.status_code == 200
    assert answered_at >= deadline
    assert slow.status_code == 200
    assert latency >= 2.5


async def test_bad_fault_requests_are_400() -> None:
    emulator = make_emulator()
    async with admin_client(emulator) as admin:
        for bad in (
            {"error_rate": 2.0},
            {"error_status": 418},
            {"latency": 1.0},
            {"outage_seconds": 1.0, "outage_until_monotonic": 5.0},
            {"outage_mode": "explode"},
        ):
            response = await admin.post("/_emulator/faults", json=bad)
            assert response.status_code == 400, bad
        current = (await admin.get("/_emulator/faults")).json()
    assert current["error_rate"] == 0.0 and current["latency_seconds"] == 0.0


async def test_manual_assign_is_instant_and_a_late_action_still_lands(
    autojump_clock: trio.testing.MockClock,
) -> None:
    emulator = make_emulator(action_seconds=2.0)
    async with api_client(emulator) as client, admin_client(emulator) as admin:
        action_id = (await assign(client, 1002)).json()["action"]["id"]
        manual = await admin.post("/_emulator/assign", json={"droplet_id": None})
        holder_now = (await client.get(f"/v2/reserved_ips/{IP}")).json()["reserved_ip"]
        await trio.sleep(2.0)
        history = (await admin.get("/_emulator/history")).json()
        wrong_region = await admin.post(
            "/_emulator/assign", json={"reserved_ip": SPARE_IP, "droplet_id": 2001}
        )
    assert manual.status_code == 200
    assert manual.json()["source"] == "manual" and manual.json()["droplet_id"] is None
    assert holder_now["droplet"] is None
    assert [(e["source"], e["droplet_id"]) for e in history] == [
        ("initial", 1001),
        ("manual", None),
        ("api", 1002),
    ]
    assert history[2]["action_id"] == action_id
    assert history[2]["completed_monotonic"] > history[1]["completed_monotonic"]
    assert history[2]["completed_epoch"] - history[2]["requested_epoch"] == 2.0
    assert history[2]["completed_wall"].startswith("20")
    assert wrong_region.status_code == 422


async def test_state_and_request_counts(autojump_clock: trio.testing.MockClock) -> None:
    emulator = make_emulator(action_seconds=1.0)
    async with api_client(emulator) as client, admin_client(emulator) as admin:
        await assign(client, 1002)
        await client.get(f"/v2/reserved_ips/{IP}")
        await client.get(f"/v2/reserved_ips/{IP}")
        await client.get("/v2/reserved_ips/203.0.113.99")
        state = (await admin.get("/_emulator/state")).json()
        counts = (await admin.get("/_emulator/requests")).json()
        await trio.sleep(1.0)
        settled = (await admin.get("/_emulator/state")).json()
        cleared = (await admin.delete("/_emulator/requests")).json()
    assert state["reserved_ips"][0] == {
        "ip": IP,
        "region": "nyc3",
        "droplet_id": 1001,
        "locked": True,
        "pending_action_id": state["actions"][0]["id"],
    }
    assert state["actions"][0]["status"] == "in-progress"
    assert settled["reserved_ips"][0]["droplet_id"] == 1002
    assert {d["id"]: d["reserved_ip"] for d in settled["droplets"]} == {
        1001: None,
        1002: IP,
        2001: None,
    }
    assert counts["total"] == 4
    assert {"method": "GET", "path": f"/v2/reserved_ips/{IP}", "status": 200, "count": 2} in (
        counts["requests"]
    )
    assert {
        "method": "GET",
        "path": "/v2/reserved_ips/203.0.113.99",
        "status": 404,
        "count": 1,
    } in (counts["requests"])
    assert cleared == {"total": 0, "requests": []}


async def test_metadata_follows_the_ip(autojump_clock: trio.testing.MockClock) -> None:
    emulator = make_emulator(action_seconds=1.0)
    base1, base2 = "/metadata/droplets/1001/metadata", "/metadata/droplets/1002/metadata"
    async with api_client(emulator) as client, admin_client(emulator) as meta:
        ident = await meta.get(f"{base1}/v1/id")
        region = await meta.get(f"{base1}/v1/region")
        active1 = await meta.get(f"{base1}/v1/reserved_ip/ipv4/active")
        address1 = await meta.get(f"{base1}/v1/reserved_ip/ipv4/ip_address")
        legacy1 = await meta.get(f"{base1}/v1/floating_ip/ipv4/active")
        address2 = await meta.get(f"{base2}/v1/reserved_ip/ipv4/ip_address")
        await assign(client, 1002)
        await trio.sleep(1.0)
        active1_after = await meta.get(f"{base1}/v1/reserved_ip/ipv4/active")
        everything2 = (await meta.get(f"{base2}/v1.json")).json()
        unknown = await meta.get("/metadata/droplets/9999/metadata/v1/id")
    assert (ident.text, region.text, active1.text, address1.text) == ("1001", "nyc3", "true", IP)
    assert ident.headers["content-type"].startswith("text/plain")
    assert legacy1.text == "true"
    assert address2.status_code == 404
    assert active1_after.text == "false"
    assert everything2["droplet_id"] == 1002 and everything2["region"] == "nyc3"
    assert everything2["reserved_ip"] == {"ipv4": {"active": True, "ip_address": IP}}
    assert unknown.status_code == 404
