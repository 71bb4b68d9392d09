"""The embedded broker's abuse limits, on a real broker with real clients: protocol level,
packet size, message rate, connection count, and client-id takeover (MQTT 3.1.1 3.1.4-2).
"""

from __future__ import annotations

import logging
import queue
import secrets
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.doors.broker.limits import BrokerLimits, MessageRate
from tests.broker_support import (
    TOPICS,
    WAIT,
    Client,
    FakeCredentials,
    Running,
    broker_yaml_with,
    make_broker,
)
from tests.support import LoopThread, wait_until

UNSUPPORTED_PROTOCOL = 132  # paho's reason code for a 3.1.1 CONNACK return code 1
SERVER_UNAVAILABLE = 136  # ... for return code 3
NOT_AUTHORIZED = 135  # ... for return code 5
LIMITS = {"max_packet_size": 4096, "max_connections": 4, "messages_per_second": 2, "message_burst": 3}


@pytest.fixture
def limited(loop_thread: LoopThread, tmp_path: Path) -> Iterator[Running]:
    """A broker of its own with small limits (so the counts are exact)."""
    r = make_broker(FakeCredentials(), config_path=broker_yaml_with(tmp_path, **LIMITS))
    loop_thread.run(r.broker.start())
    yield r
    loop_thread.run(r.broker.stop())


def connect(r: Running, username: str, password: str, client_id: str | None = None,
            clean_session: bool = True) -> Client:  # fmt: skip
    c = Client(r.broker.port, client_id or f"c-{secrets.token_hex(4)}", username, password, clean_session)
    assert c.connect() == 0
    return c


def bridge_of(r: Running) -> Client:
    c = connect(r, r.bridge_username, r.bridge_password)
    assert c.subscribe(TOPICS.update_filter, qos=1) == 1
    return c


