"""Notices end to end: real store, core, alarms and Apprise posting to a local HTTP sink."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from bridge.core import Alarm, Batmon, Core
from bridge.errors import InvalidInput
from bridge.events import AlarmChanged, EventBus
from bridge.extensions.alarms import AlarmEvaluator
from bridge.extensions.notifier import (
    Notifier,
    mask_url,
    notices_view,
    set_targets,
    targets_view,
)
from bridge.models import (
    AddAlarm,
    AddBatmon,
    NotificationTargets,
    Reading,
    describe_error,
    validate_target_url,
)
from bridge.store.db import Store
from bridge.store.outbox import Outbox
from tests.support import ROOT, T0, Clock, Sink, free_port

WAIT_S = 5.0


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    yield s
    s.close()


MakeCore = Callable[..., Core]


@pytest.fixture
def make_core() -> Iterator[MakeCore]:
    """Open a core on a SQLite file (as a process start would); closed after the test."""
    stores: list[Store] = []

    def make(path: Path, clock: Callable[[], float] = time.time) -> Core:
        stores.append(Store.open(path))
        return Core(stores[-1], EventBus(), clock=clock).load()

    yield make
    for store in stores:
        with contextlib.suppress(Exception):  # a test may have closed it already
            store.close()


def add_batmon(core: Core, email_url: str = "", **targets: str) -> Batmon:
    user, _ = core.create_user(f"owner{len(core.batmons)}@example.org")
    set_targets(core.store, user.id, {"email_url": email_url, **targets})
    return core.add_batmon(user, AddBatmon(batmon_name="Garage"))


def add_alarm(core: Core, batmon: Batmon, repeat_delay: int = 1) -> Alarm:
    return core.add_alarm(batmon, AddAlarm(
        batmon_id=batmon.id, alarm_name="High voltage", alarm_metric="voltage",
        alarm_condition=">=", alarm_threshold_value=10, alarm_repeat_delay=repeat_delay,
    ))  # fmt: skip


async def ingest(core: Core, batmon: Batmon, **fields: Any) -> None:
    await core.ingest_readings(batmon, [Reading(**fields)])


@contextlib.asynccontextmanager
async def running(core: Core, **options: Any) -> AsyncIterator[Notifier]:
    """The alarm evaluator and a notifier, started on ``core`` for the block."""
    evaluator = AlarmEvaluator(core)
    await evaluator.start()
    notifier = Notifier(core, **options)
    await notifier.start()
    try:
        yield notifier
    finally:
        await notifier.stop()
        await evaluator.stop()


async def wait_until(predicate: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    """Poll ``predicate`` until it is truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
    return result


def rows(core: Core, batmon: Batmon) -> list[dict[str, Any]]:
    """The batmon's notices, oldest first."""
    return list(reversed(notices_view(core.store, batmon.id, limit=10_000)))


def first(core: Core, batmon: Batmon) -> dict[str, Any]:
    """The batmon's first notice, or an empty one while none is written yet (notices are
    written off the loop, a moment after the event)."""
    found = rows(core, batmon)
    return found[0] if found else {"state": None, "attempts": 0, "last_error": "", "sent_at": None}


# -- alarm and status notices -------------------------------------------------------------
def test_alarm_notices_trigger_repeat_stop_on_ack_and_clear(tmp_path, sink, make_core):
    clock = Clock()
    core = make_core(tmp_path / "b.sqlite3", clock)
    batmon = add_batmon(core, sink.url())
    alarm = add_alarm(core, batmon, repeat_delay=1)

    async def scenario() -> None:
        async with running(core):
            await ingest(core, batmon, batmon_voltage=12)
            assert alarm.triggered and alarm.trigger_time == T0
            first = (await wait_until(sink.posts, "the triggered notice"))[0]
            assert "Garage" in first["title"] and str(batmon.id) in first["title"]
            assert "triggered" in first["title"]
            assert "12 V" in first["message"] and "voltage >= 10 V" in first["message"]
            assert "2023-11-14 22:13:20 UTC" in first["message"]

            clock.advance(1.5)
            await ingest(core, batmon, batmon_voltage=12)
            await wait_until(lambda: len(sink.posts()) == 2, "the repeated notice")
            assert "still active" in sink.posts()[1]["title"]

            core.ack_alarm(alarm)
            clock.advance(1.5)
            await ingest(core, batmon, batmon_voltage=12)
            # Handlers queue synchronously: a notice would be in the outbox by now.
            assert len(rows(core, batmon)) == 2

            await ingest(core, batmon, batmon_voltage=5)
            await wait_until(lambda: len(sink.posts()) == 3, "the cleared notice")
            cleared = sink.posts()[2]
            assert "cleared" in cleared["title"] and "5 V" in cleared["message"]
            assert cleared["type"] == "success" and first["type"] == "warning"

    asyncio.run(scenario())
    assert [r["kind"] for r in rows(core, batmon)] == ["triggered", "repeated", "cleared"]
    assert {r["state"] for r in rows(core, batmon)} == {"sent"}


