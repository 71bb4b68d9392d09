"""The dashboard's live feed on a real core (tmp SQLite): who gets which batmon,
coalescing for a slow browser, the snapshot first and past its bound, ending on stop."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from bridge.core import Core
from bridge.events import EventBus, StatusChanged
from bridge.models import AddBatmon, DeviceRef, EditBatmon, Reading
from bridge.store.db import Store
from http_api import handlers as h
from http_api.live import LiveFeed, LiveStream, TooManyStreams


def run(tmp_path: Path, scenario: Callable[[Core, LiveFeed], Awaitable[None]], **options: Any) -> None:
    """Run ``scenario`` on a started feed over a real core, on one event loop."""

    async def main() -> None:
        store = Store.open(tmp_path / "batmon.sqlite3")
        core = Core(store, EventBus()).load()
        feed = LiveFeed(core, **options)
        await feed.start()
        try:
            await scenario(core, feed)
        finally:
            await feed.stop()
            store.close()

    asyncio.run(main())


async def messages(feed: LiveFeed, stream: LiveStream) -> list[tuple[str, dict[str, Any]]]:
    """The (event, data) pairs the stream would send now."""
    batch = await stream.take(timeout=0)
    assert batch is not None, "the stream is closed"
    out = []
    for text in await feed.messages_for(stream, *batch):
        event, data = text.strip().split("\n")
        out.append((event.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


async def opened(feed: LiveFeed, user_id: int) -> LiveStream:
    """A new stream, its opening snapshot already taken."""
    stream = feed.open(user_id)
    [(event, _)] = await messages(feed, stream)
    assert event == "snapshot"
    return stream


async def delete(core: Core, user: Any, batmon: Any) -> None:
    """Delete as the API does (the handler knows whether the core's delete is async)."""
    await h.delete_batmon(h.Call(core, user), DeviceRef(batmon_id=batmon.id))


def add(core: Core, user: Any, name: str) -> Any:
    return core.add_batmon(user, AddBatmon(batmon_name=name, batmon_type="BMV"))


async def ingest(core: Core, batmon: Any, **values: Any) -> None:
    await core.ingest_readings(batmon, [Reading.model_validate(values)])


def test_a_slow_stream_gets_each_changed_batmon_once_with_its_latest_values(tmp_path: Path) -> None:
    async def scenario(core: Core, feed: LiveFeed) -> None:
        user, _ = core.create_user("owner@example.org")
        house, van = add(core, user, "House"), add(core, user, "Van")
        stream = await opened(feed, user.id)
        for volts in (12.1, 12.2, 12.3):
            await ingest(core, house, voltage=volts)
        await ingest(core, van, soc=50)
        got = await messages(feed, stream)
        assert [(e, d["batmon_id"]) for e, d in got] == [("batmon", house.id), ("batmon", van.id)]
        assert got[0][1]["batmon_voltage"] == 12.3
        assert got[0][1]["batmon_status"] == "Online"
        assert got[0][1]["units"] == {"voltage": "V", "current": "A", "power": "W", "soc": "%"}
        assert "batmon_token" not in got[0][1]
        assert await messages(feed, stream) == []  # nothing new since

    run(tmp_path, scenario)


def test_a_stream_carries_only_its_owners_batmons(tmp_path: Path) -> None:
    async def scenario(core: Core, feed: LiveFeed) -> None:
        owner, _ = core.create_user("owner@example.org")
        stranger, _ = core.create_user("stranger@example.org")
        mine, theirs = add(core, owner, "Mine"), add(core, stranger, "Theirs")
        stream = feed.open(owner.id)
        [(event, batmons)] = await messages(feed, stream)
        assert (event, [b["batmon_id"] for b in batmons]) == ("snapshot", [mine.id])
        await ingest(core, theirs, voltage=1.0)
        core.edit_batmon(theirs, EditBatmon(batmon_id=theirs.id, batmon_name="Renamed"))
        await delete(core, stranger, theirs)
        await ingest(core, mine, voltage=2.0)
        got = await messages(feed, stream)
        assert [(e, d["batmon_id"]) for e, d in got] == [("batmon", mine.id)]

    run(tmp_path, scenario)


def test_edits_and_deletes_reach_the_stream(tmp_path: Path) -> None:
    async def scenario(core: Core, feed: LiveFeed) -> None:
        user, _ = core.create_user("owner@example.org")
        house, van = add(core, user, "House"), add(core, user, "Van")
        stream = await opened(feed, user.id)
        core.edit_batmon(house, EditBatmon(batmon_id=house.id, batmon_name="House bank",
                                           voltage_units="mV"))  # fmt: skip
        await ingest(core, van, voltage=1.0)
        await delete(core, user, van)  # after a reading: the stream says deleted, once
        got = await messages(feed, stream)
        assert got == [("batmon", got[0][1]), ("deleted", {"batmon_id": van.id})]
        assert got[0][1]["batmon_name"] == "House bank"
        assert got[0][1]["units"]["voltage"] == "mV"

    run(tmp_path, scenario)


def test_a_stream_opens_with_a_snapshot_and_sends_one_again_past_its_bound(tmp_path: Path) -> None:
    async def scenario(core: Core, feed: LiveFeed) -> None:
        user, _ = core.create_user("owner@example.org")
        batmons = [add(core, user, f"B{i}") for i in range(5)]
        await ingest(core, batmons[0], voltage=9.0)
        stream = feed.open(user.id)
        [(event, first)] = await messages(feed, stream)
        assert event == "snapshot" and [b["batmon_id"] for b in first] == [b.id for b in batmons]
        assert first[0]["batmon_voltage"] == 9.0 and "batmon_token" not in first[0]
        for b in batmons:  # five distinct batmons, more than the stream remembers
            await ingest(core, b, voltage=1.0)
        await delete(core, user, batmons[4])
        [(event, again)] = await messages(feed, stream)
        assert event == "snapshot" and [b["batmon_id"] for b in again] == [b.id for b in batmons[:4]]
        assert {b["batmon_voltage"] for b in again} == {1.0}
        await ingest(core, batmons[0], voltage=2.0)  # and back to one batmon at a time
        assert [e for e, _ in await messages(feed, stream)] == ["batmon"]

    run(tmp_path, scenario, max_pending=3)


def test_a_user_may_open_only_so_many_streams(tmp_path: Path) -> None:
    async def scenario(core: Core, feed: LiveFeed) -> None:
        user, _ = core.create_user("owner@example.org")
        first = feed.open(user.id)
        feed.open(user.id)
        with pytest.raises(TooManyStreams) as refused:
            feed.open(user.id)
        assert refused.value.status == 429
        feed.release(first)
        feed.open(user.id)  # a closed tab frees its place

    run(tmp_path, scenario, max_streams_per_user=2)


def test_stop_ends_every_open_stream(tmp_path: Path) -> None:
    async def scenario(core: Core, feed: LiveFeed) -> None:
        user, _ = core.create_user("owner@example.org")
        stream = feed.open(user.id)
        texts: list[str] = []
        snapshot_sent = asyncio.Event()

        async def consume() -> None:
            async for text in feed.serve(stream):
                texts.append(text)
                if text.startswith("event: snapshot"):
                    snapshot_sent.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(snapshot_sent.wait(), 5)
        await feed.stop()
        await asyncio.wait_for(task, 5)  # bounded: a stream that never ends fails here
        assert texts == ["retry: 3000\n\n", "event: snapshot\ndata: []\n\n"]
        assert feed.stream_count() == 0

    run(tmp_path, scenario, keepalive_s=3600)


def test_an_event_emitted_on_another_thread_reaches_the_stream_on_the_loop(tmp_path: Path) -> None:
    async def scenario(core: Core, feed: LiveFeed) -> None:
        user, _ = core.create_user("owner@example.org")
        house = add(core, user, "House")
        stream = await opened(feed, user.id)
        # A writer thread may emit events one day: the feed hops onto the loop.
        thread = threading.Thread(target=core.bus.emit,
                                  args=(StatusChanged(house, "Online", "Offline", 0.0),))  # fmt: skip
        thread.start()
        thread.join(5)
        batch = await stream.take(timeout=5)
        assert batch == ({house.id: False}, False)

    run(tmp_path, scenario)


# -- when each value was last reported (issue 18: "—" and stale marks) ----------------------
def test_a_value_left_out_of_the_latest_reading_is_stale_and_one_never_sent_is_null(
    tmp_path: Path,
) -> None:
    async def scenario(core: Core, feed: LiveFeed) -> None:
        user, _ = core.create_user("owner@example.org")
        house, fresh = add(core, user, "House"), add(core, user, "Fresh")
        stream = await opened(feed, user.id)
        await ingest(core, house, voltage=12.5, current=-3.0, ts=1_700_000_000)
        await ingest(core, house, voltage=12.6, ts=1_700_000_060)  # a voltage-only reading
        [(event, data)] = await messages(feed, stream)
        assert event == "batmon"
        assert data["reported"] == {"voltage": 1_700_000_060, "current": 1_700_000_000,
                                    "power": None, "soc": None}  # fmt: skip
        assert data["stale"] == ["current"]
        # The API keeps the seed's 0.0 for a value never reported; only the page says "—".
        assert (data["batmon_power"], data["batmon_soc"]) == (0.0, 0.0)
        snapshot = feed.snapshot(fresh, core.clock())
        assert set(snapshot["reported"].values()) == {None} and snapshot["stale"] == []

    run(tmp_path, scenario)


def test_after_a_restart_the_feed_learns_from_history_when_each_value_was_reported(
    tmp_path: Path,
) -> None:
    async def before(core: Core, feed: LiveFeed) -> None:
        user, _ = core.create_user("owner@example.org")
        house = add(core, user, "House")
        await ingest(core, house, voltage=12.5, soc=80, details={"temperature": 21},
                     ts=1_700_000_000)  # fmt: skip
        await ingest(core, house, voltage=12.6, ts=1_700_000_060)
        await ingest(core, house, current=4.0, ts=1_699_999_000)  # back-filled: history only

    async def after(core: Core, feed: LiveFeed) -> None:
        [house] = core.batmons.values()
        await feed.learn_reported([house])
        snapshot = feed.snapshot(house, core.clock())
        assert snapshot["reported"] == {"voltage": 1_700_000_060, "current": 1_699_999_000,
                                        "power": None, "soc": 1_700_000_000}  # fmt: skip
        assert snapshot["stale"] == ["current", "soc"]

    run(tmp_path, before)
    run(tmp_path, after)


def test_a_value_only_in_pruned_readings_is_known_from_the_hourly_rollups(tmp_path: Path) -> None:
    async def before(core: Core, feed: LiveFeed) -> None:
        user, _ = core.create_user("owner@example.org")
        house = add(core, user, "House")
        await ingest(core, house, soc=80, ts=1_700_000_000)  # 22:13:20 UTC; pruned below
        await ingest(core, house, voltage=12.6, ts=1_700_100_000)
        await core.writer.barrier()
        retention = core.store.another()  # the pruner's own handle, as RetentionPruner has
        assert retention.prune_batch(house.id, 1_700_050_000, 5_000) == 1
        retention.close()

    async def after(core: Core, feed: LiveFeed) -> None:
        [house] = core.batmons.values()
        await feed.learn_reported([house])
        snapshot = feed.snapshot(house, core.clock())
        # No later than the end of its hour: 22:00:00 + 3,599 s.
        assert snapshot["reported"]["soc"] == 1_699_999_200 + 3599
        assert snapshot["reported"]["current"] is None and snapshot["stale"] == ["soc"]

    run(tmp_path, before)
    run(tmp_path, after)


def test_a_page_shown_before_any_stream_still_sees_later_readings_as_fresh(tmp_path: Path) -> None:
    async def scenario(core: Core, feed: LiveFeed) -> None:
        user, _ = core.create_user("owner@example.org")
        house = add(core, user, "House")
        await ingest(core, house, voltage=12.5, current=1.0, power=12.5, soc=80, ts=1_700_000_000)
        await feed.learn_reported([house])  # a page, with no stream open and the feed not started
        await ingest(core, house, voltage=12.6, current=1.1, power=13.9, soc=81, ts=1_700_000_060)
        snapshot = feed.snapshot(house, core.clock())
        assert snapshot["stale"] == [] and snapshot["reported"]["soc"] == 1_700_000_060

    async def main() -> None:
        store = Store.open(tmp_path / "batmon.sqlite3")
        core = Core(store, EventBus()).load()
        feed = LiveFeed(core)  # not started: the first page does it
        try:
            await scenario(core, feed)
        finally:
            await feed.stop()
            store.close()

    asyncio.run(main())
