"""What Home Assistant's MQTT integration does, encoded from its source, in one place.

- the discovery subscriptions it makes (``DISCOVERY_FILTERS``);
- the rules its discovery schema applies to a device-based config (``discovery_problems``).

A homeassistant wheel with device-based discovery (2024.11+) needs Python 3.12+, and this
project runs on 3.11: its schema cannot be imported here, so its rules are written down,
each with the source it comes from. Read, not copied.
"""

from __future__ import annotations

from typing import Any

from bridge.extensions.ha_units import DEVICE_CLASS_UNITS

HA = "https://github.com/home-assistant/core/blob/dev/homeassistant/components/mqtt"

# SUPPORTED_COMPONENTS of homeassistant/components/mqtt/const.py (releases 2024.11-2026.x):
# {HA}/const.py
SUPPORTED_COMPONENTS = (
    "alarm_control_panel", "binary_sensor", "button", "camera", "climate", "cover", "date",
    "datetime", "device_automation", "device_tracker", "event", "fan", "humidifier", "image",
    "lawn_mower", "light", "lock", "notify", "number", "scene", "siren", "select", "sensor",
    "switch", "tag", "text", "time", "update", "vacuum", "valve", "water_heater",
)  # fmt: skip


def discovery_filters(prefix: str = "homeassistant") -> list[str]:
    """Every filter Home Assistant subscribes to for MQTT discovery, in its order.

    {HA}/discovery.py ``async_start``: per component ``{prefix}/{component}/+/config``,
    then ``{prefix}/{component}/+/+/config``, then the same two for ``device``. Asserted
    exactly by ``test_subscribing_config_topic`` in
    https://github.com/home-assistant/core/blob/dev/tests/components/mqtt/test_discovery.py
    """
    return [
        *(f"{prefix}/{component}/+/config" for component in SUPPORTED_COMPONENTS),
        *(f"{prefix}/{component}/+/+/config" for component in SUPPORTED_COMPONENTS),
        f"{prefix}/device/+/config",
        f"{prefix}/device/+/+/config",
    ]


DISCOVERY_FILTERS = discovery_filters()

# {HA}/abbreviations.py: the abbreviations a payload may use for the keys we send.
ABBREVIATIONS = {
    "avty": "availability", "avty_mode": "availability_mode", "avty_t": "availability_topic",
    "cmps": "components", "dev": "device", "dev_cla": "device_class", "exp_aft": "expire_after",
    "o": "origin", "p": "platform", "pl_avail": "payload_available",
    "pl_not_avail": "payload_not_available", "stat_cla": "state_class", "stat_t": "state_topic",
    "t": "topic", "uniq_id": "unique_id", "unit_of_meas": "unit_of_measurement",
    "val_tpl": "value_template",
}  # fmt: skip
DEVICE_ABBREVIATIONS = {"ids": "identifiers", "mf": "manufacturer", "mdl": "model", "sw": "sw_version"}
ORIGIN_ABBREVIATIONS = {"sw": "sw_version", "url": "support_url"}

