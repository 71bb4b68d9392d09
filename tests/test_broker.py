"""Contract of the embedded broker (SPEC section 5): who may connect, publish, subscribe.

A real amqtt broker runs on a free port in a background event loop; real paho 2.x
clients speak MQTT 3.1.1 to it. What amqtt 0.12 does with a refusal, asserted below:
CONNECT -> CONNACK "not authorized" (paho: 135); SUBSCRIBE -> SUBACK 0x80 for that
filter; PUBLISH -> acknowledged (QoS 1 PUBACK) and silently dropped, connection kept.
Absence is proven with a marker: a later allowed message on the same path arrives,
the refused one never arrived before it (amqtt delivers in order).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from amqtt.contexts import BaseContext
from amqtt.session import Session

from bridge.doors.broker import (
    AccessPolicy,
    BatmonAccessPlugin,
    BrokerStartError,
)
from bridge.models import MAX_SAFE_ID
from bridge.ratelimit import FailureLimiter
from tests.broker_support import (
    ALICE,
    ALICE_ID,
    ALICE_KEY,
    BOB,
    BOB_ID,
    BOB_KEY,
    NOT_AUTHORIZED,
    SUBACK_FAILURE,
    TOPICS,
    WAIT,
    Client,
    CountingCredentials,
    FakeCredentials,
    Running,
    make_broker,
)
from tests.home_assistant import DISCOVERY_FILTERS
from tests.support import Clock, LoopThread, wait_until

ALL_STATE, ALL_AVAILABILITY = "batmon/+/state", "batmon/+/availability"




@pytest.fixture
def connect(running: Running) -> Iterator[Callable[..., Client]]:
    """Factory: connect a client (must succeed unless expect_rc says otherwise)."""
    made: list[Client] = []
    ids = itertools.count()

    def factory(
        username: str | None,
        password: str | None = None,
        *,
        client_id: str | None = None,
        clean_session: bool = True,
        expect_rc: int = 0,
    ) -> Client:
        cid = client_id or f"test-{secrets.token_hex(3)}-{next(ids)}"
        c = Client(running.broker.port, cid, username, password, clean_session)
        made.append(c)
        assert c.connect() == expect_rc
        return c

    yield factory
    for c in made:
        c.close()


@pytest.fixture
def bridge(running: Running, connect: Callable[..., Client]) -> Client:
    """The bridge's own client, subscribed like mqtt_bridge: every device update."""
    c = connect(running.bridge_username, running.bridge_password)
    assert c.subscribe(TOPICS.update_filter, qos=1) == 1
    return c


def device(connect: Callable[..., Client], batmon_id: int, **kw: Any) -> Client:
    return connect(str(batmon_id), FakeCredentials().tokens[batmon_id], **kw)


# -- CONNECT ---------------------------------------------------------------


def test_anonymous_client_is_refused(connect: Callable[..., Client]) -> None:
    connect(None, expect_rc=NOT_AUTHORIZED)


@pytest.mark.parametrize(
    ("username", "password"),
    [
        ("5", "tok-six"),  # another device's token
        ("5", "tok-fiv"),
        ("05", "tok-five"),  # the id must be written canonically
        ("8", "tok-five"),  # unknown batmon
        (ALICE, BOB_KEY),
        ("nobody@example.org", ALICE_KEY),
        ("5", ""),  # username without a password
        (ALICE, None),
    ],
)
def test_wrong_password_is_refused(
    connect: Callable[..., Client], username: str, password: str | None
) -> None:
    connect(username, password, expect_rc=NOT_AUTHORIZED)


def test_wrong_bridge_password_is_refused(running: Running, connect: Callable[..., Client]) -> None:
    connect(running.bridge_username, running.bridge_password + "x", expect_rc=NOT_AUTHORIZED)


def test_ids_beyond_the_safe_integer_range_are_refused() -> None:
    # One rule for canonical ids (bridge.models.parse_batmon_id): 1..2^53-1, no zero padding.
    big = MAX_SAFE_ID + 1
    credentials = FakeCredentials(tokens={big: "tok-big", MAX_SAFE_ID: "tok-max"}, owner={big: ALICE_ID})
    policy = AccessPolicy(credentials=credentials, topics=TOPICS, bridge_username="b", bridge_password="p")
    assert policy.authenticate(str(big), "tok-big", peer="10.0.0.1") is None
    device = policy.authenticate(str(MAX_SAFE_ID), "tok-max", peer="10.0.0.1")
    assert device is not None and device.ident == MAX_SAFE_ID
    alice = policy.authenticate(ALICE, ALICE_KEY, peer="10.0.0.1")
    assert alice is not None
    assert not policy.may_receive(alice, TOPICS.state(big))
    assert not policy.may_receive(alice, TOPICS.discovery(big))


