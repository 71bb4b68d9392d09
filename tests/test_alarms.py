"""Alarm evaluation on a real store and core: trigger, repeat, acknowledge, clear."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.core import Alarm, Batmon, Core
from bridge.events import AlarmChanged, EventBus
from bridge.extensions.alarms import AlarmEvaluator
from bridge.models import AddAlarm, AddBatmon, Reading
from bridge.store.db import Store
from tests.support import T0, Clock


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def core(tmp_path: Path, clock: Clock) -> Iterator[Core]:
    store = Store.open(tmp_path / "b.sqlite3")
    yield Core(store, EventBus(), clock=clock).load()
    store.close()


@pytest.fixture
def batmon(core: Core) -> Batmon:
    user, _ = core.create_user("owner@example.org")
    return core.add_batmon(user, AddBatmon(batmon_name="Garage"))


@pytest.fixture
def changes(core: Core) -> Iterator[list[AlarmChanged]]:
    """Every AlarmChanged the evaluator emits, with the evaluator running."""
    seen: list[AlarmChanged] = []
    core.bus.subscribe(AlarmChanged, seen.append)
    evaluator = AlarmEvaluator(core)
    asyncio.run(evaluator.start())
    yield seen
    asyncio.run(evaluator.stop())


def add_alarm(core: Core, batmon: Batmon, **fields: Any) -> Alarm:
    spec = {"batmon_id": batmon.id, "alarm_name": "High voltage", "alarm_metric": "voltage",
            "alarm_condition": ">=", "alarm_threshold_value": 10, "alarm_repeat_delay": 1}
    return core.add_alarm(batmon, AddAlarm(**{**spec, **fields}))  # fmt: skip


def ingest(core: Core, batmon: Batmon, **fields: Any) -> None:
    asyncio.run(core.ingest_readings(batmon, [Reading(**fields)]))


def kinds(changes: list[AlarmChanged]) -> list[str]:
    return [c.kind for c in changes]


def test_reading_meeting_the_condition_triggers_the_alarm(core, batmon, changes, clock):
    alarm = add_alarm(core, batmon)
    ingest(core, batmon, batmon_voltage=12)
    assert kinds(changes) == ["triggered"]
    assert (changes[0].value, changes[0].at, changes[0].batmon) == (12.0, T0, batmon)
    assert alarm.triggered and alarm.trigger_time == T0 and alarm.akn is None
    assert alarm.to_api()["alarm_triggered"] is True
    assert alarm.to_api()["alarm_trigger_time"] == int(T0)


def test_alarm_state_is_persisted(core, batmon, changes):
    alarm = add_alarm(core, batmon)
    ingest(core, batmon, batmon_voltage=12)
    # The evaluator's write is queued behind the reading, off the loop: wait for it.
    asyncio.run(core.writer.barrier())
    reloaded = Core(core.store, EventBus()).load().alarms[alarm.id]
    assert (reloaded.triggered, reloaded.trigger_time, reloaded.last_notice) == (True, T0, T0)


def test_staying_true_repeats_once_the_repeat_delay_has_passed(core, batmon, changes, clock):
    add_alarm(core, batmon, alarm_repeat_delay=1)
    ingest(core, batmon, batmon_voltage=12)
    clock.advance(0.5)
    ingest(core, batmon, batmon_voltage=12)
    assert kinds(changes) == ["triggered"]
    clock.advance(1.0)
    ingest(core, batmon, batmon_voltage=13)
    assert kinds(changes) == ["triggered", "repeated"]
    assert changes[-1].value == 13.0


def test_repeat_delay_counts_from_the_last_notice(core, batmon, changes, clock):
    add_alarm(core, batmon, alarm_repeat_delay=10)
    ingest(core, batmon, batmon_voltage=12)
    for _ in range(3):
        clock.advance(6)
        ingest(core, batmon, batmon_voltage=12)
    # notices at 0 and 12; 6 and 18 are within 10 s of the previous notice
    assert kinds(changes) == ["triggered", "repeated"]


def test_acknowledged_alarm_stays_quiet_until_it_clears_and_triggers_again(
    core, batmon, changes, clock
):
    alarm = add_alarm(core, batmon)
    ingest(core, batmon, batmon_voltage=12)
    core.ack_alarm(alarm)
    clock.advance(5)
    ingest(core, batmon, batmon_voltage=12)
    assert kinds(changes) == ["triggered"]
    assert alarm.triggered and alarm.akn == T0
    ingest(core, batmon, batmon_voltage=5)
    clock.advance(1)
    ingest(core, batmon, batmon_voltage=12)
    assert kinds(changes) == ["triggered", "cleared", "triggered"]
    assert alarm.akn is None and alarm.trigger_time == T0 + 6


def test_becoming_false_clears_the_alarm(core, batmon, changes):
    alarm = add_alarm(core, batmon)
    ingest(core, batmon, batmon_voltage=12)
    ingest(core, batmon, batmon_voltage=5)
    assert kinds(changes) == ["triggered", "cleared"]
    assert changes[-1].value == 5.0
    assert not alarm.triggered
    ingest(core, batmon, batmon_voltage=4)
    assert kinds(changes) == ["triggered", "cleared"]


def test_backfilled_older_reading_does_not_evaluate(core, batmon, changes):
    alarm = add_alarm(core, batmon)
    ingest(core, batmon, batmon_voltage=5)
    ingest(core, batmon, batmon_voltage=50, ts=T0 - 100)
    assert changes == [] and not alarm.triggered
    ingest(core, batmon, batmon_voltage=12)
    ingest(core, batmon, batmon_voltage=1, ts=T0 - 50)
    assert kinds(changes) == ["triggered"] and alarm.triggered


def test_batch_of_current_readings_is_evaluated_in_time_order(core, batmon, changes):
    add_alarm(core, batmon)
    readings = [Reading(batmon_voltage=5, ts=T0 - 1), Reading(batmon_voltage=12, ts=T0 - 2)]
    asyncio.run(core.ingest_readings(batmon, readings))
    assert [(c.kind, c.value) for c in changes] == [("triggered", 12.0), ("cleared", 5.0)]


def test_disabled_alarm_is_not_evaluated(core, batmon, changes):
    alarm = add_alarm(core, batmon, alarm_enabled=False)
    ingest(core, batmon, batmon_voltage=12)
    assert changes == [] and not alarm.triggered


def test_reading_without_the_alarms_metric_leaves_it_as_it_is(core, batmon, changes):
    alarm = add_alarm(core, batmon)
    ingest(core, batmon, batmon_voltage=12)
    ingest(core, batmon, batmon_soc=50, batmon_details={"temp": 20})
    assert kinds(changes) == ["triggered"] and alarm.triggered


def test_only_alarms_of_the_readings_batmon_are_evaluated(core, batmon, changes):
    other = core.add_batmon(core.user_by_id(batmon.user_id), AddBatmon(batmon_name="Shed"))
    mine = add_alarm(core, batmon)
    theirs = add_alarm(core, other)
    ingest(core, batmon, batmon_voltage=12)
    assert [c.alarm for c in changes] == [mine] and not theirs.triggered


def test_alarms_are_evaluated_whatever_the_notification_flags(core, batmon, changes):
    core.set_flag(batmon, "alerts", False)
    add_alarm(core, batmon)
    ingest(core, batmon, batmon_voltage=12)
    assert kinds(changes) == ["triggered"]


@pytest.mark.parametrize(
    ("condition", "true_value", "false_value"),
    [(">", 11, 10), (">=", 10, 9.5), ("<", 9, 10), ("<=", 10, 10.5), ("==", 10, 10.1),
     ("!=", 3, 10)],
)  # fmt: skip
def test_each_condition_compares_value_with_threshold(
    core, batmon, changes, condition, true_value, false_value
):
    add_alarm(core, batmon, alarm_condition=condition, alarm_metric="soc")
    ingest(core, batmon, batmon_soc=false_value)
    assert changes == []
    ingest(core, batmon, batmon_soc=true_value)
    assert kinds(changes) == ["triggered"]


def test_stop_unsubscribes(core, batmon):
    seen: list[AlarmChanged] = []
    core.bus.subscribe(AlarmChanged, seen.append)
    evaluator = AlarmEvaluator(core)
    asyncio.run(evaluator.start())
    asyncio.run(evaluator.stop())
    add_alarm(core, batmon)
    ingest(core, batmon, batmon_voltage=12)
    assert seen == []
