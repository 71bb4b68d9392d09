"""Energy integration with several writers on one PostgreSQL database (docs/BATTERY.md,
"Several workers"): two cores, each with its own writer and its own memory, as two
`batmon serve` workers would have, get the readings of one batmon in turn or at random.
The store's guard (bridge/store/energy_guard.py) makes each writer plan again from the
batmon's stored state when the other moved it on, so the counters are what one writer
would have counted, they never fall, and the readings' kWh add up to them.

Before the guard (measured, same profile at random): the stored counter fell at 92 of 360
commits and the readings' kWh summed to twice the truth.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import psycopg
import pytest

from bridge.core import Core
from bridge.events import EventBus
from bridge.models import AddBatmon, Reading
from bridge.store.pg_store import PostgresStore
from tests import pg_support
from tests.support import T0

READINGS = 121  # 20 min at 100 W, a reading every 10 s: 1200 s x 100 W = 1/30 kWh exactly
EXACT_KWH = 100 * 10 * (READINGS - 1) / 3.6e6


@pytest.fixture
def two_workers() -> Iterator[tuple[Core, Core, PostgresStore, str]]:
    url = pg_support.fresh_database_url()
    stores = [PostgresStore.open(url), PostgresStore.open(url)]
    first = Core(stores[0], EventBus()).load()
    user, _ = first.create_user("owner@example.org")
    first.add_batmon(user, AddBatmon(batmon_name="Pack", update_period=60))
    second = Core(stores[1], EventBus()).load()  # it knows the batmon from the database
    yield first, second, stores[0], url
    for core in (first, second):
        core.close()


@pytest.mark.parametrize("order", ["in turn", "at random"])
def test_two_writers_count_one_batmons_energy_once_and_never_backwards(
        two_workers: tuple[Core, Core, PostgresStore, str], order: str) -> None:  # fmt: skip
    first, second, store, url = two_workers
    (batmon_id,) = first.batmons
    rng = random.Random(17)
    stored: list[float] = []

    async def feed() -> None:
        for i in range(READINGS):
            core = (first, second)[i % 2 if order == "in turn" else rng.random() < 0.5]
            await core.ingest_readings(core.batmons[batmon_id], [Reading(batmon_power=100.0, ts=T0 + 10 * i)])
            await core.writer.barrier()
            stored.append(next(r for r in store.batmons() if r["id"] == batmon_id)["energy_charged_kwh"])

    asyncio.run(feed())
    assert stored == sorted(stored), "the stored counter fell"
    assert stored[-1] == pytest.approx(EXACT_KWH, rel=1e-9)
    with psycopg.connect(url) as conn:
        (added,) = conn.execute("SELECT sum(charged_kwh) FROM readings WHERE batmon_id = %s",
                                (batmon_id,)).fetchone()  # fmt: skip
    assert added == pytest.approx(EXACT_KWH, rel=1e-9), "a stretch of time was counted twice"
    assert first.writer.stats.replans + second.writer.stats.replans > 0  # the guard was needed