def test_failed_logins_throttle_the_source_and_every_secret_is_still_checked(
    loop_thread: LoopThread,
) -> None:
    clock = Clock()
    limiter = FailureLimiter(max_failures=3, window_s=60, clock=clock)
    credentials = CountingCredentials()
    r = make_broker(credentials, limiter=limiter)
    loop_thread.run(r.broker.start())

    def login(username: str | None, password: str | None) -> int:
        c = Client(r.broker.port, f"throttle-{secrets.token_hex(3)}", username, password)
        try:
            return c.connect()
        finally:
            c.close()

    try:
        assert login("5", "tok-five") == 0  # successes do not count
        for password in ("guess-1", "guess-2", "guess-3"):
            assert login("5", password) == NOT_AUTHORIZED
        assert limiter.throttled("127.0.0.1")  # keyed by the source
        asked = credentials.asked
        # Throttled: the right token is still checked, and accepted; so is a neighbour's key.
        assert login("5", "tok-five") == 0
        assert credentials.asked == asked + 1
        assert login(ALICE, ALICE_KEY) == 0
        # The in-process bridge shares the address; it is never refused either.
        assert login(r.bridge_username, r.bridge_password) == 0
        clock.advance(61)  # the window has passed
        assert not limiter.throttled("127.0.0.1")
    finally:
        loop_thread.run(r.broker.stop())


def test_default_throttle_is_30_failures_a_minute_per_source_and_never_refuses_a_right_secret(
) -> None:  # fmt: skip
    limiter = FailureLimiter()
    policy = AccessPolicy(credentials=FakeCredentials(), topics=TOPICS, bridge_username="b",
                          bridge_password="p", limiter=limiter)  # fmt: skip
    for _ in range(30):
        assert policy.authenticate("5", "guess", peer="10.0.0.1") is None
    assert policy.source_throttled("10.0.0.1") and not policy.source_throttled("10.0.0.2")
    assert policy.authenticate("5", "tok-five", peer="10.0.0.1") is not None
    assert policy.authenticate("5", "tok-five", peer="10.0.0.2") is not None  # from anywhere
    assert policy.authenticate("6", "tok-six", peer="10.0.0.1") is not None  # a neighbour
    assert policy.authenticate("b", "p", peer="10.0.0.1") is not None  # the bridge's own client


# -- devices ---------------------------------------------------------------


def test_device_can_publish_its_update_and_bridge_receives_it(
    bridge: Client, connect: Callable[..., Client]
) -> None:
    dev = device(connect, 5)
    assert dev.publish(TOPICS.update(5, "tok-five"), b'{"voltage": 12.9}')
    assert bridge.wait_for(TOPICS.update(5, "tok-five"))[1] == b'{"voltage": 12.9}'


def test_retained_update_is_delivered_but_never_stored(
    running: Running, bridge: Client, connect: Callable[..., Client]
) -> None:
    # Stored, it would be replayed to the bridge as a fresh reading on every (re)subscribe.
    update = TOPICS.update(5, "tok-five")
    dev = device(connect, 5)
    assert dev.publish(update, b'{"voltage": 12.1}', retain=True)
    assert bridge.wait_for(update) == (update, b'{"voltage": 12.1}', False)
    again = connect(running.bridge_username, running.bridge_password)
    assert again.subscribe(TOPICS.update_filter, qos=1) == 1
    assert again.subscribe(TOPICS.bridge_state) == 0  # every replay is in before this SUBACK
    assert dev.publish(update, b"live marker")
    again.wait_for(update, b"live marker")
    bridge.wait_for(update, b"live marker")
    assert [(t, p) for t, p, _ in again.received] == [(update, b"live marker")]
    assert [p for t, p, _ in bridge.received if t == update] == [b'{"voltage": 12.1}', b"live marker"]


