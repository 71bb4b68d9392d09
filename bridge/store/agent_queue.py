"""The device agent's store-and-forward queue: readings wait here until the broker's
PUBACK for them has come.

A small SQLite file in the agent's data folder, separate from the server's database
(the agent runs on the device's computer, usually without a server beside it).
``synchronous=FULL`` makes each push durable before the next interval, so a power
cut loses at most the reading being made. Bounded: past ``max_readings`` the oldest
are dropped, and the drop is counted, not silent.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

QUEUE_FILENAME = "agent-queue.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS readings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: an old PUBACK cannot delete a new row
    payload TEXT NOT NULL                  -- one reading as compact JSON, with its ts
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class ReadingQueue:
    """Oldest-first durable queue of JSON readings; every method is one transaction."""

    def __init__(self, path: Path, max_readings: int) -> None:
        self.path = path
        self.max_readings = max_readings
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        self._count = int(self.db.execute("SELECT COUNT(*) FROM readings").fetchone()[0])

    @classmethod
    def open(cls, data_dir: Path, max_readings: int) -> ReadingQueue:
        """Open (creating) the queue file inside ``data_dir``."""
        data_dir.mkdir(parents=True, exist_ok=True)
        return cls(data_dir / QUEUE_FILENAME, max_readings)

    def __len__(self) -> int:
        return self._count

    def push(self, payload: str) -> int:
        """Append one reading; return how many of the oldest were dropped to make room."""
        excess = max(0, self._count + 1 - self.max_readings)
        with self._transaction():
            if excess:
                self.db.execute(
                    "DELETE FROM readings WHERE id IN (SELECT id FROM readings ORDER BY id LIMIT ?)",
                    (excess,),
                )
                self._add_counter("dropped", excess)
            self.db.execute("INSERT INTO readings (payload) VALUES (?)", (payload,))
            self._add_counter("queued", 1)
        self._count += 1 - excess
        return excess

    def oldest(self, max_count: int, max_bytes: int) -> list[tuple[int, str]]:
        """The oldest readings, in order, as many as fit ``max_bytes`` as one JSON array."""
        rows = self.db.execute(
            "SELECT id, payload FROM readings ORDER BY id LIMIT ?", (max_count,)
        ).fetchall()
        batch: list[tuple[int, str]] = []
        size = 2  # the array's brackets
        for row_id, payload in rows:
            size += len(payload.encode()) + (1 if batch else 0)
            if size > max_bytes:
                break
            batch.append((row_id, payload))
        return batch

    def remove_through(self, first_id: int, last_id: int) -> int:
        """Delete an acknowledged batch (ids first..last); return how many rows went."""
        with self._transaction():
            gone = self.db.execute(
                "DELETE FROM readings WHERE id BETWEEN ? AND ?", (first_id, last_id)
            ).rowcount
            self._add_counter("sent", gone)
        self._count -= gone
        return gone

    def counters(self) -> dict[str, int]:
        """Totals over the queue's life: queued, sent, dropped."""
        totals = {"queued": 0, "sent": 0, "dropped": 0}
        totals.update(dict(self.db.execute("SELECT name, value FROM counters").fetchall()))
        return totals

    def close(self) -> None:
        self.db.close()

    def _add_counter(self, name: str, amount: int) -> None:
        self.db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?)"
            " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, amount),
        )

    def _transaction(self) -> _Transaction:
        return _Transaction(self.db)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error (autocommit connection)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, *rest: object) -> None:
        self.db.execute("ROLLBACK" if kind else "COMMIT")
