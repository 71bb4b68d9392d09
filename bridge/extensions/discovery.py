"""Home Assistant MQTT discovery: one retained device config per batmon.

Uses the device-based schema (``dev``, ``o``, ``cmps``) on
``<prefix>/device/batmon_{id}/config`` so one message describes a batmon's four
sensors. :func:`discovery_payload` is pure; :class:`HomeAssistantDiscovery` is the
extension that publishes every config after each MQTT (re)connect, republishes one
on edits, clears it on delete and answers Home Assistant's ``online`` birth message.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from importlib import metadata
from typing import TYPE_CHECKING, Any

from bridge.events import (
    NO_SUBSCRIPTION,
    BatmonChanged,
    BatmonDeleted,
    HomeAssistantStatus,
    MqttConnected,
    Subscription,
)
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


def discovery_payload(batmon: Batmon, topics: Topics) -> dict[str, Any]:
    """The device-based discovery config of one batmon, valid for Home Assistant's schema.

    Each component carries its own ``qos`` (a root ``qos`` is not among the options Home
    Assistant shares with components); a unit Home Assistant refuses for a device class
    means no ``device_class`` on that sensor, the unit staying as the user set it.
    """
    components = {}
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

    async def start(self) -> None:
        """React to (re)connects, Home Assistant's birth, created, edited and deleted batmons."""
        self._subscription = self.core.bus.subscribe_all({
            MqttConnected: self._on_connected,
            HomeAssistantStatus: self._on_homeassistant_status,
            BatmonChanged: self._on_changed,
            BatmonDeleted: self._on_deleted,
        })  # fmt: skip

    async def stop(self) -> None:
        """Stop reacting to events."""
        self._subscription.cancel()

    def publish_all(self) -> None:
        """Send every batmon's config (after a (re)connect or Home Assistant's birth)."""
        for batmon in list(self.core.batmons.values()):
            self.publish_discovery(batmon)

    def publish_discovery(self, batmon: Batmon) -> None:
        """Send one batmon's config, retained."""
        payload = json.dumps(discovery_payload(batmon, self.topics))
        self.publish(self.topics.discovery(batmon.id), payload)

    def remove(self, batmon_id: int) -> None:
        """Clear the retained config: Home Assistant then removes the device."""
        self.publish(self.topics.discovery(batmon_id), "")

    def on_homeassistant_status(self, payload: bytes) -> None:
        """Home Assistant restarted (``online``): it needs every config again."""
        if payload.strip() == b"online":
            self.publish_all()

    def _on_connected(self, event: MqttConnected) -> None:
        self.publish_all()  # the broker may have lost them

    def _on_homeassistant_status(self, event: HomeAssistantStatus) -> None:
        self.on_homeassistant_status(event.payload)

    def _on_changed(self, event: BatmonChanged) -> None:
        self.publish_discovery(event.batmon)

    def _on_deleted(self, event: BatmonDeleted) -> None:
        self.remove(event.batmon.id)
