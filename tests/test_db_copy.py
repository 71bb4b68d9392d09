"""`batmon db copy --to postgresql://...`: a SQLite installation with 1,000,000 readings moved
into a fresh PostgreSQL database, checked by its row counts and by `batmon serve` answering the
same on both stores; a non-empty target is refused and left as it was.

The SQLite file is built fast: users, batmons, alarms, a bank, tokens, a deleted batmon, notices
and rollups through the core and the store (as serve writes them), the readings by one
executemany on the file. Real SQLite, the machine's PostgreSQL, real `batmon` processes.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import psycopg
import pytest

from bridge.core import Core
from bridge.events import EventBus
from bridge.models import AddAlarm, AddBank, AddBatmon
from bridge.store.copy import READINGS, TABLES
from bridge.store.db import DB_FILENAME, SqliteStore
from tests import pg_support
from tests.conftest import ServeProcess
from tests.support import ROOT

READINGS_TOTAL = 1_000_000
BATMONS = 50
T0 = 1_760_000_000.0
STEP_S = 10
PASSWORD = "not-to-be-printed-7f3a"  # trust auth ignores it; the output must not show it


@dataclass
class Installation:
    data_dir: Path
    owner_key: str
    other_key: str
    batmon_ids: list[int]
    deleted_id: int
    bank_id: int


def build(data_dir: Path) -> Installation:
    """A serve data folder as a year of use leaves it, 1,000,000 readings included."""
    store = SqliteStore.open(data_dir / DB_FILENAME)
    core = Core(store, EventBus()).load()
    owner, owner_key = core.create_user("owner@example.org")
    other, other_key = core.create_user("other@example.org")
    core.add_mqtt_token("owner@example.org", "home-assistant")
    store.set_user_targets(other.id, {"email_url": "mailtos://user:secret@mail.example.org"})
    batmons = [core.add_batmon(owner, AddBatmon(batmon_name=f"bank {i}", update_period=60))
               for i in range(BATMONS)]  # fmt: skip
    ids = [b.id for b in batmons]
    alarm = core.add_alarm(batmons[0], AddAlarm(batmon_id=ids[0], alarm_name="Low", alarm_metric="voltage",
                                                alarm_condition="<", alarm_threshold_value=11.5))  # fmt: skip
    core.update_alarm_state(alarm, {"triggered": True, "trigger_time": T0 + 50, "last_notice": T0 + 50})
    core.add_alarm(batmons[1], AddAlarm(batmon_id=ids[1], alarm_name="High", alarm_metric="soc",
                                        alarm_condition=">", alarm_threshold_value=95))  # fmt: skip
    bank = core.banks.add(owner, AddBank(bank_name="House", batmon_ids=ids[:3]))
    # Rollups: old readings of one batmon folded by retention.
    old = T0 - 400 * 86400
    store.write([(ids[2], old + k * 60, 12.0 + k % 7 / 10, 1.5, 18.0, 80.0, None, 0.001, None)
                 for k in range(600)], [])  # fmt: skip
    while store.prune_batch(ids[2], T0 - 30 * 86400, 5000):
        pass
    # A deleted batmon whose readings are not purged yet (the purge resumes after the move).
    doomed = core.add_batmon(owner, AddBatmon(batmon_name="gone"))
    store.write([(doomed.id, T0 + k, 10.0, None, None, None, None, None, None) for k in range(100)], [])
    store.delete_batmon(doomed.id)
    # Notices: one failed after an attempt, one skipped.
    sent, skipped = store.outbox.enqueue([
        {"user_id": owner.id, "batmon_id": ids[0], "channel": "email", "kind": "alarm", "title": "Low",
         "body": "voltage low", "created": T0 + 50, "state": "queued"},
        {"user_id": owner.id, "batmon_id": ids[0], "channel": "sms", "kind": "alarm", "title": "Low",
         "body": "voltage low", "created": T0 + 50, "state": "queued"},
    ])  # fmt: skip
    claim = store.outbox.claim(sent, "copy-test", T0 + 50, T0 + 80)
    assert claim is not None
    store.outbox.mark_failed(claim, T0 + 51, "no route to host", "mailto://***")
    store.outbox.mark_skipped(skipped, T0 + 51, "no sms target")
    # The readings: most batmons 20,000 at 10 s; a few share a ts with a different reading.
    per = (READINGS_TOTAL - 200) // BATMONS  # the first batmon 100 more; the deleted one has 100

    def rows() -> Iterator[tuple[Any, ...]]:
        made = 0
        for n, batmon_id in enumerate(ids):
            for k in range(per if n else per + 100):
                ts = T0 + k * STEP_S + (0.5 if k % 997 == 0 else 0)
                if n == 3 and k % 500 == 1:
                    ts -= STEP_S  # the same ts as the reading before it, other values
                yield (batmon_id, ts, 12.0 + (k % 50) / 100, (k % 21) - 10.0, 100.0 + k % 13, 50.0 + k % 50,
                       '{"temperature": 21.5}' if k % 100 == 0 else None,
                       0.0002 if k % 2 else None, 0.0001 if k % 3 == 0 else None)  # fmt: skip
                made += 1
        assert made == READINGS_TOTAL - 100

    insert = ("INSERT INTO readings (batmon_id, ts, voltage, current, power, soc, details, charged_kwh,"
              " discharged_kwh) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
    with store._transaction() as conn:
        conn.executemany(insert, rows())
    for n, batmon_id in enumerate(ids):  # current values and energy state, as the writer leaves them
        last = T0 + (per - 1 if n else per + 99) * STEP_S
        store.update_batmon(batmon_id, {"voltage": 12.4, "current": -2.0, "power": 104.0, "soc": 77.0,
                                        "last_reading": last, "status": "Offline",
                                        "energy_charged_kwh": 1.25 + n, "energy_discharged_kwh": 0.5,
                                        "energy_point_ts": last, "energy_point_power": 104.0})  # fmt: skip
    core.close()
    return Installation(data_dir, owner_key, other_key, ids, doomed.id, bank.id)


def sqlite_counts(data_dir: Path) -> dict[str, int]:
    with sqlite3.connect(data_dir / DB_FILENAME) as conn:
        return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in (*TABLES, READINGS)}


def pg_counts(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        return {t: conn.execute(f"SELECT count(*) FROM {t}".encode()).fetchone()[0]  # type: ignore[index]
                for t in (*TABLES, READINGS)}  # fmt: skip


def copy(data_dir: Path, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "batmon.cli", "db", "copy", "--to", url,
                           "--data-dir", str(data_dir)], cwd=ROOT, text=True, capture_output=True,
                          timeout=900, env=dict(os.environ))  # fmt: skip


def with_password(url: str) -> str:
    return url.replace("postgres@", f"postgres:{PASSWORD}@", 1)


@pytest.fixture(scope="module")
def installation(tmp_path_factory: pytest.TempPathFactory) -> Installation:
    return build(tmp_path_factory.mktemp("sqlite") / "data")


@pytest.fixture(scope="module")
def copied(installation: Installation) -> tuple[str, subprocess.CompletedProcess[str], float]:
    url = pg_support.fresh_database_url()
    started = time.monotonic()
    done = copy(installation.data_dir, with_password(url))
    return url, done, time.monotonic() - started


def test_the_copy_moves_every_row_and_says_so_without_the_password(
    installation: Installation, copied: tuple[str, subprocess.CompletedProcess[str], float]
) -> None:
    url, done, seconds = copied
    assert done.returncode == 0, done.stderr
    assert PASSWORD not in done.stdout + done.stderr
    expected = sqlite_counts(installation.data_dir)
    assert expected[READINGS] == READINGS_TOTAL
    assert all(expected[t] > 0 for t in TABLES), expected  # every table has something to move
    assert pg_counts(url) == expected
    assert "counts match" in done.stdout
    figure = re.search(r"in ([\d.]+) s \(([\d,]+) readings in ([\d.]+) s", done.stdout)
    assert figure is not None, done.stdout
    print(f"\nbatmon db copy: {done.stdout.strip()} (the command took {seconds:.1f} s)")


def test_a_non_empty_target_is_refused_and_left_unchanged(
    installation: Installation, copied: tuple[str, subprocess.CompletedProcess[str], float]
) -> None:
    url, done, _ = copied
    assert done.returncode == 0, done.stderr
    before = pg_counts(url)
    with psycopg.connect(url) as conn:
        version = conn.execute("SELECT version FROM credentials_version").fetchone()
    again = copy(installation.data_dir, with_password(url))
    assert again.returncode == 1
    assert "is not empty" in again.stderr and "rows in users" in again.stderr, again.stderr
    assert PASSWORD not in again.stdout + again.stderr
    assert pg_counts(url) == before
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT version FROM credentials_version").fetchone() == version


def test_a_copy_while_serve_holds_the_folder_is_refused(tmp_path: Path) -> None:
    serve = ServeProcess(tmp_path / "data").start()
    try:
        refused = copy(serve.data_dir, pg_support.fresh_database_url())
    finally:
        serve.stop()
    assert refused.returncode == 1
    assert "in use by batmon process PID" in refused.stderr, refused.stderr


def test_serve_answers_the_same_on_both_stores(
    tmp_path: Path, installation: Installation, copied: tuple[str, subprocess.CompletedProcess[str], float]
) -> None:
    url, done, _ = copied
    assert done.returncode == 0, done.stderr
    on_sqlite = ServeProcess(installation.data_dir).start()
    on_pg = ServeProcess(tmp_path / "pg-data", args=["--database-url", url]).start()
    try:
        assert on_sqlite.admin_key is None and on_pg.admin_key is None  # the users moved
        answers = [ask_everything(serve, installation) for serve in (on_sqlite, on_pg)]
    finally:
        on_sqlite.stop()
        on_pg.stop()
    for (what, sqlite_answer), (_, pg_answer) in zip(answers[0], answers[1], strict=True):
        assert sqlite_answer == pg_answer, what
    # What was compared is the data itself, not empty answers.
    by_ask = dict(answers[1])
    assert len(by_ask["owner /interface/batmon/list {}"][1]["success"]) == BATMONS
    histories = [body["success"] for what, (status, body) in answers[1] if "history" in what]
    assert all(h[0]["data"] for h in histories), "every sampled history has rows"
    assert by_ask[f"owner /interface/batmon/status {{'batmon_id': {installation.deleted_id}}}"][0] == 404


def ask_everything(serve: ServeProcess, inst: Installation) -> list[tuple[str, Any]]:
    """(request, (status, body)) for a sample of what the API answers."""
    owner = {"X-API-Key": inst.owner_key}
    other = {"X-API-Key": inst.other_key}
    sample = [inst.batmon_ids[i] for i in (0, 1, 2, 3, 17, BATMONS - 1)]
    last = int(T0) + (READINGS_TOTAL // BATMONS) * STEP_S
    asks: list[tuple[str, dict[str, Any], dict[str, str]]] = [
        ("/interface/batmon/count", {}, owner),
        ("/interface/batmon/list", {}, owner),
        ("/interface/batmon/list", {}, other),
        ("/interface/bank/list", {}, owner),
        ("/interface/bank/status", {"bank_id": inst.bank_id}, owner),
        ("/interface/user/notifications", {}, other),
        ("/interface/batmon/notifications", {"batmon_id": inst.batmon_ids[0]}, owner),
        ("/interface/batmon/status", {"batmon_id": inst.deleted_id}, owner),
    ]
    for batmon_id in sample:
        asks += [
            ("/interface/batmon/status", {"batmon_id": batmon_id}, owner),
            # raw: six hours in the middle, shared timestamps included; buckets: the whole range
            ("/interface/batmon/history", {"batmon_id": batmon_id, "min_epoch_tm_sec": int(T0) + 86400,
                                           "max_epoch_tm_sec": int(T0) + 86400 + 6 * 3600}, owner),
            ("/interface/batmon/history", {"batmon_id": batmon_id, "min_epoch_tm_sec": int(T0) - 500 * 86400,
                                           "max_epoch_tm_sec": last, "bucket": "1h"}, owner),
        ]  # fmt: skip
    answers = []
    with httpx.Client(base_url=serve.http_url, timeout=60) as http:
        for path, params, headers in asks:
            response = http.get(path, params=params, headers=headers)
            body = response.json()
            assert response.status_code in (200, 404), (path, response.text[:300])
            who = "owner" if headers is owner else "other"
            answers.append((f"{who} {path} {params}", (response.status_code, body)))
    return answers
