"""Scale-out rows (issue 16): N `batmon serve` workers on one PostgreSQL database behind a
private Mosquitto's shared subscription, against one worker on SQLite and a PostgreSQL
batched sink, with the CPU each process spends per reading; HTTP spread over workers."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from benchmarks.http_load import build_request, closed_loop
from benchmarks.mqtt_load import Counter, DbCounter, Publishers, StreamCounter
from benchmarks.pg import (
    CpuMeter,
    PgCounter,
    ServerPids,
    fixed,
    machine_busy_seconds,
    run_database,
    thread_seconds,
)
from benchmarks.procs import Mosquitto, Serve, Sink
from benchmarks.report import Figure, Line
from benchmarks.rows_mqtt import Ingest
from benchmarks.runner import Context, Product, alternate

WORKERS = (1, 2, 3)
SHARE_GROUP = "bench"
# The paper projection: 100,000 batmons at one reading every 10 s.
PROJECTED_BATMONS = 100_000
PROJECTED_PERIOD_S = 10
# CPU groups the projection leaves out: shared with every database of the server...
SHARED_GROUP = "PostgreSQL background processes (whole server, shared)"
# ... and never part of a system's sum: the load generator, on the same 2 cores.
LOAD_GROUP = "load generator: the mosquitto_pub publishers (not in the sums)"


def load_average() -> str:
    return f"{os.getloadavg()[0]:.1f}"


@dataclass
class System:
    """One system under MQTT load and the CPU per reading of each of its processes."""

    name: str
    ingest: Ingest
    meters: dict[str, CpuMeter]
    rates: list[float] = field(default_factory=list)
    cpu_us: dict[str, list[float]] = field(default_factory=dict)  # per group, per run
    machine_cores: list[float] = field(default_factory=list)  # the machine's busy cores, per run

    def prepare(self) -> None:
        self.ingest.prepare()

    def run(self) -> float:
        for meter in self.meters.values():
            meter.start()
        busy, started = machine_busy_seconds(), time.monotonic()
        rate = self.ingest.run()
        self.machine_cores.append((machine_busy_seconds() - busy) / (time.monotonic() - started))
        for group, meter in self.meters.items():
            self.cpu_us.setdefault(group, []).append(meter.stop() / self.ingest.size * 1e6)
        self.rates.append(rate)
        return rate

    def cores(self) -> list[float]:
        """Cores its processes kept busy during each run: rate x CPU per reading."""
        return [r * us / 1e6 for r, us in zip(self.rates, self.total_us(shared=True), strict=True)]

    def total_us(self, shared: bool = False) -> list[float]:
        """CPU µs per reading of all its processes, per run (the server's shared ones too?)."""
        groups = [g for g in self.cpu_us if g != LOAD_GROUP and (shared or g != SHARED_GROUP)]
        return [sum(run) for run in zip(*(self.cpu_us[g] for g in groups), strict=True)]


def _workers(ctx: Context, stack: contextlib.ExitStack, name: str, n: int, db_url: str,
             broker: Mosquitto, batmons: int) -> tuple[list[Serve], Product]:  # fmt: skip
    """n workers on one database and one broker's shared subscription, each with its own
    client id. The first starts alone (it migrates and makes the admin user) and makes the
    batmons before the others start: a worker does not yet see batmons another one made
    after it started (the cross-worker cache invalidation of issue 16 is not there yet)."""
    procs: list[Serve] = []
    product: Product | None = None
    for i in range(n):
        args = ["--mqtt-url", f"mqtt://127.0.0.1:{broker.port}", "--database-url", db_url,
                "--mqtt-share-group", SHARE_GROUP, "--mqtt-client-id", f"bench-{name}-w{i}"]  # fmt: skip
        serve = Serve(ctx.folder_for(f"{name}/w{i}") / "data", args)
        stack.callback(serve.stop)
        procs.append(serve.start())
        if product is None:
            product = Product(serve)
            product.add_batmons(batmons)
    assert product is not None
    return procs, product


def _broker(ctx: Context, stack: contextlib.ExitStack, name: str) -> Mosquitto:
    broker = Mosquitto(ctx.folder_for(name) / "mosquitto")
    stack.callback(broker.stop)
    return broker.start()


def _system(ctx: Context, stack: contextlib.ExitStack, name: str, publishers: Publishers, counter: Counter,
            meters: dict[str, CpuMeter]) -> System:  # fmt: skip
    """A system under this load, its publishers' CPU measured too (they share the cores)."""
    side = Ingest(ctx, publishers, counter)
    stack.callback(side.close)
    load = CpuMeter(fixed(*(proc.pid for proc in publishers.procs)), thread_seconds)
    return System(name, side, {**meters, LOAD_GROUP: load})


def scale_ingest(ctx: Context) -> list[Line]:
    """Readings stored/s through a private Mosquitto by 1, 2 and 3 workers on PostgreSQL,
    1 worker on SQLite and a PostgreSQL batched sink, rounds alternating their order."""
    n = ctx.sized(100, 10)
    load_before = load_average()
    systems: list[System] = []
    with contextlib.ExitStack() as stack:
        server = ServerPids()
        stack.callback(server.close)

        # 1 worker on SQLite, external broker: the product figure of today.
        broker = _broker(ctx, stack, "scale-sqlite")
        serve = Serve(ctx.folder_for("scale-sqlite/w0") / "data",
                      ["--mqtt-url", f"mqtt://127.0.0.1:{broker.port}"])
        stack.callback(serve.stop)
        product = Product(serve.start())
        product.add_batmons(n)
        devices = product.devices(external=True)
        meters = {"worker": CpuMeter(fixed(serve.pid)), "Mosquitto": CpuMeter(fixed(broker.pid))}
        systems.append(_system(ctx, stack, "1 worker on SQLite", Publishers(broker.port, devices),
                               DbCounter(serve.db_path), meters))

        # The anchor: paho → psycopg, 500 rows per transaction, one process.
        broker = _broker(ctx, stack, "scale-pg-sink")
        db_url = stack.enter_context(run_database())
        sink = Sink("pg", broker.port, ctx.folder_for("scale-pg-sink") / "sink", db_url).start()
        stack.callback(sink.stop)
        assert sink.proc is not None
        meters = {"sink": CpuMeter(fixed(sink.proc.pid)), "Mosquitto": CpuMeter(fixed(broker.pid)),
                  "PostgreSQL backends": CpuMeter(server.backends_of(db_url)),
                  SHARED_GROUP: CpuMeter(server.background)}  # fmt: skip
        systems.append(_system(ctx, stack, "PostgreSQL batched sink", Publishers(broker.port, devices),
                               StreamCounter(sink.proc, "report"), meters))

        for workers in WORKERS:
            name = f"scale-pg{workers}"
            broker = _broker(ctx, stack, name)
            db_url = stack.enter_context(run_database())
            procs, product = _workers(ctx, stack, name, workers, db_url, broker, n)
            counter = PgCounter(db_url)
            meters = {f"worker {i + 1}": CpuMeter(fixed(p.pid)) for i, p in enumerate(procs)}
            meters |= {"Mosquitto": CpuMeter(fixed(broker.pid)),
                       "PostgreSQL backends": CpuMeter(server.backends_of(db_url, but=counter.backend_pid)),
                       SHARED_GROUP: CpuMeter(server.background)}  # fmt: skip
            label = f"{workers} worker{'s' if workers > 1 else ''} on PostgreSQL"
            publishers = Publishers(broker.port, product.devices(external=True))
            systems.append(_system(ctx, stack, label, publishers, counter, meters))

        for system in systems:
            system.prepare()
        for i in range(ctx.reps):
            for system in systems if i % 2 == 0 else reversed(systems):
                system.run()
    return _ingest_lines(n, systems, f"load average {load_before} → {load_average()}")


def _ingest_lines(n: int, systems: list[System], load: str) -> list[Line]:
    by = {s.name: s for s in systems}
    sqlite, sink = by["1 worker on SQLite"], by["PostgreSQL batched sink"]
    pg = {w: by[f"{w} worker{'s' if w > 1 else ''} on PostgreSQL"] for w in WORKERS}

    def fig(system: System) -> Figure:
        return Figure(f"{system.name}, {n} batmons", "/s", system.rates)

    what = f"MQTT ingest, private Mosquitto, {n} publishers, QoS 1, rows stored ({load})"
    lines = [
        Line("scale-ingest", what + ": 1 PostgreSQL worker / 1 SQLite worker", fig(pg[1]), fig(sqlite),
             goal="≥ 0.9"),
        Line("scale-ingest", what + ": 1 PostgreSQL worker / batched sink", fig(pg[1]), fig(sink)),
    ]  # fmt: skip
    for w in WORKERS[1:]:
        lines.append(Line("scale-ingest", what + f": {w} workers / 1 worker", fig(pg[w]), fig(pg[1]),
                          goal="≥ 1.5" if w == 2 else ""))  # fmt: skip
        lines.append(Line("scale-ingest", what + f": {w} workers / batched sink", fig(pg[w]), fig(sink),
                          goal="≥ 0.8" if w == 2 else ""))  # fmt: skip
    for system in systems:
        for group, values in system.cpu_us.items():
            lines.append(Line("scale-ingest", f"CPU per reading, {system.name}: {group}",
                              Figure(group, "µs", values)))  # fmt: skip
        but = " but the server's shared background" if SHARED_GROUP in system.cpu_us else ""
        but += " (the load generator not counted)"
        lines.append(Line("scale-ingest", f"CPU per reading, {system.name}: all of its processes{but}",
                          Figure("sum", "µs", system.total_us())))  # fmt: skip
    for system in systems:
        load_cores = statistics.median(r * us / 1e6 for r, us in zip(system.rates, system.cpu_us[LOAD_GROUP],
                                                                      strict=True))  # fmt: skip
        lines.append(Line("scale-ingest", f"cores in use during the runs of {system.name}: its processes"
                          " (rate x CPU per reading) against the whole machine's busy cores (everyone's;"
                          f" the load generator's share: {load_cores:.2f} cores)",
                          Figure(f"{system.name}: its processes", "cores", system.cores()),
                          Figure("whole machine, same runs (/proc/stat)", "cores", system.machine_cores)))
    rate = PROJECTED_BATMONS / PROJECTED_PERIOD_S
    for system in (sqlite, *pg.values()):
        cores = [us * rate / 1e6 for us in system.total_us()]
        what = (f"paper projection: cores for {PROJECTED_BATMONS:,} batmons at one reading every"
                f" {PROJECTED_PERIOD_S} s ({rate:,.0f}/s) at the CPU per reading of {system.name}")
        if SHARED_GROUP in system.cpu_us:
            with_shared = statistics.median(system.total_us(shared=True)) * rate / 1e6
            what += f" ({with_shared:.1f} with the server's shared background)"
        lines.append(Line("scale-ingest", what, Figure("cores", "cores", cores)))
    return lines


def _reading(i: int) -> dict[str, float]:
    return {"voltage": 12.6, "current": -3.2, "power": -40.3, "soc": 80 + i % 20}


def scale_http(ctx: Context) -> list[Line]:
    """HTTP status GETs and update POSTs from keep-alive clients spread round robin over 2
    workers on PostgreSQL, against the same clients all on one of them."""
    clients = ctx.sized(8, 4)
    load_before = load_average()
    with contextlib.ExitStack() as stack:
        broker = _broker(ctx, stack, "scale-http")
        db_url = stack.enter_context(run_database())
        procs, product = _workers(ctx, stack, "scale-http", 2, db_url, broker, clients)
        batmons = product.batmons
        ports = [p.http_port for p in procs]
        duration = ctx.seconds(2.0, 0.4)

        def status(batmon_id: int, token: str) -> bytes:
            query = f"batmon_id={batmon_id}&batmon_token={token}"
            return build_request("GET", f"/interface/batmon/status?{query}")

        def update(batmon_id: int, token: str) -> bytes:
            body = {"batmon_id": batmon_id, "batmon_token": token, **_reading(batmon_id)}
            return build_request("POST", "/interface/update/batmon", json.dumps(body).encode())

        got: dict[str, tuple[list[float], list[float]]] = {}
        kinds: dict[str, Callable[[int, str], bytes]] = {"status GET": status, "update POST": update}
        for kind, make in kinds.items():
            requests = [make(*batmons[i % len(batmons)]) for i in range(clients)]
            closed_loop(ports, requests, 0.3)  # warm both workers up
            got[kind] = alternate(ctx.reps, functools.partial(closed_loop, ports, requests, duration),
                                  functools.partial(closed_loop, ports[:1], requests, duration))  # fmt: skip
    load = f"load average {load_before} → {load_average()}"
    return [Line("scale-http", f"HTTP {kind}, {clients} keep-alive clients on PostgreSQL ({load}):"
                 " 2 workers (round robin) / 1 worker",
                 Figure("2 workers, clients round robin", "/s", product_side),
                 Figure("1 worker, all clients", "/s", anchor_side))
            for kind, (product_side, anchor_side) in got.items()]  # fmt: skip
