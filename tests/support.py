"""Real local peers the tests talk to (not mocks) and the helpers that drive them.

An HTTP sink for Apprise's json://; Mosquitto (the machine's on 127.0.0.1:1883, or a
private process) with paho probes playing devices and dashboards; an asyncio loop on
a thread for the bridge and the broker; a clock moved by hand; the `batmon` CLI.
Pytest fixtures built on these live in conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt

from bridge.core import Batmon, Core, User
from bridge.doors.external_door import ExternalBrokerDoor
from bridge.doors.mqtt_link import BrokerEndpoint, BrokerMode, MqttLink, new_client
from bridge.events import EventBus
from bridge.extensions import Extension
from bridge.extensions.bank_publisher import BankPublisher
from bridge.extensions.discovery import HomeAssistantDiscovery
from bridge.extensions.state_publisher import StatePublisher
from bridge.models import AddBatmon, Reading
from bridge.store.db import Store
from bridge.store.readings import SqliteReadingSink
from bridge.topics import Topics

ROOT = Path(__file__).resolve().parent.parent
SHARED_PORT = 1883  # the machine's Mosquitto; each test keeps to its own base topic
MOSQUITTO = "/usr/sbin/mosquitto"
T0 = 1_700_000_000.0  # where a Clock starts
T = TypeVar("T")


def batmon(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the `batmon` CLI from the repository root and capture what it prints."""
    return subprocess.run([sys.executable, "-m", "batmon.cli", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=60, env={**os.environ, **(env or {})})


class Clock:
    """A clock the test moves by hand, so repeat delays need no sleeping."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def wait_until(predicate: Callable[[], Any], timeout: float = 3.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.01)


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LoopThread:
    """An asyncio loop on a daemon thread: the bridge's or broker's home, tests stay sync."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 15) -> T:
        """Run a coroutine in the loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Call a plain function in the loop (core methods emit events handled there)."""

        async def call() -> T:
            return fn(*args)

        return self.run(call())

    def close(self) -> None:
        """Cancel the tasks still running in the loop, then stop and close it."""

        async def cancel_leftovers() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_leftovers())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


