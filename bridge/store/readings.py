"""The writer's side of the store: one connection that appends readings in groups.

This is the whole interface the group-committing writer needs from a database
(:class:`ReadingSink`), so a second store (PostgreSQL) can sit behind it by
implementing ``write`` and ``close`` alone.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from bridge.store.db import BATMON_COLUMNS, check_columns

# (batmon_id, ts, voltage, current, power, soc, details)
ReadingRow = tuple[int, float, float | None, float | None, float | None, float | None, str | None]
# (batmon_id, {column: value}) applied after the rows, in order.
CurrentUpdate = tuple[int, dict[str, Any]]

PROBE_BYTES = 256 * 1024
"""Fresh bytes the failing writer's probe takes beside the database: more than a group
of 1,000 readings adds to the WAL (78 KB measured), so when the probe finds room, a
group finds it too."""

INSERT_READING = (
    "INSERT INTO readings (batmon_id, ts, voltage, current, power, soc, details)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)


class ReadingSink(Protocol):
    """Where committed readings go: one atomic ``write`` per group."""

    def write(self, rows: Sequence[ReadingRow], updates: Sequence[CurrentUpdate]) -> None:
        """Append ``rows`` and apply ``updates`` in one transaction, or raise and change nothing."""
        ...

    def probe(self) -> None:
        """A real write needing fresh room on disk; raises while a group could not be stored."""
        ...

    def close(self) -> None:
        """Release the connection."""
        ...


class SqliteReadingSink:
    """The SQLite sink: its own connection, used only by the writer's thread."""

    def __init__(self, path: Path, *, synchronous: str = "NORMAL") -> None:
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so the write lock
        # is taken up front and a busy database waits instead of failing mid-group.
        self._probe_path = path.with_name(path.name + "-probe")
        self._conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False,
                                     timeout=30)  # fmt: skip
        self._conn.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a committed group survives a killed process (the promise behind
        # every ack); only a power cut can lose the last groups. FULL adds an fsync per
        # commit: measured 4.8 ms against 0.05 ms, it would cap one client at ~200/s.
        self._conn.execute(f"PRAGMA synchronous={synchronous}")

    def write(self, rows: Sequence[ReadingRow], updates: Sequence[CurrentUpdate]) -> None:
        """Append ``rows`` and apply ``updates`` in one transaction."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(INSERT_READING, rows)
            for batmon_id, changes in updates:
                check_columns(changes, BATMON_COLUMNS)
                assignments = ", ".join(f"{column} = ?" for column in changes)
                conn.execute(f"UPDATE batmons SET {assignments} WHERE id = ?",
                             (*changes.values(), batmon_id))  # fmt: skip
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def probe(self) -> None:
        """Take fresh blocks on the data disk, then rewrite one page: fails like a group would.

        The page rewrite alone fits in WAL space that the failed commit had already taken,
        and said "ok" on a full disk (issue 15); fresh blocks need the room a group needs.
        They are allocated, not written (fallocate): no flash wear, and a full disk, a quota
        or a file-size limit refuses them all the same (measured on tmpfs).
        """
        try:
            fd = os.open(self._probe_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
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
                self._probe_path.unlink(missing_ok=True)
        except OSError as exc:
            # The sink's own error type: the connection is fine, the disk is not. No path.
            raise sqlite3.OperationalError(
                f"the data disk refused {PROBE_BYTES // 1024} KiB ({exc.strerror})"
            ) from None
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("UPDATE schema_version SET version = version")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close the connection (the WAL stays for the next opener)."""
        self._conn.close()
