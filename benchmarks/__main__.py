"""`python -m benchmarks`: the product against its anchors, in one run, on free ports.

Starts what each row needs (`batmon serve` in both modes, private Mosquittos, a plain
amqtt broker, the minimal Starlette app, the SQLite sinks), alternates product and anchor
runs, and prints a table of medians and ratios; a full run writes benchmarks/RESULTS.md.

    python -m benchmarks                      # every row, ~8-11 minutes on 2 cores
    python -m benchmarks --quick              # every row, small sizes: a smoke run
    python -m benchmarks --only http-status   # some rows (comma-separated or repeated)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from benchmarks import rows_data, rows_delete, rows_http, rows_mqtt, rows_scale
from benchmarks.report import Line, results_markdown, table
from benchmarks.runner import Context

RESULTS = Path(__file__).with_name("RESULTS.md")

# In run order: latency takes half the rate that mqtt-embedded measured.
ROWS: dict[str, Callable[[Context], list[Line]]] = {
    "mqtt-embedded": rows_mqtt.mqtt_embedded,
    "latency": rows_mqtt.latency,
    "mqtt-external": rows_mqtt.mqtt_external,
    "backlog": rows_mqtt.backlog,
    "backlog-embedded": rows_mqtt.backlog_embedded,
    "http-update": rows_http.http_update,
    "http-status": rows_http.http_status,
    "history": rows_data.history,
    "history-lag": rows_data.history_lag,
    "batmons-10k": rows_data.batmons_10k,
    "delete": rows_delete.delete,
    "scale-ingest": rows_scale.scale_ingest,
    "scale-http": rows_scale.scale_http,
}

# How each row is measured, for RESULTS.md (paragraphs; line breaks are joined).
NOTES = [" ".join(note.split()) for note in (
    """**Processes.** Everything measured runs in its own process on free ports: `batmon serve` (a fresh
    data folder per row), private `mosquitto` processes (one per system, so no two systems share a
    broker), `python -m benchmarks.amqtt_anchor` (plain amqtt 0.12, anonymous auth, no $SYS/loggers),
    `python -m benchmarks.anchor_app` (Starlette under uvicorn, bound like `batmon serve`), `python -m
    benchmarks.sinks batched|naive`. The embedded broker runs the repository's broker.yaml with the
    per-device message-rate cap lifted (`limits.messages_per_second`): a benchmark device publishes far
    faster than a real one may.""",
    """**MQTT load.** One `mosquitto_pub -l -q 1 -M 100 --nodelay` process per batmon (C; 100 messages in
    flight each, as fast as PUBACKs allow), fed lines through stdin and kept connected across runs. Each
    system is warmed up end to end (one reading per publisher), then one calibration run sizes its timed
    runs to about 3 s. A run is timed from handing the readings out to the last one counted: rows in the
    product's SQLite file (read-only connection, polled every 20 ms), lines of a `mosquitto_sub -q 1`
    for pass-through, rows the sink reports it committed.""",
    """**Private Mosquitto.** Defaults (so `max_inflight_messages 20` towards 3.1.1 subscribers) plus
    `max_queued_messages 0` (the default 1,000 drops QoS 1 readings a slow subscriber has not taken yet)
    and `set_tcp_nodelay true`.""",
    """**Sinks.** paho MQTT 3.1.1 subscribers, QoS 1 on `batmon/+/+/update`, paho's automatic PUBACK on
    receipt. Batched: 500 rows per transaction (or what it has when the socket goes quiet), WAL +
    synchronous=NORMAL. Naive: `sqlite_utils.Database(path)['readings'].insert(row)` per message (a
    commit each) on sqlite-utils' defaults: a rollback journal and synchronous=FULL, so an fsync per
    message, which makes this peer swing with the disk's load (44/s on a busy machine, ~2,900/s with
    the product's WAL + synchronous=NORMAL, on which the issue's goal of 15x was not set).""",
    """**HTTP load.** Keep-alive clients on raw sockets, one thread each, sending prebuilt requests back to
    back for 2 s (closed loop), after a 0.3 s warm-up. Updates go to distinct batmons (client i → batmon
    i). Status GETs authenticate with the device token. The anchor app does one INSERT + commit per POST
    and one SELECT by primary key per GET, on one connection, WAL + synchronous=NORMAL.""",
    """**History.** `batmon serve` makes the schema and 50 batmons; 100,000 readings per batmon at 1 Hz,
    interleaved in time (5,000,000 rows), are bulk-inserted into its file through
    `bridge.store.db.Store.open` while it is stopped; then it serves that file. The product figure is a
    GET with the device token, timed until the last byte; the anchor runs the same range query on a
    read-only sqlite3 connection and `orjson.dumps` the row tuples, in the harness process.""",
    """**Latency.** paho clients in threads publish QoS 1 readings round-robin from 10 batmons at half the
    embedded row's rate; each carries a sequence number as its voltage, and a `mosquitto_sub -F '%U %p'`
    (logged in as the admin user; it stamps each message on arrival, outside the harness's GIL) times it
    until a state with that voltage arrives. Readings whose state was coalesced away are not counted.
    The anchor is the same pace through the plain amqtt broker to the same kind of subscriber; at a
    pace near amqtt's own maximum (the pass-through figure above) its latency is queueing in amqtt.""",
    """**History lag.** On the 5 M-row server, 10 batmons publish at 200/s while, after 1.5 s, a GET of one
    batmon's 100,000 readings runs; publish → state latency and /healthz (polled every 20 ms) of every
    reading or request under way at some moment of the GET, against those completed before it
    started.""",
    """**10,000 batmons.** Inserted straight into the product's `batmons` table (after `batmon serve` made
    the schema and admin user). Each boot is timed from spawn to `ready`; settled is the first moment
    after which the process uses under 10 % of a core for a whole second (its own CPU time, from /proc);
    RSS from /proc at that moment. Anchor: the same on a data folder with no batmon.""",
    """**Delete.** `batmon serve` makes the admin user and one batmon per repetition plus a neighbour;
    while it is stopped, each batmon to delete gets 2,000,000 readings at 1 Hz (bulk-inserted through
    `bridge.store.db.Store.open`, interleaved in time), then it serves that file. Per repetition one
    delete over HTTP, timed until its answer; /healthz and the neighbour's status (device token) are
    polled every 20 ms on keep-alive connections from 1 s before the delete until the batmon's last
    reading is gone from the file (read-only connection, polled every 50 ms). Figures: p99 of the polls
    under way in that window, against the polls answered before the delete.""",
    """**Backlog.** External mode: with `batmon serve --mqtt-url` stopped (SIGTERM), 20,000 readings are
    published (a `mosquitto_sub` canary confirms the broker has them all), then it is started again and
    /healthz is polled every 20 ms from `ready` until the last queued row is in the database.
    Embedded (`backlog-embedded`, one run): 100 batmons push 20,000 readings as fast as PUBACKs allow
    while /healthz is polled every 20 ms until the last row is in the database.""",
    """**Scale-out (issue 16).** `scale-ingest`: five systems, each with its own private Mosquitto
    and the same 100 `mosquitto_pub` publishers' load (as MQTT load above), sized and timed the same
    way, rounds alternating their order: `batmon serve --mqtt-url` on SQLite (1 worker); a PostgreSQL
    batched sink (`python -m benchmarks.sinks pg`: paho 3.1.1, ack on receipt, 500 rows per
    transaction by the store's own SQL: COPY into a temporary table, INSERT ... ON CONFLICT DO
    NOTHING, into the store's readings table); 1, 2 and 3 workers (`--mqtt-url --database-url
    --mqtt-share-group bench --mqtt-client-id bench-<system>-w<i>`). Each PostgreSQL system has a
    database of its own on the machine's PostgreSQL, made for the run and dropped after it. Worker 1
    makes the batmons before the others start (a worker does not see batmons made after it started
    yet). Rows stored are counted by `count(*)`, polled once `readings_seq` says they may all be
    there (and every 0.25 s). CPU per reading: user + system time (/proc) of each process over each
    run, divided by the readings: the workers, the broker, the PostgreSQL backends connected to that
    database (by pid from `pg_stat_activity`, the harness's counter excluded); the server's
    background processes serve every database on the machine and are shown apart. Cores in use:
    rate x CPU per reading, beside the whole machine's busy cores over the same run (/proc/stat,
    everyone's). The projection multiplies the CPU per reading at full speed by 10,000 readings/s.
    `scale-http`: 2 workers on one database (a private Mosquitto), keep-alive clients as HTTP load
    above, client i on worker i mod 2, against the same clients all on worker 1, alternated.""",
    """**Noise.** The machine may be shared; the load average at the end is in the table above, and every
    repetition is listed below.""",
)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and short runs: a smoke run")
    parser.add_argument("--only", action="append", default=[], metavar="ROW",
                        help="run only these rows (comma-separated or repeated): " + ", ".join(ROWS))
    parser.add_argument("--reps", type=int, default=3, help="repetitions per figure (median reported)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the results here (default: benchmarks/RESULTS.md for a full run of"
                             " every row, nowhere otherwise)")  # fmt: skip
    args = parser.parse_args(argv)
    only = [name.strip() for value in args.only for name in value.split(",") if name.strip()]
    unknown = [name for name in only if name not in ROWS]
    if unknown:
        parser.error(f"unknown row(s) {', '.join(unknown)}; rows are {', '.join(ROWS)}")
    args.rows = [name for name in ROWS if not only or name in only]
    if args.out is None and not args.quick and not only:
        args.out = RESULTS
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    lines: list[Line] = []
    with tempfile.TemporaryDirectory(prefix="batmon-bench-") as tmp:
        ctx = Context(Path(tmp), quick=args.quick, reps=args.reps)
        with ctx.cleanup:
            for name in args.rows:
                print(f"== {name}", flush=True)
                row_started = time.monotonic()
                try:
                    got = ROWS[name](ctx)
                except Exception as exc:
                    traceback.print_exc()
                    got = [Line(name, name, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])]
                lines += got
                print(table(got), flush=True)
                print(f"   ({time.monotonic() - row_started:.0f} s)", flush=True)
    elapsed = time.monotonic() - started
    print(f"\n{table(lines)}\n\n{elapsed:.0f} s in all", flush=True)
    if args.out is not None:
        command = "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv)
        args.out.write_text(results_markdown(lines, NOTES, command.strip(), elapsed))
        print(f"written to {args.out}", flush=True)
    return 1 if any(line.error for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
