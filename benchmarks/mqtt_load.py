"""MQTT load generators and counters.

Throughput load comes from ``mosquitto_pub -l`` processes (C, QoS 1, 100 messages in
flight each, TCP_NODELAY): one per device, fed lines through its stdin, so the Python
harness is never the bottleneck. Paced latency load comes from paho clients in threads,
which is plenty at the rates a latency row offers and lets us timestamp each message.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from benchmarks.procs import BenchError, stop_process

MOSQUITTO_PUB = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"
MOSQUITTO_SUB = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"
INFLIGHT = 100


@dataclass(frozen=True)
class Device:
    """Who publishes where: a batmon's credentials (None for anonymous brokers) and topic."""

    topic: str
    username: str | None = None
    password: str | None = None


def update_topic(batmon_id: int, token: str, base: str = "batmon") -> str:
    return f"{base}/{batmon_id}/{token}/update"


def reading_lines(n: int) -> bytes:
    """n JSON readings, one a line, with plausible varying values."""
    return b"".join(
        b'{"voltage": %.2f, "current": %.1f, "power": %.1f, "soc": %d}\n'
        % (12 + (i % 40) / 20, (i % 30) / 3 - 5, (i % 90) - 30, i % 101)
        for i in range(n)
    )


class Publishers:
    """One ``mosquitto_pub -l -q 1`` process per device, kept connected across runs."""

    def __init__(self, port: int, devices: list[Device]) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        for d in devices:
            auth = ["-u", d.username, "-P", d.password or ""] if d.username else []
            self.procs.append(subprocess.Popen(
                [MOSQUITTO_PUB, "-h", "127.0.0.1", "-p", str(port), "-t", d.topic, "-q", "1", "-l",
                 "-M", str(INFLIGHT), "--nodelay", "-k", "300", *auth],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))  # fmt: skip

    def lines(self, total: int) -> list[bytes]:
        """``total`` readings split evenly over the publishers, made before any timing starts."""
        share, extra = divmod(total, len(self.procs))
        return [reading_lines(share + (i < extra)) for i in range(len(self.procs))]

    def feed(self, total: int) -> None:
        """Hand ``total`` readings to the publishers."""
        self.send(self.lines(total))

    def send(self, lines: list[bytes]) -> None:
        """Hand each publisher its lines, all at once (threads: a full pipe must not hold
        back the other publishers)."""
        threads = [threading.Thread(target=_write, args=pair, daemon=True)
                   for pair in zip(self.procs, lines, strict=True)]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def close(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                stop_process(proc)


def _write(proc: subprocess.Popen[bytes], data: bytes) -> None:
    assert proc.stdin is not None
    if proc.poll() is not None:
        raise BenchError(f"mosquitto_pub exited with {proc.returncode}")
    proc.stdin.write(data)
    proc.stdin.flush()


class Counter:
    """Something that counts delivered or persisted messages; wait_for times the target."""

    def count(self) -> tuple[int, float]:
        """(messages so far, CLOCK_MONOTONIC time at which that count was true)."""
        raise NotImplementedError

    def wait_for(self, target: int, timeout: float) -> float:
        """The time the count reached ``target``; BenchError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            n, at = self.count()
            if n >= target:
                return at
            if time.monotonic() > deadline:
                raise BenchError(f"only {n} of {target} messages arrived within {timeout:.0f} s")
            time.sleep(0.005)

    def close(self) -> None:
        pass


class DbCounter(Counter):
    """Rows in a SQLite table, counted on a read-only connection (WAL readers block no one)."""

    def __init__(self, path: Path, table: str = "readings") -> None:
        self.conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        self.sql = f"SELECT count(*) FROM {table}"

    def count(self) -> tuple[int, float]:
        n = int(self.conn.execute(self.sql).fetchone()[0])
        return n, time.monotonic()

    def wait_for(self, target: int, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while True:
            n, at = self.count()
            if n >= target:
                return at
            if time.monotonic() > deadline:
                raise BenchError(f"only {n} of {target} rows persisted within {timeout:.0f} s")
            time.sleep(0.02)

    def close(self) -> None:
        self.conn.close()


class StreamCounter(Counter):
    """Counts what a child process reports on stdout, read on a thread.

    ``lines`` mode: one line per message (``mosquitto_sub -F .``), counted in bulk.
    ``report`` mode: lines of ``<total> <monotonic time>`` (benchmarks.sinks).
    """

    def __init__(self, proc: subprocess.Popen[bytes], mode: str) -> None:
        self.proc = proc
        self.mode = mode
        self._n = 0
        self._at = time.monotonic()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        rest = b""
        while chunk := os.read(fd, 1 << 16):
            if self.mode == "lines":
                self._n += chunk.count(b"\n")
                self._at = time.monotonic()
                continue
            rest += chunk
            *lines, rest = rest.split(b"\n")
            for line in lines:
                total, at = line.split()
                self._at, self._n = float(at), int(total)

    def count(self) -> tuple[int, float]:
        at, n = self._at, self._n
        return n, at

    def close(self) -> None:
        stop_process(self.proc)


def counting_subscriber(port: int, topic_filter: str) -> StreamCounter:
    """A ``mosquitto_sub`` (QoS 1) that prints one short line per message it gets."""
    command = [MOSQUITTO_SUB, "-h", "127.0.0.1", "-p", str(port), "-t", topic_filter, "-q", "1", "-F", "."]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    return StreamCounter(proc, "lines")


def warm_up(publishers: Publishers, counter: Counter, timeout: float = 60) -> None:
    """One reading per publisher, end to end: every client is connected and subscribed."""
    before, _ = counter.count()
    publishers.feed(len(publishers.procs))
    counter.wait_for(before + len(publishers.procs), timeout)


def timed_run(publishers: Publishers, counter: Counter, total: int, timeout: float) -> float:
    """Messages per second from handing ``total`` readings out to the last one counted."""
    lines = publishers.lines(total)
    before, _ = counter.count()
    started = time.monotonic()
    publishers.send(lines)
    ended = counter.wait_for(before + total, timeout)
    return total / max(ended - started, 1e-6)


# -- paced latency ------------------------------------------------------------------

def paho_client(port: int, username: str | None = None, password: str | None = None) -> mqtt.Client:
    """A connected MQTT 3.1.1 paho client with its network loop on a thread."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    if username is not None:
        client.username_pw_set(username, password)
    client.max_inflight_messages_set(INFLIGHT)
    connected = threading.Event()
    client.on_connect = lambda *_a: connected.set()
    client.connect("127.0.0.1", port, keepalive=300)
    client.loop_start()
    if not connected.wait(15):
        raise BenchError("paho client could not connect")
    return client


@dataclass
class LatencyRun:
    """Per message: when it was published (monotonic) and, if seen, its latency in ms."""

    sent: dict[int, float]
    latency: dict[int, float]
    offered_rate: float

    def samples(self, start: float = 0.0, end: float = float("inf")) -> list[float]:
        """Latencies of the messages published within [start, end)."""
        return sorted(ms for seq, ms in self.latency.items() if start <= self.sent[seq] < end)

    def overlapping(self, start: float, end: float) -> list[float]:
        """Latencies of the messages on their way at some moment within [start, end)."""
        return sorted(ms for seq, ms in self.latency.items()
                      if self.sent[seq] < end and self.sent[seq] + ms / 1000 >= start)  # fmt: skip

    def done_before(self, moment: float) -> list[float]:
        """Latencies of the messages published and seen before ``moment``."""
        return sorted(ms for seq, ms in self.latency.items() if self.sent[seq] + ms / 1000 < moment)


def paced_latency(
    port: int,
    devices: list[Device],
    watch: list[str],
    key_of: Callable[[bytes], int | None],
    rate: float,
    duration: float,
    watcher_auth: tuple[str | None, str | None] = (None, None),
    during: Callable[[], Any] | None = None,
    first_seq: int = 0,
) -> LatencyRun:
    """Publish readings at ``rate``/s round-robin from ``devices`` for ``duration`` s, and
    time each until a watcher subscribed to the ``watch`` filters sees it (``key_of``
    finds the sequence number in a payload). The watcher is a ``mosquitto_sub`` that
    stamps each message on arrival, so the harness's GIL does not delay the stamps.

    Each reading carries its sequence number as ``voltage``. ``during``, if given, runs on
    a thread from the start (e.g. a big history request) and the run lasts until it is
    done; sequence numbers start after ``first_seq`` so no retained leftover matches."""
    sent: dict[int, float] = {}
    latency: dict[int, float] = {}
    lock = threading.Lock()

    clock_offset = time.time() - time.monotonic()  # %U stamps are wall-clock time

    def on_line(line: bytes) -> None:
        stamp, _, payload = line.partition(b" ")
        seq = key_of(payload)
        with lock:
            if seq is not None and seq in sent and seq not in latency:
                latency[seq] = (float(stamp) - clock_offset - sent[seq]) * 1000

    watcher = _stamping_subscriber(port, watch, watcher_auth, on_line)
    clients = [paho_client(port, d.username, d.password) for d in devices]
    time.sleep(0.5)  # the watcher's SUBACKs in
    helper = threading.Thread(target=during, daemon=True) if during else None
    try:
        if helper:
            helper.start()
        interval = 1 / rate
        started = time.monotonic()
        seq = 0
        while (now := time.monotonic()) < started + duration or (helper and helper.is_alive()):
            due = started + seq * interval
            if due > now:
                time.sleep(due - now)
                continue
            i = seq % len(clients)
            key = first_seq + seq + 1
            payload = b'{"voltage": %d, "soc": 50}' % key
            with lock:
                sent[key] = time.monotonic()
            clients[i].publish(devices[i].topic, payload, qos=1)
            seq += 1
        offered = seq / (time.monotonic() - started)
        _wait_for_stragglers(latency, lock)
    finally:
        for c in clients:
            c.disconnect()
            c.loop_stop()
        stop_process(watcher)
    with lock:
        return LatencyRun(sent, dict(latency), offered)


def _stamping_subscriber(port: int, filters: list[str], auth: tuple[str | None, str | None],
                         on_line: Callable[[bytes], None]) -> subprocess.Popen[bytes]:
    """A ``mosquitto_sub`` printing ``<arrival unix time> <payload>`` per message, read on a thread."""
    command = [MOSQUITTO_SUB, "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-F", "%U %p"]
    for topic_filter in filters:
        command += ["-t", topic_filter]
    if auth[0] is not None:
        command += ["-u", auth[0], "-P", auth[1] or ""]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            on_line(line.rstrip(b"\n"))

    threading.Thread(target=read, daemon=True).start()
    return proc


def _wait_for_stragglers(latency: dict[int, float], lock: threading.Lock, quiet: float = 1.0,
                         most: float = 15.0) -> None:
    """Return once no new message was seen for ``quiet`` s (or after ``most`` s)."""
    deadline = time.monotonic() + most
    seen, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        with lock:
            now_seen = len(latency)
        if now_seen != seen:
            seen, since = now_seen, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.05)


def voltage_key(field: str) -> Callable[[bytes], int | None]:
    """key_of for JSON payloads whose ``field`` holds the sequence number."""

    def key(payload: bytes) -> int | None:
        try:
            value = json.loads(payload).get(field)
        except (ValueError, AttributeError):
            return None
        return int(value) if isinstance(value, int | float) else None

    return key
