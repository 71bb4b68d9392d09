"""The MQTT door: the bridge's paho client on the shared ingest path.

Devices publish readings on ``batmon/{id}/{token}/update``; the bridge checks id and
token, validates with the same models as HTTP and calls ``Core.ingest_readings``.
It keeps the retained ``state``/``availability`` topics and ``bridge/state`` in step
with core events, so HTTP readings are republished exactly like MQTT ones.

paho runs its network loop in its own thread; every message hops into the asyncio
loop and one consumer task processes them in arrival order, acking each QoS 1
message only after its readings are committed (a crash before that means the
broker redelivers it: the session is persistent).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import ssl
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from bridge.core import Batmon, Core
from bridge.doors.update_door import UpdateDoor
from bridge.events import (
    NO_SUBSCRIPTION,
    BatmonChanged,
    BatmonDeleted,
    ReadingAccepted,
    StatusChanged,
    Subscription,
)
from bridge.extensions.bank_publisher import BankPublisher
from bridge.extensions.discovery import HomeAssistantDiscovery
from bridge.topics import Topics
from bridge.writer import Overloaded

log = logging.getLogger(__name__)

# QoS 0 messages have no broker-side flow control; past this backlog they are dropped
# rather than letting memory grow (QoS 1 is bounded by the broker's inflight window).
MAX_BACKLOG = 10_000
YIELD_EVERY = 4  # updates submitted between yields to the event loop
COALESCE_S = 0.25  # at most one retained state per batmon this often, after readings
STOP_DRAIN_S = 10.0  # how long a stop waits for submitted updates to commit and be acked
KEEPALIVE_S = 30
# paho waits min, then doubles up to max, between tries: capped at a few seconds, ingest
# resumes soon after a broker restart. paho has no jitter, so both are drawn once per
# process: bridges sharing a broker do not retry in step.
RECONNECT_MIN_DELAY_S = random.uniform(0.5, 1.0)
RECONNECT_MAX_DELAY_S = random.uniform(3.0, 5.0)

# Publishes a retained payload on a topic; an empty payload clears the topic.
RetainedPublish = Callable[[str, str], None]


class MqttConnectError(Exception):
    """The broker could not be reached, refused us, or refused our subscription."""


class _ProtocolRefused(MqttConnectError):
    """The broker refused MQTT v5: start again with 3.1.1."""


RECEIVE_MAXIMUM = 1_000
"""Unacked updates an MQTT v5 broker may send us at once: our commit groups can be this
big. A 3.1.1 session gets the broker's own limit (Mosquitto: max_inflight_messages, 20)."""
SESSION_EXPIRY_S = 7 * 86_400
"""How long an external broker keeps our v5 session (and queues readings) while we are away."""
UNSUPPORTED_PROTOCOL = (1, 0x84)  # CONNACK codes of a broker that speaks no MQTT v5


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


def state_payload(batmon: Batmon) -> dict[str, Any]:
    """The retained state JSON: current values, announced status, time and units."""
    return {
        "batmon_id": batmon.id,
        "batmon_name": batmon.name,
        "batmon_voltage": batmon.voltage,
        "batmon_current": batmon.current,
        "batmon_power": batmon.power,
        "batmon_soc": batmon.soc,
        "batmon_details": batmon.details,
        "batmon_status": batmon.status,
        "last_modified": batmon.last_modified,
        "voltage_units": batmon.voltage_units,
        "current_units": batmon.current_units,
        "power_units": batmon.power_units,
        "soc_units": batmon.soc_units,
    }


