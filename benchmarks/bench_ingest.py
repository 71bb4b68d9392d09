"""Ingest throughput and latency of a real `batmon serve` (embedded broker, SQLite).

Prints readings/s over HTTP (one client, and several in parallel), over MQTT QoS 1
(several devices), the MQTT/HTTP ratio, and publish-to-visible latency percentiles.

    python benchmarks/bench_ingest.py [--readings 3000] [--devices 10]
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parent.parent


def unthrottled_broker_config(folder: Path) -> Path:
    """broker.yaml without the per-device message rate cap: this measures ingest, and a
    device here sends far faster than the default 50 messages/s a real one may."""
    config = yaml.safe_load((ROOT / "broker.yaml").read_text())
    config["limits"] = {**config.get("limits", {}), "messages_per_second": 1e9, "message_burst": 10**9}
    path = folder / "bench-broker.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_serve(data_dir: Path) -> tuple[subprocess.Popen[str], str, int, str]:
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge.cli", "serve", "--data-dir", str(data_dir),
         "--http-port", "0", "--mqtt-port", "0",
         "--broker-config", str(unthrottled_broker_config(data_dir))],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    http_url = key = ""
    mqtt_port = 0
    assert proc.stdout is not None
    for line in proc.stdout:
        if m := re.match(r"HTTP\s+(\S+)", line):
            http_url = m.group(1)
        elif m := re.match(r"MQTT\s+mqtt://[^:]+:(\d+)", line):
            mqtt_port = int(m.group(1))
        elif m := re.search(r"shown once\): (\S+)", line):
            key = m.group(1)
        elif line.startswith("ready"):
            return proc, http_url, mqtt_port, key
    raise SystemExit("batmon serve did not start")


def add_batmons(http: httpx.Client, key: str, n: int) -> list[tuple[int, str]]:
    out = []
    for i in range(n):
        s = http.post("/interface/add/batmon", headers={"X-API-Key": key},
                      data={"batmon_name": f"bench {i}"}).json()["success"]  # fmt: skip
        out.append((s["batmon_id"], s["batmon_token"]))
    return out


def readings_in_db(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM readings").fetchone()[0])


def http_rate(url: str, devices: list[tuple[int, str]], n: int, workers: int) -> float:
    def send(chunk: list[int]) -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            for i in chunk:
                batmon_id, token = devices[i % len(devices)]
                r = c.post("/interface/update/batmon", json={
                    "batmon_id": batmon_id, "batmon_token": token,
                    "voltage": 12 + i % 10 / 10, "soc": i % 100})  # fmt: skip
                assert r.status_code == 200, r.text

    chunks = [list(range(w, n, workers)) for w in range(workers)]
    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(send, chunks))
    return n / (time.perf_counter() - started)


def mqtt_rate(port: int, devices: list[tuple[int, str]], n: int, db: Path) -> float:
    before = readings_in_db(db)
    clients = []
    for batmon_id, token in devices:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        c.username_pw_set(str(batmon_id), token)
        c.max_inflight_messages_set(100)
        c.connect("127.0.0.1", port)
        c.loop_start()
        clients.append((c, batmon_id, token))
    time.sleep(0.5)
    started = time.perf_counter()
    per_device = n // len(clients)
    infos = []
    for i in range(per_device):
        for c, batmon_id, token in clients:
            payload = json.dumps({"voltage": 12 + i % 10 / 10, "soc": i % 100})
            infos.append(c.publish(f"batmon/{batmon_id}/{token}/update", payload, qos=1))
    total = per_device * len(clients)
    while readings_in_db(db) - before < total:
        time.sleep(0.01)
    elapsed = time.perf_counter() - started
    for c, _, _ in clients:
        c.disconnect()
        c.loop_stop()
    return total / elapsed


def latency(url: str, port: int, key: str, device: tuple[int, str], samples: int) -> list[float]:
    batmon_id, token = device
    got = threading.Event()
    results = []
    watcher = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    watcher.username_pw_set("admin@localhost", key)
    expected: dict[str, float] = {}
    watcher.on_message = lambda cl, u, m: (
        got.set() if json.loads(m.payload).get("batmon_soc") == expected.get("soc") else None)
    watcher.connect("127.0.0.1", port)
    watcher.loop_start()
    watcher.subscribe(f"batmon/{batmon_id}/state", qos=1)
    device_client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    device_client.username_pw_set(str(batmon_id), token)
    device_client.connect("127.0.0.1", port)
    device_client.loop_start()
    time.sleep(0.5)
    for i in range(samples):
        got.clear()
        expected["soc"] = float(i % 100) + 0.5
        t0 = time.perf_counter()
        device_client.publish(f"batmon/{batmon_id}/{token}/update",
                              json.dumps({"soc": expected["soc"]}), qos=1)
        if got.wait(5):
            results.append((time.perf_counter() - t0) * 1000)
    for cl in (watcher, device_client):
        cl.disconnect()
        cl.loop_stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--readings", type=int, default=3000)
    parser.add_argument("--devices", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        proc, url, port, key = start_serve(data)
        try:
            with httpx.Client(base_url=url, timeout=30) as http:
                devices = add_batmons(http, key, args.devices)
            http_1 = http_rate(url, devices, args.readings, 1)
            http_8 = http_rate(url, devices, args.readings, 8)
            mqtt_n = mqtt_rate(port, devices, args.readings, data / "batmon.sqlite3")
            lat = latency(url, port, key, devices[0], 200)
        finally:
            proc.terminate()
            proc.wait(15)
    print(f"readings per run            {args.readings} over {args.devices} batmons")
    print(f"HTTP, 1 client              {http_1:8.0f} readings/s")
    print(f"HTTP, 8 clients             {http_8:8.0f} readings/s")
    print(f"MQTT QoS1, {args.devices} devices        {mqtt_n:8.0f} readings/s")
    print(f"ratio MQTT / HTTP(8)        {mqtt_n / http_8:8.2f}")
    if lat:
        q = statistics.quantiles(lat, n=100)
        print(f"MQTT publish -> state topic  p50 {statistics.median(lat):.1f} ms,"
              f" p95 {q[94]:.1f} ms, max {max(lat):.1f} ms ({len(lat)} samples)")


if __name__ == "__main__":
    main()
