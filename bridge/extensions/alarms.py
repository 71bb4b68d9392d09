"""Threshold alarms: evaluated on every current reading, whichever door it came in by.

A batmon's alarms look at the reading; a bank's (docs/BANKS.md) at the bank's values
after a member's reading or status change, under the same rules (:meth:`AlarmEvaluator.apply`).
The evaluator only decides and records alarm state; who is told (and how) is the
notifier's business, so it reacts to the ``AlarmChanged`` / ``BankAlarmChanged`` events
emitted here.
"""

from __future__ import annotations

import asyncio
import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from bridge.battery_values import reading_values
from bridge.events import (
    NO_SUBSCRIPTION,
    AlarmChanged,
    BankAlarmChanged,
    ReadingAccepted,
    StatusChanged,
    Subscription,
)

if TYPE_CHECKING:
    from bridge.banks import Bank
    from bridge.core import Alarm, Batmon, Core

Change = Literal["triggered", "repeated", "cleared"]

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
        self._banks_due: set[int] = set()  # banks whose alarms look at their values soon

    async def start(self) -> None:
        """Evaluate alarms on every accepted reading, and bank alarms on their members'
        status changes too, from now on."""
        self._subscription = self.core.bus.subscribe_all({
            ReadingAccepted: self.on_reading,
            StatusChanged: lambda e: self.banks_soon(e.batmon.id),
        })  # fmt: skip

    async def stop(self) -> None:
        """Stop evaluating."""
        self._subscription.cancel()

    def on_reading(self, event: ReadingAccepted) -> None:
        """Evaluate the batmon's enabled alarms whose metric the reading carries.

        A back-filled older reading says nothing about now, so it is not evaluated.
        """
        if not event.current:
            return
        self.banks_soon(event.batmon.id)
        if not event.batmon.alarms:
            return
        values = reading_values(event.values)
        for alarm in list(event.batmon.alarms.values()):
            value = values.get(alarm.metric)
            if alarm.enabled and value is not None:
                index = values.get(CELL_INDEX.get(alarm.metric, ""))
                self.evaluate(event.batmon, alarm, float(value), None if index is None else int(index))

    def evaluate(self, batmon: Batmon, alarm: Alarm, value: float, cell: int | None = None) -> None:
        """Apply one value to one of the batmon's alarms; announce a change."""
        change = self.apply(alarm, value)
        if change is not None:
            self.core.bus.emit(AlarmChanged(batmon, alarm, change[0], value, change[1], cell))

    # -- banks ---------------------------------------------------------------------------
    def banks_soon(self, batmon_id: int) -> None:
        """A member changed: evaluate its banks' alarms once the events of this turn of the
        loop are out (a batch of readings and the status change it brings look once)."""
        due = {b.id for b in self.core.banks.containing(batmon_id) if b.alarms}
        if not due:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # tools and tests without a loop: at once
            self._banks_due |= due
            self.evaluate_banks()
            return
        if not self._banks_due:
            loop.call_soon(self.evaluate_banks)
        self._banks_due |= due

    def evaluate_banks(self) -> None:
        """Apply each due bank's values to its enabled alarms. A value the bank does not
        have now (no member Online) says nothing, so it leaves the alarm as it is."""
        due, self._banks_due = self._banks_due, set()
        for bank_id in due:
            bank = self.core.banks.get(bank_id)
            if bank is None:
                continue  # deleted meanwhile
            values = self.core.banks.status(bank)
            for alarm in list(bank.alarms.values()):
                value = values.get(f"bank_{alarm.metric}")
                if alarm.enabled and value is not None:
                    self.evaluate_bank(bank, alarm, float(value))

    def evaluate_bank(self, bank: Bank, alarm: Alarm, value: float) -> None:
        """Apply one value to one of the bank's alarms; announce a change."""
        change = self.apply(alarm, value)
        if change is not None:
            self.core.bus.emit(BankAlarmChanged(bank, alarm, change[0], value, change[1]))

    # -- the rules, for either -----------------------------------------------------------
    def apply(self, alarm: Alarm, value: float) -> tuple[Change, float] | None:
        """Trigger, repeat, clear or leave as it is; record a change and say which (and when)."""
        now = self.core.clock()
        holds = stays_triggered(alarm, value) if alarm.triggered else condition_holds(alarm, value)
        kind: Change
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
            return None
        self.core.update_alarm_state(alarm, changes)
        return kind, now

    @staticmethod
    def _repeat_due(alarm: Alarm, now: float) -> bool:
        """Unacknowledged, and repeat_delay has passed since the last notice."""
        if alarm.akn is not None:
            return False
        return alarm.last_notice is None or now - alarm.last_notice >= alarm.repeat_delay