def raw_connect(port: int, connect_packet: bytes) -> bytes:
    """Send a CONNECT on a raw socket and return what the broker answers (within WAIT)."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(connect_packet)
        answer = b""
        while len(answer) < 4 and (chunk := sock.recv(4 - len(answer))):
            answer += chunk
        return answer


def connect_packet(protocol_name: bytes, level: int, client_id: bytes, properties: bytes | None) -> bytes:
    """A CONNECT (clean session, keep-alive 30) as MQTT 3.1, 3.1.1 or 5 lay it out."""
    variable = len(protocol_name).to_bytes(2, "big") + protocol_name + bytes((level, 0x02, 0, 30))
    if properties is not None:  # MQTT 5: property length, then properties
        variable += bytes((len(properties),)) + properties
    body = variable + len(client_id).to_bytes(2, "big") + client_id
    return bytes((0x10, len(body))) + body


# -- protocol level ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "level", "properties"),
    [(b"MQTT", 5, b"\x11\x00\x00\x00\x3c"), (b"MQTT", 5, b""), (b"MQIsdp", 3, None), (b"MQTT", 6, None)],
    ids=["mqtt5-with-properties", "mqtt5", "mqtt31", "level6"],
)
def test_unsupported_protocol_levels_get_connack_1_at_once_and_one_log_line(
    running: Running, caplog: pytest.LogCaptureFixture, name: bytes, level: int, properties: bytes | None
) -> None:
    caplog.set_level(logging.DEBUG)
    answer = raw_connect(running.broker.port, connect_packet(name, level, b"v5-client", properties))
    assert answer == bytes((0x20, 0x02, 0x00, 0x01))  # CONNACK: unacceptable protocol version
    wait_until(lambda: any("protocol level" in r.getMessage() for r in caplog.records), WAIT, "the log line")
    [line] = [r.getMessage() for r in caplog.records if "protocol level" in r.getMessage()]
    assert f"protocol level {level}" in line and "3.1.1" in line
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


def test_mosquitto_pub_speaking_mqtt5_is_refused_not_left_hanging(running: Running) -> None:
    if shutil.which("mosquitto_pub") is None:
        pytest.fail("mosquitto_pub is not installed (apt-get install -y mosquitto-clients)")
    done = subprocess.run(
        ["mosquitto_pub", "-V", "mqttv5", "-p", str(running.broker.port), "-u", "5", "-P", "tok-five",
         "-t", TOPICS.update(5, "tok-five"), "-m", "{}"],
        capture_output=True, text=True, timeout=WAIT * 5,
    )  # fmt: skip
    assert done.returncode != 0
    assert "protocol" in (done.stderr + done.stdout).lower()


def test_mqtt_311_still_connects_through_the_guard(running: Running) -> None:
    assert raw_connect(running.broker.port, connect_packet(b"MQTT", 4, b"", None))[:2] == b"\x20\x02"


# -- packet size -------------------------------------------------------------------


def test_a_packet_over_max_packet_size_closes_the_connection_unacknowledged(limited: Running) -> None:
    bridge = bridge_of(limited)
    dev = connect(limited, "5", "tok-five")
    try:
        assert dev.publish(TOPICS.update(5, "tok-five"), b"x" * 3000)  # under the cap: fine
        bridge.wait_for(TOPICS.update(5, "tok-five"))
        info = dev.paho.publish(TOPICS.update(5, "tok-five"), b"x" * 10_000_000, qos=1)
        assert dev._disconnects.get(timeout=WAIT * 5) is not None  # closed by the broker
        assert not info.is_published()
        assert limited.broker.stats["closed_packet_too_large"] == 1
        # Everyone else is served as before.
        other = connect(limited, "7", "tok-seven")
        assert other.publish(TOPICS.update(7, "tok-seven"), b"after")
        bridge.wait_for(TOPICS.update(7, "tok-seven"), b"after")
        other.close()
    finally:
        dev.close()
        bridge.close()


def test_default_packet_cap_is_a_little_over_the_64_kib_payload_limit() -> None:
    assert 64 * 1024 < BrokerLimits().max_packet_size <= 66 * 1024


# -- message rate ------------------------------------------------------------------


def test_qos0_publishes_over_a_devices_rate_are_dropped_and_counted(limited: Running) -> None:
    bridge = bridge_of(limited)
    dev = connect(limited, "5", "tok-five")
    try:
        for i in range(20):
            dev.paho.publish(TOPICS.update(5, "tok-five"), f"qos0-{i}".encode(), qos=0)
        assert dev.publish(TOPICS.update(5, "tok-five"), b"marker")  # QoS 1: waits its turn
        bridge.wait_for(TOPICS.update(5, "tok-five"), b"marker")
        got = [p for t, p, _ in bridge.received if p.startswith(b"qos0-")]
        dropped = limited.broker.stats["dropped_over_rate"]
        assert dropped >= 20 - LIMITS["message_burst"] - 2 and len(got) + dropped == 20
        assert got == sorted(got, key=lambda p: int(p[5:]))  # what passes keeps its order
    finally:
        dev.close()
        bridge.close()


def test_qos1_publishes_over_the_rate_are_held_back_not_lost(limited: Running) -> None:
    bridge = bridge_of(limited)
    dev = connect(limited, "5", "tok-five")
    fast = connect(limited, "7", "tok-seven")
    try:
        infos = [dev.paho.publish(TOPICS.update(5, "tok-five"), f"q1-{i}".encode(), qos=1) for i in range(8)]
        # Another device (same owner even) has its own budget: not held behind device 5.
        assert fast.publish(TOPICS.update(7, "tok-seven"), b"seven")
        for info in infos:
            info.wait_for_publish(WAIT * 5)
            assert info.is_published()
        for i in range(8):
            bridge.wait_for(TOPICS.update(5, "tok-five"), f"q1-{i}".encode())
        assert limited.broker.stats["delayed_over_rate"] >= 1
        assert limited.broker.stats.get("dropped_over_rate", 0) == 0
    finally:
        for c in (dev, fast, bridge):
            c.close()


def test_message_rate_refills_at_its_rate() -> None:
    now = [0.0]
    rate = MessageRate(per_second=2, burst=3, clock=lambda: now[0])
    assert [rate.wait("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert rate.wait("a") == pytest.approx(0.5)
    assert rate.wait("b") == 0.0  # per sender
    now[0] += 0.5
    assert rate.wait("a") == 0.0
    now[0] += 100
    assert [rate.wait("a") for _ in range(4)][-1] > 0  # refilled to the burst, not beyond


# -- connections -------------------------------------------------------------------


def test_past_max_connections_a_client_gets_server_unavailable(limited: Running) -> None:
    clients = [connect(limited, "5", "tok-five") for _ in range(LIMITS["max_connections"])]
    extra = Client(limited.broker.port, "one-too-many", "7", "tok-seven")
    try:
        assert extra.connect() == SERVER_UNAVAILABLE
        assert limited.broker.stats["refused_connection_limit"] == 1
        clients.pop().close()
        wait_until(lambda: Client(limited.broker.port, f"again-{secrets.token_hex(3)}", "7", "tok-seven")
                   .connect() == 0, WAIT, "a free slot once one client left")  # fmt: skip
    finally:
        extra.close()
        for c in clients:
            c.close()


# -- client-id takeover ------------------------------------------------------------


@pytest.mark.parametrize("clean_session", [True, False], ids=["clean", "persistent"])
def test_a_second_connection_with_the_same_client_id_takes_over_the_first(
    running: Running, clean_session: bool
) -> None:
    bridge = connect(running, running.bridge_username, running.bridge_password)
    client_id = f"dev5-{secrets.token_hex(3)}"
    first = connect(running, "5", "tok-five", client_id, clean_session)
    assert first.subscribe(TOPICS.state(5), qos=1) == 1
    second = connect(running, "5", "tok-five", client_id, clean_session)
    try:
        assert first._disconnects.get(timeout=WAIT) is not None  # the broker closed it
        assert second.subscribe(TOPICS.state(5), qos=1) == 1
        assert bridge.publish(TOPICS.state(5), b"for the second")
        assert second.wait_for(TOPICS.state(5), b"for the second")
        assert running.broker.stats["client_id_takeovers"] >= 1
    finally:
        for c in (first, second, bridge):
            c.close()
        connect(running, "5", "tok-five", client_id).close()  # drop a persistent session


def test_another_principal_cannot_take_a_live_client_id_over(running: Running) -> None:
    bridge = connect(running, running.bridge_username, running.bridge_password)
    client_id = f"dev5-{secrets.token_hex(3)}"
    owner = connect(running, "5", "tok-five", client_id)
    assert owner.subscribe(TOPICS.state(5)) == 0
    neighbour = Client(running.broker.port, client_id, "6", "tok-six")
    try:
        assert neighbour.connect() == NOT_AUTHORIZED
        assert bridge.publish(TOPICS.state(5), b"still yours")
        assert owner.wait_for(TOPICS.state(5), b"still yours")
        with pytest.raises(queue.Empty):
            owner._disconnects.get_nowait()
    finally:
        for c in (neighbour, owner, bridge):
            c.close()


def test_a_client_without_a_connect_is_closed_after_the_connect_timeout(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    r = make_broker(FakeCredentials(), config_path=broker_yaml_with(tmp_path, connect_timeout_s=0.2))
    loop_thread.run(r.broker.start())
    try:
        with socket.create_connection(("127.0.0.1", r.broker.port), timeout=WAIT) as sock:
            assert sock.recv(1) == b""  # closed by the broker, nothing sent
    finally:
        loop_thread.run(r.broker.stop())


def test_bad_limits_in_broker_yaml_are_one_clear_error(loop_thread: LoopThread, tmp_path: Path) -> None:
    from bridge.doors.broker import BrokerStartError

    r = make_broker(FakeCredentials(), config_path=broker_yaml_with(tmp_path, max_packet_size="big"))
    with pytest.raises(BrokerStartError, match=r"limits\.max_packet_size"):
        loop_thread.run(r.broker.start())


