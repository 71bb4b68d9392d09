"""``batmon agent vedirect``: a Victron BMV / SmartShunt / MPPT on a serial port becomes a
batmon. Blocks are parsed and checked, one reading per interval goes to a durable
queue, and the queue drains to the broker in order, each batch leaving the queue only
once its PUBACK has come.

One thread runs the loop (read bytes, make readings, pump the queue); paho's own
thread carries the connection. Nothing here knows the server: only the MQTT contract.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ValidationError

from bridge.agent.byte_sources import ReplaySource, SerialSource, SourceLost, SourceUnusable
from bridge.agent.mqtt_uplink import MqttUplink
from bridge.agent.options import AgentOptions
from bridge.agent.vedirect_labels import VALUES, reading_fields
from bridge.agent.vedirect_parser import Block, VeDirectParser
from bridge.models import MAX_BATCH_READINGS, MAX_PAYLOAD_BYTES, Reading, describe_error
from bridge.store.agent_queue import ReadingQueue
from bridge.tls import TlsSetupError
from bridge.topics import Topics

log = logging.getLogger(__name__)

READ_SLICE_S = 0.1  # how long one read may block: the loop's heartbeat
SERIAL_RETRY_S = 5.0
STATS_EVERY_S = 60.0
SILENCE_WARNING_S = 30.0


class AgentError(Exception):
    """The agent cannot start or go on: one line for the user, and the exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class ByteSource(Protocol):
    def open(self) -> None: ...
    def read(self, timeout: float) -> bytes: ...
    def close(self) -> None: ...


@dataclass
class IntervalReading:
    """Blocks of one interval become one reading: the latest values, or their average.

    Labels are merged across blocks (a BMV splits its data over two blocks, the
    history in the second), so each reading carries the device's whole picture.
    """

    average: bool = False
    latest: Block = field(default_factory=dict)
    latest_ts: float = 0.0
    blocks: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, block: Block, ts: float) -> None:
        self.latest.update(block)
        self.latest_ts = ts
        self.blocks += 1
        if self.average:
            values = reading_fields({k: v for k, v in block.items() if k in VALUES})
            for name, value in values.items():
                if name != "details":  # a value the device sent as text ("---")
                    self.sums[name] = self.sums.get(name, 0.0) + value
                    self.counts[name] = self.counts.get(name, 0) + 1

    def take(self) -> dict[str, Any] | None:
        """The reading of the interval just ended (None if no block came), and reset."""
        if not self.blocks:
            return None
        fields = reading_fields(self.latest)
        for name, total in self.sums.items():
            fields[name] = round(total / self.counts[name], 3)
        self.blocks = 0
        self.sums.clear()
        self.counts.clear()
        return {"ts": round(self.latest_ts, 3), **fields}


@dataclass
class InFlight:
    """The batch published and not yet acknowledged: its message id and queue ids."""

    mid: int
    first_id: int
    last_id: int


