"""The bridge's MQTT link: one paho client to a broker, and only the transport.

It connects (to an external broker in MQTT v5, falling back to 3.1.1; to the embedded
one in 3.1.1), reconnects with back-off, subscribes on every connect, publishes, and
acknowledges a message on the connection it came by. It keeps ``bridge/state``
(``online``, and ``offline`` as its last will and at a clean stop).

paho runs its network loop in its own thread. That thread only hands over: each
callback passes what it got to the event loop (``call_soon_threadsafe``) and writes
nothing the loop writes (docs/DESIGN.md, "Threads"). On the loop an update goes to
whoever took updates (the external broker's door, ``external_door.py``); Home
Assistant's status and every (re)connect become events on the bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import socket
import ssl
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from bridge.events import EventBus, HomeAssistantStatus, MqttConnected
from bridge.threads import run_on_own_thread
from bridge.topics import Topics

log = logging.getLogger(__name__)

KEEPALIVE_S = 30
OFFLINE_PUBLISH_S = 2.0  # how long a stop waits for the broker to take ``offline``
# paho waits min, then doubles up to max, between tries: capped at a few seconds, ingest
# resumes soon after a broker restart. paho has no jitter, so both are drawn once per
# process: bridges sharing a broker do not retry in step.
RECONNECT_MIN_DELAY_S = random.uniform(0.5, 1.0)
RECONNECT_MAX_DELAY_S = random.uniform(3.0, 5.0)
RECEIVE_MAXIMUM = 1_000
"""Unacked updates an MQTT v5 broker may send us at once: our commit groups can be this
big. A 3.1.1 session gets the broker's own limit (Mosquitto: max_inflight_messages, 20)."""
SESSION_EXPIRY_S = 7 * 86_400
"""How long an external broker keeps our v5 session (and queues readings) while we are away."""
UNSUPPORTED_PROTOCOL = (1, 0x84)  # CONNACK codes of a broker that speaks no MQTT v5


class BrokerMode(enum.Enum):
    """Which broker `batmon serve` talks to; what differs between the two follows from it.

    EMBEDDED: the in-process amqtt broker hands devices' updates to the writer itself
    and takes retained topics straight from the state publisher; the link only keeps
    ``bridge/state`` and hears Home Assistant. amqtt speaks MQTT 3.1.1 only.

    EXTERNAL: Mosquitto or another broker. The link subscribes to updates for the
    external door, speaks MQTT v5 (Receive Maximum lifts 3.1.1's inflight cap) unless
    the broker refuses it, carries every retained topic, and a RETAIN flag on an
    update means a stored message replayed on subscribe, not a new reading.
    """

    EMBEDDED = "embedded"
    EXTERNAL = "external"

    @property
    def tries_mqtt5(self) -> bool:
        """True when the first connect asks for MQTT v5."""
        return self is BrokerMode.EXTERNAL


@dataclass(frozen=True)
class BrokerEndpoint:
    """Where the link connects, and as whom."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    client_id: str = "batmon-bridge"
    tls: ssl.SSLContext | None = None  # mqtts:// (bridge/tls.py client_context)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Inbound:
    """A message paho's thread handed to the event loop."""

    topic: str | None  # None when the topic is not UTF-8 (a wildcard subscription let it in)
    payload: bytes
    mid: int
    qos: int
    retain: bool
    dup: bool  # a retransmission (broker session resume or device retry)
    connection: int  # which connection it came on: acks are only valid on that one


UpdateHandler = Callable[[Inbound], None]
# An external broker's endpoint is fixed; the embedded broker's port is known once it
# listens, so there the link is given a callable it reads at each start.
EndpointSource = BrokerEndpoint | Callable[[], BrokerEndpoint]


class MqttConnectError(Exception):
    """The broker could not be reached, refused us, or refused our subscription."""


class _ProtocolRefused(MqttConnectError):
    """The broker refused MQTT v5: start again with 3.1.1."""


