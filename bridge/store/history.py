"""History reads: read-only SQLite connections in a small thread pool, pages in index order.

Nothing here runs SQLite on the event loop. Each worker thread has its own
``mode=ro`` connection; a page is one short query (keyset on ``(ts, seq)`` for raw
rows, a range of whole buckets for aggregates), so no read transaction stays open
while a slow client downloads, and the WAL can always be checkpointed. A page is
rendered to bytes in the worker too (the ``render`` callable), which keeps the
event loop free of per-row work.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bridge.store.interface import METRICS, Render, Row

__all__ = ["METRICS", "HistoryReader", "Render", "Row"]
# A raw row: ts, voltage, current, power, soc, details, seq (seq only for paging).
RAW_COLUMNS = ("ts", *METRICS, "details")
# A bucket row: time, count, then min/avg/max of each metric.
BUCKET_COLUMNS = ("time", "count", *(f"{m}_{a}" for m in METRICS for a in ("min", "avg", "max")))
ROLLUP_SECONDS = 3600  # rollups are hourly; only buckets this large or larger use them


def rollup_floor(lo: float) -> float:
    """The lowest rollup hour that overlaps a range starting at ``lo``: a pruned hour
    counts whole in any range it overlaps."""
    return lo - (ROLLUP_SECONDS - 1)

_RAW_FIRST = (
    "SELECT ts, voltage, current, power, soc, details, seq FROM readings"
    " WHERE batmon_id = ? AND ts >= ? AND ts <= ? ORDER BY ts, seq LIMIT ?"
)
_RAW_NEXT = (
    "SELECT ts, voltage, current, power, soc, details, seq FROM readings"
    " WHERE batmon_id = ? AND (ts, seq) > (?, ?) AND ts <= ? ORDER BY ts, seq LIMIT ?"
)
_AGGREGATES = ", ".join(f"min({m}), avg({m}), max({m})" for m in METRICS)
_BUCKETS = (
    "SELECT CAST(ts AS INTEGER) / :bucket * :bucket AS t, count(*), " + _AGGREGATES +
    " FROM readings WHERE batmon_id = :batmon AND ts >= :lo AND ts < :hi GROUP BY t ORDER BY t"
)  # fmt: skip
# Raw rows and hourly rollups merged: each source gives mergeable parts per bucket,
# named as the rollups table names them (min, max, sum, count of each metric), and the
# outer query combines them. A sum over no values is 0, so the average is 0/0 = NULL.
_RAW_PARTS = ", ".join(
    f"{'total' if part == 'sum' else part}({m}) AS {m}_{part}"
    for m in METRICS for part in ("min", "max", "sum", "count")
)
_ROLLUP_PARTS = ", ".join(f"{m}_{part}" for m in METRICS for part in ("min", "max", "sum", "count"))
_MERGED = ", ".join(f"min({m}_min), sum({m}_sum) / sum({m}_count), max({m}_max)" for m in METRICS)
_BUCKETS_WITH_ROLLUPS = (
    "SELECT t, sum(n), " + _MERGED + " FROM ("
    " SELECT CAST(ts AS INTEGER) / :bucket * :bucket AS t, count(*) AS n, " + _RAW_PARTS +
    " FROM readings WHERE batmon_id = :batmon AND ts >= :lo AND ts < :hi GROUP BY t"
    " UNION ALL"
    " SELECT hour / :bucket * :bucket, count, " + _ROLLUP_PARTS +
    " FROM rollups WHERE batmon_id = :batmon AND hour >= :rollup_lo AND hour < :hi"
    ") GROUP BY t ORDER BY t"
)  # fmt: skip


def database_file(conn: sqlite3.Connection) -> Path:
    """The file behind a connection's main database (read connections open it again)."""
    for _, name, file in conn.execute("PRAGMA database_list"):
        if name == "main" and file:
            return Path(file)
    raise ValueError("the database has no file (in-memory databases cannot be shared)")