# {HA}/schemas.py SHARED_OPTIONS: the only root options a component inherits.
SHARED_OPTIONS = (
    "availability", "availability_mode", "availability_template", "availability_topic",
    "command_topic", "payload_available", "payload_not_available", "state_topic",
)  # fmt: skip
AVAILABILITY_MODES = ("all", "any", "latest")  # {HA}/const.py
# Sensor options (``_PLATFORM_SCHEMA_BASE`` of {HA}/sensor.py plus MQTT_RO_SCHEMA and
# MQTT_ENTITY_COMMON_SCHEMA): others are dropped silently, which hides typos.
SENSOR_OPTIONS = frozenset({
    "platform", "name", "device_class", "state_class", "unit_of_measurement", "value_template",
    "unique_id", "expire_after", "qos", "state_topic", "force_update", "icon", "encoding",
    "enabled_by_default", "entity_category", "json_attributes_topic", "json_attributes_template",
    "object_id", "default_entity_id", "suggested_display_precision", "options",
    "last_reset_value_template", "entity_picture", *SHARED_OPTIONS,
})  # fmt: skip
SENSOR_STATE_CLASSES = ("measurement", "measurement_angle", "total", "total_increasing")
SENSOR = "https://github.com/home-assistant/core/blob/dev/homeassistant/components/sensor"
# DEVICE_CLASS_STATE_CLASSES of {SENSOR}/const.py for the classes we send. Another state
# class with them is "impossible considering device class" ({SENSOR}/__init__.py, state
# validation: a warning in 2025.1, meant to become an error), and a statistic built on it
# is wrong; a timestamp (NON_NUMERIC_DEVICE_CLASSES) with a unit raises there. Read in the
# homeassistant 2025.1.4 wheel that tests/real_home_assistant.py runs.
DEVICE_CLASS_STATE_CLASSES = {
    "voltage": {"measurement"}, "current": {"measurement"}, "power": {"measurement"},
    "battery": {"measurement"}, "temperature": {"measurement"},
    "energy": {"total", "total_increasing"}, "duration": {"measurement", "total", "total_increasing"},
    "timestamp": set(),
}  # fmt: skip
# What the Energy dashboard takes as a battery's energy in / out:
# https://github.com/home-assistant/core/blob/dev/homeassistant/components/energy/validate.py
# (_async_validate_usage_stat: ENERGY_USAGE_DEVICE_CLASSES = energy, ENERGY_USAGE_UNITS,
# state_class total or total_increasing, else "entity_unexpected_*"). The units: those of
# every release since 2024.11 (later ones added GJ, MJ...).
ENERGY_SOURCE_UNITS = ("Wh", "kWh", "MWh")
ENERGY_SOURCE_STATE_CLASSES = ("total", "total_increasing")


def energy_source_problems(component: dict[str, Any]) -> list[str]:
    """Why the Energy dashboard would refuse this sensor as a battery source; [] if none."""
    config = _expand(component, ABBREVIATIONS)
    problems = []
    if config.get("device_class") != "energy":
        problems.append(f"device_class {config.get('device_class')!r}: the dashboard wants 'energy'")
    if config.get("unit_of_measurement") not in ENERGY_SOURCE_UNITS:
        problems.append(f"unit {config.get('unit_of_measurement')!r} not one of {ENERGY_SOURCE_UNITS}")
    if config.get("state_class") not in ENERGY_SOURCE_STATE_CLASSES:
        problems.append(f"state_class {config.get('state_class')!r}: no statistics with a sum")
    return problems


def _expand(config: dict[str, Any], table: dict[str, str]) -> dict[str, Any]:
    return {table.get(key, key): value for key, value in config.items()}


def _topic_problem(where: str, topic: Any) -> str | None:
    if not isinstance(topic, str) or not topic or "\0" in topic or len(topic.encode()) > 65535:
        return f"{where}: {topic!r} is not a topic"
    # {HA}/util.py valid_subscribe_topic: wildcards only as whole levels, '#' last.
    levels = topic.split("/")
    for index, level in enumerate(levels):
        if ("+" in level or "#" in level) and level not in ("+", "#"):
            return f"{where}: {topic!r} uses a wildcard inside a level"
        if level == "#" and index != len(levels) - 1:
            return f"{where}: {topic!r} has '#' before the last level"
    return None


