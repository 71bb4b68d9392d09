"""Batch insert into the PostgreSQL store's readings: unnest against COPY, in one run.

Both keep the store's rules (a redelivered reading stored once: ON CONFLICT DO NOTHING on
the values-digest key; arrival order by seq), 500 rows per transaction, on a database made
for the run and dropped after it:

- ``unnest``: one ``INSERT ... SELECT FROM unnest(...) ON CONFLICT DO NOTHING`` per group;
- ``copy``: the store's own ``write``: ``COPY`` into a temporary table, then ``INSERT ...
  SELECT ... ON CONFLICT DO NOTHING`` from it (COPY alone has no ON CONFLICT);
- ``copy-plain``: ``COPY`` straight into readings, no conflict handling: the ceiling, not
  a candidate (a redelivery would fail the whole batch).

Rounds alternate the methods on emptied tables; the medians are printed, and the
copy/unnest ratio of each round (steadier on a shared machine than the rates), and the
CPU time this (the worker's) process spends per row: the ceiling of one worker is its GIL.

    python -m benchmarks.bench_pg_insert [--admin-url postgresql://postgres@127.0.0.1/postgres]
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg

from bridge.store.interface import ReadingRow
from bridge.store.pg_schema import VALUES_HASH
from bridge.store.pg_store import PostgresStore

BATCH = 500
T0 = 1_700_000_000.0

UNNEST = (
    "INSERT INTO readings (batmon_id, ts, vhash, voltage, current, power, soc, details,"
    " charged_kwh, discharged_kwh)"
    " SELECT b, t, " + VALUES_HASH.format(v="v", c="c", p="p", s="s", d="d") + ", v, c, p, s, d, ck, dk"
    " FROM unnest(%s::bigint[], %s::float8[], %s::float8[], %s::float8[], %s::float8[],"
    " %s::float8[], %s::text[], %s::float8[], %s::float8[])"
    " WITH ORDINALITY AS u(b, t, v, c, p, s, d, ck, dk, n)"
    " ORDER BY n ON CONFLICT DO NOTHING"
)


def rows_for(total: int, batmons: int = 100) -> list[ReadingRow]:
    # 18 W for 0.01 s: the kWh each reading added, as the writer plans it.
    return [(1 + k % batmons, T0 + k * 0.01, 12.0 + (k % 50) / 10, -1.5, 18.0, 80.0, None,
             18 * 0.01 / 3.6e6, 0.0) for k in range(total)]  # fmt: skip


def by_unnest(store: PostgresStore, rows: list[ReadingRow]) -> None:
    conn = store._conn
    for i in range(0, len(rows), BATCH):
        batch = rows[i:i + BATCH]
        store._ensure_partitions(r[1] for r in batch)
        columns = [[r[k] if k in (0, 6) or r[k] is None else float(r[k]) for r in batch] for k in range(9)]
        with conn.transaction():
            conn.execute(UNNEST, columns)


def by_copy(store: PostgresStore, rows: list[ReadingRow]) -> None:
    for i in range(0, len(rows), BATCH):
        store.write(rows[i:i + BATCH], [])


def by_copy_plain(store: PostgresStore, rows: list[ReadingRow]) -> None:
    conn = store._conn
    copy_sql = ("COPY readings (batmon_id, ts, vhash, voltage, current, power, soc, details, charged_kwh,"
                " discharged_kwh) FROM STDIN")
    for i in range(0, len(rows), BATCH):
        batch = rows[i:i + BATCH]
        store._ensure_partitions(r[1] for r in batch)
        with conn.transaction(), conn.cursor() as cur, cur.copy(copy_sql) as copy:
            for k, row in enumerate(batch):
                copy.write_row((row[0], row[1], f"{i + k:032x}", *row[2:]))


METHODS: dict[str, Callable[[PostgresStore, list[ReadingRow]], None]] = {
    "unnest": by_unnest, "copy": by_copy, "copy-plain": by_copy_plain}  # fmt: skip


@contextlib.contextmanager
def scratch_database(admin_url: str) -> Iterator[str]:
    """The URL of a database made for one run, dropped after it."""
    name = f"batmon_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}".encode())
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)".encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with scratch_database(args.admin_url) as url:
        store = PostgresStore.open(url)
        rows = rows_for(args.rows)
        rates: dict[str, list[float]] = {m: [] for m in METHODS}
        cpu: dict[str, list[float]] = {m: [] for m in METHODS}  # this process's CPU s per row
        for _ in range(args.rounds):
            for method, run in METHODS.items():
                store._conn.execute("TRUNCATE readings")
                started, cpu_started = time.perf_counter(), time.process_time()
                run(store, rows)
                rates[method].append(args.rows / (time.perf_counter() - started))
                cpu[method].append((time.process_time() - cpu_started) / args.rows)
                stored = store._value("SELECT count(*) FROM readings")
                assert stored == args.rows, (method, stored)
        # A redelivered batch under the store's method: stored once, no error.
        store._conn.execute("TRUNCATE readings")
        for _ in range(2):
            by_unnest(store, rows[:2 * BATCH])
            by_copy(store, rows[:2 * BATCH])
        assert store._value("SELECT count(*) FROM readings") == 2 * BATCH
        store.close()
    print(f"{args.rows:,} rows, {BATCH} rows per transaction, {args.rounds} rounds,"
          " median rows/s and this process's CPU per row:")
    for method, values in rates.items():
        shown: Any = ", ".join(f"{v:,.0f}" for v in values)
        per_row = statistics.median(cpu[method]) * 1e6
        print(f"  {method:<11} {statistics.median(values):>9,.0f}  {per_row:5.1f} µs   ({shown})")
    # The machine is shared: a ratio within one round is steadier than rates across rounds.
    ratios = [c / u for c, u in zip(rates["copy"], rates["unnest"], strict=True)]
    print(f"  copy / unnest, per round: median {statistics.median(ratios):.2f}"
          f" ({', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
