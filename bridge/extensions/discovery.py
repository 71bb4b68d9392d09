"""Home Assistant MQTT discovery: one retained device config per batmon.

Uses the device-based schema (``dev``, ``o``, ``cmps``) on
``<prefix>/device/batmon_{id}/config`` so one message describes a batmon's
sensors: the four base metrics, the energy counters, last seen, and temperature,
time-to-go and cell delta once the batmon has sent them. :func:`discovery_payload`
is pure; :class:`HomeAssistantDiscovery` is the glue that republishes it on edits and
on a first value, clears it on delete and answers Home Assistant's ``online`` birth message.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable
from importlib import metadata
from typing import TYPE_CHECKING, Any

from bridge.battery_values import battery_values
from bridge.events import NO_SUBSCRIPTION, BatmonChanged, BatmonDeleted, ReadingAccepted, Subscription
from bridge.extensions.ha_units import device_class_for_unit
from bridge.topics import Topics

if TYPE_CHECKING:
    from bridge.core import Batmon, Core

ORIGIN_NAME = "batmon-bridge"
MANUFACTURER = "batmon"
QOS = 1  # state topics are retained and published at QoS 1: Home Assistant reads them so
# (metric, component name, device_class); the key in ``cmps`` and the unique_id
# suffix is the metric, so entity ids survive renames and unit edits.
SENSORS = (
    ("voltage", "Voltage", "voltage"),
    ("current", "Current", "current"),
    ("power", "Power", "power"),
    ("soc", "Battery", "battery"),
)
# Every batmon has energy counters (bridge/energy.py): what Home Assistant's Energy
# dashboard takes as a battery's "energy going in / out". (state key, component, name)
ENERGY_SENSORS = (
    ("energy_charged_kwh", "energy_charged", "Energy charged"),
    ("energy_discharged_kwh", "energy_discharged", "Energy discharged"),
)
# Sensors for values a batmon may send or not: each appears with the first reading that
# carries it, never as an empty entity. (value = state key = component, name, class, unit)
OPTIONAL_SENSORS = (
    ("temperature", "Temperature", "temperature", "°C"),
    ("time_to_go", "Time to go", "duration", "min"),
    ("cell_delta", "Cell delta", "voltage", "V"),
)
OPTIONAL_VALUES = frozenset(value for value, *_ in OPTIONAL_SENSORS)


@functools.cache
def _version() -> str:
    try:
        return metadata.version("batmon-bridge")
    except metadata.PackageNotFoundError:
        return "unknown"


def expire_after(update_period: int) -> int:
    """Seconds after which Home Assistant shows a sensor unavailable without news.

    Twice the update period: longer than the watchdog's own deadline (one period),
    so the availability topic stays the signal for a silent device, and this only
    catches what availability cannot, a bridge that died leaving ``online`` retained.
    """
    return 2 * update_period


def present_optional(batmon: Batmon) -> frozenset[str]:
    """The optional sensors' values the batmon has now."""
    return OPTIONAL_VALUES & battery_values(batmon).keys()


