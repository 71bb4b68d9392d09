"""The shipped deploy/mosquitto.conf and deploy/batmon.acl work as docs/MOSQUITTO.md says:
a private Mosquitto runs them as they are (only the port and the file locations are moved
into tmp_path), and a bridge logged in as `batmon-bridge` ingests through it.
"""

from __future__ import annotations

import os
import pwd
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from bridge.doors.mqtt_link import BrokerEndpoint, new_client
from bridge.topics import Topics
from tests.support import MOSQUITTO, ROOT, Bridge, Env, PrivateMosquitto, free_port, make_env, wait_until

DEPLOY = ROOT / "deploy"
TOPICS = Topics()  # the ACL names base topic `batmon` and prefix `homeassistant`
PASSWORDS = {"batmon-bridge": "bridge-secret", "homeassistant": "ha-secret"}


class ShippedMosquitto(PrivateMosquitto):
    """PrivateMosquitto's process handling, with the shipped config instead of its own."""

    def __init__(self, folder: Path, users: dict[str, str]) -> None:
        self.port = free_port()
        self.folder = folder
        self.config = folder / "mosquitto.conf"
        passwd = folder / "batmon.passwd"
        passwd.touch(mode=0o600)
        for user, password in users.items():
            subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True)
        (folder / "batmon.acl").write_text((DEPLOY / "batmon.acl").read_text())
        text = (DEPLOY / "mosquitto.conf").read_text()
        moves = {
            r"^listener 1883$": f"listener {self.port} 127.0.0.1",
            r"^persistence_location .*$": f"persistence_location {folder}/",
            r"^password_file .*$": f"password_file {passwd}",
            r"^acl_file .*$": f"acl_file {folder / 'batmon.acl'}",
        }
        for pattern, line in moves.items():
            text, count = re.subn(pattern, line, text, flags=re.M)
            assert count == 1, f"deploy/mosquitto.conf has no single line matching {pattern}"
        # As root, Mosquitto would switch to user `mosquitto`, who cannot read tmp_path.
        text += f"user {pwd.getpwuid(os.getuid()).pw_name}\n"
        self.config.write_text(text)
        self.proc = None


class Device:
    """A device logged in with its batmon_id and a password of its own."""

    def __init__(self, port: int, username: str, password: str) -> None:
        self.client = new_client(f"device-{username}", clean_session=True)
        self.client.username_pw_set(username, password)
        self.refused: object = None
        connected = threading.Event()

        def on_connect(client: mqtt.Client, userdata: object, flags: object, reason: object,
                       properties: object) -> None:  # fmt: skip
            self.refused = reason if getattr(reason, "is_failure", False) else None
            connected.set()

        self.client.on_connect = on_connect
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        assert connected.wait(5), "no CONNACK"

    def publish(self, topic: str, payload: str) -> bool:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(5)
        return info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def shipped(tmp_path: Path) -> Iterator[tuple[ShippedMosquitto, Env]]:
    if not Path(MOSQUITTO).exists():
        pytest.fail("mosquitto is not installed (apt-get install -y mosquitto)")
    broker = ShippedMosquitto(tmp_path, PASSWORDS).start()
    try:
        with make_env(tmp_path, port=broker.port) as env:
            yield broker, env
    finally:
        broker.stop()


def _bridge(env: Env, broker: ShippedMosquitto) -> Bridge:
    bridge = Bridge(env.core, TOPICS, BrokerEndpoint("127.0.0.1", broker.port, "batmon-bridge",
                                                     PASSWORDS["batmon-bridge"], "batmon-bridge-batmon"))
    env.loop.run(bridge.start(timeout=5))
    env.bridges.append(bridge)
    return bridge


def test_a_bridge_ingests_through_the_shipped_config_and_acl(
    shipped: tuple[ShippedMosquitto, Env], tmp_path: Path
) -> None:
    broker, env = shipped
    batmon = env.add_batmon()
    bridge = _bridge(env, broker)
    topics = TOPICS
    # Anonymous clients are refused; the device logs in as its id (password in the file).
    subprocess.run(["mosquitto_passwd", "-b", str(tmp_path / "batmon.passwd"), str(batmon.id),
                    "device-secret"], check=True)  # fmt: skip
    broker.proc.send_signal(1)  # SIGHUP: Mosquitto reloads the password file
    anonymous = Device(broker.port, "", "")
    assert anonymous.refused is not None
    anonymous.close()
    device = wait_until(lambda: _connected(broker.port, str(batmon.id), "device-secret"), 5,
                        "device login after reload")  # fmt: skip
    assert device.publish(topics.update(batmon.id, batmon.token), '{"voltage": 12.7}')
    wait_until(lambda: env.count(batmon) == 1, 5, "reading stored")
    # The ACL keeps a device to its own id: a publish under another id is dropped by
    # Mosquitto (MQTT 3.1.1 has no refusal code; it still acks), so nothing lands.
    other = env.add_batmon()
    assert device.publish(topics.update(other.id, other.token), '{"voltage": 1}')
    assert device.publish(topics.update(batmon.id, batmon.token), '{"voltage": 12.8}')
    wait_until(lambda: env.count(batmon) == 2, 5, "second reading stored")
    assert env.count(other) == 0
    device.close()
    assert bridge.connected


def _connected(port: int, username: str, password: str) -> Device | None:
    device = Device(port, username, password)
    if device.refused is None:
        return device
    device.close()
    return None


def test_readings_queued_while_the_bridge_is_away_beyond_the_default_1000_all_arrive(
    shipped: tuple[ShippedMosquitto, Env], tmp_path: Path
) -> None:
    broker, env = shipped
    batmon = env.add_batmon()
    bridge = _bridge(env, broker)
    env.loop.run(bridge.stop())  # away: its persistent session stays on the broker
    env.bridges.remove(bridge)
    subprocess.run(["mosquitto_passwd", "-b", str(tmp_path / "batmon.passwd"), str(batmon.id),
                    "device-secret"], check=True)  # fmt: skip
    broker.proc.send_signal(1)
    device = wait_until(lambda: _connected(broker.port, str(batmon.id), "device-secret"), 5,
                        "device login after reload")  # fmt: skip
    update = TOPICS.update(batmon.id, batmon.token)
    sent = 2500  # past Mosquitto's default max_queued_messages (1000) plus 20 in flight
    infos = [device.client.publish(update, f'{{"soc": {i % 100}, "ts": {1_700_000_000 + i}}}', qos=1)
             for i in range(sent)]  # fmt: skip
    for info in infos:
        info.wait_for_publish(10)
    assert all(info.is_published() for info in infos)
    device.close()
    _bridge(env, broker)
    wait_until(lambda: env.count(batmon) >= sent, 60, f"{sent} readings stored")
    assert env.count(batmon) == sent
