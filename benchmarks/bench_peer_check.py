"""What catching up with other workers costs a request (docs/SCALE-OUT.md, "Caches across
workers"): one real `batmon serve` on PostgreSQL, in this process, its catch-up switched on and
off between rounds; a client process sends status requests, then updates, one after another over
keep-alive.

Printed per kind and mode: the median time per request seen by the client, and this (the
worker's) process's CPU per request; the check's query alone (one round trip, no loop); and what
the writer's NOTIFY of a group's batmon ids adds to a commit of 500 readings (100 batmons).

    python -m benchmarks.bench_peer_check [--admin-url postgresql://postgres@127.0.0.1/postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import psycopg
from pydantic import SecretStr

from batmon.service import Service
from benchmarks.bench_pg_insert import scratch_database
from bridge.config import ServeOptions
from bridge.store.pg_notify import PgPeerReads

CLIENT = """
import json, sys, time
from benchmarks.http_load import KeepAlive, build_request
port, key, batmon_id, n, path = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
body = {"batmon_id": batmon_id, **({"voltage": 12.5} if path.endswith("update/batmon") else {})}
request = build_request("POST", path, json.dumps(body).encode(), {"X-API-Key": key})
client = KeepAlive(port)
for _ in range(200):
    client.call(request)
started = time.perf_counter()
for _ in range(n):
    status, _ = client.call(request)
    assert status == 200, status
print(time.perf_counter() - started)
"""


PATHS = {"status": "/interface/batmon/status", "update": "/interface/update/batmon"}


async def client_run(port: int, key: str, batmon_id: int, n: int, path: str) -> tuple[float, float]:
    """(seconds per request seen by the client, this process's CPU seconds per request)."""
    cpu = time.process_time()
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", CLIENT, str(port), key, str(batmon_id),
                                                str(n), path, stdout=subprocess.PIPE)  # fmt: skip
    out, _ = await proc.communicate()
    cpu = time.process_time() - cpu
    return float(out) / n, cpu / (n + 200)


async def bench(url: str, requests: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        opts = ServeOptions(data_dir=Path(folder), database_url=SecretStr(url), http_port=0, mqtt_port=0)
        service = Service(opts)
        await service.start()
        try:
            core = service.core
            assert core is not None and core.peers is not None and service.admin_api_key and service.http_port
            peers = core.peers
            user = core.user_for_api_key(service.admin_api_key)
            assert user is not None
            from bridge.models import AddBatmon, Reading

            batmon = core.add_batmon(user, AddBatmon(batmon_name="bench"))
            await asyncio.sleep(0.2)
            await core.ingest_readings(batmon, [Reading.model_validate({"voltage": 12.5})])
            results: dict[str, list[tuple[float, float]]] = {
                f"{kind}, {mode}": [] for kind in PATHS for mode in ("catch-up", "memory only")}
            for _ in range(rounds):
                for name in results:
                    kind, mode = name.split(", ")
                    core.peers = peers if mode == "catch-up" else None
                    results[name].append(await client_run(service.http_port, service.admin_api_key,
                                                          batmon.id, requests, PATHS[kind]))  # fmt: skip
            core.peers = peers
        finally:
            await service.stop()
    print(f"one client, requests one after another, {requests} per round, {rounds} rounds (median):")
    for name, values in results.items():
        wall = statistics.median(v[0] for v in values) * 1e6
        cpu = statistics.median(v[1] for v in values) * 1e6
        print(f"  {name:<20} {wall:7.0f} µs per request   {cpu:6.0f} µs CPU of the worker per request"
              f"   ({', '.join(f'{v[0] * 1e6:.0f}' for v in values)})")


def query_alone(url: str, n: int) -> None:
    reads = PgPeerReads(url)
    version, _ = reads.versions()
    with psycopg.connect(url) as conn:
        batmon_id = conn.execute("SELECT id FROM batmons LIMIT 1").fetchone()
    ids = [batmon_id[0]] if batmon_id else []
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        reads.check(version, ids)
    wall, cpu = (time.perf_counter() - started) / n, (time.process_time() - cpu) / n
    reads.close()
    print(f"the check's query alone (one round trip, {n} times): {wall * 1e6:.0f} µs, {cpu * 1e6:.0f} µs CPU")


def notify_cost(url: str, groups: int) -> None:
    """A group of 500 readings for 100 batmons committed by the store's own write, with and
    without its NOTIFY, alternating (the NOTIFY switched off by emptying the id list)."""
    from bridge.store import pg_store
    from bridge.store.pg_channels import readings_notices
    from bridge.store.pg_store import PostgresStore

    store = PostgresStore.open(url)
    ids = list(range(1, 101))
    user = store.add_user("bench@example.com", "k" * 64, 0.0)
    for batmon_id in ids:
        store.add_batmon({"id": batmon_id, "user_id": user, "name": "b", "type": "t", "token": "x" * 16,
                          "update_period": 60, "created": 0.0})  # fmt: skip
    times: dict[str, list[float]] = {"with NOTIFY": [], "without": []}

    def none(batmon_ids: Sequence[int]) -> list[str]:
        return []

    ts = time.time() - 86_400
    for group in range(groups):
        for mode in times:
            pg_store.readings_notices = readings_notices if mode == "with NOTIFY" else none
            ts += 1
            rows = [(i % 100 + 1, ts + i / 1000, 12.0, 1.0, 12.0, 50.0, "{}", None, None) for i in range(500)]
            updates = [(b, {"voltage": 12.0, "last_reading": ts + 1}) for b in ids]
            started = time.perf_counter()
            store.write(rows, updates)
            if group:  # the first round makes the partition
                times[mode].append(time.perf_counter() - started)
    pg_store.readings_notices = readings_notices
    store.close()
    print(f"a commit of 500 readings and 100 latest values, {groups - 1} each (median):")
    for mode, values in times.items():
        print(f"  {mode:<12} {statistics.median(values) * 1e3:6.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with scratch_database(args.admin_url) as url:
        asyncio.run(bench(url, args.requests, args.rounds))
        query_alone(url, args.requests)
        notify_cost(url, 101)


if __name__ == "__main__":
    main()