def test_retained_last_will_on_the_update_topic_is_delivered_but_never_stored(
    running: Running, bridge: Client, connect: Callable[..., Client]
) -> None:
    update = TOPICS.update(5, "tok-five")
    dev = Client(running.broker.port, f"dev5-{secrets.token_hex(3)}", "5", "tok-five")
    dev.paho.will_set(update, b'{"details": "gone"}', qos=1, retain=True)
    try:
        assert dev.connect() == 0
        dev.paho.socket().shutdown(socket.SHUT_RDWR)  # gone without DISCONNECT
        assert bridge.wait_for(update) == (update, b'{"details": "gone"}', False)
    finally:
        dev.close()
    again = connect(running.bridge_username, running.bridge_password)
    assert again.subscribe(TOPICS.update_filter, qos=1) == 1
    assert again.subscribe(TOPICS.bridge_state) == 0
    assert bridge.publish(TOPICS.bridge_state, b"marker")
    again.wait_for(TOPICS.bridge_state, b"marker")
    assert update not in again.topics_received()


def test_device_cannot_publish_to_another_devices_topic(
    running: Running, bridge: Client, connect: Callable[..., Client]
) -> None:
    assert bridge.subscribe("batmon/#", qos=1) == 1  # catch spoofed state too
    dev = device(connect, 5)
    forbidden = [
        TOPICS.update(6, "tok-six"),  # even with the other device's real token
        TOPICS.update(5, "tok-six"),
        TOPICS.state(5),  # the bridge's topics
        TOPICS.availability(6),
        TOPICS.bridge_state,
    ]
    for topic in forbidden:
        # amqtt 0.12 acknowledges a refused QoS 1 PUBLISH and drops it silently.
        assert dev.publish(topic, b"spoof", retain=True)
    assert dev.paho.is_connected()
    marker = TOPICS.update(5, "tok-five")
    assert dev.publish(marker, b"marker")
    bridge.wait_for(marker, b"marker")
    assert [t for t, p, _ in bridge.received if p == b"spoof"] == []


def test_device_cannot_subscribe_to_another_devices_state(
    bridge: Client, connect: Callable[..., Client]
) -> None:
    dev = device(connect, 5)
    assert dev.subscribe(TOPICS.state(6)) == SUBACK_FAILURE
    assert dev.subscribe(TOPICS.error(6, "tok-six")) == SUBACK_FAILURE
    assert dev.subscribe(TOPICS.update(5, "tok-five")) == SUBACK_FAILURE  # not even its own
    assert dev.subscribe(TOPICS.state(5)) == 0
    assert dev.subscribe(TOPICS.availability(5)) == 0
    assert dev.subscribe(TOPICS.error(5, "tok-five")) == 0
    bridge.publish(TOPICS.state(6), b"six")
    bridge.publish(TOPICS.state(5), b"five")
    dev.wait_for(TOPICS.state(5), b"five")
    assert TOPICS.state(6) not in dev.topics_received()


@pytest.mark.parametrize(
    "topic_filter",
    [
        "#",
        "batmon/#",
        "batmon/5/#",
        "batmon/5/+",
        "batmon/5/tok-five/+",
        # the wildcards a user may hold stay refused to devices
        ALL_STATE,
        ALL_AVAILABILITY,
        DISCOVERY_FILTERS[0],
        *DISCOVERY_FILTERS[-2:],
    ],
)
def test_device_wildcard_subscription_is_refused(
    bridge: Client, connect: Callable[..., Client], topic_filter: str
) -> None:
    dev = device(connect, 5)
    assert dev.subscribe(topic_filter) == SUBACK_FAILURE
    assert dev.subscribe(TOPICS.state(5)) == 0
    bridge.publish(TOPICS.state(6), b"six")
    bridge.publish(TOPICS.state(5), b"five")
    dev.wait_for(TOPICS.state(5), b"five")
    assert set(dev.topics_received()) == {TOPICS.state(5)}


# -- users -----------------------------------------------------------------


def test_user_can_subscribe_to_own_batmon_state_and_gets_retained(
    bridge: Client, connect: Callable[..., Client]
) -> None:
    own = {
        TOPICS.state(5): b'{"voltage": 12.7, "status": "Online"}',
        TOPICS.availability(5): b"online",
        TOPICS.discovery(5): b'{"dev": {}}',
        TOPICS.bridge_state: b"online",
    }
    for topic, payload in own.items():
        assert bridge.publish(topic, payload, retain=True)
    user = connect(ALICE, ALICE_KEY)
    for topic, payload in own.items():
        assert user.subscribe(topic) == 0
        assert user.wait_for(topic) == (topic, payload, True)


