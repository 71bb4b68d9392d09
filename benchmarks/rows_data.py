"""Rows over big data: history of one batmon's day out of 5,000,000 rows, ingest latency
while a 100,000-row history is served, and starting up with 10,000 batmons.

Big databases are made fast: `batmon serve` creates the schema, the admin user and a few
batmons through its API, then rows are bulk-inserted into its file (through
bridge.store.db.Store.open, so the schema is the product's) while it is stopped.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.http_load import HealthPoller, timed_get
from benchmarks.mqtt_load import Device, paced_latency, update_topic, voltage_key
from benchmarks.procs import BenchError, Serve, cpu_seconds, rss_mb
from benchmarks.report import Figure, Line, p99
from benchmarks.runner import Context, alternate, running_product

DAY = 86_400
COLUMNS = "batmon_id, ts, voltage, current, power, soc"


@dataclass
class HistoryServer:
    """`batmon serve` on a database of ``per_batmon`` readings a second for each batmon."""

    serve: Serve
    batmons: list[tuple[int, str]]
    admin_key: str
    t0: int  # ts of the first reading of every batmon
    per_batmon: int

    def history_path(self, batmon: tuple[int, str], first: int, last: int) -> str:
        return (f"/interface/batmon/history?batmon_id={batmon[0]}&batmon_token={batmon[1]}"
                f"&min_epoch_tm_sec={first}&max_epoch_tm_sec={last}")  # fmt: skip


def fill_readings(db_path: Path, batmon_ids: list[int], per_batmon: int, t0: int) -> None:
    """Readings at 1 Hz for every batmon, interleaved in time as devices would send them."""
    from bridge.store.db import Store

    store = Store.open(db_path)
    conn = store.db.conn
    try:
        conn.execute("PRAGMA synchronous=OFF")  # a benchmark fixture, rebuilt every run
        # A required column we do not know (say a sequence number in a new primary key)
        # gets a value unique per row, so the fill survives schema changes of that kind.
        extra = [name for _, name, _, notnull, default, pk in conn.execute("PRAGMA table_info(readings)")
                 if notnull and default is None and name not in COLUMNS.split(", ")]  # fmt: skip
        columns = ", ".join([COLUMNS, *extra])
        marks = ", ".join("?" * (6 + len(extra)))
        chunk = 200_000 // len(batmon_ids) + 1
        for start in range(0, per_batmon, chunk):
            rows = [(b, t0 + k, 12 + (k % 100) / 100, (k % 60) / 4 - 7.5, (k % 90) * 1.5 - 60, k % 101,
                     *[k * len(batmon_ids) + j] * len(extra))
                    for k in range(start, min(per_batmon, start + chunk))
                    for j, b in enumerate(batmon_ids)]  # fmt: skip
            with conn:
                conn.executemany(f"INSERT INTO readings ({columns}) VALUES ({marks})", rows)
    finally:
        store.close()


def history_server(ctx: Context) -> HistoryServer:
    """The 5 M-row server, built once per run and shared by the history rows."""
    if "history" in ctx.shared:
        return ctx.shared["history"]
    folder = ctx.folder_for("history")
    batmons_n, per = ctx.sized(50, 5), ctx.sized(100_000, 2_000)
    with running_product(folder) as product:
        batmons = product.add_batmons(batmons_n)
        admin_key, data_dir, db_path = product.serve.admin_key, product.serve.data_dir, product.serve.db_path
    t0 = int(time.time()) - per - 3600
    started = time.monotonic()
    fill_readings(db_path, [b[0] for b in batmons], per, t0)
    ctx.shared["history_build_s"] = time.monotonic() - started
    serve = Serve(data_dir).start()
    ctx.cleanup.callback(serve.stop)
    server = HistoryServer(serve, batmons, admin_key, t0, per)
    ctx.shared["history"] = server
    return server


def history(ctx: Context) -> list[Line]:
    """One batmon's day over HTTP vs a bare sqlite3 query + orjson of the same rows."""
    import orjson

    server = history_server(ctx)
    batmon = server.batmons[0]
    day = min(DAY, server.per_batmon - 1000)
    first = server.t0 + 1000
    path = server.history_path(batmon, first, first + day - 1)
    db = sqlite3.connect(f"file:{server.serve.db_path}?mode=ro", uri=True)

    checked: list[bool] = []

    def product() -> float:
        seconds, body = timed_get(server.serve.http_port, path)
        if not checked:  # once: parsing 13 MB is not what is timed
            answer = json.loads(body)
            answer = answer.get("success", answer) if isinstance(answer, dict) else answer
            if len(answer[0]["data"]) != day:
                raise BenchError(f"history answered {len(answer[0]['data'])} rows, expected {day}")
            checked.append(True)
        return seconds * 1000

    def anchor() -> float:
        started = time.monotonic()
        rows = db.execute("SELECT ts, voltage, current, power, soc, details FROM readings"
                          " WHERE batmon_id = ? AND ts >= ? AND ts < ? ORDER BY ts",
                          (batmon[0], first, first + day)).fetchall()  # fmt: skip
        orjson.dumps(rows)
        elapsed = (time.monotonic() - started) * 1000
        if len(rows) != day:
            raise BenchError(f"anchor query found {len(rows)} rows, expected {day}")
        return elapsed

    try:
        got_p, got_a = alternate(ctx.reps, product, anchor)
    finally:
        db.close()
    total = len(server.batmons) * server.per_batmon
    return [Line("history", f"history, one batmon's day ({day:,} of {total:,} rows)",
                 Figure("batmon serve, GET until the last byte", "ms", got_p),
                 Figure("bare sqlite3 query + orjson.dumps of the rows", "ms", got_a),
                 goal="≤ 1.3")]  # fmt: skip


