"""Home Assistant device discovery: the pure payload, and its life on a real broker
(retained on start, re-sent on Home Assistant's birth, following edits, emptied on delete).
"""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest

from bridge.core import Batmon
from bridge.extensions.discovery import HomeAssistantDiscovery, discovery_payload
from bridge.extensions.state_publisher import state_payload
from bridge.models import EditBatmon
from bridge.topics import Topics
from tests.home_assistant import discovery_problems
from tests.support import Env, payload_json, retained, wait_until

TOPICS = Topics(base="batmon", discovery_prefix="homeassistant")
BASE = ("voltage", "current", "power", "soc")


def a_batmon(**fields: object) -> Batmon:
    values: dict[str, object] = {
        "id": 4_503_599_627_370_497, "user_id": 1, "name": "House bank", "type": "BMV-712",
        "token": "tok", "update_period": 300, "created": 1_700_000_000.0,
    }  # fmt: skip
    return Batmon(**{**values, **fields})  # type: ignore[arg-type]


# -- the payload -------------------------------------------------------------------
def test_payload_names_the_device_and_the_origin() -> None:
    batmon = a_batmon()
    payload = discovery_payload(batmon, TOPICS)
    assert payload["dev"] == {
        "identifiers": [f"batmon_{batmon.id}"], "name": "House bank", "model": "BMV-712",
        "manufacturer": "batmon",
    }  # fmt: skip
    assert payload["o"]["name"] == "batmon-bridge"
    assert isinstance(payload["o"]["sw_version"], str) and payload["o"]["sw_version"]


def test_payload_has_four_measurement_sensors_with_default_units() -> None:
    batmon = a_batmon()
    components = discovery_payload(batmon, TOPICS)["cmps"]
    expected = {"voltage": ("voltage", "V"), "current": ("current", "A"), "power": ("power", "W"),
                "soc": ("battery", "%")}  # fmt: skip
    assert list(components)[:4] == list(expected)
    for metric, (device_class, unit) in expected.items():
        component = components[metric]
        assert component["p"] == "sensor"
        assert component["device_class"] == device_class
        assert component["state_class"] == "measurement"
        assert component["unit_of_measurement"] == unit
        assert component["unique_id"] == f"batmon_{batmon.id}_{metric}"
        assert component["value_template"] == f"{{{{ value_json.batmon_{metric} }}}}"


def test_payload_uses_the_batmons_own_units() -> None:
    batmon = a_batmon(voltage_units="mV", current_units="mA", power_units="kW", soc_units="%")
    components = discovery_payload(batmon, TOPICS)["cmps"]
    units = {metric: components[metric]["unit_of_measurement"] for metric in BASE}
    assert units == {"voltage": "mV", "current": "mA", "power": "kW", "soc": "%"}


def test_payload_points_at_state_and_both_availability_topics_and_expires_after_two_periods() -> None:
    batmon = a_batmon(update_period=120)
    payload = discovery_payload(batmon, Topics(base="site/a", discovery_prefix="ha"))
    assert payload["state_topic"] == f"site/a/{batmon.id}/state"
    # All must say online: the bridge's last will makes every batmon unavailable at once.
    assert payload["availability_mode"] == "all"
    assert payload["availability"] == [
        {"topic": "site/a/bridge/state", "payload_available": "online", "payload_not_available": "offline"},
        {"topic": f"site/a/{batmon.id}/availability", "payload_available": "online",
         "payload_not_available": "offline"},
    ]  # fmt: skip
    assert "availability_topic" not in payload  # exclusive with the list in HA's schema
    assert {payload["cmps"][m]["expire_after"] for m in BASE} == {240}


def test_each_component_carries_its_own_qos_not_the_root() -> None:
    payload = discovery_payload(a_batmon(), TOPICS)
    # HA's SHARED_OPTIONS has no qos: a root qos leaves every sensor at QoS 0.
    assert "qos" not in payload
    assert {metric: c["qos"] for metric, c in payload["cmps"].items()} == dict.fromkeys(payload["cmps"], 1)


def test_a_unit_home_assistant_refuses_drops_the_device_class_and_keeps_the_unit() -> None:
    # The seed's edit example: current_units "I" is no unit HA accepts for class current.
    components = discovery_payload(a_batmon(**SEED_EDIT_UNITS), TOPICS)["cmps"]
    assert "device_class" not in components["current"]
    assert components["current"]["unit_of_measurement"] == "I"
    assert components["current"]["state_class"] == "measurement"
    kept = {m: (components[m].get("device_class"), components[m]["unit_of_measurement"])
            for m in BASE if m != "current"}  # fmt: skip
    assert kept == {"voltage": ("voltage", "V"), "power": ("power", "W"), "soc": ("battery", "%")}


# Every payload the suite produces must pass HA's rules: defaults, the seed's edit, custom units.
SEED_EDIT_UNITS = {"voltage_units": "V", "current_units": "I", "power_units": "W", "soc_units": "%"}
UNIT_CASES = [
    {},
    SEED_EDIT_UNITS,
    {"voltage_units": "mV", "current_units": "mA", "power_units": "kW", "soc_units": "%"},
    {"voltage_units": "Volts", "current_units": "amps", "power_units": "BTU/h", "soc_units": "percent"},
    {"voltage_units": " ", "current_units": "µA", "power_units": "kVA", "soc_units": "Ah"},
]


