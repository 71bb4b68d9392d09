"""Retention in SQL: fold old readings into hourly rollups and delete them, batch by batch.

The pruner (bridge/extensions/retention_pruner.py) runs this through a store handle of
its own (``SqliteStore.prune_batch``), off the event loop. SQLite has one writer
at a time, so each batch is one short transaction (a few thousand rows): the
ingest writer waits at most that long (busy_timeout on both sides). A batch folds
its rows into ``rollups`` and deletes them in the same transaction, so a crash
never loses a reading's aggregate nor counts it twice; rollups are mergeable
(min, max, sum, count), so late readings for an hour already rolled up merge in.
"""

from __future__ import annotations

import sqlite3

from bridge.store.history import METRICS

HOUR = 3600

_PARTS = ", ".join(f"min({m}), max({m}), total({m}), count({m})" for m in METRICS)
_COLUMNS = ", ".join(f"{m}_min, {m}_max, {m}_sum, {m}_count" for m in METRICS)


def _merge(metric: str) -> str:
    # Scalar min()/max() return NULL when either side is NULL: coalesce both ways.
    return (
        f"{metric}_min = min(coalesce({metric}_min, excluded.{metric}_min),"
        f" coalesce(excluded.{metric}_min, {metric}_min)),"
        f" {metric}_max = max(coalesce({metric}_max, excluded.{metric}_max),"
        f" coalesce(excluded.{metric}_max, {metric}_max)),"
        f" {metric}_sum = {metric}_sum + excluded.{metric}_sum,"
        f" {metric}_count = {metric}_count + excluded.{metric}_count"
    )


_FOLD = (
    f"INSERT INTO rollups (batmon_id, hour, count, {_COLUMNS})"
    f" SELECT batmon_id, CAST(ts AS INTEGER) / {HOUR} * {HOUR} AS h, count(*), {_PARTS}"
    " FROM readings WHERE batmon_id = :batmon AND {where} GROUP BY h"
    " ON CONFLICT (batmon_id, hour) DO UPDATE SET count = count + excluded.count, "
    + ", ".join(_merge(m) for m in METRICS)
)  # fmt: skip
_UP_TO_CUTOFF = "ts < :cutoff"
_UP_TO_ROW = "(ts, seq) <= (:ts, :seq)"


def batmons_with_readings_before(conn: sqlite3.Connection, cutoff: float) -> list[int]:
    """Ids of batmons that have readings older than ``cutoff`` (one seek per batmon)."""
    found: list[int] = []
    after = -1
    while True:
        row = conn.execute(
            "SELECT batmon_id FROM readings WHERE batmon_id > ? ORDER BY batmon_id LIMIT 1", (after,)
        ).fetchone()
        if row is None:
            return found
        after = row[0]
        if conn.execute("SELECT 1 FROM readings WHERE batmon_id = ? AND ts < ? LIMIT 1",
                        (after, cutoff)).fetchone():  # fmt: skip
            found.append(after)


def prune_batch(conn: sqlite3.Connection, batmon_id: int, cutoff: float, batch_rows: int) -> int:
    """Fold and delete the oldest readings (at most batch_rows) older than ``cutoff``, in the
    caller's transaction. Returns how many; fewer than batch_rows means the batmon is done."""
    last = conn.execute(
        "SELECT ts, seq FROM readings WHERE batmon_id = ? AND ts < ? ORDER BY ts, seq LIMIT 1 OFFSET ?",
        (batmon_id, cutoff, batch_rows - 1),
    ).fetchone()
    params: dict[str, float | int] = {"batmon": batmon_id, "cutoff": cutoff}
    where = _UP_TO_CUTOFF
    if last is not None:
        params.update(ts=last[0], seq=last[1])
        where = _UP_TO_ROW
    conn.execute(_FOLD.format(where=where), params)
    return int(conn.execute(f"DELETE FROM readings WHERE batmon_id = :batmon AND {where}", params).rowcount)
