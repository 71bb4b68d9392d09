"""Alarms on a bank's values (docs/BANKS.md): a real SQLite store and core, the real
evaluator, and the real notifier posting through Apprise to a local HTTP sink.

The rules are a batmon alarm's (trigger once, repeat after repeat_delay unless
acknowledged, hysteresis with alarm_clear_value), applied to the bank's aggregate after a
member's reading and after a member's status change (Offline leaves it out of the SoC).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from bridge.banks import Bank
from bridge.core import Alarm, Batmon, Core
from bridge.events import BankAlarmChanged, EventBus
from bridge.extensions.alarms import AlarmEvaluator
from bridge.extensions.notifier import Notifier, notices_view, set_targets
from bridge.models import AddAlarm, AddBank, AddBatmon, EditBatmon, Reading, describe_error
from bridge.store.db import Store
from tests import pg_support
from tests.support import T0, Clock, Sink
from tests.test_notifier import wait_until


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["sqlite", "postgres"])
def core(request: pytest.FixtureRequest, tmp_path: Path, clock: Clock) -> Iterator[Core]:
    """SQLite decides in memory; PostgreSQL (several workers may share it) on the alarm's row."""
    store = Store.open(tmp_path / "b.sqlite3") if request.param == "sqlite" else pg_support.clean_store()
    core = Core(store, EventBus(), clock=clock).load()
    yield core
    core.writer.stop()
    store.close()


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    yield s
    s.close()


def house(core: Core, email_url: str = "") -> tuple[Bank, Batmon, Batmon]:
    """A bank of two 100 Ah packs, A and B (default update period 300 s)."""
    user, _ = core.create_user("owner@example.org")
    set_targets(core.store, user.id, {"email_url": email_url})
    a = core.add_batmon(user, AddBatmon(batmon_name="Pack A"))
    b = core.add_batmon(user, AddBatmon(batmon_name="Pack B"))
    for pack in (a, b):
        core.edit_batmon(pack, EditBatmon(batmon_id=pack.id, capacity_ah=100))
    bank = core.banks.add(user, AddBank(bank_name="House bank", batmon_ids=[a.id, b.id]))
    return bank, a, b


def low_soc(core: Core, bank: Bank, **fields: Any) -> Alarm:
    spec = {"bank_id": bank.id, "alarm_name": "Bank low", "alarm_metric": "soc", "alarm_condition": "<",
            "alarm_threshold_value": 30, "alarm_clear_value": 35, "alarm_repeat_delay": 60}  # fmt: skip
    return core.add_alarm(bank, AddAlarm(**{**spec, **fields}))


@contextlib.asynccontextmanager
async def evaluating(core: Core, notify: bool = False) -> AsyncIterator[list[BankAlarmChanged]]:
    seen: list[BankAlarmChanged] = []
    subscription = core.bus.subscribe_all({BankAlarmChanged: seen.append})
    evaluator = AlarmEvaluator(core)
    notifier = Notifier(core)
    await evaluator.start()
    if notify:
        await notifier.start()
    try:
        yield seen
    finally:
        if notify:
            await notifier.stop()
        await evaluator.stop()
        subscription.cancel()


async def settle(core: Core) -> None:
    """The bank's alarms look once this turn's events are out; on a shared store the writer
    decides on the alarm's row and the loop announces it after."""
    for _ in range(3):
        await asyncio.sleep(0)
        await core.writer.barrier()
    await asyncio.sleep(0.01)


async def soc(core: Core, batmon: Batmon, value: float) -> None:
    await core.ingest_readings(batmon, [Reading(batmon_soc=value)])
    await settle(core)


def kinds(seen: list[BankAlarmChanged]) -> list[tuple[str, float]]:
    return [(c.kind, c.value) for c in seen]


def test_a_bank_alarm_triggers_once_repeats_and_clears_with_hysteresis(core: Core, clock: Clock) -> None:
    bank, a, b = house(core)
    alarm = low_soc(core, bank)

    async def scenario() -> list[BankAlarmChanged]:
        async with evaluating(core) as seen:
            await soc(core, a, 40)
            await soc(core, b, 40)
            assert seen == []  # 40 %: nothing
            await soc(core, b, 10)  # bank (40 + 10) / 2 = 25 % < 30
            await soc(core, a, 42)  # 26 %: still low, the repeat is not due
            assert kinds(seen) == [("triggered", 25.0)]
            assert seen[0].bank is bank and seen[0].alarm is alarm and seen[0].at == T0
            clock.advance(61)
            await soc(core, b, 20)  # 31 %: above the threshold, below the clear value
            assert kinds(seen)[1:] == [("repeated", 31.0)] and alarm.triggered
            clock.advance(1)
            await soc(core, b, 29)  # 35.5 %: past the clear value
            assert kinds(seen)[2:] == [("cleared", 35.5)] and not alarm.triggered
            return seen

    asyncio.run(scenario())
    asyncio.run(core.writer.barrier())
    reloaded = Core(core.store, EventBus()).load()
    again = reloaded.banks.get(bank.id)
    assert again is not None and list(again.alarms) == [alarm.id]
    kept = again.alarms[alarm.id]
    assert (kept.bank_id, kept.batmon_id, kept.triggered, kept.trigger_time, kept.clear_value) == (
        bank.id, None, False, T0, 35.0)  # fmt: skip
    assert reloaded.alarms[alarm.id] is kept


