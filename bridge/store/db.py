"""Named queries over the SQLite file: the only place batmon SQL is written.

The core keeps current values and credentials in memory; this module is their
durable copy, so the hot ingest path is one INSERT plus one UPDATE, no SELECT.
"""

from __future__ import annotations

import errno
import secrets
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from bridge.datadir import prepare_data_dir, private_database
from bridge.models import MAX_SAFE_ID
from bridge.store.schema import SchemaTooNewError, migrate

DB_FILENAME = "batmon.sqlite3"

# Column names a caller may change through update_batmon / update_alarm; anything
# else is a programming error, never a column name built from input.
BATMON_COLUMNS = frozenset(
    {
        "name", "type", "token", "update_period", "voltage", "current", "power", "soc",
        "details", "last_reading", "status", "notification_enabled", "whatsapp_enabled",
        "sms_enabled", "voltage_units", "current_units", "power_units", "soc_units",
        "capacity_ah",
    }
)  # fmt: skip
ALARM_COLUMNS = frozenset(
    {
        "name", "metric", "condition", "threshold", "repeat_delay", "enabled", "triggered",
        "trigger_time", "akn", "last_notice", "update_time",
    }
)  # fmt: skip
USER_TARGET_COLUMNS = frozenset({"email_url", "whatsapp_url", "sms_url"})


