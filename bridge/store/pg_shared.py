"""Each change once, whichever worker sees it: status transitions and alarm state decided
against PostgreSQL's rows (``SharedState`` of bridge/store/interface.py).

Several workers share one database, and each has its own memory of the batmons, so memory
cannot say whether a change is new: three workers seeing a batmon's readings would each
announce it back Online. The row decides instead, in the transaction that changes it:

- a reading's status goes in with ``UPDATE ... FROM (SELECT ... FOR UPDATE) old ... RETURNING
  old.status``: the statuses before and after say whether *this* update changed it, and only
  that worker announces it (the row lock orders concurrent updates; each sees the last one's);
- Offline is one conditional ``UPDATE ... WHERE status = 'Online' AND deadline <= now
  RETURNING id``, run by the watchdog's leader (bridge/store/pg_leader.py). Under READ
  COMMITTED a concurrent reading's update makes it re-check the row and skip it;
- an alarm's row is read ``FOR UPDATE`` in the transaction that changes it, so a change made by
  another worker is seen before deciding, and two workers never both trigger it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import psycopg

from bridge.store import energy_guard
from bridge.store.db import ALARM_COLUMNS, check_columns
from bridge.store.interface import AlarmDecision, CurrentUpdate
from bridge.store.pg_leader import PgLeader
from bridge.store.pg_store import _plain, _update, translated

if TYPE_CHECKING:
    from bridge.store.pg_store import PostgresStore

GroupAnswers = Callable[[int, dict[str, Any], Any], tuple[bool, tuple[str, float | None] | None]]
"""Per batmon of a group updated at once: (row updated, status and last_reading before)."""


def update_returning_before(conn: psycopg.Connection[Any], batmon_id: int, changes: dict[str, Any],
                            guard: tuple[str, Any] | None) -> tuple[str, float | None] | None:  # fmt: skip
    """UPDATE one batmon (the caller checked the columns) and return the (status, last_reading)
    its row had just before, or None when the guard left it alone.

    The sub-select locks the row first, so ``old`` is the latest committed version even when
    another worker updated it meanwhile (a plain self-join would read this statement's snapshot).
    Its columns are renamed so the guard's bare names mean the row being updated.
    """
    assignments = ", ".join(f"{column} = %s" for column in changes)
    where, params = ("", ()) if guard is None else (f" AND ({guard[0]})", (guard[1],))
    row = conn.execute(
        f"UPDATE batmons SET {assignments} FROM (SELECT id AS old_id, status AS old_status,"
        " last_reading AS old_last_reading FROM batmons WHERE id = %s FOR UPDATE) old"
        f" WHERE batmons.id = old.old_id{where} RETURNING old.old_status, old.old_last_reading".encode(),
        (*(_plain(v) for v in changes.values()), batmon_id, *params),
    ).fetchone()  # fmt: skip
    return None if row is None else (str(row[0]), row[1])


def update_group(conn: psycopg.Connection[Any], updates: Sequence[CurrentUpdate]) -> GroupAnswers | None:
    """A group's batmon updates in a few statements instead of one per batmon: what
    ``PostgresStore._update_batmon`` would have answered for each, one by one (whether its row
    was updated and, with ``status`` among the columns, the (status, last_reading) the row had
    just before), for energy_guard.apply. None when a batmon comes twice or a value is not
    JSON: the caller then updates them one by one.

    Why: one statement per batmon cost a round trip and 50-90 µs of the worker's CPU each, for
    every batmon of every group (docs/SCALE-OUT.md, "CPU per reading"). First one SELECT ...
    FOR UPDATE locks every row in id order (as one by one: two workers never deadlock) and
    reads what each had; then one UPDATE per kind of update (the same columns and guard). The
    values go in as one JSON array read by ``json_populate_recordset(NULL::batmons, ...)``, so
    each takes its column's type from the table; the plans' starting points (energy_guard.py)
    beside them by ``unnest``.
    """
    ids = [batmon_id for batmon_id, _ in updates]
    if not updates or len(set(ids)) != len(ids):
        return None
    kinds: dict[tuple[tuple[str, ...], str], list[tuple[int, dict[str, Any], Any]]] = {}
    for batmon_id, changes in updates:
        named, base = energy_guard.split(changes)
        if energy_guard.guarded(base):  # only while no other worker moved it on (energy_guard.py)
            guard = " AND batmons.last_reading IS NOT DISTINCT FROM g.base"
        elif named.get("last_reading") is not None:  # an older reading never replaces the latest
            guard = " AND (batmons.last_reading IS NULL OR batmons.last_reading <= v.last_reading)"
        else:
            guard = ""
        kinds.setdefault((tuple(sorted(named)), guard), []).append((batmon_id, named, base))
    try:
        values = {kind: json.dumps([{"id": i, **{k: _plain(v) for k, v in c.items()}} for i, c, _ in group],
                                   allow_nan=False) for kind, group in kinds.items()}  # fmt: skip
    except (TypeError, ValueError):
        return None
    before = {int(i): (str(status), ts) for i, status, ts in conn.execute(
        "SELECT id, status, last_reading FROM batmons WHERE id = ANY(%s) ORDER BY id FOR UPDATE",
        (sorted(ids),))}  # fmt: skip
    answers: dict[int, tuple[bool, tuple[str, float | None] | None]] = {i: (False, None) for i in ids}
    for (columns, guard), group in kinds.items():
        if not columns:
            continue  # nothing to set: not updated, as one by one
        assignments = ", ".join(f"{column} = v.{column}" for column in columns)
        bases = [float(base) if energy_guard.guarded(base) and base is not None else None
                 for _, _, base in group]  # fmt: skip  # floats only: psycopg dumps one type a list
        updated = conn.execute(
            f"UPDATE batmons SET {assignments} FROM json_populate_recordset(NULL::batmons, %s) v,"
            f" unnest(%s::bigint[], %s::float8[]) g(id, base) WHERE batmons.id = v.id AND g.id = v.id{guard}"
            " RETURNING batmons.id".encode(),
            (values[(columns, guard)], [i for i, _, _ in group], bases),
        ).fetchall()  # fmt: skip
        for (i,) in updated:
            answers[int(i)] = (True, before.get(int(i)) if "status" in columns else None)
    return lambda batmon_id, _columns, _base: answers[batmon_id]


class PgShared:
    """The shared-state queries on one store handle's connection (the writer's, in serve)."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self.url = store.url  # for the error translation's redaction

    @translated
    def expire_overdue(self, now: float) -> tuple[list[tuple[int, float | None]], float | None]:
        """Mark Offline each Online batmon past its deadline; the ones this call changed, and
        the earliest deadline left (for the leader's next look)."""
        with self.store._transaction() as conn:
            expired = conn.execute(
                "UPDATE batmons SET status = 'Offline' WHERE status = 'Online'"
                " AND last_reading + update_period <= %s RETURNING id, last_reading", (now,)).fetchall()
            upcoming = conn.execute(
                "SELECT min(last_reading + update_period) FROM batmons WHERE status = 'Online'").fetchone()
        return [(int(i), ts) for i, ts in expired], None if upcoming is None else upcoming[0]

    @translated
    def decide_alarm(self, alarm_id: int, reading_ts: float,
                     decide: Callable[[dict[str, Any]], AlarmDecision | None]
                     ) -> tuple[str, dict[str, Any]] | None:  # fmt: skip
        """Lock the alarm's row, decide on it, write the change: one transaction."""
        with self.store._transaction() as conn:
            row = self.store._row(
                "SELECT a.*, b.last_reading AS batmon_latest FROM alarms a LEFT JOIN batmons b"
                " ON b.id = a.batmon_id WHERE a.id = %s FOR UPDATE OF a", (alarm_id,))  # fmt: skip
            if row is None:
                return None  # deleted meanwhile
            latest = row.pop("batmon_latest")  # None for a bank's alarm: no one batmon's latest
            if latest is not None and reading_ts < latest:
                return None  # a newer reading is the batmon's latest: its evaluation decides
            decision = decide(row)
            if decision is None:
                return None
            kind, changes = decision
            check_columns(changes, ALARM_COLUMNS)
            _update(conn, "alarms", alarm_id, changes)
        return kind, {**row, **changes}

    def leader(self, job: str) -> PgLeader:
        """An advisory-lock election for ``job`` on a connection of its own (not started)."""
        return PgLeader(self.url, job)