def history_lag(ctx: Context) -> list[Line]:
    """Ingest latency and /healthz while the largest allowed history request is served,
    against the same measurements in the same run before the request starts."""
    server = history_server(ctx)
    big = server.batmons[1]
    devices_from = server.batmons[2:12]
    devices = [Device(update_topic(i, t), str(i), t) for i, t in devices_from]
    states = [f"batmon/{i}/state" for i, _ in devices_from]
    path = server.history_path(big, server.t0, server.t0 + server.per_batmon)
    lead = ctx.seconds(1.5, 0.5)
    figures: dict[str, list[float]] = {k: [] for k in ("p99", "max", "idle_p99", "idle_max", "health_max",
                                                       "health_idle", "request")}  # fmt: skip
    for rep in range(ctx.reps):
        window: list[float] = []

        def big_request(window: list[float] = window) -> None:
            time.sleep(lead)
            window.append(time.monotonic())
            timed_get(server.serve.http_port, path)
            window.append(time.monotonic())

        with HealthPoller(server.serve.http_port, interval=0.02) as health:
            run = paced_latency(server.serve.mqtt_port, devices, states,
                                voltage_key("batmon_voltage"), ctx.seconds(200, 50), lead,
                                watcher_auth=("admin@localhost", server.admin_key), during=big_request,
                                first_seq=(rep + 1) * 10_000_000 + 5_000_000)  # fmt: skip
        if len(window) != 2:
            raise BenchError("the history request did not finish")
        start, end = window
        during, before = run.overlapping(start, end), run.done_before(start)
        figures["p99"].append(p99(during))
        figures["max"].append(max(during, default=float("nan")))
        figures["idle_p99"].append(p99(before))
        figures["idle_max"].append(max(before, default=float("nan")))
        figures["health_max"].append(max(health.overlapping(start, end), default=float("nan")))
        figures["health_idle"].append(p99(health.done_before(start)))
        figures["request"].append(end - start)
    rows = server.per_batmon
    request_s = statistics.median(figures["request"])
    what = f"during a {rows:,}-row history GET ({request_s:.1f} s)"
    label = "before the request, same run"
    return [
        Line("history-lag", f"MQTT ingest publish → state p99 {what}",
             Figure("batmon serve", "ms", figures["p99"]), Figure(label, "ms", figures["idle_p99"]),
             goal="≤ 100 ms"),
        Line("history-lag", f"MQTT ingest publish → state max {what}",
             Figure("batmon serve", "ms", figures["max"]), Figure(label, "ms", figures["idle_max"])),
        Line("history-lag", f"/healthz max {what}", Figure("batmon serve", "ms", figures["health_max"]),
             Figure("/healthz p99 " + label, "ms", figures["health_idle"])),
    ]  # fmt: skip


