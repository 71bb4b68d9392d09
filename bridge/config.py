"""Options of ``batmon serve`` and friends: flags over ``BATMON_<NAME>`` over
defaults, validated by one pydantic model so a bad value is one clear line.
"""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from bridge.store.db import DB_FILENAME

DEFAULT_MQTT_PORT = 1883
DEFAULT_MQTTS_PORT = 8883
PACKAGED_BROKER_CONFIG = Path(__file__).with_name("broker.yaml")
Port = Annotated[int, Field(ge=0, le=65535)]

# A bearer token Prometheus can send: visible ASCII, no spaces, long enough not to guess.
_METRICS_TOKEN = re.compile(r"[\x21-\x7e]{16,}")

# A topic prefix: levels of safe characters, no wildcards, no leading '$' or '/'.
_TOPIC_PREFIX = re.compile(r"[A-Za-z0-9_\-.]+(/[A-Za-z0-9_\-.]+)*")

# A share group name or an MQTT client id: one topic level of safe characters (MQTT 5
# §4.8.2 forbids '/', '+' and '#' in a share name; brokers differ on what else an id holds).
_MQTT_NAME = re.compile(r"[A-Za-z0-9_\-.]{1,64}")


def topic_prefix(value: str) -> str:
    """``value`` if it is a usable topic prefix (base topic, discovery prefix), else ValueError."""
    if not _TOPIC_PREFIX.fullmatch(value):
        raise ValueError("must be topic levels of letters, digits, '_', '-', '.' separated by '/'")
    return value


class ServeOptions(BaseModel):
    """Everything ``batmon serve`` needs to know."""

    model_config = ConfigDict(extra="forbid")

    data_dir: Path = Path("batmon-data")
    host: str = "127.0.0.1"
    http_port: Port = 8080
    mqtt_port: Port | None = 1883  # None: `off` (TLS only)
    mqtt_url: str | None = None
    # With --mqtt-url only. A share group: updates come through `$share/<group>/...`, so N
    # workers each take a part (None: a plain subscription, one worker). A client id: this
    # worker's broker session, kept across its restarts (None: batmon-bridge-<base topic>).
    mqtt_share_group: str | None = None
    mqtt_client_id: str | None = None
    # None: the SQLite file in data_dir. A secret: it may hold a password (never in a log line).
    database_url: SecretStr | None = None
    broker_config: Path | None = None
    base_topic: str = "batmon"
    discovery_prefix: str = "homeassistant"
    discovery: bool = True
    notify_retry_s: Annotated[float, Field(gt=0, le=86_400)] = 30.0
    notify_give_up_s: Annotated[float, Field(gt=0, le=30 * 86_400)] = 86_400.0
    # Several workers: another takes over a dead worker's notice in flight after this long.
    notify_lease_s: Annotated[float, Field(ge=1, le=3_600)] = 30.0
    metrics: Literal["off", "local", "token"] = "local"
    metrics_token: SecretStr | None = None
    metrics_per_batmon: bool = False
    # None keeps every reading; N prunes raw readings older than N days (hourly rollups stay).
    retention_days: Annotated[int, Field(ge=1, le=36_500)] | None = None
    # TLS on the embedded broker (also settable in broker.yaml's `tls` section; these win).
    mqtt_tls_port: Port | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # given: clients must present a certificate it signed
    # HTTPS with uvicorn's own TLS.
    http_tls_cert: Path | None = None
    http_tls_key: Path | None = None
    # TLS towards an external broker (mqtts:// in --mqtt-url): its CA (else the system's),
    # and our client certificate where the broker asks for one.
    mqtt_ca: Path | None = None
    mqtt_client_cert: Path | None = None
    mqtt_client_key: Path | None = None

    @field_validator("mqtt_port", mode="before")
    @classmethod
    def _plain_mqtt_off(cls, value: object) -> object:
        # `off`: no plain listener for devices, only TLS (the bridge keeps a loopback one).
        return None if value == "off" else value

    @field_validator("mqtt_share_group", "mqtt_client_id", mode="before")
    @classmethod
    def _mqtt_name(cls, value: object) -> object:
        if value in (None, ""):
            return None
        if not isinstance(value, str) or not _MQTT_NAME.fullmatch(value):
            raise ValueError("must be 1-64 letters, digits, '_', '-' or '.'")
        return value

    @field_validator("mqtt_tls_port", "tls_cert", "tls_key", "tls_client_ca", "http_tls_cert",
                     "http_tls_key", "mqtt_ca", "mqtt_client_cert", "mqtt_client_key",
                     mode="before")  # fmt: skip
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _tls_pairs(self) -> ServeOptions:
        if (self.http_tls_cert is None) != (self.http_tls_key is None):
            raise ValueError("--http-tls-cert and --http-tls-key go together.")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together.")
        if self.mqtt_url and (self.mqtt_tls_port is not None or self.tls_cert or self.tls_client_ca):
            raise ValueError("--mqtt-tls-port, --tls-cert, --tls-key and --tls-client-ca are for the"
                             " embedded broker; with --mqtt-url, the broker has its own TLS.")
        if self.mqtt_port is None and self.mqtt_url:
            raise ValueError("--mqtt-port off is for the embedded broker, not with --mqtt-url.")
        if not self.mqtt_url and (self.mqtt_share_group or self.mqtt_client_id):
            raise ValueError("--mqtt-share-group and --mqtt-client-id are for an external broker:"
                             " give --mqtt-url too.")
        check_client_tls(self.mqtt_url, self.mqtt_ca, self.mqtt_client_cert, self.mqtt_client_key)
        return self
    # Open HTTP connections; one more is answered 503 and closed (docs/CHOICES.md, "HTTP limits").
    http_max_connections: Annotated[int, Field(ge=1, le=65_535)] = 512

    @field_validator("base_topic", "discovery_prefix")
    @classmethod
    def _topic_prefix(cls, value: str) -> str:
        return topic_prefix(value)

    @field_validator("mqtt_url")
    @classmethod
    def _mqtt_url(cls, value: str | None) -> str | None:
        if not value:  # None or ""
            return None
        parse_mqtt_url(value)
        return value

    @field_validator("database_url", mode="before")
    @classmethod
    def _database_url(cls, value: object) -> object:
        if value in (None, ""):
            return None
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if not isinstance(text, str):
            raise ValueError("the database URL must be text like postgresql://user@host:5432/batmon")
        check_database_url(text)
        return value

    @field_validator("metrics_token", mode="before")
    @classmethod
    def _metrics_token(cls, value: object) -> object:
        if value in (None, ""):
            return None
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if not isinstance(text, str) or not _METRICS_TOKEN.fullmatch(text):
            raise ValueError("must be at least 16 visible ASCII characters without spaces")
        return value

    @model_validator(mode="after")
    def _metrics_access(self) -> ServeOptions:
        if self.metrics == "token" and self.metrics_token is None:
            raise ValueError("--metrics token needs --metrics-token (or BATMON_METRICS_TOKEN).")
        if self.metrics != "token" and self.metrics_token is not None:
            raise ValueError("--metrics-token is only used with --metrics token.")
        return self

    @property
    def broker_config_path(self) -> Path:
        """The broker config given, else ./broker.yaml, else the one shipped with us."""
        if self.broker_config is not None:
            return self.broker_config
        local = Path("broker.yaml")
        return local if local.exists() else PACKAGED_BROKER_CONFIG

    @property
    def bridge_client_id(self) -> str:
        """The external broker's session of this worker: the one given, else one named after
        the base topic, so bridges of different bases on one broker do not evict each other."""
        return self.mqtt_client_id or "batmon-bridge-" + self.base_topic.replace("/", "-")

    @property
    def database_path(self) -> Path:
        """The SQLite file inside the data folder."""
        return self.data_dir / DB_FILENAME


