"""Every reading the embedded broker acknowledged reaches the bridge, exactly once.

amqtt 0.12.1 sends PUBACK once an incoming QoS 1 message is queued on the publisher's
session, not once it is handed to subscribers. Unpatched, that queue was dropped when the
publisher went away (its message loop handled the disconnect first) or came back with a
clean session before the old connection was gone (the old session's queues were
cleared); and a broadcast in progress could skip subscribers while others subscribed or
left. A device that wakes up, sends a burst of readings, waits for the PUBACKs and
disconnects (or loses its link) is the normal case for a battery monitor, so these tests
play it with a real broker and real paho clients.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from tests.broker_support import TOPICS, Client, FakeCredentials, Running, broker_yaml_with, make_broker
from tests.support import LoopThread

DEVICE_ID, DEVICE_TOKEN = 5, FakeCredentials().tokens[5]
UPDATE = TOPICS.update(DEVICE_ID, DEVICE_TOKEN)
ARRIVAL_TIMEOUT = 20.0  # seconds for every acknowledged message to reach the bridge
MARKER = b"marker-"


@pytest.fixture(scope="module")
def running(loop_thread: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """The embedded broker without a message rate cap: these bursts test delivery, not limits."""
    config = broker_yaml_with(tmp_path_factory.mktemp("broker"), messages_per_second=1e9, message_burst=10**9)
    r = make_broker(FakeCredentials(), config_path=config)
    loop_thread.run(r.broker.start())
    yield r
    loop_thread.run(r.broker.stop())


@pytest.fixture
def bridge(running: Running) -> Iterator[Client]:
    """The bridge's own client, subscribed QoS 1 to every device update."""
    c = Client(running.broker.port, f"bridge-{secrets.token_hex(3)}",
               running.bridge_username, running.bridge_password)  # fmt: skip
    assert c.connect() == 0
    assert c.subscribe(TOPICS.update_filter, qos=1) == 1
    yield c
    c.close()


def connect_device(running: Running, client_id: str) -> Client:
    dev = Client(running.broker.port, client_id, str(DEVICE_ID), DEVICE_TOKEN)
    dev.paho.max_inflight_messages_set(1000)  # a real burst, not 20 at a time
    assert dev.connect() == 0
    return dev


def publish_burst(dev: Client, payloads: list[bytes]) -> None:
    """Publish QoS 1 without waiting in between, then wait for every PUBACK."""
    infos = [dev.paho.publish(UPDATE, p, qos=1) for p in payloads]
    deadline = time.monotonic() + ARRIVAL_TIMEOUT
    for info in infos:
        info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        assert info.is_published(), "the broker did not acknowledge the burst in time"


def kill_socket(dev: Client) -> None:
    """End the TCP connection without a DISCONNECT (power cut, lost Wi-Fi)."""
    sock = dev.paho.socket()
    assert isinstance(sock, socket.socket)
    sock.shutdown(socket.SHUT_RDWR)
    dev.paho.loop_stop()


def received(subscriber: Client, expected: set[bytes]) -> Counter[bytes]:
    """What reached the subscriber on the device's topic once all expected arrived
    (bounded), markers left out."""
    deadline = time.monotonic() + ARRIVAL_TIMEOUT
    got: Counter[bytes] = Counter()
    while not expected <= set(got) and time.monotonic() < deadline:
        with contextlib.suppress(queue.Empty):
            got[subscriber.wait_for(UPDATE)[1]] += 1
    # Anything still in flight (a duplicate) comes in before a marker sent afterwards.
    marker = MARKER + secrets.token_hex(4).encode()
    assert subscriber.publish(UPDATE, marker)
    with contextlib.suppress(queue.Empty):
        while (payload := subscriber.wait_for(UPDATE)[1]) != marker:
            got[payload] += 1
    return Counter({p: n for p, n in got.items() if not p.startswith(MARKER)})


def assert_exactly_once(got: Counter[bytes], expected: set[bytes]) -> None:
    missing = expected - set(got)
    duplicated = {p for p, n in got.items() if n > 1}
    assert not missing and not duplicated and set(got) == expected, (
        f"{len(expected) - len(missing)} of {len(expected)} acknowledged readings arrived; "
        f"{len(duplicated)} more than once; {len(set(got) - expected)} unexpected"
    )


