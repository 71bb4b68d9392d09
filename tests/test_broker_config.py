"""Where `batmon serve` finds broker.yaml: --broker-config, else ./broker.yaml (the one at
the top of the repository), else the copy packaged with bridge/ (a non-editable install)."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from bridge.config import PACKAGED_BROKER_CONFIG, ServeOptions
from tests.broker_support import Client
from tests.conftest import ServeProcess
from tests.support import ROOT

SERVER_UNAVAILABLE = 136  # paho's reason code for CONNACK return code 3


def test_the_top_level_broker_yaml_is_the_packaged_default() -> None:
    top = ROOT / "broker.yaml"
    assert top.exists() and top.read_text() == PACKAGED_BROKER_CONFIG.read_text()


def test_without_a_local_broker_yaml_serve_uses_the_packaged_one(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert ServeOptions().broker_config_path.resolve() == (ROOT / "broker.yaml").resolve()
    process = ServeProcess(tmp_path / "data", cwd=elsewhere).start()
    try:
        assert process.mqtt_url.startswith("mqtt://127.0.0.1:")
    finally:
        process.stop()


def test_broker_config_points_at_an_edited_copy(tmp_path: Path) -> None:
    edited = tmp_path / "my-broker.yaml"
    shutil.copy(ROOT / "broker.yaml", edited)
    config = yaml.safe_load(edited.read_text())
    config["limits"]["max_connections"] = 2  # the bridge's own connection and one more
    edited.write_text(yaml.safe_dump(config))
    process = ServeProcess(tmp_path / "data", args=["--broker-config", str(edited)]).start()
    port = int(process.mqtt_url.rsplit(":", 1)[1])
    key = process.admin_key or ""
    first, second = (Client(port, name, "admin@localhost", key) for name in ("first", "second"))
    try:
        assert first.connect() == 0
        assert second.connect() == SERVER_UNAVAILABLE
    finally:
        first.close()
        second.close()
        process.stop()