def test_status_notices_offline_once_online_on_next_reading_none_for_first(
    tmp_path, sink, make_core
):
    clock = Clock()
    core = make_core(tmp_path / "b.sqlite3", clock)
    batmon = add_batmon(core, sink.url())

    async def scenario() -> None:
        async with running(core):
            await ingest(core, batmon, batmon_voltage=12)
            assert batmon.status == "Online" and rows(core, batmon) == []

            clock.advance(batmon.update_period + 1)
            assert core.expire_if_due(batmon.id)
            assert not core.expire_if_due(batmon.id)
            offline = (await wait_until(sink.posts, "the Offline notice"))[0]
            assert offline["title"] == f"Batmon 'Garage' (id {batmon.id}) is Offline"
            assert "update period of 300 s" in offline["message"]

            await ingest(core, batmon, batmon_voltage=12)
            await wait_until(lambda: len(sink.posts()) == 2, "the Online notice")
            assert "back Online" in sink.posts()[1]["title"]

    asyncio.run(scenario())
    assert [r["kind"] for r in rows(core, batmon)] == ["offline", "online"]


def test_whatsapp_and_sms_get_notices_only_while_enabled(tmp_path, sink, make_core):
    core = make_core(tmp_path / "b.sqlite3", Clock())
    batmon = add_batmon(core, sink.url("email"), whatsapp_url=sink.url("whatsapp"),
                        sms_url=sink.url("sms"))  # fmt: skip
    add_alarm(core, batmon, repeat_delay=0)

    def paths() -> list[str]:
        return sorted(p["path"].strip("/") for p in sink.posts())

    async def scenario() -> None:
        async with running(core):
            await ingest(core, batmon, batmon_voltage=12)
            await wait_until(lambda: paths() == ["email"], "the email notice")

            core.set_flag(batmon, "whatsapp", True)
            await ingest(core, batmon, batmon_voltage=12)
            await wait_until(lambda: paths() == ["email", "email", "whatsapp"], "email+whatsapp")

            core.set_flag(batmon, "sms", True)
            await ingest(core, batmon, batmon_voltage=12)
            expected = ["email"] * 3 + ["sms"] + ["whatsapp"] * 2
            await wait_until(lambda: paths() == expected, "email+whatsapp+sms")

            core.set_flag(batmon, "whatsapp", False)
            core.set_flag(batmon, "sms", False)
            await ingest(core, batmon, batmon_voltage=12)
            await wait_until(lambda: len(sink.posts("email")) == 4, "email alone again")

            core.set_flag(batmon, "alerts", False)
            await ingest(core, batmon, batmon_voltage=12)

    asyncio.run(scenario())
    assert [r["channel"] for r in rows(core, batmon)] == [
        "email", "email", "whatsapp", "email", "whatsapp", "sms", "email"
    ]  # fmt: skip
    assert len(sink.posts()) == 7


def test_channel_without_a_target_is_recorded_as_skipped(tmp_path, sink, make_core):
    core = make_core(tmp_path / "b.sqlite3", Clock())
    batmon = add_batmon(core, sink.url())
    core.set_flag(batmon, "sms", True)
    add_alarm(core, batmon)

    async def scenario() -> None:
        async with running(core):
            await ingest(core, batmon, batmon_voltage=12)
            await wait_until(sink.posts, "the email notice")
            await wait_until(lambda: first(core, batmon)["state"] == "sent", "email sent")

    asyncio.run(scenario())
    email, sms = rows(core, batmon)
    assert (email["channel"], email["state"], email["attempts"]) == ("email", "sent", 1)
    assert (sms["channel"], sms["state"], sms["attempts"]) == ("sms", "skipped", 0)
    assert "no sms target" in sms["last_error"]


