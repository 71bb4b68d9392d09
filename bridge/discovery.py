"""Home Assistant MQTT discovery: one retained device config per batmon.

Uses the device-based schema (``dev``, ``o``, ``cmps``) on
``<prefix>/device/batmon_{id}/config`` so one message describes a batmon's four
sensors. :func:`discovery_payload` is pure; :class:`HomeAssistantDiscovery` is the
glue that republishes it on edits, clears it on delete and answers Home
Assistant's ``online`` birth message.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from importlib import metadata
from typing import TYPE_CHECKING, Any

from bridge.events import NO_SUBSCRIPTION, BatmonChanged, BatmonDeleted, Subscription
from bridge.topics import Topics

if TYPE_CHECKING:
    from bridge.core import Batmon, Core

ORIGIN_NAME = "batmon-bridge"
MANUFACTURER = "batmon"
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
    """The device-based discovery config of one batmon."""
    components = {
        metric: {
            "p": "sensor",
            "name": name,
            "device_class": device_class,
            "state_class": "measurement",
            "unit_of_measurement": batmon.unit(metric),
            "value_template": f"{{{{ value_json.batmon_{metric} }}}}",
            "unique_id": f"batmon_{batmon.id}_{metric}",
            "expire_after": expire_after(batmon.update_period),
        }
        for metric, name, device_class in SENSORS
    }
    return {
        "dev": {
            "identifiers": [f"batmon_{batmon.id}"],
            "name": batmon.name,
            "model": batmon.type,
            "manufacturer": MANUFACTURER,
        },
        "o": {"name": ORIGIN_NAME, "sw_version": _version()},
        "cmps": components,
        # Shared by every component (the schema allows state_topic, qos and availability).
        "state_topic": topics.state(batmon.id),
        "availability_topic": topics.availability(batmon.id),
        "payload_available": "online",
        "payload_not_available": "offline",
        "qos": 1,
    }


class HomeAssistantDiscovery:
    """Publishes, updates and clears the retained discovery configs as batmons change."""

    def __init__(self, core: Core, topics: Topics, publish: Callable[[str, str], None]) -> None:
        self.core = core
        self._subscription: Subscription = NO_SUBSCRIPTION
        self.topics = topics
        self.publish = publish

    def start(self) -> None:
        """React to created, edited and deleted batmons."""
        self._subscription = self.core.bus.subscribe_all(
            {BatmonChanged: self._on_changed, BatmonDeleted: self._on_deleted}
        )

    def stop(self) -> None:
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

    def _on_changed(self, event: BatmonChanged) -> None:
        self.publish_discovery(event.batmon)

    def _on_deleted(self, event: BatmonDeleted) -> None:
        self.remove(event.batmon.id)
