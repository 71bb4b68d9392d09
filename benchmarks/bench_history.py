"""History read speed, loop lag, downsampling and retention, against anchors in the same run.

Builds (once, then reuses) a 5,000,000-row database: batmon 1 has 30 days at 1 Hz
(2,592,000 rows), 28 others one reading every 30 s, all inserted in arrival order.

- raw: one batmon's day (86,400 rows) through the product's streaming reader, vs bare
  sqlite3 (same query, fetchall) + orjson.dumps of the rows; and over HTTP.
- loop lag while a 100,000-row history is read: in-process (product vs the seed's way,
  on the loop), and HTTP update latency while history requests run against `batmon serve`.
- buckets: 30 days of batmon 1 into 1,000 buckets, vs the bare SQL GROUP BY.
- layouts (--layouts): the same raw read on today's WITHOUT ROWID table vs the old rowid
  table + (batmon_id, ts) index.
- retention (--retention): `batmon serve --retention-days 15` on a copy; HTTP update
  latency while it prunes ~2.5 M rows.

A/B alternated, median of 3 (--rounds). Ratios are product / anchor.

    python benchmarks/bench_history.py [--db DIR] [--rounds 3] [--layouts] [--retention]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge.core import Batmon, Core  # noqa: E402
from bridge.events import EventBus  # noqa: E402
from bridge.history_answers import HistoryPlan, stream  # noqa: E402
from bridge.store.db import Store  # noqa: E402
from bridge.store.history import HistoryReader  # noqa: E402
from bridge.store.schema import MIGRATIONS  # noqa: E402

DAY = 86_400
DAYS = 30
OTHERS = 28  # batmons 2..29, one reading each every 30 s
INSERT = ("INSERT INTO readings (batmon_id, ts, voltage, current, power, soc, details)"
          " VALUES (?, ?, ?, ?, ?, ?, ?)")  # fmt: skip
ANCHOR_RAW = ("SELECT ts, voltage, current, power, soc, details FROM readings"
              " WHERE batmon_id = ? AND ts >= ? AND ts < ? ORDER BY ts, {order}")  # fmt: skip
ANCHOR_GROUP = (
    "SELECT CAST(ts AS INTEGER) / ? * ? AS t, count(*), "
    + ", ".join(f"min({m}), avg({m}), max({m})" for m in ("voltage", "current", "power", "soc"))
    + " FROM readings WHERE batmon_id = ? AND ts >= ? AND ts < ? GROUP BY t ORDER BY t"
)


# -- the data ------------------------------------------------------------------------
def rows(t0: int) -> Iterator[tuple[Any, ...]]:
    """5 M readings in arrival order: batmon 1 every second, the others every 30 s."""
    rnd = random.Random(1)
    for i in range(DAYS * DAY):
        ts = t0 + i + 0.25
        yield (1, ts, round(12 + rnd.random(), 2), round(rnd.uniform(-5, 5), 2),
               None if i % 7 == 0 else round(rnd.uniform(-60, 60), 1), round(rnd.uniform(0, 100), 1),
               '{"key": 25}' if i % 60 == 0 else None)  # fmt: skip
        slot = i % 30
        if slot < OTHERS:
            yield (2 + slot, ts, round(12 + rnd.random(), 2), 1.0, 12.0, 50.0, None)


def build(data_dir: Path, layout: str = "clustered") -> dict[str, Any]:
    """The database (reused when present) and what the benchmark needs to know of it."""
    info_path = data_dir / "bench.json"
    if info_path.exists():
        return json.loads(info_path.read_text())
    data_dir.mkdir(parents=True, exist_ok=True)
    t0 = (int(time.time()) // DAY - DAYS) * DAY
    db_path = data_dir / "batmon.sqlite3"
    started = time.perf_counter()
    if layout == "clustered":
        store = Store.open(db_path)
        core = Core(store, EventBus()).load()
        user, key = core.create_user("bench@localhost")
        for batmon_id in range(1, 2 + OTHERS):
            store.add_batmon({"id": batmon_id, "user_id": user.id, "name": f"bench {batmon_id}",
                              "type": "bench", "token": f"bench-token-{batmon_id:04d}",
                              "update_period": 300, "created": t0})  # fmt: skip
        with store.db.conn:
            store.db.conn.executemany(INSERT, rows(t0))
        store.close()
    else:  # the seed's schema: rowid table + (batmon_id, ts) index
        key = ""
        conn = sqlite3.connect(db_path)
        conn.execute("PRAGMA journal_mode=WAL")
        for statement in MIGRATIONS[0]:
            conn.execute(statement)
        with conn:
            conn.executemany(INSERT, rows(t0))
        conn.close()
    info = {"t0": t0, "api_key": key, "layout": layout, "rows": DAYS * DAY + OTHERS * DAYS * DAY // 30,
            "build_s": round(time.perf_counter() - started, 1)}  # fmt: skip
    info_path.write_text(json.dumps(info))
    return info


# -- measuring -----------------------------------------------------------------------
def alternate(rounds: int, **runs: Callable[[], Any]) -> dict[str, float]:
    """Median seconds of each run, run A/B/A/B... ``rounds`` times."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def bench_batmon(batmon_id: int) -> Batmon:
    return Batmon(id=batmon_id, user_id=1, name=f"bench {batmon_id}", type="bench",
                  token="t" * 22, update_period=300, created=0)  # fmt: skip


