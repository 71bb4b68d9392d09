"""The notice outbox on PostgreSQL (``NoticeOutbox``; the SQLite one is bridge/store/outbox.py).

Same states and rules, for several workers on one database. A claim takes the row with
``FOR UPDATE SKIP LOCKED``: of two workers claiming one notice, one gets it and the other
moves on at once instead of waiting on the first's transaction. The claim writes who holds
the notice (``claimed_by``, the worker's id) and until when (``lease_until``); the holder
renews the lease while its send runs. A worker killed or stalled mid-send stops renewing,
and once the lease has run out any worker claims the notice again: no worker can tell that
another stopped, so nothing is requeued at start (that would take live workers' sends).

An outcome is applied only while its claim holds (still ``sending``, same worker, same
attempt); a late one is logged as an attempt only, except a delivery, which is recorded
unless the notice was recorded sent already, and then is a duplicate (docs/SCALE-OUT.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from bridge.store.interface import Claim
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
        """Queued notices whose next attempt is due and sends whose lease ran out, oldest first."""
        return self.store._rows(f"SELECT * FROM outbox WHERE {_DUE} ORDER BY {_DUE_AT}, id LIMIT %s",
                                (now, now, limit))  # fmt: skip

    @translated
    def next_due_at(self) -> float | None:
        """When the earliest queued notice is due or lease runs out; None when none waits."""
        value = self.store._value(f"SELECT min({_DUE_AT}) FROM outbox WHERE state IN ('queued', 'sending')")
        return None if value is None else float(value)

    @translated
    def claim(self, notice_id: int, worker: str, now: float, lease_until: float) -> Claim | None:
        """Mark a queued notice (or one whose lease ran out) ``sending`` for ``worker`` until
        ``lease_until`` and count the attempt; None if another worker has it."""
        with self.store._transaction() as conn:
            row = conn.execute(
                "UPDATE outbox SET state = 'sending', attempts = attempts + 1, claimed_by = %s,"
                " lease_until = %s WHERE id = (SELECT id FROM outbox WHERE id = %s AND (state = 'queued'"
                " OR state = 'sending' AND lease_until <= %s) FOR UPDATE SKIP LOCKED) RETURNING attempts",
                (worker, lease_until, notice_id, now),
            ).fetchone()  # fmt: skip
        return None if row is None else Claim(notice_id, worker, int(row[0]))

    @translated
    def renew(self, claims: Sequence[Claim], lease_until: float) -> int:
        """Extend the leases of these claims that still hold, in one statement."""
        if not claims:
            return 0
        with self.store._transaction() as conn:
            return conn.execute(
                "UPDATE outbox SET lease_until = %s FROM unnest(%s::bigint[], %s::text[], %s::int[])"
                " AS c(id, worker, attempt) WHERE outbox.id = c.id AND state = 'sending'"
                " AND claimed_by = c.worker AND attempts = c.attempt",
                (lease_until, [c.notice_id for c in claims], [c.worker for c in claims],
                 [c.attempt for c in claims]),
            ).rowcount  # fmt: skip

    @translated
    def mark_sent(self, claim: Claim, now: float, target: str) -> bool:
        """Record a delivery; False if it was recorded already (a duplicate)."""
        return self._finish(claim, now, "sent", "", sent_at=now, target=target)

    @translated
    def mark_retry(self, claim: Claim, now: float, next_attempt_at: float, error: str,
                   target: str = "") -> bool:  # fmt: skip
        """Record a failed attempt and put the notice back in the queue, if the claim holds."""
        return self._finish(claim, now, "queued", error, next_attempt_at=next_attempt_at, target=target)

    @translated
    def mark_failed(self, claim: Claim, now: float, error: str, target: str = "") -> bool:
        """Record a failed attempt after which no more are made, if the claim holds."""
        return self._finish(claim, now, "failed", error, target=target)

    @translated
    def mark_skipped(self, notice_id: int, now: float, reason: str) -> None:
        """Record that the notice had nowhere to go."""
        with self.store._transaction() as conn:
            conn.execute("UPDATE outbox SET state = 'skipped', last_error = %s WHERE id = %s",
                         (reason[:MAX_ERROR_CHARS], notice_id))  # fmt: skip

    def requeue_interrupted(self) -> int:
        """Nothing: other workers' sends may be running; a dead worker's lease runs out."""
        return 0

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

    def _finish(self, claim: Claim, now: float, state: str, error: str, **columns: Any) -> bool:
        """Log the attempt and, if the claim holds (a delivery: unless recorded already), set
        the outcome columns, in one transaction; True when they were set."""
        error = error[:MAX_ERROR_CHARS]
        assignments = "".join(f", {name} = %s" for name in columns)  # names: ours
        holds, held = ((_NOT_SENT, ()) if state == "sent"
                       else (_HELD, (claim.worker, claim.attempt)))  # fmt: skip
        with self.store._transaction() as conn:
            cur = conn.execute(f"UPDATE outbox SET state = %s, last_error = %s{assignments}"
                               f" WHERE id = %s AND {holds}".encode(),
                               (state, error, *columns.values(), claim.notice_id, *held))  # fmt: skip
            conn.execute("INSERT INTO outbox_attempts (outbox_id, at, outcome, error)"
                         " VALUES (%s, %s, %s, %s)",
                         (claim.notice_id, now, "sent" if state == "sent" else "error", error))  # fmt: skip
        return cur.rowcount == 1


# A notice to claim: queued and due, or in flight with its lease run out (both at %s = now).
_DUE = "(state = 'queued' AND next_attempt_at <= %s OR state = 'sending' AND lease_until <= %s)"
_DUE_AT = "CASE WHEN state = 'queued' THEN next_attempt_at ELSE lease_until END"
_NOT_SENT = "state <> 'sent'"
_HELD = "state = 'sending' AND claimed_by = %s AND attempts = %s"
