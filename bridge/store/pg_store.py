"""The PostgreSQL store: bridge/store/interface.py's ``Store`` on psycopg 3.

One handle is one connection (autocommit, explicit transactions), used by one thread
at a time, like a ``SqliteStore`` handle; ``another()`` opens a second connection, and
the history readers share a ``psycopg_pool`` pool. A handle whose connection broke
(the server restarted) reconnects on its next call, so the writer's probe sees the
database come back. Every psycopg error becomes the store's own (``StorageFailed``,
``Conflict``) with a message that never holds the URL's password.

The rules are SQLite's (the contract suite, tests/test_store_contract.py, runs both):
a redelivered reading is stored once (unique key with a digest of the values: see
bridge/store/pg_schema.py), two different readings of one ts are both kept in arrival
order, and an older reading never replaces the latest (guard in the UPDATE).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import re
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import psycopg
from psycopg.rows import dict_row

from bridge.errors import Conflict, StorageFailed
from bridge.store import energy_guard
from bridge.store.db import (
    ALARM_COLUMNS,
    ALARM_INSERT_COLUMNS,
    BATMON_COLUMNS,
    BATMON_INSERT_COLUMNS,
    USER_TARGET_COLUMNS,
    check_columns,
)
from bridge.store.interface import ENERGY, METRICS, CurrentUpdate, ReadingRow, Replan, StatusBefore
from bridge.store.pg_channels import READINGS_CHANNEL, readings_notices
from bridge.store.pg_schema import PARTITION_LOCK, VALUES_HASH, migrate

if TYPE_CHECKING:  # both import this module's helpers
    from bridge.store.pg_credentials import PgCredentials
    from bridge.store.pg_history import PgHistoryReader
    from bridge.store.pg_outbox import PgOutbox
    from bridge.store.pg_shared import PgShared

P = ParamSpec("P")
R = TypeVar("R")

CONNECT_TIMEOUT_S = 10
SCHEMES = ("postgresql", "postgres")

# A group goes in by COPY into a temporary table (one per connection, emptied at each
# commit), then one INSERT ... ON CONFLICT DO NOTHING from it: COPY alone has no ON
# CONFLICT. Against one INSERT ... SELECT FROM unnest(...) per group it stored as many
# rows per second and cost this process 3.2 µs of CPU per row instead of 5.7 µs
# (benchmarks/bench_pg_insert.py); a worker's ceiling is its CPU (one GIL).
# ORDER BY n: seq follows the order the rows were given.
STAGING = (
    "CREATE TEMP TABLE IF NOT EXISTS readings_in (b bigint, t float8, v float8, c float8, p float8,"
    " s float8, d text, ck float8, dk float8, n int) ON COMMIT DELETE ROWS"
)
COPY_STAGING = "COPY readings_in (b, t, v, c, p, s, d, ck, dk, n) FROM STDIN"
# vhash covers the measured values only, as SQLite's trigger compares them: a redelivered
# reading is the same reading whatever kWh the writer planned for it.
INSERT_STAGED = (
    "INSERT INTO readings (batmon_id, ts, vhash, voltage, current, power, soc, details,"
    " charged_kwh, discharged_kwh)"
    " SELECT b, t, " + VALUES_HASH.format(v="v", c="c", p="p", s="s", d="d") + ", v, c, p, s, d, ck, dk"
    " FROM readings_in ORDER BY n ON CONFLICT DO NOTHING"
)
_PARTITION = re.compile(r"readings_y(\d{4})m(\d{2})")

HOUR = 3600
_PARTS = ", ".join(f"min({m}), max({m}), coalesce(sum({m}), 0), count({m})" for m in METRICS)
_COLUMNS = ", ".join(f"{m}_min, {m}_max, {m}_sum, {m}_count" for m in METRICS)
# The energy each reading added: its sum per hour outlives the readings.
_PARTS += ", " + ", ".join(f"coalesce(sum({e}), 0)" for e in ENERGY)
_COLUMNS += ", " + ", ".join(f"{e}_sum" for e in ENERGY)
_MERGE = ", ".join(
    f"{m}_min = LEAST(rollups.{m}_min, excluded.{m}_min),"  # LEAST/GREATEST skip NULLs
    f" {m}_max = GREATEST(rollups.{m}_max, excluded.{m}_max),"
    f" {m}_sum = rollups.{m}_sum + excluded.{m}_sum,"
    f" {m}_count = rollups.{m}_count + excluded.{m}_count"
    for m in METRICS
) + ", " + ", ".join(f"{e}_sum = rollups.{e}_sum + excluded.{e}_sum" for e in ENERGY)
# {source}: readings (with {where}) or one partition; hours as SQLite computes them.
_FOLD = (
    f"INSERT INTO rollups (batmon_id, hour, count, {_COLUMNS})"
    f" SELECT batmon_id, (floor(ts / {HOUR}) * {HOUR})::bigint AS h, count(*), {_PARTS}"
    " FROM {source} WHERE {where} GROUP BY batmon_id, h"
    " ON CONFLICT (batmon_id, hour) DO UPDATE SET count = rollups.count + excluded.count, " + _MERGE
)


def describe_url(url: str) -> str:
    """``user@host:port/db`` of a database URL: what log lines and errors may show (no password)."""
    parts = urllib.parse.urlsplit(url)
    user = f"{urllib.parse.unquote(parts.username)}@" if parts.username else ""
    try:
        port = parts.port or 5432
    except ValueError:
        port = 5432
    return f"{user}{parts.hostname or 'localhost'}:{port}{parts.path or '/'}"


def _redact(text: str, url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    # libpq takes a password in the userinfo or as ?password=...
    given = [parts.password or "", *urllib.parse.parse_qs(parts.query).get("password", [])]
    forms = {form for g in given for form in (g, urllib.parse.unquote(g), urllib.parse.quote(g, safe=""))}
    for secret in sorted(forms - {""}, key=len, reverse=True):
        text = text.replace(secret, "****")
    return text


def one_line(exc: BaseException, url: str) -> str:
    """No SQL, no password: what an operator needs to recognise the fault."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return _redact(text, url)[:200]