def test_user_is_refused_other_users_batmon(bridge: Client, connect: Callable[..., Client]) -> None:
    for topic in (TOPICS.state(6), TOPICS.availability(6), TOPICS.discovery(6)):
        assert bridge.publish(topic, b"bob's", retain=True)
    user = connect(ALICE, ALICE_KEY)
    refused = [
        TOPICS.state(6),
        TOPICS.availability(6),
        TOPICS.discovery(6),
        TOPICS.update(5, "tok-five"),  # a device's topic, token and all
        TOPICS.error(5, "tok-five"),
        "batmon/05/state",
        TOPICS.homeassistant_status,  # a user may publish there, not listen
        # wildcards other than Home Assistant's discovery and the state/availability ones
        "#",
        "+/+/+/config",
        "batmon/#",
        "batmon/+/+",
        "batmon/+/+/update",
        "batmon/+/+/error",
        "batmon/5/+",
        "homeassistant/#",  # pre-2021 Home Assistant discovery: not granted
        "homeassistant/+/+/+/+/config",
        "homeassistant/device/#",
        "homeassistant/device/+/+",
        "homeassistant/device/+/state",
        "homeassistant/$SYS/+/config",
        "homeassistant//+/config",
        "homeassistant/device/batmon_6/+/config",
        "homeassistant/+/batmon_6/config",
        "other_prefix/device/+/config",
        "tasmota/discovery/#",  # Home Assistant also asks for other integrations' topics
    ]
    for topic_filter in refused:
        assert user.subscribe(topic_filter) == SUBACK_FAILURE, topic_filter
    assert user.subscribe(TOPICS.bridge_state) == 0
    assert bridge.publish(TOPICS.bridge_state, b"marker")
    user.wait_for(TOPICS.bridge_state, b"marker")
    assert set(user.topics_received()) == {TOPICS.bridge_state}


def test_user_wildcard_discovery_delivers_only_its_own_batmons(
    bridge: Client, connect: Callable[..., Client]
) -> None:
    retained = {
        TOPICS.discovery(5): b'{"dev": "alice 5"}',
        TOPICS.discovery(6): b'{"dev": "bob 6"}',
        TOPICS.discovery(7): b'{"dev": "alice 7"}',
        # other integrations' discovery on the shared prefix, with and without node_id
        "homeassistant/sensor/kitchen/config": b'{"other": 1}',
        "homeassistant/sensor/zigbee/kitchen/config": b'{"other": 2}',
        "homeassistant/device/batmon_05/config": b'{"bad spelling": 5}',
        "homeassistant/device/batmon_5/x/config": b'{"too deep": 5}',
    }
    for topic, payload in retained.items():
        assert bridge.publish(topic, payload, retain=True)
    user = connect(ALICE, ALICE_KEY)
    # Home Assistant's real subscriptions, plus the two of releases before 2024.11 and one
    # a newer release with one more component would add.
    filters = [*DISCOVERY_FILTERS, "homeassistant/+/+/config", "homeassistant/+/+/+/config",
               "homeassistant/future_component/+/config"]  # fmt: skip
    for topic_filter in filters:
        assert user.subscribe(topic_filter) == 0, topic_filter
    # amqtt replays a filter's retained messages after its SUBACK but before it handles
    # the next SUBSCRIBE: once this SUBACK is in, every replay has been sent.
    assert user.subscribe(TOPICS.bridge_state) == 0
    # Live messages through the same wildcards, then a live marker for Alice.
    assert bridge.publish(TOPICS.discovery(6), b'{"dev": "bob live"}')
    assert bridge.publish("homeassistant/sensor/kitchen/config", b'{"other": "live"}')
    assert bridge.publish(TOPICS.discovery(5), b"marker")
    user.wait_for(TOPICS.discovery(5), b"marker")
    # Overlapping filters (device/+/config and +/+/config) deliver a message once each.
    got = {(t, p) for t, p, _ in user.received if t != TOPICS.bridge_state}
    assert got == {
        (TOPICS.discovery(5), b'{"dev": "alice 5"}'),  # retained replay
        (TOPICS.discovery(7), b'{"dev": "alice 7"}'),
        (TOPICS.discovery(5), b"marker"),  # live
    }


