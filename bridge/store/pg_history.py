"""History reads on PostgreSQL (``HistoryReads``; the SQLite one is bridge/store/history.py).

Same pages and buckets: a thread pool runs each page as one short query on a
connection of a ``psycopg_pool`` pool (no transaction stays open while a slow client
downloads), keyset on ``(ts, seq)`` for raw rows, ``GROUP BY floor(ts / bucket)``
for buckets, hourly rollups merged in for buckets of an hour or more.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from bridge.store.history import ROLLUP_SECONDS, rollup_floor
from bridge.store.interface import METRICS, Render, Row

_RAW_FIRST = (
    "SELECT ts, voltage, current, power, soc, details, seq FROM readings"
    " WHERE batmon_id = %s AND ts >= %s AND ts <= %s ORDER BY ts, seq LIMIT %s"
)
_RAW_NEXT = (
    "SELECT ts, voltage, current, power, soc, details, seq FROM readings"
    " WHERE batmon_id = %s AND (ts, seq) > (%s, %s) AND ts <= %s ORDER BY ts, seq LIMIT %s"
)
_T = "(floor(ts / %(bucket)s) * %(bucket)s)::bigint"
_AGGREGATES = ", ".join(f"min({m}), avg({m}), max({m})" for m in METRICS)
_BUCKETS = (
    f"SELECT {_T} AS t, count(*), {_AGGREGATES} FROM readings"
    " WHERE batmon_id = %(batmon)s AND ts >= %(lo)s AND ts < %(hi)s GROUP BY t ORDER BY t"
)
_RAW_PARTS = ", ".join(
    f"{'coalesce(sum(' + m + '), 0)' if part == 'sum' else part + '(' + m + ')'} AS {m}_{part}"
    for m in METRICS for part in ("min", "max", "sum", "count")
)  # fmt: skip
_ROLLUP_PARTS = ", ".join(f"{m}_{part}" for m in METRICS for part in ("min", "max", "sum", "count"))
# A sum over no values is 0, and 0 / NULLIF(0, 0) is NULL, as SQLite's 0/0.
_MERGED = ", ".join(f"min({m}_min), sum({m}_sum) / nullif(sum({m}_count), 0), max({m}_max)" for m in METRICS)
_BUCKETS_WITH_ROLLUPS = (
    f"SELECT t, sum(n)::bigint, {_MERGED} FROM ("
    f" SELECT {_T} AS t, count(*) AS n, {_RAW_PARTS}"
    " FROM readings WHERE batmon_id = %(batmon)s AND ts >= %(lo)s AND ts < %(hi)s GROUP BY t"
    " UNION ALL"
    " SELECT (floor(hour / %(bucket)s) * %(bucket)s)::bigint, count, " + _ROLLUP_PARTS +
    " FROM rollups WHERE batmon_id = %(batmon)s AND hour >= %(rollup_lo)s AND hour < %(hi)s"
    ") AS parts GROUP BY t ORDER BY t"
)  # fmt: skip


def _configure(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SET extra_float_digits = 1")


class PgHistoryReader:
    """Pages of history from pooled connections, run on a small thread pool."""

    def __init__(self, url: str, *, workers: int = 2, page_rows: int = 10_000,
                 page_seconds: int = 86_400) -> None:  # fmt: skip
        self.page_rows = page_rows
        self.page_seconds = page_seconds
        self._pool = ConnectionPool(url, min_size=0, max_size=workers, open=True,
                                    connection_class=psycopg.Connection,
                                    reconnect_timeout=30, kwargs={"autocommit": True},
                                    configure=_configure)  # fmt: skip
        self._threads = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="history")
        self._url = url

    def close(self) -> None:
        """Wait for running pages, then close the pool's connections."""
        self._threads.shutdown(wait=True, cancel_futures=True)
        self._pool.close()

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self._pool.connection() as conn:
            return fn(conn, *args)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(conn, *args)`` on a worker with a pooled connection."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, lambda: self._call(fn, *args))

    async def raw_span(self, batmon_id: int, lo: float, hi: float) -> tuple[float, float] | None:
        """ts of the first and last readings with lo <= ts < hi, else None."""
        return await self.run(_span, "readings", "ts", batmon_id, lo, hi)

    async def raw_count(self, batmon_id: int, lo: float, hi: float) -> int:
        """How many readings have lo <= ts < hi."""
        return await self.run(_count, batmon_id, lo, hi)

    async def raw_pages(self, batmon_id: int, first: float, last: float, render: Render,
                        ) -> AsyncIterator[bytes]:  # fmt: skip
        """Rendered pages of the readings with first <= ts <= last, in (ts, seq) order."""

        def page(conn: psycopg.Connection[Any], after: tuple[float, int] | None
                 ) -> tuple[bytes, tuple[float, int] | None]:  # fmt: skip
            if after is None:
                rows = conn.execute(_RAW_FIRST, (batmon_id, first, last, self.page_rows)).fetchall()
            else:
                rows = conn.execute(_RAW_NEXT, (batmon_id, *after, last, self.page_rows)).fetchall()
            more = (rows[-1][0], rows[-1][6]) if len(rows) == self.page_rows else None
            return (render(rows) if rows else b""), more

        async for data in self._pipeline(page, None):
            yield data

    def raw_rows(self, batmon_id: int, lo: float, hi: float) -> list[Row]:
        """Every reading with lo <= ts < hi, read on the calling thread."""
        with self._pool.connection() as conn:
            return conn.execute(
                "SELECT ts, voltage, current, power, soc, details FROM readings"
                " WHERE batmon_id = %s AND ts >= %s AND ts < %s ORDER BY ts, seq", (batmon_id, lo, hi)
            ).fetchall()  # fmt: skip

    async def last_reported(self, batmon_ids: list[int]) -> dict[int, dict[str, float]]:
        """When each metric of these batmons was last in a reading (metrics never reported
        are left out); from the readings, else the latest rollup hour's end. One worker call."""
        return await self.run(lambda conn: {b: _last_reported(conn, b) for b in batmon_ids})

    async def bucket_plan(self, batmon_id: int, lo: float, hi: float, bucket: int
                          ) -> tuple[float, float, bool] | None:  # fmt: skip
        """(first, last, with_rollups) of the data behind a bucketed answer, else None."""
        return await self.run(_bucket_plan, batmon_id, lo, hi, bucket)

    async def bucket_pages(self, batmon_id: int, lo: float, first: float, last: float,
                           bucket: int, with_rollups: bool, render: Render,
                           ) -> AsyncIterator[bytes]:  # fmt: skip
        """Rendered pages of buckets, as bridge/store/history.py's (same paging rule)."""
        span = max(1, min(1000, self.page_seconds // bucket)) * bucket
        end = math.nextafter(last, math.inf)
        sql = _BUCKETS_WITH_ROLLUPS if with_rollups else _BUCKETS

        def page(conn: psycopg.Connection[Any], start: float | None) -> tuple[bytes, float | None]:
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

    async def _pipeline(self, page: Callable[[psycopg.Connection[Any], Any], tuple[bytes, Any]],
                        cursor: Any) -> AsyncIterator[bytes]:  # fmt: skip
        """Run pages one after another, the next one fetched while this one is sent."""
        pending: asyncio.Future[tuple[bytes, Any]] | None = asyncio.ensure_future(self.run(page, cursor))
        try:
            while pending is not None:
                data, cursor = await pending
                pending = asyncio.ensure_future(self.run(page, cursor)) if cursor is not None else None
                if data:
                    yield data
        finally:
            if pending is not None:
                pending.cancel()


def _span(conn: psycopg.Connection[Any], table: str, column: str, batmon_id: int, lo: float, hi: float
          ) -> tuple[float, float] | None:  # fmt: skip
    row = conn.execute(f"SELECT min({column}), max({column}) FROM {table}"  # names: ours
                       f" WHERE batmon_id = %s AND {column} >= %s AND {column} < %s".encode(),
                       (batmon_id, lo, hi)).fetchone()  # fmt: skip
    return None if row is None or row[0] is None else (row[0], row[1])


def _count(conn: psycopg.Connection[Any], batmon_id: int, lo: float, hi: float) -> int:
    row = conn.execute("SELECT count(*) FROM readings WHERE batmon_id = %s AND ts >= %s AND ts < %s",
                       (batmon_id, lo, hi)).fetchone()  # fmt: skip
    return int(row[0]) if row else 0


def _bucket_plan(conn: psycopg.Connection[Any], batmon_id: int, lo: float, hi: float, bucket: int
                 ) -> tuple[float, float, bool] | None:  # fmt: skip
    raw = _span(conn, "readings", "ts", batmon_id, lo, hi)
    rolled = None
    if bucket >= ROLLUP_SECONDS:
        rolled = _span(conn, "rollups", "hour", batmon_id, rollup_floor(lo), hi)
    spans = [s for s in (raw, rolled) if s is not None]
    if not spans:
        return None
    return min(s[0] for s in spans), max(s[1] for s in spans), rolled is not None


def _next_value(conn: psycopg.Connection[Any], batmon_id: int, lo: float, rollup_lo: float | None,
                hi: float) -> float | None:  # fmt: skip
    found = [conn.execute("SELECT min(ts) FROM readings WHERE batmon_id = %s AND ts >= %s AND ts < %s",
                          (batmon_id, lo, hi)).fetchone()]  # fmt: skip
    if rollup_lo is not None:
        found.append(conn.execute("SELECT min(hour) FROM rollups WHERE batmon_id = %s AND hour >= %s"
                                  " AND hour < %s", (batmon_id, rollup_lo, hi)).fetchone())  # fmt: skip
    values = [row[0] for row in found if row is not None and row[0] is not None]
    return min(values) if values else None




def _last_reported(conn: psycopg.Connection[Any], batmon_id: int) -> dict[str, float]:
    """As bridge/store/history.py's: the latest reading first, then per missing metric."""
    flags = ", ".join(f"{m} IS NOT NULL" for m in METRICS)
    latest = conn.execute(f"SELECT ts, {flags} FROM readings WHERE batmon_id = %s"  # names: ours
                          " ORDER BY ts DESC, seq DESC LIMIT 1".encode(),
                          (batmon_id,)).fetchone()  # fmt: skip
    found: dict[str, float] = {}
    if latest is not None:
        found = {m: float(latest[0]) for m, carried in zip(METRICS, latest[1:], strict=True) if carried}
    for metric in (m for m in METRICS if m not in found):
        row = conn.execute(f"SELECT ts FROM readings WHERE batmon_id = %s AND {metric} IS NOT NULL"
                           " ORDER BY ts DESC, seq DESC LIMIT 1".encode(),
                           (batmon_id,)).fetchone()  # fmt: skip
        if row is None:
            # Pruned into hourly rollups: no later than the end of the latest hour that has it.
            row = conn.execute(f"SELECT max(hour) + {ROLLUP_SECONDS - 1} FROM rollups"
                               f" WHERE batmon_id = %s AND {metric}_count > 0".encode(),
                               (batmon_id,)).fetchone()  # fmt: skip
        if row is not None and row[0] is not None:
            found[metric] = float(row[0])
    return found
