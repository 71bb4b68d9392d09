"""`batmon serve` as a whole: a real process with its embedded amqtt broker, real
devices and users over MQTT, real HTTP, and Apprise delivering to a real sink.
"""

from __future__ import annotations

import json
import queue
import signal
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import httpx2 as httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import ServeProcess
from tests.support import Sink, batmon


def mqtt_port(serve: ServeProcess) -> int:
    return int(serve.mqtt_url.rsplit(":", 1)[1])


class Client:
    """A paho MQTT 3.1.1 client that records messages and CONNACK results."""

    def __init__(self, port: int, username: str, password: str, inflight: int = 20) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connack: queue.Queue[int] = queue.Queue()
        self.subacks: queue.Queue[list[int]] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311,
                                  reconnect_on_failure=False)  # fmt: skip
        self.client.username_pw_set(username, password)
        self.client.max_inflight_messages_set(inflight)
        self.client.on_connect = lambda c, u, f, rc, p: self.connack.put(rc.value)
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put([r.value for r in rcs])
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.accepted = self.connack.get(timeout=5) == 0

    def subscribe(self, topic: str) -> list[int]:
        self.client.subscribe(topic, qos=1)
        return self.subacks.get(timeout=5)

    def publish(self, topic: str, payload: str) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def next_on(self, topic: str, timeout: float = 5) -> mqtt.MQTTMessage:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self.messages.get(timeout=left)
            if msg.topic == topic:
                return msg
        raise AssertionError(f"nothing on {topic}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_for(check: Callable[[], Any], what: str, timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s")


def test_device_over_embedded_broker_and_users_scoped_subscriptions(serve: ServeProcess) -> None:
    serve.start()
    admin = {"X-API-Key": serve.admin_key or ""}
    with httpx.Client(base_url=serve.http_url, timeout=10) as http:
        added = http.post("/interface/add/batmon", headers=admin, data={
            "batmon_name": "Van", "update_period": 60}).json()["success"]  # fmt: skip
        batmon_id, token = added["batmon_id"], added["batmon_token"]
        other_key = http.post("/interface/add/batmon", headers=admin,
                              data={"batmon_name": "theirs"})  # a second batmon of admin's
        assert other_key.status_code == 200

        anonymous = Client(mqtt_port(serve), "", "")
        assert not anonymous.accepted
        wrong = Client(mqtt_port(serve), str(batmon_id), "not-the-token")
        assert not wrong.accepted

        device = Client(mqtt_port(serve), str(batmon_id), token)
        assert device.accepted
        sent = time.monotonic()
        device.publish(f"batmon/{batmon_id}/{token}/update",
                       json.dumps({"voltage": 12.7, "current": -2.5, "soc": 88}))

        def landed() -> dict[str, Any] | None:
            s = http.get("/interface/batmon/status", headers=admin,
                         params={"batmon_id": batmon_id}).json()["success"]
            return s if s["batmon_voltage"] == 12.7 else None

        status = wait_for(landed, "the MQTT reading in HTTP status")
        latency = time.monotonic() - sent
        assert status["batmon_soc"] == 88.0 and status["batmon_status"] == "Online"
        [h] = http.get("/interface/batmon/history", headers=admin, params={
            "batmon_id": batmon_id, "min_epoch_tm_sec": 0}).json()["success"]  # fmt: skip
        assert [row["batmon_current"] for row in h["data"]] == [-2.5]
        print(f"MQTT publish to HTTP-visible: {latency * 1000:.0f} ms")

        # The owner, logged in with email + api_key, gets retained state and discovery.
        user = Client(mqtt_port(serve), "admin@localhost", serve.admin_key or "")
        assert user.accepted
        assert user.subscribe(f"batmon/{batmon_id}/state") == [1]
        state = json.loads(user.next_on(f"batmon/{batmon_id}/state").payload)
        assert state["batmon_voltage"] == 12.7
        config_topic = f"homeassistant/device/batmon_{batmon_id}/config"
        assert user.subscribe(config_topic) == [1]
        config = json.loads(user.next_on(config_topic).payload)
        assert config["state_topic"] == f"batmon/{batmon_id}/state"

        # Another user is refused the first user's topics.
        stranger_key = _add_user(serve, "stranger@example.org")
        stranger = Client(mqtt_port(serve), "stranger@example.org", stranger_key)
        assert stranger.accepted
        assert stranger.subscribe(f"batmon/{batmon_id}/state") == [128]
        for client in (device, user, stranger, anonymous, wrong):
            client.close()