def test_the_clear_of_a_deleted_batmon_reaches_its_former_owner_only(
    running: Running, bridge: Client, connect: Callable[..., Client]
) -> None:
    # The delete's empty retained config is what makes Home Assistant drop the device.
    assert bridge.publish(TOPICS.discovery(7), b'{"dev": "alice 7"}', retain=True)
    alice, bob = connect(ALICE, ALICE_KEY), connect(BOB, BOB_KEY)
    for user in (alice, bob):
        for topic_filter in DISCOVERY_FILTERS:
            assert user.subscribe(topic_filter) == 0
        assert user.subscribe(TOPICS.bridge_state) == 0
    alice.wait_for(TOPICS.discovery(7), b'{"dev": "alice 7"}')
    running.credentials.delete(7)
    try:
        assert bridge.publish(TOPICS.discovery(7), b"", retain=True)
        assert alice.wait_for(TOPICS.discovery(7), b"")[1] == b""
        assert bridge.publish(TOPICS.bridge_state, b"marker")
        bob.wait_for(TOPICS.bridge_state, b"marker")
        assert TOPICS.discovery(7) not in bob.topics_received()
    finally:
        running.credentials.owner[7] = running.credentials.deleted_owner.pop(7)
        running.credentials.tokens[7] = FakeCredentials().tokens[7]


def test_user_wildcard_state_and_availability_deliver_only_its_own_batmons(
    bridge: Client, connect: Callable[..., Client]
) -> None:
    assert bridge.publish(TOPICS.state(6), b"bob retained", retain=True)
    assert bridge.publish(TOPICS.availability(6), b"bob retained", retain=True)
    assert bridge.publish(TOPICS.state(5), b"alice retained", retain=True)
    user = connect(ALICE, ALICE_KEY)
    assert user.subscribe(ALL_STATE) == 0
    assert user.subscribe(ALL_AVAILABILITY) == 0
    assert user.subscribe(TOPICS.bridge_state) == 0  # every replay is in before this SUBACK
    for topic in (TOPICS.state(6), TOPICS.availability(6), TOPICS.update(5, "tok-five")):
        assert bridge.publish(topic, b"bob live")
    assert bridge.publish(TOPICS.availability(7), b"online")
    assert bridge.publish(TOPICS.state(5), b"marker")
    user.wait_for(TOPICS.state(5), b"marker")
    assert [p for t, p, _ in user.received if t == TOPICS.state(5)] == [b"alice retained", b"marker"]
    assert (TOPICS.availability(7), b"online", False) in user.received
    assert not [t for t, p, _ in user.received if p.startswith(b"bob")]
    assert set(user.topics_received()) <= {
        TOPICS.state(5),
        TOPICS.availability(5),
        TOPICS.state(7),
        TOPICS.availability(7),
        TOPICS.bridge_state,  # batmon/bridge/state matches batmon/+/state: allowed
    }


def test_user_wildcard_follows_ownership_changes_in_queued_messages(
    running: Running, loop_thread: LoopThread, bridge: Client, connect: Callable[..., Client]
) -> None:
    # A persistent session's messages pass the check when queued; ownership can change
    # before the client comes back to collect them.
    client_id = f"dash-{secrets.token_hex(3)}"
    user = connect(ALICE, ALICE_KEY, client_id=client_id, clean_session=False)
    assert user.subscribe(ALL_STATE, qos=1) == 1
    # amqtt handles this SUBSCRIBE only once the QoS 1 replay of retained state above is
    # acknowledged: leaving earlier would keep the session "connected" up to 5 s longer.
    assert user.subscribe(TOPICS.bridge_state) == 0
    user.close()

    def queued_when_away() -> int | None:
        async def probe() -> int | None:
            session = running.broker._broker.sessions[client_id][0]
            return None if session.transitions.is_connected() else session.retained_messages.qsize()

        return loop_thread.run(probe())

    wait_until(lambda: queued_when_away() == 0, WAIT, "the session away with nothing queued")
    assert bridge.publish(TOPICS.state(7), b"queued while owned")
    assert bridge.publish(TOPICS.state(5), b"queued five")
    wait_until(lambda: queued_when_away() == 2, WAIT, "both messages queued")
    running.credentials.owner[7] = BOB_ID
    try:
        back = connect(ALICE, ALICE_KEY, client_id=client_id, clean_session=False)
        assert bridge.publish(TOPICS.state(5), b"marker")
        back.wait_for(TOPICS.state(5), b"marker")
        assert TOPICS.state(7) not in back.topics_received()
        assert (TOPICS.state(5), b"queued five") in [(t, p) for t, p, _ in back.received]
    finally:
        running.credentials.owner[7] = ALICE_ID
        connect(ALICE, ALICE_KEY, client_id=client_id)  # clean session: drop it


