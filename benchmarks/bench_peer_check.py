"""What catching up with other workers costs a status request (docs/SCALE-OUT.md, "Caches across
workers"): one real `batmon serve` on PostgreSQL, in this process, its catch-up switched on and
off between rounds; a client process sends status requests one after another over keep-alive.

Printed per mode: the median time per status request seen by the client, and this (the
worker's) process's CPU per request; and the check's query alone (one round trip, no loop).

    python -m benchmarks.bench_peer_check [--admin-url postgresql://postgres@127.0.0.1/postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from pydantic import SecretStr

from batmon.service import Service
from bridge.config import ServeOptions
from bridge.store.pg_notify import PgPeerReads

CLIENT = """
import json, sys, time
from benchmarks.http_load import KeepAlive, build_request
port, key, batmon_id, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
request = build_request("POST", "/interface/batmon/status", json.dumps({"batmon_id": batmon_id}).encode(),
                        {"X-API-Key": key})
client = KeepAlive(port)
for _ in range(200):
    client.call(request)
started = time.perf_counter()
for _ in range(n):
    status, _ = client.call(request)
    assert status == 200, status
print(time.perf_counter() - started)
"""


async def client_run(port: int, key: str, batmon_id: int, n: int) -> tuple[float, float]:
    """(seconds per request seen by the client, this process's CPU seconds per request)."""
    cpu = time.process_time()
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", CLIENT, str(port), key, str(batmon_id),
                                                str(n), stdout=subprocess.PIPE)  # fmt: skip
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
            results: dict[str, list[tuple[float, float]]] = {"catch-up": [], "memory only": []}
            for _ in range(rounds):
                for mode in results:
                    core.peers = peers if mode == "catch-up" else None
                    results[mode].append(await client_run(service.http_port, service.admin_api_key,
                                                          batmon.id, requests))  # fmt: skip
            core.peers = peers
        finally:
            await service.stop()
    print(f"status requests, one client, {requests} per round, {rounds} rounds (median):")
    for mode, values in results.items():
        wall = statistics.median(v[0] for v in values) * 1e6
        cpu = statistics.median(v[1] for v in values) * 1e6
        print(f"  {mode:<12} {wall:7.0f} µs per request   {cpu:6.0f} µs CPU of the worker per request"
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    name = f"batmon_bench_{secrets.token_hex(4)}"
    with psycopg.connect(args.admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    url = args.admin_url.rsplit("/", 1)[0] + "/" + name
    try:
        asyncio.run(bench(url, args.requests, args.rounds))
        query_alone(url, args.requests)
    finally:
        with psycopg.connect(args.admin_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


if __name__ == "__main__":
    main()
