"""Home Assistant MQTT discovery: one retained device config per batmon.

Uses the device-based schema (``dev``, ``o``, ``cmps``) on
``<prefix>/device/batmon_{id}/config`` so one message describes a batmon's
sensors: the four base metrics, the energy counters, last seen, and temperature,
time-to-go and cell delta once the batmon has sent them. :func:`discovery_payload`
is pure; :class:`HomeAssistantDiscovery` is the extension that publishes every config
after each MQTT (re)connect, republishes one on edits and on a first value, clears it
on delete and answers Home Assistant's ``online`` birth message (the
``HomeAssistantStatus`` event: from the embedded broker, which names the user, or from
the MQTT link on an external broker).

An ``online`` is answered at most once per ``RESEND_INTERVAL_S`` per user (the embedded
broker says who published it: only that user's configs go out) or, on an external
broker where nobody can say, once per interval for everyone. An ``online`` inside the
interval is answered once at its end, so a Home Assistant that restarts twice quickly
still gets its configs; a flood of them costs one re-send per interval.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Sequence
from importlib import metadata
from typing import TYPE_CHECKING, Any, Protocol

from bridge.battery_values import battery_values
from bridge.events import (
    NO_SUBSCRIPTION,
    BatmonChanged,
    BatmonDeleted,
    HomeAssistantStatus,
    MqttConnected,
    ReadingAccepted,
    Subscription,
)
from bridge.extensions.ha_units import device_class_for_unit
from bridge.topics import Topics

if TYPE_CHECKING:
    from bridge.core import Batmon, Core

ORIGIN_NAME = "batmon-bridge"
MANUFACTURER = "batmon"
RESEND_INTERVAL_S = 30.0
"""At most one re-send of a user's configs (external broker: of all configs) this often."""
RESEND_BATCH = 100
"""Configs published between yields to the event loop during a re-send."""
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


class SharedTurns(Protocol):
    """Several workers on one database (bridge/extensions/peers.py): which one sends."""

    async def first_to_send(self, batmon_id: int, digest: str) -> bool:
        """True for the one worker whose send records this new config."""

    async def take_turn(self, name: str, every_s: float) -> bool:
        """True for the one worker taking the turn ``name`` in ``every_s``."""

    async def record_sent(self, digests: Sequence[tuple[int, str]]) -> None:
        """These configs went out in a re-send."""


def digest(payload: str) -> str:
    """What tells one config from another, across workers."""
    return hashlib.sha256(payload.encode()).hexdigest()


