"""Rows over MQTT: ingest on the embedded and on an external broker, publish-to-state
latency, and /healthz while a queued backlog drains."""

from __future__ import annotations

import itertools
import statistics
import time
from pathlib import Path

from benchmarks.http_load import HealthPoller
from benchmarks.mqtt_load import (
    Counter,
    DbCounter,
    Device,
    Publishers,
    StreamCounter,
    counting_subscriber,
    paced_latency,
    timed_run,
    update_topic,
    voltage_key,
    warm_up,
)
from benchmarks.procs import Mosquitto, PythonServer, Serve, Sink
from benchmarks.report import Figure, Line, p99
from benchmarks.runner import Context, Product, alternate, running_product, sized_to

ANCHOR_TOKEN = "anchor-token"
_seq = itertools.count(1)


class Ingest:
    """One system under MQTT load: publishers, a counter, and its run size."""

    def __init__(self, ctx: Context, publishers: Publishers, counter: Counter) -> None:
        self.ctx = ctx
        self.publishers = publishers
        self.counter = counter
        self.size = 0
        self.rate = 0.0
        self.windows: list[tuple[float, float]] = []  # when each measured run went on

    def prepare(self) -> None:
        """Warm up end to end, then size runs to ~3 s from two calibration runs (a short
        one first, so a slow peer does not spend a minute being calibrated)."""
        warm_up(self.publishers, self.counter)
        rate = timed_run(self.publishers, self.counter, self.ctx.sized(300, 100), timeout=300)
        size = sized_to(rate, self.ctx.seconds(1.0, 0.2), 100, 100_000)
        rate = timed_run(self.publishers, self.counter, size, timeout=max(60, 20 * size / rate))
        self.size = sized_to(rate, self.ctx.seconds(3.0, 0.4), self.ctx.sized(300, 100), 300_000)
        self.rate = rate

    def run(self) -> float:
        started = time.monotonic()
        timeout = max(60, 20 * self.size / self.rate)
        rate = timed_run(self.publishers, self.counter, self.size, timeout=timeout)
        self.windows.append((started, time.monotonic()))
        return rate

    def close(self) -> None:
        self.publishers.close()
        self.counter.close()


def healthz_p99(poller: HealthPoller, windows: list[tuple[float, float]]) -> list[float]:
    """The p99 /healthz latency within each window."""
    return [p99(poller.latencies(a, b)) for a, b in windows]


def mqtt_embedded(ctx: Context) -> list[Line]:
    """Rows persisted/s through `batmon serve`'s own broker vs amqtt passing messages through."""
    folder = ctx.folder_for("mqtt-embedded")
    n = ctx.sized(100, 10)
    amqtt = PythonServer("benchmarks.amqtt_anchor", [], folder)
    systems: list[Ingest] = []
    with running_product(folder) as product:
        try:
            product.add_batmons(n)
            with HealthPoller(product.http_port) as health:
                time.sleep(ctx.seconds(1.0, 0.3))
                idle = health.latencies()
                publishers = Publishers(product.serve.mqtt_port, product.devices(external=False))
                product_side = Ingest(ctx, publishers, DbCounter(product.serve.db_path))
                systems.append(product_side)
                amqtt.start()
                anchor_side = Ingest(ctx, Publishers(amqtt.port, [Device(update_topic(1, ANCHOR_TOKEN))]),
                                     counting_subscriber(amqtt.port, "batmon/+/+/update"))  # fmt: skip
                systems.append(anchor_side)
                for side in systems:
                    side.prepare()
                got_p, got_a = alternate(ctx.reps, product_side.run, anchor_side.run)
            during = healthz_p99(health, product_side.windows)
        finally:
            for side in systems:
                side.close()
            amqtt.stop()
    ingest = Figure(f"batmon serve, {n} batmons (mosquitto_pub -l each)", "/s", got_p)
    ctx.max_mqtt_rate = ingest.median
    what = f"MQTT ingest, embedded broker, {n} batmons, QoS 1 (rows persisted)"
    return [
        Line("mqtt-embedded", what, ingest,
             Figure("amqtt 0.12 pass-through, 1 publisher → counting subscriber (own process)", "/s", got_a),
             goal="≥ 1.0"),
        Line("mqtt-embedded", "/healthz p99 during that ingest", Figure("batmon serve", "ms", during),
             Figure("/healthz p99, same server idle", "ms", [p99(idle)]), goal="≤ 100 ms"),
    ]  # fmt: skip


