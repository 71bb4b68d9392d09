"""Home Assistant sees the battery values: energy counters for its Energy dashboard, last
seen, and temperature, time-to-go and cell delta once a batmon sends them.

HA's rules are encoded from its source in tests/home_assistant.py (links there).
"""

from __future__ import annotations

import json
from datetime import datetime

from bridge.extensions.discovery import discovery_payload
from bridge.extensions.state_publisher import state_payload
from tests.home_assistant import discovery_problems, energy_source_problems
from tests.support import Env, payload_json, retained, wait_until
from tests.test_discovery import TOPICS, a_batmon


def test_every_batmon_has_energy_sensors_the_energy_dashboard_accepts() -> None:
    components = discovery_payload(a_batmon(), TOPICS)["cmps"]
    for component_id, key in (("energy_charged", "energy_charged_kwh"),
                              ("energy_discharged", "energy_discharged_kwh")):  # fmt: skip
        sensor = components[component_id]
        assert (sensor["device_class"], sensor["state_class"], sensor["unit_of_measurement"]) == (
            "energy", "total_increasing", "kWh")
        assert sensor["value_template"] == f"{{{{ value_json.{key} }}}}"
        assert "expire_after" not in sensor  # a counter stays true while the device is silent
        assert energy_source_problems(sensor) == []
    assert energy_source_problems(components["power"]) != []  # the check can fail


def test_last_seen_is_a_diagnostic_timestamp_read_from_the_state() -> None:
    batmon = a_batmon(last_reading=1_700_000_000.5)
    sensor = discovery_payload(batmon, TOPICS)["cmps"]["last_seen"]
    assert (sensor["device_class"], sensor["entity_category"]) == ("timestamp", "diagnostic")
    assert "state_class" not in sensor and "unit_of_measurement" not in sensor
    last_seen = state_payload(batmon)["last_seen"]
    assert datetime.fromisoformat(last_seen).timestamp() == 1_700_000_000  # with its zone
    assert state_payload(a_batmon())["last_seen"] is None  # rendered "None": unknown in HA


def test_no_temperature_time_to_go_or_cell_delta_sensor_before_a_value() -> None:
    components = discovery_payload(a_batmon(), TOPICS)["cmps"]
    assert not {"temperature", "time_to_go", "cell_delta"} & components.keys()
    details = json.dumps({"temperature": 21.5, "time_to_go": 95, "cells": [3.3, 3.25]})
    full = discovery_payload(a_batmon(details=details), TOPICS)
    assert full["cmps"]["temperature"]["unit_of_measurement"] == "°C"
    assert full["cmps"]["time_to_go"]["device_class"] == "duration"
    assert full["cmps"]["cell_delta"]["unit_of_measurement"] == "V"
    assert discovery_problems(json.loads(json.dumps(full))) == []
    state = state_payload(a_batmon(details=details))
    assert (state["temperature"], state["time_to_go"], state["cell_delta"]) == (21.5, 95, 0.05)


def test_the_rules_refuse_a_timestamp_with_a_state_class_and_energy_as_measurement() -> None:
    payload = json.loads(json.dumps(discovery_payload(a_batmon(), TOPICS)))
    payload["cmps"]["last_seen"]["state_class"] = "measurement"
    payload["cmps"]["energy_charged"]["state_class"] = "measurement"
    assert sorted(discovery_problems(payload)) == [
        "energy_charged: state_class 'measurement' is not valid with device class 'energy'",
        "last_seen: state_class 'measurement' is not valid with device class 'timestamp'",
    ]


def test_a_sensor_appears_with_the_first_reading_that_carries_its_value(env: Env) -> None:
    batmon = env.add_batmon()
    env.bridge()
    topic = env.topics.discovery(batmon.id)
    first = wait_until(lambda: retained(env.port, topic), what="config retained")
    assert "temperature" not in payload_json(first)["cmps"]
    env.ingest(batmon, voltage=12.9)
    env.ingest(batmon, voltage=12.8, details={"temperature": 18.0})

    def announced() -> dict[str, object] | None:
        config = retained(env.port, topic)
        cmps = payload_json(config)["cmps"] if config is not None else {}
        return cmps if "temperature" in cmps else None

    wait_until(announced, what="temperature sensor announced")
    env.ingest(batmon, details={"other": 1})  # a reading without it keeps the entity
    env.ingest(batmon, voltage=12.7)
    config = retained(env.port, topic)
    assert config is not None and "temperature" in payload_json(config)["cmps"]
    assert "cell_delta" not in payload_json(config)["cmps"]
