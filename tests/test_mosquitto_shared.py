"""Several workers on one Mosquitto (issue 16): the shipped deploy/mosquitto.conf run by a
private Mosquitto 2.0 (port and files moved into tmp_path, as tests/test_mosquitto_config.py
does), and MQTT v5 members of the shared subscription `$share/batmon/batmon/+/+/update`
logged in as `batmon-bridge`, the way workers subscribe.

What these pin down, because docs/SCALE-OUT.md and deploy/batmon@.service rely on it:
- each QoS 1 reading goes to one member, and the members together get all of them;
- a member's Receive Maximum bounds what it holds unacknowledged, whatever
  `max_inflight_messages` says;
- Mosquitto keeps a dead member's unacknowledged readings, and keeps choosing it for new
  ones, in its persistent session: they wait until the same client id comes back
  (so workers restart with `Restart=always` under a fixed client id);
- with a session that ends at the disconnect, they are lost (mosquitto issue 2662).
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support import MOSQUITTO, wait_until
from tests.test_mosquitto_config import PASSWORDS, ShippedMosquitto

SHARED_FILTER = "$share/batmon/batmon/+/+/update"
MOSQUITTO_SUB = "/usr/bin/mosquitto_sub"
USER = "batmon-bridge"
SESSION_EXPIRY_S = 3600  # persistent: the session outlives the connection


class Member:
    """One worker's MQTT side: a v5 member of the shared group that acks by hand, or holds
    every message unacknowledged (a worker that dies before its commit)."""

    def __init__(self, port: int, client_id: str, *, ack: bool = True, receive_maximum: int = 1000,
                 session_expiry_s: int = SESSION_EXPIRY_S) -> None:  # fmt: skip
        self.payloads: list[str] = []
        self._lock = threading.Lock()
        self._ack = ack
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(USER, PASSWORDS[USER])
        self.client.manual_ack_set(True)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.on_message = self._on_message
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = session_expiry_s
        properties.ReceiveMaximum = receive_maximum
        self.client.connect("127.0.0.1", port, keepalive=30, clean_start=False, properties=properties)
        self.client.loop_start()
        assert self.subscribed.wait(5), "no SUBACK"

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: object,
                    properties: object) -> None:  # fmt: skip
        # Subscribe on every connect: Mosquitto 2.0.11 may not restore a durable
        # client's $share subscription (fixed in 2.0.12).
        client.subscribe(SHARED_FILTER, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.payloads.append(msg.payload.decode())
        if self._ack:
            client.ack(msg.mid, msg.qos)

    def got(self) -> list[str]:
        with self._lock:
            return list(self.payloads)

    def kill(self) -> None:
        """Vanish as a killed process does: no DISCONNECT, no acks, the socket closed."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Publisher:
    """Devices, as one v5 client publishing QoS 1 updates and waiting for each PUBACK."""

    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="devices", protocol=mqtt.MQTTv5)
        self.client.username_pw_set(USER, PASSWORDS[USER])
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()

    def send(self, first: int, count: int) -> set[str]:
        sent = {str(n) for n in range(first, first + count)}
        infos = [self.client.publish(f"batmon/{n % 10}/token{n % 10}/update", str(n), qos=1)
                 for n in range(first, first + count)]  # fmt: skip
        for info in infos:
            info.wait_for_publish(10)
        assert all(info.is_published() for info in infos), "a PUBACK is missing"
        return sent

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Group:
    """A private Mosquitto on the shipped config, and the clients a test made on it."""

    def __init__(self, folder: Path) -> None:
        self.broker = ShippedMosquitto(folder, PASSWORDS)
        self.broker.start()
        self.clients: list[Member | Publisher] = []

    def member(self, client_id: str, **options: Any) -> Member:
        member = Member(self.broker.port, client_id, **options)
        self.clients.append(member)
        return member

    def publisher(self) -> Publisher:
        publisher = Publisher(self.broker.port)
        self.clients.append(publisher)
        return publisher

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.broker.stop()


@pytest.fixture
def group(tmp_path: Path) -> Iterator[Group]:
    if not Path(MOSQUITTO).exists():
        pytest.fail("mosquitto is not installed (apt-get install -y mosquitto)")
    group = Group(tmp_path)
    try:
        yield group
    finally:
        group.close()


def test_two_members_share_200_qos1_readings_and_together_get_all(group: Group) -> None:
    first, second = group.member("batmon-worker-1"), group.member("batmon-worker-2")
    sent = group.publisher().send(0, 200)
    wait_until(lambda: len(first.got()) + len(second.got()) >= 200, 10, "200 readings delivered")
    a, b = first.got(), second.got()
    print(f"200 QoS 1 readings: worker 1 got {len(a)}, worker 2 got {len(b)}")
    assert a and b, "one member got nothing: not shared"
    assert len(a) + len(b) == 200 and set(a) | set(b) == sent, "a reading went to both, or to none"


