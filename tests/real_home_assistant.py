"""A real Home Assistant against a real `batmon serve`: run by hand, not by pytest (it takes
minutes: Home Assistant compiles statistics every 5 minutes).

    python -m tests.real_home_assistant /path/to/venv-with-homeassistant/bin/hass

Home Assistant needs Python 3.12+ (this project runs on 3.11), so it runs from a venv of its
own (`homeassistant==2025.1.4` on Python 3.12 was used; docs/BATTERY.md has the result). What
it checks, with Home Assistant's own code doing the judging:

1. its MQTT integration, logged in as a user of the embedded broker, creates the energy
   sensors from our discovery with device_class energy and state_class total_increasing;
2. their values survive a restart of `batmon serve` (same ports) and do not go down;
3. its recorder's statistics metadata lists them with a sum (has_sum), which is what its
   Energy dashboard needs from a battery's energy in / out.
"""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx2 as httpx

from tests.conftest import ServeProcess
from tests.support import free_port
from tests.test_serve_end_to_end import Client

STATS_WAIT_S = 420  # statistics are compiled every 5 minutes, on the 5-minute mark


def wait(check: Any, what: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if value := check():
                return value
        except (sqlite3.Error, OSError, ValueError, KeyError):
            pass
        time.sleep(1)
    raise AssertionError(f"{what}: not within {timeout} s")


def config_entry(port: int, username: str, password: str) -> dict[str, Any]:
    """The MQTT config entry the UI flow would write (homeassistant/config_entries.py v1.4)."""
    now = datetime.now(UTC).isoformat()
    return {"version": 1, "minor_version": 4, "key": "core.config_entries", "data": {"entries": [{
        "entry_id": uuid.uuid4().hex, "version": 1, "minor_version": 1, "domain": "mqtt",
        "title": "batmon", "data": {"broker": "127.0.0.1", "port": port, "username": username,
                                     "password": password},
        "options": {"discovery": True, "discovery_prefix": "homeassistant"},
        "pref_disable_new_entities": False, "pref_disable_polling": False, "source": "user",
        "unique_id": None, "disabled_by": None, "created_at": now, "modified_at": now,
        "discovery_keys": {},
    }]}}  # fmt: skip


def states(db: Path, entity_id: str) -> list[tuple[str, str]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(
            "SELECT s.state, s.attributes_id FROM states s JOIN states_meta m USING (metadata_id)"
            " WHERE m.entity_id = ? ORDER BY s.state_id", (entity_id,)).fetchall()
    finally:
        conn.close()


def main(hass: str) -> None:
    work = Path(tempfile.mkdtemp(prefix="ha-real-"))
    mqtt_port, http_port = free_port(), free_port()
    # A fixed MQTT port for this run: after the restart Home Assistant reconnects there.
    serve = ServeProcess(work / "data", args=["--mqtt-port", str(mqtt_port)])
    serve.start()
    key = serve.admin_key or ""
    added = httpx.post(f"{serve.http_url}/interface/add/batmon", headers={"X-API-Key": key},
                       data={"batmon_name": "House bank", "update_period": 60}).json()["success"]  # fmt: skip
    batmon_id, token = added["batmon_id"], added["batmon_token"]
    device = Client(mqtt_port, str(batmon_id), token)

    def send(watts: float, count: int) -> None:
        start = time.time() - count * 10
        device.publish(f"batmon/{batmon_id}/{token}/update", json.dumps(
            [{"power": watts, "voltage": 13.0, "ts": start + 10 * i,
              "details": {"temperature": 19.5, "cells": [3.3, 3.31, 3.28, 3.3]}} for i in range(count)]))

    send(-120.0, 60)  # 10 minutes of discharge, device time

    config = work / "ha"
    (config / ".storage").mkdir(parents=True)
    (config / "configuration.yaml").write_text(
        "homeassistant:\n  name: batmon test\n  time_zone: UTC\n  unit_system: metric\n"
        "  latitude: 0\n  longitude: 0\n  elevation: 0\n"
        f"http:\n  server_port: {http_port}\n  server_host: 127.0.0.1\n"
        "recorder:\n  commit_interval: 1\nlogger:\n  default: info\n")
    (config / ".storage" / "core.config_entries").write_text(
        # Logged in as the batmon's owner: a user sees only their own batmons' topics.
        json.dumps(config_entry(mqtt_port, "admin@localhost", key)))
    with open(work / "ha.log", "w") as log:
        ha = subprocess.Popen([hass, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT)
    db = config / "home-assistant_v2.db"
    try:
        charged_id = "sensor.house_bank_energy_charged"
        discharged_id = "sensor.house_bank_energy_discharged"
        first = wait(lambda: [s for s, _ in states(db, discharged_id) if s not in ("unknown", "unavailable")],
                     "HA's energy discharged sensor with a value", 600)
        print("energy discharged in HA before the restart:", first[-1])
        # Home Assistant writes its entity registry a few seconds after a change.
        registry = wait(lambda: json.loads((config / ".storage" / "core.entity_registry").read_text()),
                        "the entity registry on disk", 120)
        entities = {e["entity_id"]: e for e in registry["data"]["entities"]}
        for entity_id in (charged_id, discharged_id):
            e = entities[entity_id]
            print(entity_id, "unique_id", e["unique_id"], "device_class", e["original_device_class"],
                  "capabilities", e["capabilities"], "unit", e["unit_of_measurement"])
            assert e["original_device_class"] == "energy"
            assert e["capabilities"] == {"state_class": "total_increasing"}

        serve.stop(signal.SIGTERM)
        serve.proc = None
        serve.start()
        device.close()
        device = Client(mqtt_port, str(batmon_id), token)
        send(300.0, 60)  # 10 minutes of charge after the restart
        seen = wait(lambda: [s for s, _ in states(db, charged_id) if s not in ("unknown", "unavailable")
                             and float(s) > 0], "energy charged after the restart", 120)  # fmt: skip
        after = [s for s, _ in states(db, discharged_id)]
        print("energy discharged states across the restart:", after)
        print("energy charged states after the restart:", seen)
        numbers = [float(s) for s in after if s not in ("unknown", "unavailable")]
        # Never down, never back to 0: 'unavailable' while serve restarts (the bridge's last
        # will), then the counter where it was (plus what the new readings added).
        assert numbers == sorted(numbers) and numbers[-1] >= float(first[-1]) > 0, numbers

        def sums() -> list[tuple[str, int, str]] | None:
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            try:
                rows = conn.execute("SELECT statistic_id, has_sum, unit_of_measurement FROM statistics_meta"
                                    " WHERE statistic_id LIKE '%energy%'").fetchall()  # fmt: skip
            finally:
                conn.close()
            return rows if len(rows) >= 2 else None

        meta = wait(sums, "statistics metadata of the energy sensors", STATS_WAIT_S)
        print("statistics_meta:", meta)
        assert all(has_sum == 1 and unit == "kWh" for _, has_sum, unit in meta)
        print("OK: Home Assistant accepted the energy sensors as sums")
    finally:
        ha.send_signal(signal.SIGTERM)
        try:
            ha.wait(60)
        except subprocess.TimeoutExpired:
            ha.kill()
        device.close()
        serve.stop()
        print("log:", work / "ha.log")
        if "--keep" not in sys.argv:
            shutil.rmtree(work / "data", ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1])