class StatePublisher:
    """Keeps each batmon's retained state and availability topics in step with events.

    State after a reading is coalesced: at most one publish per batmon every
    ``COALESCE_S``, carrying the latest values, so a device sending 100 readings a
    second costs 4 publishes, not 100. Status changes and edits go out at once.
    """

    def __init__(self, core: Core, topics: Topics, publish: RetainedPublish) -> None:
        self.core = core
        self._subscription: Subscription = NO_SUBSCRIPTION
        self.topics = topics
        self.publish = publish
        # A digest of the last state sent per batmon (not the payload: memory at 10,000
        # batmons), so N events describing the same memory state publish once.
        self._last: dict[int, int] = {}
        self._sent_at: dict[int, float] = {}
        self._due: dict[int, asyncio.TimerHandle] = {}

    def start(self) -> None:
        """Subscribe to the core's events."""
        self._subscription = self.core.bus.subscribe_all({
            ReadingAccepted: self._on_reading,
            StatusChanged: self._on_status,
            BatmonChanged: self._on_changed,
            BatmonDeleted: self._on_deleted,
        })  # fmt: skip

    def stop(self) -> None:
        """Stop reacting to events; pending coalesced publishes are dropped."""
        self._subscription.cancel()
        for handle in self._due.values():
            handle.cancel()
        self._due.clear()

    def publish_all(self) -> None:
        """Send every batmon's state and availability (after each (re)connect)."""
        self._last.clear()
        for batmon in list(self.core.batmons.values()):
            self.publish_state(batmon)
            self.publish_availability(batmon)

    def publish_state(self, batmon: Batmon) -> None:
        """Send the batmon's state unless it is what was sent last."""
        payload = json.dumps(state_payload(batmon))
        digest = hash(payload)
        if self._last.get(batmon.id) != digest:
            self._last[batmon.id] = digest
            self._sent_at[batmon.id] = time.monotonic()
            self.publish(self.topics.state(batmon.id), payload)

    def publish_availability(self, batmon: Batmon) -> None:
        """Send ``online``/``offline`` as the core last announced the status."""
        payload = "online" if batmon.status == "Online" else "offline"
        self.publish(self.topics.availability(batmon.id), payload)

    def _state_soon(self, batmon: Batmon) -> None:
        if batmon.id in self._due:
            return  # the publish already scheduled will carry these values
        wait = self._sent_at.get(batmon.id, -COALESCE_S) + COALESCE_S - time.monotonic()
        if wait <= 0:
            self.publish_state(batmon)
            return
        loop = asyncio.get_running_loop()
        self._due[batmon.id] = loop.call_later(wait, self._flush, batmon)

    def _flush(self, batmon: Batmon) -> None:
        self._due.pop(batmon.id, None)
        if self.core.batmons.get(batmon.id) is batmon:
            self.publish_state(batmon)

    def _on_reading(self, event: ReadingAccepted) -> None:
        if event.current:
            self._state_soon(event.batmon)

    def _on_status(self, event: StatusChanged) -> None:
        self.publish_availability(event.batmon)
        self.publish_state(event.batmon)

    def _on_changed(self, event: BatmonChanged) -> None:
        self.publish_state(event.batmon)
        if event.created:
            self.publish_availability(event.batmon)

    def _on_deleted(self, event: BatmonDeleted) -> None:
        batmon_id = event.batmon.id
        self._last.pop(batmon_id, None)
        self._sent_at.pop(batmon_id, None)
        handle = self._due.pop(batmon_id, None)
        if handle is not None:
            handle.cancel()
        self.publish(self.topics.state(batmon_id), "")
        self.publish(self.topics.availability(batmon_id), "")


