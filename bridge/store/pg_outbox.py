"""The notice outbox on PostgreSQL (``NoticeOutbox``; the SQLite one is bridge/store/outbox.py).

Same states and rules. A claim takes the row with ``FOR UPDATE SKIP LOCKED``: of two
workers claiming one notice, one gets it and the other moves on at once instead of
waiting on the first's transaction. (A lease for notices of a worker killed mid-send
is the scale-out issue's: ``requeue_interrupted`` still assumes one process.)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from bridge.store.outbox import MAX_ERROR_CHARS
from bridge.store.pg_store import translated

if TYPE_CHECKING:
    from bridge.store.pg_store import PostgresStore


class PgOutbox:
    """The durable queue of notices on one store handle's connection."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self.url = store.url  # for the error translation's redaction

    @translated
    def enqueue(self, notices: Iterable[dict[str, Any]]) -> list[int]:
        """Insert notices in one transaction; return their ids in order."""
        ids = []
        with self.store._transaction() as conn:
            for notice in notices:
                row = conn.execute(
                    "INSERT INTO outbox (user_id, batmon_id, channel, kind, title, body, state,"
                    " last_error, next_attempt_at, created) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    " RETURNING id",
                    (notice["user_id"], notice["batmon_id"], notice["channel"], notice["kind"],
                     notice["title"], notice["body"], notice["state"], notice.get("last_error", ""),
                     notice["created"], notice["created"]),
                ).fetchone()  # fmt: skip
                assert row is not None
                ids.append(int(row[0]))
        return ids

    @translated
    def due(self, now: float, limit: int) -> list[dict[str, Any]]:
        """Queued notices whose next attempt is due, oldest due first."""
        return self.store._rows("SELECT * FROM outbox WHERE state = 'queued' AND next_attempt_at <= %s"
                                " ORDER BY next_attempt_at, id LIMIT %s", (now, limit))  # fmt: skip

    @translated
    def next_due_at(self) -> float | None:
        """When the earliest queued notice is due, or None when none is queued."""
        value = self.store._value("SELECT min(next_attempt_at) FROM outbox WHERE state = 'queued'")
        return None if value is None else float(value)

    @translated
    def claim(self, notice_id: int) -> bool:
        """Mark a queued notice ``sending`` and count the attempt; False if taken."""
        with self.store._transaction() as conn:
            cur = conn.execute(
                "UPDATE outbox SET state = 'sending', attempts = attempts + 1 WHERE id = ("
                " SELECT id FROM outbox WHERE id = %s AND state = 'queued' FOR UPDATE SKIP LOCKED)",
                (notice_id,),
            )
        return cur.rowcount == 1

    @translated
    def mark_sent(self, notice_id: int, now: float, target: str) -> None:
        """Record a delivery; ``target`` is the masked URL it went to."""
        self._finish(notice_id, now, "sent", "", sent_at=now, target=target)

    @translated
    def mark_retry(self, notice_id: int, now: float, next_attempt_at: float, error: str,
                   target: str = "") -> None:  # fmt: skip
        """Record a failed attempt and put the notice back in the queue."""
        self._finish(notice_id, now, "queued", error, next_attempt_at=next_attempt_at, target=target)

    @translated
    def mark_failed(self, notice_id: int, now: float, error: str, target: str = "") -> None:
        """Record a failed attempt after which no more are made."""
        self._finish(notice_id, now, "failed", error, target=target)

    @translated
    def mark_skipped(self, notice_id: int, now: float, reason: str) -> None:
        """Record that the notice had nowhere to go."""
        self._finish(notice_id, now, "skipped", reason, attempt=False)

    @translated
    def requeue_interrupted(self) -> int:
        """Put notices left ``sending`` by a stopped process back in the queue."""
        with self.store._transaction() as conn:
            return conn.execute("UPDATE outbox SET state = 'queued' WHERE state = 'sending'").rowcount

    @translated
    def latest_for_batmon(self, batmon_id: int, limit: int) -> list[dict[str, Any]]:
        """The batmon's most recent notices, newest first."""
        return self.store._rows("SELECT * FROM outbox WHERE batmon_id = %s ORDER BY id DESC LIMIT %s",
                                (batmon_id, limit))  # fmt: skip

    @translated
    def attempts(self, notice_id: int) -> list[dict[str, Any]]:
        """Every recorded attempt of one notice, oldest first."""
        return self.store._rows("SELECT at, outcome, error FROM outbox_attempts WHERE outbox_id = %s"
                                " ORDER BY id", (notice_id,))  # fmt: skip

    @translated
    def count_by_state(self) -> dict[str, int]:
        """How many notices are in each state."""
        rows = self.store._conn.execute("SELECT state, count(*) FROM outbox GROUP BY state").fetchall()
        return {state: int(count) for state, count in rows}

    @translated
    def pending_by_channel(self) -> dict[tuple[str, str], int]:
        """Notices waiting or in flight, by (state, channel)."""
        rows = self.store._conn.execute(
            "SELECT state, channel, count(*) FROM outbox WHERE state IN ('queued', 'sending')"
            " GROUP BY state, channel").fetchall()  # fmt: skip
        return {(state, channel): int(count) for state, channel, count in rows}

    @translated
    def prune(self, before: float) -> int:
        """Delete finished notices created before ``before`` (their attempts go by the cascade)."""
        with self.store._transaction() as conn:
            return conn.execute("DELETE FROM outbox WHERE state IN ('sent', 'failed', 'skipped')"
                                " AND created < %s", (before,)).rowcount  # fmt: skip

    def _finish(self, notice_id: int, now: float, state: str, error: str, *,
                attempt: bool = True, **columns: Any) -> None:  # fmt: skip
        """Set the outcome columns and log the attempt in one transaction."""
        error = error[:MAX_ERROR_CHARS]
        assignments = "".join(f", {name} = %s" for name in columns)  # names: ours
        with self.store._transaction() as conn:
            conn.execute(f"UPDATE outbox SET state = %s, last_error = %s{assignments} WHERE id = %s".encode(),
                         (state, error, *columns.values(), notice_id))  # fmt: skip
            if attempt:
                conn.execute("INSERT INTO outbox_attempts (outbox_id, at, outcome, error)"
                             " VALUES (%s, %s, %s, %s)",
                             (notice_id, now, "sent" if state == "sent" else "error", error))  # fmt: skip