def test_an_acknowledged_bank_alarm_stops_repeating_until_it_clears(core: Core, clock: Clock) -> None:
    bank, a, b = house(core)
    alarm = low_soc(core, bank, alarm_clear_value=None)

    async def scenario() -> list[BankAlarmChanged]:
        async with evaluating(core) as seen:
            await soc(core, a, 20)
            await soc(core, b, 20)
            core.ack_alarm(alarm)
            clock.advance(120)
            await soc(core, a, 21)
            assert kinds(seen) == [("triggered", 20.0)]
            await soc(core, a, 50)  # 35 %: cleared (no clear value: the threshold alone)
            await soc(core, a, 30)  # 25 %: triggered again, unacknowledged
            assert [k for k, _ in kinds(seen)] == ["triggered", "cleared", "triggered"]
            assert alarm.akn is None
            return seen

    asyncio.run(scenario())


def test_a_member_going_offline_changes_the_bank_value_and_is_evaluated(core: Core, clock: Clock) -> None:
    bank, a, b = house(core)
    low_soc(core, bank)

    async def scenario() -> None:
        async with evaluating(core) as seen:
            await soc(core, b, 90)  # A has never reported: Offline, left out; 90 %
            clock.advance(200)
            await soc(core, a, 10)  # (10 + 90) / 2 = 50 %
            assert seen == []
            clock.advance(150)  # B's reading is 350 s old, past its 300 s period
            assert core.expire_if_due(b.id)
            await settle(core)
            assert kinds(seen) == [("triggered", 10.0)]  # A alone, with no reading at all
            clock.advance(200)
            assert core.expire_if_due(a.id)
            await settle(core)
            assert len(seen) == 1  # no member Online: the bank has no value, the alarm stays
            await soc(core, b, 90)  # Online again, alone: 90 %
            assert [k for k, _ in kinds(seen)] == ["triggered", "cleared"]

    asyncio.run(scenario())


def test_a_bank_alarm_notice_names_the_bank_and_goes_through_apprise(core: Core, sink: Sink) -> None:
    bank, a, b = house(core, sink.url())
    low_soc(core, bank)

    async def scenario() -> None:
        async with evaluating(core, notify=True):
            await soc(core, b, 30)  # B alone (A has not reported): 30 %, not below
            await soc(core, a, 20)
            post = (await wait_until(sink.posts, "the bank's triggered notice"))[0]
            assert post["title"] == f"Alarm 'Bank low' triggered on bank 'House bank' (id {bank.id}): soc 25%"
            assert "soc < 30%, clears past 35%" in post["message"]
            assert "2023-11-14 22:13:20 UTC" in post["message"]
            await soc(core, a, 60)  # 45 %
            await wait_until(lambda: len(sink.posts()) == 2, "the bank's cleared notice")
            assert sink.posts()[1]["title"].startswith("Alarm 'Bank low' cleared on bank 'House bank'")
            assert sink.posts()[1]["type"] == "success"

    asyncio.run(scenario())
    # Kept in the outbox under the bank's id (ids of batmons and banks never clash).
    notices = notices_view(core.store, bank.id)
    assert [n["kind"] for n in notices] == ["cleared", "triggered"]
    assert notices_view(core.store, a.id) == []


def test_a_bank_alarm_notifies_only_when_a_member_has_notices_enabled(core: Core, sink: Sink) -> None:
    bank, a, b = house(core, sink.url())
    low_soc(core, bank)
    core.set_flag(a, "alerts", False)
    core.set_flag(b, "alerts", False)

    async def scenario() -> None:
        async with evaluating(core, notify=True) as seen:
            await soc(core, a, 20)
            await soc(core, b, 20)
            assert [c.kind for c in seen] == ["triggered"]
            await asyncio.sleep(0.3)
            assert sink.posts() == []

    asyncio.run(scenario())
    assert notices_view(core.store, bank.id) == []


def test_deleting_a_bank_deletes_its_alarms_and_retires_their_ids(core: Core) -> None:
    bank, a, _ = house(core)
    alarm = low_soc(core, bank)
    kept = core.add_alarm(a, AddAlarm(batmon_id=a.id, alarm_name="Pack low", alarm_metric="soc",
                                      alarm_condition="<", alarm_threshold_value=10))  # fmt: skip
    core.banks.delete(bank)
    assert alarm.id not in core.alarms and kept.id in core.alarms
    assert {bank.id, alarm.id} <= core.store.retired_ids()
    reloaded = Core(core.store, EventBus()).load()
    assert set(reloaded.alarms) == {kept.id}


@pytest.mark.parametrize(("fields", "message"), [
    ({}, "batmon_id is required (or bank_id, for a bank's alarm)."),
    ({"batmon_id": 5, "bank_id": 6},
     "give batmon_id or bank_id, not both: an alarm is on one batmon or one bank."),
    ({"bank_id": 6, "batmon_token": "tok"},
     "batmon_token goes with batmon_id; a bank's alarm is its owner's only."),
    ({"bank_id": 6, "alarm_metric": "cell_min"},
     "alarm_metric of a bank's alarm must be one of soc, voltage, current, power."),
])  # fmt: skip
def test_an_alarm_is_on_exactly_one_batmon_or_bank(fields: dict[str, Any], message: str) -> None:
    spec = {"alarm_name": "x", "alarm_metric": "soc", "alarm_condition": "<", "alarm_threshold_value": 1}
    with pytest.raises(ValidationError) as caught:
        AddAlarm(**{**spec, **fields})
    assert describe_error(caught.value) == message
    assert AddAlarm(**{**spec, "bank_id": 6}).subject() == ("bank", 6)
    assert AddAlarm(**{**spec, "batmon_id": 5}).subject() == ("batmon", 5)
