"""The droplet calls `terraform/files/configure_sidecar.py` makes, droplet events, and the
metadata service as a droplet sees it, in-process under the mock clock.

Every `/v2/` answer here also passes the OpenAPI check in the harness (the droplet model
as published: networks, region, tags, pagination, meta).
"""

from __future__ import annotations

from typing import Any

import httpx
import trio
import trio.testing
from emulator.harness import BASE_URL, IP, admin_client, api_client, assign, make_emulator

from sidecar.emulator import Emulator
from sidecar.emulator.metadata import build_metadata_app

TAG = "fip-cluster"


def cluster_emulator(**settings: Any) -> Emulator:
    """The harness account plus three tagged droplets shaped like the Terraform cluster."""
    emulator = make_emulator(**settings)
    for node, region in ((1, "nyc3"), (2, "nyc3"), (3, "tor1")):
        emulator.state.add_droplet(
            3000 + node,
            region,
            name=f"fip-node-{node}",
            tags=(TAG, f"{TAG}-node-{node}"),
            public_ipv4=f"198.18.0.{10 + node}",
            private_ipv4=f"198.18.1.{10 + node}",
        )
    return emulator


def addresses(droplet: dict[str, Any]) -> dict[str, str]:
    return {net["type"]: net["ip_address"] for net in droplet["networks"]["v4"]}


async def test_list_by_tag_pages_through_the_tagged_droplets_only() -> None:
    emulator = cluster_emulator()
    async with api_client(emulator) as client:
        everything = (await client.get("/v2/droplets")).json()
        first = (await client.get("/v2/droplets", params={"tag_name": TAG, "per_page": 2})).json()
        second = await client.get(first["links"]["pages"]["next"].removeprefix(BASE_URL))
        node_2 = (await client.get("/v2/droplets", params={"tag_name": f"{TAG}-node-2"})).json()
        nobody = (await client.get("/v2/droplets", params={"tag_name": "nope"})).json()
    assert everything["meta"] == {"total": 6}
    assert [d["id"] for d in first["droplets"]] == [3001, 3002]
    assert first["meta"] == {"total": 3}
    assert "tag_name=fip-cluster" in first["links"]["pages"]["next"], "the filter is kept"
    assert [d["id"] for d in second.json()["droplets"]] == [3003]
    assert "next" not in second.json()["links"]["pages"]
    assert [d["name"] for d in node_2["droplets"]] == ["fip-node-2"]
    assert nobody == {"droplets": [], "links": {}, "meta": {"total": 0}}


async def test_get_shows_networks_region_and_tags() -> None:
    emulator = cluster_emulator()
    async with api_client(emulator) as client:
        witness = (await client.get("/v2/droplets/3003")).json()["droplet"]
        plain = (await client.get("/v2/droplets/1001")).json()["droplet"]
        missing = await client.get("/v2/droplets/4242")
    assert addresses(witness) == {"public": "198.18.0.13", "private": "198.18.1.13"}
    assert witness["region"]["slug"] == "tor1"
    assert witness["tags"] == [TAG, f"{TAG}-node-3"]
    assert witness["status"] == "active"
    assert list(addresses(plain)) == ["public"], "no private address unless given"
    assert missing.status_code == 404 and missing.json()["id"] == "not_found"


async def test_admin_replaces_a_droplet_with_a_new_address_and_deletes_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    emulator = cluster_emulator(action_seconds=1.0)
    new_node_2 = {
        "id": 3002,
        "region": "nyc3",
        "name": "fip-node-2",
        "tags": [TAG, f"{TAG}-node-2"],
        "public_ipv4": "198.18.0.22",
        "private_ipv4": "198.18.1.22",
    }
    async with api_client(emulator) as client, admin_client(emulator) as admin:
        assert (await assign(client, 3001)).status_code == 201
        await trio.sleep(1.0)
        replaced = await admin.post("/_emulator/droplets", json=new_node_2)
        after = (await client.get("/v2/droplets/3002")).json()["droplet"]
        clash = await admin.post("/_emulator/droplets", json={**new_node_2, "id": 3009})
        moved_region = await admin.post(
            "/_emulator/droplets", json={**new_node_2, "region": "ams3"}
        )
        deleted = await admin.delete("/_emulator/droplets/3001")
        gone = await client.get("/v2/droplets/3001")
        ip = (await client.get(f"/v2/reserved_ips/{IP}")).json()["reserved_ip"]
        twice = await admin.delete("/_emulator/droplets/3001")
        history = (await admin.get("/_emulator/history")).json()
    assert replaced.status_code == 200 and replaced.json()["public_ipv4"] == "198.18.0.22"
    assert addresses(after) == {"public": "198.18.0.22", "private": "198.18.1.22"}
    assert clash.status_code == 400 and "198.18.0.22 is droplet 3002's" in clash.json()["message"]
    assert moved_region.status_code == 400 and "region" in moved_region.json()["message"]
    assert deleted.status_code == 200 and gone.status_code == 404
    assert ip["droplet"] is None, "destroying the holder releases the reserved IP"
    assert [(e["droplet_id"], e["source"]) for e in history[-2:]] == [
        (3001, "api"),
        (None, "destroyed"),
    ]
    assert twice.status_code == 404