def _make_batmons(db_path: Path, n: int) -> None:
    """n batmons of the admin user, straight into the product's batmons table."""
    from bridge.store.db import Store

    store = Store.open(db_path)
    try:
        user_id = store.db.execute("SELECT id FROM users ORDER BY id LIMIT 1").fetchone()[0]
        now = time.time()
        ids = set()
        while len(ids) < n:
            ids.add(secrets.randbelow(2**53 - 1) + 1)
        rows = [{"id": i, "user_id": user_id, "name": f"bench {k}", "type": "generic",
                 "token": secrets.token_urlsafe(16), "update_period": 3600, "created": now}
                for k, i in enumerate(sorted(ids))]  # fmt: skip
        with store.db.atomic():
            store.db["batmons"].insert_all(rows, batch_size=1000)
    finally:
        store.close()


def _boot(data_dir: Path, timeout: float) -> tuple[float, float, float]:
    """(start → ready s, ready → settled s, RSS MB when settled) of one `batmon serve`.
    Settled: the first moment after which it uses under 10 % of a core for a whole second."""
    spawned = time.monotonic()
    serve = Serve(data_dir).start()
    try:
        samples: list[tuple[float, float]] = []
        while True:
            samples.append((time.monotonic(), cpu_seconds(serve.pid)))
            if len(samples) > 4:
                (t_i, c_i), (t_j, c_j) = samples[-5], samples[-1]
                if c_j - c_i < 0.1 * (t_j - t_i):
                    return serve.ready_at - spawned, max(0.0, t_i - serve.ready_at), rss_mb(serve.pid)
            if samples[-1][0] - serve.ready_at > timeout:
                raise BenchError(f"still busy {timeout:.0f} s after ready")
            time.sleep(0.25)
    finally:
        serve.stop()


def batmons_10k(ctx: Context) -> list[Line]:
    """Memory and start-up with 10,000 batmons, against the same with none."""
    folder = ctx.folder_for("batmons-10k")
    n = ctx.sized(10_000, 300)
    dirs = {}
    for name, count in (("many", n), ("none", 0)):
        with running_product(folder / name) as product:
            dirs[name] = (product.serve.data_dir, product.serve.db_path)
        if count:
            _make_batmons(dirs[name][1], count)
    timeout = ctx.seconds(120, 30)
    got_p, got_a = alternate(ctx.reps, lambda: _boot(dirs["many"][0], timeout),
                             lambda: _boot(dirs["none"][0], timeout))  # fmt: skip
    label = f"{n:,} batmons"
    empty = "the same with no batmon"
    return [
        Line("batmons-10k", f"{label}: RSS when settled", Figure("batmon serve", "MB", [r[2] for r in got_p]),
             Figure(empty, "MB", [r[2] for r in got_a]), goal="≤ 200 MB"),
        Line("batmons-10k", f"{label}: ready → settled (CPU < 10 % for 1 s)",
             Figure("batmon serve", "s", [r[1] for r in got_p]), Figure(empty, "s", [r[1] for r in got_a]),
             goal="≤ 5 s", compare=False),
        Line("batmons-10k", f"{label}: start → ready", Figure("batmon serve", "s", [r[0] for r in got_p]),
             Figure(empty, "s", [r[0] for r in got_a])),
    ]  # fmt: skip