class Sink:
    """A local HTTP endpoint for Apprise's json:// service; records what it is sent.

    In ``hang`` mode it holds each request without answering (a stuck provider) until
    ``release`` is set; then it closes the connection, or answers ``late_status`` if set
    (a provider that did deliver, late).
    """

    def __init__(self, port: int = 0, hang: bool = False) -> None:
        self.hang = hang
        self.received: list[dict[str, Any]] = []
        self.hung: list[dict[str, Any]] = []
        self.release = threading.Event()
        self.late_status: int | None = None
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.port = self.server.server_address[1]
        serve = self.server.serve_forever
        threading.Thread(target=serve, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def url(self, path: str = "", auth: str = "") -> str:
        return f"json://{auth}127.0.0.1:{self.port}/{path}"

    def posts(self, path: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [p for p in self.received if path is None or p["path"] == f"/{path}"]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def _record(self, body: dict[str, Any]) -> bool:
        """Keep the body; False when the request must hang instead of being answered."""
        with self._lock:
            (self.hung if self.hang else self.received).append(body)
        return not self.hang

    def _record_late(self, body: dict[str, Any]) -> None:
        with self._lock:
            self.received.append(body)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = {**json.loads(self.rfile.read(length)), "path": self.path}
                if not sink._record(body):
                    sink.release.wait(30)
                    if sink.late_status is None:
                        return
                    sink._record_late(body)
                    self.send_response(sink.late_status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


class Probe:
    """A plain MQTT 3.1.1 client that records what it receives: a device, a dashboard."""

    def __init__(self, port: int, client_id: str | None = None, *, clean_session: bool = True,
                 username: str | None = None) -> None:  # fmt: skip
        self.client = new_client(client_id or f"probe-{uuid.uuid4().hex}", clean_session=clean_session)
        if username is not None:
            self.client.username_pw_set(username, "x")
        self.messages: list[mqtt.MQTTMessage] = []
        self._cond = threading.Condition()
        self._connected = threading.Event()
        self._subacks: set[int] = set()
        self._refused: str | None = None
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        assert self._connected.wait(5), "probe could not connect"
        assert self._refused is None, f"broker refused the probe: {self._refused}"

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self._refused = str(reason)
        self._connected.set()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, *rest: Any) -> None:
        with self._cond:
            self._subacks.add(mid)
            self._cond.notify_all()

    def subscribe(self, *filters: str) -> None:
        """Subscribe (QoS 1) and wait for the broker's SUBACK."""
        _, mid = self.client.subscribe([(f, 1) for f in filters])
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self._subacks, 5), "no SUBACK"

    def publish(self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False) -> None:
        """Publish and, for QoS 1, wait until the broker has it."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos:
            info.wait_for_publish(5)
            assert info.is_published(), f"broker did not ack {topic}"

    def on(self, topic: str) -> list[mqtt.MQTTMessage]:
        """Messages received so far on one topic."""
        with self._cond:
            return [m for m in self.messages if m.topic == topic]

    def wait_for(self, topic: str, match: Callable[[mqtt.MQTTMessage], bool] = lambda m: True,
                 timeout: float = 3.0) -> mqtt.MQTTMessage:  # fmt: skip
        """The first message on ``topic`` that matches, waiting up to ``timeout``."""
        found: list[mqtt.MQTTMessage] = []

        def seen() -> bool:
            found[:] = [m for m in self.messages if m.topic == topic and match(m)]
            return bool(found)

        with self._cond:
            if not self._cond.wait_for(seen, timeout):
                got = [(m.topic, m.payload[:200]) for m in self.messages]
                raise AssertionError(f"no matching message on {topic} within {timeout} s; got {got}")
        return found[0]

    def wait_count(self, topic: str, count: int, timeout: float = 3.0) -> list[mqtt.MQTTMessage]:
        """Wait until ``count`` messages arrived on ``topic``."""
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.on(topic)) >= count, timeout)
        assert ok, f"{len(self.on(topic))} message(s) on {topic}, wanted {count}"
        return self.on(topic)

    def sync(self) -> None:
        """Return once everything the broker sent before now has arrived (a marker round trip)."""
        marker = f"probe-sync/{uuid.uuid4().hex}"
        self.subscribe(marker)
        self.publish(marker, b"sync")
        self.wait_for(marker)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained(port: int, topic: str) -> mqtt.MQTTMessage | None:
    """What a new subscriber of ``topic`` gets as the retained message (None if nothing)."""
    probe = Probe(port)
    try:
        probe.subscribe(topic)
        probe.sync()  # retained messages come right after the SUBACK, before the marker
        found = [m for m in probe.on(topic) if m.retain]
        return found[-1] if found else None
    finally:
        probe.close()


def payload_json(msg: mqtt.MQTTMessage) -> Any:
    """An MQTT message's payload, parsed as JSON."""
    return json.loads(msg.payload)


class PrivateMosquitto:
    """A Mosquitto process of our own that keeps sessions on disk across restarts."""

    def __init__(self, folder: Path, *, allow_anonymous: bool = True, extra: str = "") -> None:
        """``extra``: more configuration lines (queue and inflight limits, ...)."""
        self.port = free_port()
        self.folder = folder
        self.config = folder / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\n"
            f"allow_anonymous {'true' if allow_anonymous else 'false'}\n"
            "persistence true\n"
            f"persistence_location {folder}/\n"
            # Started as root, Mosquitto would drop to user `mosquitto` and could not
            # write its database into our tmp folder.
            f"user {pwd.getpwuid(os.getuid()).pw_name}\n"
            + extra
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PrivateMosquitto:
        log = (self.folder / "mosquitto.log").open("ab")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.config)], stdout=log, stderr=log)
        deadline = time.monotonic() + 5
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return self
            assert self.proc.poll() is None, (self.folder / "mosquitto.log").read_text()
            assert time.monotonic() < deadline, "mosquitto did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: Mosquitto saves sessions before exiting
            self.proc.wait(5)


class Bridge:
    """What `batmon serve` runs for an external broker, over a test's core: the MQTT
    link, its door, the state and bank publishers and discovery, in the service's order."""

    def __init__(self, core: Core, topics: Topics, endpoint: BrokerEndpoint, *,
                 share_group: str | None = None, discovery: bool = True) -> None:  # fmt: skip
        self.link = MqttLink(endpoint, BrokerMode.EXTERNAL, topics, core.bus, homeassistant=discovery)
        self.door = ExternalBrokerDoor(core, topics, self.link, share_group=share_group)
        self.link.take_updates(self.door.subscription, self.door.receive,
                               stale=self.door.stale_subscription)
        publish = self.link.publish_retained
        banks = BankPublisher(core, topics, publish, discovery)
        self.parts: list[Extension] = [StatePublisher(core, topics, publish), banks]
        self.discovery: HomeAssistantDiscovery | None = None
        if discovery:
            self.discovery = HomeAssistantDiscovery(core, topics, publish,
                                                    also_resend=banks.resend_discovery)  # fmt: skip
            self.parts.append(self.discovery)
        self.parts += [self.link, self.door]
        self._started: list[Extension] = []

    async def start(self, timeout: float = 10.0) -> None:
        """Start in order; on failure stop what started and raise."""
        try:
            for part in self.parts:
                self._started.append(part)
                await (self.link.start(timeout) if part is self.link else part.start())
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        while self._started:
            await self._started.pop().stop()

    @property
    def connected(self) -> bool:
        return self.link.connected

    @property
    def protocol(self) -> str:
        return self.link.protocol

    @property
    def stats(self) -> dict[str, Any]:
        discovery = self.discovery.counters if self.discovery is not None else {}
        return {**self.link.stats, **self.door.stats, **discovery}


