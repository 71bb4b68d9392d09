"""`batmon serve` as an object: store, core, extensions, broker, MQTT bridge and
HTTP server started in order and stopped in reverse, on one event loop.

Tests start a `Service` in-process on free ports; the CLI runs the same thing.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import json
import logging
import os
import secrets
import socket
import sys
from pathlib import Path
from typing import Any, Protocol

import uvicorn

from batmon.http_server import EdgeStats, build_server
from bridge.config import ServeOptions, parse_mqtt_url, uses_tls
from bridge.core import Core
from bridge.datadir import prepare_data_dir, private_file
from bridge.errors import StorageFailed
from bridge.events import EventBus
from bridge.ratelimit import FailureLimiter
from bridge.store.interface import Store
from bridge.tls import TlsSetupError, client_context, server_context
from bridge.topics import Topics

log = logging.getLogger(__name__)

ADMIN_EMAIL = "admin@localhost"
GIL_SWITCH_S = 0.001
DRAIN_TIMEOUT_S = 30.0  # a stop waits this long at most for queued readings to commit
STEP_TIMEOUT_S = 5.0  # the other stop steps; nothing acknowledged depends on them


class ServiceError(RuntimeError):
    """A runtime failure to start (busy port, unreadable data folder): one clear line."""


class Extension(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


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

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.topics = Topics(options.base_topic, options.discovery_prefix)
        self.store: Store | None = None
        self.core: Core | None = None
        self.admin_api_key: str | None = None
        self.live: Any = None  # the dashboard's LiveFeed (http_api/live.py)
        self.http_port: int | None = None
        self.mqtt_host: str | None = None
        self.mqtt_port: int | None = None
        self.broker: Any = None
        self.mqtt: Any = None
        self.notifier: Any = None
        self.metrics: Any = None
        self._extensions: list[Any] = []  # Extensions, some with sync start/stop
        self._server: uvicorn.Server | None = None
        self._server_task: asyncio.Task[None] | None = None
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
        # Imported here so `batmon user ...` does not pay for amqtt/paho/apprise.
        from http_api.app import create_app
        from http_api.metrics_access import MetricsExposure

        opts = self.options
        try:
            self.store = self._open_store()
            secret = session_secret(opts.data_dir)  # the data folder holds it on PostgreSQL too
        except OSError as exc:
            raise ServiceError(f"cannot use data folder {opts.data_dir}: {exc.strerror}") from None
        if opts.http_tls_cert and opts.http_tls_key:
            try:  # checked here: inside uvicorn a bad file is a traceback
                server_context(opts.http_tls_cert, opts.http_tls_key)
            except TlsSetupError as exc:
                raise ServiceError(f"cannot serve HTTPS: {exc}") from None
        # Bind HTTP first: a busy port is then one clear error before anything starts.
        sock = bind_socket(opts.host, opts.http_port, "HTTP")
        self.http_port = sock.getsockname()[1]
        try:
            await self._start_parts()
        except BaseException:
            sock.close()
            raise
        assert self.core is not None
        token = opts.metrics_token.get_secret_value() if opts.metrics_token else None
        exposure = MetricsExposure(render=self.metrics.render, access=opts.metrics, token=token,
                                   count_rejection=self.metrics.count_http_rejection,
                                   prepare=self.metrics.refresh)  # fmt: skip
        app = create_app(self.core, session_secret=secret, health=self.health, metrics=exposure,
                         limiter=self.limiter)  # fmt: skip
        # uvicorn with the limits it lacks: head size and time, connections (batmon/http_server.py).
        self._server = build_server(app, max_connections=opts.http_max_connections, stats=self.http_edge,
                                    **https_options(opts))  # fmt: skip
        # Signals are ours (the CLI stops the whole service), not uvicorn's: from 0.29 uvicorn
        # takes SIGINT/SIGTERM for the whole of serve() unless capture_signals is a no-op.
        self._server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign, assignment]
        self._server_task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._server_task.done():
                raise ServiceError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        # The dashboard's live feed is an extension too (a first stream may have started it).
        self.live = app.state.live
        await self.live.start()
        self._extensions.append(self.live)
        # Everything made so far (registry, modules, broker) lives as long as the process:
        # out of the collector's way, so full collections during a backlog stay short.
        gc.freeze()
        # Last, so a start that fails does not make an admin whose key nobody saw.
        if not self.core.user_has_data():
            _, self.admin_api_key = self.core.create_user(ADMIN_EMAIL)

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

    def _credential_reader(self) -> Any:
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

    async def _start_parts(self) -> None:
        from bridge.doors.broker import EmbeddedBroker
        from bridge.doors.mqtt_client import MqttBridge
        from bridge.doors.update_door import UpdateDoor
        from bridge.events import CredentialsChanged
        from bridge.extensions.alarms import AlarmEvaluator
        from bridge.extensions.credential_watcher import CredentialWatcher
        from bridge.extensions.metrics import Metrics
        from bridge.extensions.notifier import Notifier
        from bridge.extensions.watchdog import OfflineWatchdog

        opts = self.options
        assert self.store is not None
        self.core = core = Core(self.store, EventBus()).load()
        # First, so it counts every event the others cause.
        self.metrics = Metrics(core, mqtt_stats=lambda: self.mqtt.stats if self.mqtt else None,
                               per_batmon=opts.metrics_per_batmon)  # fmt: skip
        await self.metrics.start()
        self._extensions.append(self.metrics)
        core.writer.on_commit = self.metrics.observe_commit
        self.metrics.queue_depth = lambda: core.writer.pending_rows

        bridge_user, bridge_password = "batmon-bridge", secrets.token_urlsafe(24)
        door: UpdateDoor | None = None
        broker_tls = None
        if opts.mqtt_url:
            host, port, username, password = parse_mqtt_url(opts.mqtt_url)
            if uses_tls(opts.mqtt_url):
                try:
                    broker_tls = client_context(opts.mqtt_ca, opts.mqtt_client_cert, opts.mqtt_client_key)
                except TlsSetupError as exc:
                    raise ServiceError(f"cannot connect to the MQTT broker over TLS: {exc}") from None
            # A stable id keeps the broker's session: readings sent while we were
            # away are delivered when we come back. It names the base topic, so two
            # bridges sharing a broker under different bases do not evict each other.
            client_id = "batmon-bridge-" + opts.base_topic.replace("/", "-")
        else:
            # Devices' updates go from the broker straight to the writer, and the broker
            # acknowledges each only after its commit (bridge/doors/broker/amqtt_patches.py).
            door = UpdateDoor(core, self.topics, self._reply_error_in_broker)
            self.broker = EmbeddedBroker(
                host=opts.host, port=opts.mqtt_port, config_path=opts.broker_config_path,
                credentials=core, topics=self.topics,
                bridge_username=bridge_user, bridge_password=bridge_password, updates=door,
                limiter=self.limiter, on_homeassistant_status=self._homeassistant_status,
                tls={"port": opts.mqtt_tls_port, "cert": opts.tls_cert, "key": opts.tls_key,
                     "client_ca": opts.tls_client_ca},
            )  # fmt: skip
            try:
                await self.broker.start()
            except Exception as exc:
                self.broker = None
                hint = ""
                if getattr(exc, "address_in_use", False):
                    # Most often a Mosquitto already running on 1883: use it, or step aside.
                    hint = (f". Another MQTT broker may be listening there: give the embedded one"
                            f" another port with --mqtt-port (0 picks a free one), or use that"
                            f" broker with --mqtt-url mqtt://127.0.0.1:{opts.mqtt_port}")  # fmt: skip
                raise ServiceError(f"{exc}{hint}") from None
            host, port, username, password = self.broker.host, self.broker.port, bridge_user, bridge_password
            # The in-process broker has no session to keep across our restarts, and a
            # fixed id could be taken over by a clean-session CONNECT: a fresh one.
            client_id = f"batmon-bridge-{secrets.token_hex(6)}"
        self.mqtt_host, self.mqtt_port = host, port

        # Extensions subscribe before anything can produce events; the notifier
        # before the watchdog, which may announce Offline batmons at once.
        self.notifier = Notifier(core, retry_base_s=opts.notify_retry_s,
                                 give_up_after_s=opts.notify_give_up_s)  # fmt: skip
        self.notifier.on_outcome = self.metrics.count_notice
        if self.broker is not None:
            # A key reset or a token revoked by `batmon user ...`: end the sessions it opened.
            core.bus.subscribe(CredentialsChanged, self._drop_revoked_sessions)
        watcher = CredentialWatcher(core, opts.database_path, open_reader=self._credential_reader())
        for extension in (AlarmEvaluator(core), self.notifier, OfflineWatchdog(core), watcher):
            await _start_extension(extension)
            self._extensions.append(extension)
        if opts.retention_days is not None:
            from bridge.extensions.retention_pruner import RetentionPruner

            pruner = RetentionPruner(self.store, opts.retention_days)
            await pruner.start()
            self._extensions.append(pruner)

        self.mqtt = MqttBridge(
            core, self.topics, host=host, port=port, username=username, password=password,
            client_id=client_id, discovery=opts.discovery,
            retain_flag_means_replay=self.broker is None,
            ingest_updates=self.broker is None, mqtt5=self.broker is None, door=door,
            publish_direct=self._publish_in_broker if self.broker is not None else None,
            tls=broker_tls,
            listen_homeassistant_status=self.broker is None,
        )  # fmt: skip
        try:
            await self.mqtt.start()
        except Exception as exc:
            hint = ""
            if opts.mqtt_url:
                hint = (". Check that the broker of --mqtt-url is running and reachable from here,"
                        " and its credentials; without --mqtt-url, serve runs its own broker")  # fmt: skip
            raise ServiceError(f"{exc}{hint}") from None

    def _drop_revoked_sessions(self, _: object) -> None:
        if self.broker is not None:
            self.broker.drop_revoked_sessions()

    def _publish_in_broker(self, topic: str, payload: str) -> None:
        if self.broker is not None:
            self.broker.publish_soon(topic, payload, retain=True)

    def _homeassistant_status(self, user_id: int, payload: bytes) -> None:
        """A user's publish on Home Assistant's status topic, as the embedded broker saw it."""
        if self.mqtt is not None:
            self.mqtt.homeassistant_status(payload, user_id)

    def _reply_error_in_broker(self, batmon_id: int, token: str, message: str) -> None:
        if self.broker is not None:
            self.broker.publish_soon(self.topics.error(batmon_id, token), json.dumps({"error": message}))

    def health(self) -> dict[str, Any]:
        """MQTT connection state and counters for /healthz."""
        info: dict[str, Any] = {
            "mqtt": "connected" if self.mqtt is not None and self.mqtt.connected else "disconnected",
            "broker": "embedded" if self.broker is not None else "external",
            # Where devices connect (`batmon simulate --api-url` reads it): no credentials.
            "mqtt_host": self.mqtt_host,
            "mqtt_port": self.mqtt_port,
            "mqtt_base_topic": self.topics.base,  # the dashboard's "connect this device" card
        }
        info["http_edge"] = self.http_edge.as_dict()
        if self.mqtt is not None:
            info["mqtt_stats"] = self.mqtt.stats
        if self.broker is not None:
            # What the embedded broker's limits refused or dropped (bridge/doors/broker/limits.py).
            info["mqtt_broker"] = self.broker.stats
        return info

    async def stop(self) -> None:
        """Stop in reverse order, losing nothing acknowledged; safe on a half-started service.

        HTTP stops first (requests in flight still get their answer), then the broker
        takes no new client, the writer commits what was taken so its PUBACKs go out,
        and only then are clients disconnected and the database closed.
        """
        if self._server is not None and self._server_task is not None:
            self._server.should_exit = True
            if self.live is not None:
                # Open live streams never end by themselves; the HTTP server waits for them.
                await self.live.stop()
            with contextlib.suppress(Exception):
                await self._server_task
        if self.broker is not None:
            self.broker.stop_listening()
        if self.core is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.core.writer.barrier(), DRAIN_TIMEOUT_S)
            await asyncio.sleep(0)  # let the PUBACKs of what just committed be sent
        if self.mqtt is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.mqtt.stop(), STEP_TIMEOUT_S)
        if self.broker is not None:
            with contextlib.suppress(Exception):
                # Everything acknowledged is committed by now: a broker whose clients
                # keep flooding must not hold the exit (amqtt's shutdown can stall).
                await asyncio.wait_for(self.broker.stop(), STEP_TIMEOUT_S)
        for extension in reversed(self._extensions):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(extension.stop(), STEP_TIMEOUT_S)
        self._extensions.clear()
        if self.core is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.core.writer.drain(), DRAIN_TIMEOUT_S)
            self.core.writer.stop()
            self.core.close_history()
        if self.store is not None:
            self.store.close()
            self.store = None


def https_options(opts: ServeOptions) -> dict[str, Any]:
    """uvicorn's own TLS settings for --http-tls-cert/--http-tls-key; none without them."""
    if opts.http_tls_cert is None or opts.http_tls_key is None:
        return {}
    return {"ssl_certfile": str(opts.http_tls_cert), "ssl_keyfile": str(opts.http_tls_key)}


async def _start_extension(extension: Any) -> None:
    result = extension.start()
    if asyncio.iscoroutine(result):
        await result