def translated(method: Callable[P, R]) -> Callable[P, R]:
    """Run a store method with psycopg's errors turned into Conflict or StorageFailed."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        url = getattr(args[0], "url", "") if args else ""
        try:
            return method(*args, **kwargs)
        except (psycopg.ProgrammingError, psycopg.InterfaceError):
            raise  # a bug (a bad statement), not the database's answer
        except psycopg.IntegrityError as exc:
            raise Conflict(one_line(exc, url)) from None
        except psycopg.Error as exc:
            raise StorageFailed(one_line(exc, url)) from None

    return wrapper


def connect(url: str) -> psycopg.Connection[Any]:
    """A connection in autocommit (every store transaction is explicit).

    Floats print in their shortest exact form whatever the server's default, so the
    values digest of a reading is the same on every worker.
    """
    conn = psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
    conn.execute("SET extra_float_digits = 1")
    return conn


class OwnConnection:
    """A reader's connection of its own, made again on the next call once broken (one thread
    at a time): the credential watcher's, the other workers' checks."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: psycopg.Connection[Any] | None = None

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.broken:
            self.close()
            self._conn = connect(self._url)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None


def month_bounds(ts: float) -> tuple[float, float, str]:
    """(start, end, partition name) of the UTC month holding ``ts``."""
    moment = dt.datetime.fromtimestamp(ts, dt.UTC)
    start = dt.datetime(moment.year, moment.month, 1, tzinfo=dt.UTC)
    end = dt.datetime(moment.year + (moment.month == 12), moment.month % 12 + 1, 1, tzinfo=dt.UTC)
    return start.timestamp(), end.timestamp(), f"readings_y{moment.year:04d}m{moment.month:02d}"


def _plain(value: Any) -> Any:
    """Flags are integers in the schema (as on SQLite): True -> 1."""
    return int(value) if isinstance(value, bool) else value


