"""Load and fault kit for the black-box durability tests: devices that publish QoS 1
readings at a set rate and remember exactly which ones the broker acknowledged, HTTP
senders, history look-ups, a tmpfs that can be filled, and the serve process's RSS.

Every reading carries a value unique within its batmon (and, unless told otherwise, a
`ts`), so it can be found again in history and counted: missing, duplicated, reordered.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import ServeProcess
from tests.support import PrivateMosquitto

WAIT_S = 60.0  # bound on every wait in these tests: a loaded 2-core machine is slow, not stuck


@dataclass(frozen=True)
class Device:
    """A batmon as a device sees it: id, token and the topic it publishes on."""

    batmon_id: int
    token: str
    base_topic: str = "batmon"

    @property
    def topic(self) -> str:
        return f"{self.base_topic}/{self.batmon_id}/{self.token}/update"


@dataclass
class Sent:
    """One published message: the reading values it carried, and paho's receipt."""

    values: list[float]
    info: mqtt.MQTTMessageInfo

    @property
    def acked(self) -> bool:
        """True once the broker's PUBACK arrived (paho marks QoS 1 published only then)."""
        try:
            return self.info.is_published()
        except (RuntimeError, ValueError):  # never sent: the connection was already gone
            return False


class DeviceClient:
    """One device's paho MQTT 3.1.1 connection, publishing QoS 1 with a wide inflight window.

    It never reconnects: a device that resent after a crash would blur who sent what twice.
    """

    def __init__(self, port: int, device: Device, *, auth: bool, inflight: int = 1000) -> None:
        self.device = device
        self.sent: list[Sent] = []
        self.acks = 0
        self._connected = threading.Event()
        self._refused: str | None = None
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311,
                                  reconnect_on_failure=False)  # fmt: skip
        if auth:  # the embedded broker: username batmon_id, password batmon_token (SPEC 5)
            self.client.username_pw_set(str(device.batmon_id), device.token)
        self.client.max_inflight_messages_set(inflight)
        self.client.max_queued_messages_set(0)
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", port, keepalive=60)
        self.client.loop_start()
        assert self._connected.wait(10), "device could not connect"
        assert self._refused is None, f"broker refused the device: {self._refused}"

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._refused = str(reason)
        self._connected.set()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        self.acks += 1

    def publish(self, readings: list[dict[str, Any]], key: str = "voltage") -> Sent:
        """Publish one reading (an object) or several (an array); QoS 1."""
        body: Any = readings[0] if len(readings) == 1 else readings
        info = self.client.publish(self.device.topic, json.dumps(body), qos=1)
        sent = Sent([r[key] for r in readings], info)
        self.sent.append(sent)
        return sent

    def acked_values(self) -> list[float]:
        return [v for s in self.sent if s.acked for v in s.values]

    def sent_values(self) -> list[float]:
        return [v for s in self.sent for v in s.values]

    def unacked(self) -> int:
        return sum(not s.acked for s in self.sent)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()


class TimedDevice(DeviceClient):
    """A device that notes when each message left and when its PUBACK came."""

    def __init__(self, port: int, device: Device, *, auth: bool = True) -> None:
        self.published_at: dict[int, float] = {}
        self.acked_at: dict[int, float] = {}
        super().__init__(port, device, auth=auth)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        self.acked_at[mid] = time.monotonic()
        super()._on_publish(client, userdata, mid, reason, props)

    def publish(self, readings: list[dict[str, Any]], key: str = "voltage") -> Any:
        at = time.monotonic()
        sent = super().publish(readings, key)
        self.published_at[sent.info.mid] = at
        return sent

    def latencies(self, start: float, end: float) -> list[float]:
        """Seconds from publish to PUBACK of the messages published in [start, end)."""
        return [self.acked_at.get(mid, float("inf")) - at
                for mid, at in self.published_at.items() if start <= at < end]  # fmt: skip


class Load:
    """Publishes ``total`` readings round-robin over devices at ``rate`` per second, on a thread.

    Reading i of a device has voltage ``i`` (its identity in history) and ``ts`` = send time.
    """

    def __init__(self, clients: list[DeviceClient], total: int, rate: float, *, with_ts: bool = True,
                 per_message: int = 1, details_bytes: int = 0) -> None:  # fmt: skip
        self.clients = clients
        self.details_bytes = details_bytes
        self.total = total
        self.rate = rate
        self.with_ts = with_ts
        self.per_message = per_message
        self.stopped = threading.Event()
        self.done = threading.Event()
        self.published = 0
        self.elapsed = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Load:
        self._thread.start()
        return self

    def _run(self) -> None:
        start = time.monotonic()
        counters = [0] * len(self.clients)
        try:
            for i in range(self.total):
                if self.stopped.is_set():
                    break
                ahead = start + i / self.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
                k = i % len(self.clients)
                readings = []
                for _ in range(self.per_message):
                    reading: dict[str, Any] = {"voltage": float(counters[k]), "current": float(k)}
                    if self.with_ts:
                        reading["ts"] = round(time.time(), 6)
                    if self.details_bytes:  # bulk: what the product holds uncommitted costs memory
                        reading["details"] = {"pad": "x" * self.details_bytes}
                    readings.append(reading)
                    counters[k] += 1
                self.clients[k].publish(readings)
                self.published += 1
        finally:
            self.elapsed = time.monotonic() - start
            self.done.set()

    def acked(self) -> int:
        return sum(c.acks for c in self.clients)

    def offered_rate(self) -> float:
        """Messages per second actually published (the machine may not keep up with ``rate``)."""
        return self.published / self.elapsed if self.elapsed else 0.0

    def stop(self) -> None:
        self.stopped.set()
        self._thread.join(WAIT_S)

    def wait_acked(self, timeout: float = WAIT_S) -> bool:
        """Wait until every published message is acknowledged; False at the timeout."""
        assert self.done.wait(timeout), "the publisher did not finish"
        deadline = time.monotonic() + timeout
        while any(c.unacked() for c in self.clients):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True


