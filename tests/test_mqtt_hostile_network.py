"""A hostile network against a real `batmon serve` (issue 15, acceptance 2 and 3), loopback only,
bounded in count and time.

- One address (127.0.0.2) keeps 1,000 silent sockets open to the MQTT port, reopening each the
  broker closes, as an attacker would: a valid device from 127.0.0.1 logs in, 10 of 10 tries.
- A user publishes 1,000 ``online`` messages on Home Assistant's status topic: the server's
  memory barely moves, another owner's readings reach their retained state within a second, and
  the flooding user's discovery configs are re-sent at most twice (once at once, once when the
  30 s interval ends), counted by a subscriber holding Home Assistant's real filters.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import resource
import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator

import httpx2 as httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import ServeProcess
from tests.home_assistant import DISCOVERY_FILTERS
from tests.load import add_batmons, rss_mb
from tests.support import batmon

WAIT = 10.0  # every single wait; a loaded 2-core machine is slow, not stuck
SILENT_SOCKETS = 1_000
ATTACKER = "127.0.0.2"


def mqtt_port(serve: ServeProcess) -> int:
    return int(serve.mqtt_url.rsplit(":", 1)[1])


class SilentSockets:
    """``count`` TCP sockets from ``source`` that never send a byte; each one the server
    closes is opened again, at most ``opens_per_s`` a second (a bound on this test, not
    on the attack)."""

    def __init__(self, port: int, source: str, count: int, opens_per_s: float = 500) -> None:
        self.port, self.source, self.count, self.opens_per_s = port, source, count, opens_per_s
        self.opened = 0
        self.closed_by_server = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SilentSockets:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(WAIT)

    def _open(self, selector: selectors.BaseSelector) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.bind((self.source, 0))
            code = sock.connect_ex(("127.0.0.1", self.port))
        except OSError as exc:  # no local port free for a moment: try again next round
            code = exc.errno or errno.EADDRNOTAVAIL
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self.closed_by_server += 1
            return
        selector.register(sock, selectors.EVENT_READ)
        self.opened += 1

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        started = time.monotonic()
        try:
            while not self._stop.is_set():
                allowed = int((time.monotonic() - started) * self.opens_per_s) + 1
                while len(selector.get_map()) < self.count and self.opened < allowed:
                    self._open(selector)
                for key, _ in selector.select(timeout=0.01):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    try:
                        data = sock.recv(1)
                    except OSError:
                        data = b""
                    if not data:  # closed by the server (or refused): open another
                        selector.unregister(sock)
                        sock.close()
                        self.closed_by_server += 1
        finally:
            for key in list(selector.get_map().values()):
                with contextlib.suppress(OSError):
                    key.fileobj.close()  # type: ignore[union-attr]
            selector.close()


def connack(port: int, username: str, password: str) -> int:
    """A fresh MQTT 3.1.1 login from 127.0.0.1: the CONNACK return code."""
    codes: queue.Queue[int] = queue.Queue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311, reconnect_on_failure=False)
    client.username_pw_set(username, password)
    client.on_connect = lambda c, u, f, rc, p: codes.put(rc.value)
    client.on_disconnect = lambda c, u, f, rc, p: codes.put(-1)  # closed without a CONNACK
    try:
        client.connect("127.0.0.1", port, keepalive=30)
        client.loop_start()
        return codes.get(timeout=WAIT)
    except (OSError, queue.Empty):
        return -1
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.fixture
def enough_file_descriptors() -> Iterator[None]:
    """This process holds the 1,000 attacking sockets: make room for them beside what it has open.

    The raised limit stays for the rest of the session: lowered again while the closed sockets'
    descriptors are still being released, every later test's connect failed with EMFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = len(os.listdir("/proc/self/fd")) + SILENT_SOCKETS + 512
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.fail(f"ulimit -n allows {hard} files here; the test needs {want} (raise the hard limit)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    yield


def test_1000_silent_sockets_from_one_address_do_not_lock_a_valid_device_out(
    serve: ServeProcess, enough_file_descriptors: None
) -> None:
    serve.start()
    port = mqtt_port(serve)
    [device] = add_batmons(serve, 1)
    assert connack(port, str(device.batmon_id), device.token) == 0  # before the attack
    with SilentSockets(port, ATTACKER, SILENT_SOCKETS) as attack:
        deadline = time.monotonic() + 30
        while attack.opened < SILENT_SOCKETS and time.monotonic() < deadline:
            time.sleep(0.05)
        assert attack.opened >= SILENT_SOCKETS, f"only {attack.opened} sockets opened"
        codes = [connack(port, str(device.batmon_id), device.token) for _ in range(10)]
        opened, closed = attack.opened, attack.closed_by_server
    print(f"\nattacker opened {opened} sockets, {closed} closed by the server; device CONNACKs {codes}")
    assert codes == [0] * 10
    # The server closed the attacker's sockets beyond its 16 at once, not after a timeout.
    assert closed >= SILENT_SOCKETS - 16
    with httpx.Client(base_url=serve.http_url, timeout=WAIT) as http:
        broker = http.get("/healthz").json()["mqtt_broker"]
    assert broker["closed_unauthenticated_per_address"] >= SILENT_SOCKETS - 16
    assert broker.get("refused_connection_limit", 0) == 0


# -- Home Assistant's birth message, flooded ---------------------------------------------

FLOOD = 1_000
FLOODER_BATMONS = 300  # the machine had 513 batmons
RESEND_INTERVAL_S = 30.0


class Listener:
    """A paho client logged in as a user, recording (arrival time, message) per topic."""

    def __init__(self, port: int, username: str, password: str, *, inflight: int = 20) -> None:
        self.lock = threading.Lock()
        self.live: Counter[str] = Counter()  # messages sent now, not replayed retained ones
        self.arrived: dict[str, list[tuple[float, bytes]]] = {}
        connacks: queue.Queue[int] = queue.Queue()
        self.subacks: queue.Queue[list[int]] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311,
                                  reconnect_on_failure=False)  # fmt: skip
        self.client.username_pw_set(username, password)
        self.client.max_inflight_messages_set(inflight)
        self.client.on_connect = lambda c, u, f, rc, p: connacks.put(rc.value)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put([r.value for r in rcs])
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert connacks.get(timeout=WAIT) == 0

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            if not msg.retain:
                self.live[msg.topic] += 1
            self.arrived.setdefault(msg.topic, []).append((time.monotonic(), msg.payload))

    def subscribe(self, filters: list[str], qos: int = 0) -> list[int]:
        self.client.subscribe([(f, qos) for f in filters])
        return self.subacks.get(timeout=WAIT)

    def first_after(self, topic: str, since: float, match: bytes) -> float | None:
        with self.lock:
            times = [t for t, payload in self.arrived.get(topic, []) if t >= since and match in payload]
        return times[0] if times else None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_a_flood_of_home_assistant_online_resends_only_the_flooders_configs_at_most_twice(
    serve: ServeProcess,
) -> None:
    serve.start()
    port = mqtt_port(serve)
    flooder_devices = add_batmons(serve, FLOODER_BATMONS)  # the admin's
    other_key = batmon("user", "add", "other@example.org", "--data-dir", str(serve.data_dir)).stdout.strip()
    with httpx.Client(base_url=serve.http_url, timeout=WAIT) as http:
        added = http.post("/interface/add/batmon", headers={"X-API-Key": other_key},
                          json={"batmon_name": "Neighbour", "update_period": 86_400})  # fmt: skip
        assert added.status_code == 200, added.text
        other = added.json()["success"]
    other_config = f"homeassistant/device/batmon_{other['batmon_id']}/config"
    other_state = f"batmon/{other['batmon_id']}/state"

    counter = Listener(port, "admin@localhost", serve.admin_key or "")  # the flooder's HA
    assert counter.subscribe(DISCOVERY_FILTERS) == [0] * len(DISCOVERY_FILTERS)
    neighbour = Listener(port, "other@example.org", other_key)
    assert neighbour.subscribe([*DISCOVERY_FILTERS, other_state], qos=1) == [1] * (len(DISCOVERY_FILTERS) + 1)
    device = Listener(port, str(other["batmon_id"]), other["batmon_token"])
    flooder = Listener(port, "admin@localhost", serve.admin_key or "", inflight=100)
    time.sleep(1.0)  # retained replays in, memory settled
    assert serve.proc is not None
    rss_before = rss_mb(serve.proc.pid)
    rss_peak = rss_before
    latencies: list[float] = []
    try:
        infos = [flooder.client.publish("homeassistant/status", "online", qos=1) for _ in range(FLOOD)]
        flood_started = time.monotonic()
        # Another owner's device publishes while the flood is served; the state must follow.
        sample = 0
        while time.monotonic() < flood_started + RESEND_INTERVAL_S + 5:
            sample += 1
            sent_at = time.monotonic()
            device.client.publish(f"batmon/{other['batmon_id']}/{other['batmon_token']}/update",
                                  json.dumps({"voltage": 12.0 + sample / 1000}), qos=1)  # fmt: skip
            marker = f"{12.0 + sample / 1000}".encode()
            while (got := neighbour.first_after(other_state, sent_at, marker)) is None:
                if time.monotonic() > sent_at + WAIT:
                    break
                time.sleep(0.005)
            latencies.append((got or time.monotonic()) - sent_at)
            rss_peak = max(rss_peak, rss_mb(serve.proc.pid))
            time.sleep(0.25)
        unacked = sum(1 for info in infos if not info.is_published())
        time.sleep(2.0)  # a re-send due at the interval's end has arrived
        rss_peak = max(rss_peak, rss_mb(serve.proc.pid))
        with counter.lock:
            resent = [counter.live[f"homeassistant/device/batmon_{d.batmon_id}/config"]
                      for d in flooder_devices]  # fmt: skip
            foreign = [t for t in counter.live if t == other_config]
        with neighbour.lock:
            neighbour_resent = neighbour.live[other_config]
    finally:
        for listener in (flooder, device, neighbour, counter):
            listener.close()
    print(f"\n{FLOOD} online: RSS {rss_before:.1f} -> peak {rss_peak:.1f} MB; state latency max"
          f" {max(latencies) * 1000:.0f} ms over {len(latencies)} readings; re-sends per config"
          f" {Counter(resent)}; {unacked} online unacked")  # fmt: skip
    assert unacked == 0, "the broker did not take the whole flood"
    assert rss_peak - rss_before <= 32, f"RSS rose by {rss_peak - rss_before:.1f} MB"
    assert max(latencies) <= 1.0, f"state latency {max(latencies):.2f} s"
    assert max(resent) <= 2, f"configs re-sent up to {max(resent)} times"
    assert min(resent) >= 1, "the flooder's configs were never re-sent"
    assert not foreign and neighbour_resent == 0  # nobody else's configs went out
    with httpx.Client(base_url=serve.http_url, timeout=WAIT) as http:
        stats = http.get("/healthz").json()["mqtt_stats"]
    answered = {k: stats.get(f"homeassistant_online_{k}") for k in ("answered", "deferred", "folded")}
    assert answered == {"answered": 1, "deferred": 1, "folded": FLOOD - 2}, answered