def _add_user(serve: ServeProcess, email: str) -> str:
    return batmon("user", "add", email, "--data-dir", str(serve.data_dir)).stdout.strip()


def test_notices_survive_a_killed_serve_and_are_sent_once(serve: ServeProcess) -> None:
    sink = Sink()
    port = sink.port
    sink.close()  # the target is down at first
    serve.args = ["--notify-retry-s", "0.3"]
    serve.start()
    admin = {"X-API-Key": serve.admin_key or ""}
    with httpx.Client(base_url=serve.http_url, timeout=10) as http:
        r = http.post("/interface/user/notifications", headers=admin,
                      json={"email_url": f"json://127.0.0.1:{port}/"})
        assert r.status_code == 200, r.text
        added = http.post("/interface/add/batmon", headers=admin,
                          data={"batmon_name": "Cabin"}).json()["success"]
        batmon_id, token = added["batmon_id"], added["batmon_token"]
        http.post("/interface/batmon/alarm/add", headers=admin, json={
            "batmon_id": batmon_id, "alarm_name": "High", "alarm_metric": "voltage",
            "alarm_condition": ">=", "alarm_threshold_value": 10, "alarm_repeat_delay": 3600,
        })  # fmt: skip
        http.post("/interface/update/batmon",
                  json={"batmon_id": batmon_id, "batmon_token": token, "voltage": 12})

        def notices() -> list[dict[str, Any]]:
            return http.get("/interface/batmon/notifications", headers=admin,
                            params={"batmon_id": batmon_id}).json()["success"]

        failed_once = wait_for(lambda: [n for n in notices() if n["attempts"] >= 1],
                               "a failed attempt while the sink is down")
        assert failed_once[0]["state"] in ("queued", "sending")  # retried every 0.3 s
        assert "High" in failed_once[0]["title"] or "High" in failed_once[0]["body"]
    serve.stop(signal.SIGKILL)

    sink = Sink(port=port)  # the target comes back
    try:
        again = ServeProcess(serve.data_dir, args=["--notify-retry-s", "0.3"]).start()
        try:
            wait_for(lambda: sink.posts(), "the queued notice after restart")
            with httpx.Client(base_url=again.http_url, timeout=10) as http:
                # A later notice proves the worker ran on; the first still came once.
                http.post("/interface/update/batmon",
                          json={"batmon_id": batmon_id, "batmon_token": token, "voltage": 5})
                wait_for(lambda: len(sink.posts()) >= 2, "the cleared notice")
                states = {n["state"] for n in http.get(
                    "/interface/batmon/notifications", headers=admin,
                    params={"batmon_id": batmon_id}).json()["success"]}  # fmt: skip
                assert states == {"sent"}
        finally:
            again.stop()
        titles = [post["title"] for post in sink.posts()]
        assert len(titles) == 2, titles
        assert "triggered" in titles[0].lower() and "cleared" in titles[1].lower()
        assert str(batmon_id) in titles[0]
    finally:
        sink.close()


