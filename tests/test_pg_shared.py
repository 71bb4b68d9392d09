"""Each change once across workers, at the store (bridge/store/pg_shared.py, pg_leader.py):
several handles on one PostgreSQL database race for the same status change, the same
Offline flip and the same alarm decision; one wins each. And the advisory-lock election:
one leader, and another as soon as the leader's session ends."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from bridge.core import Alarm
from bridge.extensions.alarms import decide
from bridge.store import energy_guard
from bridge.store.pg_leader import PgLeader
from bridge.store.pg_shared import PgShared, update_group
from bridge.store.pg_store import PostgresStore
from tests import pg_support
from tests.test_pg_store import NOV_2023, add_batmon, reading

HANDLES = 4


@pytest.fixture
def handles() -> Iterator[list[PostgresStore]]:
    first = pg_support.clean_store()
    opened = [first, *(first.another() for _ in range(HANDLES - 1))]
    try:
        yield opened
    finally:
        for handle in opened:
            handle.close()


def race(handles: list[PostgresStore], work: Callable[[int, PostgresStore], Any]) -> list[Any]:
    """``work(i, handle)`` on every handle at once (one thread each); their results in order."""
    results: list[Any] = [None] * len(handles)
    errors: list[BaseException] = []
    start = threading.Barrier(len(handles))

    def run(i: int) -> None:
        try:
            start.wait()
            results[i] = work(i, handles[i])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(handles))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    return results


def test_racing_writes_of_one_status_change_report_it_once(handles: list[PostgresStore]) -> None:
    batmons = [add_batmon(handles[0], n) for n in range(1, 11)]
    for round_ in range(10):  # Offline -> Online, flipped back by expire_overdue, ten times
        t = NOV_2023 + 1000 * round_

        def write(i: int, store: PostgresStore, t: float = t) -> dict[int, Any]:
            changes = {"last_reading": t + i, "status": "Online", "voltage": 12.0 + i}
            return store.write([reading(b, t + i, 12.0 + i) for b in batmons],
                               [(b, changes) for b in batmons])  # fmt: skip

        changed = race(handles, write)
        for b in batmons:
            reports = [c[b] for c in changed if b in c]
            assert len(reports) == 1, (round_, b, changed)
            # What it had: Offline, and before the first round no reading at all
            assert reports[0] == ("Offline", None if round_ == 0 else NOV_2023 + 1000 * (round_ - 1) + 3)
        flipped = race(handles, lambda i, store, t=t: PgShared(store).expire_overdue(t + 10_000)[0])
        assert sorted(i for each in flipped for i, _ in each) == batmons, flipped


def test_the_flip_skips_a_batmon_whose_reading_another_worker_just_stored(
        handles: list[PostgresStore]) -> None:  # fmt: skip
    b = add_batmon(handles[0], 1)  # update_period 300
    handles[0].write([reading(b, NOV_2023, 12.0)], [(b, {"last_reading": NOV_2023, "status": "Online"})])
    conn = psycopg.connect(handles[0].url)
    try:  # a worker's reading, not yet committed, holds the row
        conn.execute("UPDATE batmons SET last_reading = %s WHERE id = %s", (NOV_2023 + 400, b))
        result: list[Any] = []
        flip = threading.Thread(
            target=lambda: result.append(PgShared(handles[1]).expire_overdue(NOV_2023 + 350)))
        flip.start()
        time.sleep(0.3)
        assert flip.is_alive(), "the flip waits for the row"
        conn.commit()
        flip.join(10)
    finally:
        conn.close()
    assert result[0][0] == [], "it re-checked the row: not overdue any more"
    assert result[0][1] == NOV_2023 + 700


def alarm_row(batmon_id: int, repeat_delay: int = 60) -> dict[str, Any]:
    return {"id": 100 + batmon_id, "batmon_id": batmon_id, "name": "High", "metric": "voltage",
            "condition": ">=", "threshold": 14.0, "repeat_delay": repeat_delay, "enabled": 1,
            "update_time": NOV_2023}  # fmt: skip


def test_racing_alarm_decisions_trigger_repeat_and_clear_once_each(handles: list[PostgresStore]) -> None:
    b = add_batmon(handles[0], 1)
    handles[0].add_alarm(alarm_row(b))
    alarm_id = 100 + b
    clock = [NOV_2023 + 10.0]

    def evaluate(value: float) -> list[Any]:
        return race(handles, lambda i, store: PgShared(store).decide_alarm(
            alarm_id, NOV_2023, lambda row: decide(Alarm.from_row(row), value, clock[0])))

    def kinds(results: list[Any]) -> list[str]:
        return sorted(r[0] for r in results if r is not None)

    assert kinds(evaluate(14.5)) == ["triggered"]
    assert kinds(evaluate(14.6)) == []  # within repeat_delay
    clock[0] += 61
    assert kinds(evaluate(14.6)) == ["repeated"]
    assert kinds(evaluate(14.6)) == []
    assert kinds(evaluate(12.0)) == ["cleared"]
    assert kinds(evaluate(12.0)) == []
    [row] = handles[0].alarms()
    assert row["triggered"] in (0, False) and row["last_notice"] == clock[0]


def test_an_alarm_decision_for_a_reading_older_than_the_latest_changes_nothing(
        handles: list[PostgresStore]) -> None:  # fmt: skip
    b = add_batmon(handles[0], 1)
    handles[0].add_alarm(alarm_row(b))
    handles[0].write([reading(b, NOV_2023 + 5, 12.0)],
                     [(b, {"last_reading": NOV_2023 + 5, "status": "Online"})])  # fmt: skip
    late = PgShared(handles[1]).decide_alarm(
        101, NOV_2023, lambda row: decide(Alarm.from_row(row), 15.0, 1.0))
    assert late is None, "the newer reading's evaluation decides"
    assert not handles[0].alarms()[0]["triggered"]


def test_one_leader_at_a_time_and_another_once_its_session_ends() -> None:
    url = pg_support.session_database_url()
    leaders = [PgLeader(url, "offline-watchdog", retry_s=0.1) for _ in range(3)]
    changes: list[tuple[int, bool, float]] = []
    lock = threading.Lock()

    def told(i: int) -> Callable[[bool], None]:
        def changed(leading: bool) -> None:
            with lock:
                changes.append((i, leading, time.monotonic()))
        return changed

    def leading() -> list[int]:
        return [i for i, leader in enumerate(leaders) if leader.leading]

    try:
        for i, leader in enumerate(leaders):
            leader.start(told(i))
        deadline = time.monotonic() + 10
        while not leading() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)  # the others have tried several times meanwhile
        [first] = leading()
        # Its session is cut from the server's side (as when its process dies).
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                          " WHERE application_name = 'batmon offline-watchdog' AND pid IN"
                          " (SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted)")  # fmt: skip
        cut = time.monotonic()
        deadline = cut + 10
        while not [i for i in leading() if i != first] and time.monotonic() < deadline:
            time.sleep(0.02)
        [second] = [i for i in leading() if i != first]
        time.sleep(0.5)
        assert leading() == [second], "the cut one knows it no longer leads"
        took = next(t for i, lead, t in changes if i == second and lead) - cut
        print(f"\nanother leader {took:.2f} s after the leader's session was cut")
        leaders[second].stop()  # a clean stop gives the lead up at once
        deadline = time.monotonic() + 10
        while not [i for i in leading() if i != second] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(leading()) == 1 and leading() != [second]
    finally:
        for leader in leaders:
            leader.stop()


def test_a_group_of_alike_updates_in_one_statement_answers_as_one_by_one(
        handles: list[PostgresStore]) -> None:
    """The writer's group goes in as one UPDATE (update_group): the same rows and the same
    answers as the per-batmon statements, with either guard (the newest reading's, and the
    energy guard's planned-from); groups that are not alike are left to one by one."""
    store = handles[0]
    one_by_one = [add_batmon(store, n) for n in range(1, 6)]
    grouped = [add_batmon(store, n) for n in range(11, 16)]
    t = NOV_2023 + 100
    for first in (one_by_one, grouped):  # batmons 2 and 12 already hold a newer reading
        store.update_batmon(first[1], {"last_reading": t + 50, "status": "Online", "voltage": 9.5})

    def changes(k: int, **more: Any) -> dict[str, Any]:
        return {"last_reading": t + k, "status": "Online", "voltage": 12.0 + k, "details": f'{{"k": {k}}}',
                "energy_charged_kwh": 0.5 * k, "device_charged_kwh": None, **more}  # fmt: skip

    def compare(made: Callable[[int], dict[str, Any]]) -> dict[int, Any]:
        with store._transaction() as conn:
            expected = {b: store._update_batmon(conn, b, *energy_guard.split(made(k)))
                        for k, b in enumerate(one_by_one)}  # fmt: skip
            update = update_group(conn, [(b, made(k)) for k, b in enumerate(grouped)])
            assert update is not None
            got = {b: update(b, *energy_guard.split(made(k))) for k, b in enumerate(grouped)}
        assert got == {b + 10: answer for b, answer in expected.items()}
        columns = ", ".join(["id", *made(0).keys() - {energy_guard.PLANNED_FROM}])
        rows = {r["id"]: r for r in store._rows(f"SELECT {columns} FROM batmons ORDER BY id")}
        for b in one_by_one:
            assert rows[b + 10] == {**rows[b], "id": b + 10}
        return got

    # The newest-reading guard: batmon 12 keeps its newer reading.
    offline = (True, ("Offline", None))
    assert compare(changes) == {11: offline, 12: (False, None), 13: offline, 14: offline, 15: offline}
    # The energy guard: planned from what each row holds now, but for batmon 13 (stale).
    now = {r["id"]: r["last_reading"] for r in store._rows("SELECT id, last_reading FROM batmons")}
    # (batmon 11's given as an int: a JSON number may be one; the statement takes both)
    def planned(k: int) -> dict[str, Any]:
        start = now[one_by_one[k]] - (k == 2)
        return changes(100 + k, planned_from=int(start) if k == 0 else start)

    assert compare(planned) == {11: (True, ("Online", t)), 12: (True, ("Online", t + 50)), 13: (False, None),
                                14: (True, ("Online", t + 3)), 15: (True, ("Online", t + 4))}  # fmt: skip
    # Updates of several kinds in one group (columns, guards): a statement per kind, same answers.
    now = {r["id"]: r["last_reading"] for r in store._rows("SELECT id, last_reading FROM batmons")}
    mixed: list[Callable[[int], dict[str, Any]]] = [
        lambda k: changes(200 + k, planned_from=now[one_by_one[k]]),
        lambda k: {"voltage": 3.0 + k},  # no status: no status before in the answer
        lambda k: {"soc": 40.0, "status": "Offline"},  # no reading time: no guard
        lambda k: changes(50 + k),  # older than the latest: the newest-reading guard refuses it
        lambda k: {"status": "Online", "voltage": 1.0, "last_reading": t + 300},
    ]
    assert compare(lambda k: mixed[k](k)) == {11: (True, ("Online", t + 100)), 12: (True, None),
                                              13: (True, ("Online", t + 2)), 14: (False, None),
                                              15: (True, ("Online", t + 104))}  # fmt: skip
    # A batmon twice: left to the one-by-one statements (they keep its updates' order).
    with store._transaction() as conn:
        assert update_group(conn, [(11, changes(9)), (11, changes(10))]) is None
