"""MQTT-to-database peers of the external-broker rows, each in its own process:

- ``batched``: a paho subscriber that commits 500 rows per transaction (WAL,
  synchronous=NORMAL), or what it has when the socket goes quiet;
- ``naive``: the obvious peer, sqlite-utils ``insert`` (one commit) per message, on
  sqlite-utils' default database settings;
- ``pg``: the batched sink on PostgreSQL (``--db`` is then a URL): 500 rows per
  transaction into the PostgreSQL store's own readings table, as the store writes them
  (COPY into a temporary table, then INSERT ... ON CONFLICT DO NOTHING, the store's SQL).

Both subscribe QoS 1 to ``batmon/+/+/update`` as MQTT 3.1.1 clients with paho's
automatic acks (PUBACK on receipt, before the commit). Each prints ``subscribed`` once,
then ``<rows> <CLOCK_MONOTONIC>`` whenever its row count changed (at most every 20 ms,
and at once when it goes idle), so the harness times the last row exactly.

    python -m benchmarks.sinks batched|naive --port P --db FILE
    python -m benchmarks.sinks pg --port P --db postgresql://...
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from sqlite_utils import Database

BATCH = 500
TOPIC = "batmon/+/+/update"
COLUMNS = ("voltage", "current", "power", "soc")
INSERT = ("INSERT INTO readings (batmon_id, ts, voltage, current, power, soc)"
          " VALUES (:batmon_id, :ts, :voltage, :current, :power, :soc)")


def row_of(msg: mqtt.MQTTMessage) -> dict[str, Any]:
    """One readings row from an update message: the batmon id from the topic, values from JSON."""
    values = json.loads(msg.payload)
    row = {"batmon_id": int(msg.topic.split("/")[1]), "ts": time.time()}
    row.update({c: values.get(c, values.get(f"batmon_{c}")) for c in COLUMNS})
    return row


def sqlite_batched(db_path: str) -> Callable[[list[dict[str, Any]]], None]:
    """The batched sink's commit of a group into SQLite."""
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE IF NOT EXISTS readings (id INTEGER PRIMARY KEY, batmon_id INTEGER,"
                 " ts REAL, voltage REAL, current REAL, power REAL, soc REAL)")  # fmt: skip
    conn.commit()

    def commit(rows: list[dict[str, Any]]) -> None:
        with conn:
            conn.executemany(INSERT, rows)

    return commit


def pg_batched(url: str) -> Callable[[list[dict[str, Any]]], None]:
    """The batched sink's commit of a group into PostgreSQL, by the store's own SQL (its
    schema, made by migrating; this month's and next month's partitions made up front)."""
    import psycopg  # only this sink needs it

    from bridge.store.pg_store import COPY_STAGING, INSERT_STAGED, STAGING, PostgresStore

    store = PostgresStore.open(url)
    store._ensure_partitions([time.time(), time.time() + 31 * 86400])
    store.close()
    conn = psycopg.connect(url)
    conn.execute(STAGING)
    conn.commit()

    def commit(rows: list[dict[str, Any]]) -> None:
        with conn.transaction(), conn.cursor() as cur:
            with cur.copy(COPY_STAGING) as copy:
                for n, r in enumerate(rows):
                    copy.write_row((r["batmon_id"], r["ts"], r["voltage"], r["current"], r["power"],
                                    r["soc"], None, 0.0, 0.0, n))  # fmt: skip
            cur.execute(INSERT_STAGED)

    return commit


def run(kind: str, port: int, db: str) -> None:
    pending: list[dict[str, Any]] = []
    if kind in ("batched", "pg"):
        commit = sqlite_batched(db) if kind == "batched" else pg_batched(db)

        def flush() -> int:
            commit(pending)
            done = len(pending)
            pending.clear()
            return done

        def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
            pending.append(row_of(msg))
    else:
        # sqlite-utils' defaults (rollback journal, synchronous=FULL: an fsync per
        # message), as the goal of 15x this peer was set against.
        table = Database(db)["readings"]

        def flush() -> int:
            return 0

        def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
            table.insert(row_of(msg))  # sqlite-utils commits each insert
            pending.append({})  # counted only

    subscribed: list[bool] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{kind}-sink", protocol=mqtt.MQTTv311)
    client.on_message = on_message
    client.on_subscribe = lambda *_a: subscribed.append(True)
    client.connect("127.0.0.1", port, keepalive=60)
    client.subscribe(TOPIC, qos=1)
    while not subscribed:
        client.loop(0.05)
    print("subscribed", flush=True)
    total = reported = 0
    last_print = 0.0
    while True:
        before = len(pending)
        client.loop(0.005 if pending or total != reported else 0.1)
        idle = len(pending) == before  # nothing arrived during this call
        if kind == "naive":
            total += len(pending)
            pending.clear()
        elif len(pending) >= BATCH or (pending and idle):
            total += flush()
        now = time.monotonic()
        if total != reported and (idle or now - last_print >= 0.02):
            print(total, now, flush=True)
            reported, last_print = total, now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("batched", "naive", "pg"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", required=True, help="a SQLite file, or a PostgreSQL URL for pg")
    args = parser.parse_args()
    try:
        run(args.kind, args.port, args.db)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