def test_target_removed_while_queued_skips_the_notice(tmp_path, make_core):
    core = make_core(tmp_path / "b.sqlite3")
    batmon = add_batmon(core, f"json://127.0.0.1:{free_port()}/")
    add_alarm(core, batmon)

    async def scenario() -> None:
        async with running(core, retry_base_s=0.1):
            await ingest(core, batmon, batmon_voltage=12)
            await wait_until(lambda: first(core, batmon)["last_error"], "a failed attempt")
            set_targets(core.store, batmon.user_id, {"email_url": ""})
            await wait_until(lambda: first(core, batmon)["state"] == "skipped", "skipped")

    asyncio.run(scenario())
    assert "no email target" in rows(core, batmon)[0]["last_error"]


# -- durability and retries -----------------------------------------------------------------
def test_sink_down_keeps_notice_queued_with_attempts_then_delivers(tmp_path, caplog, make_core):
    caplog.set_level(logging.DEBUG)
    port = free_port()
    core = make_core(tmp_path / "b.sqlite3")
    batmon = add_batmon(core, f"json://alice:s3cretpass@127.0.0.1:{port}/")
    add_alarm(core, batmon)
    outbox = Outbox(core.store)
    back: list[Sink] = []

    def failed_twice(notice: dict[str, Any]) -> bool:
        # attempts counts a send when it starts; 'queued' means it has finished
        return notice["state"] == "queued" and notice["attempts"] >= 2

    async def scenario() -> None:
        async with running(core, retry_base_s=0.2):
            await ingest(core, batmon, batmon_voltage=12)
            await wait_until(lambda: failed_twice(first(core, batmon)), "two failed attempts")
            notice = rows(core, batmon)[0]
            assert notice["sent_at"] is None
            assert "Connection error" in notice["last_error"]
            back.append(Sink(port=port))
            await wait_until(lambda: first(core, batmon)["state"] == "sent", "delivery")

    try:
        asyncio.run(scenario())
        assert len(back[0].posts()) == 1
    finally:
        for s in back:
            s.close()
    notice = rows(core, batmon)[0]
    assert notice["attempts"] >= 3 and notice["sent_at"] is not None
    assert notice["target"] == f"json://alice:****@127.0.0.1:{port}/"
    (row,) = outbox.latest_for_batmon(batmon.id, 1)
    outcomes = [a["outcome"] for a in outbox.attempts(row["id"])]
    assert outcomes[-1] == "sent" and set(outcomes[:-1]) == {"error"}
    assert len(outcomes) == notice["attempts"]
    assert "s3cretpass" not in json.dumps(notices_view(core.store, batmon.id))
    assert "s3cretpass" not in caplog.text


def test_notice_fails_for_good_after_max_attempts(tmp_path, make_core):
    core = make_core(tmp_path / "b.sqlite3")
    batmon = add_batmon(core, f"json://127.0.0.1:{free_port()}/")
    add_alarm(core, batmon)

    async def scenario() -> None:
        async with running(core, retry_base_s=0.05, max_attempts=3):
            await ingest(core, batmon, batmon_voltage=12)
            await wait_until(lambda: first(core, batmon)["state"] == "failed", "give-up")

    asyncio.run(scenario())
    assert rows(core, batmon)[0]["attempts"] == 3


def test_notice_gives_up_after_the_give_up_delay(tmp_path, make_core):
    core = make_core(tmp_path / "b.sqlite3")
    batmon = add_batmon(core, f"json://127.0.0.1:{free_port()}/")
    add_alarm(core, batmon)

    async def scenario() -> None:
        async with running(core, retry_base_s=0.05, give_up_after_s=0.3, max_attempts=100):
            await ingest(core, batmon, batmon_voltage=12)
            await wait_until(lambda: first(core, batmon)["state"] == "failed", "give-up")

    asyncio.run(scenario())
    assert 1 <= rows(core, batmon)[0]["attempts"] <= 4


