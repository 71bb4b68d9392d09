"""What any store must do (bridge/store/interface.py), checked on every implementation.

Every test takes the one ``store`` fixture below, which is parametrised over the
from bridge.store.memory import MemoryStore
from tests import pg_support

STORES: dict[str, Callable[[Path], Store]] = {
    "sqlite": lambda tmp_path: SqliteStore.open(tmp_path / "contract.sqlite3"),
    "memory": lambda tmp_path: MemoryStore(),
    "postgres": lambda tmp_path: pg_support.clean_store(),

How a second implementation joins (the PostgreSQL store of the scale-out issue):
add ONE entry to ``STORES``, a name and a function ``(tmp_path) -> Store`` that
opens an empty, migrated store of that kind and is closed by the fixture, e.g.

    STORES["postgresql"] = lambda tmp_path: PostgresStore.open(private_database(tmp_path))

and every test here runs on it too. Nothing else changes: the tests use the
interface only (no SQL, no file paths, no rowids), the store's own errors
(``Conflict``, ``StorageFailed``) and plain values.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.errors import Conflict
from bridge.store.db import SqliteStore
from bridge.store.energy_guard import PLANNED_FROM, StaleState
from bridge.store.interface import CHANNELS, Claim, ReadingRow, Store
from bridge.store.memory import MemoryStore
from tests import pg_support

STORES: dict[str, Callable[[Path], Store]] = {
    "sqlite": lambda tmp_path: SqliteStore.open(tmp_path / "contract.sqlite3"),
    "memory": lambda tmp_path: MemoryStore(),
    "postgres": lambda tmp_path: pg_support.clean_store(),
}

SHARED = {"postgres"}  # stores several workers share: claims have a lease, nothing is requeued at start
HOUR = 3600
T0 = 1_700_000_000 // HOUR * HOUR  # a whole hour


@pytest.fixture(params=sorted(STORES))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """An empty store of each implementation."""
    opened = STORES[request.param](tmp_path)
    try:
        yield opened
    finally:
        opened.close()


# -- helpers (interface only) --------------------------------------------------------------
def add_user(store: Store, email: str = "owner@example.org") -> int:
    return store.add_user(email, f"hash-of-{email}", T0)


def add_batmon(store: Store, user_id: int, batmon_id: int, created: float = T0) -> int:
    store.add_batmon({"id": batmon_id, "user_id": user_id, "name": f"b{batmon_id}", "type": "generic",
                      "token": f"token-{batmon_id}", "update_period": 300, "created": created})  # fmt: skip
    return batmon_id


def add_alarm(store: Store, batmon_id: int, alarm_id: int) -> int:
    store.add_alarm({"id": alarm_id, "batmon_id": batmon_id, "name": "High", "metric": "voltage",
                     "condition": ">", "threshold": 14.0, "repeat_delay": 300, "enabled": True,
                     "update_time": T0})  # fmt: skip
    return alarm_id


def reading(batmon_id: int, ts: float, voltage: float | None, details: str | None = None,
            charged_kwh: float | None = None, discharged_kwh: float | None = None) -> ReadingRow:
    return (batmon_id, ts, voltage, None, None, None, details, charged_kwh, discharged_kwh)


def voltages(store: Store, batmon_id: int) -> list[tuple[float, float | None]]:
    return [(r["ts"], r["voltage"]) for r in store.history(batmon_id, 0, 2**40)]


def batmon_row(store: Store, batmon_id: int) -> dict[str, Any] | None:
    return next((b for b in store.batmons() if b["id"] == batmon_id), None)


@pytest.fixture
def batmon(store: Store) -> int:
    return add_batmon(store, add_user(store), 101)


# -- readings ---------------------------------------------------------------------------------
def test_history_is_in_time_order_then_write_order(store: Store, batmon: int) -> None:
    store.write([reading(batmon, T0 + 5, 1.0), reading(batmon, T0 + 1, 2.0)], [])
    store.write([reading(batmon, T0 + 3, 3.0), reading(batmon, T0 + 5, 4.0)], [])
    assert voltages(store, batmon) == [(T0 + 1, 2.0), (T0 + 3, 3.0), (T0 + 5, 1.0), (T0 + 5, 4.0)]
    assert store.reading_count(batmon) == 4


def test_history_range_is_min_inclusive_max_exclusive(store: Store, batmon: int) -> None:
    store.write([reading(batmon, T0 + k, float(k)) for k in range(5)], [])
    assert [r["voltage"] for r in store.history(batmon, T0 + 1, T0 + 3)] == [1.0, 2.0]


def test_a_redelivered_reading_is_stored_once(store: Store, batmon: int) -> None:
    row = reading(batmon, T0 + 1.25, 12.5, '{"key": 25}')
    store.write([row], [])
    store.write([row], [])  # the device resent it after a lost acknowledgement
    store.write([row, row], [])
    assert voltages(store, batmon) == [(T0 + 1.25, 12.5)]


def test_two_different_readings_with_one_ts_are_both_kept_in_write_order(store: Store, batmon: int) -> None:
    store.write([reading(batmon, T0, 12.0)], [])
    store.write([reading(batmon, T0, 13.0)], [])
    store.write([reading(batmon, T0, 12.0, '{"cell": 1}')], [])  # same voltage, other details
    assert voltages(store, batmon) == [(T0, 12.0), (T0, 13.0), (T0, 12.0)]


def test_details_come_back_as_written_whatever_their_characters(store: Store, batmon: int) -> None:
    awkward = '{"note": "tab\there\\nnot a newline\\\\ \\N", "raw": "\n\r\\", "ü": "€"}'
    row = reading(batmon, T0, None, awkward)
    store.write([row, reading(batmon, T0, None, ""), reading(batmon, T0, None, None)], [])
    store.write([row, reading(batmon, T0, None, None)], [])  # redelivered: still once each
    assert [r["details"] for r in store.history(batmon, 0, 2**40)] == [awkward, "", None]


def test_readings_of_one_batmon_never_show_in_another(store: Store, batmon: int) -> None:
    other = add_batmon(store, add_user(store, "other@example.org"), 202)
    store.write([reading(batmon, T0, 1.0), reading(other, T0, 2.0)], [])
    assert voltages(store, batmon) == [(T0, 1.0)] and voltages(store, other) == [(T0, 2.0)]


def test_latest_values_follow_the_newest_reading_never_an_older_one(store: Store, batmon: int) -> None:
    store.write([reading(batmon, T0 + 100, 12.0)],
                [(batmon, {"voltage": 12.0, "last_reading": T0 + 100, "status": "Online"})])  # fmt: skip
    # An older reading (planned elsewhere, say by another process) goes to history only.
    store.write([reading(batmon, T0 + 50, 11.0)],
                [(batmon, {"voltage": 11.0, "last_reading": T0 + 50, "status": "Offline"})])  # fmt: skip
    row = batmon_row(store, batmon)
    assert row is not None
    assert (row["voltage"], row["last_reading"], row["status"]) == (12.0, T0 + 100, "Online")
    assert voltages(store, batmon) == [(T0 + 50, 11.0), (T0 + 100, 12.0)]
    store.write([reading(batmon, T0 + 100, 12.5)],
                [(batmon, {"voltage": 12.5, "last_reading": T0 + 100})])  # same ts: the later wins
    row = batmon_row(store, batmon)
    assert row is not None and row["voltage"] == 12.5


def test_a_write_that_fails_changes_nothing(store: Store, batmon: int) -> None:
    with pytest.raises(ValueError):
        store.write([reading(batmon, T0, 1.0)], [(batmon, {"not_a_column": 1})])
    assert voltages(store, batmon) == []
    store.probe()  # and the handle still works
    assert store.ping()


def test_another_handle_sees_what_one_wrote(store: Store, batmon: int) -> None:
    other = store.another()
    try:
        other.write([reading(batmon, T0, 1.0)], [(batmon, {"voltage": 1.0, "last_reading": T0})])
        assert voltages(store, batmon) == [(T0, 1.0)]
        row = batmon_row(store, batmon)
        assert row is not None and row["voltage"] == 1.0
    finally:
        other.close()


def test_history_reader_pages_and_buckets_off_the_calling_thread(store: Store, batmon: int) -> None:
    store.write([reading(batmon, T0 + k, float(k)) for k in range(10)], [])
    reader = store.history_reader(workers=1)

    async def read() -> tuple[Any, list[bytes], Any, list[bytes]]:
        span = await reader.raw_span(batmon, T0, T0 + 100)
        pages = [p async for p in reader.raw_pages(batmon, T0 + 2, T0 + 4, lambda rows: repr(
            [r[1] for r in rows]).encode())]  # fmt: skip
        plan = await reader.bucket_plan(batmon, T0, T0 + 100, 5)
        buckets = [p async for p in reader.bucket_pages(batmon, T0, T0, T0 + 9, 5, False, lambda rows: repr(
            [(r[0], r[1], r[2], r[3], r[4]) for r in rows]).encode())]  # fmt: skip
        return span, pages, plan, buckets

    try:
        span, pages, plan, buckets = asyncio.run(read())
    finally:
        reader.close()
    assert span == (T0, T0 + 9)
    assert b"".join(pages) == b"[2.0, 3.0, 4.0]"
    assert plan == (T0, T0 + 9, False)
    assert b"".join(buckets) == repr([(T0, 5, 0.0, 2.0, 4.0), (T0 + 5, 5, 5.0, 7.0, 9.0)]).encode()


def test_history_reader_tells_when_each_metric_was_last_reported(store: Store, batmon: int) -> None:
    other = add_batmon(store, add_user(store, "other@example.org"), 202)
    silent = add_batmon(store, add_user(store, "silent@example.org"), 303)
    store.write([(batmon, T0 + 10, 12.0, 1.0, None, None, None, None, None),
                 (batmon, T0 + 20, 12.1, None, None, None, None, None, None),
                 (other, T0 + 30, None, None, None, 50.0, None, None, None)], [])  # fmt: skip
    store.prune_batch(other, T0 + HOUR, 100)  # its soc is in an hourly rollup only
    store.write([(other, T0 + 2 * HOUR, 12.5, None, None, None, None, None, None)], [])
    reader = store.history_reader(workers=1)
    try:
        found = asyncio.run(reader.last_reported([batmon, other, silent]))
    finally:
        reader.close()
    assert found == {batmon: {"voltage": T0 + 20, "current": T0 + 10},
                     other: {"voltage": T0 + 2 * HOUR, "soc": T0 + HOUR - 1}, silent: {}}  # fmt: skip


def test_last_reported_is_per_metric_from_readings_then_rollups(store: Store, batmon: int) -> None:
    store.write([(batmon, T0 + 10, 12.0, 1.0, None, None, None, None, None)], [])  # an old hour, pruned below
    store.prune_batch(batmon, T0 + HOUR, 100)
    store.write([(batmon, T0 + HOUR + 5, 12.5, None, 3.0, None, None, None, None),
                 (batmon, T0 + HOUR + 9, None, None, 4.0, None, None, None, None)], [])  # fmt: skip
    reader = store.history_reader(workers=1)
    try:
        found = asyncio.run(reader.last_reported([batmon]))
    finally:
        reader.close()
    assert found == {batmon: {"power": T0 + HOUR + 9, "voltage": T0 + HOUR + 5, "current": T0 + HOUR - 1}}


# -- users ------------------------------------------------------------------------------------
def test_users_are_found_by_key_email_and_id_and_emails_are_unique(store: Store) -> None:
    first = add_user(store, "a@example.org")
    second = add_user(store, "b@example.org")
    assert first != second
    assert [u["email"] for u in store.users()] == ["a@example.org", "b@example.org"]
    assert store.user_by_key_hash("hash-of-b@example.org")["id"] == second  # type: ignore[index]
    assert store.user_by_email("a@example.org")["id"] == first  # type: ignore[index]
    assert store.user_by_id(second)["email"] == "b@example.org"  # type: ignore[index]
    assert store.user_by_id(second + 1000) is None and store.user_by_email("c@example.org") is None
    with pytest.raises(Conflict):
        add_user(store, "a@example.org")


def test_user_targets_change_only_the_channels_given(store: Store) -> None:
    user = add_user(store)
    store.set_user_targets(user, {"email_url": "mailto://a@example.org", "sms_url": "json://s/"})
    store.set_user_targets(user, {"sms_url": ""})
    row = store.user_by_id(user)
    assert row is not None
    assert (row["email_url"], row["whatsapp_url"], row["sms_url"]) == ("mailto://a@example.org", "", "")
    with pytest.raises(ValueError):
        store.set_user_targets(user, {"api_key_hash": "x"})


# -- credentials ------------------------------------------------------------------------------
def test_every_credential_change_moves_the_counter_another_handle_polls(store: Store) -> None:
    poll = store.another()  # what a running server's watcher reads, beside `batmon user ...`
    try:
        start = poll.credentials.version()
        user = add_user(store, "a@example.org")
        seen = [poll.credentials.version()]
        credentials = store.credentials
        credentials.set_api_key_hash(user, "key-hash-2")
        seen.append(poll.credentials.version())
        assert credentials.add_token(user, "home-assistant", "token-hash", T0 + 1) is True
        seen.append(poll.credentials.version())
        assert credentials.revoke_token(user, "home-assistant") is True
        seen.append(poll.credentials.version())
        assert start < seen[0] < seen[1] < seen[2] < seen[3]
        # A refused change is no change.
        assert credentials.revoke_token(user, "home-assistant") is False
        assert poll.credentials.version() == seen[3]
    finally:
        poll.close()


def test_credentials_load_with_their_version_and_never_show_a_token_hash(store: Store) -> None:
    first = add_user(store, "a@example.org")
    second = add_user(store, "b@example.org")
    credentials = store.credentials
    assert credentials.add_token(first, "home-assistant", "hash-1", T0 + 2) is True
    assert credentials.add_token(first, "garage", "hash-2", T0 + 1) is True
    assert credentials.add_token(first, "garage", "hash-3", T0 + 3) is False  # the name is taken
    assert credentials.add_token(second, "garage", "hash-4", T0 + 3) is True  # another user's name
    assert credentials.tokens_of(first) == [{"name": "garage", "created": T0 + 1},
                                            {"name": "home-assistant", "created": T0 + 2}]  # fmt: skip
    assert credentials.tokens_of(second + 1000) == []
    loaded = credentials.load()
    assert loaded.version == credentials.version()
    assert sorted((u["id"], u["email"], u["api_key_hash"]) for u in loaded.users) == [
        (first, "a@example.org", "hash-of-a@example.org"), (second, "b@example.org", "hash-of-b@example.org")]
    assert sorted((t["user_id"], t["secret_hash"]) for t in loaded.tokens) == [
        (first, "hash-1"), (first, "hash-2"), (second, "hash-4")]  # fmt: skip
    credentials.set_api_key_hash(second, "new-key-hash")
    assert store.user_by_key_hash("new-key-hash")["id"] == second  # type: ignore[index]
    assert store.user_by_key_hash("hash-of-b@example.org") is None


# -- batmons and alarms -----------------------------------------------------------------------
def test_batmons_are_listed_oldest_first_and_updated(store: Store) -> None:
    user = add_user(store)
    add_batmon(store, user, 7, created=T0 + 2)
    add_batmon(store, user, 3, created=T0 + 1)
    store.update_batmon(7, {"name": "Garage", "notification_enabled": False, "soc_units": "pct"})
    rows = store.batmons()
    assert [b["id"] for b in rows] == [3, 7]
    assert (rows[1]["name"], bool(rows[1]["notification_enabled"]), rows[1]["soc_units"]) == (
        "Garage", False, "pct")  # fmt: skip
    assert (rows[0]["voltage"], rows[0]["details"], rows[0]["status"]) == (0.0, "{}", "Offline")
    with pytest.raises(Conflict):
        add_batmon(store, user, 7)
    with pytest.raises(ValueError):
        store.update_batmon(7, {"user_id": user})


def test_alarms_are_added_updated_and_deleted(store: Store, batmon: int) -> None:
    add_alarm(store, batmon, 55)
    store.update_alarm(55, {"triggered": True, "trigger_time": T0 + 1, "last_notice": T0 + 1})
    (alarm,) = store.alarms()
    assert (alarm["id"], alarm["batmon_id"], bool(alarm["triggered"]), alarm["trigger_time"]) == (
        55, batmon, True, T0 + 1)  # fmt: skip
    store.delete_alarm(55)
    assert store.alarms() == []
    assert 55 in store.retired_ids()


def test_ids_are_never_reused_after_a_delete(store: Store, batmon: int) -> None:
    add_alarm(store, batmon, 66)
    add_alarm(store, batmon, 67)
    store.delete_alarm(67)
    store.delete_batmon(batmon)
    assert {batmon, 66, 67} <= store.retired_ids()
    user = add_user(store, "next@example.org")
    for used in (batmon, 66, 67):
        with pytest.raises(Conflict):
            add_batmon(store, user, used)
    other = add_batmon(store, user, 303)
    for used in (batmon, 66, 67):
        with pytest.raises(Conflict):
            add_alarm(store, other, used)


def test_deleting_a_batmon_removes_it_and_its_alarms_at_once_and_its_data_in_chunks(
        store: Store, batmon: int) -> None:  # fmt: skip
    other = add_batmon(store, add_user(store, "other@example.org"), 202)
    add_alarm(store, batmon, 66)
    store.write([reading(batmon, T0 + k, float(k)) for k in range(25)]
                + [reading(other, T0 + k, 1.0) for k in range(3)], [])  # fmt: skip
    store.prune_batch(batmon, T0 + 10, 100)  # some of its history is in rollups
    assert store.rollups(batmon)
    store.delete_batmon(batmon)
    assert batmon_row(store, batmon) is None and store.alarms() == []
    assert store.deleted_with_data() == [batmon]
    chunks = 0
    while not store.purge_deleted(batmon, 4):
        chunks += 1
        assert chunks < 100
    assert chunks >= 3  # 15 raw readings, 4 a chunk
    assert store.reading_count(batmon) == 0 and store.rollups(batmon) == []
    assert store.deleted_with_data() == []
    assert store.reading_count(other) == 3  # a neighbour keeps everything


def test_purging_a_batmon_that_is_not_deleted_touches_nothing(store: Store, batmon: int) -> None:
    store.write([reading(batmon, T0, 1.0)], [])
    assert store.purge_deleted(batmon, 10) is True
    assert store.reading_count(batmon) == 1


# -- retention and rollups --------------------------------------------------------------------
def test_retention_folds_old_readings_into_hourly_rollups_batch_by_batch(store: Store, batmon: int) -> None:
    rows = [(batmon, T0 + 60 * k, 10.0 + k, None, None, float(k % 101), None, None, None) for k in range(150)]
    store.write(rows, [])  # 2.5 hours at one a minute
    cutoff = T0 + 2 * HOUR
    assert store.batmons_with_readings_before(cutoff) == [batmon]
    batches = []
    while True:
        batches.append(store.prune_batch(batmon, cutoff, 50))
        if batches[-1] < 50:
            break
    assert sum(batches) == 120 and len(batches) >= 3
    assert store.batmons_with_readings_before(cutoff) == []
    assert [ts for ts, _ in voltages(store, batmon)] == [T0 + 60 * k for k in range(120, 150)]
    hours = store.rollups(batmon)
    assert [h["hour"] for h in hours] == [T0, T0 + HOUR]
    first = hours[0]
    assert (first["count"], first["voltage_min"], first["voltage_max"], first["voltage_count"]) == (
        60, 10.0, 69.0, 60)  # fmt: skip
    assert math.isclose(first["voltage_sum"], sum(10.0 + k for k in range(60)))
    assert (first["current_count"], first["current_min"]) == (0, None)


def test_a_late_reading_for_a_rolled_up_hour_merges_into_it(store: Store, batmon: int) -> None:
    store.write([reading(batmon, T0 + 10, 5.0)], [])
    store.prune_batch(batmon, T0 + HOUR, 100)
    store.write([reading(batmon, T0 + 20, 7.0)], [])
    store.prune_batch(batmon, T0 + HOUR, 100)
    (hour,) = store.rollups(batmon)
    assert (hour["count"], hour["voltage_min"], hour["voltage_max"]) == (2, 5.0, 7.0)
    assert hour["voltage_sum"] == 12.0


# -- energy (docs/BATTERY.md): the writer integrates, the store keeps ----------------------------
DAY = 86_400
D0 = T0 // DAY * DAY + DAY  # a whole day


def energy_buckets(store: Store, batmon_id: int, lo: float, hi: float, bucket: int) -> list[tuple[Any, ...]]:
    """(time, count, kWh charged, kWh discharged) of each bucket, rollups merged in as the API does."""
    found: list[tuple[Any, ...]] = []

    def render(rows: list[tuple[Any, ...]]) -> bytes:
        found.extend((r[0], r[1], round(r[-2], 9), round(r[-1], 9)) for r in rows)
        return b"page"

    async def read() -> None:
        plan = await reader.bucket_plan(batmon_id, lo, hi, bucket)
        if plan is not None:
            first, last, with_rollups = plan
            async for _ in reader.bucket_pages(batmon_id, lo, first, last, bucket, with_rollups, render):
                pass

    reader = store.history_reader(workers=1)
    try:
        asyncio.run(read())
    finally:
        reader.close()
    return found


def test_a_new_batmon_has_zero_energy_and_no_integration_point(store: Store, batmon: int) -> None:
    row = batmon_row(store, batmon)
    assert row is not None
    assert (row["energy_charged_kwh"], row["energy_discharged_kwh"]) == (0.0, 0.0)
    assert (row["energy_point_ts"], row["energy_point_power"]) == (None, None)
    assert (row["device_charged_kwh"], row["device_discharged_kwh"]) == (None, None)


def test_energy_counters_are_kept_with_the_reading_that_moved_them(store: Store, batmon: int) -> None:
    """The counters and the integration point go in the reading's transaction, and another
    handle (another thread, process or worker) reads back exactly what was written."""
    counters = {"energy_charged_kwh": 1.25, "energy_discharged_kwh": 0.5, "energy_point_ts": T0 + 60,
                "energy_point_power": 120.0, "device_charged_kwh": 3010.5, "device_discharged_kwh": 2999.0}
    store.write([reading(batmon, T0 + 60, 12.0, charged_kwh=0.002, discharged_kwh=0.0)],
                [(batmon, {"voltage": 12.0, "last_reading": T0 + 60, **counters})])  # fmt: skip
    with pytest.raises(ValueError):  # a failed group leaves the counters as they were
        store.write([reading(batmon, T0 + 120, 12.0, charged_kwh=0.002)],
                    [(batmon, {"energy_charged_kwh": 9.0, "not_a_column": 1})])  # fmt: skip
    other = store.another()
    try:
        row = batmon_row(other, batmon)
    finally:
        other.close()
    assert row is not None
    assert {k: row[k] for k in counters} == counters
    assert voltages(store, batmon) == [(T0 + 60, 12.0)]


def test_energy_counters_never_go_back_to_an_older_readings_plan(store: Store, batmon: int) -> None:
    """The writer sends the counters with the reading's last_reading; a plan for an older
    reading (another worker's, committed later) must not lower them."""
    store.write([reading(batmon, T0 + 100, 12.0, charged_kwh=0.5)],
                [(batmon, {"last_reading": T0 + 100, "energy_charged_kwh": 2.0,
                           "energy_discharged_kwh": 1.0, "energy_point_ts": T0 + 100})])  # fmt: skip
    other = store.another()
    try:
        other.write([reading(batmon, T0 + 50, 11.0, charged_kwh=0.25)],
                    [(batmon, {"last_reading": T0 + 50, "energy_charged_kwh": 1.5,
                               "energy_discharged_kwh": 0.75, "energy_point_ts": T0 + 50})])  # fmt: skip
    finally:
        other.close()
    row = batmon_row(store, batmon)
    assert row is not None
    assert (row["energy_charged_kwh"], row["energy_discharged_kwh"], row["energy_point_ts"]) == (
        2.0, 1.0, T0 + 100)  # fmt: skip
    assert voltages(store, batmon) == [(T0 + 50, 11.0), (T0 + 100, 12.0)]  # the reading itself is kept


def test_buckets_sum_the_energy_each_reading_added_per_day(store: Store, batmon: int) -> None:
    # Day 1: 0.1 kWh charged by each of 10 readings, 0.05 discharged by 2; day 2: readings
    # that added nothing (None, as before energy was counted, or 0) sum to 0, not to None.
    day1 = [reading(batmon, D0 + 600 * k, 12.0, charged_kwh=0.1, discharged_kwh=0.0) for k in range(10)]
    day1 += [reading(batmon, D0 + 7 * HOUR + k, 12.0, charged_kwh=0.0, discharged_kwh=0.05) for k in range(2)]
    day2 = [reading(batmon, D0 + DAY + 60, 12.0), reading(batmon, D0 + DAY + 120, 12.1, charged_kwh=0.0)]
    store.write(day1 + day2, [])
    days = energy_buckets(store, batmon, D0, D0 + 2 * DAY, DAY)
    assert days == [(D0, 12, 1.0, 0.1), (D0 + DAY, 2, 0.0, 0.0)]
    hours = energy_buckets(store, batmon, D0, D0 + 2 * DAY, HOUR)
    assert hours[:2] == [(D0, 6, 0.6, 0.0), (D0 + HOUR, 4, 0.4, 0.0)]


def test_rolled_up_hours_keep_their_energy_so_days_sum_the_same_after_retention(
    store: Store, batmon: int
) -> None:
    rows = [reading(batmon, D0 + 900 * k, 12.0, charged_kwh=0.25, discharged_kwh=0.125) for k in range(8)]
    store.write(rows, [])  # two hours, a kWh charged and half a kWh discharged
    before = energy_buckets(store, batmon, D0, D0 + DAY, DAY)
    store.prune_batch(batmon, D0 + HOUR, 100)  # the first hour is a rollup now
    store.write([reading(batmon, D0 + 10, 13.0, charged_kwh=0.5)], [])  # late, for the rolled-up hour
    store.prune_batch(batmon, D0 + HOUR, 100)
    (first, *_) = store.rollups(batmon)
    assert (first["charged_kwh_sum"], first["discharged_kwh_sum"]) == (1.5, 0.5)  # with the late one
    assert before == [(D0, 8, 2.0, 1.0)]
    assert energy_buckets(store, batmon, D0, D0 + DAY, DAY) == [(D0, 9, 2.5, 1.0)]


def test_an_alarm_keeps_its_clear_value(store: Store, batmon: int) -> None:
    store.add_alarm({"id": 77, "batmon_id": batmon, "name": "Low", "metric": "soc", "condition": "<",
                     "threshold": 20.0, "clear_value": 30.0, "repeat_delay": 300, "enabled": True,
                     "update_time": T0})  # fmt: skip
    store.update_alarm(77, {"clear_value": 35.0})
    add_alarm(store, batmon, 78)  # none given: none kept
    assert {a["id"]: a["clear_value"] for a in store.alarms()} == {77: 35.0, 78: None}


def test_an_energy_update_planned_from_a_stale_state_changes_nothing_and_says_the_state(
        store: Store, batmon: int) -> None:  # fmt: skip
    """Several workers (docs/BATTERY.md): an update that says which last_reading it was planned
    from holds only while the row still has it; otherwise the whole write (rows too) is
    refused with StaleState carrying the row's state, so the writer plans again from it."""
    other = store.another()
    try:
        first = {"last_reading": T0 + 10, "energy_charged_kwh": 0.5, "energy_point_ts": T0 + 10,
                 "energy_point_power": 100.0, PLANNED_FROM: None}  # fmt: skip
        store.write([reading(batmon, T0 + 10, 13.0, charged_kwh=0.5)], [(batmon, first)])
        # Another handle planned from before that reading: refused, nothing written.
        stale = {"last_reading": T0 + 20, "energy_charged_kwh": 0.25, "energy_point_ts": T0 + 20,
                 "energy_point_power": 100.0, PLANNED_FROM: None}  # fmt: skip
        with pytest.raises(StaleState) as refused:
            other.write([reading(batmon, T0 + 20, 13.1, charged_kwh=0.25)], [(batmon, stale)])
        state = refused.value.states[batmon]
        assert {k: state[k] for k in ("last_reading", "energy_charged_kwh", "energy_point_ts",
                                      "energy_point_power", "device_charged_kwh")} == {
            "last_reading": T0 + 10, "energy_charged_kwh": 0.5, "energy_point_ts": T0 + 10,
            "energy_point_power": 100.0, "device_charged_kwh": None}  # fmt: skip
        assert [r["ts"] for r in store.history(batmon, T0, T0 + 60)] == [T0 + 10]
        # Planned again from that state: it holds.
        again = {**stale, "energy_charged_kwh": 0.75, PLANNED_FROM: T0 + 10}
        other.write([reading(batmon, T0 + 20, 13.1, charged_kwh=0.25)], [(batmon, again)])
        row = batmon_row(store, batmon)
        assert (row["last_reading"], row["energy_charged_kwh"]) == (T0 + 20, 0.75)  # type: ignore[index]
        # An update without PLANNED_FROM is as before (an older reading's plan is guarded as ever).
        store.write([], [(batmon, {"last_reading": T0 + 30, "energy_charged_kwh": 0.8})])
        assert batmon_row(store, batmon)["energy_charged_kwh"] == 0.8  # type: ignore[index]
    finally:
        other.close()


def test_a_shared_store_plans_an_overtaken_write_again_under_the_rows_locks(
        store: Store, batmon: int) -> None:  # fmt: skip
    """With ``replan`` a store several workers share locks the rows, sees the plan was
    overtaken and asks for it again from the rows' state: one write, no StaleState (a worker
    that lost the race used to fail its group, drop its MQTT connection and wait for the
    broker's redelivery: 2 workers ran at 0.24x one in the scale-ingest row)."""
    first = {"last_reading": T0 + 10, "energy_charged_kwh": 0.5, "energy_point_ts": T0 + 10,
             "energy_point_power": 100.0, PLANNED_FROM: None}  # fmt: skip
    store.write([reading(batmon, T0 + 10, 13.0, charged_kwh=0.5)], [(batmon, first)])
    asked: list[dict[int, Any]] = []

    def replan(states: dict[int, dict[str, Any]]) -> tuple[list[ReadingRow], list[Any]]:
        asked.append(states)
        state = states[batmon]
        again = {"last_reading": T0 + 20, "energy_charged_kwh": state["energy_charged_kwh"] + 0.25,
                 "energy_point_ts": T0 + 20, "energy_point_power": 100.0, PLANNED_FROM: state["last_reading"]}
        return [reading(batmon, T0 + 20, 13.1, charged_kwh=0.25)], [(batmon, again)]

    stale = {"last_reading": T0 + 20, "energy_charged_kwh": 0.25, "energy_point_ts": T0 + 20,
             "energy_point_power": 100.0, PLANNED_FROM: None}  # fmt: skip
    other = store.another()
    try:
        if store.shared() is None:  # one process: a stale plan is refused as before
            with pytest.raises(StaleState):
                other.write([reading(batmon, T0 + 20, 13.1, charged_kwh=0.25)], [(batmon, stale)],
                            replan=replan)  # fmt: skip
            assert asked == []
            return
        other.write([reading(batmon, T0 + 20, 13.1, charged_kwh=0.25)], [(batmon, stale)], replan=replan)
    finally:
        other.close()
    assert [s[batmon]["last_reading"] for s in asked] == [T0 + 10]
    row = batmon_row(store, batmon)
    assert (row["last_reading"], row["energy_charged_kwh"]) == (T0 + 20, 0.75)  # type: ignore[index]
    assert [r["ts"] for r in store.history(batmon, T0, T0 + 60)] == [T0 + 10, T0 + 20]


def add_bank_alarm(store: Store, bank_id: int, alarm_id: int) -> int:
    store.add_alarm({"id": alarm_id, "bank_id": bank_id, "name": "Bank low", "metric": "soc",
                     "condition": "<", "threshold": 30.0, "clear_value": 35.0, "repeat_delay": 300,
                     "enabled": True, "update_time": T0})  # fmt: skip
    return alarm_id


def test_an_alarm_may_be_on_a_bank_and_goes_with_it(store: Store, batmon: int) -> None:
    """Bank alarms (docs/BANKS.md): kept with their state like a batmon's, removed and
    retired with their bank, and left alone when a member batmon is deleted."""
    user = batmon_row(store, batmon)["user_id"]  # type: ignore[index]
    store.add_bank(500, user, "House", T0, [batmon])
    store.add_bank(501, user, "Shed", T0 + 1, [batmon])
    add_bank_alarm(store, 500, 91)
    add_bank_alarm(store, 501, 92)
    add_alarm(store, batmon, 93)
    store.update_alarm(91, {"triggered": True, "trigger_time": T0 + 1, "last_notice": T0 + 1, "akn": T0 + 2})
    by_id = {a["id"]: a for a in store.alarms()}
    assert (by_id[91]["bank_id"], by_id[91]["batmon_id"], bool(by_id[91]["triggered"]), by_id[91]["akn"],
            by_id[91]["clear_value"]) == (500, None, True, T0 + 2, 35.0)  # fmt: skip
    assert (by_id[93]["bank_id"], by_id[93]["batmon_id"]) == (None, batmon)
    store.delete_bank(500)
    assert {a["id"] for a in store.alarms()} == {92, 93}
    assert {500, 91} <= store.retired_ids()
    with pytest.raises(Conflict):
        add_bank_alarm(store, 501, 91)
    store.delete_batmon(batmon)  # the bank keeps its alarm, members or not
    assert {a["id"] for a in store.alarms()} == {92}


# -- the notice outbox --------------------------------------------------------------------------
def notice(batmon_id: int, channel: str, created: float, state: str = "queued") -> dict[str, Any]:
    return {"user_id": 1, "batmon_id": batmon_id, "channel": channel, "kind": "triggered",
            "title": "t", "body": "b", "state": state, "created": created}  # fmt: skip


def test_outbox_gives_due_notices_oldest_first_and_a_claim_once(store: Store) -> None:
    outbox = store.outbox
    first, second, skipped = outbox.enqueue([notice(1, "email", T0 + 2), notice(1, "sms", T0 + 1),
                                             notice(1, "whatsapp", T0, "skipped")])  # fmt: skip
    assert len({first, second, skipped}) == 3
    assert [n["id"] for n in outbox.due(T0 + 5, 10)] == [second, first]
    assert outbox.due(T0 + 1.5, 10)[0]["id"] == second and len(outbox.due(T0 + 1.5, 10)) == 1
    assert outbox.next_due_at() == T0 + 1
    assert outbox.claim(second, "w1", T0 + 5, T0 + 35) == Claim(second, "w1", 1)
    assert outbox.claim(second, "w2", T0 + 5, T0 + 35) is None  # one claim wins
    assert outbox.claim(skipped, "w1", T0 + 5, T0 + 35) is None
    assert [n["id"] for n in outbox.due(T0 + 5, 10)] == [first]
    assert outbox.count_by_state() == {"queued": 1, "sending": 1, "skipped": 1}
    assert outbox.pending_by_channel() == {("queued", "email"): 1, ("sending", "sms"): 1}


def test_outbox_records_every_attempt_and_retries_when_due(store: Store) -> None:
    outbox = store.outbox
    (notice_id,) = outbox.enqueue([notice(1, "email", T0)])
    claim = outbox.claim(notice_id, "w1", T0, T0 + 30)
    assert claim is not None and outbox.renew([claim], T0 + 40) == 1
    assert outbox.mark_retry(claim, T0 + 1, T0 + 31, "Connection error", "json://****") is True
    assert outbox.due(T0 + 30, 10) == [] and outbox.next_due_at() == T0 + 31
    claim = outbox.claim(notice_id, "w1", T0 + 31, T0 + 61)
    assert claim is not None and claim.attempt == 2
    assert outbox.mark_sent(claim, T0 + 32, "json://****") is True
    (row,) = outbox.latest_for_batmon(1, 5)
    assert (row["state"], row["attempts"], row["sent_at"], row["target"]) == ("sent", 2, T0 + 32, "json://****")
    assert [a["outcome"] for a in outbox.attempts(notice_id)] == ["error", "sent"]
    assert outbox.next_due_at() is None


def test_outbox_applies_an_outcome_only_while_its_claim_holds_and_tells_a_second_delivery(
    store: Store,
) -> None:
    outbox = store.outbox
    (notice_id,) = outbox.enqueue([notice(1, "email", T0)])
    stale = outbox.claim(notice_id, "w1", T0, T0 + 30)
    assert stale is not None and outbox.mark_retry(stale, T0 + 1, T0 + 2, "timeout") is True
    current = outbox.claim(notice_id, "w1", T0 + 2, T0 + 32)
    assert current is not None
    assert outbox.mark_retry(stale, T0 + 3, T0 + 4, "late") is False  # the first attempt's, again
    assert outbox.mark_failed(stale, T0 + 3, "late") is False
    assert outbox.renew([stale], T0 + 50) == 0 and outbox.renew([stale, current], T0 + 50) == 1
    assert outbox.count_by_state() == {"sending": 1}  # untouched by the stale claim
    assert outbox.mark_sent(stale, T0 + 5, "json://a") is True  # a delivery is a fact, held or not
    assert outbox.mark_sent(current, T0 + 6, "json://b") is False  # delivered already: a duplicate
    assert outbox.mark_retry(current, T0 + 7, T0 + 8, "x") is False
    (row,) = outbox.latest_for_batmon(1, 1)
    assert (row["state"], row["sent_at"], row["target"]) == ("sent", T0 + 5, "json://a")
    assert [a["outcome"] for a in outbox.attempts(notice_id)] == ["error", "error", "error", "sent",
                                                                  "sent", "error"]  # fmt: skip


def test_outbox_requeues_interrupted_sends_only_where_one_process_has_it_and_prunes_finished(
    store: Store, request: pytest.FixtureRequest
) -> None:
    outbox = store.outbox
    sending, failed, queued = outbox.enqueue([notice(1, c, T0) for c in CHANNELS])
    claim = outbox.claim(failed, "w1", T0, T0 + 30)
    assert outbox.claim(sending, "w1", T0, T0 + 30) and claim
    assert outbox.mark_failed(claim, T0 + 1, "gave up") is True
    if request.node.callspec.params["store"] in SHARED:  # live workers' sends: left to their lease
        assert outbox.requeue_interrupted() == 0
        assert outbox.count_by_state() == {"queued": 1, "sending": 1, "failed": 1}
        assert [n["id"] for n in outbox.due(T0 + 29, 10)] == [queued]
        assert sorted(n["id"] for n in outbox.due(T0 + 30, 10)) == sorted([sending, queued])  # lease out
    else:
        assert outbox.requeue_interrupted() == 1  # a process stopped mid-send
        assert outbox.count_by_state() == {"queued": 2, "failed": 1}
        assert sorted(n["id"] for n in outbox.due(T0 + 10, 10)) == sorted([sending, queued])
    assert outbox.prune(T0 + 10) == 1


def test_outbox_shows_a_batmons_latest_notices_newest_first(store: Store) -> None:
    ids = store.outbox.enqueue([notice(5, "email", T0 + k) for k in range(4)] + [notice(6, "email", T0)])
    assert [n["id"] for n in store.outbox.latest_for_batmon(5, 3)] == ids[3:0:-1]
