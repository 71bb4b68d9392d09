"""Several real `batmon serve` workers on one PostgreSQL database and one private Mosquitto,
as deploy/batmon@.service runs them: the scale-out tests' one harness (issue 16).

Every worker gets the same session key (a login made on one is honoured by the others, as
the unit arranges with LoadCredential=), its own data folder and its own free HTTP port.
A killed worker is restarted with the same arguments, as systemd's Restart=always would.
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2 as httpx
import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import ServeProcess
from tests.pg_support import fresh_database_url
from tests.support import ROOT, PrivateMosquitto

# What the shipped broker settings say about queues and inflight windows, so the private
# Mosquitto queues a dead member's share as a deployed one would (its default, 1000 queued
# messages, would drop readings it already acknowledged to their devices).
BROKER_SETTINGS = ("max_queued_messages", "max_queued_bytes", "max_inflight_messages", "set_tcp_nodelay")


def shipped_broker_settings() -> str:
    """Those lines of deploy/mosquitto.conf, as they are there."""
    lines = (ROOT / "deploy" / "mosquitto.conf").read_text().splitlines()
    return "".join(line + "\n" for line in lines if line.split(" ", 1)[0] in BROKER_SETTINGS)


class Workers:
    """N `batmon serve --mqtt-url ... --database-url ...` processes; ``extra(i)`` adds
    per-worker arguments (a client id, a share group)."""

    def __init__(self, root: Path, database_url: str, broker: PrivateMosquitto,
                 extra: Callable[[int], list[str]] = lambda i: []) -> None:  # fmt: skip
        self.root = root
        self.database_url = database_url
        self.broker = broker
        self.extra = extra
        self.procs: list[ServeProcess] = []
        self.admin_key: str | None = None

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.broker.port}"

    def _process(self, i: int) -> ServeProcess:
        data_dir = self.root / f"worker-{i}"
        if i > 0:  # the shared session key, as the unit hands one to every instance
            data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            shutil.copy(self.root / "worker-0" / "session.key", data_dir / "session.key")
        extra = self.extra(i)
        if "--mqtt-client-id" not in extra:  # one session per worker, as the unit's %i gives
            extra = [*extra, "--mqtt-client-id", f"batmon-worker-{i}"]
        args = ["--mqtt-url", self.mqtt_url, "--database-url", self.database_url, *extra]
        return ServeProcess(data_dir, args=args)

    def start(self, n: int) -> list[ServeProcess]:
        """Start workers 0..n-1, the first alone (it makes the schema and the admin user)."""
        for i in range(len(self.procs), n):
            proc = self._process(i).start()
            if i == 0:
                self.admin_key = proc.admin_key
            self.procs.append(proc)
        return self.procs

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        self.procs[i].stop(sig)

    def restart(self, i: int) -> ServeProcess:
        """Worker i again, same folder and arguments (systemd's Restart=always)."""
        old = self.procs[i]
        if old.proc is not None and old.proc.poll() is None:
            old.stop()
        self.procs[i] = ServeProcess(old.data_dir, args=old.args).start()
        return self.procs[i]

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.proc is not None:
                proc.stop(signal.SIGKILL)

    def health(self, i: int) -> dict[str, Any]:
        """Worker i's /healthz (its MQTT counters are under ``mqtt_stats``)."""
        return httpx.get(f"{self.procs[i].http_url}/healthz", timeout=10).json()  # type: ignore[no-any-return]

    def add_batmons(self, n: int) -> list[tuple[int, str]]:
        """n batmons of the admin, through worker 0's API: their (id, token)."""
        added = []
        with httpx.Client(base_url=self.procs[0].http_url, headers=self.auth, timeout=10) as http:
            for k in range(n):
                r = http.post("/interface/add/batmon", json={"batmon_name": f"Pack {k}"})
                assert r.status_code == 200, r.text
                added.append((r.json()["success"]["batmon_id"], r.json()["success"]["batmon_token"]))
        return added

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Rows of one query on the workers' database (what they stored, whoever stored it)."""
        with psycopg.connect(self.database_url) as conn:
            return conn.execute(sql).fetchall()  # type: ignore[arg-type]

    @property
    def auth(self) -> dict[str, str]:
        assert self.admin_key, "worker 0 printed no api_key: was the database not empty?"
        return {"X-API-Key": self.admin_key}


@contextmanager
def workers(tmp_path: Path, extra: Callable[[int], list[str]] = lambda i: []) -> Iterator[Workers]:
    """A fresh database, a private Mosquitto with persistence, and no worker yet."""
    (tmp_path / "mosquitto").mkdir(parents=True, exist_ok=True)
    broker = PrivateMosquitto(tmp_path / "mosquitto", extra=shipped_broker_settings()).start()
    group = Workers(tmp_path / "workers", fresh_database_url(), broker, extra)
    try:
        yield group
    finally:
        group.stop_all()
        broker.stop()


class Device:
    """A battery monitor on the workers' broker: a paho client publishing QoS 1 updates,
    keeping which of them the broker acknowledged (PUBACK)."""

    def __init__(self, port: int, batmon_id: int, token: str, base: str = "batmon") -> None:
        self.batmon_id = batmon_id
        self.topic = f"{base}/{batmon_id}/{token}/update"
        self.sent: dict[int, float] = {}  # mid -> the reading's ts
        self._acked_mids: list[int] = []  # appended by paho's thread (list.append is atomic)
        self.connected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"device-{batmon_id}",
                                  protocol=mqtt.MQTTv311)  # fmt: skip
        self.client.on_connect = lambda *args: self.connected.set()
        self.client.on_publish = lambda client, userdata, mid, *rest: self._acked_mids.append(mid)
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()

    def publish(self, reading: dict[str, Any]) -> None:
        """Queue one QoS 1 update (paho sends it when its inflight window has room)."""
        info = self.client.publish(self.topic, json.dumps(reading), qos=1)
        self.sent[info.mid] = reading["ts"]

    @property
    def acked(self) -> list[float]:
        """The ts of every reading the broker acknowledged."""
        return [self.sent[mid] for mid in list(self._acked_mids)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
