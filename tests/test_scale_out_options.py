"""`batmon serve`'s worker options (issue 16): a share group and a stable MQTT client id."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from batmon.cli import build_parser, serve_options
from bridge.config import ServeOptions
from bridge.topics import Topics

URL = "mqtt://127.0.0.1:1883"


def test_without_options_a_worker_keeps_todays_plain_subscription_and_client_id() -> None:
    opts = ServeOptions(mqtt_url=URL, base_topic="site/a")
    assert opts.mqtt_share_group is None
    assert opts.bridge_client_id == "batmon-bridge-site-a"
    assert Topics("site/a").shared_update_filter("g") == "$share/g/site/a/+/+/update"


def test_flags_win_over_the_environment_and_empty_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATMON_MQTT_URL", URL)
    monkeypatch.setenv("BATMON_MQTT_SHARE_GROUP", "batmon")
    monkeypatch.setenv("BATMON_MQTT_CLIENT_ID", "from-env")
    opts = serve_options(build_parser().parse_args(["serve", "--mqtt-client-id", "worker-2"]))
    assert (opts.mqtt_share_group, opts.bridge_client_id) == ("batmon", "worker-2")
    monkeypatch.setenv("BATMON_MQTT_SHARE_GROUP", "")
    monkeypatch.setenv("BATMON_MQTT_CLIENT_ID", "")
    opts = serve_options(build_parser().parse_args(["serve"]))
    assert (opts.mqtt_share_group, opts.bridge_client_id) == (None, "batmon-bridge-batmon")


@pytest.mark.parametrize("name", ["a/b", "+", "#", "a b", "x" * 65, "é"])
def test_a_group_or_client_id_that_is_not_one_safe_level_is_refused(name: str) -> None:
    for field in ("mqtt_share_group", "mqtt_client_id"):
        with pytest.raises(ValidationError, match=field):
            ServeOptions.model_validate({"mqtt_url": URL, field: name})