class PostgresStore:
    """One connection to a PostgreSQL database; each method is one named query or transaction."""

    def __init__(self, url: str, conn: psycopg.Connection[Any]) -> None:
        self.url = url
        self._conn_ = conn
        self._months: dict[str, tuple[float, float]] = {}  # partitions known to exist
        self._staged_on: psycopg.Connection[Any] | None = None  # the connection that has readings_in

    @classmethod
    def open(cls, url: str) -> PostgresStore:
        """Connect to ``url`` and migrate; StorageFailed (no password) when that cannot be done."""
        try:
            conn = connect(url)
        except psycopg.Error as exc:
            raise StorageFailed(f"cannot reach PostgreSQL at {describe_url(url)}: {one_line(exc, url)}"
                                ) from None
        try:
            migrate(conn)
        except psycopg.Error as exc:
            conn.close()
            raise StorageFailed(f"cannot migrate PostgreSQL at {describe_url(url)}: {one_line(exc, url)}"
                                ) from None
        return cls(url, conn)

    @translated
    def another(self) -> PostgresStore:
        """A second connection to the same database, for another thread."""
        return PostgresStore(self.url, connect(self.url))

    def close(self) -> None:
        """Close the connection."""
        self._conn_.close()

    @property
    def _conn(self) -> psycopg.Connection[Any]:
        # A broken connection (server restart, network) is replaced on the next call.
        if self._conn_.broken:
            with contextlib.suppress(psycopg.Error):
                self._conn_.close()
            self._conn_ = connect(self.url)
        return self._conn_

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection[Any]]:
        conn = self._conn
        with conn.transaction():
            yield conn

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._conn.cursor(row_factory=dict_row) as cur:
            cur.execute(sql, params)
            return cur.fetchall()

    def _row(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        rows = self._rows(sql, params)
        return rows[0] if rows else None

    def _value(self, sql: str | bytes, params: Sequence[Any] = ()) -> Any:
        row = self._conn.execute(sql, params).fetchone()
        return None if row is None else row[0]

    # -- health ------------------------------------------------------------------------
    def ping(self) -> bool:
        """True when the database answers a query."""
        try:
            return bool(self._value("SELECT 1") == 1)
        except psycopg.Error:
            return False

    @translated
    def probe(self) -> None:
        """A tiny real write: raises StorageFailed while the database cannot be written."""
        with self._transaction() as conn:
            conn.execute("UPDATE schema_version SET version = version")

    # -- readings (the writer's sink) ---------------------------------------------------
    @translated
    def write(self, rows: Sequence[ReadingRow], updates: Sequence[CurrentUpdate],
              replan: Replan | None = None) -> StatusBefore:  # fmt: skip
        """Append ``rows`` and apply ``updates`` in one transaction; the batmons whose stored
        status changed, with what they had (the writer announces those changes only).
        With ``replan``, a plan another worker overtook is made again under the rows' locks."""
        for _, changes in updates:
            check_columns(energy_guard.split(changes)[0], BATMON_COLUMNS)
        rows = list(rows)
        for attempt in (1, 2):
            self._ensure_partitions(row[1] for row in rows)
            conn = self._conn
            if rows and self._staged_on is not conn:
                # Committed on its own: made inside a group that fails, it would be gone with it.
                conn.execute(STAGING)
                self._staged_on = conn
            try:
                changed: StatusBefore = {}
                with self._transaction() as conn:
                    if replan is not None and (stale := _overtaken(conn, updates)):
                        # Locked now (id order, as below): planned again from the rows, nobody
                        # can move them on before this commit.
                        rows, updates = replan(stale)  # the same readings (same months)
                    if rows:
                        self._insert_rows(conn, rows)
                    # Row locks in one order (by batmon), so two workers never deadlock;
                    # the sort is stable, so one batmon's updates keep their order.
                    from bridge.store.pg_shared import update_group

                    grouped = update_group(conn, updates)  # one statement when they are alike
                    update = grouped or functools.partial(self._update_batmon, conn)
                    before = energy_guard.apply(sorted(updates, key=lambda u: u[0]), update,
                                                functools.partial(_state, conn))  # fmt: skip
                    for batmon_id, changes in updates:
                        was = before.get(batmon_id)
                        if was is not None and was[0] != changes.get("status", was[0]):
                            changed[batmon_id] = was
                    # Other workers' live dashboards: which latest values moved (at commit).
                    moved = [b for b, c in updates if c.get("last_reading") is not None]
                    for payload in readings_notices(moved):
                        conn.execute("SELECT pg_notify(%s, %s)", (READINGS_CHANNEL, payload))
                return changed
            except psycopg.errors.CheckViolation as exc:
                # Retention (maybe another worker's) dropped a month we knew: make it again.
                if attempt == 2 or "no partition" not in str(exc):
                    raise
                self._months.clear()
        raise AssertionError("the second attempt returns or raises")

    def _insert_rows(self, conn: psycopg.Connection[Any], rows: Sequence[ReadingRow]) -> None:
        with conn.cursor() as cur:
            with cur.copy(COPY_STAGING) as copy:
                for n, row in enumerate(rows):
                    copy.write_row((*row, n))
            cur.execute(INSERT_STAGED)

    def _ensure_partitions(self, stamps: Iterable[float]) -> None:
        """Make the monthly partitions these timestamps need, each in its own short
        transaction under an advisory lock (two workers may need the same month at once)."""
        known = list(self._months.values())
        for ts in stamps:
            if any(lo <= ts < hi for lo, hi in known):
                continue
            lo, hi, name = month_bounds(ts)
            with self._transaction() as conn:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK,))
                if self._value("SELECT to_regclass(%s)", (name,)) is None:
                    conn.execute(f"CREATE TABLE {name} PARTITION OF readings"  # name: digits only
                                 f" FOR VALUES FROM ({lo!r}) TO ({hi!r})".encode())  # fmt: skip
            self._months[name] = (lo, hi)
            known.append((lo, hi))

    @translated
    def history(self, batmon_id: int, min_ts: float, max_ts: float) -> Iterator[dict[str, Any]]:
        """Readings of one batmon with min_ts <= ts < max_ts, in time then arrival order."""
        return iter(self._rows(
            "SELECT ts, voltage, current, power, soc, details FROM readings"
            " WHERE batmon_id = %s AND ts >= %s AND ts < %s ORDER BY ts, seq",
            (batmon_id, min_ts, max_ts),
        ))  # fmt: skip

    @translated
    def reading_count(self, batmon_id: int) -> int:
        """How many history rows a batmon has."""
        return int(self._value("SELECT count(*) FROM readings WHERE batmon_id = %s", (batmon_id,)))

    def history_reader(self, workers: int = 2) -> PgHistoryReader:
        """Connections of a pool in a thread pool, for history answers."""
        from bridge.store.pg_history import PgHistoryReader

        return PgHistoryReader(self.url, workers=workers)

    # -- users ----------------------------------------------------------------------------
    @translated
    def add_user(self, email: str, api_key_hash: str, created: float) -> int:
        """Insert a user; Conflict if the email exists."""
        with self._transaction():
            return int(self._value("INSERT INTO users (email, api_key_hash, created) VALUES (%s, %s, %s)"
                                   " RETURNING id", (email, api_key_hash, created)))  # fmt: skip

    @translated
    def users(self) -> list[dict[str, Any]]:
        """Every user, oldest first."""
        return self._rows("SELECT * FROM users ORDER BY id")

    @translated
    def user_by_key_hash(self, api_key_hash: str) -> dict[str, Any] | None:
        """The user holding this api key hash."""
        return self._row("SELECT * FROM users WHERE api_key_hash = %s", (api_key_hash,))

    @translated
    def user_by_email(self, email: str) -> dict[str, Any] | None:
        """The user with this email."""
        return self._row("SELECT * FROM users WHERE email = %s", (email,))

    @translated
    def user_by_id(self, user_id: int) -> dict[str, Any] | None:
        """The user with this id."""
        return self._row("SELECT * FROM users WHERE id = %s", (user_id,))

    @translated
    def set_user_targets(self, user_id: int, targets: dict[str, str]) -> None:
        """Set notification target URLs (email_url, whatsapp_url, sms_url)."""
        check_columns(targets, USER_TARGET_COLUMNS)
        if targets:
            with self._transaction() as conn:
                _update(conn, "users", user_id, targets)

    # -- batmons ----------------------------------------------------------------------------
    @translated
    def retired_ids(self) -> set[int]:
        """Ids of deleted batmons, alarms and banks."""
        return {row[0] for row in self._conn.execute("SELECT id FROM retired_ids")}

    @translated
    def add_batmon(self, row: dict[str, Any]) -> None:
        """Insert a batmon row (its id chosen by the caller); Conflict if the id was ever used."""
        check_columns(row, BATMON_INSERT_COLUMNS)
        with self._transaction() as conn:
            _insert_unretired(conn, "batmons", row)

    @translated
    def batmons(self) -> list[dict[str, Any]]:
        """Every batmon, oldest first."""
        return self._rows("SELECT * FROM batmons ORDER BY created, id")

    @translated
    def update_batmon(self, batmon_id: int, changes: dict[str, Any]) -> None:
        """Change some columns of one batmon."""
        check_columns(changes, BATMON_COLUMNS)
        if changes:
            with self._transaction() as conn:
                self._update_batmon(conn, batmon_id, changes)

    @staticmethod
    def _update_batmon(conn: psycopg.Connection[Any], batmon_id: int, changes: dict[str, Any],
                       base: Any = energy_guard.UNGUARDED) -> tuple[bool, tuple[str, float | None] | None]:
        """UPDATE one batmon: whether the row was updated, and, with ``status`` among the
        changes, the (status, last_reading) the row had just before."""
        check_columns(changes, BATMON_COLUMNS)
        guard = None
        if energy_guard.guarded(base):  # only while no other worker moved it on (energy_guard.py)
            guard = ("last_reading IS NOT DISTINCT FROM %s", base)
        elif "last_reading" in changes and changes["last_reading"] is not None:
            # An older reading never replaces the latest, whichever worker commits last.
            guard = ("last_reading IS NULL OR last_reading <= %s", changes["last_reading"])
        if "status" not in changes:
            return _update(conn, "batmons", batmon_id, changes, guard=guard) > 0, None
        from bridge.store.pg_shared import update_returning_before

        before = update_returning_before(conn, batmon_id, changes, guard)
        return before is not None, before

    @translated
    def delete_batmon(self, batmon_id: int) -> None:
        """Delete a batmon and its alarms, retire the ids, mark its readings for purging."""
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO retired_ids (id) SELECT %s UNION SELECT id FROM alarms WHERE batmon_id = %s"
                " ON CONFLICT DO NOTHING", (batmon_id, batmon_id))  # fmt: skip
            conn.execute("DELETE FROM alarms WHERE batmon_id = %s", (batmon_id,))
            gone = conn.execute("DELETE FROM batmons WHERE id = %s", (batmon_id,)).rowcount
            if gone:
                conn.execute("INSERT INTO deleted_batmons (batmon_id, deleted_at)"
                             " VALUES (%s, extract(epoch FROM now())) ON CONFLICT DO NOTHING",
                             (batmon_id,))  # fmt: skip

    @translated
    def deleted_with_data(self) -> list[int]:
        """Deleted batmons whose readings or rollups are not purged yet, oldest delete first."""
        return [r[0] for r in self._conn.execute(
            "SELECT batmon_id FROM deleted_batmons ORDER BY deleted_at, batmon_id")]  # fmt: skip

    @translated
    def purge_deleted(self, batmon_id: int, max_rows: int) -> bool:
        """Delete the oldest ``max_rows`` readings of a deleted batmon; with the last ones,
        its rollups and its mark. True once all are gone."""
        with self._transaction() as conn:
            if not conn.execute("SELECT 1 FROM deleted_batmons WHERE batmon_id = %s",
                                (batmon_id,)).fetchone():  # fmt: skip
                return True
            edge = conn.execute(
                "SELECT ts, seq FROM readings WHERE batmon_id = %s ORDER BY ts, seq LIMIT 1 OFFSET %s",
                (batmon_id, max_rows),
            ).fetchone()
            if edge is not None:
                conn.execute("DELETE FROM readings WHERE batmon_id = %s AND (ts, seq) < (%s, %s)",
                             (batmon_id, edge[0], edge[1]))  # fmt: skip
                return False
            conn.execute("DELETE FROM readings WHERE batmon_id = %s", (batmon_id,))
            conn.execute("DELETE FROM rollups WHERE batmon_id = %s", (batmon_id,))
            conn.execute("DELETE FROM deleted_batmons WHERE batmon_id = %s", (batmon_id,))
            return True

    # -- alarms ------------------------------------------------------------------------------
    @translated
    def add_alarm(self, row: dict[str, Any]) -> None:
        """Insert an alarm row (its id chosen by the caller); Conflict if the id was ever used."""
        check_columns(row, ALARM_INSERT_COLUMNS)
        with self._transaction() as conn:
            _insert_unretired(conn, "alarms", row)

    @translated
    def alarms(self) -> list[dict[str, Any]]:
        """Every alarm, oldest first."""
        return self._rows("SELECT * FROM alarms ORDER BY update_time, id")

    @translated
    def update_alarm(self, alarm_id: int, changes: dict[str, Any]) -> None:
        """Change some columns of one alarm."""
        check_columns(changes, ALARM_COLUMNS)
        if changes:
            with self._transaction() as conn:
                _update(conn, "alarms", alarm_id, changes)

    @translated
    def delete_alarm(self, alarm_id: int) -> None:
        """Delete an alarm; its id is never handed out again."""
        with self._transaction() as conn:
            conn.execute("INSERT INTO retired_ids (id) VALUES (%s) ON CONFLICT DO NOTHING", (alarm_id,))
            conn.execute("DELETE FROM alarms WHERE id = %s", (alarm_id,))

    # -- banks -------------------------------------------------------------------------------
    @translated
    def banks(self) -> list[dict[str, Any]]:
        """Every bank, oldest first, each with ``batmon_ids`` in the order they were given."""
        members: dict[int, list[int]] = {}
        for bank_id, batmon_id in self._conn.execute(
            "SELECT bank_id, batmon_id FROM bank_members ORDER BY bank_id, position"
        ):
            members.setdefault(bank_id, []).append(batmon_id)
        return [{**row, "batmon_ids": members.get(row["id"], [])}
                for row in self._rows("SELECT id, user_id, name, created FROM banks ORDER BY created, id")]

    @translated
    def add_bank(self, bank_id: int, user_id: int, name: str, created: float, batmon_ids: list[int]) -> None:
        """Insert a bank with its members; Conflict if the id was ever used."""
        with self._transaction() as conn:
            if conn.execute("SELECT 1 FROM retired_ids WHERE id = %s", (bank_id,)).fetchone():
                raise Conflict(f"id {bank_id} was used before")
            conn.execute("INSERT INTO banks (id, user_id, name, created) VALUES (%s, %s, %s, %s)",
                         (bank_id, user_id, name, created))  # fmt: skip
            _insert_members(conn, bank_id, batmon_ids)

    @translated
    def rename_bank(self, bank_id: int, name: str) -> None:
        """Change a bank's name."""
        with self._transaction() as conn:
            conn.execute("UPDATE banks SET name = %s WHERE id = %s", (name, bank_id))

    @translated
    def set_bank_members(self, bank_id: int, batmon_ids: list[int]) -> None:
        """Replace a bank's members (and their order)."""
        with self._transaction() as conn:
            conn.execute("DELETE FROM bank_members WHERE bank_id = %s", (bank_id,))
            _insert_members(conn, bank_id, batmon_ids)

    @translated
    def delete_bank(self, bank_id: int) -> None:
        """Delete a bank (not its batmons) with its alarms; their ids are retired."""
        with self._transaction() as conn:
            conn.execute("INSERT INTO retired_ids (id) SELECT %s UNION SELECT id FROM alarms"
                         " WHERE bank_id = %s ON CONFLICT DO NOTHING", (bank_id, bank_id))  # fmt: skip
            conn.execute("DELETE FROM alarms WHERE bank_id = %s", (bank_id,))
            conn.execute("DELETE FROM bank_members WHERE bank_id = %s", (bank_id,))
            conn.execute("DELETE FROM banks WHERE id = %s", (bank_id,))

    # -- notices ---------------------------------------------------------------------------
    @property
    def outbox(self) -> PgOutbox:
        """The notice outbox on this connection."""
        from bridge.store.pg_outbox import PgOutbox

        return PgOutbox(self)

    def shared(self) -> PgShared:
        """Workers on one database do each status change and alarm change once (pg_shared.py)."""
        from bridge.store.pg_shared import PgShared

        return PgShared(self)

    # -- credentials -----------------------------------------------------------------------
    @property
    def credentials(self) -> PgCredentials:
        """Api key resets and MQTT tokens on this connection."""
        from bridge.store.pg_credentials import PgCredentials

        return PgCredentials(self)

    # -- retention and rollups -----------------------------------------------------------------
    @translated
    def batmons_with_readings_before(self, cutoff: float) -> list[int]:
        """Ids of batmons that have readings older than ``cutoff`` (only old partitions are read)."""
        return [r[0] for r in self._conn.execute(
            "SELECT DISTINCT batmon_id FROM readings WHERE ts < %s ORDER BY batmon_id",
            (cutoff,))]  # fmt: skip

    @translated
    def prune_batch(self, batmon_id: int, cutoff: float, batch_rows: int) -> int:
        """Fold old readings into rollups and remove them: first every month wholly before
        ``cutoff`` (all batmons at once, then DROP of its partition), then the oldest
        ``batch_rows`` left of this batmon (DELETE). Returns how many of this batmon's."""
        pruned = self._drop_past_months(batmon_id, cutoff)
        with self._transaction() as conn:
            last = conn.execute(
                "SELECT ts, seq FROM readings WHERE batmon_id = %s AND ts < %s"
                " ORDER BY ts, seq LIMIT 1 OFFSET %s",
                (batmon_id, cutoff, batch_rows - 1)).fetchone()  # fmt: skip
            params: dict[str, Any] = {"batmon": batmon_id, "cutoff": cutoff}
            where = "batmon_id = %(batmon)s AND ts < %(cutoff)s"
            if last is not None:
                params.update(ts=last[0], seq=last[1])
                where = "batmon_id = %(batmon)s AND (ts, seq) <= (%(ts)s, %(seq)s)"
            conn.execute(_FOLD.format(source="readings", where=where).encode(), params)
            return pruned + conn.execute(f"DELETE FROM readings WHERE {where}".encode(), params).rowcount

    def _drop_past_months(self, batmon_id: int, cutoff: float) -> int:
        """Fold and drop each partition that ends at or before ``cutoff``; rows of ``batmon_id`` in them."""
        names = [r[0] for r in self._conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'readings'::regclass ORDER BY c.relname")]  # fmt: skip
        pruned = 0
        for name in names:
            match = _PARTITION.fullmatch(name)
            if match is None:
                continue
            _, hi, _ = month_bounds(dt.datetime(int(match[1]), int(match[2]), 1, tzinfo=dt.UTC).timestamp())
            if hi > cutoff:
                continue
            with self._transaction() as conn:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK,))
                if self._value("SELECT to_regclass(%s)", (name,)) is None:
                    continue  # another worker dropped it meanwhile
                pruned += int(self._value(f"SELECT count(*) FROM {name} WHERE batmon_id = %s".encode(),
                                          (batmon_id,)))  # fmt: skip
                conn.execute(_FOLD.format(source=name, where="true").encode())
                conn.execute(f"DROP TABLE {name}".encode())
            self._months.pop(name, None)
        return pruned

    @translated
    def rollups(self, batmon_id: int) -> list[dict[str, Any]]:
        """The batmon's hourly rollups, in hour order."""
        return self._rows("SELECT * FROM rollups WHERE batmon_id = %s ORDER BY hour", (batmon_id,))

    # -- tests ---------------------------------------------------------------------------------
    def truncate_all_for_tests(self) -> None:
        """Empty every table and drop the partitions (a test's clean start on a shared database);
        never called by the product."""
        with self._transaction() as conn:
            for (name,) in conn.execute(
                    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                    " WHERE i.inhparent = 'readings'::regclass").fetchall():  # fmt: skip
                conn.execute(f"DROP TABLE {name}".encode())
            conn.execute("TRUNCATE users, batmons, readings, alarms, retired_ids, outbox, outbox_attempts,"
                         " rollups, banks, bank_members, deleted_batmons, user_tokens"
                         " RESTART IDENTITY CASCADE")  # fmt: skip