async def test_a_booting_droplet_is_new_without_addresses_and_refuses_the_ip(
    autojump_clock: trio.testing.MockClock,
) -> None:
    emulator = cluster_emulator(action_seconds=1.0)
    spec = {"id": 3004, "region": "nyc3", "tags": [TAG], "boot_seconds": 20.0}
    async with api_client(emulator) as client, admin_client(emulator) as admin:
        assert (await admin.post("/_emulator/droplets", json=spec)).status_code == 200
        booting = (await client.get("/v2/droplets/3004")).json()["droplet"]
        refused = await assign(client, 3004)
        actions = (await client.get("/v2/actions")).json()["actions"]
        await trio.sleep(20.0)
        booted = (await client.get("/v2/droplets/3004")).json()["droplet"]
        accepted = await assign(client, 3004)
    assert booting["status"] == "new" and booting["networks"]["v4"] == []
    assert refused.status_code == 422
    assert refused.json()["message"] == "Droplet already has a pending event."
    assert (actions[0]["type"], actions[0]["resource_type"]) == ("create", "droplet")
    assert (actions[0]["resource_id"], actions[0]["status"]) == (3004, "in-progress")
    assert booted["status"] == "active" and addresses(booted)["public"]
    assert accepted.status_code == 201


async def test_an_injected_backup_blocks_the_assign_until_it_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    emulator = make_emulator(action_seconds=1.0)
    event = {"droplet_id": 1002, "type": "backup", "seconds": 30.0}
    async with api_client(emulator) as client, admin_client(emulator) as admin:
        injected = await admin.post("/_emulator/faults", json={"droplet_event": event})
        second = await admin.post("/_emulator/faults", json={"droplet_event": event})
        cleared = await admin.post("/_emulator/faults", json={"clear": True})
        refused = await assign(client, 1002)
        action_id = (await client.get("/v2/actions")).json()["actions"][0]["id"]
        backup = (await client.get(f"/v2/actions/{action_id}")).json()["action"]
        under_ip = await client.get(f"/v2/reserved_ips/{IP}/actions/{action_id}")
        await trio.sleep(30.0)
        done = (await client.get(f"/v2/actions/{action_id}")).json()["action"]
        accepted = await assign(client, 1002)
        bad = [
            await admin.post("/_emulator/faults", json={"droplet_event": wrong})
            for wrong in (
                {"droplet_id": 1002, "type": "explode"},
                {"droplet_id": 1002, "seconds": 0},
                {"droplet_id": 4242},
            )
        ]
    assert injected.status_code == 200
    assert second.status_code == 422, "one event at a time, as on the platform"
    assert cleared.status_code == 200
    assert refused.status_code == 422
    assert refused.json()["message"] == "Droplet already has a pending event."
    assert (backup["type"], backup["resource_type"], backup["status"]) == (
        "backup",
        "droplet",
        "in-progress",
    )
    assert under_ip.status_code == 404, "a droplet event is not one of the IP's actions"
    assert done["status"] == "completed"
    assert accepted.status_code == 201
    assert [r.status_code for r in bad] == [400, 400, 404]


async def test_metadata_answers_about_the_droplet_whose_address_asks() -> None:
    emulator = cluster_emulator()
    emulator.state.manual_assign(IP, 3001)
    app = build_metadata_app(emulator)

    async def ask(source: str, path: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=(source, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://169.254.169.254") as c:
            return await c.get(path)

    public_1 = await ask("198.18.0.11", "/metadata/v1/id")
    private_2 = await ask("198.18.1.12", "/metadata/v1/id")
    active_1 = await ask("198.18.0.11", "/metadata/v1/reserved_ip/ipv4/active")
    active_2 = await ask("198.18.1.12", "/metadata/v1/reserved_ip/ipv4/active")
    region_3 = await ask("198.18.0.13", "/metadata/v1/region")
    tags_3 = await ask("198.18.0.13", "/metadata/v1/tags")
    document = (await ask("198.18.0.11", "/metadata/v1.json")).json()
    stranger = await ask("198.18.0.99", "/metadata/v1/id")
    no_api = await ask("198.18.0.11", f"/v2/reserved_ips/{IP}")
    assert (public_1.text, private_2.text) == ("3001", "3002")
    assert (active_1.text, active_2.text) == ("true", "false")
    assert region_3.text == "tor1"
    assert tags_3.text.split() == [TAG, f"{TAG}-node-3"]
    assert document["reserved_ip"]["ipv4"] == {"active": True, "ip_address": IP}
    assert document["interfaces"]["private"][0]["ipv4"]["ip_address"] == "198.18.1.11"
    assert stranger.status_code == 404
    assert no_api.status_code == 404, "the metadata address serves metadata only"
