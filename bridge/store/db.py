"""The SQLite store: named queries over one file, the only place batmon SQL is written.

``SqliteStore`` implements bridge/store/interface.py's ``Store``. One handle is one
connection, used by one thread at a time: the event loop never calls it (the writer's
thread, the pruner's and the history workers each have their own; see docs/DESIGN.md).
Every ``sqlite3`` error is turned into the store's own errors here (``StorageFailed``,
``Conflict``), so callers never see the driver.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from bridge.datadir import prepare_data_dir, private_database
from bridge.errors import Conflict, StorageFailed
from bridge.store import energy_guard, retention
from bridge.store.banks import BankStore
from bridge.store.credentials import SqliteCredentials
from bridge.store.history import HistoryReader
from bridge.store.interface import CurrentUpdate, ReadingRow, Replan
from bridge.store.outbox import Outbox
from bridge.store.schema import SchemaTooNewError, migrate
from bridge.store.sqlite_errors import translated

DB_FILENAME = "batmon.sqlite3"

# Column names a caller may change through update_batmon / update_alarm; anything
# else is a programming error, never a column name built from input.
BATMON_COLUMNS = frozenset(
    {
        "name", "type", "token", "update_period", "voltage", "current", "power", "soc",
        "details", "last_reading", "status", "notification_enabled", "whatsapp_enabled",
        "sms_enabled", "voltage_units", "current_units", "power_units", "soc_units",
        "capacity_ah",
        # energy counters and their integration state (bridge/energy.py)
        "energy_charged_kwh", "energy_discharged_kwh", "energy_point_ts", "energy_point_power",
        "device_charged_kwh", "device_discharged_kwh",
    }
)  # fmt: skip
BATMON_INSERT_COLUMNS = BATMON_COLUMNS | {"id", "user_id", "created"}
ALARM_COLUMNS = frozenset(
    {
        "name", "metric", "condition", "threshold", "repeat_delay", "enabled", "triggered",
        "trigger_time", "akn", "last_notice", "update_time", "clear_value",
    }
)  # fmt: skip
ALARM_INSERT_COLUMNS = ALARM_COLUMNS | {"id", "batmon_id", "bank_id"}  # one of the two is None
USER_TARGET_COLUMNS = frozenset({"email_url", "whatsapp_url", "sms_url"})

PROBE_BYTES = 256 * 1024
"""Fresh bytes the failing writer's probe takes beside the database: more than a group
of 1,000 readings adds to the WAL (78 KB measured), so when the probe finds room, a
group finds it too."""

# A redelivered reading (same batmon, ts and values) is stored once, a different one with
# the same ts beside it in arrival order: the schema's trigger decides (schema.py, 3 and 6).
INSERT_READING = (
    "INSERT INTO readings (batmon_id, ts, voltage, current, power, soc, details, charged_kwh,"
    " discharged_kwh) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
)

class SqliteStore:
    """One connection to one SQLite file in WAL mode; each method is one named query or transaction."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        # sqlite-utils for its dict rows and migrations; transactions are ours (BEGIN IMMEDIATE).
        self.db = Database(conn, execute_plugins=False)
        self.path = path

    @staticmethod
    def _connect(path: Path, synchronous: str = "NORMAL") -> sqlite3.Connection:
        # Every store transaction is explicit: BEGIN IMMEDIATE takes the write lock up front,
        # so a busy database waits instead of failing mid-transaction. (The driver's own
        # implicit transactions stay on for tools that write through ``db`` in bulk.)
        # check_same_thread=False only so whoever closes it may; one thread uses it at a time.
        conn = sqlite3.connect(str(path), check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a commit survives a killed process (the promise behind every ack);
        # only a power cut can lose the last ones. FULL adds an fsync per commit: measured
        # 4.8 ms against 0.05 ms, it would cap one client at ~200 readings/s.
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    @classmethod
    def open(cls, path: Path) -> SqliteStore:
        """Open (creating and migrating as needed) the database file at ``path``.

        The folder is made 0700 and the file 0600 (its -wal and -shm inherit that) before
        SQLite touches them. Raises OSError, never sqlite3.Error, when the file cannot be
        opened for writing (read-only folder...): the caller prints one line.
        """
        prepare_data_dir(path.parent)
        private_database(path)
        try:
            conn = cls._connect(path)
        except sqlite3.Error as exc:
            raise OSError(errno.EIO, f"cannot open database {path.name}: {exc}") from None
        try:
            migrate(Database(conn, execute_plugins=False))
        except (sqlite3.Error, SchemaTooNewError) as exc:  # one line for the user, not a traceback
            conn.close()
            raise OSError(errno.EIO, f"cannot open database {path.name}: {exc}") from None
        return cls(conn, path)

    @translated
    def another(self) -> SqliteStore:
        """A second connection to the same file, for another thread."""
        return SqliteStore(self._connect(self.path), self.path)

    def close(self) -> None:
        """Close the connection (the last one out checkpoints the WAL)."""
        self._conn.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        cursor = self._conn.execute(sql, params)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def _row(self, sql: str, params: tuple[Any, ...] = ()) -> dict[str, Any] | None:
        rows = self._rows(sql, params)
        return rows[0] if rows else None

    # -- health ----------------------------------------------------------------------
    def ping(self) -> bool:
        """True when the database answers a query."""
        try:
            return bool(self._conn.execute("SELECT 1").fetchone() == (1,))
        except sqlite3.Error:
            return False

    # -- readings (the writer's sink) --------------------------------------------------
    @translated
    def write(self, rows: list[ReadingRow] | Any, updates: list[CurrentUpdate] | Any,
              replan: Replan | None = None) -> None:  # fmt: skip
        """Append ``rows`` and apply ``updates`` in one transaction. One process owns the file,
        so a stale plan (StaleState) is a bug's sign, not a race: ``replan`` is not used."""
        with self._transaction() as conn:
            conn.executemany(INSERT_READING, rows)
            energy_guard.apply(updates, functools.partial(self._update_batmon, conn),
                               functools.partial(_state, conn))  # fmt: skip

    @translated
    def probe(self) -> None:
        """Take fresh blocks on the data disk, then rewrite one page: fails like a group would.

        The page rewrite alone fits in WAL space that the failed commit had already taken,
        and said "ok" on a full disk (issue 15); fresh blocks need the room a group needs.
        They are allocated, not written (fallocate): no flash wear, and a full disk, a quota
        or a file-size limit refuses them all the same (measured on tmpfs).
        """
        probe_path = self.path.with_name(self.path.name + "-probe")
        try:
            fd = os.open(probe_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(fd, 0, PROBE_BYTES)
                else:  # no fallocate (macOS): write the zeros
                    with open(fd, "wb", closefd=False) as probe_file:
                        probe_file.write(bytes(PROBE_BYTES))
                        probe_file.flush()
                        os.fsync(fd)
            finally:
                os.close(fd)
                probe_path.unlink(missing_ok=True)
        except OSError as exc:
            # The store's own error: the connection is fine, the disk is not. No path.
            raise StorageFailed(f"the data disk refused {PROBE_BYTES // 1024} KiB ({exc.strerror})") from None
        with self._transaction() as conn:
            conn.execute("UPDATE schema_version SET version = version")

    @translated
    def history(self, batmon_id: int, min_ts: float, max_ts: float) -> Iterator[dict[str, Any]]:
        """Readings of one batmon with min_ts <= ts < max_ts, in time then arrival order.

        For tools and tests on this connection; the API streams through history_reader().
        """
        return iter(self._rows(
            "SELECT ts, voltage, current, power, soc, details FROM readings"
            " WHERE batmon_id = ? AND ts >= ? AND ts < ? ORDER BY ts, seq",
            (batmon_id, min_ts, max_ts),
        ))  # fmt: skip

    @translated
    def reading_count(self, batmon_id: int) -> int:
        """How many history rows a batmon has."""
        return int(self._conn.execute(
            "SELECT count(*) FROM readings WHERE batmon_id = ?", (batmon_id,)
        ).fetchone()[0])  # fmt: skip

    def history_reader(self, workers: int = 2) -> HistoryReader:
        """Read-only connections in a thread pool, for history answers."""
        return HistoryReader(self.path, workers=workers)

    # -- users ------------------------------------------------------------------------
    @translated
    def add_user(self, email: str, api_key_hash: str, created: float) -> int:
        """Insert a user; Conflict if the email exists."""
        with self._transaction() as conn:
            cur = conn.execute("INSERT INTO users (email, api_key_hash, created) VALUES (?, ?, ?)",
                               (email, api_key_hash, created))  # fmt: skip
        return int(cur.lastrowid or 0)

    @translated
    def users(self) -> list[dict[str, Any]]:
        """Every user, oldest first."""
        return self._rows("SELECT * FROM users ORDER BY id")

    @translated
    def user_by_key_hash(self, api_key_hash: str) -> dict[str, Any] | None:
        """The user holding this api key hash (for keys made by another process)."""
        return self._row("SELECT * FROM users WHERE api_key_hash = ?", (api_key_hash,))

    @translated
    def user_by_email(self, email: str) -> dict[str, Any] | None:
        """The user with this email."""
        return self._row("SELECT * FROM users WHERE email = ?", (email,))

    @translated
    def user_by_id(self, user_id: int) -> dict[str, Any] | None:
        """The user with this id."""
        return self._row("SELECT * FROM users WHERE id = ?", (user_id,))

    @translated
    def set_user_targets(self, user_id: int, targets: dict[str, str]) -> None:
        """Set notification target URLs (email_url, whatsapp_url, sms_url)."""
        check_columns(targets, USER_TARGET_COLUMNS)
        if targets:
            with self._transaction() as conn:
                _update(conn, "users", user_id, targets)

    # -- batmons -----------------------------------------------------------------------
    @translated
    def retired_ids(self) -> set[int]:
        """Ids of deleted batmons and alarms."""
        return {row[0] for row in self._conn.execute("SELECT id FROM retired_ids")}

    @translated
    def add_batmon(self, row: dict[str, Any]) -> None:
        """Insert a batmon row (its id chosen by the caller); Conflict if the id was ever used."""
        check_columns(row, BATMON_INSERT_COLUMNS)
        with self._transaction() as conn:
            _insert_unretired(conn, "batmons", row)

    @translated
    def batmons(self) -> list[dict[str, Any]]:
        """Every batmon, oldest first, for loading the in-memory registry."""
        return self._rows("SELECT * FROM batmons ORDER BY created, id")

    @translated
    def update_batmon(self, batmon_id: int, changes: dict[str, Any]) -> None:
        """Change some columns of one batmon."""
        check_columns(changes, BATMON_COLUMNS)
        if changes:
            with self._transaction() as conn:
                self._update_batmon(conn, batmon_id, changes)

    @staticmethod
    def _update_batmon(conn: sqlite3.Connection, batmon_id: int, changes: dict[str, Any],
                       base: Any = energy_guard.UNGUARDED) -> tuple[bool, None]:  # fmt: skip
        """UPDATE one batmon: whether the row was updated (and nothing more to say)."""
        check_columns(changes, BATMON_COLUMNS)
        guard = None
        if energy_guard.guarded(base):  # only while nobody else moved it on (energy_guard.py)
            guard = ("last_reading IS ?", base)
        elif "last_reading" in changes and changes["last_reading"] is not None:
            # An older reading never replaces the latest, whoever planned it.
            guard = ("last_reading IS NULL OR last_reading <= ?", changes["last_reading"])
        return _update(conn, "batmons", batmon_id, changes, guard=guard) > 0, None

    @translated
    def delete_batmon(self, batmon_id: int) -> None:
        """Delete a batmon and its alarms, retire the ids for good, and mark its readings
        for ``purge_deleted`` (one short transaction whatever the batmon's history)."""
        with self._transaction() as conn:
            alarm_ids = [r[0] for r in conn.execute("SELECT id FROM alarms WHERE batmon_id = ?",
                                                    (batmon_id,))]  # fmt: skip
            conn.executemany("INSERT OR IGNORE INTO retired_ids (id) VALUES (?)",
                             [(i,) for i in [batmon_id, *alarm_ids]])  # fmt: skip
            conn.execute("DELETE FROM alarms WHERE batmon_id = ?", (batmon_id,))
            gone = conn.execute("DELETE FROM batmons WHERE id = ?", (batmon_id,)).rowcount
            if gone:
                conn.execute("INSERT OR IGNORE INTO deleted_batmons (batmon_id, deleted_at)"
                             " VALUES (?, unixepoch())", (batmon_id,))  # fmt: skip

    @translated
    def deleted_with_data(self) -> list[int]:
        """Deleted batmons whose readings or rollups are not purged yet, oldest delete first."""
        return [r[0] for r in self._conn.execute(
            "SELECT batmon_id FROM deleted_batmons ORDER BY deleted_at, batmon_id")]  # fmt: skip

    @translated
    def purge_deleted(self, batmon_id: int, max_rows: int) -> bool:
        """Delete the oldest ``max_rows`` readings of a deleted batmon (more when many share
        the last ts); with the last ones, its rollups and its mark. True once all are gone."""
        with self._transaction() as conn:
            if not conn.execute("SELECT 1 FROM deleted_batmons WHERE batmon_id = ?",
                                (batmon_id,)).fetchone():  # fmt: skip
                return True  # not deleted (or done): its readings are not ours to touch
            edge = conn.execute(
                "SELECT ts, seq FROM readings WHERE batmon_id = ? ORDER BY ts, seq LIMIT 1 OFFSET ?",
                (batmon_id, max_rows),
            ).fetchone()
            if edge is not None:
                conn.execute("DELETE FROM readings WHERE batmon_id = ? AND (ts, seq) < (?, ?)",
                             (batmon_id, edge[0], edge[1]))  # fmt: skip
                return False
            conn.execute("DELETE FROM readings WHERE batmon_id = ?", (batmon_id,))
            conn.execute("DELETE FROM rollups WHERE batmon_id = ?", (batmon_id,))
            conn.execute("DELETE FROM deleted_batmons WHERE batmon_id = ?", (batmon_id,))
            return True

    # -- alarms ------------------------------------------------------------------------
    @translated
    def add_alarm(self, row: dict[str, Any]) -> None:
        """Insert an alarm row (its id chosen by the caller); Conflict if the id was ever used."""
        check_columns(row, ALARM_INSERT_COLUMNS)
        with self._transaction() as conn:
            _insert_unretired(conn, "alarms", row)

    @translated
    def alarms(self) -> list[dict[str, Any]]:
        """Every alarm, oldest first, for loading the in-memory registry."""
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
            conn.execute("INSERT OR IGNORE INTO retired_ids (id) VALUES (?)", (alarm_id,))
            conn.execute("DELETE FROM alarms WHERE id = ?", (alarm_id,))

    # -- banks -------------------------------------------------------------------------
    @translated
    def banks(self) -> list[dict[str, Any]]:
        """Every bank, oldest first, each with ``batmon_ids`` in the order they were given."""
        return BankStore(self.db).banks()

    @translated
    def add_bank(self, bank_id: int, user_id: int, name: str, created: float, batmon_ids: list[int]) -> None:
        """Insert a bank with its members; Conflict if the id was ever used."""
        if self._conn.execute("SELECT 1 FROM retired_ids WHERE id = ?", (bank_id,)).fetchone():
            raise Conflict(f"id {bank_id} was used before")
        BankStore(self.db).add_bank(bank_id, user_id, name, created, batmon_ids)

    @translated
    def rename_bank(self, bank_id: int, name: str) -> None:
        """Change a bank's name."""
        BankStore(self.db).rename_bank(bank_id, name)

    @translated
    def set_bank_members(self, bank_id: int, batmon_ids: list[int]) -> None:
        """Replace a bank's members (and their order)."""
        BankStore(self.db).set_members(bank_id, batmon_ids)

    @translated
    def delete_bank(self, bank_id: int) -> None:
        """Delete a bank (not its batmons); its id is retired."""
        BankStore(self.db).delete_bank(bank_id)

    # -- notices -----------------------------------------------------------------------
    @property
    def outbox(self) -> Outbox:
        """The notice outbox on this connection."""
        return Outbox(self)

    def shared(self) -> None:
        """One process owns the file (serve.lock): its memory decides each change."""
        return None

    @property
    def credentials(self) -> SqliteCredentials:
        """Api keys, MQTT tokens and their change counter on this connection."""
        return SqliteCredentials(self)

    # -- retention and rollups -----------------------------------------------------------
    @translated
    def batmons_with_readings_before(self, cutoff: float) -> list[int]:
        """Ids of batmons that have readings older than ``cutoff``."""
        return retention.batmons_with_readings_before(self._conn, cutoff)

    @translated
    def prune_batch(self, batmon_id: int, cutoff: float, batch_rows: int) -> int:
        """Fold the oldest readings older than ``cutoff`` into rollups and delete them."""
        with self._transaction() as conn:
            return retention.prune_batch(conn, batmon_id, cutoff, batch_rows)

    @translated
    def rollups(self, batmon_id: int) -> list[dict[str, Any]]:
        """The batmon's hourly rollups, in hour order."""
        return self._rows("SELECT * FROM rollups WHERE batmon_id = ? ORDER BY hour", (batmon_id,))


Store = SqliteStore  # the name callers of the SQLite store used before the interface


def _update(conn: sqlite3.Connection, table: str, key: int, changes: dict[str, Any],
            guard: tuple[str, Any] | None = None) -> int:  # fmt: skip
    """UPDATE one row by id; the column names were checked by the caller (never input).
    Returns how many rows changed."""
    params = (*changes.values(), key) if guard is None else (*changes.values(), key, guard[1])
    sql = _update_sql(table, tuple(changes), None if guard is None else guard[0])
    return conn.execute(sql, params).rowcount


@functools.lru_cache(maxsize=256)
def _update_sql(table: str, columns: tuple[str, ...], guard: str | None) -> str:
    """The UPDATE for these columns, made once: the writer updates a batmon per reading."""
    assignments = ", ".join(f"{column} = ?" for column in columns)
    return f"UPDATE {table} SET {assignments} WHERE id = ?" + ("" if guard is None else f" AND ({guard})")


def _state(conn: sqlite3.Connection, batmon_id: int) -> dict[str, Any] | None:
    """A batmon's energy_guard.STATE_COLUMNS, or None once it is gone."""
    columns = ", ".join(energy_guard.STATE_COLUMNS)
    found = conn.execute(f"SELECT {columns} FROM batmons WHERE id = ?", (batmon_id,)).fetchone()
    return None if found is None else dict(zip(energy_guard.STATE_COLUMNS, found, strict=True))


def _insert_unretired(conn: sqlite3.Connection, table: str, row: dict[str, Any]) -> None:
    """INSERT a row whose id was never retired; Conflict otherwise (ids are never reused)."""
    if conn.execute("SELECT 1 FROM retired_ids WHERE id = ?", (row["id"],)).fetchone():
        raise Conflict(f"id {row['id']} was used before")
    columns = ", ".join(row)
    marks = ", ".join("?" * len(row))
    conn.execute(f"INSERT INTO {table} ({columns}) VALUES ({marks})", tuple(row.values()))


def check_columns(changes: dict[str, Any], allowed: frozenset[str]) -> None:
    """A column name outside ``allowed`` is a programming error, never input."""
    if not allowed.issuperset(changes):
        raise ValueError(f"not a changeable column: {sorted(set(changes) - allowed)}")
