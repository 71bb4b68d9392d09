"""amqtt's Broker with the 0.12.1 flaws closed that matter once clients are untrusted.

The ONLY module that touches amqtt's private internals (overridden private methods and
attributes). That is why pyproject pins amqtt to one exact release: any upgrade must
re-read amqtt's broker.py against every override here and rerun tests/test_broker*.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import weakref
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, Protocol

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker, Server
from amqtt.contexts import Action
from amqtt.errors import BrokerError
from amqtt.events import BrokerEvents
from amqtt.mqtt.constants import QOS_0, QOS_1, QOS_2
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import ApplicationMessage, OutgoingApplicationMessage, Session

from bridge.doors.broker.access import Principal
from bridge.doors.broker.limits import (
    CONNECT,
    MQTT_311_LEVEL,
    BrokerLimits,
    ConnectionRooms,
    MessageRate,
    PacketLimitReader,
    protocol_level,
)
from bridge.doors.broker.plugin import PRINCIPAL_KEY, WILL_KEY
from bridge.errors import Unavailable
from bridge.ratelimit import address_key
from bridge.topics import Topics
from bridge.writer import Overloaded

log = logging.getLogger(__name__)

# CONNACK return codes of MQTT 3.1.1 (section 3.2.2.3).
UNACCEPTABLE_PROTOCOL_VERSION, IDENTIFIER_REJECTED, SERVER_UNAVAILABLE, NOT_AUTHORIZED = 1, 2, 3, 5


PAUSE_READING_AT = 100
RESUME_READING_AT = 50
"""Updates of one connection waiting for their commit: at the first figure the broker
stops reading that connection's socket (TCP flow control then holds the device back),
at the second it reads again. A device that waits for its PUBACKs (paho's window is
20) never meets it; one that floods without waiting costs bounded memory."""


SLOW_SUBSCRIBERS_KEPT = 10_000
"""Client ids remembered as slow (each logged once); past it the memory starts afresh."""


class _OwnPubackLog(logging.Filter):
    """amqtt warns at every PUBACK it waits for in vain; BatmonBroker logs once per client."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout waiting for PUBACK")


_PUBACK_FILTER = _OwnPubackLog()


RETRY_MIN_S = 0.25
RETRY_MAX_S = 5.0
"""Back-off of an update whose commit failed, held until it can be stored."""


class UpdateSink(Protocol):
    """Where the broker hands a device's update: the MQTT door (bridge/doors/update_door.py)."""

    def submit(self, topic: str, payload: bytes, *, dup: bool = False,
               mid: int | None = None) -> asyncio.Future[None] | None:  # fmt: skip
        """The commit's future, or None when there is nothing to wait for."""
        ...

    def has_room(self) -> bool:
        """False while the writer's queue is full."""
        ...

    async def settle(self) -> None:
        """Return once every update handed in so far is committed (or failed)."""
        ...


