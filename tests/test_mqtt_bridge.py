"""The MQTT door against real brokers: the shared Mosquitto on 127.0.0.1:1883 (each test
under its own base topic) and private Mosquitto processes for restarts.

The bridge runs in an asyncio loop on a background thread, as under `batmon serve`;
the test thread plays the devices and Home Assistant with plain paho clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
import pytest

from bridge import mqtt_bridge
from bridge.core import Batmon, Core, User
from bridge.events import EventBus
from bridge.models import MAX_BATCH_READINGS, AddBatmon, Reading
from bridge.mqtt_bridge import MqttBridge, MqttConnectError, new_client, parse_mqtt_url
from bridge.simulate import SimulatedBattery, simulate
from bridge.store.db import Store
from bridge.topics import Topics
from bridge.watchdog import OfflineWatchdog

SHARED_PORT = 1883
MOSQUITTO = "/usr/sbin/mosquitto"
T = TypeVar("T")


# -- helpers (test_discovery.py imports them too) ------------------------------
class LoopThread:
    """An asyncio loop on a background thread: the bridge's home while tests drive it."""

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
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


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
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateMosquitto:
    """A Mosquitto process of our own that keeps sessions on disk across restarts."""

    def __init__(self, folder: Path, *, allow_anonymous: bool = True) -> None:
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


@dataclass
class Env:
    """A real core on a tmp SQLite file, a loop thread, and a broker to meet devices on."""

    loop: LoopThread
    core: Core
    user: User
    topics: Topics
    port: int
    tag: str
    bridges: list[MqttBridge] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    client_ids: set[str] = field(default_factory=set)

    def add_batmon(self, **fields: Any) -> Batmon:
        spec = AddBatmon.model_validate({"batmon_name": "House bank", "batmon_type": "BMV-712", **fields})
        return self.loop.call(self.core.add_batmon, self.user, spec)

    def bridge(self, *, start: bool = True, **options: Any) -> MqttBridge:
        """A bridge on this env's broker and topics; started unless told otherwise."""
        options.setdefault("client_id", f"batmon-bridge-{self.tag}")
        self.client_ids.add(options["client_id"])
        bridge = MqttBridge(self.core, self.topics, host="127.0.0.1", port=self.port,
                            username=None, password=None, **options)  # fmt: skip
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


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with make_env(tmp_path) as env:
        yield env


def payload_json(msg: mqtt.MQTTMessage) -> Any:
    return json.loads(msg.payload)


# -- parse_mqtt_url ------------------------------------------------------------
def test_mqtt_url_gives_host_port_and_credentials() -> None:
    expected = ("broker.lan", 1884, "bridge", "s@cret")
    assert parse_mqtt_url("mqtt://bridge:s%40cret@broker.lan:1884") == expected


def test_mqtt_url_port_defaults_to_1883_and_credentials_to_none() -> None:
    assert parse_mqtt_url("mqtt://127.0.0.1") == ("127.0.0.1", 1883, None, None)
    assert parse_mqtt_url("mqtt://[::1]:1999/") == ("::1", 1999, None, None)