@dataclass
class Landing:
    """How the readings sent to one batmon came out in its history."""

    sent: list[float]
    acked: list[float]
    history: list[float]
    missing: list[float] = field(default_factory=list)  # acknowledged, not in history
    duplicates: int = 0  # rows beyond the first of one reading
    unknown: int = 0  # rows nobody sent

    @classmethod
    def of(cls, sent: list[float], acked: list[float], history: list[float]) -> Landing:
        counts = Counter(history)
        sent_set = set(sent)
        return cls(
            sent, acked, history,
            missing=[v for v in acked if counts[v] == 0],
            duplicates=sum(n - 1 for n in counts.values() if n > 1),
            unknown=sum(n for v, n in counts.items() if v not in sent_set),
        )  # fmt: skip

    def in_order(self) -> bool:
        """History, first occurrences only, lists readings in the order they were sent."""
        first = list(dict.fromkeys(self.history))
        rank = {v: i for i, v in enumerate(self.sent)}
        ranks = [rank[v] for v in first if v in rank]
        return ranks == sorted(ranks)


# -- HTTP ----------------------------------------------------------------------

def admin_headers(serve: ServeProcess) -> dict[str, str]:
    return {"X-API-Key": serve.admin_key or ""}


def add_batmons(serve: ServeProcess, count: int, base_topic: str = "batmon") -> list[Device]:
    """Add ``count`` batmons over HTTP as the admin; update_period a day, so they stay Online."""
    devices = []
    with httpx.Client(base_url=serve.http_url, timeout=30) as http:
        for i in range(count):
            r = http.post("/interface/add/batmon", headers=admin_headers(serve),
                          json={"batmon_name": f"load {i}", "update_period": 86_400})  # fmt: skip
            assert r.status_code == 200, r.text
            added = r.json()["success"]
            devices.append(Device(added["batmon_id"], added["batmon_token"], base_topic))
    return devices


def alarm_notices(http: httpx.Client, target: str, count: int) -> list[int]:
    """Make ``count`` alarm notices for the caller (``http`` carries its key): its email target
    set to ``target``, and per notice a batmon whose alarm (voltage >= 10 V, repeated hourly)
    a 12 V update triggers. Returns the batmons' ids."""
    r = http.post("/interface/user/notifications", json={"email_url": target})
    assert r.status_code == 200, r.text
    ids = []
    for k in range(count):
        added = http.post("/interface/add/batmon", json={"batmon_name": f"Pack {k}"}).json()["success"]
        batmon_id, token = added["batmon_id"], added["batmon_token"]
        r = http.post("/interface/batmon/alarm/add", json={
            "batmon_id": batmon_id, "alarm_name": "High", "alarm_metric": "voltage", "alarm_condition": ">=",
            "alarm_threshold_value": 10, "alarm_repeat_delay": 3600})  # fmt: skip
        assert r.status_code == 200, r.text
        r = http.post("/interface/update/batmon", json={"batmon_id": batmon_id, "batmon_token": token,
                                                        "voltage": 12})  # fmt: skip
        assert r.status_code == 200, r.text
        ids.append(batmon_id)
    return ids


def history_values(http: httpx.Client, serve: ServeProcess, batmon_id: int, key: str = "batmon_voltage",
                   ) -> list[float]:  # fmt: skip
    """One batmon's whole history, in the order the API returns it, as ``key`` values."""
    r = http.get("/interface/batmon/history", headers=admin_headers(serve),
                 params={"batmon_id": batmon_id, "min_epoch_tm_sec": 0,
                         "max_epoch_tm_sec": int(time.time()) + 120})  # fmt: skip
    assert r.status_code == 200, r.text
    [entry] = r.json()["success"]
    return [row[key] for row in entry["data"]]