def test_external_mosquitto_mode_uses_the_same_ingest(serve: ServeProcess) -> None:
    """`--mqtt-url` on the machine's Mosquitto, under a base topic of this run only."""
    import uuid

    base = f"batmon-e2e-{uuid.uuid4().hex[:8]}"
    serve.args = ["--mqtt-url", "mqtt://127.0.0.1:1883", "--base-topic", base, "--no-discovery"]
    serve.start()
    assert serve.mqtt_url == "mqtt://127.0.0.1:1883"
    admin = {"X-API-Key": serve.admin_key or ""}
    with httpx.Client(base_url=serve.http_url, timeout=10) as http:
        added = http.post("/interface/add/batmon", headers=admin,
                          data={"batmon_name": "Boat"}).json()["success"]
        batmon_id, token = added["batmon_id"], added["batmon_token"]
        # Mosquitto admits anyone here: the bridge itself checks id + token.
        device = Client(1883, "anyone", "")
        assert device.accepted
        device.publish(f"{base}/{batmon_id}/wrong-token/update", json.dumps({"soc": 11}))
        device.publish(f"{base}/{batmon_id}/{token}/update", json.dumps({"soc": 55}))

        def soc() -> float | None:
            s = http.get("/interface/batmon/status", headers=admin,
                         params={"batmon_id": batmon_id}).json()["success"]
            return s["batmon_soc"] if s["batmon_soc"] else None

        assert wait_for(soc, "reading via Mosquitto") == 55.0
        [h] = http.get("/interface/batmon/history", headers=admin, params={
            "batmon_id": batmon_id, "min_epoch_tm_sec": 0}).json()["success"]  # fmt: skip
        assert [row["batmon_soc"] for row in h["data"]] == [55.0]  # the wrong token's never landed
        health = http.get("/healthz").json()
        assert health["mqtt"] == "connected" and health["broker"] == "external"
        assert health["mqtt_base_topic"] == base  # the dashboard's connect card shows it
        assert health["mqtt_stats"]["dropped_wrong_token"] == 1
        state = Client(1883, "anyone", "")
        state.subscribe(f"{base}/{batmon_id}/state")
        # The retained state is the latest: published as the reading was accepted.
        got = json.loads(state.next_on(f"{base}/{batmon_id}/state").payload)
        assert got["batmon_soc"] == 55.0
        for topic in (f"{base}/{batmon_id}/state", f"{base}/{batmon_id}/availability",
                      f"{base}/bridge/state"):
            device.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
        device.close()
        state.close()


def test_a_burst_then_disconnect_lands_every_acknowledged_reading(serve: ServeProcess) -> None:
    """A battery device wakes, sends its buffer, waits for the PUBACKs and sleeps:
    every reading the broker acknowledged must be in the database."""
    serve.start()
    admin = {"X-API-Key": serve.admin_key or ""}
    with httpx.Client(base_url=serve.http_url, timeout=10) as http:
        added = http.post("/interface/add/batmon", headers=admin,
                          data={"batmon_name": "Sleepy"}).json()["success"]
        batmon_id, token = added["batmon_id"], added["batmon_token"]
        topic = f"batmon/{batmon_id}/{token}/update"
        sent = 0
        for _ in range(3):
            device = Client(mqtt_port(serve), str(batmon_id), token, inflight=200)
            assert device.accepted
            infos = [device.client.publish(topic, json.dumps({"soc": (sent + i) % 100}), qos=1)
                     for i in range(300)]  # fmt: skip
            for info in infos:
                info.wait_for_publish(10)
            sent += len(infos)
            device.close()

        def landed() -> int:
            [h] = http.get("/interface/batmon/history", headers=admin, params={
                "batmon_id": batmon_id, "min_epoch_tm_sec": 0}).json()["success"]  # fmt: skip
            return len(h["data"])

        wait_for(lambda: landed() >= sent, f"all {sent} readings", timeout=30)
        assert landed() == sent