def test_a_members_receive_maximum_bounds_what_it_holds_unacked(group: Group) -> None:
    """The shipped max_inflight_messages is 1000; a v5 member announcing 10 gets 10 at a time,
    and Mosquitto keeps its round-robin share queued for it rather than giving it to the other."""
    acking = group.member("batmon-worker-1")
    stuck = group.member("batmon-worker-2", ack=False, receive_maximum=10)
    sent = group.publisher().send(0, 200)
    wait_until(lambda: len(acking.got()) >= 100 and len(stuck.got()) >= 10, 10, "both shares")
    print(f"Receive Maximum 10, never acking: it holds {len(stuck.got())}; the other got {len(acking.got())}")
    assert len(stuck.got()) == 10
    assert len(acking.got()) == 100
    # Its queued 90 come once it acks: the same client id back, acking this time.
    stuck.kill()
    back = group.member("batmon-worker-2")
    wait_until(lambda: len(back.got()) >= 100, 10, "the stuck member's share")
    assert set(acking.got()) | set(back.got()) == sent


def test_a_dead_members_unacked_readings_wait_for_its_client_id(group: Group) -> None:
    survivor = group.member("batmon-worker-1")
    dying = group.member("batmon-worker-2", ack=False)  # it dies before any commit
    devices = group.publisher()
    sent = devices.send(0, 200)
    wait_until(lambda: len(survivor.got()) + len(dying.got()) >= 200, 10, "200 delivered")
    unacked = set(dying.got())
    dying.kill()
    sent |= devices.send(200, 100)  # while it is dead
    wait_until(lambda: len(survivor.got()) >= 150, 10, "the survivor's share of the 100")
    after_death = len(survivor.got()) - (200 - len(unacked))
    # Not redispatched: nothing the dead member held reached the survivor, and the survivor
    # got only its round-robin share of what was sent meanwhile; the rest waits for the dead.
    assert not unacked & set(survivor.got())
    assert after_death < 100
    back = group.member("batmon-worker-2")  # Restart=always: same id, clean_start=False
    wait_until(lambda: set(survivor.got()) | set(back.got()) >= sent, 10, "every reading delivered")
    redelivered = unacked & set(back.got())
    print(
        f"dead member held {len(unacked)} unacked; while it was dead the survivor got {after_death}"
        f" of 100 and {100 - after_death} were queued for it; back under its client id it got"
        f" {len(back.got())} ({len(redelivered)} redelivered, {len(back.got()) - len(redelivered)} queued)"
    )
    assert redelivered == unacked
    assert len(survivor.got()) + len(back.got()) == 300  # each once: nothing reached both


def test_a_member_whose_session_ends_at_disconnect_loses_its_unacked_readings(
    group: Group,
) -> None:
    """Why workers keep a persistent session: Mosquitto 2.0 does not hand a dead member's
    unacknowledged readings to the others when its session ends (mosquitto issue 2662)."""
    survivor = group.member("batmon-worker-1")
    dying = group.member("batmon-worker-2", ack=False, session_expiry_s=0)
    devices = group.publisher()
    sent = devices.send(0, 200)
    wait_until(lambda: len(survivor.got()) + len(dying.got()) >= 200, 10, "200 delivered")
    unacked = set(dying.got())
    dying.kill()
    back = group.member("batmon-worker-2")
    # Sent after it is back, so anything redelivered to it would come first on its connection.
    extra = devices.send(1000, 20)
    wait_until(lambda: extra <= set(survivor.got()) | set(back.got()), 10, "the later 20")
    time.sleep(0.5)  # a grace for a late redelivery to the survivor
    delivered = set(survivor.got()) | set(back.got())
    lost = (sent | extra) - delivered
    print(f"session expiry 0: {len(unacked)} unacked when it died, {len(lost)} never delivered")
    assert unacked and lost == unacked


def test_a_member_removed_for_good_stops_taking_its_turn_once_its_session_is_ended(
    group: Group,
) -> None:
    """docs/SCALE-OUT.md, "Removing a worker": stopped, a member keeps its turn at new
    readings; one clean-session connect under its client id (mosquitto_sub, as the doc says)
    ends its session, and from then on the others get everything."""
    staying = group.member("batmon-worker-1")
    leaving = group.member("batmon-worker-2")
    devices = group.publisher()
    devices.send(0, 20)
    wait_until(lambda: len(staying.got()) + len(leaving.got()) >= 20, 10, "20 delivered")
    leaving.close()  # a clean stop: DISCONNECT, its session stays
    before = len(staying.got())
    devices.send(100, 20)
    wait_until(lambda: len(staying.got()) >= before + 10, 10, "the staying member's turn")
    time.sleep(0.5)
    queued_for_the_stopped = 20 - (len(staying.got()) - before)
    subprocess.run([MOSQUITTO_SUB, "-p", str(group.broker.port), "-i", "batmon-worker-2", "-u", USER,
                    "-P", PASSWORDS[USER], "-t", "batmon/none", "-E"], check=True, timeout=10)  # fmt: skip
    before = len(staying.got())
    sent = devices.send(200, 20)
    wait_until(lambda: len(staying.got()) >= before + 20, 10, "all 20 to the staying member")
    print(f"stopped member: {queued_for_the_stopped} of 20 queued for it; after its session was ended,"
          f" the staying member got all 20")  # fmt: skip
    assert queued_for_the_stopped == 10
    assert sent <= set(staying.got())