def test_user_can_publish_home_assistant_birth_and_will(
    running: Running, bridge: Client, connect: Callable[..., Client]
) -> None:
    status = TOPICS.homeassistant_status
    assert bridge.subscribe(status, qos=1) == 1
    ha = Client(running.broker.port, f"ha-{secrets.token_hex(3)}", ALICE, ALICE_KEY)
    ha.paho.will_set(status, b"offline")  # Home Assistant's default last will
    try:
        assert ha.connect() == 0
        assert ha.publish(status, b"online", qos=0)  # its default birth message
        assert bridge.wait_for(status)[1] == b"online"
        ha.paho.socket().shutdown(socket.SHUT_RDWR)  # gone without DISCONNECT
        assert bridge.wait_for(status)[1] == b"offline"
    finally:
        ha.close()


def test_user_cannot_publish_anywhere_else(bridge: Client, connect: Callable[..., Client]) -> None:
    assert bridge.subscribe("#", qos=1) == 1  # whatever a forged message could reach
    user = connect(ALICE, ALICE_KEY)
    forbidden = [
        TOPICS.update(5, "tok-five"),  # its own batmon's device topic, token and all
        TOPICS.discovery(5),
        "homeassistant/device/batmon_99/config",
        TOPICS.state(5),
        TOPICS.availability(5),
        TOPICS.bridge_state,
        "homeassistant/status/x",
        "homeassistant",
    ]
    for topic in forbidden:
        assert user.publish(topic, b"forged", retain=True)  # acked, then dropped
    assert user.paho.is_connected()
    # amqtt handles one client's PUBLISHes in order: the allowed one is the marker.
    assert user.publish(TOPICS.homeassistant_status, b"online")
    bridge.wait_for(TOPICS.homeassistant_status, b"online")
    assert [t for t, p, _ in bridge.received if p == b"forged"] == []


def test_user_stops_receiving_a_batmon_it_no_longer_owns(
    running: Running, bridge: Client, connect: Callable[..., Client]
) -> None:
    user = connect(ALICE, ALICE_KEY)
    assert user.subscribe(TOPICS.state(7)) == 0
    assert user.subscribe(TOPICS.bridge_state) == 0
    bridge.publish(TOPICS.state(7), b"while owned")
    assert user.wait_for(TOPICS.state(7))[1] == b"while owned"
    running.credentials.owner[7] = BOB_ID
    try:
        bridge.publish(TOPICS.state(7), b"after transfer")
        bridge.publish(TOPICS.bridge_state, b"marker")
        user.wait_for(TOPICS.bridge_state, b"marker")
        assert [p for t, p, _ in user.received if t == TOPICS.state(7)] == [b"while owned"]
    finally:
        running.credentials.owner[7] = ALICE_ID


def test_retained_messages_do_not_leak_through_other_clients_subscriptions(
    bridge: Client, connect: Callable[..., Client]
) -> None:
    # amqtt 0.12.1 replays, to every new client, retained messages matching *any* client's
    # filters; EmbeddedBroker limits the replay to the client's own subscriptions.
    assert bridge.publish(TOPICS.state(6), b"bob's secret", retain=True)
    assert bridge.publish(TOPICS.state(5), b"alice's", retain=True)
    bob = connect(BOB, BOB_KEY)
    assert bob.subscribe(TOPICS.state(6)) == 0
    bob.wait_for(TOPICS.state(6), b"bob's secret")
    alice = connect(ALICE, ALICE_KEY)
    assert alice.subscribe(TOPICS.state(5)) == 0
    # A live marker: anything replayed at CONNECT or SUBSCRIBE reached alice before it.
    assert bridge.publish(TOPICS.state(5), b"live marker")
    alice.wait_for(TOPICS.state(5), b"live marker")
    assert set(alice.topics_received()) == {TOPICS.state(5)}