def _update(conn: psycopg.Connection[Any], table: str, key: int, changes: dict[str, Any],
            guard: tuple[str, Any] | None = None) -> int:  # fmt: skip
    """UPDATE one row by id; the column names were checked by the caller (never input).
    Returns how many rows changed."""
    assignments = ", ".join(f"{column} = %s" for column in changes)
    where, params = ("", ()) if guard is None else (f" AND ({guard[0]})", (guard[1],))
    return conn.execute(f"UPDATE {table} SET {assignments} WHERE id = %s{where}".encode(),
                        (*(_plain(v) for v in changes.values()), key, *params)).rowcount  # fmt: skip


def _overtaken(conn: psycopg.Connection[Any], updates: Sequence[CurrentUpdate]) -> dict[int, dict[str, Any]]:
    """Lock the guarded updates' batmon rows (in id order) and return the state of each one
    another writer moved on since its plan started (energy_guard.py); {} when none was."""
    bases = {}
    for batmon_id, changes in updates:
        base = energy_guard.split(changes)[1]
        if energy_guard.guarded(base):
            bases[batmon_id] = base
    if not bases:
        return {}
    columns = ", ".join(energy_guard.STATE_COLUMNS)
    sql = f"SELECT id, {columns} FROM batmons WHERE id = ANY(%s) ORDER BY id FOR UPDATE"
    found = conn.execute(sql.encode(), (sorted(bases),)).fetchall()
    stale = {}
    for row in found:
        state = dict(zip(energy_guard.STATE_COLUMNS, row[1:], strict=True))
        if not energy_guard.holds(state["last_reading"], bases[row[0]]):
            stale[row[0]] = state
    return stale