class HistoryReader:
    """Pages of history from read-only connections, one per worker thread."""

    def __init__(self, path: Path, *, workers: int = 2, page_rows: int = 10_000,
                 page_seconds: int = 86_400) -> None:  # fmt: skip
        self._uri = Path(path).resolve().as_uri() + "?mode=ro"
        self.page_rows = page_rows
        # A bucket page spans at most this much raw time (and at most 1,000 buckets),
        # so one query never holds a worker for long.
        self.page_seconds = page_seconds
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="history")

    def close(self) -> None:
        """Wait for running pages, then close every worker's connection."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # check_same_thread=False only so close() may close it; one thread uses it.
            conn = sqlite3.connect(self._uri, uri=True, check_same_thread=False, timeout=30)
            conn.execute("PRAGMA cache_size=-16384")
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(conn, *args)`` on a worker with its read-only connection."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(self._conn(), *args))

    # -- raw rows --------------------------------------------------------------
    async def raw_span(self, batmon_id: int, lo: float, hi: float) -> tuple[float, float] | None:
        """ts of the first and last readings with lo <= ts < hi, else None."""
        return await self.run(_raw_span, batmon_id, lo, hi)

    async def raw_count(self, batmon_id: int, lo: float, hi: float) -> int:
        """How many readings have lo <= ts < hi (a scan: only for the optional cap)."""
        return await self.run(_raw_count, batmon_id, lo, hi)

    async def raw_pages(self, batmon_id: int, first: float, last: float, render: Render,
                        ) -> AsyncIterator[bytes]:  # fmt: skip
        """Rendered pages of the readings with first <= ts <= last, in (ts, seq) order."""

        def page(conn: sqlite3.Connection, after: tuple[float, int] | None
                 ) -> tuple[bytes, tuple[float, int] | None]:  # fmt: skip
            if after is None:
                rows = conn.execute(_RAW_FIRST, (batmon_id, first, last, self.page_rows)).fetchall()
            else:
                rows = conn.execute(
                    _RAW_NEXT, (batmon_id, after[0], after[1], last, self.page_rows)
                ).fetchall()
            more = (rows[-1][0], rows[-1][6]) if len(rows) == self.page_rows else None
            return (render(rows) if rows else b""), more

        async for data in self._pipeline(page, None):
            yield data

    def raw_rows(self, batmon_id: int, lo: float, hi: float) -> list[Row]:
        """Every reading with lo <= ts < hi, read on the calling thread (tools and tests)."""
        conn = sqlite3.connect(self._uri, uri=True)
        try:
            return conn.execute(
                "SELECT ts, voltage, current, power, soc, details FROM readings"
                " WHERE batmon_id = ? AND ts >= ? AND ts < ? ORDER BY ts, seq",
                (batmon_id, lo, hi),
            ).fetchall()
        finally:
            conn.close()

    async def last_reported(self, batmon_ids: list[int]) -> dict[int, dict[str, float]]:
        """When each metric of these batmons was last in a reading (metrics never reported
        are left out); from the readings, else the latest rollup hour's end. One worker call."""
        return await self.run(lambda conn: {b: _last_reported(conn, b) for b in batmon_ids})

    # -- buckets ---------------------------------------------------------------
    async def bucket_plan(self, batmon_id: int, lo: float, hi: float, bucket: int
                          ) -> tuple[float, float, bool] | None:  # fmt: skip
        """(first, last, with_rollups) of the data behind a bucketed answer, else None.

        Rollups join in when buckets are at least an hour and the range has some.
        """
        return await self.run(_bucket_plan, batmon_id, lo, hi, bucket)

    async def bucket_pages(self, batmon_id: int, lo: float, first: float, last: float,
                           bucket: int, with_rollups: bool, render: Render,
                           ) -> AsyncIterator[bytes]:  # fmt: skip
        """Rendered pages of buckets over readings lo <= ts <= last (and rollup hours
        overlapping that), from the first value found at ``first``; empty buckets never appear."""
        span = max(1, min(1000, self.page_seconds // bucket)) * bucket
        end = math.nextafter(last, math.inf)  # the range is inclusive of last
        sql = _BUCKETS_WITH_ROLLUPS if with_rollups else _BUCKETS

        def page(conn: sqlite3.Connection, start: float | None
                 ) -> tuple[bytes, float | None]:  # fmt: skip
            # Start each page at the bucket of the next stored value: gaps cost one seek.
            cursor = first if start is None else start
            start = _next_value(conn, batmon_id, max(cursor, lo),
                                max(cursor, rollup_floor(lo)) if with_rollups else None, end)  # fmt: skip
            if start is None:
                return b"", None
            page_start = int(start) // bucket * bucket
            page_end = min(page_start + span, end)
            params = {"bucket": bucket, "batmon": batmon_id, "lo": max(lo, page_start),
                      "rollup_lo": max(rollup_floor(lo), page_start), "hi": page_end}  # fmt: skip
            rows = conn.execute(sql, params).fetchall()
            return (render(rows) if rows else b""), (page_end if page_end < end else None)

        async for data in self._pipeline(page, None):
            yield data

    async def _pipeline(self, page: Callable[[sqlite3.Connection, Any], tuple[bytes, Any]],
                        cursor: Any) -> AsyncIterator[bytes]:  # fmt: skip
        """Run pages one after another, the next one fetched while this one is sent."""
        pending: asyncio.Future[tuple[bytes, Any]] | None = asyncio.ensure_future(
            self.run(page, cursor)
        )
        try:
            while pending is not None:
                data, cursor = await pending
                pending = asyncio.ensure_future(self.run(page, cursor)) if cursor is not None else None
                if data:
                    yield data
        finally:
            if pending is not None:
                pending.cancel()


def _raw_span(conn: sqlite3.Connection, batmon_id: int, lo: float, hi: float
              ) -> tuple[float, float] | None:  # fmt: skip
    # Two separate min/max queries: each is one seek in the primary key.
    first = conn.execute("SELECT min(ts) FROM readings WHERE batmon_id = ? AND ts >= ? AND ts < ?",
                         (batmon_id, lo, hi)).fetchone()[0]  # fmt: skip
    if first is None:
        return None
    last = conn.execute("SELECT max(ts) FROM readings WHERE batmon_id = ? AND ts >= ? AND ts < ?",
                        (batmon_id, lo, hi)).fetchone()[0]  # fmt: skip
    return first, last


def _raw_count(conn: sqlite3.Connection, batmon_id: int, lo: float, hi: float) -> int:
    return int(conn.execute(
        "SELECT count(*) FROM readings WHERE batmon_id = ? AND ts >= ? AND ts < ?", (batmon_id, lo, hi)
    ).fetchone()[0])  # fmt: skip


def _rollup_span(conn: sqlite3.Connection, batmon_id: int, lo: float, hi: float
                 ) -> tuple[int, int] | None:  # fmt: skip
    lo = rollup_floor(lo)
    first = conn.execute("SELECT min(hour) FROM rollups WHERE batmon_id = ? AND hour >= ? AND hour < ?",
                         (batmon_id, lo, hi)).fetchone()[0]  # fmt: skip
    if first is None:
        return None
    last = conn.execute("SELECT max(hour) FROM rollups WHERE batmon_id = ? AND hour >= ? AND hour < ?",
                        (batmon_id, lo, hi)).fetchone()[0]  # fmt: skip
    return first, last


def _bucket_plan(conn: sqlite3.Connection, batmon_id: int, lo: float, hi: float, bucket: int
                 ) -> tuple[float, float, bool] | None:  # fmt: skip
    raw = _raw_span(conn, batmon_id, lo, hi)
    rolled = _rollup_span(conn, batmon_id, lo, hi) if bucket >= ROLLUP_SECONDS else None
    spans = [s for s in (raw, rolled) if s is not None]
    if not spans:
        return None
    return min(s[0] for s in spans), max(s[1] for s in spans), rolled is not None


def _next_value(conn: sqlite3.Connection, batmon_id: int, lo: float, rollup_lo: float | None,
                hi: float) -> float | None:  # fmt: skip
    """The smallest ts in lo <= ts < hi (or rollup hour in rollup_lo <= hour < hi), else None."""
    found = [conn.execute("SELECT min(ts) FROM readings WHERE batmon_id = ? AND ts >= ? AND ts < ?",
                          (batmon_id, lo, hi)).fetchone()[0]]  # fmt: skip
    if rollup_lo is not None:
        found.append(conn.execute(
            "SELECT min(hour) FROM rollups WHERE batmon_id = ? AND hour >= ? AND hour < ?",
            (batmon_id, rollup_lo, hi),
        ).fetchone()[0])  # fmt: skip
    values = [v for v in found if v is not None]
    return min(values) if values else None


def _last_reported(conn: sqlite3.Connection, batmon_id: int) -> dict[str, float]:
    # The latest reading usually carries every metric: one seek at the end of the key.
    flags = ", ".join(f"{m} IS NOT NULL" for m in METRICS)
    latest = conn.execute(f"SELECT ts, {flags} FROM readings WHERE batmon_id = ?"
                          " ORDER BY ts DESC, seq DESC LIMIT 1", (batmon_id,)).fetchone()  # fmt: skip
    if latest is None:
        found: dict[str, float] = {}
    else:
        found = {m: float(latest[0]) for m, carried in zip(METRICS, latest[1:], strict=True) if carried}
    for metric in (m for m in METRICS if m not in found):
        # Backwards along the key to the latest reading that has it; a metric the device
        # never sends costs one scan of the batmon's rows.
        row = conn.execute(f"SELECT ts FROM readings WHERE batmon_id = ? AND {metric} IS NOT NULL"
                           " ORDER BY ts DESC, seq DESC LIMIT 1", (batmon_id,)).fetchone()  # fmt: skip
        if row is None:
            # Pruned into hourly rollups: no later than the end of the latest hour that has it.
            row = conn.execute(f"SELECT max(hour) + {ROLLUP_SECONDS - 1} FROM rollups"
                               f" WHERE batmon_id = ? AND {metric}_count > 0",
                               (batmon_id,)).fetchone()  # fmt: skip
        if row is not None and row[0] is not None:
            found[metric] = float(row[0])
    return found