def test_queued_notices_are_sent_by_a_new_notifier_after_restart_once(tmp_path, sink, make_core):
    path = tmp_path / "b.sqlite3"
    core = make_core(path)
    batmon = add_batmon(core, sink.url())
    add_alarm(core, batmon, repeat_delay=0)
    # The first process queued notices, then died before its worker sent them;
    # it had claimed one of them (in flight) already.
    evaluator, dead = AlarmEvaluator(core), Notifier(core)
    asyncio.run(evaluator.start())
    core.bus.subscribe(AlarmChanged, dead.on_alarm)
    for voltage in (12, 12, 5):
        asyncio.run(ingest(core, batmon, batmon_voltage=voltage))
    asyncio.run(core.writer.barrier())  # the notices are written off the loop, after the readings
    outbox = Outbox(core.store)
    assert outbox.claim(outbox.latest_for_batmon(batmon.id, 1)[0]["id"], "dead", T0, T0 + 30)
    assert outbox.count_by_state() == {"queued": 2, "sending": 1}
    core.store.close()
    assert sink.posts() == []

    restarted = make_core(path)

    async def scenario() -> None:
        async with running(restarted):
            await wait_until(lambda: Outbox(restarted.store).count_by_state() == {"sent": 3},
                             "all three sent")  # fmt: skip

    asyncio.run(scenario())
    titles = [p["title"] for p in sink.posts()]
    assert len(titles) == 3 and len(set(titles)) == 3
    assert [r["attempts"] for r in rows(restarted, batmon)] == [1, 1, 2]


KILLED_PROCESS = """
import asyncio, sys
from pathlib import Path
from bridge.extensions.alarms import AlarmEvaluator
from bridge.core import Core
from bridge.events import EventBus
from bridge.models import Reading
from bridge.extensions.notifier import Notifier
from bridge.store.db import Store

async def main():
    core = Core(Store.open(Path(sys.argv[1])), EventBus()).load()
    await AlarmEvaluator(core).start()
    await Notifier(core, send_timeout_s=60).start()
    batmon = core.batmons[int(sys.argv[2])]
    await core.ingest_readings(batmon, [Reading(batmon_voltage=12)])
    await asyncio.sleep(60)

asyncio.run(main())
"""


def test_notice_in_flight_when_the_process_is_killed_is_sent_after_restart(tmp_path, make_core):
    sink = Sink(hang=True)
    path = tmp_path / "b.sqlite3"
    core = make_core(path)
    # rto: Apprise waits for the stuck answer until the process is killed.
    batmon = add_batmon(core, sink.url("?rto=30"))
    add_alarm(core, batmon)
    core.store.close()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", KILLED_PROCESS, str(path), str(batmon.id)],
                             env=env, cwd=tmp_path)  # fmt: skip
    try:
        asyncio.run(wait_until(lambda: sink.hung, "the send to hang", timeout=30))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    restarted = make_core(path)
    assert [r["state"] for r in rows(restarted, batmon)] == ["sending"]
    sink.hang = False

    async def scenario() -> None:
        async with running(restarted):
            await wait_until(lambda: rows(restarted, batmon)[0]["state"] == "sent", "resend")

    try:
        asyncio.run(scenario())
        assert len(sink.posts()) == 1 and sink.posts()[0]["title"] == sink.hung[0]["title"]
    finally:
        sink.close()
    assert rows(restarted, batmon)[0]["attempts"] == 2


@pytest.mark.timeout(90)
def test_hanging_target_does_not_slow_ingestion(tmp_path, make_core):
    sink = Sink(hang=True)
    core = make_core(tmp_path / "b.sqlite3")
    batmon = add_batmon(core, sink.url())
    add_alarm(core, batmon, repeat_delay=0)

    async def scenario() -> None:
        async with running(core, send_timeout_s=0.5, concurrency=4):
            for _ in range(1000):
                await ingest(core, batmon, batmon_voltage=12)
                await asyncio.sleep(0)  # let the worker run, as a server would
            await wait_until(lambda: sink.hung, "sends hanging on the sink")

    try:
        asyncio.run(scenario())
    finally:
        sink.close()
    assert core.store.reading_count(batmon.id) == 1000
    states = Outbox(core.store).count_by_state()
    assert sum(states.values()) == 1000 and "sent" not in states


