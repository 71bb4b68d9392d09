"""Raw history: streamed in pages from read-only connections, same envelope as the seed.

Rows go into the real SQLite file with the writer's own INSERT; answers come over the
real app. Pages are made tiny here so every answer crosses many page boundaries.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlite_utils import Database

from bridge.store.db import Store
from bridge.store.schema import MIGRATIONS, migrate
from tests.conftest import Api

HISTORY = "/interface/batmon/history"
INSERT = ("INSERT INTO readings (batmon_id, ts, voltage, current, power, soc, details)"
          " VALUES (?, ?, ?, ?, ?, ?, ?)")  # fmt: skip
T0 = 1_700_000_000


def insert(api: Api, rows: list[tuple[Any, ...]]) -> None:
    """Rows (batmon_id, ts, voltage, current, power, soc, details), as the writer stores them."""
    conn = api.core.store.db.conn
    with conn:
        conn.executemany(INSERT, rows)


def expected_data(rows: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    from datetime import UTC, datetime

    return [
        {"batmon_voltage": v, "batmon_current": c, "batmon_power": p, "batmon_soc": s,
         "batmon_details": d,
         "update_time": datetime.fromtimestamp(int(ts), UTC).strftime("%Y-%m-%dT%H:%M:%S")}
        for _, ts, v, c, p, s, d in rows
    ]  # fmt: skip


@pytest.fixture
def small_pages(api: Api) -> Api:
    api.core.history_reader.page_rows = 7
    return api


def test_history_crosses_many_pages_in_time_then_arrival_order(small_pages: Api) -> None:
    api = small_pages
    batmon_id, _ = api.add_batmon()
    rows = [(batmon_id, T0 + i // 3 + 0.5, 12.0 + i / 100, -1.5, None, 50.0, None) for i in range(100)]
    # 20 readings sharing one ts straddle several pages: arrival order must survive.
    rows += [(batmon_id, T0 + 200.0, float(i), None, None, None, f'{{"n": {i}}}') for i in range(20)]
    insert(api, rows)
    r = api.client.get(HISTORY, headers=api.auth,
                       params={"min_epoch_tm_sec": T0, "max_epoch_tm_sec": T0 + 300})  # fmt: skip
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    [entry] = r.json()["success"]
    assert list(entry) == ["batmon_id", "batmon_name", "batmon_type", "min_time", "max_time", "data"]
    assert entry["batmon_id"] == batmon_id and entry["batmon_type"] == "BMV"
    assert entry["min_time"] == T0 and entry["max_time"] == T0 + 200
    assert entry["data"] == expected_data(rows)


def test_history_range_is_inclusive_at_whole_seconds(small_pages: Api) -> None:
    api = small_pages
    batmon_id, _ = api.add_batmon()
    rows = [(batmon_id, T0 + i + 0.9, float(i), None, None, None, None) for i in range(30)]
    insert(api, rows)
    [entry] = api.client.get(HISTORY, headers=api.auth, params={
        "batmon_id": batmon_id, "min_epoch_tm_sec": T0 + 5, "max_epoch_tm_sec": T0 + 20,
    }).json()["success"]  # fmt: skip
    assert [row["batmon_voltage"] for row in entry["data"]] == [float(i) for i in range(5, 21)]
    assert (entry["min_time"], entry["max_time"]) == (T0 + 5, T0 + 20)


def test_history_of_every_batmon_streams_one_envelope_each_empty_ones_null(small_pages: Api) -> None:
    api = small_pages
    full, _ = api.add_batmon(batmon_name="Full")
    empty, _ = api.add_batmon(batmon_name="Empty \u00e9")
    rows = [(full, T0 + i, 1.0 * i, None, None, None, None) for i in range(15)]
    insert(api, rows)
    r = api.client.get(HISTORY, headers=api.auth, params={"min_epoch_tm_sec": T0})
    entries = {e["batmon_name"]: e for e in r.json()["success"]}
    assert entries["Full"]["data"] == expected_data(rows)
    assert entries["Empty \u00e9"] == {"batmon_id": empty, "batmon_name": "Empty \u00e9",
                                       "batmon_type": "BMV", "min_time": None, "max_time": None,
                                       "data": []}  # fmt: skip
    orjson.loads(r.content)  # one valid JSON document, whatever the page boundaries


def test_same_ts_readings_keep_arrival_order_through_the_writers_insert(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "batmon.sqlite3")
    conn = store.db.conn
    for i in range(6):
        with conn:  # one reading per transaction, then a batch, as both doors do
            conn.execute(INSERT, (1, 100.0, float(i), None, None, None, None))
    with conn:
        conn.executemany(INSERT, [(1, 100.0, float(i), None, None, None, None) for i in range(6, 12)])
    voltages = [v for (v,) in conn.execute("SELECT voltage FROM readings ORDER BY batmon_id, ts, seq")]
    assert voltages == [float(i) for i in range(12)]
    store.close()


def test_migration_keeps_old_rows_and_their_order(tmp_path: Path) -> None:
    path = tmp_path / "batmon.sqlite3"
    db = Database(sqlite3.connect(path))
    db.conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for version, statements in enumerate(MIGRATIONS[:2], start=1):
        for statement in statements:
            db.conn.execute(statement)
        db.conn.execute("INSERT INTO schema_version VALUES (?)", (version,))
    old = [(7, 5.0, 1.0), (7, 3.0, 2.0), (7, 5.0, 3.0), (8, 5.0, 4.0), (7, 5.0, 5.0)]
    db.conn.executemany("INSERT INTO readings (batmon_id, ts, voltage) VALUES (?, ?, ?)", old)
    db.conn.commit()
    assert migrate(db) == len(MIGRATIONS)
    db.conn.execute(INSERT, (7, 5.0, 6.0, None, None, None, None))  # a new tie comes last
    rows = db.conn.execute("SELECT batmon_id, ts, voltage FROM readings ORDER BY batmon_id, ts, seq")
    assert [r[2] for r in rows] == [2.0, 1.0, 3.0, 5.0, 6.0, 4.0]
    db.close()
