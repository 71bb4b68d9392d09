"""Threshold alarms: evaluated on every current reading, whichever door it came in by.

The evaluator only decides and records alarm state; who is told (and how) is the
notifier's business, so it reacts to the ``AlarmChanged`` events emitted here.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

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


def condition_holds(alarm: Alarm, value: float) -> bool:
    """True when ``value`` meets the alarm's condition against its threshold."""
    return CONDITIONS[alarm.condition](value, alarm.threshold)


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
        if not event.current:
            return
        for alarm in list(event.batmon.alarms.values()):
            value = event.values.get(alarm.metric)
            if alarm.enabled and isinstance(value, int | float):
                self.evaluate(event.batmon, alarm, float(value))

    def evaluate(self, batmon: Batmon, alarm: Alarm, value: float) -> None:
        """Apply one value to one alarm: trigger, repeat, clear or leave as it is."""
        now = self.core.clock()
        holds = condition_holds(alarm, value)
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
        self.core.bus.emit(AlarmChanged(batmon, alarm, kind, value, now))

    @staticmethod
    def _repeat_due(alarm: Alarm, now: float) -> bool:
        """Unacknowledged, and repeat_delay has passed since the last notice."""
        if alarm.akn is not None:
            return False
        return alarm.last_notice is None or now - alarm.last_notice >= alarm.repeat_delay
