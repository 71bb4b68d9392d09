"""`batmon simulate` reaches the server it is pointed at, or says loudly that it did not."""

from __future__ import annotations

import re
from pathlib import Path

import httpx2 as httpx

from tests.conftest import ServeProcess
from tests.support import PrivateMosquitto, batmon

NO_PORT_ENV = {"BATMON_MQTT_PORT": "", "BATMON_MQTT_URL": ""}


def history_rows(serve: ServeProcess, batmon_id: int) -> int:
    with httpx.Client(base_url=serve.http_url, timeout=10) as http:
        [h] = http.get("/interface/batmon/history", headers={"X-API-Key": serve.admin_key or ""},
                       params={"batmon_id": batmon_id, "min_epoch_tm_sec": 0}).json()["success"]  # fmt: skip
    return len(h["data"])


def created_ids(output: str) -> list[int]:
    return [int(m) for m in re.findall(r"batmon_id (\d+)", output)]


def test_simulate_asks_the_servers_healthz_for_its_mqtt_port_and_lands_readings(serve: ServeProcess) -> None:
    serve.start()  # HTTP and MQTT on free ports, not 8080 / 1883
    assert not serve.mqtt_url.endswith(":1883")
    done = batmon("simulate", "--api-url", serve.http_url, "--api-key", serve.admin_key or "",
                  "--count", "2", "--interval", "0.1", "--readings", "3", env=NO_PORT_ENV)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"mqtt://127.0.0.1:{serve.mqtt_url.rsplit(':', 1)[1]}" in done.stdout
    ids = created_ids(done.stdout)
    assert len(ids) == 2
    assert [history_rows(serve, batmon_id) for batmon_id in ids] == [3, 3]


def test_simulate_takes_the_mqtt_port_from_the_same_flag_and_variable_as_serve(serve: ServeProcess) -> None:
    serve.start()
    port = serve.mqtt_url.rsplit(":", 1)[1]
    with httpx.Client(base_url=serve.http_url, timeout=10) as http:
        added = http.post("/interface/add/batmon", headers={"X-API-Key": serve.admin_key or ""},
                          json={"batmon_name": "Sim"}).json()["success"]  # fmt: skip
    device = f"{added['batmon_id']}:{added['batmon_token']}"
    by_flag = batmon("simulate", "--mqtt-port", port, "--device", device, "--interval", "0.1",
                     "--readings", "2", env={**NO_PORT_ENV, "BATMON_MQTT_PORT": "1"})  # fmt: skip
    assert by_flag.returncode == 0, by_flag.stderr  # the flag wins over the variable
    by_env = batmon("simulate", "--device", device, "--interval", "0.1", "--readings", "2",
                    env={**NO_PORT_ENV, "BATMON_MQTT_PORT": port})  # fmt: skip
    assert by_env.returncode == 0, by_env.stderr
    assert history_rows(serve, added["batmon_id"]) == 4


def test_simulate_fails_loudly_when_no_reading_lands(tmp_path: Path) -> None:
    # A broker that takes the readings, but no bridge behind it (a wrong port, say).
    (tmp_path / "mosquitto").mkdir()
    broker = PrivateMosquitto(tmp_path / "mosquitto").start()
    try:
        done = batmon("simulate", "--mqtt-port", str(broker.port), "--device", "42:token-42x",
                      "--readings", "1", "--confirm-timeout", "1", env=NO_PORT_ENV)  # fmt: skip
    finally:
        broker.stop()
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert "no reading of batmon 42 landed" in line and "--mqtt-port" in line


def test_simulate_rejects_a_bad_port_in_one_line() -> None:
    done = batmon("simulate", "--mqtt-port", "http", "--device", "1:tok", env=NO_PORT_ENV)
    assert done.returncode == 2
    assert done.stderr.strip() == "batmon simulate: --mqtt-port: 'http' is not a port number (1-65535)"