class HomeAssistantDiscovery:
    """Publishes, updates and clears the retained discovery configs as batmons change.

    With ``shared`` (several workers on one database) a config is sent once per change, by the
    worker whose record of it in the database changes it, and a re-send of every config (after
    a connect, Home Assistant's birth) by one worker per interval: not once per worker.
    """

    def __init__(
        self,
        core: Core,
        topics: Topics,
        publish: Callable[[str, str], None],
        *,
        resend_interval_s: float = RESEND_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        also_resend: Callable[[int | None], None] | None = None,
        shared: SharedTurns | None = None,
    ) -> None:
        """``also_resend(user_id)`` sends other configs of that user (None: everyone's), such
        as banks', whenever this re-sends the batmons': one rule for when."""
        self.core = core
        self._subscription: Subscription = NO_SUBSCRIPTION
        self.topics = topics
        self.publish = publish
        # Optional sensors announced per batmon during this run: a sensor, once there,
        # stays (a reading without the value does not remove the entity).
        self._announced: dict[int, frozenset[str]] = {}
        self._resend_interval_s = resend_interval_s
        self._clock = clock
        self._also_resend = also_resend
        # Per user id (None: everyone, on an external broker): when its configs last went
        # out for an ``online``, and the re-send waiting for the end of that interval.
        self._resent_at: dict[int | None, float] = {}
        self._deferred: dict[int | None, asyncio.TimerHandle] = {}
        self._batches: set[asyncio.Task[None]] = set()
        self._shared = shared
        self.counters: Counter[str] = Counter()
        """``online`` messages answered at once, deferred, or folded into a deferred re-send."""

    async def start(self) -> None:
        """React to (re)connects, Home Assistant's birth, created, edited and deleted batmons,
        and to readings that bring a new value."""
        self._subscription = self.core.bus.subscribe_all({
            MqttConnected: self._on_connected,
            HomeAssistantStatus: self._on_homeassistant_status,
            BatmonChanged: self._on_changed,
            BatmonDeleted: self._on_deleted,
            ReadingAccepted: self._on_reading,
        })  # fmt: skip

    async def stop(self) -> None:
        """Stop reacting to events and drop the re-sends not yet done."""
        self._subscription.cancel()
        for handle in self._deferred.values():
            handle.cancel()
        self._deferred.clear()
        batches = list(self._batches)
        for task in batches:
            task.cancel()
        await asyncio.gather(*batches, return_exceptions=True)

    def publish_all(self) -> None:
        """Send every batmon's config (after a (re)connect); shared: if this worker's turn."""
        if self._shared is None:
            for batmon in list(self.core.batmons.values()):
                self.publish_discovery(batmon)
        else:
            self._spawn(self._publish_all_if_turn(self._shared))

    async def _publish_all_if_turn(self, shared: SharedTurns) -> None:
        if await shared.take_turn("discovery:connect", self._resend_interval_s):
            sent = [(b.id, self.publish_discovery(b, resend=True)) for b in list(self.core.batmons.values())]
            await shared.record_sent(sent)

    def publish_discovery(self, batmon: Batmon, *, resend: bool = False) -> str:
        """Send one batmon's config, retained (shared and not a re-send: if this worker's send
        is the one that records it); its digest."""
        optional = self._announced.get(batmon.id, frozenset()) | present_optional(batmon)
        self._announced[batmon.id] = optional
        payload = json.dumps(discovery_payload(batmon, self.topics, optional))
        topic, mark = self.topics.discovery(batmon.id), digest(payload)
        if self._shared is None or resend:
            self.publish(topic, payload)
        else:
            self._spawn(self._publish_if_first(self._shared, batmon.id, topic, payload, mark))
        return mark

    async def _publish_if_first(self, shared: SharedTurns, batmon_id: int, topic: str, payload: str,
                                mark: str) -> None:  # fmt: skip
        if await shared.first_to_send(batmon_id, mark) and batmon_id in self.core.batmons:
            self.publish(topic, payload)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    def remove(self, batmon_id: int) -> None:
        """Clear the retained config: Home Assistant then removes the device."""
        self.publish(self.topics.discovery(batmon_id), "")

    def on_homeassistant_status(self, payload: bytes, user_id: int | None = None) -> None:
        """Home Assistant (re)started (``online``): send the configs of ``user_id``'s batmons
        again (None: every batmon), at most once per interval (see the module docstring)."""
        if payload.strip() != b"online":
            return
        now = self._clock()
        last = self._resent_at.get(user_id)
        if last is None or now - last >= self._resend_interval_s:
            self.counters["homeassistant_online_answered"] += 1
            self._resend(user_id)
            return
        if user_id in self._deferred:
            self.counters["homeassistant_online_folded"] += 1
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop to defer on (a synchronous caller): the retained configs stand
            return
        self.counters["homeassistant_online_deferred"] += 1
        wait = last + self._resend_interval_s - now
        self._deferred[user_id] = loop.call_later(wait, self._deferred_resend, user_id)

    def _deferred_resend(self, user_id: int | None) -> None:
        self._deferred.pop(user_id, None)
        self._resend(user_id)

    def _resend(self, user_id: int | None) -> None:
        """Send the configs of one user's batmons (None: all), a batch now and the rest in
        batches that yield to the loop: 10,000 configs do not hold ingest back. Shared: only
        if this worker takes the turn (one worker per interval and user)."""
        self._resent_at[user_id] = self._clock()
        if self._shared is not None:
            self._spawn(self._resend_if_turn(self._shared, user_id))
            return
        self._resend_now(user_id)

    async def _resend_if_turn(self, shared: SharedTurns, user_id: int | None) -> None:
        if await shared.take_turn(f"discovery:birth:{user_id}", self._resend_interval_s):
            self._resend_now(user_id)

    def _resend_now(self, user_id: int | None) -> None:
        batmons = [b for b in list(self.core.batmons.values()) if user_id is None or b.user_id == user_id]
        first, rest = batmons[:RESEND_BATCH], batmons[RESEND_BATCH:]
        for batmon in first:
            self.publish_discovery(batmon, resend=True)
        if self._also_resend is not None:
            self._also_resend(user_id)
        if not rest:
            return
        try:
            task = asyncio.get_running_loop().create_task(self._publish_in_batches(rest))
        except RuntimeError:  # no loop: a synchronous caller gets them all now
            for batmon in rest:
                self.publish_discovery(batmon, resend=True)
            return
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _publish_in_batches(self, batmons: Iterable[Batmon]) -> None:
        for index, batmon in enumerate(batmons, 1):
            # Skip a batmon deleted meanwhile: its config was emptied, do not bring it back.
            if self.core.batmons.get(batmon.id) is batmon:
                self.publish_discovery(batmon, resend=True)
            if index % RESEND_BATCH == 0:
                await asyncio.sleep(0)

    def _on_connected(self, event: MqttConnected) -> None:
        self.publish_all()  # the broker may have lost them

    def _on_homeassistant_status(self, event: HomeAssistantStatus) -> None:
        self.on_homeassistant_status(event.payload, event.user_id)

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
