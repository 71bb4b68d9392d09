"""The group-committing writer on real SQLite files: order, grouping, faults, back-pressure."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.core import Batmon, Core
from bridge.doors.update_door import UpdateDoor
from bridge.errors import Unavailable
from bridge.events import EventBus, ReadingAccepted
from bridge.models import AddBatmon, Reading
from bridge.store.db import Store
from bridge.store.readings import SqliteReadingSink
from bridge.topics import Topics
from bridge.writer import Overloaded, ReadingWriter, StorageFailed
from tests.support import FullDisk, wait_until


@pytest.fixture
def core(tmp_path: Path) -> Iterator[Core]:
    core = Core(Store.open(tmp_path / "batmon.sqlite3"), EventBus()).load()
    yield core
    core.close()


def add(core: Core, name: str = "Bank", period: int = 300) -> Batmon:
    user = core.user_by_id(1) or core.create_user("o@example.org")[0]
    return core.add_batmon(user, AddBatmon(batmon_name=name, update_period=period))


def stored(core: Core, batmon: Batmon) -> list[tuple[float, float | None]]:
    return [(r["ts"], r["voltage"]) for r in core.store.history(batmon.id, 0, 2**40)]


def test_concurrent_submissions_are_committed_in_groups_and_in_order(core: Core) -> None:
    batmons = [add(core, f"b{i}") for i in range(4)]

    async def scenario() -> None:
        futures = [
            core.submit_readings(b, [Reading(batmon_voltage=n, ts=1_000_000 + n)], "mqtt")
            for n in range(500)
            for b in batmons
        ]
        await asyncio.gather(*futures)

    asyncio.run(scenario())
    for b in batmons:
        assert [v for _, v in stored(core, b)] == list(range(500))
        assert b.voltage == 499 and b.last_reading == 1_000_499
    # 2,000 submissions, far fewer transactions: that is the point of the writer.
    assert core.writer.stats.rows == 2000
    assert core.writer.stats.commits < 2000 / 4


def test_an_older_reading_pending_behind_a_newer_one_goes_to_history_only(core: Core) -> None:
    batmon = add(core)
    seen: list[tuple[float, bool]] = []
    core.bus.subscribe(ReadingAccepted, lambda e: seen.append((e.ts, e.current)))

    async def scenario() -> None:
        newer = core.submit_readings(batmon, [Reading(batmon_voltage=13.0, ts=2_000_000)])
        older = core.submit_readings(batmon, [Reading(batmon_voltage=11.0, ts=1_999_000)])
        await asyncio.gather(newer, older)

    asyncio.run(scenario())
    assert batmon.voltage == 13.0 and batmon.last_reading == 2_000_000
    assert seen == [(2_000_000, True), (1_999_000, False)]
    reloaded = Core(core.store, EventBus()).load().batmons[batmon.id]
    assert (reloaded.voltage, reloaded.last_reading) == (13.0, 2_000_000)


def test_a_failed_commit_is_never_acknowledged_and_ingest_recovers_by_itself(core: Core) -> None:
    batmon = add(core)
    disk = FullDisk(core.store.path)
    core.writer = ReadingWriter(disk, core._apply_committed)
    big = "x" * 8000  # each reading needs new pages

    async def scenario() -> None:
        with pytest.raises(StorageFailed, match="full"):
            await core.ingest_readings(batmon, [Reading(batmon_voltage=12, batmon_details={"k": big})])
        assert core.writer_health()["state"] == "failing"
        assert batmon.last_reading is None and batmon.voltage == 0.0  # memory untouched
        disk.clear()
        for _ in range(50):  # the writer probes the disk each second without traffic
            if core.writer_health()["state"] == "ok":
                break
            await asyncio.sleep(0.1)
        assert core.writer_health()["state"] == "ok"
        await core.ingest_readings(batmon, [Reading(batmon_voltage=12.5, batmon_details={"k": big})])

    asyncio.run(scenario())
    assert [v for _, v in stored(core, batmon)] == [12.5]
    assert batmon.voltage == 12.5


def test_a_failed_group_does_not_make_a_later_older_reading_current(core: Core) -> None:
    """The writer plans against pending readings; a failed group must not leave its
    timestamps behind, or a later older reading would wrongly go to history only."""
    batmon = add(core)
    disk = FullDisk(core.store.path)
    core.writer = ReadingWriter(disk, core._apply_committed)

    async def scenario() -> None:
        with pytest.raises(Unavailable):
            await core.ingest_readings(batmon, [Reading(batmon_voltage=14, ts=3_000_000,
                                                        batmon_details={"k": "y" * 8000})])  # fmt: skip
        disk.clear()
        await core.ingest_readings(batmon, [Reading(batmon_voltage=12, ts=2_000_000)])

    asyncio.run(scenario())
    assert batmon.voltage == 12 and batmon.last_reading == 2_000_000


def test_a_full_queue_refuses_at_once_instead_of_growing(core: Core, monkeypatch) -> None:
    monkeypatch.setenv("BATMON_TEST_COMMIT_DELAY_MS", "200")
    batmon = add(core)
    core.writer = ReadingWriter(lambda: SqliteReadingSink(core.store.path), core._apply_committed,
                                max_pending_rows=10)  # fmt: skip

    async def scenario() -> int:
        taken = [core.submit_readings(batmon, [Reading(batmon_voltage=n)]) for n in range(10)]
        with pytest.raises(Overloaded):
            core.submit_readings(batmon, [Reading(batmon_voltage=99)])
        await asyncio.gather(*taken)
        await core.ingest_readings(batmon, [Reading(batmon_voltage=100)])  # room again
        return core.writer.refused_overloaded

    assert asyncio.run(scenario()) == 1
    assert len(stored(core, batmon)) == 11


def test_an_update_refused_as_overloaded_is_not_counted_received_until_taken(core: Core, monkeypatch) -> None:
    """The external door submits a refused update again once there is room: counting each try
    made `received` (and batmon_mqtt_messages_received) run ahead of what came from the broker."""
    monkeypatch.setenv("BATMON_TEST_COMMIT_DELAY_MS", "200")
    batmon = add(core)
    core.writer = ReadingWriter(lambda: SqliteReadingSink(core.store.path), core._apply_committed,
                                max_pending_rows=10)  # fmt: skip
    topics = Topics()
    door = UpdateDoor(core, topics, lambda *args: None)
    topic = topics.update(batmon.id, batmon.token)

    async def scenario() -> None:
        taken = [door.submit(topic, b'{"voltage": %d}' % n) for n in range(10)]
        for _ in range(3):  # three tries while the writer is full
            with pytest.raises(Overloaded):
                door.submit(topic, b'{"voltage": 99}')
        await asyncio.gather(*[f for f in taken if f is not None])
        future = door.submit(topic, b'{"voltage": 99}')  # taken at last
        assert future is not None
        await future

    asyncio.run(scenario())
    assert (door.stats["received"], door.stats["accepted"]) == (11, 11)


def test_delete_waits_for_pending_readings_so_none_lands_after_it(core: Core) -> None:
    batmon = add(core)

    async def scenario() -> None:
        pending = [core.submit_readings(batmon, [Reading(batmon_voltage=n)]) for n in range(200)]
        await core.delete_batmon(batmon)
        await asyncio.gather(*pending)

    asyncio.run(scenario())
    # Its readings are purged by the writer after the answer, a chunk at a time.
    wait_until(lambda: core.store.reading_count(batmon.id) == 0, 10, "the readings purged")
    assert core.store.deleted_with_data() == []


def test_the_writer_uses_its_own_wal_connection(core: Core) -> None:
    sink = SqliteReadingSink(core.store.path)
    try:
        assert sink._conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL: see CHOICES
        assert sink._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        sink.close()
    with pytest.raises(sqlite3.ProgrammingError):
        sink.probe()  # closed