def new_v5_client(client_id: str) -> mqtt.Client:
    """A paho client speaking MQTT v5, for external brokers (bigger inflight window)."""
    return mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)


def new_client(client_id: str, *, clean_session: bool) -> mqtt.Client:
    """A paho client speaking MQTT 3.1.1, the only version amqtt understands."""
    return mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=clean_session,
        protocol=mqtt.MQTTv311,
    )


class MqttLink:
    """The bridge's paho client: connect, subscribe, publish, ack; nothing about readings."""

    def __init__(self, endpoint: EndpointSource, mode: BrokerMode, topics: Topics, bus: EventBus,
                 *, homeassistant: bool = True) -> None:  # fmt: skip
        """``homeassistant``: listen for Home Assistant's birth message (discovery is on)."""
        self._endpoint = endpoint
        self.mode = mode
        self.topics = topics
        self.bus = bus
        self.homeassistant = homeassistant
        self._mqtt5 = mode.tries_mqtt5
        self._updates: tuple[str, UpdateHandler] | None = None
        self._stale: str | None = None  # a filter our persistent session may hold from before
        self._client: mqtt.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future[None] | None = None
        # paho's thread -> the loop; deque append/popleft are atomic, and the loop is
        # woken once per burst, not per message (the self-pipe write of
        # call_soon_threadsafe was ~9 % of the profile at 2,000 messages/s).
        self._handoff: deque[Inbound] = deque()
        # Written by paho's thread only (the loop reads them): the connection
        # generation messages are tagged with, the last failure, our SUBSCRIBE's id.
        self._connection = 0
        self._last_error = "no answer yet"
        self._subscribe_mid: int | None = None
        # Written on the loop only.
        self._counters: Counter[str] = Counter()
        # Topics emptied (deleted batmons) while disconnected: an empty retained payload
        # cannot be rebuilt from the registry, so it is re-sent on reconnect.
        self._pending_clears: set[str] = set()

    # -- wiring (before start) -----------------------------------------------------
    def take_updates(self, subscription: str, handler: UpdateHandler, *, stale: str | None = None) -> None:
        """Subscribe to ``subscription`` on every connect and pass its messages to
        ``handler`` on the loop; the handler acks each (``ack``) when it may.

        ``stale``: a filter to unsubscribe on every connect. A persistent session keeps
        its subscriptions, so a bridge that took updates another way under the same client
        id would otherwise get each of them twice."""
        self._updates = (subscription, handler)
        self._stale = stale

    # -- state -----------------------------------------------------------------------
    @property
    def endpoint(self) -> BrokerEndpoint:
        """Where the link connects (read afresh at each start)."""
        source = self._endpoint
        return source if isinstance(source, BrokerEndpoint) else source()

    @property
    def connected(self) -> bool:
        """True while the client holds a live session with the broker."""
        return self._client is not None and self._client.is_connected()

    @property
    def connection(self) -> int:
        """The current connection's number: a message from an older one cannot be acked."""
        return self._connection

    @property
    def protocol(self) -> str:
        """The MQTT protocol version in use: "5" or "3.1.1"."""
        return "5" if self._mqtt5 else "3.1.1"

    @property
    def stats(self) -> dict[str, Any]:
        """Connection state and counters, for /healthz and metrics."""
        return {"connected": self.connected, "broker": self.endpoint.address,
                "connects": self._counters["connects"],
                "disconnects": self._counters["disconnects"]}  # fmt: skip

    # -- lifecycle -----------------------------------------------------------------
    async def start(self, timeout: float = 10.0) -> None:
        """Connect and subscribe; MqttConnectError when that fails within ``timeout``."""
        try:
            await self._start(timeout)
        except _ProtocolRefused:
            log.info("the MQTT broker at %s speaks no MQTT v5; using 3.1.1", self.endpoint.address)
            self._mqtt5 = False
            await self._start(timeout)

    async def stop(self) -> None:
        """Publish ``offline``, disconnect (an external broker keeps the session)."""
        await self._shutdown(publish_offline=True)

    async def _start(self, timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        end = self.endpoint
        self._endpoint = end  # what stats, logs and errors name from now on
        if self._mqtt5:
            client = self._client = new_v5_client(end.client_id)
        else:
            client = self._client = new_client(end.client_id, clean_session=False)
        if end.tls is not None:
            client.tls_set_context(end.tls)
        if end.username is not None:
            client.username_pw_set(end.username, end.password)
        client.will_set(self.topics.bridge_state, "offline", qos=1, retain=True)
        client.reconnect_delay_set(RECONNECT_MIN_DELAY_S, RECONNECT_MAX_DELAY_S)  # type: ignore[arg-type]
        # No inflight cap: our publishes go to a nearby broker, and paho's counter
        # would otherwise leak when stale messages are dropped on reconnect.
        client.max_inflight_messages_set(0)
        client.manual_ack_set(True)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        if self._mqtt5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = SESSION_EXPIRY_S
            properties.ReceiveMaximum = RECEIVE_MAXIMUM
            client.connect_async(end.host, end.port, keepalive=KEEPALIVE_S, clean_start=False,
                                 properties=properties)  # fmt: skip
        else:
            client.connect_async(end.host, end.port, keepalive=KEEPALIVE_S)
        client.loop_start()
        try:
            await asyncio.wait_for(self._ready, timeout)
        except (TimeoutError, MqttConnectError) as exc:
            await self._shutdown(publish_offline=False)
            if isinstance(exc, MqttConnectError):
                raise
            raise MqttConnectError(
                f"could not connect to the MQTT broker at {end.address}"
                f" within {timeout:g} s: {self._last_error}"
            ) from None
        log.debug("MQTT link connected to %s as %s", end.address, end.client_id)

    async def _shutdown(self, *, publish_offline: bool) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        if publish_offline and client.is_connected():
            info = client.publish(self.topics.bridge_state, "offline", qos=1, retain=True)
            for _ in range(int(OFFLINE_PUBLISH_S / 0.01)):
                if info.is_published() or not client.is_connected():
                    break
                await asyncio.sleep(0.01)
        client.disconnect()
        # loop_stop joins paho's thread: on a thread of its own that ends with it,
        # so the loop is not held and no pool thread outlives the service.
        await run_on_own_thread(client.loop_stop, name="mqtt-link-stop")

    # -- sending (on the loop) -------------------------------------------------------
    def publish(self, topic: str, payload: str | bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Publish while connected; dropped otherwise (retained topics are re-sent on connect)."""
        client = self._client
        if client is not None and client.is_connected():
            client.publish(topic, payload, qos=qos, retain=retain)

    def publish_retained(self, topic: str, payload: str) -> None:
        """Publish retained at QoS 1; an empty payload (a clear) is also re-sent on reconnect."""
        if payload == "":
            self._pending_clears.add(topic)
        self.publish(topic, payload, qos=1, retain=True)

    def ack(self, message: Inbound) -> None:
        """Ack on the connection the message came on; after a reconnect the broker resends."""
        client = self._client
        if message.qos > 0 and client is not None and message.connection == self._connection:
            client.ack(message.mid, message.qos)

    def drop_connection(self) -> None:
        """Close the socket without acking: the broker resends every unacked message
        once paho has reconnected (the session is persistent)."""
        client = self._client
        sock = client.socket() if client is not None else None
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    # -- paho callbacks (paho's thread: hand over, write nothing the loop writes) -----
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags,
                    reason: ReasonCode, properties: Any) -> None:  # fmt: skip
        if reason.is_failure and self._mqtt5 and reason.value in UNSUPPORTED_PROTOCOL:
            client.disconnect()
            self._call_in_loop(self._fail_start, _ProtocolRefused(str(reason)))
            return
        where = self.endpoint.address
        if reason.is_failure:
            self._last_error = f"the broker refused the connection: {reason}"
            log.warning("MQTT broker %s refused the bridge: %s", where, reason)
            # Wrong credentials do not fix themselves: fail start() now, not at timeout.
            self._call_in_loop(self._fail_start, MqttConnectError(
                f"the MQTT broker at {where} refused the bridge: {reason}"
            ))  # fmt: skip
            return
        self._connection += 1
        # paho leaves Nagle on: back-to-back small packets (state, availability, acks)
        # would wait for the broker's delayed ACK, ~40 ms each time.
        sock = client.socket()
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Retained publishes queued during the outage are stale; the MqttConnected
        # handlers republish the current truth, so drop them rather than let them win.
        client.drop_out_messages()
        subscriptions = [(self._updates[0], 1)] if self._updates is not None else []
        if self.homeassistant:
            subscriptions.append((self.topics.homeassistant_status, 1))
        # Before the SUBSCRIBE: on the loop, _connected runs before any message of it.
        self._call_in_loop(self._connected)
        if self._stale is not None:
            client.unsubscribe(self._stale)  # before the SUBSCRIBE: no update comes twice after it
        if subscriptions:
            _, self._subscribe_mid = client.subscribe(subscriptions)
        else:
            self._call_in_loop(self._subscribed, None)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._last_error = "no MQTT broker answered (connection refused or host unreachable)"

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: mqtt.DisconnectFlags,
                       reason: ReasonCode, properties: Any) -> None:  # fmt: skip
        self._last_error = f"disconnected: {reason}"
        self._call_in_loop(self._count, "disconnects")
        if reason.is_failure:
            log.warning("MQTT link lost the broker (%s); reconnecting", reason)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                      reason_codes: list[ReasonCode], properties: Any) -> None:  # fmt: skip
        if mid != self._subscribe_mid:
            return
        refused = [str(code) for code in reason_codes if code.is_failure]
        error = None
        if refused:
            error = MqttConnectError(
                f"the MQTT broker at {self.endpoint.address} refused the bridge's"
                f" subscriptions: {', '.join(refused)}"
            )
        self._call_in_loop(self._subscribed, error)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            topic: str | None = msg.topic
        except UnicodeDecodeError:
            topic = None
        handoff = self._handoff
        handoff.append(Inbound(topic, bytes(msg.payload), msg.mid, msg.qos, bool(msg.retain),
                               bool(msg.dup), self._connection))  # fmt: skip
        if len(handoff) == 1:
            self._call_in_loop(self._take_handoff)

    def _call_in_loop(self, callback: Callable[..., Any], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed under us: shutting down
            loop.call_soon_threadsafe(callback, *args)

    # -- the loop's side -------------------------------------------------------------
    def _count(self, name: str) -> None:
        self._counters[name] += 1

    def _fail_start(self, error: MqttConnectError) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(error)

    def _subscribed(self, error: MqttConnectError | None) -> None:
        if self._ready is None or self._ready.done():
            if error is not None:
                log.error("%s", error)
            return
        if error is None:
            self._ready.set_result(None)
        else:
            self._ready.set_exception(error)

    def _connected(self) -> None:
        """Say we are online, re-send clears, and let the extensions republish."""
        self._counters["connects"] += 1
        self.publish(self.topics.bridge_state, "online", qos=1, retain=True)
        clears, self._pending_clears = self._pending_clears, set()
        for topic in clears:
            self.publish_retained(topic, "")
        self.bus.emit(MqttConnected())

    def _take_handoff(self) -> None:
        """Pass what paho's thread handed over to its taker, in arrival order."""
        handoff = self._handoff
        homeassistant = self.topics.homeassistant_status
        updates = self._updates[1] if self._updates is not None else None
        while handoff:
            message = handoff.popleft()
            if message.topic == homeassistant:
                self.ack(message)
                # A retained birth message only repeats what the connect just published.
                if not message.retain:
                    self.bus.emit(HomeAssistantStatus(message.payload))
            elif updates is not None:
                updates(message)
            else:
                self.ack(message)

