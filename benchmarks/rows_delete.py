"""Deleting a batmon with a long history: the service keeps answering meanwhile.

`batmon serve` makes the admin user and a few batmons through its API; then, while it is
stopped, each batmon to be deleted gets ``2,000,000`` readings (1 Hz, bulk-inserted through
the product's own schema, as the history rows do). Served again, one delete per repetition:
/healthz and another batmon's status are polled every 20 ms on keep-alive connections from
a second before the delete until its readings are gone from the file, and the delete
request itself is timed.
"""

from __future__ import annotations

import json
import sqlite3
import time

from benchmarks.http_load import HealthPoller, KeepAlive, build_request
from benchmarks.procs import BenchError, Serve
from benchmarks.report import Figure, Line, p99
from benchmarks.rows_data import fill_readings
from benchmarks.runner import Context, running_product


def delete(ctx: Context) -> list[Line]:
    """/healthz and a neighbour's status while a batmon with 2 M readings is deleted."""
    folder = ctx.folder_for("delete")
    per = ctx.sized(2_000_000, 20_000)
    with running_product(folder) as product:
        neighbour, *victims = product.add_batmons(ctx.reps + 1)
        data_dir, db_path, admin_key = product.serve.data_dir, product.serve.db_path, product.serve.admin_key
    fill_readings(db_path, [v[0] for v in victims], per, int(time.time()) - per - 3600)
    serve = Serve(data_dir).start()
    ctx.cleanup.callback(serve.stop)
    status_path = f"/interface/batmon/status?batmon_id={neighbour[0]}&batmon_token={neighbour[1]}"
    lead = ctx.seconds(1.0, 0.3)
    figures: dict[str, list[float]] = {k: [] for k in ("health", "health_idle", "status", "status_idle",
                                                       "answer", "gone")}  # fmt: skip
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)

    def has_readings(batmon_id: int) -> bool:
        found = db.execute("SELECT 1 FROM readings WHERE batmon_id = ? LIMIT 1", (batmon_id,)).fetchone()
        return found is not None

    try:
        for victim in victims:
            if not has_readings(victim[0]):
                raise BenchError("the batmon to delete has no readings")
            with (HealthPoller(serve.http_port, 0.02) as health,
                  HealthPoller(serve.http_port, 0.02, path=status_path) as status):  # fmt: skip
                time.sleep(lead)
                client = KeepAlive(serve.http_port)
                body = json.dumps({"batmon_id": victim[0]}).encode()
                start = time.monotonic()
                code, answer = client.call(build_request("POST", "/interface/delete/batmon", body,
                                                         {"X-API-Key": admin_key}))  # fmt: skip
                answered = time.monotonic()
                client.close()
                if code != 200:
                    raise BenchError(f"delete: HTTP {code}: {answer[:200]!r}")
                deadline = answered + ctx.seconds(600, 60)
                while has_readings(victim[0]):
                    if time.monotonic() > deadline:
                        raise BenchError("the deleted batmon's readings are still there")
                    time.sleep(0.05)
                end = time.monotonic()
                time.sleep(0.1)  # the polls under way at the end finish
            figures["health"].append(p99(health.overlapping(start, end)))
            figures["health_idle"].append(p99(health.done_before(start)))
            figures["status"].append(p99(status.overlapping(start, end)))
            figures["status_idle"].append(p99(status.done_before(start)))
            figures["answer"].append((answered - start) * 1000)
            figures["gone"].append(end - start)
    finally:
        db.close()
    what = f"while a batmon with {per:,} readings is deleted (until they are gone)"
    idle = "p99 before the delete, same run"
    return [
        Line("delete", f"/healthz p99 {what}", Figure("batmon serve", "ms", figures["health"]),
             Figure(idle, "ms", figures["health_idle"]), goal="≤ 50 ms", compare=False),
        Line("delete", f"another batmon's status p99 {what}", Figure("batmon serve", "ms", figures["status"]),
             Figure(idle, "ms", figures["status_idle"]), goal="≤ 50 ms", compare=False),
        Line("delete", f"the delete request answered ({per:,} readings)",
             Figure("batmon serve", "ms", figures["answer"]),
             Figure("its readings gone from the file after", "s", figures["gone"]), goal="≤ 1 s",
             compare=False),
    ]  # fmt: skip
