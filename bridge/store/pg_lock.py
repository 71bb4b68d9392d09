"""A PostgreSQL session-level advisory lock held while a part of `batmon serve` runs.

Why a session lock on a connection of its own: it is held exactly as long as that
session lives. A clean stop closes the connection; a crash (kill -9, a lost machine)
ends the session on the server, and the lock is free again without anyone cleaning up,
unlike a row in a table or a file on one machine.

Used for the embedded broker: it serves one worker only (its devices, its sessions and
its retained topics live in that process), so a second worker with the embedded broker
on the same database is refused at start. SQLite's counterpart is ``serve.lock`` in the
data folder (``bridge/data_lock.py``).

Limits: the lock lives in the session, so a connection pooler in transaction mode
(PgBouncer) would break it, and if the lock's connection is cut while serve runs the
lock is gone until serve restarts (it is not taken again).
"""

from __future__ import annotations

import asyncio
from typing import Any

EMBEDDED_BROKER_LOCK = 0x6261_746D_6F6E_0003  # "batmon" + 3; 1 and 2 are pg_schema's


class LockHeld(Exception):
    """Another session holds the lock; the message says what to do instead."""


class SessionLock:
    """Takes ``key`` on a connection of its own at start (refusing with ``refusal`` when
    another session holds it) and frees it at stop. Shaped like an extension, so the
    composition root starts it first and stops it last."""

    def __init__(self, url: str, key: int, refusal: str) -> None:
        self.url = url
        self.key = key
        self.refusal = refusal
        self._conn: Any = None

    async def start(self) -> None:
        """LockHeld (``refusal``) when another session holds the lock; StorageFailed when
        the database cannot be reached."""
        if not await asyncio.to_thread(self._acquire):
            raise LockHeld(self.refusal)

    async def stop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.to_thread(conn.close)  # ends the session: the lock goes with it

    def _acquire(self) -> bool:
        import psycopg

        from bridge.errors import StorageFailed
        from bridge.store.pg_store import connect, describe_url, one_line

        try:
            conn = connect(self.url)
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()
            taken = bool(row and row[0])
        except psycopg.Error as exc:
            raise StorageFailed(f"cannot reach PostgreSQL at {describe_url(self.url)}:"
                                f" {one_line(exc, self.url)}") from None  # fmt: skip
        if not taken:
            conn.close()
            return False
        self._conn = conn
        return True
