"""Retained state topics: each batmon's ``state`` (current values) and ``availability``
(online/offline), kept in step with the core's events whichever door a reading came by.

An extension: it publishes through a ``RetainedPublish`` the composition root chooses
(straight into the embedded broker, or the MQTT link to an external one), so it knows
no transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from bridge.battery_values import extra_keys
from bridge.errors import StorageFailed
from bridge.events import (
    NO_SUBSCRIPTION,
    BatmonChanged,
    BatmonDeleted,
    MqttConnected,
    ReadingAccepted,
    StatusChanged,
    Subscription,
)
from bridge.topics import Topics

if TYPE_CHECKING:
    from bridge.core import Batmon, Core, Peers

COALESCE_S = 0.25  # at most one retained state per batmon this often, after readings

# Publishes a retained payload on a topic; an empty payload clears the topic.
RetainedPublish = Callable[[str, str], None]


def state_payload(batmon: Batmon) -> dict[str, Any]:
    """The retained state JSON: current values, announced status, time and units, and
    the battery values (energy counters, temperature, cells...) Home Assistant reads."""
    return {
        "batmon_id": batmon.id,
        "batmon_name": batmon.name,
        "batmon_voltage": batmon.voltage,
        "batmon_current": batmon.current,
        "batmon_power": batmon.power,
        "batmon_soc": batmon.soc,
        "batmon_details": batmon.details,
        "batmon_status": batmon.status,
        "last_modified": batmon.last_modified,
        "voltage_units": batmon.voltage_units,
        "current_units": batmon.current_units,
        "power_units": batmon.power_units,
        "soc_units": batmon.soc_units,
        **extra_keys(batmon),
        # Home Assistant's timestamp sensor wants ISO 8601 with a zone; "None" is unknown.
        "last_seen": None if batmon.last_reading is None else
        datetime.fromtimestamp(int(batmon.last_reading), UTC).isoformat(),
    }


class StatePublisher:
    """Keeps each batmon's retained state and availability topics in step with events.

    State after a reading is coalesced: at most one publish per batmon every
    ``COALESCE_S``, carrying the latest values, so a device sending 100 readings a
    second costs 4 publishes, not 100. Status changes and edits go out at once.

    Several workers on one database (``core.peers``): a state goes out only after the
    database's latest values were taken in, so a worker never sends values older than what
    another worker committed (and sent) before; one more check ``COALESCE_S`` after a
    reading's publish sends the newest again if another worker committed a newer one while
    this one was sending (docs/SCALE-OUT.md, "Retained state").
    """

    def __init__(self, core: Core, topics: Topics, publish: RetainedPublish) -> None:
        self.core = core
        self._subscription: Subscription = NO_SUBSCRIPTION
        self.topics = topics
        self.publish = publish
        # A digest of the last state sent per batmon (not the payload: memory at 10,000
        # batmons), so N events describing the same memory state publish once.
        self._last: dict[int, int] = {}
        self._sent_at: dict[int, float] = {}
        self._due: dict[int, asyncio.TimerHandle] = {}
        self._checks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Publish everything after each MQTT (re)connect and follow the core's events."""
        self._subscription = self.core.bus.subscribe_all({
            MqttConnected: self._on_connected,
            ReadingAccepted: self._on_reading,
            StatusChanged: self._on_status,
            BatmonChanged: self._on_changed,
            BatmonDeleted: self._on_deleted,
        })  # fmt: skip

    async def stop(self) -> None:
        """Stop reacting to events; pending coalesced publishes are dropped."""
        self._subscription.cancel()
        for handle in self._due.values():
            handle.cancel()
        self._due.clear()
        checks = list(self._checks)
        for task in checks:
            task.cancel()
        await asyncio.gather(*checks, return_exceptions=True)

    def publish_all(self) -> None:
        """Send every batmon's state and availability (after each (re)connect)."""
        self._last.clear()
        batmons = list(self.core.batmons.values())
        for batmon in batmons:
            self.publish_availability(batmon)
        self._states(batmons)

    def _states(self, batmons: list[Batmon], settle: bool = False) -> None:
        """Send these batmons' states: at once alone, after taking in the database's latest
        values when other workers share it (``settle``: and once more a moment later)."""
        peers = self.core.peers
        if peers is None:
            for batmon in batmons:
                self.publish_state(batmon)
            return
        task = asyncio.get_running_loop().create_task(self._fresh_states(peers, batmons, settle))
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def _fresh_states(self, peers: Peers, batmons: list[Batmon], settle: bool) -> None:
        try:
            await peers.catch_up([b.id for b in batmons])
        except StorageFailed:
            return  # cannot tell what is newest: send nothing (the next reading tries again)
        for batmon in batmons:
            if self.core.batmons.get(batmon.id) is batmon:
                self.publish_state(batmon)
        if settle:
            await asyncio.sleep(COALESCE_S)
            with contextlib.suppress(StorageFailed):
                await peers.catch_up([b.id for b in batmons])
                for batmon in batmons:
                    if self.core.batmons.get(batmon.id) is batmon:
                        self.publish_state(batmon)  # the same as sent: nothing goes out

    def publish_state(self, batmon: Batmon) -> None:
        """Send the batmon's state unless it is what was sent last."""
        payload = json.dumps(state_payload(batmon))
        digest = hash(payload)
        if self._last.get(batmon.id) != digest:
            self._last[batmon.id] = digest
            self._sent_at[batmon.id] = time.monotonic()
            self.publish(self.topics.state(batmon.id), payload)

    def publish_availability(self, batmon: Batmon) -> None:
        """Send ``online``/``offline`` as the core last announced the status."""
        payload = "online" if batmon.status == "Online" else "offline"
        self.publish(self.topics.availability(batmon.id), payload)

    def _state_soon(self, batmon: Batmon) -> None:
        if batmon.id in self._due:
            return  # the publish already scheduled will carry these values
        wait = self._sent_at.get(batmon.id, -COALESCE_S) + COALESCE_S - time.monotonic()
        if wait <= 0:
            self._states([batmon], settle=True)
            return
        loop = asyncio.get_running_loop()
        self._due[batmon.id] = loop.call_later(wait, self._flush, batmon)

    def _flush(self, batmon: Batmon) -> None:
        self._due.pop(batmon.id, None)
        if self.core.batmons.get(batmon.id) is batmon:
            self._states([batmon], settle=True)

    def _on_connected(self, event: MqttConnected) -> None:
        self.publish_all()  # the broker may have lost them

    def _on_reading(self, event: ReadingAccepted) -> None:
        if event.current:
            self._state_soon(event.batmon)

    def _on_status(self, event: StatusChanged) -> None:
        self.publish_availability(event.batmon)
        self._states([event.batmon])

    def _on_changed(self, event: BatmonChanged) -> None:
        self._states([event.batmon])
        if event.created:
            self.publish_availability(event.batmon)

    def _on_deleted(self, event: BatmonDeleted) -> None:
        batmon_id = event.batmon.id
        self._last.pop(batmon_id, None)
        self._sent_at.pop(batmon_id, None)
        handle = self._due.pop(batmon_id, None)
        if handle is not None:
            handle.cancel()
        self.publish(self.topics.state(batmon_id), "")
        self.publish(self.topics.availability(batmon_id), "")