class UpdateInbox(asyncio.Queue[ApplicationMessage]):
    """A session's inbound queue that hands the device's own updates to the writer.

    amqtt puts an incoming QoS 1 PUBLISH on this queue and sends PUBACK when ``put``
    returns; for an update, ``put`` returns only once it is committed, so a PUBACK from
    the embedded broker means the reading is on disk. Updates are never broadcast: no
    one else may subscribe to them. Other messages are queued as amqtt does.
    """

    def __init__(self, session: Session, sink: UpdateSink) -> None:
        super().__init__()
        self._session = session
        self._sink = sink
        self.unacked = 0
        # Open while this session's connection may be read (see CommitPacedReader).
        self.readable = asyncio.Event()
        self.readable.set()

    def _own_update(self, message: ApplicationMessage) -> bool:
        principal = self._session.attributes.get(PRINCIPAL_KEY)
        return (
            isinstance(principal, Principal)
            and principal.kind == "device"
            and message.topic in principal.publish
        )

    async def put(self, item: ApplicationMessage) -> None:
        """QoS 1 and 2: return (and so acknowledge) only after the commit."""
        if not self._own_update(item):
            await super().put(item)
            return
        self.unacked += 1
        if self.unacked >= PAUSE_READING_AT:
            self.readable.clear()
        try:
            payload, dup = bytes(item.data or b""), _dup(item)
            delay = RETRY_MIN_S
            while True:
                try:
                    future = self._sink.submit(item.topic, payload, dup=dup, mid=item.packet_id)
                    if future is not None:
                        await future
                    return
                except Overloaded:
                    while not self._sink.has_room():  # stop acking: the device's window fills
                        await asyncio.sleep(0.005)
                except Unavailable:
                    # Not stored (disk full...): no PUBACK yet. Hold the message and try
                    # again; the device's window fills, so it stops sending meanwhile,
                    # and even a device that never reconnects loses nothing.
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX_S)
        finally:
            self.unacked -= 1
            if self.unacked <= RESUME_READING_AT:
                self.readable.set()

    def put_nowait(self, item: ApplicationMessage) -> None:
        """QoS 0: no acknowledgement to hold back; a full writer drops it (counted)."""
        if not self._own_update(item):
            super().put_nowait(item)
            return
        try:
            self._sink.submit(item.topic, bytes(item.data or b""))
        except Overloaded:
            log.debug("dropped a QoS 0 update of client %r: writer full", self._session.client_id)


class CommitPacedReader(ReaderAdapter):
    """A connection's reader paced by commits: it stops reading while the session has
    PAUSE_READING_AT updates waiting for their commit (limits.py's PacketLimitReader,
    beneath it, enforces size and rate limits instead)."""

    def __init__(self, inner: ReaderAdapter, inbox: UpdateInbox) -> None:
        self._inner = inner
        self._inbox = inbox

    async def read(self, n: int = -1) -> bytes:
        """Read as amqtt does, once the inbox has room for more updates."""
        await self._inbox.readable.wait()
        return await self._inner.read(n)

    def feed_eof(self) -> None:
        """Pass end-of-stream on (amqtt calls it when closing)."""
        self._inner.feed_eof()


def _dup(message: ApplicationMessage) -> bool:
    return bool(message.publish_packet is not None and message.publish_packet.dup_flag)


