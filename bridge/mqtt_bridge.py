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
import hashlib
import json
import logging
import random
import socket
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from bridge.core import Batmon, Core
from bridge.discovery import HomeAssistantDiscovery
from bridge.errors import BatmonError, NotFound, WrongToken
from bridge.events import (
    NO_SUBSCRIPTION,
    BatmonChanged,
    BatmonDeleted,
    ReadingAccepted,
    StatusChanged,
    Subscription,
)
from bridge.models import parse_batmon_id, readings_from_payload
from bridge.topics import Topics

log = logging.getLogger(__name__)

# QoS 0 messages have no broker-side flow control; past this backlog they are dropped
# rather than letting memory grow (QoS 1 is bounded by the broker's inflight window).
MAX_BACKLOG = 10_000
DEDUP_WINDOW = 4096  # committed updates remembered to recognise retransmissions
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
    """Keeps each batmon's retained state and availability topics in step with events."""

    def __init__(self, core: Core, topics: Topics, publish: RetainedPublish) -> None:
        self.core = core
        self._subscription: Subscription = NO_SUBSCRIPTION
        self.topics = topics
        self.publish = publish
        # Last state sent per batmon: a batch of N readings emits N events that all
        # describe the same (final) memory state, so N-1 publishes are skipped.
        self._last: dict[int, str] = {}

    def start(self) -> None:
        """Subscribe to the core's events."""
        self._subscription = self.core.bus.subscribe_all({
            ReadingAccepted: self._on_reading,
            StatusChanged: self._on_status,
            BatmonChanged: self._on_changed,
            BatmonDeleted: self._on_deleted,
        })  # fmt: skip

    def stop(self) -> None:
        """Stop reacting to events."""
        self._subscription.cancel()

    def publish_all(self) -> None:
        """Send every batmon's state and availability (after each (re)connect)."""
        self._last.clear()
        for batmon in list(self.core.batmons.values()):
            self.publish_state(batmon)
            self.publish_availability(batmon)

    def publish_state(self, batmon: Batmon) -> None:
        """Send the batmon's state unless it is what was sent last."""
        payload = json.dumps(state_payload(batmon))
        if self._last.get(batmon.id) != payload:
            self._last[batmon.id] = payload
            self.publish(self.topics.state(batmon.id), payload)

    def publish_availability(self, batmon: Batmon) -> None:
        """Send ``online``/``offline`` as the core last announced the status."""
        payload = "online" if batmon.status == "Online" else "offline"
        self.publish(self.topics.availability(batmon.id), payload)

    def _on_reading(self, event: ReadingAccepted) -> None:
        if event.current:
            self.publish_state(event.batmon)

    def _on_status(self, event: StatusChanged) -> None:
        self.publish_availability(event.batmon)
        self.publish_state(event.batmon)

    def _on_changed(self, event: BatmonChanged) -> None:
        self.publish_state(event.batmon)
        if event.created:
            self.publish_availability(event.batmon)

    def _on_deleted(self, event: BatmonDeleted) -> None:
        self._last.pop(event.batmon.id, None)
        self.publish(self.topics.state(event.batmon.id), "")
        self.publish(self.topics.availability(event.batmon.id), "")


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
    ) -> None:
        self.core = core
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
        self._client: mqtt.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: asyncio.Queue[_Inbound] | None = None
        self._consumer: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._state: StatePublisher | None = None
        self._discovery: HomeAssistantDiscovery | None = None
        self._connection = 0
        self._subscribe_mid: int | None = None
        self._last_error = "no answer yet"
        # Topics emptied (deleted batmons) since the last connect: an empty retained
        # payload cannot be rebuilt from the registry, so it is re-sent on reconnect.
        self._pending_clears: set[str] = set()
        self._counters: Counter[str] = Counter()
        # Digests of recently committed updates: a retransmission (DUP) of one of
        # them is the same reading again, whose ack was lost, not a new reading.
        self._committed: OrderedDict[bytes, None] = OrderedDict()

    # -- public --------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """True while the client holds a live session with the broker."""
        return self._client is not None and self._client.is_connected()

    @property
    def stats(self) -> dict[str, Any]:
        """Connection state and message counters, for /healthz."""
        counters = {
            name: self._counters[name]
            for name in (
                "received", "accepted", "readings", "rejected", "dropped_bad_topic",
                "dropped_unknown_batmon", "dropped_wrong_token", "dropped_backlog", "dropped_duplicate",
                "dropped_retained",
                "ingest_errors", "connects", "disconnects",
            )
        }  # fmt: skip
        return {"connected": self.connected, "broker": f"{self.host}:{self.port}", **counters}

    async def start(self, timeout: float = 10.0) -> None:
        """Connect, subscribe and publish retained topics; MqttConnectError on failure."""
        self._loop = asyncio.get_running_loop()
        self._inbox = asyncio.Queue()
        self._ready = self._loop.create_future()
        self._state = StatePublisher(self.core, self.topics, self._publish_retained)
        if self.discovery:
            self._discovery = HomeAssistantDiscovery(self.core, self.topics, self._publish_retained)
        client = self._client = new_client(self.client_id, clean_session=False)
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
        self._consumer = asyncio.create_task(self._consume(), name="mqtt-bridge-consumer")
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
        if self._consumer is not None:
            # Messages still queued are not acked: the broker redelivers them.
            self._consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._consumer
            self._consumer = None
        client = self._client
        if client is None:
            return
        if publish_offline and client.is_connected():
            info = client.publish(self.topics.bridge_state, "offline", qos=1, retain=True)
            with contextlib.suppress(ValueError, RuntimeError):
                await asyncio.to_thread(info.wait_for_publish, 2.0)
        client.disconnect()
        await asyncio.to_thread(client.loop_stop)
        self._client = None

    # -- paho callbacks (paho's thread) ---------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags,
                    reason: ReasonCode, properties: Any) -> None:  # fmt: skip
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
        subscriptions = [(update_filter, 1)]
        if self._discovery is not None:
            subscriptions.append((self.topics.homeassistant_status, 1))
        _, self._subscribe_mid = client.subscribe(subscriptions)
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
            self._counters["dropped_bad_topic"] += 1
            self._ack(msg.mid, msg.qos, self._connection)
            return
        if topic == self.topics.homeassistant_status:
            self._ack(msg.mid, msg.qos, self._connection)
            # A retained birth message only repeats what the connect just published.
            if not msg.retain:
                self._call_in_loop(self._on_homeassistant_status, bytes(msg.payload))
            return
        self._counters["received"] += 1
        if msg.retain and self.retain_flag_means_replay:
            self._counters["dropped_retained"] += 1
            self._ack(msg.mid, msg.qos, self._connection)
            # Clear it, or every (re)subscribe would offer the same stale reading.
            client.publish(topic, b"", qos=1, retain=True)
            return
        inbox = self._inbox
        if inbox is None or (msg.qos == 0 and inbox.qsize() >= MAX_BACKLOG):
            self._counters["dropped_backlog"] += 1
            return
        item = _Inbound(topic, bytes(msg.payload), msg.mid, msg.qos, self._connection, msg.dup)
        self._call_in_loop(inbox.put_nowait, item)

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
        clears, self._pending_clears = self._pending_clears, set()
        for topic in clears:
            self._publish_retained(topic, "")

    def _on_homeassistant_status(self, payload: bytes) -> None:
        if self._discovery is not None:
            self._discovery.on_homeassistant_status(payload)

    def _publish_retained(self, topic: str, payload: str) -> None:
        """Publish retained with QoS 1 while connected; on reconnect all is re-sent."""
        if payload == "":
            self._pending_clears.add(topic)
        client = self._client
        if client is not None and client.is_connected():
            client.publish(topic, payload, qos=1, retain=True)

    async def _consume(self) -> None:
        """Process updates one at a time, so each batmon's readings keep their order."""
        assert self._inbox is not None
        while True:
            item = await self._inbox.get()
            try:
                await self._process(item)
            except Exception:
                # A bug or a storage failure must not stop the door for everyone.
                self._counters["ingest_errors"] += 1
                log.exception("MQTT update on %s failed", item.topic)
            self._ack(item.mid, item.qos, item.connection)

    async def _process(self, item: _Inbound) -> None:
        digest = hashlib.blake2b(item.topic.encode() + b"\0" + item.payload, digest_size=16).digest()
        if item.dup and digest in self._committed:
            self._counters["dropped_duplicate"] += 1
            return
        ids = self.topics.parse_update(item.topic)
        batmon_id = parse_batmon_id(ids[0]) if ids is not None else None
        if ids is None or batmon_id is None:
            self._counters["dropped_bad_topic"] += 1
            return
        token = ids[1]
        try:
            batmon = self.core.device(batmon_id, token)
        except NotFound:
            self._counters["dropped_unknown_batmon"] += 1
            return
        except WrongToken:
            self._counters["dropped_wrong_token"] += 1
            return
        try:
            readings = readings_from_payload(item.payload)
            await self.core.ingest_readings(batmon, readings)
        except BatmonError as exc:
            self._counters["rejected"] += 1
            log.debug("rejected update from batmon %s: %s", batmon_id, exc.message)
            self._publish_error(batmon_id, token, exc.message)
            return
        self._counters["accepted"] += 1
        self._counters["readings"] += len(readings)
        self._committed[digest] = None
        if len(self._committed) > DEDUP_WINDOW:
            self._committed.popitem(last=False)

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