def mqtt_external(ctx: Context) -> list[Line]:
    """Rows persisted/s with `--mqtt-url` to a private Mosquitto, against three peers on
    their own Mosquitto each: raw pass-through, the batched sink and the naive peer."""
    folder = ctx.folder_for("mqtt-external")
    n = ctx.sized(100, 10)
    brokers = [Mosquitto(folder / f"mosquitto-{name}") for name in ("product", "raw", "batched", "naive")]
    systems: list[Ingest] = []
    sinks: list[Sink] = []
    try:
        for broker in brokers:
            broker.start()
        with running_product(folder, ["--mqtt-url", f"mqtt://127.0.0.1:{brokers[0].port}"]) as product:
            product.add_batmons(n)
            devices = product.devices(external=True)
            counter = DbCounter(product.serve.db_path)
            systems.append(Ingest(ctx, Publishers(brokers[0].port, devices), counter))
            systems.append(Ingest(ctx, Publishers(brokers[1].port, devices),
                                  counting_subscriber(brokers[1].port, "batmon/+/+/update")))  # fmt: skip
            for kind, broker in (("batched", brokers[2]), ("naive", brokers[3])):
                sink = Sink(kind, broker.port, folder / f"{kind}.sqlite3").start()
                sinks.append(sink)
                assert sink.proc is not None
                reported = StreamCounter(sink.proc, "report")
                systems.append(Ingest(ctx, Publishers(broker.port, devices), reported))
            for side in systems:
                side.prepare()
            product_side, *anchors = systems
            got = {}
            for label, anchor in zip(("raw", "batched", "naive"), anchors, strict=True):
                got[label] = alternate(ctx.reps, product_side.run, anchor.run)
    finally:
        for side in systems:
            side.close()
        for sink in sinks:
            sink.stop()
        for broker in brokers:
            broker.stop()
    all_product = [v for pair in got.values() for v in pair[0]]
    product_fig = Figure(f"batmon serve --mqtt-url, {n} batmons", "/s", all_product)
    what = f"MQTT ingest, external Mosquitto, {n} publishers, QoS 1 (rows persisted)"

    def paired(label: str) -> Figure:
        return Figure(f"batmon serve --mqtt-url (runs paired with {label})", "/s", got[label][0])

    return [
        Line("mqtt-external", what, paired("raw"),
             Figure("Mosquitto pass-through → mosquitto_sub", "/s", got["raw"][1])),
        Line("mqtt-external", what, paired("batched"),
             Figure("paho sink, 500 rows/tx into SQLite", "/s", got["batched"][1]),
             goal="≥ 0.6 (sink ≥ 25,000/s)"),
        Line("mqtt-external", what, paired("naive"),
             Figure("naive peer: sqlite-utils insert + commit per message", "/s", got["naive"][1]),
             goal="≥ 15"),
        Line("mqtt-external", "MQTT ingest, external Mosquitto, all product runs", product_fig),
    ]  # fmt: skip


def _max_rate(ctx: Context, product: Product) -> float:
    """The embedded row's figure, or a short measurement of our own when it did not run."""
    if ctx.max_mqtt_rate:
        return ctx.max_mqtt_rate
    side = Ingest(ctx, Publishers(product.serve.mqtt_port, product.devices(external=False)),
                  DbCounter(product.serve.db_path))  # fmt: skip
    try:
        side.prepare()
        ctx.max_mqtt_rate = side.run()
    finally:
        side.close()
    return ctx.max_mqtt_rate


def latency(ctx: Context) -> list[Line]:
    """Publish → retained state seen by a subscriber, paced at half the max ingest rate,
    against the same publish → subscriber path through a plain amqtt broker."""
    folder = ctx.folder_for("latency")
    amqtt = PythonServer("benchmarks.amqtt_anchor", [], folder)
    with running_product(folder) as product:
        try:
            product.add_batmons(ctx.sized(10, 4))
            rate = _max_rate(ctx, product) / 2
            amqtt.start()
            duration = ctx.seconds(4.0, 1.0)
            devices = product.devices(external=False)
            states = [f"batmon/{i}/state" for i, _ in product.batmons]

            def on_product() -> tuple[float, float, float]:
                run = paced_latency(product.serve.mqtt_port, devices, states,
                                    voltage_key("batmon_voltage"), rate, duration,
                                    watcher_auth=("admin@localhost", product.serve.admin_key),
                                    first_seq=next(_seq) * 10_000_000)  # fmt: skip
                got = run.samples()
                return statistics.median(got), p99(got), run.offered_rate

            anchor_devices = [Device(update_topic(i, ANCHOR_TOKEN)) for i in range(len(devices))]

            def on_anchor() -> tuple[float, float, float]:
                run = paced_latency(amqtt.port, anchor_devices, ["batmon/+/+/update"],
                                    voltage_key("voltage"), rate, duration,
                                    first_seq=next(_seq) * 10_000_000)  # fmt: skip
                got = run.samples()
                return statistics.median(got), p99(got), run.offered_rate

            got_p, got_a = alternate(ctx.reps, on_product, on_anchor)
        finally:
            amqtt.stop()
    offered = statistics.median(r[2] for r in got_p)
    what = (f"publish → retained state visible, paced at {offered:,.0f}/s (half the max),"
            f" {len(devices)} batmons")
    anchor_label = "amqtt pass-through, publish → subscriber, same pace"
    return [
        Line("latency", what + ", p50", Figure("batmon serve", "ms", [r[0] for r in got_p]),
             Figure(anchor_label, "ms", [r[0] for r in got_a])),
        Line("latency", what + ", p99", Figure("batmon serve", "ms", [r[1] for r in got_p]),
             Figure(anchor_label, "ms", [r[1] for r in got_a]), goal="≤ 50 ms"),
    ]  # fmt: skip