class BatmonBroker(Broker):
    """amqtt's Broker with 0.12.1 flaws closed that matter once clients are untrusted."""

    def __init__(
        self,
        config: dict[str, Any],
        *,
        topics: Topics,
        limits: BrokerLimits | None = None,
        updates: UpdateSink | None = None,
        tls_context: ssl.SSLContext | None = None,
        on_homeassistant_status: Callable[[int, bytes], None] | None = None,
    ) -> None:
        super().__init__(config)
        self._tls_context = tls_context
        self._topics = topics
        self._updates = updates
        self._on_homeassistant_status = on_homeassistant_status
        limits = limits or BrokerLimits()
        self._limits = limits
        self._rate = MessageRate(limits.messages_per_second, limits.message_burst)
        self.rooms = ConnectionRooms(limits.max_connections, limits.max_unauthenticated_per_address)
        """Sockets waiting to log in (per address) and logged-in clients, kept apart."""
        # Handlers whose connection a newer one with the same client id replaced.
        self._taken_over: weakref.WeakSet[BrokerProtocolHandler] = weakref.WeakSet()
        self.counters: Counter[str] = Counter()
        """What the limits refused or dropped, and client-id takeovers (for /healthz)."""
        self._slow_subscribers: set[str] = set()
        handler_log = logging.getLogger("amqtt.mqtt.protocol.handler")
        if _PUBACK_FILTER not in handler_log.filters:
            handler_log.addFilter(_PUBACK_FILTER)

    async def _client_connected(
        self, listener_name: str, reader: ReaderAdapter, writer: WriterAdapter
    ) -> None:
        """Vet a new connection before amqtt reads it: a waiting place for its address,
        CONNECT in time, protocol level; then let amqtt read packets through a PacketLimitReader."""
        peer_info = writer.get_peer_info()
        peer = f"{peer_info[0]}:{peer_info[1]}" if peer_info else "unknown address"
        address = address_key(peer_info[0] if peer_info else None) or "unknown"
        if not self.rooms.enter(address):
            # Before reading a byte: one address holds at most a few sockets that have not
            # logged in, each for connect_timeout_s at most.
            self.counters["closed_unauthenticated_per_address"] += 1
            await _close(writer)
            return
        guarded = PacketLimitReader(reader, self._limits, self._rate, self.counters, peer)
        guarded.address = address
        try:
            try:
                packet_type, body = await asyncio.wait_for(
                    guarded.first_packet(), self._limits.connect_timeout_s
                )
            except (TimeoutError, asyncio.IncompleteReadError, OSError):
                log.debug("closed a connection from %s: no CONNECT", peer)
                await _close(writer)
                return
            level = protocol_level(body) if packet_type == CONNECT else None
            if packet_type == CONNECT and level != MQTT_311_LEVEL:
                # amqtt would misread the rest (MQTT 5 adds properties) and wait forever.
                self.counters["refused_protocol_level"] += 1
                log.warning("refused an MQTT client from %s: protocol level %s; this broker speaks"
                            " MQTT 3.1.1 (level 4) only", peer, level)  # fmt: skip
                await _refuse(writer, UNACCEPTABLE_PROTOCOL_VERSION)
                return
            await super()._client_connected(listener_name, guarded, writer)
        finally:
            if guarded.logged_in:
                self.rooms.log_out()
            else:
                self.rooms.leave_waiting(address)

    def _log_in(self, reader: ReaderAdapter, peer: tuple[str, int] | None) -> bool:
        """Move an authenticated connection from the waiting room to the logged-in one."""
        if not isinstance(reader, PacketLimitReader):
            return True  # not accepted through _client_connected: nothing to count
        if not self.rooms.log_in():
            self.counters["refused_connection_limit"] += 1
            log.warning("refused an MQTT client from %s: max_connections (%d) reached",
                        peer[0] if peer else "unknown address", self._limits.max_connections)  # fmt: skip
            return False
        self.rooms.leave_waiting(reader.address)
        reader.logged_in = True
        return True

    def _install_inbox(self, session: Session) -> UpdateInbox | None:
        """Route this session's own updates to the writer (see UpdateInbox)."""
        if self._updates is None:
            return None
        queue = session.delivered_message_queue
        if isinstance(queue, UpdateInbox):
            return queue
        inbox = UpdateInbox(session, self._updates)
        for message in _take_all(queue):
            asyncio.Queue.put_nowait(inbox, message)
        session.delivered_message_queue = inbox
        return inbox

    def stop_listening(self) -> None:
        """Refuse new connections; connected clients carry on until shutdown()."""
        for server in self._servers.values():
            if server.instance is not None:
                server.instance.close()

    async def publish_internal(self, topic: str, payload: bytes, *, retain: bool) -> None:
        """Publish as the broker itself (the bridge's retained state, error replies)."""
        if retain:
            await self.retain_message(None, topic, payload, 1)
        await self.internal_message_broadcast(topic, payload, 1)

    async def retain_message(
        self,
        source_session: Session | None,
        topic_name: str | None,
        data: bytes | bytearray | None,
        qos: int | None = None,
    ) -> None:
        """Store retained messages (PUBLISH or last will), except on device update topics."""
        # A retained reading would be replayed to the bridge as a fresh one on every
        # (re)subscribe; the message itself is still delivered like any other.
        if topic_name is not None and self._topics.parse_update(topic_name) is not None:
            return
        await super().retain_message(source_session, topic_name, data, qos)

    async def _client_message_loop(self, client_session: Session, handler: BrokerProtocolHandler) -> None:
        """amqtt's loop for one connection, except that its end loses no acknowledged message."""
        # amqtt sends PUBACK once an incoming QoS 1 message is queued on the session, not
        # once it is broadcast. Its loop handled a disconnect before the deliveries of the
        # same pass, then cancelled the delivery wait: what was still queued never reached
        # the subscribers. Here deliveries come first and a connection's end flushes the
        # queue, through the same ACL-checked path.
        disconnect_waiter = asyncio.ensure_future(handler.wait_disconnect())
        subscribe_waiter = asyncio.ensure_future(handler.get_next_pending_subscription())
        unsubscribe_waiter = asyncio.ensure_future(handler.get_next_pending_unsubscription())
        wait_deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())
        try:
            while True:
                waiters = (disconnect_waiter, subscribe_waiter, unsubscribe_waiter, wait_deliver)
                done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                if wait_deliver in done:
                    if not await self._handle_message_delivery(client_session, handler, wait_deliver):
                        # A protocol violation: amqtt ends the connection (our
                        # _handle_client_session stops it); deliver what came before.
                        await self._stop_handler(handler)
                        await self._deliver_acknowledged(client_session, handler, None)
                        break
                    wait_deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())
                if subscribe_waiter in done:
                    await self._handle_subscription(client_session, handler, subscribe_waiter)
                    subscribe_waiter = asyncio.ensure_future(handler.get_next_pending_subscription())
                if unsubscribe_waiter in done:
                    await self._handle_unsubscription(client_session, handler, unsubscribe_waiter)
                    unsubscribe_waiter = asyncio.ensure_future(handler.get_next_pending_unsubscription())
                if disconnect_waiter in done:
                    # Stop reading first, so nothing more can be queued (and acknowledged).
                    await self._stop_handler(handler)
                    await self._deliver_acknowledged(client_session, handler, wait_deliver)
                    await self._handle_disconnect(client_session, handler, disconnect_waiter)
                    break
        finally:
            waiters = (disconnect_waiter, subscribe_waiter, unsubscribe_waiter, wait_deliver)
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    async def _deliver_acknowledged(
        self,
        client_session: Session,
        handler: BrokerProtocolHandler,
        wait_deliver: asyncio.Future[ApplicationMessage | None] | None,
    ) -> None:
        """Broadcast what the client published and we acknowledged but had not yet delivered."""
        pending: list[ApplicationMessage] = []
        if wait_deliver is not None:
            # Cancelled while waiting, it leaves its message in the queue and returns None;
            # finished already, it holds the oldest pending message.
            wait_deliver.cancel()
            taken = (await asyncio.gather(wait_deliver, return_exceptions=True))[0]
            if isinstance(taken, ApplicationMessage):
                pending.append(taken)
        pending += _take_all(client_session.delivered_message_queue)
        if pending:
            log.debug("delivering %d message(s) client %r sent before it left",
                      len(pending), client_session.client_id)  # fmt: skip
        loop = asyncio.get_running_loop()
        for message in pending:
            delivered: asyncio.Future[ApplicationMessage] = loop.create_future()
            delivered.set_result(message)
            # The normal path: topic checks, the PUBLISH ACL, broadcast, retain.
            await self._handle_message_delivery(client_session, handler, delivered)

    async def _broadcast_message(
        self,
        session: Session | None,
        topic: str | None,
        data: bytes | bytearray | None,
        force_qos: int | None = None,
    ) -> None:
        """amqtt's broadcast, telling the bridge which user sent Home Assistant's status."""
        # Every accepted PUBLISH (and last will) passes here once its ACL check passed; only
        # here is its sender known, so an ``online`` re-sends only that user's configs.
        hook = self._on_homeassistant_status
        if hook is not None and session is not None and topic == self._topics.homeassistant_status:
            principal = session.attributes.get(PRINCIPAL_KEY)
            if isinstance(principal, Principal) and principal.kind == "user":
                try:
                    hook(principal.ident, bytes(data or b""))
                except Exception:
                    log.exception("answering Home Assistant's status failed")
        await super()._broadcast_message(session, topic, data, force_qos)

    async def _run_broadcast(self, running_tasks: deque[asyncio.Task[OutgoingApplicationMessage]]) -> None:
        """Send one broadcast message to every session whose filter matches it, if allowed."""
        # amqtt's own walks the live subscription table across awaits (the RECEIVE check):
        # a SUBSCRIBE to a new filter meanwhile killed the broadcast for everyone (dict
        # changed size), a session dropped meanwhile made it skip the next subscriber of
        # that filter. Same logic, over a snapshot.
        broadcast = await self._broadcast_queue.get()
        topic = str(broadcast["topic"])
        for topic_filter, subscriptions in list(self._subscriptions.items()):
            if not self._matches(topic, topic_filter):
                continue
            for target_session, sub_qos in list(subscriptions):
                qos = broadcast.get("qos", sub_qos)
                if not await self._topic_filtering(target_session, topic=topic, action=Action.RECEIVE):
                    continue
                connected = target_session.transitions.state == "connected"
                # Queued for a persistent session while it is away (QoS 1/2 only).
                if (
                    not connected
                    and not target_session.clean_session
                    and qos in (QOS_1, QOS_2)
                    and not target_session.is_anonymous
                ):
                    await self._retain_broadcast_message(broadcast, qos, target_session)
                    continue
                if not connected:
                    continue
                handler = self._get_handler(target_session)
                if handler:
                    data = broadcast["data"]
                    publish = self._deliver(handler, target_session, topic, data, qos, retain=False)
                    running_tasks.append(asyncio.ensure_future(publish))

    async def _delete_session(self, client_id: str) -> None:
        """Deferred: amqtt calls this for a clean-session CONNECT before authenticating it."""
        # Done then, anyone could wipe a live client's subscriptions by sending a CONNECT
        # with its client id. _claim_client_id does it once the CONNECT is authenticated.

    async def _drop_session(self, client_id: str) -> None:
        """amqtt's clean-session deletion, except the messages the old session acknowledged."""
        # amqtt clears all the old session's queues, the inbound one too: readings already
        # acknowledged that the old connection's loop, still running on that session
        # object, had not yet broadcast. Give them back to it.
        session = self._sessions.get(client_id, (None, None))[0]
        inbound = _take_all(session.delivered_message_queue) if session is not None else []
        await super()._delete_session(client_id)
        if session is not None:
            for message in inbound:
                session.delivered_message_queue.put_nowait(message)

    async def _claim_client_id(self, session: Session) -> bool:
        """Give an authenticated CONNECT its client id: take over the live connection that
        holds it (MQTT 3.1.1, 3.1.4-2), unless that belongs to another principal."""
        client_id = session.client_id or ""
        old_session, old_handler = self._sessions.get(client_id, (None, None))
        if old_session is None or old_handler is None:
            return True
        old = old_session.attributes.get(PRINCIPAL_KEY)
        new = session.attributes.get(PRINCIPAL_KEY)
        if old is not None and new is not None and (old.kind, old.ident) != (new.kind, new.ident):
            # A neighbour who learnt a client id must not be able to kick its owner off.
            log.warning("refused client %r: its client id is held by another principal", client_id)
            return False
        if old_session.transitions.is_connected():
            self.counters["client_id_takeovers"] += 1
            log.info("client %r connected again: closing its previous connection", client_id)
            self._taken_over.add(old_handler)
            await old_handler.handle_connection_closed()
            await old_handler.stop()
            old_session.transitions.disconnect()
        if old_session is not session:  # a clean-session CONNECT: start afresh
            await self._drop_session(client_id)
        return True

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        """Replay retained messages for a filter this session holds, each one vetted."""
        # On every CONNECT amqtt replays retained messages for *all clients'* filters to
        # the new client, and it never asks the topic plugins about a replayed message:
        # only replay filters this session holds, and only messages it may RECEIVE (a
        # user's wildcard also matches other users' retained state and discovery).
        topic_filter, qos = subscription
        holders = self._subscriptions.get(topic_filter, ())
        if not any(s.client_id == session.client_id for s, _qos in holders):
            return
        handler = self._get_handler(session)
        if handler is None:
            return
        tasks = []
        for topic, retained in list(self._retained_messages.items()):
            if not self._matches(topic, topic_filter):
                continue
            if not await self._topic_filtering(session, topic=topic, action=Action.RECEIVE):
                continue
            qos_out = min(qos, retained.qos or qos)
            tasks.append(
                asyncio.ensure_future(
                    self._deliver(handler, session, retained.topic, retained.data, qos_out, retain=True)
                )
            )
        if tasks:
            await asyncio.wait(tasks)

    async def _publish_session_retained_messages(self, session: Session) -> None:
        """Deliver what was queued for a persistent session only if still allowed now."""
        # Queued messages passed RECEIVE when queued; ownership may have changed since.
        queued = []
        while not session.retained_messages.empty():
            queued.append(session.retained_messages.get_nowait())
        handler = self._get_handler(session)
        if handler is None:
            for message in queued:  # amqtt leaves them queued for the next connection
                session.retained_messages.put_nowait(message)
            return
        tasks = [
            asyncio.ensure_future(
                self._deliver(handler, session, m.topic, m.data, m.qos or QOS_0, retain=True)
            )
            for m in queued
            if await self._topic_filtering(session, topic=m.topic, action=Action.RECEIVE)
        ]
        if tasks:
            await asyncio.wait(tasks)

    async def _deliver(
        self,
        handler: BrokerProtocolHandler,
        session: Session,
        topic: str,
        data: bytes | bytearray | None,
        qos: int,
        *,
        retain: bool,
    ) -> OutgoingApplicationMessage | None:
        """Send one PUBLISH to a subscriber; one that does not acknowledge a QoS 1 delivery
        in time is logged once, then only counted (amqtt logged a traceback per message)."""
        try:
            return await handler.mqtt_publish(topic, data, qos, retain=retain)
        except TimeoutError:  # amqtt gave up waiting for the PUBACK (5 s) and dropped it
            self.counters["puback_timeouts"] += 1
            client_id = session.client_id or ""
            if client_id not in self._slow_subscribers:
                if len(self._slow_subscribers) >= SLOW_SUBSCRIBERS_KEPT:
                    self._slow_subscribers.clear()
                self._slow_subscribers.add(client_id)
                self.counters["slow_subscribers"] += 1
                log.warning("MQTT client %r (%s) does not acknowledge its QoS 1 deliveries (no PUBACK"
                            " in 5 s): each one it misses is dropped and counted in /healthz"
                            " (mqtt_broker.puback_timeouts), not logged", client_id,
                            session.remote_address)  # fmt: skip
            return None

    async def _handle_disconnect(
        self,
        client_session: Session,
        handler: BrokerProtocolHandler,
        disconnect_waiter: asyncio.Future[Any],
    ) -> None:
        """End a connection: fire only the vetted will, and only if not taken over."""
        if handler in self._taken_over:
            # Taken over by a new connection with this client id: the client is still
            # there, so no will, and the session (maybe the same object) is not ours to end.
            self._taken_over.discard(handler)
            await self._stop_handler(handler)
            return
        # amqtt copies a new CONNECT's will onto a persistent session before authenticating
        # it: only the will of the last accepted CONNECT may fire.
        (
            client_session.will_flag,
            client_session.will_topic,
            client_session.will_message,
            client_session.will_qos,
            client_session.will_retain,
        ) = client_session.attributes.get(WILL_KEY) or (False, None, None, None, None)
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)

    async def _handle_client_session(
        self,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        client_session: Session,
        handler: BrokerProtocolHandler,
        server: Server,
        listener_name: str,
    ) -> None:
        """amqtt's session start, in an order that lets no refused CONNECT touch a live session."""
        # amqtt took the client id's live connection over and replaced its entry in the
        # session table before looking at the authentication result: a failed login with
        # someone's client id cut them off (and a persistent session's will fired).
        # amqtt resumes a persistent session with the address of its first connection:
        # the login throttle must see this connection's.
        peer = writer.get_peer_info()
        if peer is not None:
            client_session.remote_address, client_session.remote_port = peer
        if isinstance(reader, PacketLimitReader):
            reader.session = client_session
        if not client_session.client_id:
            raise BrokerError("Client ID was not correctly created/set.")
        authenticated = await self._authenticate(client_session, self.listeners_config[listener_name])
        if authenticated and not self._log_in(reader, peer):
            await _refuse(writer, SERVER_UNAVAILABLE)
            return
        if not (authenticated and await self._claim_client_id(client_session)):
            await _refuse(writer, NOT_AUTHORIZED)
            return
        inbox = self._install_inbox(client_session)
        if inbox is not None:
            reader = CommitPacedReader(reader, inbox)  # stops reading while 100 updates await commit
        client_session.transitions.connect()
        handler.attach(client_session, reader, writer)
        self._sessions[client_session.client_id] = (client_session, handler)
        try:
            await handler.mqtt_connack_authorize(True)
            await self.plugins_manager.fire_event(
                BrokerEvents.CLIENT_CONNECTED,
                client_id=client_session.client_id,
                client_session=client_session,
            )
            await handler.start()
            # Messages queued while a persistent session was away, then the retained
            # messages of the filters it already holds.
            await self._publish_session_retained_messages(client_session)
            for topic_filter in list(self._subscriptions):
                await self._publish_retained_messages_for_subscription((topic_filter, QOS_0), client_session)
            await self._client_message_loop(client_session, handler)
        finally:
            # An error before the message loop ended leaves the session "connected", so the
            # session monitor would never drop it. Finish the job unless another connection
            # has taken the session over meanwhile.
            owner = self._sessions.get(client_session.client_id, (None, None))[1]
            if owner is handler and client_session.transitions.is_connected():
                await self._stop_handler(handler)
                client_session.transitions.disconnect()

    async def disconnect_where(self, condition: Callable[[Principal], bool]) -> int:
        """Close every connected session whose principal meets ``condition``; how many.

        The connection ends as if the network had dropped it: acknowledged messages are
        still delivered, the vetted will fires, a persistent session is kept (and resumes
        only with a credential that is valid then).
        """
        closed = 0
        for session, handler in list(self._sessions.values()):
            principal = session.attributes.get(PRINCIPAL_KEY)
            if handler is None or not isinstance(principal, Principal):
                continue
            if session.transitions.is_connected() and condition(principal):
                await handler.handle_connection_closed()  # wakes _client_message_loop's disconnect
                closed += 1
        return closed

    def _create_ssl_context(self, listener: Any) -> ssl.SSLContext:
        """Our context (bridge/tls.py), checked at start and able to require client
        certificates; amqtt's own (0.12.1) always makes them optional."""
        if self._tls_context is None:
            raise BrokerError("a TLS listener without a TLS context")
        return self._tls_context

    def bound_port(self, listener: str = "default") -> int:
        """Read the port from the listening socket: the only truth when port 0 was asked."""
        # amqtt has no public accessor for its listeners' servers (0.12).
        server = self._servers[listener].instance
        return int(server.sockets[0].getsockname()[1])


async def _refuse(writer: WriterAdapter, return_code: int) -> None:
    """Answer a CONNECT with a refusing CONNACK and close the connection."""
    writer.write(bytes((0x20, 0x02, 0x00, return_code)))
    try:
        await writer.drain()
    finally:
        await _close(writer)


async def _close(writer: WriterAdapter) -> None:
    """Close, ignoring a peer that is gone already."""
    with contextlib.suppress(OSError, asyncio.CancelledError):
        await writer.close()


def _take_all(queue: asyncio.Queue[ApplicationMessage]) -> list[ApplicationMessage]:
    """Everything in the queue now, oldest first, without waiting."""
    taken = []
    while not queue.empty():
        taken.append(queue.get_nowait())
    return taken
