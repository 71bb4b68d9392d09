"""Options of ``batmon serve`` and friends: flags over ``BATMON_<NAME>`` over
defaults, validated by one pydantic model so a bad value is one clear line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from bridge.store.db import DB_FILENAME

PACKAGED_BROKER_CONFIG = Path(__file__).with_name("broker.yaml")
Port = Annotated[int, Field(ge=0, le=65535)]

# A topic prefix: levels of safe characters, no wildcards, no leading '$' or '/'.
_TOPIC_PREFIX = re.compile(r"[A-Za-z0-9_\-.]+(/[A-Za-z0-9_\-.]+)*")


class ServeOptions(BaseModel):
    """Everything ``batmon serve`` needs to know."""

    model_config = ConfigDict(extra="forbid")

    data_dir: Path = Path("batmon-data")
    host: str = "127.0.0.1"
    http_port: Port = 8080
    mqtt_port: Port = 1883
    mqtt_url: str | None = None
    broker_config: Path | None = None
    base_topic: str = "batmon"
    discovery_prefix: str = "homeassistant"
    discovery: bool = True
    notify_retry_s: Annotated[float, Field(gt=0, le=86_400)] = 30.0
    notify_give_up_s: Annotated[float, Field(gt=0, le=30 * 86_400)] = 86_400.0

    @field_validator("base_topic", "discovery_prefix")
    @classmethod
    def _topic_prefix(cls, value: str) -> str:
        if not _TOPIC_PREFIX.fullmatch(value):
            raise ValueError(
                "must be topic levels of letters, digits, '_', '-', '.' separated by '/'"
            )
        return value

    @field_validator("mqtt_url")
    @classmethod
    def _mqtt_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not re.match(r"^mqtts?://[^/\s]+", value):
            raise ValueError("must look like mqtt://user:pass@host:1883")
        return value

    @property
    def broker_config_path(self) -> Path:
        """The broker config given, else ./broker.yaml, else the one shipped with us."""
        if self.broker_config is not None:
            return self.broker_config
        local = Path("broker.yaml")
        return local if local.exists() else PACKAGED_BROKER_CONFIG

    @property
    def database_path(self) -> Path:
        """The SQLite file inside the data folder."""
        return self.data_dir / DB_FILENAME