@pytest.mark.parametrize(
    "url",
    ["http://user:hunter2@host:1883", "mqtts://user:hunter2@host", "user:hunter2@host:1883",
     "mqtt://user:hunter2@host:99999", "mqtt://user:hunter2@host:port", "mqtt://user:hunter2@:1883",
     "mqtt://user:hunter2@host:1883/topic", "mqtt://:hunter2@host"],
)  # fmt: skip
def test_bad_mqtt_url_is_a_clear_error_that_hides_the_password(url: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_mqtt_url(url)
    assert "MQTT URL" in str(info.value)
    assert "hunter2" not in str(info.value)


# -- ingest over MQTT ------------------------------------------------------------
def test_qos1_reading_lands_in_history_within_a_second_and_on_retained_state(env: Env) -> None:
    batmon = env.add_batmon()
    bridge = env.bridge()
    device = env.probe()
    reading = {"batmon_voltage": 12.6, "current": -3.5, "power": -44.1, "soc": 81}
    device.publish(env.topics.update(batmon.id, batmon.token), json.dumps(reading))
    sent = time.monotonic()
    env.wait_count(batmon, 1, timeout=2)
    assert time.monotonic() - sent < 1.0
    [row] = env.history(batmon)
    assert (row["batmon_voltage"], row["batmon_current"], row["batmon_soc"]) == (12.6, -3.5, 81.0)

    state = wait_until(lambda: retained(env.port, env.topics.state(batmon.id)), what="retained state")
    body = payload_json(state)
    assert body["batmon_voltage"] == 12.6 and body["batmon_soc"] == 81.0
    assert body["batmon_status"] == "Online"
    assert body["last_modified"] == int(env.core.batmons[batmon.id].last_reading or 0)
    assert {"voltage_units", "current_units", "power_units", "soc_units", "batmon_details"} <= body.keys()
    availability = retained(env.port, env.topics.availability(batmon.id))
    assert availability is not None and availability.payload == b"online"
    assert bridge.stats["accepted"] == 1 and bridge.stats["readings"] == 1


def test_qos0_reading_lands_too(env: Env) -> None:
    batmon = env.add_batmon()
    env.bridge()
    env.probe().publish(env.topics.update(batmon.id, batmon.token), b'{"voltage": 13.0}', qos=0)
    env.wait_count(batmon, 1)


def test_array_with_ts_lands_in_time_order_and_older_ts_keeps_current_values(env: Env) -> None:
    batmon = env.add_batmon()
    env.bridge()
    device = env.probe(env.topics.state(batmon.id))
    topic = env.topics.update(batmon.id, batmon.token)
    t0 = int(time.time()) - 30
    device.publish(topic, json.dumps([
        {"voltage": 12.9, "soc": 90, "ts": t0 + 20},
        {"voltage": 12.7, "soc": 88, "ts": t0},
        {"voltage": 12.8, "soc": 89, "ts": t0 + 10},
    ]))  # fmt: skip
    env.wait_count(batmon, 3)
    assert [r["batmon_voltage"] for r in env.history(batmon)] == [12.7, 12.8, 12.9]
    assert (batmon.voltage, batmon.soc, batmon.last_modified) == (12.9, 90.0, t0 + 20)

    device.publish(topic, json.dumps({"voltage": 11.0, "soc": 10, "ts": t0 - 600}))
    env.wait_count(batmon, 4)
    assert [r["batmon_voltage"] for r in env.history(batmon)] == [11.0, 12.7, 12.8, 12.9]
    assert (batmon.voltage, batmon.soc, batmon.last_modified) == (12.9, 90.0, t0 + 20)
    device.sync()
    assert payload_json(device.on(env.topics.state(batmon.id))[-1])["batmon_voltage"] == 12.9


def test_readings_of_one_device_are_processed_in_arrival_order(env: Env) -> None:
    batmon = env.add_batmon()
    env.bridge()
    device = env.probe()
    topic = env.topics.update(batmon.id, batmon.token)
    infos = [device.client.publish(topic, json.dumps({"voltage": 10 + n / 10}), qos=1) for n in range(30)]
    for info in infos:
        info.wait_for_publish(5)
    env.wait_count(batmon, 30)
    assert [r["batmon_voltage"] for r in env.history(batmon)] == [10 + n / 10 for n in range(30)]
    assert batmon.voltage == 12.9


def _big_object() -> bytes:
    return json.dumps({"voltage": 12, "batmon_details": {"log": "x" * (64 * 1024)}}).encode()


def _array(items: int) -> bytes:
    now = int(time.time())
    return json.dumps([{"voltage": 12.0, "ts": now - i} for i in range(items)]).encode()


BAD_PAYLOADS = {
    "not-utf8": b'\xff\xfe{"voltage": 12}',
    "not-json": b"voltage=12.5",
    "empty": b"",
    "json-number": b"12.5",
    "json-string": b'"12.5"',
    "json-null": b"null",
    "json-true": b"true",
    "nan": b'{"batmon_voltage": NaN}',
    "infinity": b'{"voltage": -Infinity}',
    "overflowing-number": b'{"voltage": 1e999}',
    "soc-150": b'{"batmon_soc": 150}',
    "unknown-fields-only": b'{"temperature": 21.5, "batmon_id": 1}',
    "boolean-value": b'{"voltage": true}',
    "details-not-an-object": b'{"details": "[1, 2]"}',
    "ts-an-hour-ahead": json.dumps({"voltage": 12, "ts": time.time() + 3600}).encode(),
    "over-64-KiB": _big_object(),
    "array-over-limit": _array(MAX_BATCH_READINGS + 1),
    "empty-array": b"[]",
    "array-item-without-ts": b'[{"voltage": 12}]',
    "array-of-scalars": b"[12, 13]",
    "array-with-one-bad-item": json.dumps(
        [{"voltage": 12, "ts": 1_700_000_000}, {"soc": 150, "ts": 1_700_000_001}]
    ).encode(),
    "nested-too-deeply": b"[" * 30_000 + b"]" * 30_000,
}


@pytest.mark.parametrize("payload", BAD_PAYLOADS.values(), ids=BAD_PAYLOADS.keys())
def test_bad_payload_persists_nothing_gets_an_error_and_the_next_reading_lands(
    env: Env, payload: bytes
) -> None:
    batmon = env.add_batmon()
    bridge = env.bridge()
    device = env.probe(env.topics.error(batmon.id, batmon.token))
    topic = env.topics.update(batmon.id, batmon.token)
    device.publish(topic, payload)
    error = payload_json(device.wait_for(env.topics.error(batmon.id, batmon.token)))
    assert set(error) == {"error"} and isinstance(error["error"], str) and error["error"]
    assert env.count(batmon) == 0

    device.publish(topic, b'{"voltage": 12.34}')
    env.wait_count(batmon, 1)
    assert [r["batmon_voltage"] for r in env.history(batmon)] == [12.34]
    assert bridge.stats["rejected"] == 1 and bridge.stats["accepted"] == 1


def test_error_message_names_the_field(env: Env) -> None:
    batmon = env.add_batmon()
    env.bridge()
    device = env.probe(env.topics.error(batmon.id, batmon.token))
    device.publish(env.topics.update(batmon.id, batmon.token), b'{"batmon_soc": 150}')
    error = payload_json(device.wait_for(env.topics.error(batmon.id, batmon.token)))["error"]
    assert "batmon_soc" in error and "100" in error


def test_wrong_token_or_unknown_id_gets_nothing_and_persists_nothing(env: Env) -> None:
    batmon = env.add_batmon()
    bridge = env.bridge()
    watcher = env.probe(f"{env.topics.base}/#")
    device = env.probe()
    device.publish(env.topics.update(batmon.id, "not-the-token"), b'{"voltage": 1}')
    device.publish(env.topics.update(batmon.id + 1, batmon.token), b'{"voltage": 2}')
    device.publish(env.topics.update(batmon.id, batmon.token), b'{"voltage": 12.5}')
    env.wait_count(batmon, 1)
    # The state of the good reading is published after anything the bad ones caused.
    watcher.wait_for(env.topics.state(batmon.id), lambda m: payload_json(m)["batmon_voltage"] == 12.5)
    assert [m.topic for m in watcher.messages if m.topic.endswith("/error")] == []
    assert [r["batmon_voltage"] for r in env.history(batmon)] == [12.5]
    stats = bridge.stats
    assert (stats["dropped_wrong_token"], stats["dropped_unknown_batmon"], stats["rejected"]) == (1, 1, 0)


def test_malformed_topics_are_dropped_and_the_bridge_keeps_serving(env: Env) -> None:
    batmon = env.add_batmon()
    bridge = env.bridge()
    device = env.probe()
    base, good = env.topics.base, b'{"voltage": 1}'
    token = batmon.token
    malformed = [
        f"{base}/{batmon.id}/{token}/update/extra", f"{base}/{batmon.id}/update",
        f"{base}/0{batmon.id}/{token}/update", f"{base}/-{batmon.id}/{token}/update",
        f"{base}/abc/{token}/update", f"{base}/99999999999999999/{token}/update",
    ]  # fmt: skip
    for topic in malformed:
        device.publish(topic, good)
    device.publish(env.topics.update(batmon.id, batmon.token), b'{"voltage": 12.5}')
    env.wait_count(batmon, 1)
    assert [r["batmon_voltage"] for r in env.history(batmon)] == [12.5]
    # The two with the wrong number of levels never match the subscription.
    assert bridge.stats["dropped_bad_topic"] == 4


def test_http_readings_are_republished_on_the_state_topic(env: Env) -> None:
    batmon = env.add_batmon()
    env.bridge()
    watcher = env.probe(env.topics.state(batmon.id), env.topics.availability(batmon.id))
    env.ingest(batmon, batmon_voltage=13.2, batmon_soc=99)
    state = watcher.wait_for(env.topics.state(batmon.id), lambda m: payload_json(m)["batmon_voltage"] == 13.2)
    assert payload_json(state)["batmon_status"] == "Online"
    watcher.wait_for(env.topics.availability(batmon.id), lambda m: m.payload == b"online")


def test_a_batch_publishes_the_final_state_once(env: Env) -> None:
    batmon = env.add_batmon()
    env.bridge()
    watcher = env.probe(env.topics.state(batmon.id))
    watcher.sync()
    before = len(watcher.on(env.topics.state(batmon.id)))
    now = int(time.time())
    readings = [Reading.model_validate({"voltage": 12 + i / 100, "ts": now - 50 + i}) for i in range(50)]
    env.loop.run(env.core.ingest_readings(batmon, readings))
    watcher.sync()
    states = watcher.on(env.topics.state(batmon.id))[before:]
    assert [payload_json(m)["batmon_voltage"] for m in states] == [12.49]


def test_bridge_state_is_online_while_running_and_offline_after_stop(env: Env) -> None:
    bridge = env.bridge()
    online = retained(env.port, env.topics.bridge_state)
    assert online is not None and online.payload == b"online"
    assert bridge.connected and bridge.stats["connected"] is True
    env.loop.run(bridge.stop())
    offline = retained(env.port, env.topics.bridge_state)
    assert offline is not None and offline.payload == b"offline"
    assert not bridge.connected


def test_deleting_a_batmon_empties_its_retained_state_and_availability(env: Env) -> None:
    batmon = env.add_batmon()
    env.bridge()
    env.ingest(batmon, voltage=12.0)
    wait_until(lambda: retained(env.port, env.topics.state(batmon.id)), what="state retained")
    env.loop.call(env.core.delete_batmon, batmon)
    wait_until(lambda: retained(env.port, env.topics.state(batmon.id)) is None, what="state emptied")
    assert retained(env.port, env.topics.availability(batmon.id)) is None


def test_watchdog_flips_availability_offline_and_a_new_reading_flips_it_back(env: Env) -> None:
    batmon = env.add_batmon(update_period=2)
    watchdog = OfflineWatchdog(env.core)
    env.loop.run(watchdog.start())
    try:
        env.bridge()
        availability = env.topics.availability(batmon.id)
        watcher = env.probe(availability)
        device = env.probe()
        device.publish(env.topics.update(batmon.id, batmon.token), b'{"voltage": 12.5}')
        watcher.wait_for(availability, lambda m: m.payload == b"online")
        last_reading = env.core.batmons[batmon.id].last_reading
        assert last_reading is not None
        watcher.wait_for(availability, lambda m: m.payload == b"offline" and not m.retain, timeout=4)
        assert 2.0 <= time.time() - last_reading <= 3.0
        assert batmon.status == "Offline"
        assert payload_json(retained(env.port, env.topics.state(batmon.id)))["batmon_status"] == "Offline"

        device.publish(env.topics.update(batmon.id, batmon.token), b'{"voltage": 12.6}')
        wait_until(lambda: watcher.on(availability)[-1].payload == b"online", what="back online")
    finally:
        env.loop.run(watchdog.stop())


# -- sessions, reconnects, failures ---------------------------------------------
def test_readings_sent_while_the_bridge_was_stopped_arrive_when_it_starts_again(env: Env) -> None:
    batmon = env.add_batmon()
    bridge = env.bridge()
    env.loop.run(bridge.stop())
    device = env.probe()
    for n in range(3):
        device.publish(env.topics.update(batmon.id, batmon.token), json.dumps({"voltage": 12 + n}))
    assert env.count(batmon) == 0
    env.bridge()  # same client id: the broker kept the session and queued the readings
    env.wait_count(batmon, 3)
    assert [r["batmon_voltage"] for r in env.history(batmon)] == [12, 13, 14]


def test_bridge_reconnects_after_broker_restart_and_gets_readings_sent_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 2 s first back-off: the device below publishes while the bridge is still away.
    monkeypatch.setattr(mqtt_bridge, "RECONNECT_MIN_DELAY_S", 2)
    broker = PrivateMosquitto(tmp_path).start()
    try:
        with make_env(tmp_path, broker.port) as env:
            batmon = env.add_batmon()
            bridge = env.bridge()
            device_id = f"device-{env.tag}"
            first = env.probe(client_id=device_id, clean_session=False)
            first.publish(env.topics.update(batmon.id, batmon.token), b'{"voltage": 12.1}')
            env.wait_count(batmon, 1)
            first.close()  # the device comes back below under the same client id

            broker.stop()
            wait_until(lambda: not bridge.connected, what="bridge noticed the broker went away")
            broker.start()
            device = env.probe(client_id=device_id, clean_session=False)
            for voltage in (12.2, 12.3):
                device.publish(env.topics.update(batmon.id, batmon.token), json.dumps({"voltage": voltage}))
            assert not bridge.connected, "premise: the readings reached the broker before the bridge"

            wait_until(lambda: bridge.connected, timeout=6, what="bridge reconnected by itself")
            env.wait_count(batmon, 3)
            assert [r["batmon_voltage"] for r in env.history(batmon)] == [12.1, 12.2, 12.3]
            assert bridge.stats["connects"] == 2
            state = retained(env.port, env.topics.bridge_state)
            assert state is not None and state.payload == b"online"
    finally:
        broker.stop()


def test_start_without_a_broker_raises_a_clear_error(tmp_path: Path) -> None:
    port = free_port()
    with make_env(tmp_path, port) as env:
        bridge = MqttBridge(env.core, env.topics, host="127.0.0.1", port=port, username=None, password=None)
        started = time.monotonic()
        with pytest.raises(MqttConnectError, match=f"127.0.0.1:{port}"):
            env.loop.run(bridge.start(timeout=1.5))
        assert time.monotonic() - started < 4
        assert not bridge.connected


def test_start_fails_at_once_when_the_broker_refuses_the_login(tmp_path: Path) -> None:
    broker = PrivateMosquitto(tmp_path, allow_anonymous=False).start()
    try:
        with make_env(tmp_path, broker.port) as env:
            bridge = MqttBridge(env.core, env.topics, host="127.0.0.1", port=broker.port,
                                username="bridge", password="wrong")  # fmt: skip
            started = time.monotonic()
            with pytest.raises(MqttConnectError, match="refused"):
                env.loop.run(bridge.start(timeout=10))
            assert time.monotonic() - started < 3
    finally:
        broker.stop()


def test_shared_subscription_bridge_receives_readings(env: Env) -> None:
    batmon = env.add_batmon()
    bridge = env.bridge(shared=True)
    env.probe().publish(env.topics.update(batmon.id, batmon.token), b'{"voltage": 12.5}')
    env.wait_count(batmon, 1)
    assert bridge.stats["accepted"] == 1


# -- simulate -------------------------------------------------------------------
def test_simulated_battery_is_plausible() -> None:
    battery = SimulatedBattery(soc=50.0)
    for _ in range(500):
        reading = battery.step(60.0)
        assert 11.0 <= reading["batmon_voltage"] <= 14.0
        assert 0.0 <= reading["batmon_soc"] <= 100.0
        expected_power = reading["batmon_voltage"] * reading["batmon_current"]
        assert reading["batmon_power"] == pytest.approx(expected_power, abs=0.001)


def test_simulate_publishes_readings_that_land_for_every_device(env: Env) -> None:
    first, second = env.add_batmon(), env.add_batmon(batmon_name="Starter")
    env.bridge()
    devices = [(first.id, first.token), (second.id, second.token)]
    env.loop.run(simulate(host="127.0.0.1", port=env.port, devices=devices, interval=0.05, count=3,
                          base_topic=env.topics.base))  # fmt: skip
    env.wait_count(first, 3)
    env.wait_count(second, 3)
    for row in env.history(first) + env.history(second):
        assert 11.0 <= row["batmon_voltage"] <= 14.0 and 0 <= row["batmon_soc"] <= 100


def test_a_reading_not_yet_committed_when_the_bridge_stops_is_redelivered(env: Env) -> None:
    batmon = env.add_batmon()
    received = threading.Event()

    async def stuck_ingest(batmon: Batmon, readings: Any) -> None:
        received.set()
        await asyncio.Event().wait()  # as if the process died before the commit

    real_ingest = env.core.ingest_readings
    env.core.ingest_readings = stuck_ingest  # type: ignore[method-assign]
    bridge = env.bridge()
    env.probe().publish(env.topics.update(batmon.id, batmon.token), b'{"voltage": 12.5}')
    assert received.wait(3)
    env.loop.run(bridge.stop())
    env.core.ingest_readings = real_ingest  # type: ignore[method-assign]
    assert env.count(batmon) == 0

    env.bridge()  # not acked, so the broker delivers it again to the same session
    env.wait_count(batmon, 1)
    assert [r["batmon_voltage"] for r in env.history(batmon)] == [12.5]



def test_a_redelivered_committed_update_is_not_stored_twice(env: Env) -> None:
    """After a session resume the broker resends unacked updates with DUP set; one whose
    commit we made (only the ack was lost) must not become a second reading."""
    batmon = env.add_batmon()
    bridge = env.bridge()
    topic = env.topics.update(batmon.id, batmon.token)
    first = mqtt_bridge._Inbound(topic, b'{"voltage": 12.5}', mid=1, qos=1, connection=0)
    resent = mqtt_bridge._Inbound(topic, b'{"voltage": 12.5}', mid=1, qos=1, connection=0, dup=True)
    again = mqtt_bridge._Inbound(topic, b'{"voltage": 12.5}', mid=2, qos=1, connection=0)
    for item in (first, resent, again):
        env.loop.run(bridge._process(item))
    # The retransmission is dropped; a new message with equal values is a new reading.
    assert [r["batmon_voltage"] for r in env.history(batmon)] == [12.5, 12.5]
    assert bridge.stats["dropped_duplicate"] == 1