def landings(serve: ServeProcess, clients: list[DeviceClient]) -> dict[int, Landing]:
    """Each device's sent / acknowledged readings against its batmon's history."""
    with httpx.Client(base_url=serve.http_url, timeout=60) as http:
        return {
            c.device.batmon_id: Landing.of(c.sent_values(), c.acked_values(),
                                           history_values(http, serve, c.device.batmon_id))
            for c in clients
        }  # fmt: skip


def wait_history(serve: ServeProcess, clients: list[DeviceClient], want: int, timeout: float = WAIT_S,
                 ) -> dict[int, Landing]:  # fmt: skip
    """Poll until ``want`` distinct readings are in the devices' histories together (a
    duplicate does not count: it must not end the wait early); then the landings."""
    deadline = time.monotonic() + timeout
    while True:
        found = landings(serve, clients)
        rows = sum(len(set(landing.history)) for landing in found.values())
        if rows >= want or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


@dataclass
class Answer:
    """One HTTP update: the value it carried, the status, and Retry-After if any."""

    value: float
    status: int
    retry_after: str | None
    at: float  # time.monotonic() when the answer came
    sent: float  # time.monotonic() when the request left


class HttpSender:
    """A device updating over one keep-alive HTTP connection, on a thread, until stopped.

    Reading i carries voltage ``i``; every answer is kept, so each ``success`` can be
    looked up in history and each refusal checked for its status and Retry-After.
    """

    def __init__(self, serve: ServeProcess, device: Device, pause_s: float = 0.01) -> None:
        self.serve = serve
        self.device = device
        self.pause_s = pause_s
        self.answers: list[Answer] = []
        self.errors: list[str] = []
        self.stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> HttpSender:
        self._thread.start()
        return self

    def _run(self) -> None:
        i = 0
        with httpx.Client(base_url=self.serve.http_url, timeout=30) as http:
            while not self.stopped.is_set():
                sent = time.monotonic()
                try:
                    r = http.post("/interface/update/batmon", json={
                        "batmon_id": self.device.batmon_id, "batmon_token": self.device.token,
                        "voltage": float(i)})  # fmt: skip
                    self.answers.append(Answer(float(i), r.status_code, r.headers.get("Retry-After"),
                                               time.monotonic(), sent))  # fmt: skip
                except httpx.HTTPError as exc:  # counted: a timeout is an answer too
                    self.errors.append(f"{float(i)}: {type(exc).__name__}")
                i += 1
                time.sleep(self.pause_s)

    def stop(self) -> None:
        self.stopped.set()
        self._thread.join(WAIT_S)

    def with_status(self, status: int) -> list[Answer]:
        return [a for a in self.answers if a.status == status]

    def statuses(self) -> Counter[int]:
        return Counter(a.status for a in self.answers)


def healthz(http: httpx.Client) -> tuple[int, dict[str, Any]]:
    r = http.get("/healthz")
    return r.status_code, r.json()


def counted_drops(health: Any) -> int:
    """Sum of every counter in a /healthz body whose name speaks of dropping or losing."""
    if isinstance(health, dict):
        total = 0
        for name, value in health.items():
            if isinstance(value, int) and not isinstance(value, bool) and (
                    "drop" in name or "lost" in name or "discard" in name):  # fmt: skip
                total += value
            else:
                total += counted_drops(value)
        return total
    if isinstance(health, list):
        return sum(counted_drops(v) for v in health)
    return 0


# -- processes and files ------------------------------------------------------

def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def private_mosquitto(folder: Path) -> PrivateMosquitto:
    """A private Mosquitto keeping sessions on disk, with no cap on a session's queue.

    Mosquitto's default ``max_queued_messages 1000`` would drop readings queued for a
    bridge that is down (issue 9 measured 7,140 of 12,000 lost); an operator raises it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    broker = PrivateMosquitto(folder)
    broker.config.write_text(broker.config.read_text() + "max_queued_messages 0\nmax_queued_bytes 0\n")
    return broker.start()


@contextlib.contextmanager
def tmpfs(mount_point: Path, size_kb: int) -> Iterator[Path]:
    """A tmpfs of ``size_kb`` KiB at ``mount_point`` (needs CAP_SYS_ADMIN); unmounted after."""
    mount_point.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0700", "tmpfs",
                             str(mount_point)], capture_output=True, text=True)  # fmt: skip
    if result.returncode != 0:
        raise PermissionError(result.stderr.strip() or "mount failed")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill_disk(folder: Path) -> Path:
    """Write a file until the file system is full (ENOSPC); deleting it clears the fault."""
    filler = folder / "filler.bin"
    chunk = b"\0" * 65536
    with open(filler, "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(chunk)
        # The last partial chunk: fill the remaining blocks one page at a time.
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
    return filler


@contextlib.contextmanager
def restarted(serve: ServeProcess) -> Iterator[ServeProcess]:
    """``batmon serve`` started again on the same data folder and options; stopped after."""
    again = ServeProcess(serve.data_dir, args=list(serve.args), env=dict(serve.env)).start(timeout=WAIT_S)
    again.admin_key = serve.admin_key  # printed only on the first start
    try:
        yield again
    finally:
        again.stop()
