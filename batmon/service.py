"""`batmon serve` as an object, and the one composition root: it builds the store, the
core, the doors and every extension, starts them in one declared order and stops them
in reverse, each stop awaited and bounded, on one event loop.

It lives outside `bridge/` because it composes the core with its facade (`http_api`):
the core never imports the facade. Tests start a `Service` in-process on free ports;
the CLI runs the same thing.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import json
import logging
import os
import secrets
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batmon.http_server import EdgeStats
from bridge.config import ServeOptions, parse_mqtt_url, uses_tls
from bridge.core import Core
from bridge.datadir import prepare_data_dir, private_file
from bridge.errors import StorageFailed
from bridge.events import EventBus, HomeAssistantStatus
from bridge.extensions import Extension
from bridge.ratelimit import FailureLimiter
from bridge.store.interface import Store
from bridge.threads import run_on_own_thread
from bridge.tls import TlsSetupError, client_context, server_context
from bridge.topics import Topics

if TYPE_CHECKING:
    from bridge.doors.broker import EmbeddedBroker
    from bridge.doors.external_door import ExternalBrokerDoor
    from bridge.doors.mqtt_link import MqttLink
    from bridge.doors.update_door import UpdateDoor
    from bridge.extensions.credential_watcher import CredentialPoll
    from bridge.extensions.discovery import HomeAssistantDiscovery

log = logging.getLogger(__name__)
GC_YOUNG_THRESHOLD = 50_000
"""Allocations between two young-generation collections (Python's default is 700)."""

ADMIN_EMAIL = "admin@localhost"
GIL_SWITCH_S = 0.001
DRAIN_TIMEOUT_S = 30.0  # stops that wait for queued readings to commit, at most
STEP_TIMEOUT_S = 5.0  # every other stop; nothing acknowledged depends on them
CANCEL_GRACE_S = 1.0  # a stop past its bound is cancelled and given this long to end


class ServiceError(RuntimeError):
    """A runtime failure to start (busy port, unreadable data folder): one clear line.

    ``code``: the exit status, 2 for a way of running that can never work (a usage error)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def session_secret(data_dir: Path) -> bytes:
    """The cookie-signing secret: made once per data folder, readable by us only."""
    path = data_dir / "session.key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    else:
        private_file(path)  # one made by an older version, or copied in: 0600 again
    return path.read_bytes()


def bind_socket(host: str, port: int, what: str) -> socket.socket:
    """Bind a listening TCP socket ourselves, so a busy port is a clear error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ServiceError(f"cannot resolve {what} host {host!r}: {exc.strerror or exc}") from None
    family, kind, proto, _, address = infos[0]
    # proto must be IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted sockets only
    # then, and without it every keep-alive response waits ~40 ms (Nagle + delayed ACK).
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        hint = ""
        if exc.errno == errno.EADDRINUSE:
            hint = f"; choose another with --{what.lower()}-port (0 picks a free one)"
        raise ServiceError(f"cannot listen for {what} on {host}:{port}: {exc.strerror}{hint}") from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class Service:
    """Everything `batmon serve` runs, with the addresses it actually bound."""

    def __init__(self, options: ServeOptions, *, extensions: Sequence[Extension] = (),
                 stop_timeout_s: float = STEP_TIMEOUT_S) -> None:  # fmt: skip
        """``extensions``: more, started after the built-in ones (stopped before them);
        ``stop_timeout_s``: the bound of each stop that waits for no commit."""
        self.options = options
        self.topics = Topics(options.base_topic, options.discovery_prefix)
        self.stop_timeout_s = stop_timeout_s
        self.store: Store | None = None
        self.core: Core | None = None
        self.admin_api_key: str | None = None
        self.http_port: int | None = None
        self.mqtt_host: str | None = None
        self.mqtt_port: int | None = None
        self.broker: EmbeddedBroker | None = None
        self.link: MqttLink | None = None
        self.door: ExternalBrokerDoor | UpdateDoor | None = None
        self.discovery: HomeAssistantDiscovery | None = None
        self._more = list(extensions)
        self._started: list[Extension] = []  # in start order; stopped in reverse
        self._bounds: dict[Extension, float] = {}  # stops that may wait for commits
        # One throttle for both doors: a source failing over HTTP is throttled over MQTT too.
        self.limiter = FailureLimiter()
        self.http_edge = EdgeStats()  # what the HTTP edge refused

    @property
    def http_url(self) -> str:
        scheme = "https" if self.options.http_tls_cert else "http"
        return f"{scheme}://{self.options.host}:{self.http_port}"

    async def start(self) -> None:
        """Start every part; raises ServiceError (after cleaning up) if one fails."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        # Three threads share the GIL (the loop, paho's, the writer's); at the default
        # 5 ms switch interval the loop waited up to 5 ms at each I/O point, and a
        # /healthz during a 20,000-reading backlog took 120-150 ms at p95.
        sys.setswitchinterval(GIL_SWITCH_S)
        from batmon.http_server import HttpServerError
        from bridge.doors.broker import BrokerStartError
        from bridge.doors.mqtt_link import MqttConnectError
        from bridge.store.pg_lock import LockHeld

        opts = self.options
        try:
            # Opening (migrations) and loading run off the loop, as every query does.
            self.store = await run_on_own_thread(self._open_store, name="store-open")
            secret = session_secret(opts.data_dir)  # the data folder holds it on PostgreSQL too
        except OSError as exc:
            raise ServiceError(f"cannot use data folder {opts.data_dir}: {exc.strerror}") from None
        if opts.http_tls_cert and opts.http_tls_key:
            try:  # checked here: inside uvicorn a bad file is a traceback
                server_context(opts.http_tls_cert, opts.http_tls_key)
            except TlsSetupError as exc:
                raise ServiceError(f"cannot serve HTTPS: {exc}") from None
        core = Core(self.store, EventBus())
        await run_on_own_thread(core.load, name="store-load")
        self.core = core
        # Bind HTTP first: a busy port is then one clear error before anything starts.
        sock = bind_socket(opts.host, opts.http_port, "HTTP")
        self.http_port = sock.getsockname()[1]
        try:
            parts = self._build(core, secret, sock)
        except BaseException:
            sock.close()
            raise
        for part in parts:
            # Recorded first: a part whose start fails is stopped too (stop is safe
            # on a half-started part), so nothing it opened is left behind.
            self._started.append(part)
            try:
                await part.start()
            except BrokerStartError as exc:
                raise ServiceError(f"{exc}{self._broker_hint(exc)}") from None
            except MqttConnectError as exc:
                hint = ""
                if opts.mqtt_url:
                    hint = (". Check that the broker of --mqtt-url is running and reachable from"
                            " here, and its credentials; without --mqtt-url, serve runs its own"
                            " broker")  # fmt: skip
                raise ServiceError(f"{exc}{hint}") from None
            except HttpServerError as exc:
                raise ServiceError(str(exc)) from None
            except LockHeld as exc:
                raise ServiceError(str(exc), code=2) from None
            except StorageFailed as exc:
                raise ServiceError(exc.message) from None
        if self.broker is not None:  # where it listens is known once it does
            self.mqtt_host, self.mqtt_port = self.broker.host, self.broker.port
        # Everything made so far (registry, modules, broker) lives as long as the process:
        # out of the collector's way, so full collections during a backlog stay short.
        gc.freeze()
        # And collect the young generation less often: at 700 allocations, every reading in
        # flight (tasks, packets, futures) was promoted to the old generations, whose full
        # collections then took 150-1,200 ms at full ingest (docs/PERFORMANCE.md).
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        # Last, so a start that fails does not make an admin whose key nobody saw.
        if not core.user_has_data():
            _, self.admin_api_key = await core.create_user_off_loop(ADMIN_EMAIL)

    def _open_store(self) -> Store:
        """PostgreSQL when a database URL is given, else the SQLite file in the data folder."""
        opts = self.options
        if opts.database_url is None:
            from bridge.store.db import SqliteStore

            return SqliteStore.open(opts.database_path)  # makes the folder 0700
        from bridge.store.pg_store import PostgresStore

        prepare_data_dir(opts.data_dir)  # 0700: the session key stays in it
        try:
            return PostgresStore.open(opts.database_url.get_secret_value())
        except StorageFailed as exc:  # names user@host:port/db, never the password
            raise ServiceError(exc.message) from None

    def _credential_reader(self) -> Callable[[], CredentialPoll] | None:
        """What opens the credential watcher's reader: PostgreSQL's, else None (the SQLite file's)."""
        if self.options.database_url is None:
            return None
        from bridge.store.pg_credentials import PgCredentialReader

        url = self.options.database_url.get_secret_value()
        return lambda: PgCredentialReader(url)

    @property
    def store_description(self) -> str:
        """Where the data is, for the startup lines (no password)."""
        if self.options.database_url is None:
            return str(self.options.database_path.resolve())
        from bridge.store.pg_store import describe_url

        return "postgresql://" + describe_url(self.options.database_url.get_secret_value())

    def _build(self, core: Core, secret: bytes, sock: socket.socket) -> list[Extension]:
        """Construct every part (references only: nothing subscribes, runs or connects
        yet) and return them in start order; the reverse is the stop order."""
        # Imported here so `batmon user ...` does not pay for amqtt/paho/apprise/uvicorn.
        from batmon.http_server import HttpServer
        from bridge.doors.broker import EmbeddedBroker
        from bridge.doors.external_door import ExternalBrokerDoor
        from bridge.doors.mqtt_link import BrokerEndpoint, BrokerMode, MqttLink
        from bridge.doors.update_door import UpdateDoor
        from bridge.events import CredentialsChanged
        from bridge.extensions.alarms import AlarmEvaluator
        from bridge.extensions.bank_publisher import BankPublisher
        from bridge.extensions.credential_watcher import CredentialWatcher
        from bridge.extensions.discovery import HomeAssistantDiscovery
        from bridge.extensions.metrics import Metrics
        from bridge.extensions.notifier import Notifier
        from bridge.extensions.state_publisher import RetainedPublish, StatePublisher
        from bridge.extensions.watchdog import OfflineWatchdog
        from http_api.app import create_app
        from http_api.live import LiveFeed
        from http_api.metrics_access import MetricsExposure

        opts = self.options
        metrics = Metrics(core, mqtt_stats=self.mqtt_stats, per_batmon=opts.metrics_per_batmon)
        # Metrics first, so it counts every event the others cause; the notifier before
        # the watchdog, which may announce Offline batmons at once.
        credentials = CredentialWatcher(core, opts.database_path, open_reader=self._credential_reader())
        parts: list[Extension] = [
            metrics,
            AlarmEvaluator(core),
            Notifier(core, retry_base_s=opts.notify_retry_s, give_up_after_s=opts.notify_give_up_s,
                     lease_s=opts.notify_lease_s),
            OfflineWatchdog(core),
            # `batmon user ...` from another process: keys and tokens reloaded at once.
            credentials,
        ]
        peers = None
        if opts.database_url is not None:
            # Other workers on the database: their changes reach memory before a request is
            # answered (bridge/extensions/peers.py); started before anything publishes or serves.
            from bridge.extensions.peers import PeerSync

            peers = PeerSync(core, opts.database_url.get_secret_value(), credentials=credentials.check_now)
            parts.append(peers)
        if opts.retention_days is not None:
            from bridge.extensions.retention_pruner import RetentionPruner

            parts.append(RetentionPruner(core.store, opts.retention_days))

        retained: RetainedPublish
        if opts.mqtt_url:
            host, port, username, password = parse_mqtt_url(opts.mqtt_url)
            tls = None
            if uses_tls(opts.mqtt_url):
                try:
                    tls = client_context(opts.mqtt_ca, opts.mqtt_client_cert, opts.mqtt_client_key)
                except TlsSetupError as exc:
                    raise ServiceError(f"cannot connect to the MQTT broker over TLS: {exc}") from None
            # A stable id keeps the broker's session: readings sent while we were
            # away (and those we held unacked) are delivered when we come back.
            client_id = opts.bridge_client_id
            self.mqtt_host, self.mqtt_port = host, port
            link = MqttLink(BrokerEndpoint(host, port, username, password, client_id, tls),
                            BrokerMode.EXTERNAL, self.topics, core.bus,
                            homeassistant=opts.discovery)  # fmt: skip
            door = ExternalBrokerDoor(core, self.topics, link, share_group=opts.mqtt_share_group)
            link.take_updates(door.subscription, door.receive, stale=door.stale_subscription)
            retained = link.publish_retained
            doors: list[Extension] = [link, door]  # the door stops (acks) before the link goes
            self._bounds[door] = DRAIN_TIMEOUT_S
            self.door = door
        else:
            bridge_user, bridge_password = "batmon-bridge", secrets.token_urlsafe(24)
            # Devices' updates go from the broker straight to the writer, and the broker
            # acknowledges each only after its commit (bridge/doors/broker/amqtt_patches.py).
            update_door = UpdateDoor(core, self.topics, self._reply_error_in_broker)
            broker = EmbeddedBroker(
                host=opts.host, port=opts.mqtt_port, config_path=opts.broker_config_path,
                credentials=core, topics=self.topics,
                bridge_username=bridge_user, bridge_password=bridge_password, updates=update_door,
                limiter=self.limiter, on_homeassistant_status=self._homeassistant_status,
                tls={"port": opts.mqtt_tls_port, "cert": opts.tls_cert, "key": opts.tls_key,
                     "client_ca": opts.tls_client_ca},
            )  # fmt: skip
            # A key reset or a token revoked by `batmon user ...`: end the sessions it opened
            # (the subscription lives as long as this core's bus).
            core.bus.subscribe(CredentialsChanged, lambda _: broker.drop_revoked_sessions())
            # The in-process broker has no session to keep across our restarts, and a
            # fixed id could be taken over by a clean-session CONNECT: a fresh one. Its
            # port is known once it listens, so the link reads it when it starts.
            client_id = f"batmon-bridge-{secrets.token_hex(6)}"
            # The broker says whose Home Assistant published its status (only that user's
            # configs go out again), so the link does not listen for it here.
            link = MqttLink(lambda: BrokerEndpoint(broker.host, broker.port, bridge_user,
                                                   bridge_password, client_id),
                            BrokerMode.EMBEDDED, self.topics, core.bus, homeassistant=False)  # fmt: skip
            retained = broker.publish_retained
            if opts.database_url is not None:  # first to start: a second such worker starts nothing
                parts.insert(0, self._embedded_broker_lock(opts.database_url.get_secret_value()))
            parts.append(broker)
            doors = [link]
            self._bounds[broker] = DRAIN_TIMEOUT_S  # it waits for commits before disconnecting
            self.broker, self.door = broker, update_door
        self.link = link
        banks = BankPublisher(core, self.topics, retained, opts.discovery)
        parts += [StatePublisher(core, self.topics, retained), banks]
        if opts.discovery:
            # Home Assistant's birth re-sends the banks' configs too: one rule for when.
            self.discovery = HomeAssistantDiscovery(core, self.topics, retained,
                                                    also_resend=banks.resend_discovery,
                                                    shared=peers)  # fmt: skip
            parts.append(self.discovery)
        # The link connects after the state publisher and discovery listen for MqttConnected.
        parts += doors

        live = LiveFeed(core)
        if peers is not None:  # readings elsewhere are loaded for the dashboards open here
            peers.watched = lambda user_id: live.stream_count(user_id) > 0
        token = opts.metrics_token.get_secret_value() if opts.metrics_token else None
        exposure = MetricsExposure(render=metrics.render, access=opts.metrics, token=token,
                                   prepare=metrics.refresh)  # fmt: skip
        app = create_app(core, session_secret=secret, health=self.health, metrics=exposure,
                         limiter=self.limiter, live=live)  # fmt: skip
        # The live feed starts after the HTTP server, so it stops before it: open streams
        # never end by themselves, and the server waits for them.
        # uvicorn with the limits it lacks: head size and time, connections (batmon/http_server.py).
        server = HttpServer(app, sock, max_connections=opts.http_max_connections, stats=self.http_edge,
                            tls=https_options(opts))  # fmt: skip
        parts += [server, live]
        return parts + self._more

    @staticmethod
    def _embedded_broker_lock(url: str) -> Extension:
        """The embedded broker serves one worker: held while it runs, refused to a second."""
        from bridge.store.pg_lock import EMBEDDED_BROKER_LOCK, SessionLock
        from bridge.store.pg_store import describe_url

        return SessionLock(url, EMBEDDED_BROKER_LOCK, (
            f"another batmon serve with the embedded broker already uses postgresql://{describe_url(url)};"
            " the embedded broker serves one worker only: run every worker with --mqtt-url"
            " (one external broker, e.g. Mosquitto; see docs/SCALE-OUT.md)"))

    def _broker_hint(self, exc: Exception) -> str:
        if not getattr(exc, "address_in_use", False):
            return ""
        # Most often a Mosquitto already running on 1883: use it, or step aside.
        port = self.options.mqtt_port
        return (f". Another MQTT broker may be listening there: give the embedded one"
                f" another port with --mqtt-port (0 picks a free one), or use that"
                f" broker with --mqtt-url mqtt://127.0.0.1:{port}")  # fmt: skip

    def mqtt_stats(self) -> dict[str, Any] | None:
        """The MQTT link's and door's counters (/healthz, metrics); None before start."""
        if self.link is None or self.door is None:
            return None
        from bridge.doors.external_door import COUNTERS

        counters = dict.fromkeys(COUNTERS, 0)  # the same keys in both modes
        discovery = self.discovery.counters if self.discovery is not None else {}
        return {**self.link.stats, **counters, **self.door.stats, **discovery}

    def _homeassistant_status(self, user_id: int, payload: bytes) -> None:
        """A user's publish on Home Assistant's status topic, as the embedded broker saw it."""
        if self.core is not None:
            self.core.bus.emit(HomeAssistantStatus(payload, user_id))

    def _reply_error_in_broker(self, batmon_id: int, token: str, message: str) -> None:
        if self.broker is not None:
            self.broker.publish_soon(self.topics.error(batmon_id, token), json.dumps({"error": message}))

    def health(self) -> dict[str, Any]:
        """MQTT connection state and counters for /healthz."""
        info: dict[str, Any] = {
            "mqtt": "connected" if self.link is not None and self.link.connected else "disconnected",
            "broker": "embedded" if self.broker is not None else "external",
            # Where devices connect (`batmon simulate --api-url` reads it): no credentials.
            "mqtt_host": self.mqtt_host,
            "mqtt_port": self.mqtt_port,
            "mqtt_base_topic": self.topics.base,  # the dashboard's "connect this device" card
        }
        info["http_edge"] = self.http_edge.as_dict()
        stats = self.mqtt_stats()
        if stats is not None:
            info["mqtt_stats"] = stats
        if self.broker is not None:
            # What the embedded broker's limits refused or dropped (bridge/doors/broker/limits.py).
            info["mqtt_broker"] = self.broker.stats
        return info

    async def stop(self) -> None:
        """Stop every started part in reverse order, each awaited and bounded, then let the
        writer commit what it took and close the database; safe on a half-started service.

        The reverse of the start order means: live streams end, HTTP answers what is in
        flight, the external door acks what committed, the link says ``offline``, the
        embedded broker takes no new client and waits for its updates' commits before
        disconnecting anyone, then the extensions stop. Nothing acknowledged is lost.
        """
        while self._started:
            part = self._started.pop()
            await self._stop_bounded(part, self._bounds.get(part, self.stop_timeout_s))
        self._bounds.clear()
        if self.core is not None:
            try:
                await asyncio.wait_for(self.core.writer.drain(), DRAIN_TIMEOUT_S)
            except Exception as exc:
                log.warning("the writer did not drain within %g s: %r", DRAIN_TIMEOUT_S, exc)
        core, store, self.store = self.core, self.store, None

        def close() -> None:  # joins threads and may checkpoint the WAL: off the loop too
            if core is not None:
                core.writer.stop()
                core.close_history()
            if store is not None:
                store.close()

        await run_on_own_thread(close, name="store-close")
        self.link = self.door = self.broker = None
        self.discovery = None

    @staticmethod
    async def _stop_bounded(part: Extension, bound: float) -> None:
        """Await ``part.stop()`` for ``bound`` seconds at most; log a stop that overruns
        or fails, and go on: one stuck part must not keep the rest running."""
        name = type(part).__name__
        task = asyncio.ensure_future(part.stop())
        done, _ = await asyncio.wait({task}, timeout=bound)
        if not done:
            log.warning("%s did not stop within %g s; cancelled, going on without it", name, bound)
            task.cancel()
            # A stop that honours the cancel ends now; one that ignores it is left behind.
            await asyncio.wait({task}, timeout=CANCEL_GRACE_S)
            return
        if not task.cancelled() and task.exception() is not None:
            log.warning("%s failed to stop: %r", name, task.exception())


def https_options(opts: ServeOptions) -> dict[str, Any]:
    """uvicorn's own TLS settings for --http-tls-cert/--http-tls-key; none without them."""
    if opts.http_tls_cert is None or opts.http_tls_key is None:
        return {}
    return {"ssl_certfile": str(opts.http_tls_cert), "ssl_keyfile": str(opts.http_tls_key)}
