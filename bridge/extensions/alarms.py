"""Threshold alarms: evaluated on every current reading, whichever door it came in by.

A batmon's alarms look at the reading; a bank's (docs/BANKS.md) at the bank's values
after a member's reading or status change, under the same rule. The evaluator only decides
and records alarm state; who is told (and how) is the notifier's business, so it reacts to
the ``AlarmChanged`` / ``BankAlarmChanged`` events emitted here.

One rule (``decide``), two places it runs: against the alarm in memory (SQLite: one
process), or, when several workers share the database (PostgreSQL), against the alarm's
row, locked in the transaction that writes the change (``SharedState.decide_alarm``), so a
trigger, a repeat or a clear happens once whichever worker got the reading.
"""

from __future__ import annotations

import asyncio
import logging
import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, cast

from bridge.battery_values import reading_values
from bridge.core import Alarm
from bridge.events import (
    NO_SUBSCRIPTION,
    AlarmChanged,
    BankAlarmChanged,
    ReadingAccepted,
    StatusChanged,
    Subscription,
)
from bridge.store.interface import AlarmDecision, SharedState

if TYPE_CHECKING:
    from bridge.banks import Bank
    from bridge.core import Batmon, Core
    from bridge.store.interface import Store

log = logging.getLogger(__name__)
Kind = Literal["triggered", "repeated", "cleared"]
STATE = ("triggered", "trigger_time", "akn", "last_notice")

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


def decide(alarm: Alarm, value: float, now: float) -> AlarmDecision | None:
    """Apply one value to one alarm's state: (kind, columns to change) for a trigger, a
    repeat or a clear, None to leave it as it is."""
    holds = stays_triggered(alarm, value) if alarm.triggered else condition_holds(alarm, value)
    if holds and not alarm.triggered:
        return "triggered", {"triggered": True, "trigger_time": now, "akn": None, "last_notice": now}
    if holds and repeat_due(alarm, now):
        return "repeated", {"last_notice": now}
    if not holds and alarm.triggered:
        return "cleared", {"triggered": False, "last_notice": now}
    return None


def repeat_due(alarm: Alarm, now: float) -> bool:
    """Unacknowledged, and repeat_delay has passed since the last notice."""
    if alarm.akn is not None:
        return False
    return alarm.last_notice is None or now - alarm.last_notice >= alarm.repeat_delay


class AlarmEvaluator:
    """Turns current readings into alarm state changes and ``AlarmChanged`` events."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self._subscription: Subscription = NO_SUBSCRIPTION
        self._shared: SharedState | None = None
        self._banks_due: set[int] = set()  # banks whose alarms look at their values soon

    async def start(self) -> None:
        """Evaluate alarms on every accepted reading, and bank alarms on their members'
        status changes too, from now on."""
        self._shared = self.core.store.shared()
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
                cell = None if index is None else int(index)
                changed = _alarm_changed(event.batmon, alarm, float(value), cell)
                self._apply(alarm, float(value), event.ts, changed)

    def evaluate(self, batmon: Batmon, alarm: Alarm, value: float, cell: int | None = None) -> None:
        """Apply one value to one alarm in memory: trigger, repeat, clear or leave as it is."""
        self._in_memory(alarm, value, _alarm_changed(batmon, alarm, value, cell))

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
        """Apply one value to one of the bank's alarms; announce a change. (With several
        workers the change is decided once, on the alarm's row; the value is this worker's
        view of the members.)"""
        self._apply(alarm, value, self.core.clock(),
                    lambda kind, at: BankAlarmChanged(bank, alarm, kind, value, at))  # fmt: skip

    # -- either -------------------------------------------------------------------------
    def _apply(self, alarm: Alarm, value: float, reading_ts: float,
               event: Callable[[Kind, float], object]) -> None:  # fmt: skip
        """Decide in the store when workers share it, else in memory; ``event(kind, at)``
        is what to announce."""
        if self._shared is not None:
            self._evaluate_in_store(alarm, value, reading_ts, event)
        else:
            self._in_memory(alarm, value, event)

    def _in_memory(self, alarm: Alarm, value: float, event: Callable[[Kind, float], object]) -> None:
        now = self.core.clock()
        decision = decide(alarm, value, now)
        if decision is None:
            return
        kind, changes = decision
        self.core.update_alarm_state(alarm, changes)
        self.core.bus.emit(event(cast(Kind, kind), now))

    def _evaluate_in_store(self, alarm: Alarm, value: float, reading_ts: float,
                           event: Callable[[Kind, float], object]) -> None:  # fmt: skip
        """Decide against the alarm's row on the writer's thread (in order with the readings);
        announce on the loop what this worker changed."""
        clock = self.core.clock

        def in_store(store: Store) -> tuple[str, dict[str, Any]] | None:
            shared = store.shared()
            assert shared is not None, "the writer's store is the core's kind"
            return shared.decide_alarm(alarm.id, reading_ts,
                                       lambda row: decide(Alarm.from_row(row), value, clock()))

        def decided(future: asyncio.Future[tuple[str, dict[str, Any]] | None]) -> None:
            if future.cancelled():
                return
            if future.exception() is not None:
                log.error("could not evaluate alarm %s: %s", alarm.id, future.exception())
                return
            result = future.result()
            if result is None:
                return
            kind, row = result
            for name in STATE:  # this worker's memory follows the row (the API shows it)
                setattr(alarm, name, bool(row[name]) if name == "triggered" else row[name])
            self.core.bus.emit(event(cast(Kind, kind), row["last_notice"]))

        self.core.writer.call(in_store).add_done_callback(decided)


def _alarm_changed(batmon: Batmon, alarm: Alarm, value: float, cell: int | None
                   ) -> Callable[[Kind, float], AlarmChanged]:  # fmt: skip
    """The AlarmChanged to announce for one of the batmon's alarms, once kind and time are known."""
    return lambda kind, at: AlarmChanged(batmon, alarm, kind, value, at, cell)
