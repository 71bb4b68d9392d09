"""Embedded MQTT broker (amqtt) for ``batmon serve``, with our own auth and topic ACL.

amqtt's packaged AnonymousAuthPlugin admits any client that sends a username, so the
only auth/ACL plugin loaded is :class:`BatmonAccessPlugin`, fed with live objects (the
core's :class:`CredentialCheck`, the :class:`~bridge.topics.Topics`, the bridge's own
credential) through its amqtt ``Config`` dataclass: no globals, so two brokers can run
in one process. ``_BatmonBroker`` closes amqtt 0.12.1 flaws that let clients see or send
what the ACL forbids, or lose readings the broker has acknowledged (see its methods).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import yaml
from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker, Server
from amqtt.contexts import Action, BaseContext
from amqtt.errors import BrokerError, PluginError, PluginLoadError
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import ApplicationMessage, OutgoingApplicationMessage, Session
from dacite import DaciteError

from bridge.models import parse_batmon_id
from bridge.ratelimit import FailureLimiter, login_credential
from bridge.topics import Topics

log = logging.getLogger(__name__)

PLUGIN_PATH = "bridge.broker.BatmonAccessPlugin"
"""Dotted path amqtt imports our plugin from (listed in broker.yaml)."""

_PRINCIPAL_KEY = "batmon.principal"
"""Key of the Principal in ``Session.attributes`` (amqtt's slot for plugin data)."""
_WILL_KEY = "batmon.will"
"""Key of the last will vetted at the session's last accepted CONNECT."""

# What amqtt raises for a config it cannot use (dacite validates it, plugins load from it).
_CONFIG_ERRORS = (DaciteError, PluginError, PluginLoadError, BrokerError, ValueError, TypeError)
# Deprecated entry-point plugin sections: ignored once 'plugins' is set, dropped so they
# cannot mislead a reader nor trigger amqtt's deprecation warnings.
_LEGACY_KEYS = ("auth", "topic-check", "topic_check", "sys_interval")
# Plugins amqtt ships that must not run here: anonymous/file auth and ACLs (ours replace
# them), $SYS stats (a periodic task nobody reads) and the loggers (the packet logger logs
# CONNECT packets, passwords included, at DEBUG).
_FORBIDDEN_PLUGIN_PREFIXES = (
    "amqtt.plugins.authentication.",
    "amqtt.plugins.topic_checking.",
    "amqtt.plugins.sys.",
    "amqtt.plugins.logging_amqtt.",
)


class CredentialCheck(Protocol):
    """What the broker needs from the core to decide who may connect and see what."""

    def check_device(self, batmon_id: int, token: str) -> bool:
        """True if ``token`` is the batmon's token (constant-time, in memory)."""
        ...

    def check_user(self, email: str, api_key: str) -> int | None:
        """The user's id if ``api_key`` belongs to ``email``, else None."""
        ...

    def owns(self, user_id: int, batmon_id: int) -> bool:
        """True if the user owns the batmon (asked at subscribe and delivery time)."""
        ...


class BrokerStartError(Exception):
    """The embedded broker could not start (bad config, address in use...)."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a session authenticated as; stored on the amqtt session at CONNECT."""

    kind: Literal["bridge", "device", "user"]
    ident: int = 0
    """batmon_id for a device, user_id for a user, 0 for the bridge."""
    publish: frozenset[str] = field(default=frozenset(), repr=False)
    """Exact topics a device or user may publish to (a device's carry its token: keep out
    of logs)."""
    subscribe: frozenset[str] = field(default=frozenset(), repr=False)
    """Exact topics a device may subscribe to and receive."""


class AccessPolicy:
    """Authentication and topic rules of one embedded broker, shared with its plugin."""

    def __init__(
        self,
        *,
        credentials: CredentialCheck,
        topics: Topics,
        bridge_username: str,
        bridge_password: str,
        limiter: FailureLimiter | None = None,
    ) -> None:
        if not bridge_username or not bridge_password:
            raise ValueError("the bridge credential must not be empty")
        self._credentials = credentials
        self._topics = topics
        self._bridge_username = bridge_username.encode()
        self._bridge_password = bridge_password.encode()
        # Failed logins per client address; the default allows 30 a minute.
        self._limiter = limiter if limiter is not None else FailureLimiter()
        # The only wildcard filters a user may hold: Home Assistant's discovery
        # subscriptions (homeassistant/components/mqtt/discovery.py subscribes to exactly
        # these two; the releases that used '{prefix}/#' long predate the device-based
        # discovery we publish, so they could not read our configs anyway) and a dashboard
        # following all its batmons. Each message they match is vetted at delivery.
        self._user_wildcards = frozenset(
            {*topics.ha_discovery_filters, topics.state_filter, topics.availability_filter}
        )

    def __repr__(self) -> str:  # keep the bridge password out of any config dump
        return f"AccessPolicy(topics={self._topics!r})"

    # -- CONNECT ------------------------------------------------------------
    def authenticate(
        self, username: str | None, password: str | None, peer: str | None = None
    ) -> Principal | None:
        """The principal for these credentials, or None to refuse the connection.

        Failed logins are throttled per username (a batmon_id or an email) with a higher
        ceiling per ``peer`` address: the rules of bridge/ratelimit.py, as over HTTP.
        """
        if not username or not password:
            return None  # no secret tried: nothing to throttle
        # Both compares always run: no timing hint about which half was wrong.
        user_ok = hmac.compare_digest(username.encode(), self._bridge_username)
        pass_ok = hmac.compare_digest(password.encode(), self._bridge_password)
        if user_ok and pass_ok:
            # Checked before the throttle: the in-process bridge connects from the same
            # address as any local client, and its random secret is not guessable anyway.
            return Principal("bridge")
        credential = login_credential(username)
        if self._limiter.blocked(peer, credential):
            log.debug("refused CONNECT from %s: too many failed logins", peer)
            return None  # without asking the checker: no guessing through the throttle
        principal = self._check(username, password)
        if principal is None:
            self._limiter.record_failure(peer, credential)
        return principal

    def _check(self, username: str, password: str) -> Principal | None:
        """A device's or user's principal for these credentials, else None."""
        batmon_id = parse_batmon_id(username)
        if batmon_id is not None:
            if not self._credentials.check_device(batmon_id, password):
                return None
            t = self._topics
            return Principal(
                "device",
                batmon_id,
                publish=frozenset({t.update(batmon_id, password)}),
                subscribe=frozenset(
                    {t.error(batmon_id, password), t.state(batmon_id), t.availability(batmon_id)}
                ),
            )
        user_id = self._credentials.check_user(username, password)
        if user_id is None:
            return None
        # Home Assistant's birth message and last will: what makes the bridge re-send discovery.
        return Principal("user", user_id, publish=frozenset({self._topics.homeassistant_status}))

    # -- PUBLISH / SUBSCRIBE / delivery ---------------------------------------
    def may_publish(self, principal: Principal, topic: str) -> bool:
        """Devices publish only their own update topic; users only Home Assistant's status."""
        if principal.kind == "bridge":
            return True
        return topic in principal.publish

    def may_subscribe(self, principal: Principal, topic_filter: str) -> bool:
        """Exact own topics; for users also the few wildcards whose deliveries are vetted."""
        if principal.kind == "bridge":
            return True
        if principal.kind == "user" and topic_filter in self._user_wildcards:
            return True  # what it matches is filtered per message by may_receive
        if "+" in topic_filter or "#" in topic_filter:
            return False
        return self.may_receive(principal, topic_filter)

    def may_receive(self, principal: Principal, topic: str) -> bool:
        """Whether a message on this concrete topic may be delivered to the principal.

        Asked for every delivery, live or retained, whatever filter matched it: a wildcard
        also matches other users' batmons and other integrations' discovery topics, and
        ownership can change while subscribed.
        """
        if principal.kind == "bridge":
            return True
        if principal.kind == "device":
            return topic in principal.subscribe
        if topic == self._topics.bridge_state:
            return True
        batmon_id = self._topics.batmon_of_user_topic(topic)
        return batmon_id is not None and self._credentials.owns(principal.ident, batmon_id)


class BatmonAccessPlugin(BaseAuthPlugin, BaseTopicPlugin):
    """amqtt auth + topic plugin enforcing an :class:`AccessPolicy` (SPEC section 5)."""

    @dataclass
    class Config:
        """Filled in by EmbeddedBroker; a broker.yaml used without it fails closed."""

        policy: AccessPolicy | None = None

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        policy = self.config.policy
        if not isinstance(policy, AccessPolicy):
            raise TypeError("BatmonAccessPlugin needs a policy: start it via EmbeddedBroker")
        self._policy: AccessPolicy = policy

    async def authenticate(self, *, session: Session) -> bool:
        """Refuse anonymous and wrong credentials; pin the principal on the session."""
        try:
            principal = self._policy.authenticate(
                session.username, session.password, peer=session.remote_address
            )
        except Exception:  # a bug in the checker must not let anyone in nor kill the broker
            log.exception("credential check failed for client %r", session.client_id)
            return False
        if principal is None:
            log.debug("refused CONNECT of client %r", session.client_id)
            return False
        previous = session.attributes.get(_PRINCIPAL_KEY)
        if previous is not None and (previous.kind, previous.ident) != (
            principal.kind,
            principal.ident,
        ):
            # amqtt resumes a persistent session by client id alone: without this, anyone
            # could take over another client's subscriptions and queued messages.
            log.warning(
                "refused client %r: its persistent session belongs to another principal",
                session.client_id,
            )
            return False
        if session.will_flag and not self._policy.may_publish(principal, session.will_topic or ""):
            # amqtt broadcasts (and retains) a last will without asking the topic plugins, so
            # drop it here, like any refused PUBLISH (many clients set a will by default:
            # refusing the CONNECT would lock them out). Home Assistant's default will, on
            # '{prefix}/status', is a user's allowed topic and is kept.
            log.debug("dropped the last will of client %r: topic not allowed", session.client_id)
            session.will_flag = False
            session.will_topic = session.will_message = None
        session.attributes[_PRINCIPAL_KEY] = principal
        session.attributes[_WILL_KEY] = (
            session.will_flag,
            session.will_topic,
            session.will_message,
            session.will_qos,
            session.will_retain,
        )
        return True

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool:
        """Apply the policy to PUBLISH, SUBSCRIBE and delivery (RECEIVE) of a topic."""
        if session is None or not topic:
            return False
        principal = session.attributes.get(_PRINCIPAL_KEY)
        if not isinstance(principal, Principal):
            return False
        try:
            if action == Action.PUBLISH:
                allowed = self._policy.may_publish(principal, topic)
            elif action == Action.SUBSCRIBE:
                allowed = self._policy.may_subscribe(principal, topic)
            elif action == Action.RECEIVE:
                # Asked with the concrete topic of each delivery, whatever filter matched
                # (_BatmonBroker routes retained and queued messages through it too).
                allowed = self._policy.may_receive(principal, topic)
            else:
                allowed = False
        except Exception:
            log.exception("topic check failed for client %r", session.client_id)
            return False
        if not allowed:
            log.debug("refused %s for client %r (%r)", action, session.client_id, principal)
        return allowed


class _BatmonBroker(Broker):
    """amqtt's Broker with 0.12.1 flaws closed that matter once clients are untrusted."""

    def __init__(self, config: dict[str, Any], *, topics: Topics) -> None:
        super().__init__(config)
        self._topics = topics

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
                    publish = handler.mqtt_publish(topic, broadcast["data"], qos, retain=False)
                    running_tasks.append(asyncio.ensure_future(publish))

    async def _delete_session(self, client_id: str) -> None:
        """Drop a session for a clean-session CONNECT, but not the messages it acknowledged."""
        # amqtt clears all the old session's queues, the inbound one too: readings already
        # acknowledged that the old connection's loop, still running on that session
        # object, had not yet broadcast. Give them back to it.
        session = self._sessions.get(client_id, (None, None))[0]
        inbound = _take_all(session.delivered_message_queue) if session is not None else []
        await super()._delete_session(client_id)
        if session is not None:
            for message in inbound:
                session.delivered_message_queue.put_nowait(message)

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
            tasks.append(
                asyncio.ensure_future(
                    handler.mqtt_publish(
                        retained.topic, retained.data, min(qos, retained.qos or qos), retain=True
                    )
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
        for message in queued:
            if await self._topic_filtering(session, topic=message.topic, action=Action.RECEIVE):
                session.retained_messages.put_nowait(message)
        await super()._publish_session_retained_messages(session)

    async def _handle_disconnect(
        self,
        client_session: Session,
        handler: BrokerProtocolHandler,
        disconnect_waiter: asyncio.Future[Any],
    ) -> None:
        """Fire only the last will our plugin vetted at the last accepted CONNECT."""
        # amqtt copies a new CONNECT's will onto a persistent session before authenticating
        # it, and a refused CONNECT then takes the live connection over, firing that will:
        # anyone knowing a client id could publish anywhere without a password.
        (
            client_session.will_flag,
            client_session.will_topic,
            client_session.will_message,
            client_session.will_qos,
            client_session.will_retain,
        ) = client_session.attributes.get(_WILL_KEY) or (False, None, None, None, None)
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
        """Run amqtt's session handling, then release what it leaves behind."""
        # amqtt resumes a persistent session with the address of its first connection:
        # the login throttle must see this connection's.
        peer = writer.get_peer_info()
        if peer is not None:
            client_session.remote_address, client_session.remote_port = peer
        try:
            await super()._handle_client_session(
                reader, writer, client_session, handler, server, listener_name
            )
        finally:
            # A refused CONNECT returns with the session still "connected", so the session
            # monitor never drops it: one leaked session per failed login. Finish the job
            # unless another connection has taken the session over meanwhile.
            owner = self._sessions.get(client_session.client_id or "", (None, None))[1]
            if owner is handler and client_session.transitions.is_connected():
                await self._stop_handler(handler)
                client_session.transitions.disconnect()


def _take_all(queue: asyncio.Queue[ApplicationMessage]) -> list[ApplicationMessage]:
    """Everything in the queue now, oldest first, without waiting."""
    taken = []
    while not queue.empty():
        taken.append(queue.get_nowait())
    return taken


class EmbeddedBroker:
    """The in-process amqtt broker `batmon serve` runs: config, plugin wiring, lifecycle."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        config_path: Path,
        credentials: CredentialCheck,
        topics: Topics,
        bridge_username: str,
        bridge_password: str,
        limiter: FailureLimiter | None = None,
    ) -> None:
        """``limiter`` throttles failed logins per client address (default: 30 a minute)."""
        self._host = host
        self._requested_port = port
        self._config_path = config_path
        self._credentials = credentials
        self._topics = topics
        self._bridge_username = bridge_username
        self._bridge_password = bridge_password
        self._limiter = limiter
        self._broker: Broker | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The port actually listened on (differs from the requested one for port 0)."""
        if self._port is None:
            raise RuntimeError("the embedded broker is not running")
        return self._port

    def _load_config(self) -> dict[str, Any]:
        """broker.yaml with our bind address and our access plugin as the only ACL."""
        where = self._config_path
        try:
            raw = yaml.safe_load(where.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise BrokerStartError(f"cannot read broker config {where}: {exc}") from None
        listeners = raw.get("listeners", {}) if isinstance(raw, dict) else None
        default = listeners.get("default", {}) if isinstance(listeners, dict) else None
        plugins = (raw.get("plugins") or {}) if isinstance(raw, dict) else None
        if isinstance(plugins, list):  # amqtt also accepts a list of names / one-key maps
            plugins = {
                name: cfg
                for item in plugins
                for name, cfg in (item.items() if isinstance(item, dict) else [(item, {})])
            }
        if not (isinstance(default, dict) and isinstance(plugins, dict)):
            raise BrokerStartError(
                f"broker config {where}: expected mappings 'listeners.default' and 'plugins'"
            )
        policy = AccessPolicy(
            credentials=self._credentials,
            topics=self._topics,
            bridge_username=self._bridge_username,
            bridge_password=self._bridge_password,
            limiter=self._limiter,
        )
        others = {
            name: cfg
            for name, cfg in plugins.items()
            if name != PLUGIN_PATH and not str(name).startswith(_FORBIDDEN_PLUGIN_PREFIXES)
        }
        config = {k: v for k, v in raw.items() if k not in _LEGACY_KEYS}
        config["listeners"] = {
            **listeners,
            "default": {"type": "tcp", **default, "bind": f"{self._host}:{self._requested_port}"},
        }
        config["plugins"] = {PLUGIN_PATH: {"policy": policy}, **others}
        return config

    async def start(self) -> None:
        """Load the config and listen; raises BrokerStartError naming host:port on failure."""
        if self._broker is not None:
            raise RuntimeError("the embedded broker is already running")
        config = self._load_config()
        where = f"{self._host}:{self._requested_port}"
        _quiet_amqtt_logging()
        try:
            broker = _BatmonBroker(config, topics=self._topics)
        except _CONFIG_ERRORS as exc:
            raise BrokerStartError(f"invalid broker config {self._config_path}: {exc}") from None
        startup_filter = _DropStartupTraceback()
        amqtt_log = logging.getLogger("amqtt.broker")
        amqtt_log.addFilter(startup_filter)
        try:
            await broker.start()
        except BrokerError as exc:
            cause = exc.__cause__
            if isinstance(cause, OSError) and cause.errno:
                reason = os.strerror(cause.errno)
            else:
                reason = str(cause or exc)
            raise BrokerStartError(f"cannot start MQTT broker on {where}: {reason}") from None
        finally:
            amqtt_log.removeFilter(startup_filter)
        self._broker = broker
        self._port = _bound_port(broker)
        log.info("embedded MQTT broker listening on %s:%d", self._host, self._port)

    async def stop(self) -> None:
        """Disconnect every client and close the listener; a no-op if not running."""
        broker, self._broker = self._broker, None
        self._port = None
        if broker is not None:
            await broker.shutdown()


def _bound_port(broker: Broker) -> int:
    """Read the port from the listening socket: the only truth when port 0 was asked."""
    # amqtt has no public accessor for its listeners' servers (0.12).
    server = broker._servers["default"].instance
    return int(server.sockets[0].getsockname()[1])


class _DropStartupTraceback(logging.Filter):
    """amqtt logs a full traceback when it cannot bind; we raise BrokerStartError instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "Broker startup failed"


def _quiet_amqtt_logging() -> None:
    """amqtt logs every connection at INFO; keep it to warnings unless configured."""
    for name in ("amqtt", "transitions"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)
