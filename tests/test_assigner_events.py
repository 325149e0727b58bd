"""The assigner's address events (what `address_gained`/`address_lost` hooks run on), its
share of the request budget, and several assigners on one node's leadership. Virtual time
over the fake API of test_assigner."""

from __future__ import annotations

import random

import httpx
import trio
import trio.testing
from test_assigner import CLIENT_SETTINGS, ME, OTHER, TOKEN, FakeDO, FakeLeadership

from sidecar.assigner import AddressEvent, Assigner, AssignerSettings, SharedLeadership
from sidecar.providers.digitalocean import DigitalOceanClient, DigitalOceanProvider

IP = "203.0.113.10"


def make(
    fake: FakeDO,
    leadership: FakeLeadership | SharedLeadership,
    events: list[AddressEvent],
    **kw: int,
) -> Assigner:
    client = DigitalOceanClient(CLIENT_SETTINGS, TOKEN, transport=httpx.MockTransport(fake.handler))
    return Assigner(
        DigitalOceanProvider(client),
        IP,
        ME,
        leadership,
        AssignerSettings(reconcile_interval=2.0, cooloff_interval=0.0),
        random.Random(1),
        on_event=events.append,
        **kw,
    )


async def test_gained_once_per_term_and_lost_when_leadership_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake, leadership, events = FakeDO(holder=OTHER), FakeLeadership(), []
    async with trio.open_nursery() as nursery:
        assigner = make(fake, leadership, events)
        nursery.start_soon(assigner.run)
        leadership.gain()
        await trio.sleep(30)  # the assign, then many reconcile reads
        assert events == ["address_gained"]
        assert assigner.snapshot().family == "ipv4"
        leadership.lose()
        await trio.sleep(1)
        assigner.leadership_lost()  # the node's listener may say it too: no second event
        nursery.cancel_scope.cancel()
    assert events == ["address_gained", "address_lost"]


async def test_lost_while_still_working_towards_the_address(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake, leadership, events = FakeDO(holder=OTHER, action_seconds=20.0), FakeLeadership(), []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(make(fake, leadership, events).run)
        leadership.gain()
        await trio.sleep(5)  # the action is still running
        leadership.lose()
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert events == ["address_lost"]


async def test_seen_elsewhere_is_lost_and_taking_it_back_is_gained(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake, leadership, events = FakeDO(holder=OTHER), FakeLeadership(), []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(make(fake, leadership, events).run)
        leadership.gain()
        await trio.sleep(10)
        fake.holder = OTHER  # moved by hand
        await trio.sleep(20)
        assert events == ["address_gained", "address_lost", "address_gained"]
        nursery.cancel_scope.cancel()
    assert events[3:] == ["address_lost"], "cancelling `run` (the process stopping) ends it"


async def test_each_address_gets_its_share_of_the_budget() -> None:
    events: list[AddressEvent] = []
    assigner = make(FakeDO(holder=ME), FakeLeadership(), events, budget_shares=2)
    assert assigner._budget.per_minute == 30 and assigner._budget.per_hour == 600
    assigner.update_settings(AssignerSettings(requests_per_minute=250, requests_per_hour=5000))
    assert assigner._budget.per_minute == 125 and assigner._budget.per_hour == 2500


async def test_several_assigners_lead_on_one_nodes_leadership(
    autojump_clock: trio.testing.MockClock,
) -> None:
    node = FakeLeadership()
    shared = SharedLeadership(node)
    fakes = [FakeDO(holder=OTHER), FakeDO(holder=OTHER)]
    events: list[list[AddressEvent]] = [[], []]
    async with trio.open_nursery() as nursery:
        for fake, seen in zip(fakes, events, strict=True):
            nursery.start_soon(make(fake, shared, seen).run)
        node.gain()
        await trio.sleep(10)
        assert [f.holder for f in fakes] == [ME, ME]
        node.lose()
        shared.ended()  # what the node's LostLeadership listener does
        await trio.sleep(1)
        requests = [len(f.requests) for f in fakes]
        await trio.sleep(30)
        assert [len(f.requests) for f in fakes] == requests, "both stopped at once"
        node.gain()  # a new term: each gets a fresh scope again
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    # The last lost: cancelling `run` (the process stopping) ends the term too.
    assert events == [["address_gained", "address_lost", "address_gained", "address_lost"]] * 2
