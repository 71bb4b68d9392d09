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




# -- issue 18: what a newcomer sees ------------------------------------------------------------
def test_simulate_prints_a_line_per_interval_and_reuses_its_batmons_across_runs(
    serve: ServeProcess,
) -> None:  # fmt: skip
    serve.start()
    args = ["simulate", "--api-url", serve.http_url, "--api-key", serve.admin_key or "",
            "--count", "2", "--interval", "0.2", "--readings", "3"]  # fmt: skip
    first = batmon(*args, env=NO_PORT_ENV)
    assert first.returncode == 0, first.stderr
    rounds = re.findall(r"^round (\d+): sent (\d+), refused (\d+), landed (\d+)$", first.stdout, re.M)
    assert [r[0] for r in rounds][-1] == "3" and len(rounds) >= 3, first.stdout
    assert rounds[-1][1:] == ("6", "0", "6"), first.stdout  # every reading accounted for at the end
    second = batmon(*args, env=NO_PORT_ENV)
    assert second.returncode == 0, second.stderr
    assert created_ids(second.stdout) == created_ids(first.stdout)  # the same two batmons
    with httpx.Client(base_url=serve.http_url, timeout=10) as http:
        listed = http.get("/interface/batmon/list", headers={"X-API-Key": serve.admin_key or ""})
    names = [b["batmon_name"] for b in listed.json()["success"]]
    assert names == ["Simulated battery 1", "Simulated battery 2"]


def test_simulate_prints_what_the_server_refused_from_its_error_topic(serve: ServeProcess) -> None:
    """MQTT 3.1.1 has no negative PUBACK: a refused payload is PUBACKed, and the reason comes on
    the device's error topic. simulate listens there and says so."""
    import json
    import subprocess
    import sys

    import paho.mqtt.client as mqtt

    from tests.support import ROOT

    serve.start()
    port = int(serve.mqtt_url.rsplit(":", 1)[1])
    with httpx.Client(base_url=serve.http_url, timeout=10) as http:
        added = http.post("/interface/add/batmon", headers={"X-API-Key": serve.admin_key or ""},
                          json={"batmon_name": "Sim"}).json()["success"]  # fmt: skip
    batmon_id, token = added["batmon_id"], added["batmon_token"]
    run = subprocess.Popen([sys.executable, "-m", "batmon.cli", "simulate", "--mqtt-port", str(port),
                            "--device", f"{batmon_id}:{token}", "--interval", "0.5", "--readings", "6"],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert run.stdout is not None
        while "round 1:" not in (line := run.stdout.readline()):
            assert line, run.stderr.read() if run.stderr else ""
        # The same device, from a second connection, sends what the server must refuse.
        device = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"second-{batmon_id}",
                             protocol=mqtt.MQTTv311)  # fmt: skip
        device.username_pw_set(str(batmon_id), token)
        device.connect("127.0.0.1", port)
        device.loop_start()
        device.publish(f"batmon/{batmon_id}/{token}/update", json.dumps({"voltage": "abc"}), qos=1
                       ).wait_for_publish(10)  # fmt: skip
        device.disconnect()
        device.loop_stop()
        out, err = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == 0, err
    assert re.search(rf"^refused: batmon {batmon_id}: .*voltage", out, re.M), out
    assert re.search(r"refused 1, landed 6$", out, re.M), out
