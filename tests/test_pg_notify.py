"""What workers on one PostgreSQL database tell each other (bridge/store/pg_notify.py,
pg_channels.py): the change log written by trigger in the change's own transaction, NOTIFY on a
listening connection, the readings notices, and which worker sends a discovery config."""

from __future__ import annotations

import queue
import time

import pytest

from bridge.store.pg_channels import MAX_PAYLOAD, WORKER_TAG, parse_readings_notice, readings_notices
from bridge.store.pg_notify import PgListener, PgPeerReads
from bridge.store.pg_store import PostgresStore
from tests.pg_support import fresh_database_url


def batmon_row(batmon_id: int, user_id: int) -> dict[str, object]:
    return {"id": batmon_id, "user_id": user_id, "name": "b", "type": "t", "token": "x" * 16,
            "update_period": 60, "created": 1.0}  # fmt: skip


@pytest.fixture
def db() -> tuple[str, PostgresStore, int]:
    url = fresh_database_url()
    store = PostgresStore.open(url)
    user = store.add_user("a@example.com", "k" * 64, 1.0)
    return url, store, user


def test_a_change_is_logged_with_its_version_and_a_reading_is_not(db: tuple[str, PostgresStore, int]) -> None:
    url, store, user = db
    reads = PgPeerReads(url)
    try:
        version, _ = reads.versions()
        store.add_batmon(batmon_row(7, user))
        store.write([(7, 100.0, 12.0, None, None, None, None, None, None)],
                    [(7, {"voltage": 12.0, "last_reading": 100.0, "status": "Online"})])  # fmt: skip
        changes = reads.check(version, [7])
        assert changes.version == version + 1 and not changes.full  # the reading logged nothing
        assert list(changes.batmons) == [7] and changes.batmons[7] is not None
        assert changes.current[7]["voltage"] == 12.0 and changes.current[7]["last_reading"] == 100.0
        store.update_batmon(7, {"name": "renamed"})
        store.delete_batmon(7)
        changes = reads.check(changes.version, [7])
        assert changes.version == version + 3 and changes.batmons == {7: None} and changes.current == {}
        assert not changes.users and changes.banks is None
    finally:
        reads.close()


def test_a_worker_behind_the_trimmed_log_reloads_everything(db: tuple[str, PostgresStore, int]) -> None:
    url, store, user = db
    reads = PgPeerReads(url)
    try:
        store.add_batmon(batmon_row(8, user))
        version, _ = reads.versions()
        store._conn.execute("DELETE FROM config_changes")  # as the trim does to old versions
        store.update_batmon(8, {"name": "again"})
        changes = reads.check(version - 1, [])
        assert changes.full and changes.users and changes.banks == []
        assert [r["name"] for r in changes.batmons.values() if r] == ["again"]
    finally:
        reads.close()


def test_the_listener_hears_changes_and_other_workers_readings(db: tuple[str, PostgresStore, int]) -> None:
    url, store, user = db
    heard: queue.Queue[tuple[str, object]] = queue.Queue()
    listener = PgListener(url, lambda v: heard.put(("config", v)), lambda ids: heard.put(("readings", ids)),
                          lambda: heard.put(("reconnect", None)))  # fmt: skip
    listener.start()
    try:
        store.add_batmon(batmon_row(9, user))
        kind, version = heard.get(timeout=5)
        assert kind == "config" and isinstance(version, int) and version > 0
        # This process's own readings are skipped; another worker's (another tag) are heard.
        store.write([(9, 200.0, 12.5, None, None, None, None, None, None)],
                    [(9, {"voltage": 12.5, "last_reading": 200.0})])  # fmt: skip
        store._conn.execute("SELECT pg_notify('batmon_readings', 'other:9,10')")
        assert heard.get(timeout=5) == ("readings", [9, 10])
        # The connection cut: it listens again and says so (the caller checks the log then).
        store._conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                            " WHERE query LIKE 'LISTEN%%' AND datname = current_database()")  # fmt: skip
        deadline = time.monotonic() + 10
        while heard.get(timeout=max(0.1, deadline - time.monotonic()))[0] != "reconnect":
            pass
        store.update_batmon(9, {"name": "after the cut"})
        assert heard.get(timeout=5)[0] == "config"
    finally:
        listener.stop()


def test_readings_notices_stay_under_notifys_limit_and_name_every_batmon() -> None:
    ids = list(range(10**15, 10**15 + 2000))
    payloads = readings_notices(ids + ids[:10])
    assert len(payloads) > 1 and all(len(p) <= MAX_PAYLOAD for p in payloads)
    assert all(p.startswith(WORKER_TAG + ":") for p in payloads)
    assert all(parse_readings_notice(p) == [] for p in payloads)  # our own: skipped
    assert sorted(i for p in payloads for i in parse_readings_notice("other" + p[len(WORKER_TAG):])) == ids
    assert readings_notices([]) == [] and parse_readings_notice("other:x,1") == []


def test_one_worker_sends_a_changed_config_and_one_takes_a_resend_turn(db: tuple[str, PostgresStore, int]
                                                                      ) -> None:  # fmt: skip
    url, _, _ = db
    workers = [PgPeerReads(url), PgPeerReads(url)]
    try:
        assert [w.first_to_send(1, "d1") for w in workers] == [True, False]
        assert [w.first_to_send(1, "d1") for w in workers] == [False, False]  # unchanged
        assert [w.first_to_send(1, "d2") for w in reversed(workers)] == [True, False]
        assert [w.take_turn("connect", 30) for w in workers] == [True, False]
        assert workers[1].take_turn("connect", 0)  # the interval over: the next turn
        workers[0].record_sent([(1, "d3"), (2, "e1")])
        assert not workers[1].first_to_send(2, "e1") and workers[1].first_to_send(2, "e2")
    finally:
        for w in workers:
            w.close()