@dataclass(frozen=True)
class _Inbound:
    """An update message handed from paho's thread to the event loop."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    connection: int  # which connection it came on: acks are only valid on that one
    dup: bool = False  # a retransmission (broker session resume or device retry)


class MqttBridge:
    """The bridge's MQTT client: ingest device updates, publish state and discovery."""

    def __init__(
        self,
        core: Core,
        topics: Topics,
        *,
        host: str,
        port: int,
        username: str | None,
        password: str | None,
        client_id: str = "batmon-bridge",
        shared: bool = False,
        discovery: bool = True,
        retain_flag_means_replay: bool = True,
        ingest_updates: bool = True,
        mqtt5: bool = False,
        door: UpdateDoor | None = None,
        publish_direct: RetainedPublish | None = None,
        tls: ssl.SSLContext | None = None,
        listen_homeassistant_status: bool = True,
    ) -> None:
        self.core = core
        self.tls = tls  # mqtts:// (bridge/tls.py client_context)
        self.topics = topics
        self.host = host
        self.port = port
        self.username = username
        self.password = password
        self.client_id = client_id
        self.shared = shared
        self.discovery = discovery
        # A broker following MQTT 3.1.1 sets RETAIN only when replaying a stored
        # message on subscribe: such an update is old, not a new reading. amqtt also
        # sets it on messages queued while we were away, so there it means nothing
        # (and our embedded broker never stores retained updates).
        self.retain_flag_means_replay = retain_flag_means_replay
        # False with the embedded broker: it hands updates to the writer itself.
        self.ingest_updates = ingest_updates
        # v5 on external brokers (Receive Maximum lifts the 3.1.1 inflight cap), falling
        # back to 3.1.1 for a broker that refuses it; amqtt speaks 3.1.1 only.
        self.mqtt5 = mqtt5
        self.door = door if door is not None else UpdateDoor(core, topics, self._publish_error)
        # With the embedded broker, retained topics are published into it directly:
        # no loopback round trip per state (the paho client then only listens for
        # Home Assistant's birth message).
        self.publish_direct = publish_direct
        # False with the embedded broker: it knows which user published Home Assistant's
        # ``online`` and calls homeassistant_status() itself, so only that user's configs
        # go out. Here the message carries no user: every config, debounced globally.
        self.listen_homeassistant_status = listen_homeassistant_status
        # Updates submitted and not yet acknowledged, in arrival order: acks go out
        # in that order, each once its commit is done (the broker's inflight window
        # is used, and a failed commit is never acked).
        self._unacked: deque[tuple[_Inbound, asyncio.Future[None] | None]] = deque()
        self._handoff: deque[_Inbound] = deque()  # paho's thread -> the loop (deque ops are atomic)
        self._client: mqtt.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: asyncio.Queue[_Inbound] | None = None
        self._consumer: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._state: StatePublisher | None = None
        self._discovery: HomeAssistantDiscovery | None = None
        self._banks: BankPublisher | None = None
        self._connection = 0
        self._subscribe_mid: int | None = None
        self._last_error = "no answer yet"
        # Topics emptied (deleted batmons) since the last connect: an empty retained
        # payload cannot be rebuilt from the registry, so it is re-sent on reconnect.
        self._pending_clears: set[str] = set()
        self._counters: Counter[str] = Counter()

    # -- public --------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """True while the client holds a live session with the broker."""
        return self._client is not None and self._client.is_connected()

    @property
    def protocol(self) -> str:
        """The MQTT protocol version in use: "5" or "3.1.1"."""
        return "5" if self.mqtt5 else "3.1.1"

    @property
    def stats(self) -> dict[str, Any]:
        """Connection state and message counters, for /healthz."""
        counters = self.door.stats
        for name in ("dropped_backlog", "dropped_retained", "storage_reconnects", "connects",
                     "disconnects"):  # fmt: skip
            counters[name] = self._counters[name]
        counters["received"] += self._counters["received_dropped"]
        if self._discovery is not None:
            counters.update(self._discovery.counters)
        return {"connected": self.connected, "broker": f"{self.host}:{self.port}", **counters}

    async def start(self, timeout: float = 10.0) -> None:
        """Connect, subscribe and publish retained topics; MqttConnectError on failure."""
        try:
            await self._start(timeout)
        except _ProtocolRefused:
            log.info("the MQTT broker at %s:%s speaks no MQTT v5; using 3.1.1", self.host, self.port)
            self.mqtt5 = False
            await self._start(timeout)

    async def _start(self, timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._inbox = asyncio.Queue()
        self._ready = self._loop.create_future()
        self._state = StatePublisher(self.core, self.topics, self._publish_retained)
        self._banks = BankPublisher(self.core, self.topics, self._publish_retained, self.discovery)
        if self.discovery:
            self._discovery = HomeAssistantDiscovery(self.core, self.topics, self._publish_retained,
                                                     also_resend=self._banks.resend_discovery)  # fmt: skip
        if self.mqtt5:
            client = self._client = new_v5_client(self.client_id)
        else:
            client = self._client = new_client(self.client_id, clean_session=False)
        if self.tls is not None:
            client.tls_set_context(self.tls)
        if self.username is not None:
            client.username_pw_set(self.username, self.password)
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
        self._state.start()
        if self._discovery is not None:
            self._discovery.start()
        self._banks.start()
        self._consumer = asyncio.create_task(self._consume(), name="mqtt-bridge-consumer")
        if self.mqtt5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = SESSION_EXPIRY_S
            properties.ReceiveMaximum = RECEIVE_MAXIMUM
            client.connect_async(self.host, self.port, keepalive=KEEPALIVE_S, clean_start=False,
                                 properties=properties)  # fmt: skip
        else:
            client.connect_async(self.host, self.port, keepalive=KEEPALIVE_S)
        client.loop_start()
        try:
            await asyncio.wait_for(self._ready, timeout)
        except (TimeoutError, MqttConnectError) as exc:
            await self._shutdown(publish_offline=False)
            if isinstance(exc, MqttConnectError):
                raise
            raise MqttConnectError(
                f"could not connect to the MQTT broker at {self.host}:{self.port}"
                f" within {timeout:g} s: {self._last_error}"
            ) from None
        log.debug("MQTT bridge connected to %s:%s as %s", self.host, self.port, self.client_id)

    async def stop(self) -> None:
        """Publish ``offline``, disconnect (the session stays), stop processing."""
        await self._shutdown(publish_offline=True)

    # -- lifecycle -----------------------------------------------------------
    async def _shutdown(self, *, publish_offline: bool) -> None:
        if self._state is not None:
            self._state.stop()
        if self._discovery is not None:
            self._discovery.stop()
        if self._banks is not None:
            self._banks.stop()
        if self._consumer is not None:
            # Messages still queued are not acked: the broker redelivers them.
            self._consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._consumer
            self._consumer = None
        # What was submitted is committed (or failed) and acked before we leave, so a
        # clean stop leaves no committed reading for the broker to send us again.
        pending = [f for _, f in self._unacked if f is not None]
        if pending:
            await asyncio.wait(pending, timeout=STOP_DRAIN_S)
        self._send_acks()
        client = self._client
        if client is None:
            return
        if publish_offline and self.publish_direct is not None:
            self.publish_direct(self.topics.bridge_state, "offline")
        elif publish_offline and client.is_connected():
            info = client.publish(self.topics.bridge_state, "offline", qos=1, retain=True)
            with contextlib.suppress(ValueError, RuntimeError):
                await asyncio.to_thread(info.wait_for_publish, 2.0)
        client.disconnect()
        await asyncio.to_thread(client.loop_stop)
        self._client = None

    # -- paho callbacks (paho's thread) ---------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags,
                    reason: ReasonCode, properties: Any) -> None:  # fmt: skip
        if reason.is_failure and self.mqtt5 and reason.value in UNSUPPORTED_PROTOCOL:
            client.disconnect()
            self._call_in_loop(self._fail_start, _ProtocolRefused(str(reason)))
            return
        if reason.is_failure:
            self._last_error = f"the broker refused the connection: {reason}"
            log.warning("MQTT broker %s:%s refused the bridge: %s", self.host, self.port, reason)
            # Wrong credentials do not fix themselves: fail start() now, not at timeout.
            self._call_in_loop(self._fail_start, MqttConnectError(
                f"the MQTT broker at {self.host}:{self.port} refused the bridge: {reason}"
            ))  # fmt: skip
            return
        self._connection += 1
        self._counters["connects"] += 1
        # paho leaves Nagle on: back-to-back small packets (state, availability, acks)
        # would wait for the broker's delayed ACK, ~40 ms each time.
        sock = client.socket()
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Retained publishes queued during the outage are stale; on_connected below
        # republishes the current truth, so drop them rather than let them win.
        client.drop_out_messages()
        update_filter = self.topics.shared_update_filter() if self.shared else self.topics.update_filter
        subscriptions = [(update_filter, 1)] if self.ingest_updates else []
        if self._discovery is not None and self.listen_homeassistant_status:
            subscriptions.append((self.topics.homeassistant_status, 1))
        if subscriptions:
            _, self._subscribe_mid = client.subscribe(subscriptions)
        else:
            self._call_in_loop(self._subscribed, None)
        self._call_in_loop(self._on_connected)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._last_error = "no MQTT broker answered (connection refused or host unreachable)"

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: mqtt.DisconnectFlags,
                       reason: ReasonCode, properties: Any) -> None:  # fmt: skip
        self._counters["disconnects"] += 1
        self._last_error = f"disconnected: {reason}"
        if reason.is_failure:
            log.warning("MQTT bridge lost the broker (%s); reconnecting", reason)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                      reason_codes: list[ReasonCode], properties: Any) -> None:  # fmt: skip
        if mid != self._subscribe_mid:
            return
        refused = [str(code) for code in reason_codes if code.is_failure]
        error = None
        if refused:
            error = MqttConnectError(
                f"the MQTT broker at {self.host}:{self.port} refused the bridge's"
                f" subscriptions: {', '.join(refused)}"
            )
        self._call_in_loop(self._subscribed, error)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            self._counters["received_dropped"] += 1
            self.door.counters["dropped_bad_topic"] += 1
            self._ack(msg.mid, msg.qos, self._connection)
            return
        if topic == self.topics.homeassistant_status:
            self._ack(msg.mid, msg.qos, self._connection)
            # A retained birth message only repeats what the connect just published.
            if not msg.retain:
                self._call_in_loop(self._on_homeassistant_status, bytes(msg.payload))
            return
        if msg.retain and self.retain_flag_means_replay:
            self._counters["received_dropped"] += 1
            self._counters["dropped_retained"] += 1
            self._ack(msg.mid, msg.qos, self._connection)
            # Clear it, or every (re)subscribe would offer the same stale reading.
            client.publish(topic, b"", qos=1, retain=True)
            return
        inbox = self._inbox
        if inbox is None or (msg.qos == 0 and inbox.qsize() >= MAX_BACKLOG):
            self._counters["received_dropped"] += 1
            self._counters["dropped_backlog"] += 1
            return
        item = _Inbound(topic, bytes(msg.payload), msg.mid, msg.qos, self._connection, msg.dup)
        # One wake-up of the loop per burst, not per message: the self-pipe write of
        # call_soon_threadsafe was ~9 % of the profile at 2,000 messages/s.
        handoff = self._handoff
        handoff.append(item)
        if len(handoff) == 1:
            self._call_in_loop(self._take_handoff)

    def _take_handoff(self) -> None:
        """On the loop: move what paho's thread handed over into the inbox, in order."""
        inbox, handoff = self._inbox, self._handoff
        while handoff:
            item = handoff.popleft()
            if inbox is not None:
                inbox.put_nowait(item)

    def _call_in_loop(self, callback: Callable[..., Any], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed under us: shutting down
            loop.call_soon_threadsafe(callback, *args)

    # -- event loop side -------------------------------------------------------
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

    def _on_connected(self) -> None:
        """Publish every retained topic afresh: the broker may have lost them."""
        self._publish_retained(self.topics.bridge_state, "online")
        if self._discovery is not None:
            self._discovery.publish_all()
        if self._state is not None:
            self._state.publish_all()
        if self._banks is not None:
            self._banks.publish_all()
        clears, self._pending_clears = self._pending_clears, set()
        for topic in clears:
            self._publish_retained(topic, "")

    def _on_homeassistant_status(self, payload: bytes) -> None:
        self.homeassistant_status(payload, None)

    def homeassistant_status(self, payload: bytes, user_id: int | None) -> None:
        """Home Assistant's birth message (on the loop): re-send discovery configs, those of
        ``user_id``'s batmons when the broker knows who sent it (None: every batmon)."""
        if self._discovery is not None:
            self._discovery.on_homeassistant_status(payload, user_id)  # banks' configs too

    def _publish_retained(self, topic: str, payload: str) -> None:
        """Publish retained with QoS 1 while connected; on reconnect all is re-sent."""
        if self.publish_direct is not None:
            self.publish_direct(topic, payload)
            return
        if payload == "":
            self._pending_clears.add(topic)
        client = self._client
        if client is not None and client.is_connected():
            client.publish(topic, payload, qos=1, retain=True)

    async def _consume(self) -> None:
        """Submit updates in arrival order without waiting for each commit.

        The writer commits them in that order, so each batmon's readings keep their
        order; acks follow in the same order as commits complete.
        """
        assert self._inbox is not None
        taken = 0
        while True:
            item = await self._inbox.get()
            taken += 1
            if taken % YIELD_EVERY == 0:
                # get() on a non-empty queue never yields: a backlog of 20,000 would
                # hold the loop (HTTP, the broker, the watchdog) until drained.
                await asyncio.sleep(0)
            while True:
                try:
                    future = self.door.submit(item.topic, item.payload, dup=item.dup)
                    break
                except Overloaded:
                    # The writer is full: stop taking messages. The broker stops
                    # sending once our unacked window is used: its flow control.
                    while not self.core.writer.has_room:
                        await asyncio.sleep(0.005)
            self._unacked.append((item, future))
            if future is None:
                self._send_acks()
            else:
                future.add_done_callback(lambda _: self._send_acks())

    def _send_acks(self) -> None:
        """Ack every leading update that is done; a failed commit is never acked."""
        unacked = self._unacked
        while unacked:
            item, future = unacked[0]
            if future is not None and not future.done():
                return
            unacked.popleft()
            if future is not None and (future.cancelled() or future.exception() is not None):
                if item.connection == self._connection:
                    self._redeliver_unacked()
                continue
            self._ack(item.mid, item.qos, item.connection)

    def _redeliver_unacked(self) -> None:
        """A commit failed: drop the connection without acking, so the broker resends
        every unacked update after paho reconnects (the session is persistent)."""
        self._counters["storage_reconnects"] += 1
        client = self._client
        sock = client.socket() if client is not None else None
        if isinstance(sock, socket.socket):
            log.warning("storing an MQTT update failed; reconnecting so the broker redelivers it")
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _publish_error(self, batmon_id: int, token: str, message: str) -> None:
        client = self._client
        if client is not None and client.is_connected():
            payload = json.dumps({"error": message})
            client.publish(self.topics.error(batmon_id, token), payload, qos=1)

    def _ack(self, mid: int, qos: int, connection: int) -> None:
        """Ack on the connection the message came on; after a reconnect the broker resends."""
        client = self._client
        if qos > 0 and client is not None and connection == self._connection:
            client.ack(mid, qos)