def test_readings_acknowledged_before_a_disconnect_all_reach_the_bridge(
    running: Running, bridge: Client
) -> None:
    client_id = f"dev5-{secrets.token_hex(3)}"  # a device keeps its client id across wake-ups
    expected: set[bytes] = set()
    for round_no in range(50):
        payloads = [f"r{round_no}-{i}".encode() for i in range(5)]
        dev = connect_device(running, client_id)
        publish_burst(dev, payloads)
        dev.close()  # DISCONNECT right after the last PUBACK
        expected.update(payloads)
    assert_exactly_once(received(bridge, expected), expected)


def test_a_long_burst_then_disconnect_loses_nothing(running: Running, bridge: Client) -> None:
    payloads = [f"burst-{i}".encode() for i in range(2000)]
    dev = connect_device(running, f"dev5-{secrets.token_hex(3)}")
    publish_burst(dev, payloads)
    dev.close()
    assert_exactly_once(received(bridge, set(payloads)), set(payloads))


def test_readings_acknowledged_before_the_link_drops_all_reach_the_bridge(
    running: Running, bridge: Client
) -> None:
    client_id = f"dev5-{secrets.token_hex(3)}"
    expected: set[bytes] = set()
    for round_no in range(20):
        payloads = [f"cut{round_no}-{i}".encode() for i in range(5)]
        dev = connect_device(running, client_id)
        publish_burst(dev, payloads)
        kill_socket(dev)
        expected.update(payloads)
    burst = [f"cut-burst-{i}".encode() for i in range(1000)]
    dev = connect_device(running, f"dev5-{secrets.token_hex(3)}")
    publish_burst(dev, burst)
    kill_socket(dev)
    expected.update(burst)
    assert_exactly_once(received(bridge, expected), expected)


def test_a_device_back_before_its_old_connection_is_gone_keeps_its_readings(
    running: Running, bridge: Client
) -> None:
    # A device that reboots connects again (clean session, same client id) while the
    # broker still holds its old connection. The broker closes the old one (MQTT 3.1.1
    # 3.1.4-2) and drops its session; amqtt cleared with it the queue of readings
    # acknowledged but not yet delivered.
    client_id = f"dev5-{secrets.token_hex(3)}"
    payloads = [f"before-reboot-{i}".encode() for i in range(2000)]
    old = connect_device(running, client_id)
    publish_burst(old, payloads)
    new = connect_device(running, client_id)
    after = [f"after-reboot-{i}".encode() for i in range(5)]
    publish_burst(new, after)
    new.close()
    deadline = time.monotonic() + ARRIVAL_TIMEOUT
    while old.paho.is_connected():
        assert time.monotonic() < deadline, "the broker kept the old connection"
        time.sleep(0.05)
    expected = {*payloads, *after}
    assert_exactly_once(received(bridge, expected), expected)


def test_subscribers_coming_and_going_during_a_burst_make_no_one_miss_a_message(
    running: Running, bridge: Client
) -> None:
    # amqtt walked its live subscription table while broadcasting one message, awaiting
    # the RECEIVE check of each matching subscriber: a filter added or dropped meanwhile
    # ended that broadcast ("dictionary changed size during iteration") for the
    # subscribers of the filters after it; a subscriber leaving meanwhile made it skip
    # the next subscriber of the same filter.
    later = Client(running.broker.port, f"later-{secrets.token_hex(3)}",
                   running.bridge_username, running.bridge_password)  # fmt: skip
    assert later.connect() == 0
    # A filter added after the bridge's: walked after the bridge's await.
    assert later.subscribe(f"{TOPICS.base}/{DEVICE_ID}/+/update", qos=1) == 1
    stop = threading.Event()

    def churn() -> None:
        for n in itertools.count():
            if stop.is_set():
                return
            other = Client(running.broker.port, f"churn-{secrets.token_hex(3)}",
                           running.bridge_username, running.bridge_password)  # fmt: skip
            try:
                assert other.connect() == 0
                other.paho.subscribe([(f"churn/{n}/{k}", 1) for k in range(20)])  # new filters
                assert other.subscribe(TOPICS.update_filter, qos=1) == 1  # once they are in
            finally:
                other.close()

    churner = threading.Thread(target=churn, daemon=True)
    churner.start()
    try:
        payloads = {f"churn-burst-{i}".encode() for i in range(1000)}
        dev = connect_device(running, f"dev5-{secrets.token_hex(3)}")
        publish_burst(dev, sorted(payloads))
        dev.close()
    finally:
        stop.set()
        churner.join(ARRIVAL_TIMEOUT)
    try:
        assert_exactly_once(received(bridge, payloads), payloads)
        assert_exactly_once(received(later, payloads), payloads)
    finally:
        later.close()