def test_alarm_and_status_notices_in_real_time(serve: ServeProcess) -> None:
    """Issue 4's scenario on the wall clock: trigger, repeat after the delay, quiet after
    ack, cleared; then exactly one Offline notice from the watchdog and one Online."""
    sink = Sink()
    try:
        serve.start()
        admin = {"X-API-Key": serve.admin_key or ""}
        with httpx.Client(base_url=serve.http_url, timeout=10) as http:
            http.post("/interface/user/notifications", headers=admin,
                      json={"email_url": sink.url()})
            added = http.post("/interface/add/batmon", headers=admin, data={
                "batmon_name": "Solar shed", "update_period": 3}).json()["success"]  # fmt: skip
            batmon_id, token = added["batmon_id"], added["batmon_token"]
            alarm_id = http.post("/interface/batmon/alarm/add", headers=admin, json={
                "batmon_id": batmon_id, "alarm_name": "High voltage", "alarm_metric": "voltage",
                "alarm_condition": ">=", "alarm_threshold_value": 10, "alarm_repeat_delay": 1,
            }).json()["success"]["alarm_id"]  # fmt: skip

            def reading(voltage: float) -> None:
                r = http.post("/interface/update/batmon", json={
                    "batmon_id": batmon_id, "batmon_token": token, "voltage": voltage})
                assert r.status_code == 200

            def titles() -> list[str]:
                return [p["title"].lower() for p in sink.posts()]

            reading(12)
            wait_for(lambda: len(titles()) == 1, "the triggered notice")
            assert "triggered" in titles()[0] and str(batmon_id) in titles()[0]
            [alarm] = http.get("/interface/batmon/status", headers=admin, params={
                "batmon_id": batmon_id}).json()["success"]["alarms"]  # fmt: skip
            assert alarm["alarm_triggered"] is True and alarm["alarm_trigger_time"]

            time.sleep(1.5)  # the repeat delay is the behaviour under test
            reading(12.5)
            wait_for(lambda: len(titles()) == 2, "the repeated notice")
            http.post("/interface/batmon/alarm/ack", headers=admin, json={"alarm_id": alarm_id})
            time.sleep(1.2)
            reading(12.2)  # acknowledged: no repeat
            reading(5)  # clears
            wait_for(lambda: len(titles()) == 3, "the cleared notice")
            assert "cleared" in titles()[2]

            # No reading for update_period (3 s): the watchdog's Offline notice, once.
            wait_for(lambda: len(titles()) == 4, "the offline notice", timeout=8)
            assert "offline" in titles()[3]
            time.sleep(1.0)
            reading(4)
            wait_for(lambda: len(titles()) == 5, "the online notice")
            assert "online" in titles()[4]
            assert sum("offline" in t for t in titles()) == 1
    finally:
        sink.close()


def test_the_embedded_brokers_puback_comes_only_after_the_commit(serve: ServeProcess) -> None:
    """SPEC 5: an acknowledgement is a promise. With every commit slowed on purpose, the
    reading must already be in the SQLite file when the device holds its PUBACK."""
    serve.env["BATMON_TEST_COMMIT_DELAY_MS"] = "300"
    serve.start()
    admin = {"X-API-Key": serve.admin_key or ""}
    with httpx.Client(base_url=serve.http_url, timeout=10) as http:
        added = http.post("/interface/add/batmon", headers=admin,
                          data={"batmon_name": "Promise"}).json()["success"]  # fmt: skip
    batmon_id, token = added["batmon_id"], added["batmon_token"]
    device = Client(mqtt_port(serve), str(batmon_id), token)
    try:
        for n in range(3):
            device.publish(f"batmon/{batmon_id}/{token}/update", json.dumps({"soc": 50 + n}))
            with sqlite3.connect(serve.data_dir / "batmon.sqlite3") as db:
                rows = db.execute("SELECT soc FROM readings WHERE batmon_id = ? ORDER BY ts",
                                  (batmon_id,)).fetchall()  # fmt: skip
            assert [r[0] for r in rows] == [50 + i for i in range(n + 1)]
    finally:
        device.close()