@dataclass
class Env:
    """A real core on a tmp SQLite file, a loop thread, and a broker to meet devices on."""

    loop: LoopThread
    core: Core
    user: User
    topics: Topics
    port: int
    tag: str
    bridges: list[Bridge] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    client_ids: set[str] = field(default_factory=set)

    def add_batmon(self, **fields: Any) -> Batmon:
        spec = AddBatmon.model_validate({"batmon_name": "House bank", "batmon_type": "BMV-712", **fields})
        return self.loop.call(self.core.add_batmon, self.user, spec)

    def bridge(self, *, start: bool = True, client_id: str | None = None, username: str | None = None,
               password: str | None = None, **options: Any) -> Bridge:  # fmt: skip
        """A bridge on this env's broker and topics; started unless told otherwise."""
        client_id = client_id or f"batmon-bridge-{self.tag}"
        self.client_ids.add(client_id)
        endpoint = BrokerEndpoint("127.0.0.1", self.port, username, password, client_id)
        bridge = Bridge(self.core, self.topics, endpoint, **options)
        if start:
            self.loop.run(bridge.start(timeout=5))
        self.bridges.append(bridge)
        return bridge

    def probe(self, *filters: str, **options: Any) -> Probe:
        probe = Probe(self.port, **options)
        if options.get("client_id"):
            self.client_ids.add(options["client_id"])
        if filters:
            probe.subscribe(*filters)
        self.probes.append(probe)
        return probe

    def ingest(self, batmon: Batmon, **values: Any) -> None:
        """Ingest as the HTTP door does."""
        self.loop.run(self.core.ingest_readings(batmon, [Reading.model_validate(values)]))

    def count(self, batmon: Batmon) -> int:
        return self.loop.call(self.core.store.reading_count, batmon.id)

    def history(self, batmon: Batmon) -> list[dict[str, Any]]:
        return self.loop.call(self.core.history, [batmon], 0, None)[0]["data"]

    def wait_count(self, batmon: Batmon, count: int, timeout: float = 3.0) -> None:
        wait_until(lambda: self.count(batmon) >= count, timeout, f"{count} reading(s) stored")

    def close(self) -> None:
        for bridge in self.bridges:
            with contextlib.suppress(Exception):
                self.loop.run(bridge.stop())
        for probe in self.probes:
            probe.close()
        with contextlib.suppress(OSError, AssertionError):
            self._clean_broker()
        self.core.store.close()
        self.loop.close()

    def _clean_broker(self) -> None:
        """Leave the shared broker as found: no persistent sessions, no retained topics."""
        for client_id in self.client_ids:
            Probe(self.port, client_id, clean_session=True).close()
        probe = Probe(self.port)
        probe.subscribe(f"{self.topics.base}/#", f"{self.topics.discovery_prefix}/#")
        probe.sync()
        for topic in {m.topic for m in probe.messages if m.retain and m.payload}:
            probe.publish(topic, b"", retain=True)
        probe.close()


@contextlib.contextmanager
def make_env(tmp_path: Path, port: int = SHARED_PORT) -> Iterator[Env]:
    """Build an Env under a unique base topic and discovery prefix; clean up after."""
    loop = LoopThread()
    store = Store.open(tmp_path / "batmon.sqlite3")
    core = Core(store, EventBus()).load()
    user, _ = core.create_user("owner@example.org")
    tag = uuid.uuid4().hex[:12]
    topics = Topics(base=f"batmon-test-{tag}", discovery_prefix=f"ha-test-{tag}")
    env = Env(loop, core, user, topics, port, tag)
    try:
        yield env
    finally:
        env.close()


class FullDisk:
    """A real SQLite sink whose file may not grow past its current size while ``full``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.full = True
        self.sinks: list[SqliteReadingSink] = []

    def __call__(self) -> SqliteReadingSink:
        sink = SqliteReadingSink(self.path)
        self.sinks.append(sink)
        self.apply(sink)
        return sink

    def apply(self, sink: SqliteReadingSink) -> None:
        conn = sink._conn  # the test's only reach inside: SQLite's own size cap
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages if self.full else 2**30}")

    def clear(self) -> None:
        self.full = False
        for sink in self.sinks:
            self.apply(sink)
