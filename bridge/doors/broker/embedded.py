"""The embedded broker `batmon serve` runs: broker.yaml loading, plugin wiring, lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from amqtt.errors import BrokerError, PluginError, PluginLoadError
from dacite import DaciteError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bridge.doors.broker.access import AccessPolicy, CredentialCheck
from bridge.doors.broker.amqtt_patches import BatmonBroker, UpdateSink
from bridge.doors.broker.limits import BrokerLimits
from bridge.models import describe_error
from bridge.ratelimit import FailureLimiter
from bridge.tls import TlsSetupError, server_context
from bridge.topics import Topics

log = logging.getLogger(__name__)

PUBLISH_BATCH = 200  # broker-side publishes between yields to the event loop
SHUTDOWN_S = 5.0
"""amqtt's shutdown can stall while clients keep flooding; by then everything acknowledged is
committed, so a stop gives it this long and goes on."""
PLUGIN_PATH = "bridge.doors.broker.BatmonAccessPlugin"
"""Dotted path amqtt imports our plugin from (listed in broker.yaml)."""

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


class BrokerTls(BaseModel):
    """The TLS listener: broker.yaml's `tls` section under serve's --mqtt-tls-port, --tls-cert,
    --tls-key and --tls-client-ca. Same auth and ACL as the plain listener (one plugin)."""

    model_config = ConfigDict(extra="forbid")

    port: int = Field(ge=0, le=65535)  # 0 picks a free one
    cert: Path
    key: Path
    client_ca: Path | None = None  # given: a client without a certificate it signed is refused


class BrokerStartError(Exception):
    """The embedded broker could not start (bad config, address in use...)."""

    def __init__(self, message: str, *, address_in_use: bool = False) -> None:
        super().__init__(message)
        self.address_in_use = address_in_use
        """True when another program (another MQTT broker, most likely) holds the port."""


class EmbeddedBroker:
    """The in-process amqtt broker `batmon serve` runs: config, plugin wiring, lifecycle."""

    def __init__(
        self,
        *,
        host: str,
        port: int | None,
        config_path: Path,
        credentials: CredentialCheck,
        topics: Topics,
        bridge_username: str,
        bridge_password: str,
        limiter: FailureLimiter | None = None,
        updates: UpdateSink | None = None,
        on_homeassistant_status: Callable[[int, bytes], None] | None = None,
        tls: dict[str, Any] | None = None,
    ) -> None:
        """``limiter`` throttles failed logins per client address (default: 30 a minute);
        ``updates`` takes devices' updates straight from the broker (acked after commit);
        ``on_homeassistant_status`` hears (user_id, payload) of each user's publish on
        Home Assistant's status topic (its birth message asks for discovery again);
        ``tls`` (port, cert, key, client_ca) over broker.yaml's `tls` section adds a TLS
        listener. ``port`` None: no plain listener for devices, only a loopback one for the
        bridge's own client."""
        self._host = host if port is not None else "127.0.0.1"
        self._tls_host = host
        self._requested_port = port or 0
        self._tls_overrides = {k: v for k, v in (tls or {}).items() if v is not None}
        self.tls: BrokerTls | None = None
        """The TLS listener's settings, once loaded (None: no TLS listener)."""
        self._tls_port: int | None = None
        self._config_path = config_path
        self._credentials = credentials
        self._topics = topics
        self._bridge_username = bridge_username
        self._bridge_password = bridge_password
        self._limiter = limiter
        self._updates = updates
        self._on_homeassistant_status = on_homeassistant_status
        self._broker: BatmonBroker | None = None
        self._port: int | None = None
        self._outbox: asyncio.Queue[tuple[str, bytes, bool]] = asyncio.Queue()
        self._publisher: asyncio.Task[None] | None = None
        self._policy: AccessPolicy | None = None
        self._sweeps: set[asyncio.Task[None]] = set()
        self.limits = BrokerLimits()
        """The ``limits`` section of the config, once loaded."""

    @property
    def port(self) -> int:
        """The port actually listened on (differs from the requested one for port 0)."""
        if self._port is None:
            raise RuntimeError("the embedded broker is not running")
        return self._port

    @property
    def host(self) -> str:
        """Where the plain listener is (loopback when there is none for devices)."""
        return self._host

    @property
    def tls_port(self) -> int | None:
        """The TLS listener's port, None without one."""
        return self._tls_port

    @property
    def stats(self) -> dict[str, int]:
        """What the limits refused or dropped, and client-id takeovers, since start; the
        sockets waiting to log in and the logged-in clients now."""
        broker = self._broker
        if broker is None:
            return {}
        rooms = broker.rooms
        return {**broker.counters, "unauthenticated": rooms.waiting, "logged_in": rooms.logged_in}

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
        try:
            self.limits = BrokerLimits.model_validate(raw.get("limits") or {})
        except ValidationError as exc:
            raise BrokerStartError(f"broker config {where}: limits.{describe_error(exc)}") from None
        tls = {**(raw.get("tls") or {}), **self._tls_overrides}
        if tls:
            try:
                self.tls = BrokerTls.model_validate(tls)
            except ValidationError as exc:
                raise BrokerStartError(f"broker config {where}: tls.{describe_error(exc)}") from None
        config = {k: v for k, v in raw.items() if k not in (*_LEGACY_KEYS, "limits", "tls")}
        config["listeners"] = {
            **listeners,
            "default": {"type": "tcp", **default, "bind": f"{self._host}:{self._requested_port}"},
        }
        if self.tls is not None:
            # amqtt checks these paths; the context it would build is replaced by ours
            # (BatmonBroker), which can require client certificates.
            config["listeners"]["tls"] = {
                "type": "tcp", "bind": f"{self._tls_host}:{self.tls.port}", "ssl": True,
                "certfile": str(self.tls.cert), "keyfile": str(self.tls.key),
            }  # fmt: skip
        config["plugins"] = {PLUGIN_PATH: {"policy": policy}, **others}
        self._policy = policy
        return config

    async def start(self) -> None:
        """Load the config and listen; raises BrokerStartError naming host:port on failure."""
        if self._broker is not None:
            raise RuntimeError("the embedded broker is already running")
        config = self._load_config()
        where = f"{self._host}:{self._requested_port}"
        if self.tls is not None:
            where += f" and TLS on {self._tls_host}:{self.tls.port}"
            try:
                tls_context = server_context(self.tls.cert, self.tls.key, self.tls.client_ca)
            except TlsSetupError as exc:
                raise BrokerStartError(f"cannot start the MQTT TLS listener: {exc}") from None
        else:
            tls_context = None
        _quiet_amqtt_logging()
        try:
            broker = BatmonBroker(config, topics=self._topics, limits=self.limits, updates=self._updates,
                                  on_homeassistant_status=self._on_homeassistant_status,
                                  tls_context=tls_context)  # fmt: skip
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
            in_use = isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE
            raise BrokerStartError(
                f"cannot start MQTT broker on {where}: {reason}", address_in_use=in_use
            ) from None
        finally:
            amqtt_log.removeFilter(startup_filter)
        self._broker = broker
        self._port = broker.bound_port()
        self._tls_port = broker.bound_port("tls") if self.tls is not None else None
        self._publisher = asyncio.create_task(self._publish_loop(broker), name="broker-publisher")
        log.info("embedded MQTT broker listening on %s:%d", self._host, self._port)

    def publish_retained(self, topic: str, payload: str) -> None:
        """Publish a retained topic as the broker (the state publisher's and discovery's way out)."""
        self.publish_soon(topic, payload, retain=True)

    def publish_soon(self, topic: str, payload: str, *, retain: bool = False) -> None:
        """Publish as the broker itself, from synchronous code (state, discovery, errors).

        Messages go out in call order through one task, which yields to the loop
        between batches: 30,000 retained topics at start-up do not starve ingest.
        """
        if self._broker is not None:
            self._outbox.put_nowait((topic, payload.encode(), retain))

    async def _publish_loop(self, broker: BatmonBroker) -> None:
        while True:
            topic, payload, retain = await self._outbox.get()
            try:
                await broker.publish_internal(topic, payload, retain=retain)
            except Exception:
                log.exception("publishing %s into the embedded broker failed", topic)
            self._outbox.task_done()
            if self._outbox.qsize() and self._outbox.qsize() % PUBLISH_BATCH == 0:
                await asyncio.sleep(0)

    def drop_revoked_sessions(self) -> None:
        """Soon close every session logged in with a secret no longer valid (reset or revoked)."""
        if self._broker is None or self._policy is None:
            return
        task = asyncio.create_task(self._drop_revoked(self._broker, self._policy), name="broker-revoke")
        self._sweeps.add(task)
        task.add_done_callback(self._sweeps.discard)

    async def _drop_revoked(self, broker: BatmonBroker, policy: AccessPolicy) -> None:
        try:
            closed = await broker.disconnect_where(lambda p: not policy.still_valid(p))
        except Exception:
            log.exception("closing the sessions of revoked credentials failed")
            return
        if closed:
            log.info("closed %d MQTT session(s) whose credential was reset or revoked", closed)

    def stop_listening(self) -> None:
        """Accept no new client (first step of a clean stop)."""
        if self._broker is not None:
            self._broker.stop_listening()

    async def stop(self) -> None:
        """Take no new client, let the updates handed in commit (so their PUBACKs go
        out), then disconnect every client and close the listener; a no-op if not running."""
        if self._broker is not None and self._updates is not None:
            self._broker.stop_listening()
            await self._updates.settle()
            await asyncio.sleep(0)  # let the PUBACKs of what just committed be sent
        broker, self._broker = self._broker, None
        self._port = self._tls_port = None
        if self._publisher is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._outbox.join(), 5)  # the last states go out first
            self._publisher.cancel()
            await asyncio.gather(self._publisher, return_exceptions=True)
            self._publisher = None
        if broker is not None:
            try:
                await asyncio.wait_for(broker.shutdown(), SHUTDOWN_S)
            except TimeoutError:
                log.warning("the embedded broker did not shut down within %g s; going on", SHUTDOWN_S)


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