def discovery_problems(payload: dict[str, Any]) -> list[str]:
    """Why Home Assistant would refuse (or half-use) this device-based config; [] if none.

    DEVICE_DISCOVERY_SCHEMA of {HA}/schemas.py, the merge of SHARED_OPTIONS into each
    component in {HA}/discovery.py, then each sensor through DISCOVERY_SCHEMA and
    ``validate_sensor_state_and_device_class_config`` of {HA}/sensor.py.
    """
    problems: list[str] = []
    root = _expand(payload, ABBREVIATIONS)
    device = root.get("device")
    if not isinstance(device, dict):
        return ["device: missing"]
    device = _expand(device, DEVICE_ABBREVIATIONS)
    if not (device.get("identifiers") or device.get("connections")):
        problems.append("device: needs identifiers or connections")
    for key in ("name", "model", "manufacturer", "sw_version"):
        if key in device and not isinstance(device[key], str):
            problems.append(f"device.{key}: not a string")
    origin = root.get("origin")
    if not isinstance(origin, dict) or not isinstance(_expand(origin, ORIGIN_ABBREVIATIONS).get("name"), str):
        problems.append("origin: required, with a name")
    if "availability" in root and "availability_topic" in root:
        problems.append("availability and availability_topic are exclusive")
    if root.get("availability_mode", "latest") not in AVAILABILITY_MODES:
        problems.append(f"availability_mode: {root['availability_mode']!r} not one of {AVAILABILITY_MODES}")
    if "qos" in root and root["qos"] not in (0, 1, 2):
        problems.append("qos: must be 0, 1 or 2")
    for entry in root.get("availability", []) if isinstance(root.get("availability"), list) else [None]:
        if not isinstance(entry, dict):
            problems.append("availability: must be a list of mappings")
            continue
        entry = _expand(entry, ABBREVIATIONS)
        if problem := _topic_problem("availability.topic", entry.get("topic")):
            problems.append(problem)
    if "state_topic" in root and (problem := _topic_problem("state_topic", root["state_topic"])):
        problems.append(problem)
    components = root.get("components")
    if not isinstance(components, dict) or not components:
        return [*problems, "components: required, a mapping"]
    for object_id, raw in components.items():
        if not isinstance(raw, dict):
            problems.append(f"{object_id}: not a mapping")
            continue
        component = _expand(raw, ABBREVIATIONS)
        platform = component.get("platform")
        if platform not in SUPPORTED_COMPONENTS:
            problems.append(f"{object_id}: platform {platform!r} not supported")
            continue
        for option in SHARED_OPTIONS:
            if option in root and option not in component:
                component[option] = root[option]
        if platform == "sensor":
            problems += [f"{object_id}: {p}" for p in _sensor_problems(component)]
    return problems


def _sensor_problems(config: dict[str, Any]) -> list[str]:
    problems = [f"unknown option {key!r} (Home Assistant drops it)" for key in config
                if key not in SENSOR_OPTIONS]  # fmt: skip
    if problem := _topic_problem("state_topic", config.get("state_topic")):
        problems.append(problem)
    if "qos" not in config:
        problems.append("no qos: Home Assistant subscribes to the state topic at QoS 0")
    elif config["qos"] not in (0, 1, 2):
        problems.append("qos: must be 0, 1 or 2")
    if (expire := config.get("expire_after")) is not None and (not isinstance(expire, int) or expire < 0):
        problems.append("expire_after: must be a positive integer")
    if (state_class := config.get("state_class")) is not None and state_class not in SENSOR_STATE_CLASSES:
        problems.append(f"state_class {state_class!r} unknown")
    unit = config.get("unit_of_measurement")
    if isinstance(unit, str) and not unit.strip():
        unit = None  # Home Assistant drops a blank unit
    device_class = config.get("device_class")
    allowed_classes = DEVICE_CLASS_STATE_CLASSES.get(device_class or "")
    if allowed_classes is not None and state_class is not None and state_class not in allowed_classes:
        problems.append(f"state_class {state_class!r} is not valid with device class {device_class!r}")
    if device_class == "timestamp" and unit is not None:
        problems.append("a timestamp sensor takes no unit")
    if device_class is not None and unit is not None:
        allowed = DEVICE_CLASS_UNITS.get(device_class)
        if allowed is not None and unit not in allowed:
            problems.append(f"unit {unit!r} is not valid with device class {device_class!r}")
    return problems