class VeDirectAgent:
    """The loop: bytes -> blocks -> a reading per interval -> durable queue -> broker."""

    def __init__(self, options: AgentOptions, source: ByteSource, queue: ReadingQueue,
                 uplink: MqttUplink, clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.options = options
        self.source = source
        self.queue = queue
        self.uplink = uplink
        self.clock = clock
        self.parser = VeDirectParser()
        self.interval = IntervalReading(average=options.average)
        self.topic = Topics(base=options.base_topic).update(options.batmon_id, options.token)
        self.in_flight: InFlight | None = None
        self.made = 0
        self._sent_before = queue.counters()["sent"]
        self.rejected = 0
        self._source_open = True

    def run(self, stop: threading.Event) -> None:
        """Run until ``stop`` is set; raises AgentError if no VE.Direct block ever comes."""
        started = last_block = time.monotonic()
        next_tick = started + self.options.interval
        next_stats = started + STATS_EVERY_S
        retry_at = 0.0
        warned_silent = False
        while not stop.is_set():
            now = time.monotonic()
            if self._source_open:
                try:
                    data = self.source.read(min(READ_SLICE_S, max(0.0, next_tick - now)))
                except SourceLost as exc:  # the cable, usually
                    self._source_open = False
                    retry_at = time.monotonic() + SERIAL_RETRY_S
                    log.warning("serial port %s lost (%s); retrying every %g s",
                                self.options.source_name, exc, SERIAL_RETRY_S)  # fmt: skip
                    data = b""
                if data:
                    wall = self.clock()
                    for block in self.parser.feed(data):
                        self.interval.add(block, wall)
                        last_block = time.monotonic()
                        warned_silent = False
            else:
                stop.wait(READ_SLICE_S)
                if time.monotonic() >= retry_at:
                    retry_at = time.monotonic() + SERIAL_RETRY_S
                    self._reopen()
            now = time.monotonic()
            if self.parser.stats.blocks == 0 and now - started > self.options.first_block_timeout:
                raise AgentError(
                    f"no valid VE.Direct block from {self.options.source_name} within"
                    f" {self.options.first_block_timeout:g} s: is it a Victron device in text"
                    " mode (19200 baud)?"
                )
            if not warned_silent and now - last_block > SILENCE_WARNING_S and self.parser.stats.blocks:
                warned_silent = True
                log.warning("no valid VE.Direct block for %g s", SILENCE_WARNING_S)
            if now >= next_tick:
                next_tick = max(next_tick + self.options.interval, now)
                self._make_reading()
            self.pump()
            if now >= next_stats:
                next_stats = now + STATS_EVERY_S
                log.info("%s", self.stats_line())
        self._make_reading()  # what the last, unfinished interval saw
        self.pump()

    def _reopen(self) -> None:
        try:
            self.source.open()
        except SourceUnusable as exc:
            log.info("serial port still unusable: %s", exc)
            return
        self._source_open = True
        log.info("serial port %s is back", self.options.source_name)

    def _make_reading(self) -> None:
        """Queue the interval's reading, validated by the server's own model first."""
        fields = self.interval.take()
        if fields is None:
            return
        try:
            Reading.model_validate(fields)
        except ValidationError as exc:
            self.rejected += 1
            log.warning("reading not queued: %s", describe_error(exc))
            return
        dropped = self.queue.push(json.dumps(fields, separators=(",", ":"), allow_nan=False))
        self.made += 1
        if dropped:
            log.warning("queue full (%d readings): dropped the %d oldest (%d dropped in all)",
                        self.queue.max_readings, dropped, self.queue.counters()["dropped"])  # fmt: skip

    def pump(self) -> None:
        """Retire acknowledged batches; publish the next one when nothing is in flight."""
        while not self.uplink.acks.empty():
            mid = self.uplink.acks.get_nowait()
            if self.in_flight is not None and mid == self.in_flight.mid:
                gone = self.queue.remove_through(self.in_flight.first_id, self.in_flight.last_id)
                self.in_flight = None
                if gone > 1:
                    log.info("backlog: delivered %d queued readings, %d still queued", gone,
                             len(self.queue))  # fmt: skip
        if self.in_flight is not None or not self.uplink.connected.is_set() or not len(self.queue):
            return
        batch = self.queue.oldest(MAX_BATCH_READINGS, MAX_PAYLOAD_BYTES)
        if not batch:
            return
        payload = "[" + ",".join(p for _, p in batch) + "]"
        mid = self.uplink.publish(self.topic, payload)
        self.in_flight = InFlight(mid, batch[0][0], batch[-1][0])

    def drain(self, timeout: float) -> None:
        """On the way out: give the broker ``timeout`` s to ack what waits (it stays queued)."""
        deadline = time.monotonic() + timeout
        while (len(self.queue) or self.in_flight) and time.monotonic() < deadline:
            if not self.uplink.connected.is_set():
                return
            self.pump()
            time.sleep(0.02)

    def stats_line(self) -> str:
        """Counters for the log: what came in, what went out, what waits."""
        s = self.parser.stats
        q = self.queue.counters()
        # The queue's totals span every run since it was made; this run's are the difference.
        delivered = q["sent"] - self._sent_before
        return (f"blocks {s.blocks} ok, {s.bad_checksum} bad checksum, {s.malformed} malformed,"
                f" {s.hex_frames} hex frames; this run: {self.made} readings made, {delivered}"
                f" delivered, {self.uplink.refused} refused by the server; queue: {len(self.queue)}"
                f" waiting, {q['dropped']} dropped since it was made")  # fmt: skip


def run_agent(options: AgentOptions, stop: threading.Event,
              announce: Callable[[str], None] = log.info) -> str:  # fmt: skip
    """Open the source, the queue and the link; run until ``stop``; return the final stats.

    ``announce`` is told, once the port and the queue are open, where readings go.

    Raises AgentError: code 2 for a port that cannot be used, 1 for no VE.Direct data.
    """
    source: ByteSource
    if options.replay is not None:
        source = ReplaySource(options.replay, options.replay_rate, options.replay_loop)
    else:
        source = SerialSource(options.source_name)
    try:
        source.open()
    except SourceUnusable as exc:
        raise AgentError(str(exc), code=2) from None
    try:
        queue = ReadingQueue.open(options.data_dir, options.queue_max)
    except (OSError, sqlite3.Error) as exc:
        source.close()
        raise AgentError(f"--data-dir {options.data_dir}: cannot keep the queue there: {exc}",
                         code=2) from None  # fmt: skip
    host, port, username, password = options.mqtt_login()
    try:
        tls = options.mqtt_tls()
    except TlsSetupError as exc:
        source.close()
        raise AgentError(str(exc), code=2) from None
    uplink = MqttUplink(host=host, port=port, username=username, password=password,
                        client_id=f"batmon-agent-{options.batmon_id}", tls=tls,
                        error_topic=Topics(base=options.base_topic).error(options.batmon_id,
                                                                          options.token))  # fmt: skip
    agent = VeDirectAgent(options, source, queue, uplink)
    announce(f"reading VE.Direct from {options.source_name}; batmon {options.batmon_id}"
             f" -> {'mqtts' if tls else 'mqtt'}://{host}:{port}; queue {queue.path}")  # fmt: skip
    if len(queue):
        log.info("%d reading(s) from before are queued; they go first", len(queue))
    uplink.start()
    try:
        agent.run(stop)
        agent.drain(timeout=2.0)
        return agent.stats_line()
    finally:
        uplink.stop()
        source.close()
        queue.close()
