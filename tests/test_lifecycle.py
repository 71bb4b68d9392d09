"""The service's lifecycle: 20 starts and stops in one process leave nothing behind
(threads, tasks, file descriptors), in both broker modes; a stop that hangs is bounded.

Each cycle does real work first (an HTTP reading, an MQTT reading acked after its
commit, a live stream open at stop), so the parts that start threads and tasks on
demand have started them before they are stopped.
"""

from __future__ import annotations

import asyncio
import gc
import http.client
import inspect
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from batmon.service import Service
from bridge.config import ServeOptions
from bridge.doors.mqtt_link import new_client
from tests.load import private_mosquitto
from tests.support import LoopThread, wait_until

CYCLES = 20


def snapshot(loop: LoopThread) -> tuple[set[str], int, set[str]]:
    """(thread names, tasks in the service's loop, open fds) as they are now."""
    gc.collect()

    async def tasks() -> int:
        return len([t for t in asyncio.all_tasks() if t is not asyncio.current_task()])

    threads = {f"{t.name}#{t.ident}" for t in threading.enumerate()}
    # The listing's own descriptor is closed by the time it is read: left out.
    fds = {f"{fd}->{target}" for fd in os.listdir("/proc/self/fd") if (target := _target(fd))}
    return threads, loop.run(tasks()), fds


def _target(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def request(service: Service, method: str, path: str, body: dict[str, object] | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, object]]:  # fmt: skip
    """One request on its own connection, closed after: no client pool to leave behind."""
    assert service.http_port is not None
    conn = http.client.HTTPConnection("127.0.0.1", service.http_port, timeout=10)
    try:
        conn.request(method, path, json.dumps(body) if body is not None else None,
                     {"Content-Type": "application/json", **(headers or {})})  # fmt: skip
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def mqtt_reading(service: Service, batmon_id: int, token: str, base_topic: str) -> None:
    """A device publishes one reading (QoS 1) on the broker the service reads from."""
    client = new_client(f"device-{uuid.uuid4().hex[:8]}", clean_session=True)
    client.username_pw_set(str(batmon_id), token)
    assert service.mqtt_port is not None
    client.connect("127.0.0.1", service.mqtt_port)
    client.loop_start()
    try:
        info = client.publish(f"{base_topic}/{batmon_id}/{token}/update", '{"voltage": 12.5}', qos=1)
        info.wait_for_publish(5)
        assert info.is_published(), "the broker did not ack the update"
    finally:
        client.disconnect()
        client.loop_stop()


def open_live_stream(service: Service, api_key: str) -> http.client.HTTPConnection:
    """Log in and open the dashboard's live stream; left open for the stop to end."""
    assert service.http_port is not None
    conn = http.client.HTTPConnection("127.0.0.1", service.http_port, timeout=10)
    conn.request("POST", "/interface/login", json.dumps({"api_key": api_key}),
                 {"Content-Type": "application/json"})  # fmt: skip
    response = conn.getresponse()
    response.read()
    cookie = response.getheader("set-cookie", "").split(";")[0]
    conn.request("GET", "/events", headers={"Cookie": cookie, "Accept": "text/event-stream"})
    stream = conn.getresponse()
    assert stream.status == 200
    assert stream.read(6) == b"retry:"
    return conn


def one_cycle(loop: LoopThread, options: ServeOptions, cycle: int) -> None:
    """Start, ingest over both doors, hold a live stream open, stop."""
    service = Service(options)
    loop.run(service.start(), timeout=30)
    stream: http.client.HTTPConnection | None = None
    try:
        admin = {"X-API-Key": service.admin_api_key or ""}
        if cycle == 0:
            # The admin's key is shown once, at the first start: keep it for the others.
            options.data_dir.joinpath("admin-key").write_text(service.admin_api_key or "")
        admin = {"X-API-Key": options.data_dir.joinpath("admin-key").read_text()}
        status, body = request(service, "POST", "/interface/add/batmon",
                            {"batmon_name": f"bank {cycle}", "batmon_type": "BMV"}, admin)  # fmt: skip
        assert status == 200, body
        added = body["success"]
        assert isinstance(added, dict)
        batmon_id, token = int(added["batmon_id"]), str(added["batmon_token"])
        status, body = request(service, "POST", "/interface/update/batmon",
                            {"batmon_id": batmon_id, "batmon_token": token, "voltage": 12.0})  # fmt: skip
        assert status == 200, body
        mqtt_reading(service, batmon_id, token, options.base_topic)
        assert service.core is not None
        core = service.core
        wait_until(lambda: loop.call(core.store.reading_count, batmon_id) >= 2, 10,
                   "the MQTT reading stored")  # fmt: skip
        stream = open_live_stream(service, admin["X-API-Key"])
    finally:
        loop.run(service.stop(), timeout=60)
        if stream is not None:
            stream.close()


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


