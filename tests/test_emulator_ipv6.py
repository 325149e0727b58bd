"""Reserved IPv6 in the emulator: the spec's shapes, and the rules the real API enforces.

Every `/v2/` answer here goes through the harness's OpenAPI check (the IPv6 operations
are mapped to `resources/reserved_ipv6/`), so each test also proves the shapes. The edge
for IPv6 is tested over real sockets on `::1` beside the IPv4 edge on 127.0.0.1.
"""

from __future__ import annotations

import sys

import httpx
import pytest
import trio
import trio.testing
from emulator import harness
from emulator.harness import IP, IP6, SPARE_IP, TOKEN, api_client, assign, make_emulator
from emulator.openapi import MISSING_REASON, check_response, spec_present
from test_emulator_process import WEB_SERVER, emulator_command, poll_action, read_line, spawned

IPV6_READ = "reserved_ip:read"


async def test_every_ipv6_response_is_documented_and_valid(
    autojump_clock: trio.testing.MockClock,
) -> None:
    if not spec_present():
        pytest.skip(MISSING_REASON)
    harness.checked_files.clear()
    emulator = make_emulator(action_seconds=1.0)
    async with api_client(emulator) as client:
        listed = await client.get("/v2/reserved_ipv6")
        assert [r["ip"] for r in listed.json()["reserved_ipv6s"]] == [IP6]
        got = (await client.get(f"/v2/reserved_ipv6/{IP6}")).json()["reserved_ipv6"]
        assert "locked" not in got and got["region_slug"] == "nyc3" and got["droplet"] is None
        posted = await assign(client, 1002, IP6)
        assert posted.status_code == 201
        action = posted.json()["action"]
        assert (action["status"], action["resource_type"]) == ("in-progress", "reserved_ipv6")
        assert (await client.get(f"/v2/actions/{action['id']}")).json()["action"]["status"] == (
            "in-progress"
        )
        await trio.sleep(1.0)
        done = (await client.get(f"/v2/actions/{action['id']}")).json()["action"]
        assert done["status"] == "completed" and done["completed_at"] is not None
        held = (await client.get(f"/v2/reserved_ipv6/{IP6}")).json()["reserved_ipv6"]
        assert held["droplet"]["id"] == 1002
        assert held["droplet"]["networks"]["v6"][0]["type"] == "public"
        assert (await assign(client, 1002, IP6)).status_code == 422  # already the holder
        assert (await client.get("/v2/reserved_ipv6/2001:db8::99")).status_code == 404
    produced = {path.split("specification/")[1] for path in harness.checked_files}
    assert produced >= {
        "resources/reserved_ipv6/responses/reserved_ipv6_list.yml",
        "resources/reserved_ipv6/responses/reserved_ipv6.yml",
        "resources/reserved_ipv6/responses/reserved_ipv6_action.yml",
        "resources/actions/responses/action.yml",
        "shared/responses/unexpected_error.yml",
        "shared/responses/not_found.yml",
    }


async def test_no_per_address_action_endpoint_and_families_do_not_mix_paths() -> None:
    emulator = make_emulator()
    async with api_client(emulator) as client:
        action_id = (await assign(client, 1002, IP6)).json()["action"]["id"]
        assert (await client.get(f"/v2/reserved_ipv6/{IP6}/actions/{action_id}")).status_code == (
            404
        ), "the spec has no per-IPv6 action GET"
        assert (await client.get(f"/v2/reserved_ips/{IP6}")).status_code == 404
        assert (await client.get(f"/v2/floating_ips/{IP6}")).status_code == 404
        assert (await client.get(f"/v2/reserved_ipv6/{IP}")).status_code == 404
        assert IP6 not in {
            r["ip"] for r in (await client.get("/v2/reserved_ips")).json()["reserved_ips"]
        }
        expanded = "2001:0db8:0000:0000:0000:0000:0000:0010"
        assert (await client.get(f"/v2/reserved_ipv6/{expanded}")).status_code == 200


async def test_token_scopes_as_the_spec_names_them() -> None:
    emulator = make_emulator()
    emulator.tokens.grant("read-only", [IPV6_READ])
    emulator.tokens.grant("no-actions", [IPV6_READ, "reserved_ip:update"])
    emulator.tokens.grant("sidecar", [IPV6_READ, "reserved_ip:update", "actions:read"])
    async with api_client(emulator, token="read-only") as client:
        assert (await client.get(f"/v2/reserved_ipv6/{IP6}")).status_code == 200
        assert (await assign(client, 1002, IP6)).status_code == 403
    async with api_client(emulator, token="no-actions") as client:
        action_id = (await assign(client, 1002, IP6)).json()["action"]["id"]
        assert (await client.get(f"/v2/actions/{action_id}")).status_code == 403
    async with api_client(emulator, token="sidecar") as client:
        assert (await client.get(f"/v2/actions/{action_id}")).status_code == 200