class Store:
    """One SQLite database in WAL mode; every method is one named query or transaction."""

    def __init__(self, db: Database, path: Path) -> None:
        self.db = db
        self.path = path  # the writer opens its own connection to the same file

    @classmethod
    def open(cls, path: Path) -> Store:
        """Open (creating and migrating as needed) the database file at ``path``.

        The folder is made 0700 and the file 0600 (its -wal and -shm inherit that) before
        SQLite touches them. Raises OSError, never sqlite3.Error, when the file cannot be
        opened for writing (read-only folder...): the caller prints one line.
        """
        prepare_data_dir(path.parent)
        private_database(path)
        # One connection shared by the event loop and, in tests, Starlette's
        # portal thread; sqlite3 serialises access to it.
        conn = sqlite3.connect(str(path), check_same_thread=False, timeout=30)
        try:
            db = Database(conn, execute_plugins=False)
            conn.execute("PRAGMA journal_mode=WAL")
            # This connection makes the rare changes (users, batmons, alarms, outbox);
            # readings go through the writer's own connection (bridge/store/readings.py).
            conn.execute("PRAGMA synchronous=NORMAL")  # survives kill -9; see store/readings.py
            conn.execute("PRAGMA foreign_keys=ON")
            migrate(db)
        except (sqlite3.Error, SchemaTooNewError) as exc:  # one line for the user, not a traceback
            conn.close()
            raise OSError(errno.EIO, f"cannot open database {path.name}: {exc}") from None
        return cls(db, path)

    def close(self) -> None:
        """Checkpoint and close the file."""
        self.db.close()

    # -- ids ----------------------------------------------------------------
    def new_id(self, table: str) -> int:
        """A random id below 2^53 that no batmon or alarm has ever had."""
        while True:
            candidate = secrets.randbelow(MAX_SAFE_ID) + 1
            if not self.db.execute(
                f"SELECT 1 FROM {table} WHERE id = ? UNION ALL "
                "SELECT 1 FROM retired_ids WHERE id = ?",
                (candidate, candidate),
            ).fetchone():
                return candidate

    # -- users ----------------------------------------------------------------
    def add_user(self, email: str, api_key_hash: str, created: float) -> int:
        """Insert a user; raises sqlite3.IntegrityError if the email exists."""
        with self.db.atomic():
            cur = self.db.execute(
                "INSERT INTO users (email, api_key_hash, created) VALUES (?, ?, ?)",
                (email, api_key_hash, created),
            )
        return int(cur.lastrowid or 0)

    def users(self) -> list[dict[str, Any]]:
        """Every user, oldest first."""
        return list(self.db.query("SELECT * FROM users ORDER BY id"))

    def user_by_key_hash(self, api_key_hash: str) -> dict[str, Any] | None:
        """The user holding this api key hash (for keys made by another process)."""
        return next(self.db.query("SELECT * FROM users WHERE api_key_hash = ?", [api_key_hash]), None)

    def user_by_email(self, email: str) -> dict[str, Any] | None:
        """The user with this email."""
        return next(self.db.query("SELECT * FROM users WHERE email = ?", [email]), None)

    def user_by_id(self, user_id: int) -> dict[str, Any] | None:
        """The user with this id."""
        return next(self.db.query("SELECT * FROM users WHERE id = ?", [user_id]), None)

    def set_user_targets(self, user_id: int, targets: dict[str, str]) -> None:
        """Set notification target URLs (email_url, whatsapp_url, sms_url)."""
        check_columns(targets, USER_TARGET_COLUMNS)
        if targets:
            with self.db.atomic():
                self.db["users"].update(user_id, targets)

    # -- batmons -----------------------------------------------------------------
    def add_batmon(self, row: dict[str, Any]) -> None:
        """Insert a batmon row (its id already chosen by new_id)."""
        with self.db.atomic():
            self.db["batmons"].insert(row)

    def batmons(self) -> list[dict[str, Any]]:
        """Every batmon, oldest first, for loading the in-memory registry."""
        return list(self.db.query("SELECT * FROM batmons ORDER BY created, rowid"))

    def update_batmon(self, batmon_id: int, changes: dict[str, Any]) -> None:
        """Change some columns of one batmon."""
        check_columns(changes, BATMON_COLUMNS)
        if changes:
            with self.db.atomic():
                self.db["batmons"].update(batmon_id, changes)

    def delete_batmon(self, batmon_id: int) -> None:
        """Delete a batmon with its readings and alarms; retire the ids for good."""
        with self.db.atomic():
            alarm_ids = [r[0] for r in self.db.execute(
                "SELECT id FROM alarms WHERE batmon_id = ?", (batmon_id,)
            )]  # fmt: skip
            self.db.conn.executemany(
                "INSERT OR IGNORE INTO retired_ids (id) VALUES (?)",
                [(i,) for i in [batmon_id, *alarm_ids]],
            )
            self.db.execute("DELETE FROM readings WHERE batmon_id = ?", (batmon_id,))
            self.db.execute("DELETE FROM rollups WHERE batmon_id = ?", (batmon_id,))
            self.db.execute("DELETE FROM alarms WHERE batmon_id = ?", (batmon_id,))
            self.db.execute("DELETE FROM batmons WHERE id = ?", (batmon_id,))

    # -- readings ----------------------------------------------------------------
    def history(self, batmon_id: int, min_ts: float, max_ts: float) -> Iterator[dict[str, Any]]:
        """Readings of one batmon with min_ts <= ts < max_ts, in time then arrival order.

        For tools and tests on this connection; the API streams through store/history.py.
        """
        return self.db.query(
            "SELECT ts, voltage, current, power, soc, details FROM readings"
            " WHERE batmon_id = ? AND ts >= ? AND ts < ? ORDER BY ts, seq",
            [batmon_id, min_ts, max_ts],
        )

    def reading_count(self, batmon_id: int) -> int:
        """How many history rows a batmon has."""
        return int(self.db.execute(
            "SELECT count(*) FROM readings WHERE batmon_id = ?", (batmon_id,)
        ).fetchone()[0])  # fmt: skip

    # -- alarms --------------------------------------------------------------------
    def add_alarm(self, row: dict[str, Any]) -> None:
        """Insert an alarm row (its id already chosen by new_id)."""
        with self.db.atomic():
            self.db["alarms"].insert(row)

    def alarms(self) -> list[dict[str, Any]]:
        """Every alarm, oldest first, for loading the in-memory registry."""
        return list(self.db.query("SELECT * FROM alarms ORDER BY update_time, rowid"))

    def update_alarm(self, alarm_id: int, changes: dict[str, Any]) -> None:
        """Change some columns of one alarm."""
        check_columns(changes, ALARM_COLUMNS)
        if changes:
            with self.db.atomic():
                self.db["alarms"].update(alarm_id, changes)

    def delete_alarm(self, alarm_id: int) -> None:
        """Delete an alarm; its id is never handed out again."""
        with self.db.atomic():
            self.db.execute("INSERT OR IGNORE INTO retired_ids (id) VALUES (?)", (alarm_id,))
            self.db.execute("DELETE FROM alarms WHERE id = ?", (alarm_id,))

    # -- health --------------------------------------------------------------------
    def ping(self) -> bool:
        """True when the database answers a query."""
        try:
            return self.db.execute("SELECT 1").fetchone() == (1,)
        except sqlite3.Error:
            return False


def check_columns(changes: dict[str, Any], allowed: frozenset[str]) -> None:
    unknown = set(changes) - allowed
    if unknown:
        raise ValueError(f"not a changeable column: {sorted(unknown)}")
