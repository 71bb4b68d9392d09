"""`batmon db copy --to postgresql://...`: an SQLite installation moved into an empty
PostgreSQL database, for the move to several workers (docs/SCALE-OUT.md, "How to move").

What moves: every row of every table both schemas share (users with their key hashes,
MQTT tokens, batmons with their current values and energy state, alarms and their state,
retired ids, deleted batmons still being purged, banks and their members, hourly rollups,
the notice outbox and its attempts) with their ids, then the readings. The readings go
through the PostgreSQL store's own write path (COPY into a staging table, then one INSERT
per batch: bridge/store/pg_store.py), so their partitions, value digests and arrival order
are made exactly as a worker makes them. Afterwards the row count of every table is
compared on both sides; any difference is an error.

Refused: a target that holds any batmon data (the copy never merges), and a source column
the target has no place for. The caller holds the data folder's lock (bridge/data_lock.py),
so no `serve` writes the file meanwhile. The URL is never printed (``describe_url``).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from bridge.store.db import SqliteStore
from bridge.store.pg_store import PostgresStore, describe_url, one_line

# Parents before children (the target's foreign keys hold at every row).
TABLES = ("users", "user_tokens", "batmons", "alarms", "retired_ids", "deleted_batmons", "banks",
          "bank_members", "rollups", "outbox", "outbox_attempts")  # fmt: skip
READINGS = "readings"
# Columns the target computes itself: its readings' digest and arrival sequence.
IDENTITY_TABLES = ("users", "user_tokens", "outbox", "outbox_attempts")
READING_COLUMNS = ("batmon_id, ts, voltage, current, power, soc, details, charged_kwh, discharged_kwh")
BATCH_ROWS = 20_000
"""Readings per transaction on the target: large enough that the per-batch cost (partition
checks, a commit) vanishes, small enough that memory stays flat."""


class CopyError(RuntimeError):
    """The copy cannot be made, or did not come out whole: one line for the user."""


@dataclass
class CopyReport:
    """What was copied and how long it took."""

    target: str
    """user@host:port/db (no password)."""
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    readings_seconds: float = 0.0


def copy_to_postgres(database: Path, url: str, batch_rows: int = BATCH_ROWS,
                     progress: Callable[[str], None] | None = None) -> CopyReport:  # fmt: skip
    """Copy the SQLite file ``database`` into the empty PostgreSQL database at ``url``.

    Raises CopyError (nothing written) when the target holds data or the schemas differ, and
    CopyError after a copy whose counts do not match; StorageFailed when either database fails.
    """
    say = progress or (lambda line: None)
    report = CopyReport(target=describe_url(url))
    started = time.monotonic()
    if not database.is_file():
        raise CopyError(f"no database at {database}: give the data folder serve uses (--data-dir)")
    source = SqliteStore.open(database)  # brought to the latest schema first, as serve would
    try:
        target = PostgresStore.open(url)  # made and migrated if new
        try:
            report.counts = _copy(source._conn, target, url, batch_rows, say, report)
        finally:
            target.close()
    finally:
        source.close()
    report.seconds = time.monotonic() - started
    return report


def _copy(source: sqlite3.Connection, target: PostgresStore, url: str, batch_rows: int,
          say: Callable[[str], None], report: CopyReport) -> dict[str, int]:  # fmt: skip
    conn = target._conn
    try:
        _refuse_non_empty(conn, report.target)
        columns = {table: _shared_columns(source, conn, table) for table in TABLES}
        counts = {table: _count(source, table) for table in (*TABLES, READINGS)}
        with conn.transaction():  # all or nothing for everything but the readings
            for table in TABLES:
                _copy_table(source, conn, table, columns[table])
            for table in IDENTITY_TABLES:  # new rows continue after the copied ids
                conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id)"
                             f" FROM {table})) WHERE EXISTS (SELECT 1 FROM {table})")  # fmt: skip
        say(f"copied {sum(counts[t] for t in TABLES):,} rows of {len(TABLES)} tables; now"
            f" {counts[READINGS]:,} readings")  # fmt: skip
    except psycopg.Error as exc:
        raise CopyError(f"cannot copy into {report.target}: {one_line(exc, url)}") from None
    began = time.monotonic()
    _copy_readings(source, target, batch_rows, counts[READINGS], say)
    report.readings_seconds = time.monotonic() - began
    try:
        _check_counts(conn, counts)
    except psycopg.Error as exc:
        raise CopyError(f"cannot count what was copied: {one_line(exc, url)}") from None
    return counts


def _refuse_non_empty(conn: psycopg.Connection[Any], where: str) -> None:
    holding = [table for table in (*TABLES, READINGS)
               if conn.execute(f"SELECT EXISTS (SELECT 1 FROM {table})").fetchone()[0]]  # type: ignore[index]  # fmt: skip
    if holding:
        raise CopyError(f"the target database {where} is not empty (it has rows in {', '.join(holding)}):"
                        " batmon db copy only fills an empty database; create a new one"
                        " (createdb) and give its URL")  # fmt: skip


def _shared_columns(source: sqlite3.Connection, conn: psycopg.Connection[Any], table: str) -> list[str]:
    """The source table's columns, each of which the target must have."""
    mine = [row[1] for row in source.execute(f"PRAGMA table_info({table})")]
    theirs = {row[0] for row in conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema()"
        " AND table_name = %s", (table,))}  # fmt: skip
    missing = [column for column in mine if column not in theirs]
    if missing:
        raise CopyError(f"the target has no column {table}.{missing[0]}: its schema is older than this"
                        " file's; run this release's `batmon serve --database-url` against it once,"
                        " or use a new database")  # fmt: skip
    return mine


def _count(source: sqlite3.Connection, table: str) -> int:
    return int(source.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def _copy_table(source: sqlite3.Connection, conn: psycopg.Connection[Any], table: str,
                columns: list[str]) -> None:  # fmt: skip
    names = ", ".join(columns)
    rows = source.execute(f"SELECT {names} FROM {table}")
    with conn.cursor() as cur, cur.copy(f"COPY {table} ({names}) FROM STDIN".encode()) as copy:
        while batch := rows.fetchmany(5_000):
            for row in batch:
                copy.write_row(row)


def _copy_readings(source: sqlite3.Connection, target: PostgresStore, batch_rows: int, total: int,
                   say: Callable[[str], None]) -> None:  # fmt: skip
    """In key order (batmon, ts, arrival), so the target's arrival sequence keeps the order
    of readings that share a ts; each batch is one transaction of the store's write path."""
    rows = source.execute(f"SELECT {READING_COLUMNS} FROM readings ORDER BY batmon_id, ts, seq")
    done, shown = 0, time.monotonic()
    while batch := rows.fetchmany(batch_rows):
        target.write(batch, [])
        done += len(batch)
        if time.monotonic() - shown > 10:
            say(f"  {done:,} of {total:,} readings")
            shown = time.monotonic()


def _check_counts(conn: psycopg.Connection[Any], counts: dict[str, int]) -> None:
    differ = []
    for table, expected in counts.items():
        got = int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # type: ignore[index]
        if got != expected:
            differ.append(f"{table} {expected:,} in SQLite, {got:,} in PostgreSQL")
    if differ:
        raise CopyError("the copy is not whole: " + "; ".join(differ) + ". Nothing was deleted from the"
                        " SQLite file; drop the target database and copy again")  # fmt: skip