def check_database_url(url: str) -> None:
    """ValueError unless ``url`` looks like a PostgreSQL URL; errors never echo it (a password)."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise ValueError(
            "the database URL is malformed or its port is not a number between 1 and 65535"
        ) from None
    if parts.scheme not in ("postgresql", "postgres"):
        shown = f"{parts.scheme}://" if parts.scheme else "no scheme"
        raise ValueError(f"the database URL must look like postgresql://user@host:5432/batmon (got {shown})")
    if parts.fragment or port == 0:
        raise ValueError("the database URL must not have a fragment, and its port must be 1-65535")


def parse_mqtt_url(url: str) -> tuple[str, int, str | None, str | None]:
    """Split ``mqtt://user:pass@host:port`` into (host, port, username, password).

    Errors never echo the URL, which may hold a password.
    """
    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise ValueError(
            "the MQTT URL is malformed or its port is not a number between 1 and 65535"
        ) from None
    if parts.scheme not in ("mqtt", "mqtts"):
        shown = f"{parts.scheme}://" if parts.scheme else "no scheme"
        raise ValueError(
            f"the MQTT URL must look like mqtt://user:pass@host:1883 or mqtts://...:8883 (got {shown};"
            " websockets are not supported)"
        )
    if not parts.hostname:
        raise ValueError("the MQTT URL must name a host, like mqtt://user:pass@host:1883")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("the MQTT URL must not have a path, query or fragment")
    if port == 0:
        raise ValueError("the MQTT URL's port must be between 1 and 65535")
    username = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    if password is not None and username is None:
        raise ValueError("the MQTT URL has a password but no username")
    default_port = DEFAULT_MQTTS_PORT if parts.scheme == "mqtts" else DEFAULT_MQTT_PORT
    return parts.hostname, port or default_port, username, password


def uses_tls(url: str) -> bool:
    """True for an ``mqtts://`` URL (TLS to the broker)."""
    return url.strip().lower().startswith("mqtts://")


def check_client_tls(url: str | None, ca: Path | None, cert: Path | None, key: Path | None) -> None:
    """The rule for --mqtt-ca, --mqtt-client-cert and --mqtt-client-key, wherever a client
    connects to a broker (serve, the agent, simulate): only with mqtts://, cert and key together."""
    if (cert is None) != (key is None):
        raise ValueError("--mqtt-client-cert and --mqtt-client-key go together.")
    if (ca or cert) and not (url and uses_tls(url)):
        raise ValueError("--mqtt-ca, --mqtt-client-cert and --mqtt-client-key need an mqtts:// --mqtt-url.")
