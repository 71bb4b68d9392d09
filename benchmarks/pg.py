"""PostgreSQL for the scale-out rows: a database made for the run (dropped after it), a
counter of stored readings, and the CPU time of the processes a system runs on.

The machine's PostgreSQL is shared (other people's tests use it), so its CPU is split:
the backends connected to *our* database are ours, found by pid in ``pg_stat_activity``;
the server's background processes (WAL writer, checkpointer, background writer,
autovacuum) work for every database and are reported apart, as an upper bound.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from benchmarks.mqtt_load import Counter
from benchmarks.procs import CLOCK_TICKS, BenchError, cpu_seconds

ADMIN_URL = os.environ.get("BATMON_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")


def _admin() -> psycopg.Connection:
    try:
        return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        raise BenchError(f"PostgreSQL is not reachable at {ADMIN_URL} ({str(exc).strip()[:200]});"
                         " start it, or set BATMON_BENCH_PG_ADMIN") from None  # fmt: skip


@contextlib.contextmanager
def run_database() -> Iterator[str]:
    """A new empty database on the admin URL's server, dropped (connections cut) afterwards."""
    name = f"batmon_bench_{secrets.token_hex(5)}"
    with _admin() as admin:
        admin.execute(f"CREATE DATABASE {name}")  # name: ours, hex only
    try:
        yield ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        with _admin() as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def database_of(url: str) -> str:
    return url.rsplit("/", 1)[1].split("?", 1)[0]


class PgCounter(Counter):
    """Readings stored in a PostgreSQL database, as the product's own transactions commit them.

    ``count(*)`` of a table of 300,000 rows costs the server about 40 ms, too much to poll
    every few ms on 2 shared cores. So each count also notes ``readings_seq`` (taken by
    each row as it is inserted, before its commit); a run starts from a quiet count, so
    its rows are stored when the sequence has moved on by as many and ``count(*)`` (the
    committed truth) agrees. The sequence is polled, ``count(*)`` only once it says the
    target may be reached, or every 0.25 s whatever it says (a redelivered duplicate takes
    a number and stores no row); the time of the count that reaches the target is the end."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True)
        self.backend_pid = self.conn.info.backend_pid  # not the product's: its CPU is left out
        self._mark = (0, 0)  # (count, sequence before it) of the last count

    def _seq(self) -> int:
        row = self.conn.execute("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM readings_seq"
                                ).fetchone()  # fmt: skip
        return int(row[0]) if row else 0

    def count(self) -> tuple[int, float]:
        seq = self._seq()
        row = self.conn.execute("SELECT count(*) FROM readings").fetchone()
        n = int(row[0]) if row else 0
        self._mark = (n, seq)
        return n, time.monotonic()

    def wait_for(self, target: int, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        counted, seq = self._mark
        seq_target = seq + target - counted
        last_count = 0.0
        while True:
            now = time.monotonic()
            if self._seq() >= seq_target or now - last_count >= 0.25:
                n, at = self.count()
                last_count = at
                if n >= target:
                    return at
                if now > deadline:
                    raise BenchError(f"only {n} of {target} rows stored within {timeout:.0f} s")
            time.sleep(0.005)

    def close(self) -> None:
        self.conn.close()


def _cpu(pid: int) -> float | None:
    try:
        return cpu_seconds(pid)
    except (OSError, IndexError, ValueError):
        return None  # gone


def thread_seconds(pid: int) -> float | None:
    """CPU time of a process's live threads in ns precision (/proc/PID/task/*/schedstat).
    For many small processes (100 publishers): /proc/PID/stat counts whole clock ticks
    (10 ms), and each process's delta over a run loses up to one, so their sum was 0."""
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        return sum(int((task / "schedstat").read_text().split()[0]) for task in tasks) / 1e9
    except (OSError, IndexError, ValueError):
        return None  # gone


class ServerPids:
    """The machine's PostgreSQL processes, by what they serve, from ``pg_stat_activity``."""

    def __init__(self) -> None:
        self.conn = _admin()

    def backends_of(self, url: str, but: int | None = None) -> Callable[[], list[int]]:
        """The client backends connected to this database, but the harness's own (``but``)."""
        name = database_of(url)

        def pids() -> list[int]:
            return [r[0] for r in self.conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND backend_type = 'client backend'",
                (name,)) if r[0] != but]  # fmt: skip

        return pids

    def background(self) -> list[int]:
        """The server's own processes (WAL writer, checkpointer, autovacuum...): all databases'."""
        return [r[0] for r in self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE backend_type <> 'client backend'")]  # fmt: skip

    def close(self) -> None:
        self.conn.close()


@dataclass
class CpuMeter:
    """CPU seconds a group of processes spent between start() and stop(). The group is
    asked for its pids at both ends: a process born in between counts from its birth, one
    that ended in between is missed (the product's pool keeps its connections, so few)."""

    pids: Callable[[], list[int]]
    clock: Callable[[int], float | None] = _cpu  # thread_seconds: for many small processes
    _start: dict[int, float] = field(default_factory=dict)

    def start(self) -> None:
        self._start = {pid: t for pid in self.pids() if (t := self.clock(pid)) is not None}

    def stop(self) -> float:
        total = 0.0
        for pid in self.pids():
            now = self.clock(pid)
            if now is not None:
                total += now - self._start.get(pid, 0.0)
        return total


def machine_busy_seconds() -> float:
    """CPU seconds all cores of the machine spent busy since boot (everyone's), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


def fixed(*pids: int) -> Callable[[], list[int]]:
    """A group of processes known by pid (a worker, a broker, a sink)."""
    return lambda: list(pids)