def discovery_payload(batmon: Batmon, topics: Topics, optional: Iterable[str] | None = None
                      ) -> dict[str, Any]:  # fmt: skip
    """The device-based discovery config of one batmon, valid for Home Assistant's schema.

    Each component carries its own ``qos`` (a root ``qos`` is not among the options Home
    Assistant shares with components); a unit Home Assistant refuses for a device class
    means no ``device_class`` on that sensor, the unit staying as the user set it.
    ``optional`` names the optional sensors to include (default: those the batmon has now).
    """
    wanted = present_optional(batmon) if optional is None else frozenset(optional)
    components: dict[str, dict[str, Any]] = {}
    for metric, name, device_class in SENSORS:
        unit = batmon.unit(metric)
        component: dict[str, Any] = {"p": "sensor", "name": name}
        if (accepted := device_class_for_unit(device_class, unit)) is not None:
            component["device_class"] = accepted
        component |= {
            "state_class": "measurement",
            "unit_of_measurement": unit,
            "value_template": f"{{{{ value_json.batmon_{metric} }}}}",
            "unique_id": f"batmon_{batmon.id}_{metric}",
            "expire_after": expire_after(batmon.update_period),
            "qos": QOS,
        }
        components[metric] = component
    for key, component_id, name in ENERGY_SENSORS:
        # No expire_after: a counter stays true while the device is silent, and the
        # Energy dashboard must not see it vanish and come back.
        components[component_id] = {
            "p": "sensor", "name": name, "device_class": "energy", "state_class": "total_increasing",
            "unit_of_measurement": "kWh", "value_template": f"{{{{ value_json.{key} }}}}",
            "unique_id": f"batmon_{batmon.id}_{component_id}", "qos": QOS,
        }  # fmt: skip
    for value, name, device_class, unit in OPTIONAL_SENSORS:
        if value in wanted:
            components[value] = {
                "p": "sensor", "name": name, "device_class": device_class,
                "state_class": "measurement", "unit_of_measurement": unit,
                "value_template": f"{{{{ value_json.{value} }}}}",
                "unique_id": f"batmon_{batmon.id}_{value}",
                "expire_after": expire_after(batmon.update_period), "qos": QOS,
            }  # fmt: skip
    components["last_seen"] = {
        "p": "sensor", "name": "Last seen", "device_class": "timestamp",
        "entity_category": "diagnostic", "value_template": "{{ value_json.last_seen }}",
        "unique_id": f"batmon_{batmon.id}_last_seen", "qos": QOS,
    }  # fmt: skip
    return {
        "dev": {
            "identifiers": [f"batmon_{batmon.id}"],
            "name": batmon.name,
            "model": batmon.type,
            "manufacturer": MANUFACTURER,
        },
        "o": {"name": ORIGIN_NAME, "sw_version": _version()},
        "cmps": components,
        # Shared with every component (Home Assistant's SHARED_OPTIONS). Both topics must
        # say online: a bridge that died (its last will) makes every batmon unavailable.
        "state_topic": topics.state(batmon.id),
        "availability": [
            {"topic": topic, "payload_available": "online", "payload_not_available": "offline"}
            for topic in (topics.bridge_state, topics.availability(batmon.id))
        ],
        "availability_mode": "all",
    }


class HomeAssistantDiscovery:
    """Publishes, updates and clears the retained discovery configs as batmons change."""

    def __init__(self, core: Core, topics: Topics, publish: Callable[[str, str], None]) -> None:
        self.core = core
        self._subscription: Subscription = NO_SUBSCRIPTION
        self.topics = topics
        self.publish = publish
        # Optional sensors announced per batmon during this run: a sensor, once there,
        # stays (a reading without the value does not remove the entity).
        self._announced: dict[int, frozenset[str]] = {}

    def start(self) -> None:
        """React to created, edited and deleted batmons, and to readings that bring a new value."""
        self._subscription = self.core.bus.subscribe_all({
            BatmonChanged: self._on_changed, BatmonDeleted: self._on_deleted,
            ReadingAccepted: self._on_reading,
        })  # fmt: skip

    def stop(self) -> None:
        """Stop reacting to events."""
        self._subscription.cancel()

    def publish_all(self) -> None:
        """Send every batmon's config (after a (re)connect or Home Assistant's birth)."""
        for batmon in list(self.core.batmons.values()):
            self.publish_discovery(batmon)

    def publish_discovery(self, batmon: Batmon) -> None:
        """Send one batmon's config, retained."""
        optional = self._announced.get(batmon.id, frozenset()) | present_optional(batmon)
        self._announced[batmon.id] = optional
        payload = json.dumps(discovery_payload(batmon, self.topics, optional))
        self.publish(self.topics.discovery(batmon.id), payload)

    def remove(self, batmon_id: int) -> None:
        """Clear the retained config: Home Assistant then removes the device."""
        self.publish(self.topics.discovery(batmon_id), "")

    def on_homeassistant_status(self, payload: bytes) -> None:
        """Home Assistant restarted (``online``): it needs every config again."""
        if payload.strip() == b"online":
            self.publish_all()

    def _on_changed(self, event: BatmonChanged) -> None:
        self.publish_discovery(event.batmon)

    def _on_deleted(self, event: BatmonDeleted) -> None:
        self._announced.pop(event.batmon.id, None)
        self.remove(event.batmon.id)

    def _on_reading(self, event: ReadingAccepted) -> None:
        if not event.current or "details" not in event.values:
            return  # only details bring optional values
        batmon = event.batmon
        if not present_optional(batmon) <= self._announced.get(batmon.id, frozenset()):
            self.publish_discovery(batmon)