class Product:
    """The product's reader and stream on an event loop of its own, for in-process runs."""

    def __init__(self, db_path: Path) -> None:
        self.reader = HistoryReader(db_path)
        self.loop = asyncio.new_event_loop()

    def close(self) -> None:
        self.reader.close()
        self.loop.close()

    async def body(self, batmon_id: int, lo: float, hi: float, bucket: int | None) -> int:
        size = 0
        streamed = stream(self.reader, [bench_batmon(batmon_id)], HistoryPlan(lo, hi, bucket, False))
        async for chunk in streamed.chunks:
            size += len(chunk)
        return size

    def run(self, batmon_id: int, lo: float, hi: float, bucket: int | None = None) -> int:
        return self.loop.run_until_complete(self.body(batmon_id, lo, hi, bucket))


def anchor_raw(conn: sqlite3.Connection, order: str, batmon_id: int, lo: float, hi: float) -> bytes:
    return orjson.dumps(conn.execute(ANCHOR_RAW.format(order=order), (batmon_id, lo, hi)).fetchall())


def read_only(db_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(db_path.resolve().as_uri() + "?mode=ro", uri=True)


def raw_rows(db_path: Path, batmon_id: int, lo: float, hi: float, rounds: int) -> dict[str, float]:
    """86,400 rows of one batmon: product (streamed JSON) vs sqlite3 fetchall + orjson."""
    conn, product = read_only(db_path), Product(db_path)
    assert len(conn.execute(ANCHOR_RAW.format(order="seq"), (batmon_id, lo, hi)).fetchall()) == DAY
    product.run(batmon_id, lo, hi)  # warm the caches of both
    result = alternate(rounds, anchor=lambda: anchor_raw(conn, "seq", batmon_id, lo, hi),
                       product=lambda: product.run(batmon_id, lo, hi))  # fmt: skip
    product.close()
    conn.close()
    return result


def buckets(db_path: Path, info: dict[str, Any], rounds: int) -> dict[str, float]:
    lo, hi = info["t0"], info["t0"] + DAYS * DAY
    bucket = -(-(hi - lo) // 1000)
    conn, product = read_only(db_path), Product(db_path)
    result = alternate(
        rounds,
        anchor=lambda: conn.execute(ANCHOR_GROUP, (bucket, bucket, 1, lo, hi)).fetchall(),
        product=lambda: product.run(1, lo, hi - 1, bucket),
    )
    product.close()
    conn.close()
    return result


def layouts(db_path: Path, info: dict[str, Any], rowid_dir: Path, rounds: int) -> dict[str, float]:
    """The bare read on WITHOUT ROWID vs the old rowid table + index, same data.

    "dense": batmon 1's day (it is half of all rows); "sparse": batmon 2's month (one
    row in 58, spread over the whole table in arrival order).
    """
    rowid_info = build(rowid_dir, "rowid")
    clustered, rowid = read_only(db_path), read_only(rowid_dir / "batmon.sqlite3")
    result: dict[str, float] = {}
    for case, batmon_id, start, span in (("dense", 1, 15 * DAY, DAY), ("sparse", 2, 0, DAYS * DAY)):
        lo, rowid_lo = info["t0"] + start, rowid_info["t0"] + start
        times = alternate(
            rounds,
            rowid=lambda b=batmon_id, lo=rowid_lo, span=span: anchor_raw(rowid, "id", b, lo, lo + span),
            clustered=lambda b=batmon_id, lo=lo, span=span: anchor_raw(clustered, "seq", b, lo, lo + span),
        )
        result.update({f"{case}_{name}": value for name, value in times.items()})
    result["rowid_mb"] = (rowid_dir / "batmon.sqlite3").stat().st_size / 1e6
    result["clustered_mb"] = db_path.stat().st_size / 1e6
    return result


def loop_lag(db_path: Path, info: dict[str, Any]) -> dict[str, float]:
    """Lag of a 1 ms ticker while 100,000 rows are read: product vs the seed's way."""
    lo = info["t0"] + 3 * DAY
    hi = lo + 100_000
    product = Product(db_path)
    conn = read_only(db_path)

    def seed_way() -> bytes:  # what history did before: fetch, dicts, strftime, json, on the loop
        from datetime import UTC, datetime

        rows = conn.execute(ANCHOR_RAW.format(order="seq"), (1, lo, hi)).fetchall()
        data = [{"batmon_voltage": r[1], "batmon_current": r[2], "batmon_power": r[3],
                 "batmon_soc": r[4], "batmon_details": r[5],
                 "update_time": datetime.fromtimestamp(r[0], UTC).strftime("%Y-%m-%dT%H:%M:%S")}
                for r in rows]  # fmt: skip
        return json.dumps({"success": [{"data": data}]}).encode()

    async def measure(work: Callable[[], Any]) -> list[float]:
        lags: list[float] = []
        done = False

        async def ticker() -> None:
            while not done:
                started = time.perf_counter()
                await asyncio.sleep(0.001)
                lags.append(time.perf_counter() - started - 0.001)

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0.01)
        result = work()
        if asyncio.iscoroutine(result):
            await result
        done = True
        await task
        return lags

    out: dict[str, float] = {}
    for name, work in (("seed", seed_way), ("product", lambda: product.body(1, lo, hi, None))):
        lags = sorted(product.loop.run_until_complete(measure(work)))
        out[f"{name}_max_ms"] = lags[-1] * 1000
        out[f"{name}_p99_ms"] = lags[int(len(lags) * 0.99) - 1] * 1000
    product.close()
    conn.close()
    return out


# -- over HTTP, against `batmon serve` ---------------------------------------------------
def start_serve(data_dir: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "batmon.cli", "serve", "--data-dir", str(data_dir), "--http-port", "0",
         "--mqtt-port", "0", *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    url = ""
    for line in proc.stdout:
        if m := re.match(r"HTTP\s+(\S+)", line):
            url = m.group(1)
        elif line.startswith("ready"):
            return proc, url
    raise SystemExit("batmon serve did not start")


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def update_latencies(http: httpx.Client, until: Callable[[], bool], limit: int = 100_000) -> list[float]:
    """POST updates of batmon 2 back to back until ``until()``; seconds each."""
    out = []
    while not until() and len(out) < limit:
        started = time.perf_counter()
        r = http.post("/interface/update/batmon",
                      json={"batmon_id": 2, "batmon_token": "bench-token-0002", "voltage": 12.5})  # fmt: skip
        r.raise_for_status()
        out.append(time.perf_counter() - started)
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000


HISTORY_LOAD = """
import json, signal, sys
import httpx2 as httpx
url, headers, params = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
reads = 0
signal.signal(signal.SIGTERM, lambda *_: (print(reads, flush=True), sys.exit(0)))
print("reading", flush=True)
with httpx.Client(base_url=url, timeout=120) as http:
    while True:
        size = 0
        with http.stream("GET", "/interface/batmon/history", headers=headers, params=params) as r:
            for chunk in r.iter_raw():
                size += len(chunk)
        assert size > 10_000_000, size
        reads += 1
"""


def over_http(data_dir: Path, info: dict[str, Any], rounds: int) -> dict[str, float]:
    proc, url = start_serve(data_dir)
    out: dict[str, float] = {}
    try:
        headers = {"X-API-Key": info["api_key"]}
        day = {"batmon_id": 1, "min_epoch_tm_sec": info["t0"] + 15 * DAY,
               "max_epoch_tm_sec": info["t0"] + 16 * DAY - 1}  # fmt: skip
        big = {"batmon_id": 1, "min_epoch_tm_sec": info["t0"] + 3 * DAY,
               "max_epoch_tm_sec": info["t0"] + 3 * DAY + 99_999}  # fmt: skip
        conn = read_only(data_dir / "batmon.sqlite3")
        lo = info["t0"] + 15 * DAY
        with httpx.Client(base_url=url, timeout=120) as http:
            body = http.get("/interface/batmon/history", headers=headers, params=day)
            assert len(body.json()["success"][0]["data"]) == DAY
            times = alternate(
                rounds,
                anchor=lambda: anchor_raw(conn, "seq", 1, lo, lo + DAY),
                http=lambda: http.get("/interface/batmon/history", headers=headers, params=day).content,
            )
            out.update(anchor_s=times["anchor"], http_s=times["http"])
            idle = update_latencies(http, lambda: False, limit=300)
            # The 100,000-row reads come from another process: parsing them here would
            # hold this process's GIL and show up as update latency that is not the server's.
            loader = subprocess.Popen(
                [sys.executable, "-c", HISTORY_LOAD, url, json.dumps(headers), json.dumps(big)],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert loader.stdout is not None
            assert loader.stdout.readline().strip() == "reading"
            deadline = time.monotonic() + 8
            busy = update_latencies(http, lambda: time.monotonic() > deadline)
            loader.terminate()
            reads = int(loader.communicate()[0].strip() or 0)
        conn.close()
        out.update(idle_p50_ms=percentile(idle, 0.5), idle_p99_ms=percentile(idle, 0.99),
                   busy_p50_ms=percentile(busy, 0.5), busy_p99_ms=percentile(busy, 0.99),
                   busy_max_ms=max(busy) * 1000, busy_updates=len(busy), history_reads=reads)  # fmt: skip
    finally:
        stop(proc)
    return out


def retention(data_dir: Path, info: dict[str, Any]) -> dict[str, float]:
    """Serve with --retention-days 15 on a copy; update latency while it prunes."""
    with tempfile.TemporaryDirectory(prefix="batmon-bench-retention-") as tmp:
        copy = Path(tmp)
        for name in ("batmon.sqlite3", "batmon.sqlite3-wal", "batmon.sqlite3-shm"):
            if (data_dir / name).exists():
                shutil.copy(data_dir / name, copy / name)
        conn = read_only(copy / "batmon.sqlite3")
        cutoff = (int(time.time()) - 15 * DAY) // 3600 * 3600
        before = conn.execute("SELECT count(*) FROM readings WHERE ts < ?", (cutoff,)).fetchone()[0]
        started = time.monotonic()
        proc, url = start_serve(copy, "--retention-days", "15")
        checked = [0.0, 1]

        def pruned() -> bool:  # polled at most every 0.5 s
            if time.monotonic() - checked[0] > 0.5:
                checked[0] = time.monotonic()
                checked[1] = conn.execute("SELECT count(*) FROM (SELECT 1 FROM readings"
                                          " WHERE ts < ? LIMIT 1)", (cutoff,)).fetchone()[0]  # fmt: skip
            return checked[1] == 0

        try:
            with httpx.Client(base_url=url, timeout=120) as http:
                busy = update_latencies(http, pruned, limit=10**7)
                took = time.monotonic() - started
                idle = update_latencies(http, lambda: False, limit=300)
        finally:
            stop(proc)
            conn.close()
    return {"pruned_rows": before, "prune_s": took, "busy_p50_ms": percentile(busy, 0.5),
            "busy_p99_ms": percentile(busy, 0.99), "busy_max_ms": max(busy) * 1000,
            "busy_updates": len(busy), "idle_p99_ms": percentile(idle, 0.99)}  # fmt: skip


# -- the report ----------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Run the history benchmarks; print a table and return the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, default=Path(tempfile.gettempdir()) / "batmon-bench-history")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layouts", action="store_true", help="also compare with the rowid layout")
    parser.add_argument("--retention", action="store_true", help="also prune a copy while serving")
    parser.add_argument("--no-http", action="store_true", help="skip the runs against batmon serve")
    args = parser.parse_args(argv)
    data_dir = args.db / "clustered"
    info = build(data_dir)
    db_path = data_dir / "batmon.sqlite3"
    print(f"database: {info['rows']:,} rows ({info['layout']}), built in {info['build_s']} s")
    results: dict[str, dict[str, float]] = {}

    day_lo = info["t0"] + 15 * DAY
    for name, label, batmon_id, lo, hi in (
        ("raw_day", "raw day, 86,400 rows    ", 1, day_lo, day_lo + DAY),
        ("raw_sparse", "raw month, 86,400 sparse", 2, info["t0"], info["t0"] + DAYS * DAY),
    ):
        raw = results[name] = raw_rows(db_path, batmon_id, lo, hi, args.rounds)
        print(f"{label}   product {raw['product'] * 1000:7.0f} ms   anchor (sqlite3 + orjson)"
              f" {raw['anchor'] * 1000:6.0f} ms   ratio {raw['product'] / raw['anchor']:.2f}")
    grouped = results["buckets"] = buckets(db_path, info, args.rounds)
    print(f"30 days -> 1,000 buckets   product {grouped['product'] * 1000:7.0f} ms   anchor (bare"
          f" GROUP BY)     {grouped['anchor'] * 1000:6.0f} ms   ratio"
          f" {grouped['product'] / grouped['anchor']:.2f}")  # fmt: skip
    lag = results["loop_lag"] = loop_lag(db_path, info)
    print(f"loop lag, 100,000-row read  product p99 {lag['product_p99_ms']:.1f} ms max"
          f" {lag['product_max_ms']:.1f} ms;  seed's way (on the loop) max {lag['seed_max_ms']:.0f} ms")
    if args.layouts:
        lay = results["layouts"] = layouts(db_path, info, args.db / "rowid", args.rounds)
        for case in ("dense", "sparse"):
            print(f"layout, bare {case:6} read  WITHOUT ROWID {lay[f'{case}_clustered'] * 1000:5.0f} ms"
                  f"   rowid + index {lay[f'{case}_rowid'] * 1000:5.0f} ms"
                  f"   ratio {lay[f'{case}_clustered'] / lay[f'{case}_rowid']:.2f}")
        print(f"layout, file size          WITHOUT ROWID {lay['clustered_mb']:.0f} MB"
              f"   rowid + index {lay['rowid_mb']:.0f} MB")
    if not args.no_http:
        http = results["http"] = over_http(data_dir, info, args.rounds)
        print(f"raw day over HTTP          {http['http_s'] * 1000:7.0f} ms   anchor"
              f" {http['anchor_s'] * 1000:6.0f} ms   ratio {http['http_s'] / http['anchor_s']:.2f}")
        print(f"HTTP update latency        idle p50 {http['idle_p50_ms']:.1f}"
              f" p99 {http['idle_p99_ms']:.1f} ms;"
              f" during 100,000-row reads p50 {http['busy_p50_ms']:.1f} p99 {http['busy_p99_ms']:.1f}"
              f" max {http['busy_max_ms']:.0f} ms ({http['busy_updates']:.0f} updates,"
              f" {http['history_reads']:.0f} reads)")  # fmt: skip
    if args.retention:
        ret = results["retention"] = retention(data_dir, info)
        print(f"retention 15 d while serving pruned {ret['pruned_rows']:,.0f} rows in {ret['prune_s']:.0f} s;"
              f" updates meanwhile p50 {ret['busy_p50_ms']:.1f} p99 {ret['busy_p99_ms']:.1f}"
              f" max {ret['busy_max_ms']:.0f} ms ({ret['busy_updates']:.0f}), idle p99"
              f" {ret['idle_p99_ms']:.1f} ms")  # fmt: skip
    return results


if __name__ == "__main__":
    main()
