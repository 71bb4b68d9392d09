"""A bank on MQTT: its retained state and availability, and its own Home Assistant device.

Reacts to its members' events (readings, status changes, edits) and to the banks' own
(created, edited, deleted). After readings the state is coalesced per bank, as a batmon's
is (``COALESCE_S``); a member's status change, an edit or a delete goes out at once. What
is published is only what changed since the last send (digests, not payloads).
:func:`bank_discovery_payload` is pure, like :func:`discovery_payload` for batmons.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bridge.banks import Bank
from bridge.events import (
    NO_SUBSCRIPTION,
    BankChanged,
    BankDeleted,
    BatmonChanged,
    MqttConnected,
    ReadingAccepted,
    StatusChanged,
    Subscription,
)
from bridge.extensions.discovery import MANUFACTURER, ORIGIN_NAME, QOS, _version, expire_after
from bridge.topics import Topics

if TYPE_CHECKING:
    from bridge.core import Core

COALESCE_S = 0.25
BANK_MODEL = "battery bank"
DEFAULT_PERIOD_S = 300  # a bank without members expires like a batmon of the default period
# (key in ``cmps`` and unique_id suffix, name, device_class, unit, state_class, state key)
SENSORS = (
    ("soc", "Battery", "battery", "%", "measurement", "bank_soc"),
    ("voltage", "Voltage", "voltage", "V", "measurement", "bank_voltage"),
    ("current", "Current", "current", "A", "measurement", "bank_current"),
    ("power", "Power", "power", "W", "measurement", "bank_power"),
)
# The bank's sums move both ways when its members change, so they are `total`, not
# `total_increasing` (a fall would read as a meter reset and add the whole sum again).
# For the Energy dashboard, use each batmon's own counters: adding the bank too counts twice.
ENERGY_SENSORS = (
    ("energy_charged", "Energy charged", "energy_charged_kwh"),
    ("energy_discharged", "Energy discharged", "energy_discharged_kwh"),
)


def bank_discovery_payload(bank: Bank, state: dict[str, Any], update_period: int,
                           topics: Topics) -> dict[str, Any]:  # fmt: skip
    """The bank's device-based discovery config: SoC, voltage, current, power, and the
    energy sums once a member has counters (no empty sensors before)."""
    components: dict[str, Any] = {}
    common = {"expire_after": expire_after(update_period), "qos": QOS}
    for key, name, device_class, unit, state_class, field in SENSORS:
        components[key] = {
            "p": "sensor", "name": name, "device_class": device_class, "state_class": state_class,
            "unit_of_measurement": unit, "value_template": f"{{{{ value_json.{field} }}}}",
            "unique_id": f"batmon_bank_{bank.id}_{key}", **common,
        }  # fmt: skip
    for key, name, field in ENERGY_SENSORS:
        if state.get(field) is None:
            continue
        components[key] = {
            "p": "sensor", "name": name, "device_class": "energy", "state_class": "total",
            "unit_of_measurement": "kWh", "value_template": f"{{{{ value_json.{field} }}}}",
            "unique_id": f"batmon_bank_{bank.id}_{key}", "qos": QOS,
        }  # fmt: skip
    return {
        "dev": {
            "identifiers": [f"batmon_bank_{bank.id}"],
            "name": bank.name,
            "model": BANK_MODEL,
            "manufacturer": MANUFACTURER,
        },
        "o": {"name": ORIGIN_NAME, "sw_version": _version()},
        "cmps": components,
        "state_topic": topics.bank_state(bank.id),
        "availability": [
            {"topic": topic, "payload_available": "online", "payload_not_available": "offline"}
            for topic in (topics.bridge_state, topics.bank_availability(bank.id))
        ],
        "availability_mode": "all",
    }


class BankPublisher:
    """Keeps every bank's retained topics (and, with discovery, its device) current."""

    def __init__(self, core: Core, topics: Topics, publish: Callable[[str, str], None],
                 discovery: bool = True) -> None:  # fmt: skip
        self.core = core
        self.topics = topics
        self.publish = publish
        self.discovery = discovery
        self._subscription: Subscription = NO_SUBSCRIPTION
        self._last: dict[str, int] = {}  # topic -> digest of what was last sent there
        self._sent_at: dict[int, float] = {}
        self._due: dict[int, asyncio.TimerHandle] = {}

    async def start(self) -> None:
        """Publish every bank after each MQTT (re)connect; react to the banks' and their
        members' events."""
        self._subscription = self.core.bus.subscribe_all({
            MqttConnected: lambda e: self.publish_all(),
            ReadingAccepted: self._on_reading,
            StatusChanged: lambda e: self._members_changed(e.batmon.id),
            BatmonChanged: lambda e: self._members_changed(e.batmon.id),
            BankChanged: lambda e: self.publish_bank(e.bank),
            BankDeleted: self._on_deleted,
        })  # fmt: skip

    async def stop(self) -> None:
        """Stop reacting; pending coalesced publishes are dropped."""
        self._subscription.cancel()
        for handle in self._due.values():
            handle.cancel()
        self._due.clear()

    def publish_all(self) -> None:
        """Send every bank's topics afresh (after each (re)connect)."""
        self._last.clear()
        for bank in self.core.banks.all():
            self.publish_bank(bank)

    def resend_discovery(self, user_id: int | None = None) -> None:
        """Send the configs of ``user_id``'s banks again (None: every bank): Home Assistant
        restarted. HomeAssistantDiscovery decides when, by its per-user interval."""
        if not self.discovery:
            return
        for bank in self.core.banks.all():
            if user_id is None or bank.user_id == user_id:
                self._last.pop(self.topics.bank_discovery(bank.id), None)
                self.publish_bank(bank)

    def publish_bank(self, bank: Bank) -> None:
        """Send whichever of the bank's state, availability and config changed."""
        if self.core.banks.get(bank.id) is not bank:
            return  # deleted meanwhile
        self._sent_at[bank.id] = time.monotonic()
        state = self.core.banks.status(bank)
        self._send(self.topics.bank_state(bank.id), json.dumps(state))
        online = state["bank_status"] == "Online"
        self._send(self.topics.bank_availability(bank.id), "online" if online else "offline")
        if self.discovery:
            periods = [self.core.batmons[i].update_period for i in bank.batmon_ids if i in self.core.batmons]
            config = bank_discovery_payload(bank, state, max(periods, default=DEFAULT_PERIOD_S), self.topics)
            self._send(self.topics.bank_discovery(bank.id), json.dumps(config))

    def _send(self, topic: str, payload: str) -> None:
        digest = hash(payload)
        if self._last.get(topic) != digest:
            self._last[topic] = digest
            self.publish(topic, payload)

    def _on_reading(self, event: ReadingAccepted) -> None:
        if not event.current:
            return
        for bank in self.core.banks.containing(event.batmon.id):
            self._state_soon(bank)

    def _members_changed(self, batmon_id: int) -> None:
        for bank in self.core.banks.containing(batmon_id):
            self.publish_bank(bank)

    def _state_soon(self, bank: Bank) -> None:
        if bank.id in self._due:
            return  # the publish already scheduled will carry these values
        wait = self._sent_at.get(bank.id, -COALESCE_S) + COALESCE_S - time.monotonic()
        if wait <= 0:
            self.publish_bank(bank)
            return
        self._due[bank.id] = asyncio.get_running_loop().call_later(wait, self._flush, bank)

    def _flush(self, bank: Bank) -> None:
        self._due.pop(bank.id, None)
        self.publish_bank(bank)

    def _on_deleted(self, event: BankDeleted) -> None:
        bank_id = event.bank.id
        handle = self._due.pop(bank_id, None)
        if handle is not None:
            handle.cancel()
        self._sent_at.pop(bank_id, None)
        topics = [self.topics.bank_state(bank_id), self.topics.bank_availability(bank_id)]
        if self.discovery:
            topics.insert(0, self.topics.bank_discovery(bank_id))
        for topic in topics:
            self._last.pop(topic, None)
            self.publish(topic, "")
