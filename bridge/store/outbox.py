"""Named queries over the notification outbox: one row per notice and channel.

A notice is committed here before any send is tried, so a restart loses none.
Rows move ``queued -> sending -> sent | queued (retry) | failed``; a channel
without a target is written ``skipped`` so the user can see why nothing came.

Delivery is at-least-once: a row is claimed (``sending``) before the send and
marked ``sent`` after it, so a process killed between the service accepting
the notice and that commit sends it again after restart. A send that times out
on our side but lands later is retried too. Both windows are seconds wide.

One process has the file (the data folder's lock), so a claim needs no lease: the
worker and lease arguments of the interface are not stored, a claim's attempt count
is its token, and ``requeue_interrupted`` at start takes back every ``sending`` row.
(PostgreSQL, shared by workers, leases its claims: bridge/store/pg_outbox.py.)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from bridge.store.interface import CHANNELS, Channel, Claim
from bridge.store.sqlite_errors import translated

if TYPE_CHECKING:
    from bridge.store.db import SqliteStore

__all__ = ["CHANNELS", "Channel", "Outbox"]
MAX_ERROR_CHARS = 500


class Outbox:
    """The durable queue of notices (``NoticeOutbox``) on one store handle's connection;
    every method is one query or transaction."""

    def __init__(self, store: SqliteStore) -> None:
        self.db = store.db

    @translated
    def enqueue(self, notices: Iterable[dict[str, Any]]) -> list[int]:
        """Insert notices in one transaction; return their ids.

        Keys: user_id, batmon_id, channel, kind, title, body, state, created, last_error.
        """
        ids = []
        with self.db.atomic():
            for notice in notices:
                cur = self.db.execute(
                    "INSERT INTO outbox (user_id, batmon_id, channel, kind, title, body, state,"
                    " last_error, next_attempt_at, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        notice["user_id"], notice["batmon_id"], notice["channel"],
                        notice["kind"], notice["title"], notice["body"], notice["state"],
                        notice.get("last_error", ""), notice["created"], notice["created"],
                    ),
                )  # fmt: skip
                ids.append(int(cur.lastrowid or 0))
        return ids

    @translated
    def due(self, now: float, limit: int) -> list[dict[str, Any]]:
        """Queued notices whose next attempt is due, oldest due first."""
        return list(self.db.query(
            "SELECT * FROM outbox WHERE state = 'queued' AND next_attempt_at <= ?"
            " ORDER BY next_attempt_at, id LIMIT ?",
            [now, limit],
        ))  # fmt: skip

    @translated
    def next_due_at(self) -> float | None:
        """When the earliest queued notice is due, or None when none is queued."""
        row = self.db.execute(
            "SELECT min(next_attempt_at) FROM outbox WHERE state = 'queued'"
        ).fetchone()
        return None if row[0] is None else float(row[0])

    @translated
    def claim(self, notice_id: int, worker: str, now: float, lease_until: float) -> Claim | None:
        """Mark a queued notice ``sending`` and count the attempt; None if taken."""
        with self.db.atomic():  # no RETURNING: SQLite before 3.35 has none
            cur = self.db.execute(
                "UPDATE outbox SET state = 'sending', attempts = attempts + 1"
                " WHERE id = ? AND state = 'queued'",
                (notice_id,),
            )
            if cur.rowcount != 1:
                return None
            row = self.db.execute("SELECT attempts FROM outbox WHERE id = ?", (notice_id,)).fetchone()
        return Claim(notice_id, worker, int(row[0]))

    @translated
    def renew(self, claims: Sequence[Claim], lease_until: float) -> int:
        """Nothing to extend (one process, no lease): how many of the claims still hold."""
        if not claims:
            return 0
        pairs = ", ".join("(?, ?)" for _ in claims)
        row = self.db.execute(f"SELECT count(*) FROM outbox WHERE state = 'sending' AND (id, attempts)"
                              f" IN (VALUES {pairs})",  # placeholders only
                              [v for c in claims for v in (c.notice_id, c.attempt)]).fetchone()  # fmt: skip
        return int(row[0])

    @translated
    def mark_sent(self, claim: Claim, now: float, target: str) -> bool:
        """Record a delivery; ``target`` is the masked URL it went to."""
        return self._finish(claim, now, "sent", "", sent_at=now, target=target)

    @translated
    def mark_retry(self, claim: Claim, now: float, next_attempt_at: float, error: str,
                   target: str = "") -> bool:  # fmt: skip
        """Record a failed attempt and put the notice back in the queue."""
        return self._finish(claim, now, "queued", error, next_attempt_at=next_attempt_at,
                            target=target)  # fmt: skip

    @translated
    def mark_failed(self, claim: Claim, now: float, error: str, target: str = "") -> bool:
        """Record a failed attempt after which no more are made."""
        return self._finish(claim, now, "failed", error, target=target)

    @translated
    def mark_skipped(self, notice_id: int, now: float, reason: str) -> None:
        """Record that the notice had nowhere to go (no target for its channel)."""
        with self.db.atomic():
            self.db.execute("UPDATE outbox SET state = 'skipped', last_error = ? WHERE id = ?",
                            (reason[:MAX_ERROR_CHARS], notice_id))  # fmt: skip

    @translated
    def requeue_interrupted(self) -> int:
        """Put notices left ``sending`` by a stopped or killed process back in the queue."""
        with self.db.atomic():
            cur = self.db.execute("UPDATE outbox SET state = 'queued' WHERE state = 'sending'")
        return cur.rowcount

    @translated
    def latest_for_batmon(self, batmon_id: int, limit: int) -> list[dict[str, Any]]:
        """The batmon's most recent notices, newest first."""
        return list(self.db.query(
            "SELECT * FROM outbox WHERE batmon_id = ? ORDER BY id DESC LIMIT ?",
            [batmon_id, limit],
        ))  # fmt: skip

    @translated
    def attempts(self, notice_id: int) -> list[dict[str, Any]]:
        """Every recorded attempt of one notice, oldest first."""
        return list(self.db.query(
            "SELECT at, outcome, error FROM outbox_attempts WHERE outbox_id = ? ORDER BY id",
            [notice_id],
        ))  # fmt: skip

    @translated
    def count_by_state(self) -> dict[str, int]:
        """How many notices are in each state (health and benchmarks)."""
        rows = self.db.execute("SELECT state, count(*) FROM outbox GROUP BY state").fetchall()
        return {state: int(count) for state, count in rows}

    @translated
    def pending_by_channel(self) -> dict[tuple[str, str], int]:
        """Notices waiting (``queued``) or in flight (``sending``), by (state, channel).

        Reads only those rows through the state index: a scrape stays cheap however
        many finished notices the outbox keeps.
        """
        rows = self.db.execute(
            "SELECT state, channel, count(*) FROM outbox WHERE state IN ('queued', 'sending')"
            " GROUP BY state, channel"
        ).fetchall()
        return {(state, channel): int(count) for state, channel, count in rows}

    @translated
    def prune(self, before: float) -> int:
        """Delete finished notices created before ``before``; queued ones stay."""
        with self.db.atomic():
            self.db.execute(
                "DELETE FROM outbox_attempts WHERE outbox_id IN (SELECT id FROM outbox"
                " WHERE state IN ('sent', 'failed', 'skipped') AND created < ?)",
                (before,),
            )
            cur = self.db.execute(
                "DELETE FROM outbox WHERE state IN ('sent', 'failed', 'skipped') AND created < ?",
                (before,),
            )
        return cur.rowcount

    def _finish(self, claim: Claim, now: float, state: str, error: str, **columns: Any) -> bool:
        """Log the attempt and, if the claim holds (a delivery: unless recorded already), set
        the outcome columns, in one transaction; True when they were set."""
        error = error[:MAX_ERROR_CHARS]
        assignments = "".join(f", {name} = ?" for name in columns)
        holds, held = (_NOT_SENT, ()) if state == "sent" else (_HELD, (claim.attempt,))
        with self.db.atomic():
            cur = self.db.execute(
                f"UPDATE outbox SET state = ?, last_error = ?{assignments}"  # columns: ours
                f" WHERE id = ? AND {holds}",
                (state, error, *columns.values(), claim.notice_id, *held),
            )
            self.db.execute(
                "INSERT INTO outbox_attempts (outbox_id, at, outcome, error) VALUES (?, ?, ?, ?)",
                (claim.notice_id, now, "sent" if state == "sent" else "error", error),
            )
        return cur.rowcount == 1


# An outcome applies while its claim holds; a delivery is recorded unless it was already.
_NOT_SENT = "state <> 'sent'"
_HELD = "state = 'sending' AND attempts = ?"
