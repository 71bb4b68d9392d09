"""What open dashboards cost the bridge: HTTP ingest of a real `batmon serve` with no
live stream open, then with N browsers' streams open (each read by a thread, one of
them deliberately slow), and the cost of the feed's event handler alone.

    python benchmarks/bench_live.py [--readings 2000] [--streams 16]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx2 as httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge.core import Core  # noqa: E402
from bridge.events import EventBus, ReadingAccepted  # noqa: E402
from bridge.models import AddBatmon  # noqa: E402
from bridge.store.db import Store  # noqa: E402
from http_api.live import LiveFeed  # noqa: E402


def start_serve(data_dir: Path) -> tuple[subprocess.Popen[str], str, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "batmon.cli", "serve", "--data-dir", str(data_dir),
         "--http-port", "0", "--mqtt-port", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    url = key = ""
    assert proc.stdout is not None
    for line in proc.stdout:
        if m := re.match(r"HTTP\s+(\S+)", line):
            url = m.group(1)
        elif m := re.search(r"api_key \(shown once\): (\S+)", line):
            key = m.group(1)
        elif line.startswith("ready"):
            return proc, url, key
    raise SystemExit("serve did not start")


def reader(url: str, key: str, stop: threading.Event, slow: bool, counts: list[int]) -> None:
    """A browser tab: one stream, read until told to stop (a slow one sleeps per chunk)."""
    with httpx.Client(base_url=url, timeout=None) as http:
        http.post("/interface/login", json={"api_key": key})
        with http.stream("GET", "/events") as response:
            for _ in response.iter_raw():
                counts.append(1)
                if slow:
                    time.sleep(0.5)
                if stop.is_set():
                    return


def ingest_rate(url: str, key: str, batmon_id: int, readings: int) -> float:
    with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=30) as http:
        started = time.perf_counter()
        for i in range(readings):
            r = http.post("/interface/update/batmon", json={"batmon_id": batmon_id, "voltage": 12 + i % 10})
            assert r.status_code == 200, r.text
        return readings / (time.perf_counter() - started)


def handler_cost(streams: int, events: int = 50_000) -> float:
    """Microseconds the feed adds to one event, with ``streams`` open streams of its owner."""

    async def run() -> float:
        with tempfile.TemporaryDirectory() as tmp:
            store = Store.open(Path(tmp) / "b.sqlite3")
            core = Core(store, EventBus()).load()
            user, _ = core.create_user("u@example.org")
            batmon = core.add_batmon(user, AddBatmon(batmon_name="b"))
            feed = LiveFeed(core, max_streams_per_user=streams + 1)
            await feed.start()
            for _ in range(streams):
                feed.open(user.id)
            event = ReadingAccepted(batmon, {"voltage": 1.0}, 0.0, True)
            started = time.perf_counter()
            for _ in range(events):
                core.bus.emit(event)
            elapsed = time.perf_counter() - started
            await feed.stop()
            store.close()
            return elapsed / events * 1e6

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--readings", type=int, default=2000)
    parser.add_argument("--streams", type=int, default=16, help="at most 16: one user's limit")
    args = parser.parse_args()

    for streams in (0, 1, 100):
        print(f"feed handler, {streams:3d} open streams: {handler_cost(streams):.2f} µs per event")

    with tempfile.TemporaryDirectory() as tmp:
        proc, url, key = start_serve(Path(tmp) / "data")
        try:
            with httpx.Client(base_url=url, headers={"X-API-Key": key}) as http:
                batmon_id = http.post("/interface/add/batmon",
                                      json={"batmon_name": "bench"}).json()["success"]["batmon_id"]
            ingest_rate(url, key, batmon_id, 200)  # warm up
            alone = ingest_rate(url, key, batmon_id, args.readings)
            stop, counts = threading.Event(), []
            threads = []
            for i in range(args.streams):
                threads.append(threading.Thread(
                    target=reader, args=(url, key, stop, i == 0, counts), daemon=True))
            for t in threads:
                t.start()
            time.sleep(1.0)
            watched = ingest_rate(url, key, batmon_id, args.readings)
            stop.set()
        finally:
            proc.terminate()
            proc.wait(15)
    print(f"HTTP ingest, no stream open:      {alone:7.0f} readings/s")
    print(f"HTTP ingest, {args.streams} streams open:      {watched:7.0f} readings/s"
          f"  (ratio {watched / alone:.2f}; {len(counts)} chunks read)")


if __name__ == "__main__":
    main()
