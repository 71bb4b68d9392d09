"""Threshold alarms: evaluated on every current reading, whichever door it came in by.

The evaluator only decides and records alarm state; who is told (and how) is the
notifier's business, so it reacts to the ``AlarmChanged`` events emitted here.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from bridge.battery_values import reading_values
from bridge.events import NO_SUBSCRIPTION, AlarmChanged, ReadingAccepted, Subscription

if TYPE_CHECKING:
    from bridge.core import Alarm, Batmon, Core

# The one map from an alarm_condition to its comparison (models.AlarmCondition).
CONDITIONS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}


# A cell alarm names its cell: the index that goes with each cell value.
CELL_INDEX = {"cell_min": "cell_min_index", "cell_max": "cell_max_index"}


def condition_holds(alarm: Alarm, value: float) -> bool:
    """True when ``value`` meets the alarm's condition against its threshold."""
    return CONDITIONS[alarm.condition](value, alarm.threshold)


def stays_triggered(alarm: Alarm, value: float) -> bool:
    """For a triggered alarm: True while the condition holds against the threshold or the
    clear value (hysteresis), so it clears only once the value has crossed both.

    A clear value on the wrong side (``< 3.0`` clearing at 2.5) therefore changes nothing,
    rather than being refused: no schema could say which side is right for each condition.
    """
    if condition_holds(alarm, value):
        return True
    return alarm.clear_value is not None and CONDITIONS[alarm.condition](value, alarm.clear_value)


class AlarmEvaluator:
    """Turns current readings into alarm state changes and ``AlarmChanged`` events."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self._subscription: Subscription = NO_SUBSCRIPTION

    async def start(self) -> None:
        """Evaluate alarms on every accepted reading from now on."""
        self._subscription = self.core.bus.subscribe_all({ReadingAccepted: self.on_reading})

    async def stop(self) -> None:
        """Stop evaluating."""
        self._subscription.cancel()

    def on_reading(self, event: ReadingAccepted) -> None:
        """Evaluate the batmon's enabled alarms whose metric the reading carries.

        A back-filled older reading says nothing about now, so it is not evaluated.
        """
        if not event.current or not event.batmon.alarms:
            return
        values = reading_values(event.values)
        for alarm in list(event.batmon.alarms.values()):
            value = values.get(alarm.metric)
            if alarm.enabled and value is not None:
                index = values.get(CELL_INDEX.get(alarm.metric, ""))
                self.evaluate(event.batmon, alarm, float(value), None if index is None else int(index))

    def evaluate(self, batmon: Batmon, alarm: Alarm, value: float, cell: int | None = None) -> None:
        """Apply one value to one alarm: trigger, repeat, clear or leave as it is."""
        now = self.core.clock()
        holds = stays_triggered(alarm, value) if alarm.triggered else condition_holds(alarm, value)
        kind: Literal["triggered", "repeated", "cleared"]
        changes: dict[str, Any]
        if holds and not alarm.triggered:
            kind = "triggered"
            changes = {"triggered": True, "trigger_time": now, "akn": None, "last_notice": now}
        elif holds and self._repeat_due(alarm, now):
            kind = "repeated"
            changes = {"last_notice": now}
        elif not holds and alarm.triggered:
            kind = "cleared"
            changes = {"triggered": False, "last_notice": now}
        else:
            return
        self.core.update_alarm_state(alarm, changes)
        self.core.bus.emit(AlarmChanged(batmon, alarm, kind, value, now, cell))

    @staticmethod
    def _repeat_due(alarm: Alarm, now: float) -> bool:
        """Unacknowledged, and repeat_delay has passed since the last notice."""
        if alarm.akn is not None:
            return False
        return alarm.last_notice is None or now - alarm.last_notice >= alarm.repeat_delay