def test_persistent_session_cannot_be_taken_over_by_another_principal(
    running: Running, connect: Callable[..., Client]
) -> None:
    client_id = f"bridge-session-{secrets.token_hex(3)}"
    first = connect(
        running.bridge_username, running.bridge_password, client_id=client_id, clean_session=False
    )
    assert first.subscribe(TOPICS.update_filter, qos=1) == 1
    first.close()
    connect(ALICE, ALICE_KEY, client_id=client_id, clean_session=False, expect_rc=NOT_AUTHORIZED)
    # The owner still gets its session back, with what was queued while it was away.
    dev = device(connect, 5)
    assert dev.publish(TOPICS.update(5, "tok-five"), b"queued")
    again = connect(
        running.bridge_username, running.bridge_password, client_id=client_id, clean_session=False
    )
    assert again.wait_for(TOPICS.update(5, "tok-five"))[1] == b"queued"


def test_refused_connections_do_not_leave_live_sessions_behind(
    running: Running, loop_thread: LoopThread, connect: Callable[..., Client]
) -> None:
    # amqtt 0.12.1 leaves a refused client's session "connected" forever, so its session
    # monitor never drops it: one leaked session per failed login.
    ids = {f"refused-{secrets.token_hex(3)}-{i}" for i in range(5)}
    for client_id in ids:
        connect("5", "wrong", client_id=client_id, expect_rc=NOT_AUTHORIZED)

    async def live_refused() -> set[str]:
        sessions = running.broker._broker.sessions  # amqtt's table; no public view needed
        return {c for c, (s, _) in sessions.items() if c in ids and s.transitions.is_connected()}

    deadline = time.monotonic() + WAIT
    while (left := loop_thread.run(live_refused())) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert left == set()


def test_refused_client_can_neither_plant_a_will_nor_cut_off_a_persistent_session(
    running: Running, bridge: Client, connect: Callable[..., Client]
) -> None:
    # amqtt copies a CONNECT's will onto the persistent session of that client id before
    # authenticating, and took the live connection over even when it then refused.
    client_id = f"dev5-{secrets.token_hex(3)}"
    victim = Client(running.broker.port, client_id, "5", "tok-five", clean_session=False)
    victim.paho.will_set(TOPICS.update(5, "tok-five"), b"vetted will", qos=1)
    assert victim.connect() == 0
    attacker = Client(running.broker.port, client_id, None, None, clean_session=False)
    attacker.paho.will_set(TOPICS.update(5, "tok-five"), b"planted will", qos=1)
    try:
        assert attacker.connect() == NOT_AUTHORIZED
        assert victim.publish(TOPICS.update(5, "tok-five"), b"still connected")
        bridge.wait_for(TOPICS.update(5, "tok-five"), b"still connected")
        # The victim's link now drops without DISCONNECT: its own will is the one sent.
        victim.paho.socket().close()
        bridge.wait_for(TOPICS.update(5, "tok-five"), b"vetted will")
        assert [p for _, p, _ in bridge.received] == [b"still connected", b"vetted will"]
    finally:
        attacker.close()
        victim.close()


def test_last_will_outside_own_topics_is_dropped_not_refused() -> None:
    # Unit level: amqtt broadcasts a will without asking the topic plugins, so the auth
    # plugin must defuse it at CONNECT; killing a socket to watch it could not prove absence.
    policy = AccessPolicy(
        credentials=FakeCredentials(),
        topics=TOPICS,
        bridge_username="b",
        bridge_password="p",
    )
    context = BaseContext()
    context.config = BatmonAccessPlugin.Config(policy=policy)
    plugin = BatmonAccessPlugin(context)

    def session(username: str, password: str, will_topic: str) -> Session:
        s = Session()
        s.client_id, s.username, s.password = "c", username, password
        s.will_flag, s.will_topic, s.will_message = True, will_topic, b"offline"
        return s

    def will_kept(username: str, password: str, will_topic: str) -> bool:
        s = session(username, password, will_topic)
        assert asyncio.run(plugin.authenticate(session=s))  # connection accepted either way
        return s.will_flag

    assert not will_kept("5", "tok-five", TOPICS.state(6))  # would spoof retained state
    assert not will_kept(ALICE, ALICE_KEY, TOPICS.availability(5))
    assert not will_kept("5", "tok-five", TOPICS.homeassistant_status)  # users' only
    assert will_kept(ALICE, ALICE_KEY, TOPICS.homeassistant_status)  # HA's default will
    assert will_kept("5", "tok-five", TOPICS.update(5, "tok-five"))
    assert will_kept("b", "p", TOPICS.bridge_state)