def assert_nothing_left(loop: LoopThread, options: ServeOptions) -> None:
    # A first cycle outside the count would hide a leak of one per process; none allowed.
    threads, tasks, fds = snapshot(loop)
    for cycle in range(CYCLES):
        one_cycle(loop, options, cycle)
    # Threads that end by themselves (paho's, after loop_stop) may need a moment.
    deadline = time.monotonic() + 10
    while True:
        threads_after, tasks_after, fds_after = snapshot(loop)
        if (threads_after, tasks_after, fds_after) == (threads, tasks, fds):
            break
        if time.monotonic() > deadline:
            assert threads_after - threads == set(), "threads left behind"
            assert tasks_after == tasks, "tasks left behind"
            assert fds_after - fds == set(), "file descriptors left behind"
            break
        time.sleep(0.1)


def test_twenty_starts_and_stops_with_the_embedded_broker_leave_nothing_behind(
    tmp_path: Path, loop: LoopThread
) -> None:
    options = ServeOptions(data_dir=tmp_path / "data", http_port=0, mqtt_port=0,
                           retention_days=30)  # fmt: skip
    assert_nothing_left(loop, options)


def test_twenty_starts_and_stops_on_an_external_broker_leave_nothing_behind(
    tmp_path: Path, loop: LoopThread
) -> None:
    broker = private_mosquitto(tmp_path / "mosquitto")
    try:
        options = ServeOptions(data_dir=tmp_path / "data", http_port=0,
                               mqtt_url=f"mqtt://127.0.0.1:{broker.port}",
                               base_topic=f"life-{uuid.uuid4().hex[:6]}", retention_days=30)  # fmt: skip
        assert_nothing_left(loop, options)
    finally:
        broker.stop()


class NeverStops:
    """An extension whose stop never returns (a stuck network call, say)."""

    def __init__(self) -> None:
        self.started = False
        self.stop_called = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stop_called = True
        await asyncio.Event().wait()


def test_a_stop_that_hangs_is_bounded_and_logged(tmp_path: Path, loop: LoopThread,
                                                  caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    hanging = NeverStops()
    options = ServeOptions(data_dir=tmp_path / "data", http_port=0, mqtt_port=0)
    service = Service(options, extensions=[hanging], stop_timeout_s=1.0)
    loop.run(service.start(), timeout=30)
    assert hanging.started
    caplog.set_level(logging.WARNING, logger="batmon.service")
    began = time.monotonic()
    loop.run(service.stop(), timeout=30)
    assert hanging.stop_called
    # Generous: the bound is 1 s for the stuck stop; the rest is the real stop.
    assert time.monotonic() - began < 20
    assert any("NeverStops" in r.getMessage() and "did not stop" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]  # fmt: skip
    # The parts after it in the stop order were still stopped: the database is closed.
    assert service.store is None


def test_every_extension_starts_and_stops_as_a_coroutine() -> None:
    """The service awaits each start and stop; a plain method would make that await a
    TypeError (AlarmEvaluator.stop once worked only because the error was swallowed)."""
    from batmon.http_server import HttpServer
    from bridge.doors.broker import EmbeddedBroker
    from bridge.doors.external_door import ExternalBrokerDoor
    from bridge.doors.mqtt_link import MqttLink
    from bridge.extensions.alarms import AlarmEvaluator
    from bridge.extensions.bank_publisher import BankPublisher
    from bridge.extensions.discovery import HomeAssistantDiscovery
    from bridge.extensions.metrics import Metrics
    from bridge.extensions.notifier import Notifier
    from bridge.extensions.retention_pruner import RetentionPruner
    from bridge.extensions.state_publisher import StatePublisher
    from bridge.extensions.watchdog import OfflineWatchdog
    from http_api.live import LiveFeed

    parts = (Metrics, AlarmEvaluator, Notifier, OfflineWatchdog, RetentionPruner, EmbeddedBroker,
             StatePublisher, BankPublisher, HomeAssistantDiscovery, MqttLink, ExternalBrokerDoor,
             HttpServer, LiveFeed)  # fmt: skip
    for part in parts:
        for method in (part.start, part.stop):
            assert inspect.iscoroutinefunction(method), f"{part.__name__}.{method.__name__}"