@pytest.mark.parametrize("units", UNIT_CASES, ids=lambda u: ",".join(u.values()) or "defaults")
def test_every_payload_passes_home_assistants_discovery_rules(units: dict[str, str]) -> None:
    for topics in (TOPICS, Topics(base="site/a", discovery_prefix="ha")):
        payload = json.loads(json.dumps(discovery_payload(a_batmon(**units), topics)))
        assert discovery_problems(payload) == []


def test_the_rules_check_refuses_what_home_assistant_refuses() -> None:
    good = json.loads(json.dumps(discovery_payload(a_batmon(), TOPICS)))
    current_as_i = json.loads(json.dumps(good))
    current_as_i["cmps"]["current"]["unit_of_measurement"] = "I"
    assert discovery_problems(current_as_i) == ["current: unit 'I' is not valid with device class 'current'"]
    root_qos = json.loads(json.dumps(good))
    for component in root_qos["cmps"].values():
        del component["qos"]
    root_qos["qos"] = 1
    assert len(discovery_problems(root_qos)) == len(root_qos["cmps"])
    both = {**good, "availability_topic": TOPICS.availability(1)}
    assert discovery_problems(both) == ["availability and availability_topic are exclusive"]
    no_id = {**good, "dev": {"name": "no id"}}
    assert discovery_problems(no_id) == ["device: needs identifiers or connections"]
    typo = json.loads(json.dumps(good))
    typo["cmps"]["soc"]["unit_of_measure"] = "%"
    assert discovery_problems(typo) == ["soc: unknown option 'unit_of_measure' (Home Assistant drops it)"]


def test_value_templates_read_keys_the_state_topic_carries() -> None:
    batmon = a_batmon()
    state = state_payload(batmon)
    for component in discovery_payload(batmon, TOPICS)["cmps"].values():
        [key] = re.findall(r"value_json\.(\w+)", component["value_template"])
        assert key in state


def test_home_assistant_online_resends_every_config_and_offline_does_not() -> None:
    core = SimpleNamespace(batmons={1: a_batmon(id=1), 2: a_batmon(id=2)})
    sent: list[tuple[str, str]] = []
    glue = HomeAssistantDiscovery(core, TOPICS, lambda topic, payload: sent.append((topic, payload)))  # type: ignore[arg-type]
    glue.on_homeassistant_status(b"offline")
    assert sent == []
    glue.on_homeassistant_status(b"online")
    assert [topic for topic, _ in sent] == [TOPICS.discovery(1), TOPICS.discovery(2)]
    assert json.loads(sent[0][1])["dev"]["identifiers"] == ["batmon_1"]


# -- on a real broker -------------------------------------------------------------
def test_config_is_retained_on_the_discovery_topic(env: Env) -> None:
    batmon = env.add_batmon()
    env.bridge()
    config = wait_until(lambda: retained(env.port, env.topics.discovery(batmon.id)), what="config retained")
    prefix = env.topics.discovery_prefix
    assert env.topics.discovery(batmon.id) == f"{prefix}/device/batmon_{batmon.id}/config"
    assert payload_json(config) == discovery_payload(batmon, env.topics)


def test_a_batmon_added_while_running_is_announced(env: Env) -> None:
    env.bridge()
    watcher = env.probe(f"{env.topics.discovery_prefix}/#")
    batmon = env.add_batmon(batmon_name="Starter battery")
    config = watcher.wait_for(env.topics.discovery(batmon.id))
    assert payload_json(config)["dev"]["name"] == "Starter battery"


def test_config_is_sent_again_when_home_assistant_comes_online(env: Env) -> None:
    batmon = env.add_batmon()
    env.bridge()
    watcher = env.probe(env.topics.discovery(batmon.id))
    watcher.wait_count(env.topics.discovery(batmon.id), 1)  # the retained one
    watcher.publish(env.topics.homeassistant_status, b"online")
    again = watcher.wait_count(env.topics.discovery(batmon.id), 2)[-1]
    assert not again.retain  # sent now, not replayed by the broker
    assert payload_json(again) == discovery_payload(batmon, env.topics)


def test_config_follows_an_edit_of_the_units(env: Env) -> None:
    batmon = env.add_batmon()
    env.bridge()
    watcher = env.probe(env.topics.discovery(batmon.id))
    env.loop.call(env.core.edit_batmon, batmon, EditBatmon(batmon_id=batmon.id, voltage_units="mV"))
    watcher.wait_for(env.topics.discovery(batmon.id),
                     lambda m: payload_json(m)["cmps"]["voltage"]["unit_of_measurement"] == "mV")  # fmt: skip
    config = retained(env.port, env.topics.discovery(batmon.id))
    assert config is not None and payload_json(config)["cmps"]["voltage"]["unit_of_measurement"] == "mV"


def test_config_is_emptied_when_the_batmon_is_deleted(env: Env) -> None:
    batmon = env.add_batmon()
    env.bridge()
    wait_until(lambda: retained(env.port, env.topics.discovery(batmon.id)), what="config retained")
    env.loop.run(env.core.delete_batmon(batmon))
    wait_until(lambda: retained(env.port, env.topics.discovery(batmon.id)) is None, what="config emptied")


def test_no_config_when_discovery_is_off(env: Env) -> None:
    batmon = env.add_batmon()
    env.bridge(discovery=False)
    # On connect a config would be published before the state.
    wait_until(lambda: retained(env.port, env.topics.state(batmon.id)), what="state retained")
    assert retained(env.port, env.topics.discovery(batmon.id)) is None
