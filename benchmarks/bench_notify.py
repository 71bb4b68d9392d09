"""Does a stuck notification target slow ingestion, and how fast does the outbox drain?

Prints readings/s ingested with an alarm firing on every reading, first with no
targets (notices recorded as skipped) and then with a target that never answers,
and their ratio; then notices/s the outbox delivers to a fast local HTTP sink.

    python benchmarks/bench_notify.py [--readings 2000] [--notices 1000] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bridge.core import Batmon, Core
from bridge.events import EventBus
from bridge.extensions.alarms import AlarmEvaluator
from bridge.extensions.notifier import Notifier, set_targets
from bridge.models import AddAlarm, AddBatmon, Reading
from bridge.store.db import Store
from bridge.store.outbox import Outbox


class Sink:
    """A local HTTP endpoint that answers 200 at once, or holds every request."""

    def __init__(self, hang: bool) -> None:
        self.release = threading.Event()
        self.count = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if hang:
                    sink.release.wait(60)
                    return
                sink.count += 1
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"json://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def setup(folder: Path, email_url: str, repeat_delay: int = 0) -> tuple[Core, Batmon]:
    """A core on a fresh file with one batmon whose alarm fires on every reading."""
    core = Core(Store.open(folder / "bench.sqlite3"), EventBus()).load()
    user, _ = core.create_user("bench@example.org")
    set_targets(core.store, user.id, {"email_url": email_url})
    batmon = core.add_batmon(user, AddBatmon(batmon_name="Bench"))
    core.add_alarm(batmon, AddAlarm(
        batmon_id=batmon.id, alarm_name="Always", alarm_metric="voltage",
        alarm_condition=">=", alarm_threshold_value=0, alarm_repeat_delay=repeat_delay,
    ))  # fmt: skip
    return core, batmon


async def ingest_rate(email_url: str, readings: int, concurrency: int) -> float:
    """Readings/s through the one ingest path with alarms and the notifier running."""
    with tempfile.TemporaryDirectory() as folder:
        core, batmon = setup(Path(folder), email_url)
        evaluator = AlarmEvaluator(core)
        await evaluator.start()
        notifier = Notifier(core, concurrency=concurrency)
        await notifier.start()
        started = time.perf_counter()
        for _ in range(readings):
            await core.ingest_readings(batmon, [Reading(batmon_voltage=12)])
            await asyncio.sleep(0)  # let the worker run, as a server would
        elapsed = time.perf_counter() - started
        await notifier.stop()
        await evaluator.stop()
        queued = sum(Outbox(core.store).count_by_state().values())
        assert queued == readings, f"{queued} notices for {readings} readings"
        core.store.close()
        return readings / elapsed


async def send_rate(url: str, notices: int, concurrency: int) -> float:
    """Notices/s the outbox delivers once they are queued."""
    with tempfile.TemporaryDirectory() as folder:
        core, batmon = setup(Path(folder), url)
        notifier = Notifier(core, concurrency=concurrency)
        for i in range(notices):
            notifier.enqueue(batmon, "triggered", f"bench {i}", "body")
        outbox = Outbox(core.store)
        started = time.perf_counter()
        await notifier.start()
        while outbox.count_by_state().get("sent", 0) < notices:
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
        await notifier.stop()
        core.store.close()
        return notices / elapsed


async def main(args: argparse.Namespace) -> None:
    no_target = await ingest_rate("", args.readings, args.concurrency)
    print(f"ingest, alarm firing on each reading, no targets:      {no_target:8.0f} readings/s")
    hanging = Sink(hang=True)
    try:
        stuck = await ingest_rate(hanging.url, args.readings, args.concurrency)
    finally:
        hanging.close()
    print(f"ingest, alarm firing on each reading, hanging target:  {stuck:8.0f} readings/s")
    print(f"ratio hanging / no targets:                            {stuck / no_target:8.2f}")
    fast = Sink(hang=False)
    try:
        rate = await send_rate(fast.url, args.notices, args.concurrency)
    finally:
        fast.close()
    print(f"outbox delivery to a fast local sink (concurrency {args.concurrency}): "
          f"{rate:8.0f} notices/s")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=2000)
    parser.add_argument("--notices", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    asyncio.run(main(parser.parse_args()))