def test_stop_returns_even_when_a_notice_was_queued_just_before(tmp_path, sink, make_core):
    core = make_core(tmp_path / "b.sqlite3")
    batmon = add_batmon(core, sink.url())
    add_alarm(core, batmon)

    async def scenario() -> None:
        notifier = Notifier(core)
        await notifier.start()
        await AlarmEvaluator(core).start()
        for _ in range(3):
            await asyncio.sleep(0)  # the worker is now waiting for a wake-up
        await ingest(core, batmon, batmon_voltage=12)  # sets the wake-up...
        async with asyncio.timeout(WAIT_S):
            await notifier.stop()  # ...and the stop lands right after the worker woke

    asyncio.run(scenario())
    asyncio.run(core.writer.barrier())  # the notice is written off the loop
    # Either state is picked up again at the next start (requeue_interrupted).
    assert [r["state"] for r in rows(core, batmon)] in (["queued"], ["sending"])


# -- targets --------------------------------------------------------------------------------
def test_validate_target_url_accepts_apprise_urls_and_empty():
    assert validate_target_url("") == ""
    assert validate_target_url(" mailto://u:p@example.org ") == "mailto://u:p@example.org"
    assert validate_target_url("json://127.0.0.1:1/") == "json://127.0.0.1:1/"


@pytest.mark.parametrize(
    ("url", "message"),
    [("not a url", "whitespace"), ("nope", "Apprise URL"), ("nosuch://x", "'nosuch'"),
     ("json://", "json:// URL"), ("https://example.org/x?apikey=SECRET", "'https'")],
)  # fmt: skip
def test_validate_target_url_rejects_what_apprise_cannot_load(url, message):
    with pytest.raises(ValueError, match=message) as err:
        validate_target_url(url)
    assert "SECRET" not in str(err.value)


def test_mask_url_hides_passwords_tokens_and_secret_parameters():
    masked = mask_url("json://alice:hunter22@example.org/hook?+X-Token=abc123&:apikey=k9k9")
    assert "hunter22" not in masked and "abc123" not in masked and "k9k9" not in masked
    assert masked.startswith("json://alice:****@example.org/hook?")
    assert mask_url("") == ""


def test_targets_are_stored_and_shown_masked(tmp_path, make_core):
    core = make_core(tmp_path / "b.sqlite3")
    batmon = add_batmon(core, "mailto://bob:pa55word@example.org")
    set_targets(core.store, batmon.user_id, {"sms_url": "json://sms.example.org/?+Auth=t0ken99"})
    view = targets_view(core.store, batmon.user_id)
    assert set(view) == {"email_url", "whatsapp_url", "sms_url"}
    assert view["whatsapp_url"] == ""
    assert "pa55word" not in json.dumps(view) and "t0ken99" not in json.dumps(view)
    assert view["email_url"].startswith("mailto") and view["sms_url"].startswith("json://sms.")
    set_targets(core.store, batmon.user_id, {"email_url": ""})
    assert targets_view(core.store, batmon.user_id)["email_url"] == ""
    assert targets_view(core.store, batmon.user_id)["sms_url"] == view["sms_url"]


def test_bad_target_is_refused_naming_the_field(tmp_path, make_core):
    core = make_core(tmp_path / "b.sqlite3")
    batmon = add_batmon(core, "")
    with pytest.raises(InvalidInput, match=r"^whatsapp_url: "):
        set_targets(core.store, batmon.user_id, {"whatsapp_url": "nosuch://x"})
    with pytest.raises(ValidationError) as err:
        NotificationTargets.model_validate({"email_url": "json://ok.example.org/",
                                            "sms_url": "nosuch://x"})  # fmt: skip
    assert describe_error(err.value).startswith("sms_url: uses 'nosuch'")
    given = NotificationTargets.model_validate({"email_url": "", "junk": 1})
    assert given.changes() == {"email_url": ""}


def test_notices_view_shows_epoch_seconds_and_outcome(tmp_path, sink, make_core):
    clock = Clock()
    core = make_core(tmp_path / "b.sqlite3", clock)
    batmon = add_batmon(core, sink.url())
    add_alarm(core, batmon)

    async def scenario() -> None:
        async with running(core):
            await ingest(core, batmon, batmon_voltage=12)
            await wait_until(lambda: first(core, batmon)["state"] == "sent", "sent")

    asyncio.run(scenario())
    (notice,) = notices_view(core.store, batmon.id)
    assert notice == {
        "channel": "email", "kind": "triggered", "title": notice["title"],
        "body": notice["body"], "state": "sent", "attempts": 1, "created": int(T0),
        "sent_at": int(T0), "last_error": "", "target": mask_url(sink.url()),
    }  # fmt: skip
