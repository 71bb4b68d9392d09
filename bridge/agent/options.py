"""Options of ``batmon agent vedirect``: flags over ``BATMON_<NAME>`` over defaults,
validated by one pydantic model so a bad value is one clear line.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bridge.config import check_client_tls, parse_mqtt_url, topic_prefix, uses_tls
from bridge.models import BatmonId, Token
from bridge.tls import client_context

AGENT_OPTIONS = ("port", "replay", "batmon_id", "token", "mqtt_url", "base_topic", "interval",
                 "average", "data_dir", "queue_max", "first_block_timeout", "replay_rate",
                 "replay_loop", "mqtt_ca", "mqtt_client_cert", "mqtt_client_key")  # fmt: skip


class AgentOptions(BaseModel):
    """Everything ``batmon agent vedirect`` needs to know."""

    model_config = ConfigDict(extra="forbid")

    port: str | None = None
    replay: Path | None = None
    batmon_id: BatmonId
    token: Token
    mqtt_url: str = "mqtt://127.0.0.1:1883"
    base_topic: str = "batmon"
    interval: Annotated[float, Field(gt=0, le=3600)] = 10.0
    average: bool = False
    data_dir: Path = Path("batmon-agent-data")
    # 100,000 readings: 11 days at the default 10 s interval, about 70 MB of SQLite.
    queue_max: Annotated[int, Field(ge=1, le=10_000_000)] = 100_000
    first_block_timeout: Annotated[float, Field(gt=0, le=3600)] = 10.0
    replay_rate: Annotated[float, Field(gt=0, le=1000)] = 1.0
    replay_loop: bool = False
    mqtt_ca: Path | None = None  # an mqtts:// broker's CA (else the system's)
    mqtt_client_cert: Path | None = None
    mqtt_client_key: Path | None = None

    @field_validator("mqtt_url")
    @classmethod
    def _mqtt_url(cls, value: str) -> str:
        parse_mqtt_url(value)
        return value

    @field_validator("base_topic")
    @classmethod
    def _base_topic(cls, value: str) -> str:
        # Same rule as serve's, so the agent publishes where the bridge listens.
        return topic_prefix(value)

    @model_validator(mode="after")
    def _one_source(self) -> AgentOptions:
        if (self.port is None) == (self.replay is None):
            raise ValueError("give exactly one of --port (a serial device) or --replay (a recording)")
        check_client_tls(self.mqtt_url, self.mqtt_ca, self.mqtt_client_cert, self.mqtt_client_key)
        return self

    def mqtt_tls(self) -> ssl.SSLContext | None:
        """The TLS context for an mqtts:// broker, None for mqtt://; raises TlsSetupError."""
        if not uses_tls(self.mqtt_url):
            return None
        return client_context(self.mqtt_ca, self.mqtt_client_cert, self.mqtt_client_key)

    @property
    def source_name(self) -> str:
        """The serial port or recording, as a user would name it in a log line."""
        return self.port if self.port is not None else str(self.replay)

    def mqtt_login(self) -> tuple[str, int, str, str]:
        """(host, port, username, password): the URL's credentials, else the device's own."""
        host, port, username, password = parse_mqtt_url(self.mqtt_url)
        if username is None:
            return host, port, str(self.batmon_id), self.token
        return host, port, username, password or ""
