"""The offline watchdog on a real core and SQLite file: a batmon goes Offline within a
second of ``last_reading + update_period`` with no request arriving, and only due
batmons are ever looked at.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.core import Batmon, Core
from bridge.events import EventBus, StatusChanged
from bridge.extensions.watchdog import OfflineWatchdog
from bridge.models import AddBatmon, EditBatmon, Reading
from bridge.store.db import Store


@pytest.fixture
def core(tmp_path: Path) -> Iterator[Core]:
    store = Store.open(tmp_path / "batmon.sqlite3")
    yield Core(store, EventBus()).load()
    store.close()


def add_batmon(core: Core, **fields: Any) -> Batmon:
    user = core.user_by_id(1) or core.create_user("owner@example.org")[0]
    return core.add_batmon(user, AddBatmon.model_validate({"batmon_name": "Bank", **fields}))


async def reading(core: Core, batmon: Batmon, **values: Any) -> None:
    await core.ingest_readings(batmon, [Reading.model_validate({"voltage": 12.5, **values})])


def record_status(core: Core) -> list[tuple[float, StatusChanged]]:
    """Every StatusChanged with the wall-clock time it was emitted."""
    seen: list[tuple[float, StatusChanged]] = []
    core.bus.subscribe(StatusChanged, lambda event: seen.append((time.time(), event)))
    return seen


def offline_times(seen: list[tuple[float, StatusChanged]], batmon: Batmon) -> list[float]:
    return [t for t, e in seen if e.batmon.id == batmon.id and e.status == "Offline"]


def offline_delay(seen: list[tuple[float, StatusChanged]], batmon: Batmon) -> float:
    """Seconds from the batmon's last reading to the first time it went Offline."""
    assert batmon.last_reading is not None
    return offline_times(seen, batmon)[0] - batmon.last_reading


async def until(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout} s")
        await asyncio.sleep(0.01)


def run_with_watchdog(core: Core, scenario: Callable[[OfflineWatchdog], Coroutine[Any, Any, None]]) -> None:
    """Run ``scenario`` in a fresh event loop with a started watchdog, stopping it after."""

    async def main() -> None:
        watchdog = OfflineWatchdog(core)
        await watchdog.start()
        try:
            await scenario(watchdog)
        finally:
            await watchdog.stop()

    asyncio.run(main())


def test_goes_offline_2_to_3_s_after_the_last_reading_with_no_request(core: Core) -> None:
    batmon = add_batmon(core, update_period=2)
    seen = record_status(core)

    async def scenario(watchdog: OfflineWatchdog) -> None:
        await reading(core, batmon)
        assert batmon.status == "Online"
        await until(lambda: offline_times(seen, batmon), 4, "Offline")

    run_with_watchdog(core, scenario)
    [flipped] = offline_times(seen, batmon)
    assert batmon.last_reading is not None
    assert 2.0 <= flipped - batmon.last_reading <= 3.0
    assert batmon.status == "Offline"
    [row] = core.store.batmons()
    assert row["status"] == "Offline"


def test_a_new_reading_brings_it_back_online_and_rearms_the_deadline(core: Core) -> None:
    batmon = add_batmon(core, update_period=1)
    seen = record_status(core)

    async def scenario(watchdog: OfflineWatchdog) -> None:
        await reading(core, batmon)
        await until(lambda: len(offline_times(seen, batmon)) == 1, 3, "first Offline")
        await reading(core, batmon)
        assert batmon.status == "Online"
        await until(lambda: len(offline_times(seen, batmon)) == 2, 3, "second Offline")

    run_with_watchdog(core, scenario)
    assert [e.status for _, e in seen] == ["Online", "Offline", "Online", "Offline"]
    assert batmon.last_reading is not None
    assert 1.0 <= offline_times(seen, batmon)[-1] - batmon.last_reading <= 2.0


def test_readings_before_the_deadline_push_it_back(core: Core) -> None:
    batmon = add_batmon(core, update_period=2)
    seen = record_status(core)

    async def scenario(watchdog: OfflineWatchdog) -> None:
        for _ in range(3):
            await reading(core, batmon)
            await asyncio.sleep(0.5)
        await until(lambda: offline_times(seen, batmon), 4, "Offline")

    run_with_watchdog(core, scenario)
    assert 2.0 <= offline_delay(seen, batmon) <= 3.0