def backlog(ctx: Context) -> list[Line]:
    """/healthz while readings queued during a restart drain (external Mosquitto keeps
    the bridge's persistent session)."""
    folder = ctx.folder_for("backlog")
    queued = ctx.sized(20_000, 1_000)
    broker = Mosquitto(folder / "mosquitto").start()
    args = ["--mqtt-url", f"mqtt://127.0.0.1:{broker.port}"]
    publishers: Publishers | None = None
    canary: StreamCounter | None = None
    worst: list[float] = []
    tails: list[float] = []
    drains: list[float] = []
    idle: list[float] = []
    try:
        with running_product(folder, args) as product:
            product.add_batmons(ctx.sized(100, 10))
            data_dir = product.serve.data_dir
            publishers = Publishers(broker.port, product.devices(external=True))
            canary = counting_subscriber(broker.port, "batmon/+/+/update")
            warm_up(publishers, DbCounter(product.serve.db_path))
        for _ in range(ctx.reps):
            before, _ = canary.count()
            publishers.feed(queued)  # the bridge is down: the broker queues them
            canary.wait_for(before + queued, timeout=120)
            counter = DbCounter(Path(data_dir) / "batmon.sqlite3")
            rows_before, _ = counter.count()
            serve = Serve(data_dir, args)
            started = time.monotonic()
            try:
                serve.start()
                with HealthPoller(serve.http_port, interval=0.02) as health:
                    done = counter.wait_for(rows_before + queued, timeout=300)
                    time.sleep(ctx.seconds(1.0, 0.3))
                draining = health.latencies(serve.ready_at, done)
                worst.append(max(draining) if draining else float("nan"))
                tails.append(p99(draining))
                idle.append(p99(health.latencies(done + 0.05)))
                drains.append(queued / (done - started))
            finally:
                counter.close()
                serve.stop()
    finally:
        if publishers:
            publishers.close()
        if canary:
            canary.close()
        broker.stop()
    what = f"/healthz while {queued:,} queued readings drain after a restart (external Mosquitto)"
    idle_fig = Figure("/healthz p99, same server idle after the drain", "ms", idle)
    return [
        Line("backlog", what + ", max", Figure("batmon serve --mqtt-url", "ms", worst), idle_fig,
             goal="≤ 100 ms"),
        Line("backlog", what + ", p99", Figure("batmon serve --mqtt-url", "ms", tails), idle_fig),
        Line("backlog", f"drain rate of the {queued:,} queued (from process start)",
             Figure("batmon serve --mqtt-url", "/s", drains)),
    ]  # fmt: skip


def backlog_embedded(ctx: Context) -> list[Line]:
    """/healthz while 20,000 readings pushed as fast as PUBACKs allow drain through the
    embedded broker. One run: today it takes about 40 s."""
    folder = ctx.folder_for("backlog-embedded")
    pushed = ctx.sized(20_000, 1_000)
    with running_product(folder) as product:
        product.add_batmons(ctx.sized(100, 10))
        publishers = Publishers(product.serve.mqtt_port, product.devices(external=False))
        counter = DbCounter(product.serve.db_path)
        try:
            warm_up(publishers, counter)
            with HealthPoller(product.http_port, interval=0.02) as health:
                time.sleep(ctx.seconds(1.0, 0.3))
                idle = health.latencies()
                lines = publishers.lines(pushed)
                before, _ = counter.count()
                started = time.monotonic()
                publishers.send(lines)
                done = counter.wait_for(before + pushed, timeout=600)
        finally:
            publishers.close()
            counter.close()
    draining = health.overlapping(started, done)
    what = f"/healthz while {pushed:,} readings pushed at full speed drain (embedded broker, 1 run)"
    idle_fig = Figure("/healthz p99, same server idle before", "ms", [p99(idle)])
    return [
        Line("backlog-embedded", what + ", max",
             Figure("batmon serve", "ms", [max(draining, default=float("nan"))]), idle_fig, goal="≤ 100 ms"),
        Line("backlog-embedded", what + ", p99", Figure("batmon serve", "ms", [p99(draining)]), idle_fig),
        Line("backlog-embedded", f"rows persisted/s over those {pushed:,}",
             Figure("batmon serve", "/s", [pushed / (done - started)])),
    ]  # fmt: skip
