"""Banks on the dashboard's live feed (a real core on tmp SQLite): a stream of a user with
banks opens with a ``banks`` message after the snapshot; a member's reading, a bank alarm
and an edit send the bank again (coalesced), a delete sends ``bank_deleted``; another
user's stream hears nothing of them."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bridge.extensions.alarms import AlarmEvaluator
from bridge.models import AddAlarm, AddBank, EditBank
from http_api.live import LiveFeed
from tests.test_live_feed import add, ingest, messages, run


def test_a_bank_rides_on_its_owners_stream(tmp_path: Path) -> None:
    async def scenario(core, feed: LiveFeed) -> None:  # type: ignore[no-untyped-def]
        user, _ = core.create_user("owner@example.org")
        stranger, _ = core.create_user("stranger@example.org")
        a, b = add(core, user, "Pack A"), add(core, user, "Pack B")
        bank = core.banks.add(user, AddBank(bank_name="House bank", batmon_ids=[a.id, b.id]))
        core.add_alarm(bank, AddAlarm(bank_id=bank.id, alarm_name="Bank low", alarm_metric="soc",
                                      alarm_condition="<", alarm_threshold_value=30))  # fmt: skip
        evaluator = AlarmEvaluator(core)
        await evaluator.start()
        mine, theirs = feed.open(user.id), feed.open(stranger.id)
        opening = await messages(feed, mine)
        assert [event for event, _ in opening] == ["snapshot", "banks"]
        assert [k["bank_id"] for k in opening[1][1]] == [bank.id]
        assert [event for event, _ in await messages(feed, theirs)] == ["snapshot"]  # no banks: no message

        await ingest(core, a, batmon_soc=40)
        await ingest(core, b, batmon_soc=10)  # 25 %: the alarm triggers (on the next turn)
        await asyncio.sleep(0)
        sent = await messages(feed, mine)
        banks = [data for event, data in sent if event == "bank"]
        assert len(banks) == 1, "one bank message for the whole burst"
        assert (banks[0]["bank_soc"], banks[0]["alarms"][0]["alarm_triggered"]) == (25.0, True)

        core.banks.edit(bank, EditBank(bank_id=bank.id, bank_name="Boat bank"))
        assert [(e, d["bank_name"]) for e, d in await messages(feed, mine)] == [("bank", "Boat bank")]
        core.banks.delete(bank)
        assert await messages(feed, mine) == [("bank_deleted", {"bank_id": bank.id})]
        assert await messages(feed, theirs) == []
        await evaluator.stop()

    run(tmp_path, scenario)
