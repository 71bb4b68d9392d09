"""`batmon serve` seen by a Home Assistant: its real discovery subscriptions on the embedded
broker, configs that follow edits and deletes live, and the bridge's last will.
"""

from __future__ import annotations

import json
import queue
import signal
import time
from pathlib import Path

import httpx2 as httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import ServeProcess
from tests.home_assistant import DISCOVERY_FILTERS, discovery_problems
from tests.support import PrivateMosquitto, batmon, retained

WAIT = 10.0


class HomeAssistant:
    """Connects as Home Assistant's MQTT integration does: a user's credentials, MQTT 3.1.1,
    its birth message, and every discovery filter it subscribes to (tests/home_assistant.py)."""

    def __init__(self, port: int, username: str, password: str) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.seen: list[mqtt.MQTTMessage] = []
        connacks: queue.Queue[int] = queue.Queue()
        self.subacks: queue.Queue[list[int]] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311,
                                  reconnect_on_failure=False)  # fmt: skip
        self.client.username_pw_set(username, password)
        # Home Assistant's default will and birth (homeassistant/components/mqtt/const.py).
        self.client.will_set("homeassistant/status", "offline")
        self.client.on_connect = lambda c, u, f, rc, p: connacks.put(rc.value)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put([r.value for r in rcs])
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert connacks.get(timeout=WAIT) == 0, "the broker refused Home Assistant"

    def subscribe_discovery(self) -> list[int]:
        """Every discovery filter in one SUBSCRIBE: the SUBACK return codes."""
        self.client.subscribe([(f, 0) for f in DISCOVERY_FILTERS])
        return self.subacks.get(timeout=WAIT)

    def next_on(self, topic: str, timeout: float = WAIT) -> mqtt.MQTTMessage:
        """The next message on ``topic``; everything seen goes to ``seen``."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self.messages.get(timeout=left)
            self.seen.append(msg)
            if msg.topic == topic:
                return msg
        raise AssertionError(f"nothing on {topic}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def mqtt_port(serve: ServeProcess) -> int:
    return int(serve.mqtt_url.rsplit(":", 1)[1])


def test_home_assistant_discovers_own_batmons_and_follows_edits_and_deletes(serve: ServeProcess) -> None:
    serve.start()
    admin = {"X-API-Key": serve.admin_key or ""}
    other_key = batmon("user", "add", "other@example.org", "--data-dir", str(serve.data_dir)).stdout.strip()
    with httpx.Client(base_url=serve.http_url, timeout=10) as http:
        mine = http.post("/interface/add/batmon", headers=admin,
                         json={"batmon_name": "House bank"}).json()["success"]["batmon_id"]  # fmt: skip
        theirs = http.post("/interface/add/batmon", headers={"X-API-Key": other_key},
                           json={"batmon_name": "Not yours"}).json()["success"]["batmon_id"]  # fmt: skip
        ha = HomeAssistant(mqtt_port(serve), "admin@localhost", serve.admin_key or "")
        try:
            assert ha.subscribe_discovery() == [0] * len(DISCOVERY_FILTERS)
            ha.client.publish("homeassistant/status", "online")  # its birth message
            config_topic = f"homeassistant/device/batmon_{mine}/config"
            config = json.loads(ha.next_on(config_topic).payload)
            assert config["dev"]["name"] == "House bank"
            assert discovery_problems(config) == []
            # What HA then subscribes to: the topics the config names.
            ha.client.subscribe([(config["state_topic"], 1),
                                 *((a["topic"], 1) for a in config["availability"])])  # fmt: skip
            assert ha.subacks.get(timeout=WAIT) == [1, 1, 1]

            # The seed's edit example, live: current_units "I" drops the class, keeps the unit.
            edit = {"batmon_id": str(mine), "voltage_units": "V", "current_units": "I",
                    "power_units": "W", "soc_units": "%"}  # fmt: skip
            assert http.post("/interface/edit/batmon", headers=admin, json=edit).status_code == 200
            while (edited := json.loads(ha.next_on(config_topic).payload))["cmps"]["current"].get(
                "device_class"
            ):
                pass  # the birth message's re-send of the old config may come first
            assert edited["cmps"]["current"]["unit_of_measurement"] == "I"
            assert discovery_problems(edited) == []

            # A delete while connected: the empty config is what makes HA drop the device.
            deleted = http.post("/interface/delete/batmon", headers=admin, json={"batmon_id": mine})
            assert deleted.status_code == 200
            while ha.next_on(config_topic).payload != b"":
                pass
            assert not [m for m in ha.seen if str(theirs) in m.topic]
        finally:
            ha.close()


def test_a_killed_bridge_is_offline_through_its_last_will(tmp_path: Path, serve: ServeProcess) -> None:
    # SIGKILL: no goodbye is sent, so only the broker's last will can say it. Every
    # batmon's availability lists this topic (mode all), so all go unavailable at once.
    (tmp_path / "mosquitto").mkdir()
    broker = PrivateMosquitto(tmp_path / "mosquitto").start()
    try:
        serve.args = ["--mqtt-url", f"mqtt://127.0.0.1:{broker.port}"]
        serve.start()
        state = retained(broker.port, "batmon/bridge/state")
        assert state is not None and state.payload == b"online"
        serve.stop(signal.SIGKILL)
        deadline = time.monotonic() + WAIT
        while (state := retained(broker.port, "batmon/bridge/state")) is None or state.payload == b"online":
            assert time.monotonic() < deadline, "the bridge state did not turn offline"
            time.sleep(0.1)
        assert state.payload == b"offline"
    finally:
        broker.stop()