def _state(conn: psycopg.Connection[Any], batmon_id: int) -> dict[str, Any] | None:
    """A batmon's energy_guard.STATE_COLUMNS, or None once it is gone."""
    columns = ", ".join(energy_guard.STATE_COLUMNS)
    found = conn.execute(f"SELECT {columns} FROM batmons WHERE id = %s".encode(), (batmon_id,)).fetchone()
    return None if found is None else dict(zip(energy_guard.STATE_COLUMNS, found, strict=True))


def _insert_unretired(conn: psycopg.Connection[Any], table: str, row: dict[str, Any]) -> None:
    """INSERT a row whose id was never retired; Conflict otherwise (ids are never reused)."""
    if conn.execute("SELECT 1 FROM retired_ids WHERE id = %s", (row["id"],)).fetchone():
        raise Conflict(f"id {row['id']} was used before")
    columns = ", ".join(row)
    marks = ", ".join(["%s"] * len(row))
    conn.execute(f"INSERT INTO {table} ({columns}) VALUES ({marks})".encode(),
                 tuple(_plain(v) for v in row.values()))  # fmt: skip


def _insert_members(conn: psycopg.Connection[Any], bank_id: int, batmon_ids: list[int]) -> None:
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO bank_members (bank_id, batmon_id, position) VALUES (%s, %s, %s)",
                        [(bank_id, batmon_id, position) for position, batmon_id in enumerate(batmon_ids)])
