"""What /metrics costs: one scrape (rendered on the event loop) with many batmons and a
full outbox, with and without per-batmon gauges; and the counter per accepted reading.

    python benchmarks/bench_metrics.py [--batmons 1000] [--notices 100000] [--events 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bridge.core import Core
from bridge.events import EventBus, ReadingAccepted
from bridge.extensions.metrics import Metrics
from bridge.models import AddBatmon
from bridge.store.db import Store
from bridge.store.outbox import Outbox


def scrape_ms(metrics: Metrics, runs: int = 20) -> tuple[float, int]:
    """Median milliseconds of one render, and the body's size in bytes."""
    times, size = [], 0
    for _ in range(runs):
        started = time.perf_counter()
        body, _ = metrics.render("")
        times.append((time.perf_counter() - started) * 1000)
        size = len(body)
    return statistics.median(times), size


def emit_us(bus: EventBus, event: ReadingAccepted, count: int) -> float:
    """Microseconds per emit of ``event`` on ``bus``."""
    started = time.perf_counter()
    for _ in range(count):
        bus.emit(event)
    return (time.perf_counter() - started) / count * 1e6


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(Path(tmp) / "batmon.sqlite3")
        core = Core(store, EventBus()).load()
        user, _ = core.create_user("bench@example.org")
        for n in range(args.batmons):
            core.add_batmon(user, AddBatmon.model_validate({"batmon_name": f"bank {n}"}))
        for batmon in list(core.batmons.values())[: args.batmons // 2]:
            batmon.last_reading, batmon.voltage, batmon.status = time.time(), 12.5, "Online"
        some = next(iter(core.batmons.values()))
        rows = [{"user_id": user.id, "batmon_id": some.id, "channel": "email", "kind": "offline",
                 "title": "t", "body": "b", "state": "sent", "created": time.time()}
                for _ in range(args.notices)]  # fmt: skip
        Outbox(store).enqueue(rows)

        for per_batmon in (False, True):
            metrics = Metrics(core, per_batmon=per_batmon)
            ms, size = scrape_ms(metrics)
            print(f"scrape, {args.batmons} batmons, {args.notices} notices, per-batmon {per_batmon}:"
                  f" {ms:.1f} ms median, {size / 1024:.0f} KiB")  # fmt: skip

        event = ReadingAccepted(some, {"voltage": 12.0}, time.time(), True)
        bare = emit_us(EventBus(), event, args.events)
        metrics = Metrics(core)
        await metrics.start()
        counted = emit_us(core.bus, event, args.events)
        await metrics.stop()
        print(f"ReadingAccepted emit: {bare:.2f} us without subscribers, {counted:.2f} us"
              f" with the metrics counter")  # fmt: skip
        store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batmons", type=int, default=1000)
    parser.add_argument("--notices", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=100_000)
    asyncio.run(main(parser.parse_args()))