# -- bridge & lifecycle ------------------------------------------------------


def test_bridge_client_can_publish_retained_state(bridge: Client, connect: Callable[..., Client]) -> None:
    assert bridge.publish(TOPICS.state(5), b'{"soc": 80}', retain=True)
    dev = device(connect, 5)  # subscribes after the fact: gets the retained state
    assert dev.subscribe(TOPICS.state(5)) == 0
    assert dev.wait_for(TOPICS.state(5)) == (TOPICS.state(5), b'{"soc": 80}', True)
    assert dev.subscribe(TOPICS.error(5, "tok-five")) == 0
    assert bridge.publish(TOPICS.error(5, "tok-five"), b'{"error": "bad"}')
    assert dev.wait_for(TOPICS.error(5, "tok-five"))[1] == b'{"error": "bad"}'


def test_port_zero_picks_a_free_port(running: Running, loop_thread: LoopThread) -> None:
    assert running.broker.port > 0
    other = make_broker(FakeCredentials(tokens={}, users={}, owner={}))
    loop_thread.run(other.broker.start())
    try:
        assert other.broker.port not in (0, running.broker.port)
        # Two brokers in one process, each with its own credentials.
        mine = Client(other.broker.port, "p0-a", other.bridge_username, other.bridge_password)
        theirs = Client(other.broker.port, "p0-b", running.bridge_username, running.bridge_password)
        try:
            assert mine.connect() == 0
            assert theirs.connect() == NOT_AUTHORIZED
        finally:
            mine.close()
            theirs.close()
    finally:
        loop_thread.run(other.broker.stop())
    with pytest.raises(RuntimeError):
        _ = other.broker.port


def test_busy_port_raises_clear_error(loop_thread: LoopThread, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = make_broker(FakeCredentials(), port=port)
        with caplog.at_level(logging.DEBUG, logger="amqtt"), pytest.raises(BrokerStartError) as err:
            loop_thread.run(r.broker.start())
    assert str(err.value) == f"cannot start MQTT broker on 127.0.0.1:{port}: Address already in use"
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert not [rec for rec in caplog.records if rec.exc_info or rec.levelno >= logging.ERROR]


def test_a_reset_key_ends_its_sessions_and_queues_nothing_for_them(
    running: Running, loop_thread: LoopThread, bridge: Client, connect: Callable[..., Client]
) -> None:
    client_id = f"dash-{secrets.token_hex(3)}"
    away = connect(ALICE, ALICE_KEY, client_id=client_id, clean_session=False)
    assert away.subscribe(ALL_STATE, qos=1) == 1
    assert away.subscribe(TOPICS.bridge_state) == 0
    live = connect(ALICE, ALICE_KEY)
    assert live.subscribe(ALL_STATE, qos=1) == 1
    bob = connect(BOB, BOB_KEY)
    away.close()

    def queued_when_away() -> int | None:
        async def probe() -> int | None:
            session = running.broker._broker.sessions[client_id][0]
            return None if session.transitions.is_connected() else session.retained_messages.qsize()

        return loop_thread.run(probe())

    wait_until(lambda: queued_when_away() == 0, WAIT, "the session away with nothing queued")
    running.credentials.users[ALICE] = ("key-alice-reset", ALICE_ID)  # `batmon user reset-key`
    try:
        loop_thread.call(running.broker.drop_revoked_sessions)
        assert live.wait_disconnected(WAIT), "a session of the old key stayed connected"
        assert bob.paho.is_connected()
        assert bridge.publish(TOPICS.state(5), b"after the reset")
        connect(ALICE, ALICE_KEY, expect_rc=NOT_AUTHORIZED)
        assert queued_when_away() == 0
    finally:
        running.credentials.users[ALICE] = (ALICE_KEY, ALICE_ID)
        connect(ALICE, ALICE_KEY, client_id=client_id)  # clean session: drop it
