"""A hostile network against a real embedded broker (issue 15).

- Sockets that have not logged in: at most 16 per address, 5 s to send a CONNECT, and
  never counted against the room kept for logged-in clients (1,000 silent sockets from
  one address used to lock valid devices out).
- A PUBLISH or SUBSCRIBE whose topic is not valid UTF-8 closes the connection (MQTT 3.1.1
  section 1.5.3).
- A QoS 1 subscriber that never acknowledges costs one log line, then a count.

Client sockets are bound to other loopback addresses (127.0.0.2, ...) to play attackers.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.doors.broker.limits import BrokerLimits
from tests.broker_support import WAIT, Client, FakeCredentials, Running, broker_yaml_with, make_broker
from tests.support import LoopThread, wait_until

SERVER_UNAVAILABLE = 136  # paho's reason code for a 3.1.1 CONNACK return code 3
PER_ADDRESS = 16


def silent_socket(port: int, source: str) -> socket.socket:
    """A TCP connection from ``source`` that never sends anything."""
    return socket.create_connection(("127.0.0.1", port), timeout=WAIT, source_address=(source, 0))


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True if the broker closes ``sock`` within ``seconds`` (it sends nothing before)."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def login(port: int, username: str = "5", password: str = "tok-five") -> int:
    client = Client(port, f"pre-{secrets.token_hex(4)}", username, password)
    try:
        return client.connect()
    finally:
        client.close()


@pytest.fixture
def small_room(loop_thread: LoopThread, tmp_path: Path) -> Iterator[Running]:
    """A broker with room for 4 logged-in clients (and the default pre-login limits)."""
    r = make_broker(FakeCredentials(), config_path=broker_yaml_with(tmp_path, max_connections=4))
    loop_thread.run(r.broker.start())
    yield r
    loop_thread.run(r.broker.stop())


def test_an_address_holds_at_most_16_sockets_before_login_the_next_is_closed_at_once(
    small_room: Running,
) -> None:
    port = small_room.broker.port
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(silent_socket(port, "127.0.0.2")) for _ in range(PER_ADDRESS)]
        wait_until(lambda: small_room.broker.stats.get("unauthenticated", 0) == PER_ADDRESS, WAIT,
                   "16 sockets waiting for their CONNECT")  # fmt: skip
        extra = held.enter_context(silent_socket(port, "127.0.0.2"))
        # Closed at once, long before the 5 s CONNECT timeout.
        assert closed_within(extra, 2.0)
        assert small_room.broker.stats["closed_unauthenticated_per_address"] >= 1
        # Another address is not affected, nor is a device logging in.
        neighbour = held.enter_context(silent_socket(port, "127.0.0.3"))
        assert not closed_within(neighbour, 0.5)
        assert login(port) == 0
        # A socket of the full address that leaves makes room for one more.
        sockets.pop().close()
        wait_until(lambda: not closed_within(held.enter_context(silent_socket(port, "127.0.0.2")), 0.3),
                   WAIT, "room for one more from 127.0.0.2")  # fmt: skip


def test_sockets_before_login_never_take_the_room_kept_for_logged_in_clients(small_room: Running) -> None:
    port = small_room.broker.port
    with contextlib.ExitStack() as held:
        for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
            for _ in range(PER_ADDRESS):
                held.enter_context(silent_socket(port, source))
        wait_until(lambda: small_room.broker.stats.get("unauthenticated", 0) == 3 * PER_ADDRESS, WAIT,
                   "48 sockets waiting for their CONNECT")  # fmt: skip
        clients = [Client(port, f"in-{i}", "5", "tok-five") for i in range(4)]
        try:
            assert [c.connect() for c in clients] == [0] * 4  # the whole room, for logged-in clients
            assert login(port, "7", "tok-seven") == SERVER_UNAVAILABLE  # the room is full now
        finally:
            for c in clients:
                c.close()


def test_the_connect_timeout_is_5_s_by_default(loop_thread: LoopThread) -> None:
    assert BrokerLimits().connect_timeout_s == 5
    r = make_broker(FakeCredentials())  # the project's broker.yaml
    loop_thread.run(r.broker.start())
    try:
        with silent_socket(r.broker.port, "127.0.0.2") as sock:
            opened = time.monotonic()
            assert closed_within(sock, 15.0), "a socket without CONNECT was never closed"
            waited = time.monotonic() - opened
        # Not before the timeout; the upper bound is only a generous deadline.
        assert 4.5 <= waited <= 9.0, f"closed after {waited:.1f} s"
    finally:
        loop_thread.run(r.broker.stop())


def test_a_refused_login_leaves_the_room_for_logged_in_clients(small_room: Running) -> None:
    port = small_room.broker.port
    assert [login(port, "5", "wrong-token") for _ in range(10)] == [135] * 10  # NOT_AUTHORIZED
    clients = [Client(port, f"in-{i}", "5", "tok-five") for i in range(4)]
    try:
        assert [c.connect() for c in clients] == [0] * 4
    finally:
        for c in clients:
            c.close()
    wait_until(lambda: small_room.broker.stats.get("logged_in", 0) == 0, WAIT, "every client gone")
    assert small_room.broker.stats.get("unauthenticated", 0) == 0


# -- topics that are not UTF-8 (MQTT 3.1.1 section 1.5.3) ---------------------------


def mqtt_string(raw: bytes) -> bytes:
    return len(raw).to_bytes(2, "big") + raw


def packet(first_byte: int, body: bytes) -> bytes:
    assert len(body) < 128
    return bytes((first_byte, len(body))) + body


def logged_in_socket(port: int) -> socket.socket:
    """A raw MQTT 3.1.1 connection logged in as device 5."""
    variable = mqtt_string(b"MQTT") + bytes((4, 0xC2, 0, 30))  # level 4; username, password, clean
    body = variable + mqtt_string(b"raw-" + secrets.token_hex(3).encode()) + mqtt_string(b"5") + mqtt_string(
        b"tok-five"
    )
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    sock.sendall(packet(0x10, body))
    assert sock.recv(4) == b"\x20\x02\x00\x00"
    return sock


def still_open(sock: socket.socket) -> bool:
    """A PINGREQ answered with PINGRESP: the connection is alive."""
    sock.sendall(b"\xc0\x00")
    return sock.recv(2) == b"\xd0\x00"


BAD_TOPICS = [b"batmon/\xff\xfe/update", b"batmon/\xc3/update", b"batmon/\xed\xa0\x80/update",
              b"batmon/\x00/x"]  # fmt: skip
BAD_IDS = ["invalid-byte", "cut-sequence", "surrogate", "nul"]


@pytest.mark.parametrize("topic", BAD_TOPICS, ids=BAD_IDS)
def test_a_publish_whose_topic_is_not_utf8_closes_the_connection(running: Running, topic: bytes) -> None:
    with logged_in_socket(running.broker.port) as sock:
        assert still_open(sock)
        sock.sendall(packet(0x30, mqtt_string(topic) + b"{}"))  # QoS 0: no answer expected
        assert closed_within(sock, WAIT)
    assert running.broker.stats["closed_invalid_utf8"] >= 1


@pytest.mark.parametrize("topic", BAD_TOPICS, ids=BAD_IDS)
def test_a_subscribe_whose_filter_is_not_utf8_closes_the_connection(running: Running, topic: bytes) -> None:
    with logged_in_socket(running.broker.port) as sock:
        sock.sendall(packet(0x82, b"\x00\x01" + mqtt_string(b"batmon/5/state") + b"\x00"
                            + mqtt_string(topic) + b"\x01"))  # fmt: skip
        assert closed_within(sock, WAIT)  # no SUBACK first


def test_a_valid_utf8_topic_keeps_the_connection(running: Running) -> None:
    with logged_in_socket(running.broker.port) as sock:
        # Both refused by the ACL, neither closes the connection.
        sock.sendall(packet(0x30, mqtt_string("batmon/5/bàttery/update".encode()) + b"{}"))
        sock.sendall(packet(0x82, b"\x00\x02" + mqtt_string("batmon/5/ünknown".encode()) + b"\x00"))
        assert sock.recv(5) == b"\x90\x03\x00\x02\x80"  # SUBACK: refused, but the connection stays
        assert still_open(sock)


# -- a QoS 1 subscriber that never acknowledges -------------------------------------


def test_a_qos1_subscriber_that_never_acks_costs_one_log_line_then_a_count(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    bridge = Client(running.broker.port, f"bridge-{secrets.token_hex(3)}", running.bridge_username,
                    running.bridge_password)  # fmt: skip
    assert bridge.connect() == 0
    with logged_in_socket(running.broker.port) as silent:
        silent.sendall(packet(0x82, b"\x00\x01" + mqtt_string(b"batmon/5/state") + b"\x01"))
        assert silent.recv(5) == b"\x90\x03\x00\x01\x01"  # SUBACK, QoS 1 granted
        before = running.broker.stats.get("puback_timeouts", 0)
        for i in range(20):  # it reads them all (the socket buffer) and acknowledges none
            assert bridge.publish("batmon/5/state", f"state {i}".encode())
        wait_until(lambda: running.broker.stats.get("puback_timeouts", 0) - before >= 20, 15,
                   "20 deliveries given up after the 5 s PUBACK wait")  # fmt: skip
        # A second round from the same subscriber adds to the count, not to the log.
        for i in range(5):
            assert bridge.publish("batmon/5/state", f"again {i}".encode())
        wait_until(lambda: running.broker.stats.get("puback_timeouts", 0) - before >= 25, 15, "5 more")
    bridge.close()
    lines = [r for r in caplog.records
             if r.name.startswith(("amqtt", "bridge")) and r.levelno >= logging.WARNING]  # fmt: skip
    assert not [r for r in lines if r.exc_info], "a traceback in the log"
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert "PUBACK" in lines[0].getMessage() and "raw-" in lines[0].getMessage()  # names the client
    assert running.broker.stats["slow_subscribers"] >= 1