def test_a_back_filled_older_reading_does_not_move_the_deadline(core: Core) -> None:
    batmon = add_batmon(core, update_period=1)
    seen = record_status(core)

    async def scenario(watchdog: OfflineWatchdog) -> None:
        await reading(core, batmon)
        first = batmon.last_reading
        await asyncio.sleep(0.5)
        await reading(core, batmon, ts=time.time() - 100)
        assert batmon.last_reading == first
        await until(lambda: offline_times(seen, batmon), 3, "Offline")

    run_with_watchdog(core, scenario)
    assert 1.0 <= offline_delay(seen, batmon) <= 2.0


def test_shortening_update_period_wakes_the_watchdog_early(core: Core) -> None:
    batmon = add_batmon(core, update_period=300)
    seen = record_status(core)

    async def scenario(watchdog: OfflineWatchdog) -> None:
        await reading(core, batmon)
        await asyncio.sleep(0.1)  # the watchdog now sleeps towards the 300 s deadline
        core.edit_batmon(batmon, EditBatmon(batmon_id=batmon.id, update_period=1))
        await until(lambda: offline_times(seen, batmon), 3, "Offline")

    run_with_watchdog(core, scenario)
    assert 1.0 <= offline_delay(seen, batmon) <= 2.0


def test_overdue_online_batmons_expire_as_soon_as_it_starts(tmp_path: Path) -> None:
    now = [1_700_000_000.0]
    store = Store.open(tmp_path / "batmon.sqlite3")
    core = Core(store, EventBus(), clock=lambda: now[0]).load()
    overdue, fresh = add_batmon(core, update_period=60), add_batmon(core, update_period=600)
    asyncio.run(reading(core, overdue))
    asyncio.run(reading(core, fresh))
    now[0] += 120  # as if the service was down for two minutes
    # A restart: a new core loads the statuses last announced.
    core = Core(store, EventBus(), clock=lambda: now[0]).load()
    seen = record_status(core)

    async def scenario(watchdog: OfflineWatchdog) -> None:
        assert [(e.batmon.id, e.status) for _, e in seen] == [(overdue.id, "Offline")]
        assert watchdog.armed == 1  # `fresh` is still due later

    run_with_watchdog(core, scenario)
    assert core.batmons[overdue.id].status == "Offline"
    assert core.batmons[fresh.id].status == "Online"
    store.close()


def test_only_due_batmons_are_looked_at(core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    quiet = [add_batmon(core, update_period=300) for _ in range(100)]
    due = add_batmon(core, update_period=1)
    checked: list[int] = []
    expire_if_due = core.expire_if_due

    def counting(batmon_id: int) -> bool:
        checked.append(batmon_id)
        return expire_if_due(batmon_id)

    monkeypatch.setattr(core, "expire_if_due", counting)
    seen = record_status(core)

    async def scenario(watchdog: OfflineWatchdog) -> None:
        for batmon in quiet:
            await reading(core, batmon)
        await reading(core, due)
        await until(lambda: offline_times(seen, due), 3, "Offline")
        await asyncio.sleep(0.2)  # room for a scanning watchdog to give itself away
        assert watchdog.armed == 100

    run_with_watchdog(core, scenario)
    assert checked == [due.id]


def test_a_deleted_batmon_is_skipped_and_others_still_expire(core: Core) -> None:
    deleted, kept = add_batmon(core, update_period=1), add_batmon(core, update_period=1)
    seen = record_status(core)

    async def scenario(watchdog: OfflineWatchdog) -> None:
        await reading(core, deleted)
        await reading(core, kept)
        await core.delete_batmon(deleted)
        await until(lambda: offline_times(seen, kept), 3, "kept batmon Offline")

    run_with_watchdog(core, scenario)
    assert offline_times(seen, deleted) == []


def test_readings_ingested_on_another_thread_still_arm_it(core: Core) -> None:
    batmon = add_batmon(core, update_period=1)
    seen = record_status(core)

    async def scenario(watchdog: OfflineWatchdog) -> None:
        # The bus runs handlers in the emitter's thread: here not the watchdog's.
        thread = threading.Thread(target=lambda: asyncio.run(reading(core, batmon)))
        thread.start()
        await asyncio.to_thread(thread.join)
        await until(lambda: offline_times(seen, batmon), 3, "Offline")

    run_with_watchdog(core, scenario)
    assert 1.0 <= offline_delay(seen, batmon) <= 2.0


def test_after_stop_nothing_changes(core: Core) -> None:
    batmon = add_batmon(core, update_period=1)

    async def main() -> None:
        watchdog = OfflineWatchdog(core)
        await watchdog.start()
        await reading(core, batmon)
        await watchdog.stop()
        await asyncio.sleep(1.3)

    asyncio.run(main())
    assert batmon.status == "Online"  # announced status untouched; the API computes it afresh
