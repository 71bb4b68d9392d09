"""Retention: old raw readings become hourly rollups, charts survive, ingest goes on.

Real SQLite files, the real app over HTTP, and the pruner on its own connection and
thread, as `batmon serve --retention-days N` runs it.
"""

from __future__ import annotations

import math
import random
import sqlite3
import threading
from pathlib import Path
from typing import Any

from bridge.extensions.retention_pruner import DAY, RetentionPruner
from bridge.store.history import database_file
from tests.conftest import Api, ServeProcess
from tests.support import batmon, wait_until
from tests.test_history_buckets import assert_same_buckets
from tests.test_history_stream import HISTORY, T0, insert

NOW = T0 + 10 * DAY


def history(api: Api, batmon_id: int, **params: Any) -> dict[str, Any]:
    r = api.client.get(HISTORY, headers=api.auth, params={
        "batmon_id": batmon_id, "min_epoch_tm_sec": T0, "max_epoch_tm_sec": NOW, **params})  # fmt: skip
    assert r.status_code == 200, r.text
    [entry] = r.json()["success"]
    return entry


def ten_days(batmon_id: int, step: float, seed: int) -> list[tuple[Any, ...]]:
    rnd = random.Random(seed)

    def value(scale: float) -> float | None:
        return None if rnd.random() < 0.1 else round(rnd.uniform(-scale, scale), 2)

    return [(batmon_id, T0 + i * step, value(15), value(5), value(60), value(100), None)
            for i in range(int(10 * DAY / step))]  # fmt: skip


def old_rows(api: Api, cutoff: float) -> int:
    conn = sqlite3.connect(database_file(api.core.store.db.conn))
    try:
        return int(conn.execute("SELECT count(*) FROM readings WHERE ts < ?", (cutoff,)).fetchone()[0])
    finally:
        conn.close()


def test_hourly_and_longer_buckets_are_the_same_after_pruning(api: Api) -> None:
    first, _ = api.add_batmon()
    second, _ = api.add_batmon()
    insert(api, ten_days(first, 37.0, 1) + ten_days(second, 101.5, 2))
    pruner = RetentionPruner(api.core.store, 3, batch_rows=700,
                             clock=lambda: NOW)  # fmt: skip
    cutoff = pruner.cutoff()
    assert cutoff == (NOW - 3 * DAY) // 3600 * 3600
    shapes = ({"bucket": 3600}, {"bucket": 6 * 3600}, {"bucket": DAY})
    before = {(b, tuple(s.items())): history(api, b, **s) for b in (first, second) for s in shapes}
    recent_raw = history(api, first, min_epoch_tm_sec=cutoff)["data"]
    uneven = history(api, first, points=20)  # 43,201 s buckets: hours do not tile them

    assert pruner.prune_pass() > 0
    assert old_rows(api, cutoff) == 0
    for (batmon_id, shape), entry in before.items():
        after = history(api, batmon_id, **dict(shape))
        assert (after["min_time"], after["max_time"]) == (entry["min_time"], entry["max_time"])
        assert_same_buckets(after["data"], entry["data"])
    # Where hours do not tile the buckets, a pruned hour lands whole in the bucket of its
    # start: the counts move, their total does not.
    after_uneven = history(api, first, points=20)
    assert after_uneven["bucket"] == uneven["bucket"]
    assert sum(b["count"] for b in after_uneven["data"]) == sum(b["count"] for b in uneven["data"])
    # Raw history keeps only what was not pruned; below an hour, pruned ranges are empty.
    assert history(api, first)["data"] == recent_raw
    assert history(api, first, bucket=60)["min_time"] >= cutoff


def test_a_late_reading_for_a_pruned_hour_merges_into_its_rollup(api: Api) -> None:
    batmon_id, _ = api.add_batmon()
    insert(api, [(batmon_id, T0 + 10.0, 12.0, None, None, None, None),
                 (batmon_id, T0 + 20.0, 14.0, None, None, None, None)])  # fmt: skip
    pruner = RetentionPruner(api.core.store, 3, clock=lambda: NOW)
    pruner.prune_pass()
    insert(api, [(batmon_id, T0 + 30.0, 10.0, 1.0, None, None, None)])  # arrives after pruning
    pruner.prune_pass()
    [hour] = history(api, batmon_id, bucket=3600)["data"]
    assert hour["count"] == 3
    assert (hour["batmon_voltage_min"], hour["batmon_voltage_max"]) == (10.0, 14.0)
    assert math.isclose(hour["batmon_voltage_avg"], 12.0)
    assert hour["batmon_current_min"] == hour["batmon_current_avg"] == hour["batmon_current_max"] == 1.0
    assert hour["batmon_power_min"] is None and hour["batmon_power_avg"] is None


def test_http_updates_keep_succeeding_while_a_big_prune_runs(api: Api) -> None:
    old, _ = api.add_batmon()
    live, token = api.add_batmon()
    conn = api.core.store.db.conn
    with conn:  # 240,000 old readings, inserted in one transaction
        conn.executemany(
            "INSERT INTO readings (batmon_id, ts, voltage, current, power, soc, details)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            ((old, T0 + i * 0.5, 12.0, 1.0, 12.0, 50.0, None) for i in range(100_000)),
        )
    pruner = RetentionPruner(api.core.store, 3, batch_rows=1000, clock=lambda: NOW)
    worker = threading.Thread(target=pruner.prune_pass)
    worker.start()
    during = 0
    try:
        while worker.is_alive():
            r = api.client.post("/interface/update/batmon", json={
                "batmon_id": live, "batmon_token": token, "voltage": 12.0 + during / 1000})  # fmt: skip
            assert r.status_code == 200, r.text
            during += 1
    finally:
        worker.join()
    assert pruner.pruned == 100_000 and pruner.batches >= 100
    # Premise: the updates really ran while pruning was under way, batch after batch.
    assert during >= 20, f"only {during} updates overlapped the prune"
    assert api.core.store.reading_count(live) == during
    assert old_rows(api, pruner.cutoff()) == 0
    days = history(api, old, bucket=DAY, min_epoch_tm_sec=T0, max_epoch_tm_sec=T0 + DAY - 1)["data"]
    assert sum(day["count"] for day in days) == 100_000


def test_serve_with_retention_days_prunes_old_readings(serve: ServeProcess) -> None:
    from bridge.store.db import Store

    store = Store.open(serve.data_dir / "batmon.sqlite3")
    with store.db.conn:
        store.db.conn.executemany(
            "INSERT INTO readings (batmon_id, ts, voltage) VALUES (?, ?, ?)",
            [(42, T0 + i, 1.0) for i in range(100)] + [(42, 4_000_000_000.0, 2.0)],
        )
    store.close()
    serve.env = {"BATMON_RETENTION_DAYS": "30"}
    serve.start()
    path = serve.data_dir / "batmon.sqlite3"

    def remaining() -> list[float]:
        conn = sqlite3.connect(path)
        try:
            return [ts for (ts,) in conn.execute("SELECT ts FROM readings WHERE batmon_id = 42")]
        finally:
            conn.close()

    wait_until(lambda: remaining() == [4_000_000_000.0], timeout=20, what="old readings pruned")
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT sum(count) FROM rollups WHERE batmon_id = 42").fetchone()[0] == 100
    conn.close()


def test_bad_retention_days_is_one_line_and_exit_2(tmp_path: Path) -> None:
    for value in ("0", "x", "-3"):
        done = batmon("serve", "--data-dir", str(tmp_path), "--retention-days", value)
        assert done.returncode == 2 and "--retention-days" in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