async def test_region_rule_and_ipv6_must_be_enabled() -> None:
    emulator = make_emulator()
    emulator.state.add_droplet(1003, "nyc3", None, ipv6=False)
    async with api_client(emulator) as client:
        far = await assign(client, 2001, IP6)
        assert far.status_code == 422 and "same region" in far.json()["message"]
        disabled = await assign(client, 1003, IP6)
        assert disabled.status_code == 422 and "IPv6" in disabled.json()["message"]
        shown = (await client.get("/v2/droplets/1003")).json()["droplet"]
        assert "ipv6" not in shown["features"] and shown["networks"]["v6"] == []
        assert (await assign(client, 1003)).status_code == 201, "IPv4 needs no IPv6"


async def test_one_reserved_ipv4_per_droplet() -> None:
    emulator = make_emulator()
    async with api_client(emulator) as client:
        second = await assign(client, 1001, SPARE_IP)  # 1001 already holds IP
        assert second.status_code == 422
        assert second.json()["message"] == "The droplet already has a reserved IP assigned."


@pytest.mark.parametrize("mixed", [True, False])
async def test_ipv4_and_ipv6_on_one_droplet_by_option(
    mixed: bool, autojump_clock: trio.testing.MockClock
) -> None:
    emulator = make_emulator(action_seconds=1.0, allow_mixed_families=mixed)
    async with api_client(emulator) as client:
        posted = await assign(client, 1001, IP6)  # 1001 holds the IPv4 IP
        if not mixed:
            assert posted.status_code == 422
            assert "reserved IPV4" in posted.json()["message"]
            return
        assert posted.status_code == 201
        await trio.sleep(1.0)
    assert [r.ip for r in emulator.state.ips_of_droplet(1001)] == [IP, IP6]


async def test_ipv4_and_ipv6_edges_over_real_sockets() -> None:
    async with (
        spawned(sys.executable, "-c", WEB_SERVER, "web1") as web1,
        spawned(sys.executable, "-c", WEB_SERVER, "web2") as web2,
    ):
        port1, port2 = int(await read_line(web1)), int(await read_line(web2))
        command = emulator_command(
            "--edge-listen", "127.0.0.1:0",
            "--edge6-listen", "[::1]:0",
            "--reserved-ip", f"{IP}=nyc3:1001",
            "--reserved-ip", f"{IP6}=nyc3:1002",
            "--droplet", f"1001=nyc3=http://127.0.0.1:{port1}",
            "--droplet", f"1002=nyc3=http://127.0.0.1:{port2}",
            "--action-seconds", "0.3",
        )  # fmt: skip
        async with spawned(*command, env={"FIP_EMULATOR_TOKEN": TOKEN}) as emulator:
            words = (await read_line(emulator)).split()
            api_url, edge_url, edge6_url = words[3], words[6], words[9]
            assert words[7] == "edge6" and edge6_url.startswith("http://[::1]:")
            async with (
                httpx.AsyncClient(
                    base_url=api_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
                ) as api,
                httpx.AsyncClient(timeout=10) as client,
            ):
                four, six = await client.get(edge_url), await client.get(edge6_url)
                assert (four.text, four.headers["x-fip-droplet"]) == ("web1", "1001")
                assert (six.text, six.headers["x-fip-droplet"]) == ("web2", "1002")
                posted = await api.post(
                    f"/v2/reserved_ipv6/{IP6}/actions", json={"type": "assign", "droplet_id": 1001}
                )
                assert (await poll_action(api, posted.json()["action"]["id"]))["status"] == (
                    "completed"
                )
                moved = await client.get(edge6_url)
                assert (moved.text, moved.headers["x-fip-droplet"]) == ("web1", "1001")
                state = (await api.get("/_emulator/state")).json()
                assert state["edge_reserved_ipv6"] == IP6


def test_the_ipv6_checker_can_fail() -> None:
    if not spec_present():
        pytest.skip(MISSING_REASON)
    path = f"/v2/reserved_ipv6/{IP6}"
    good = {"reserved_ipv6": {"ip": IP6, "region_slug": "nyc3", "droplet": None}}
    headers = {"ratelimit-limit": "5000", "ratelimit-remaining": "1", "ratelimit-reset": "1"}
    check_response("GET", path, 200, good, headers)
    with pytest.raises(AssertionError, match="is not a 'ipv6'"):
        check_response("GET", path, 200, {"reserved_ipv6": {"ip": IP}}, headers)
    with pytest.raises(AssertionError, match=r"lacks \['reserved_ipv6'\]"):
        check_response("GET", path, 200, {"reserved_ip": good["reserved_ipv6"]}, headers)


async def test_moves_of_both_families_to_one_droplet_run_at_once() -> None:
    """Two assigners (IPv4 and IPv6) post to the same new holder in the same instant: only
    a move of the same family, or a droplet event, makes the second one wait."""
    emulator = make_emulator(action_seconds=5.0)
    async with api_client(emulator) as client:
        assert (await assign(client, 1002)).status_code == 201
        assert (await assign(client, 1002, IP6)).status_code == 201
        spare = await assign(client, 1002, SPARE_IP)
        assert spare.status_code == 422, "the IPv4 move to 1002 is still in flight"
        assert spare.json()["message"] == "Droplet already has a pending event."
