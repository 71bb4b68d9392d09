"""What the core, the writer, the extensions and the facade need from a store.

The SQLite store (bridge/store/db.py and its neighbours) implements it today; a
PostgreSQL store (the scale-out issue) implements the same protocols and joins the
contract suite (tests/test_store_contract.py) with one fixture parameter. Nothing
here names a SQLite feature: rows are addressed by what they mean (batmon id,
timestamp, notice id), never by a rowid, and failures are the store's own errors:

- ``bridge.errors.StorageFailed``: the database could not do it (disk full, I/O,
  read-only); nothing changed and the handle is still usable;
- ``bridge.errors.Conflict``: a unique thing is taken (an email, an id in use or retired);
- ``ValueError``: a programming error (a column that may not be changed).

Threads: a handle is used by one thread at a time. ``another()`` opens a second
handle on the same database for another thread (the writer's, the pruner's).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

# (batmon_id, ts, voltage, current, power, soc, details, charged_kwh, discharged_kwh);
# the last two: the energy this reading added (None for none), summed by history buckets.
ReadingRow = tuple[int, float, float | None, float | None, float | None, float | None, str | None,
                   float | None, float | None]  # fmt: skip
# (batmon_id, {column: value}) applied after the rows, in order.
CurrentUpdate = tuple[int, dict[str, Any]]
# The rows and updates of a group planned again from these batmons' stored states
# (energy_guard.STATE_COLUMNS by batmon id): Store.write's ``replan``.
Replan = Callable[[dict[int, dict[str, Any]]], tuple[list[ReadingRow], list[CurrentUpdate]]]
# batmon_id -> (status, last_reading) it had before a write changed its stored status.
StatusBefore = dict[int, tuple[str, float | None]]
Row = tuple[Any, ...]
Render = Callable[[list[Row]], bytes]
Channel = Literal["email", "whatsapp", "sms"]
CHANNELS: tuple[Channel, ...] = ("email", "whatsapp", "sms")
METRICS = ("voltage", "current", "power", "soc")
# What each reading added (kWh); a bucket holds their sums (docs/BATTERY.md).
ENERGY = ("charged_kwh", "discharged_kwh")
"""The metrics a reading carries as columns (history, buckets and rollups)."""


class ReadingSink(Protocol):
    """Where committed readings go: one atomic ``write`` per group (the writer's thread).

    Rules every store keeps (the contract suite checks them):
    - history is in time order, readings of one ts in the order they were written;
    - a reading written again with the same batmon, ts and values is stored once
      (a redelivery after a lost acknowledgement), while two different readings
      with the same ts are both kept;
    - an update carrying ``last_reading`` older than the stored one changes nothing:
      an older reading never replaces the latest.
    """

    def write(self, rows: Sequence[ReadingRow], updates: Sequence[CurrentUpdate],
              replan: Replan | None = None) -> StatusBefore | None:  # fmt: skip
        """Append ``rows`` and apply ``updates`` in one transaction, or raise and change nothing.

        ``replan``: a store several processes share locks the updated batmons' rows first and,
        where another process moved one on since the plan (energy_guard.py), asks
        ``replan(states)`` for the rows and updates planned from the rows' state, under those
        locks: a race costs a second plan, not a failed write. Without it, or on a
        one-process store, a stale plan raises StaleState.

        A store several processes share (``Store.shared()`` not None) returns the batmons whose stored
        ``status`` this write changed, with what they had: only that process announces the
        change. A one-process store returns None: the caller's memory is the truth.
        """
        ...

    def probe(self) -> None:
        """A tiny real write; raises StorageFailed while the store cannot be written."""
        ...

    def close(self) -> None:
        """Release the connection."""
        ...


class HistoryReads(Protocol):
    """History pages read off the event loop (a worker pool of the store's own)."""

    async def raw_span(self, batmon_id: int, lo: float, hi: float) -> tuple[float, float] | None:
        """ts of the first and last readings with lo <= ts < hi, else None."""
        ...

    async def raw_count(self, batmon_id: int, lo: float, hi: float) -> int:
        """How many readings have lo <= ts < hi."""
        ...

    def raw_pages(self, batmon_id: int, first: float, last: float, render: Render) -> AsyncIterator[bytes]:
        """Rendered pages of the readings with first <= ts <= last, in time then arrival order."""
        ...

    async def last_reported(self, batmon_ids: list[int]) -> dict[int, dict[str, float]]:
        """When each metric of these batmons was last in a reading (never reported: left out);
        from the readings, else the end of the latest rollup hour that has it."""
        ...

    async def bucket_plan(self, batmon_id: int, lo: float, hi: float, bucket: int
                          ) -> tuple[float, float, bool] | None:  # fmt: skip
        """(first, last, with_rollups) of the data behind a bucketed answer, else None."""
        ...

    def bucket_pages(self, batmon_id: int, lo: float, first: float, last: float, bucket: int,
                     with_rollups: bool, render: Render) -> AsyncIterator[bytes]:  # fmt: skip
        """Rendered pages of (time, count, min/avg/max per metric) buckets, empty ones left out."""
        ...

    def raw_rows(self, batmon_id: int, lo: float, hi: float) -> list[Row]:
        """Every reading with lo <= ts < hi, on the calling thread (tools and tests)."""
        ...

    def close(self) -> None:
        """Wait for running pages, then release the workers' connections."""
        ...


@dataclass(frozen=True, slots=True)
class Claim:
    """One worker's hold on one notice for one attempt (``attempt``: the count the claim made).

    An outcome is applied only while the claim holds: another worker that took the notice
    over after the lease ran out makes the first one's late outcome a logged attempt only.
    """

    notice_id: int
    worker: str
    attempt: int


class NoticeOutbox(Protocol):
    """The durable queue of notices: one row per notice and channel, ids never reused.

    Rows move ``queued -> sending -> sent | queued (retry) | failed``, or are written
    ``skipped``. A claim is exclusive: of two claims of one queued notice, one wins.
    Delivery is at least once. A store shared by several workers (PostgreSQL) gives a
    claim a lease, renewed while the send runs: once it runs out (the worker died or
    stalls) another worker may claim the notice again. A single-process store (SQLite,
    memory: the data folder's lock) needs none and requeues a stopped run's sends at start.
    """

    def enqueue(self, notices: Iterable[dict[str, Any]]) -> list[int]:
        """Insert notices in one transaction; return their ids in order."""
        ...

    def due(self, now: float, limit: int) -> list[dict[str, Any]]:
        """Notices to claim now, oldest due first: queued ones whose next attempt is due, and
        ones ``sending`` whose lease ran out (shared stores)."""
        ...

    def next_due_at(self) -> float | None:
        """When the earliest notice is due (or a lease runs out), or None when none waits."""
        ...

    def claim(self, notice_id: int, worker: str, now: float, lease_until: float) -> Claim | None:
        """Mark a notice ``sending`` for ``worker`` until ``lease_until`` and count the
        attempt; None if it was not queued (nor its lease run out by ``now``): another has it."""
        ...

    def renew(self, claims: Sequence[Claim], lease_until: float) -> int:
        """Extend the leases of these claims that still hold; how many did."""
        ...

    def mark_sent(self, claim: Claim, now: float, target: str) -> bool:
        """Record a delivery to ``target`` (the masked URL), held or not: it happened. False
        when the notice was recorded sent already: this delivery was a duplicate."""
        ...

    def mark_retry(self, claim: Claim, now: float, next_attempt_at: float, error: str,
                   target: str = "") -> bool:  # fmt: skip
        """Record a failed attempt and queue the notice again; False (attempt logged only)
        when the claim no longer holds."""
        ...

    def mark_failed(self, claim: Claim, now: float, error: str, target: str = "") -> bool:
        """Record a failed attempt after which no more are made; False as mark_retry."""
        ...

    def mark_skipped(self, notice_id: int, now: float, reason: str) -> None: ...

    def requeue_interrupted(self) -> int:
        """Put back in the queue the sends of a stopped process, where the store can know it
        stopped: a single-process store, every ``sending`` row; a shared one, none (leases
        run out instead: a live worker's sends are never taken from it)."""
        ...

    def latest_for_batmon(self, batmon_id: int, limit: int) -> list[dict[str, Any]]:
        """The batmon's most recent notices, newest first."""
        ...

    def attempts(self, notice_id: int) -> list[dict[str, Any]]: ...
    def count_by_state(self) -> dict[str, int]: ...
    def pending_by_channel(self) -> dict[tuple[str, str], int]: ...

    def prune(self, before: float) -> int:
        """Delete finished notices created before ``before``; queued ones stay."""
        ...


@dataclass(frozen=True)
class CredentialRows:
    """Every credential at one moment: what a running server replaces its memory with."""

    version: int
    users: list[dict[str, Any]]
    """id, email, api_key_hash of every user."""
    tokens: list[dict[str, Any]]
    """user_id, secret_hash of every MQTT token."""


class CredentialReads(Protocol):
    """The change counter and the credentials it counts: what a running server polls.

    The counter moves on every change of a user (added, key or email changed, removed)
    and of an MQTT token, whichever process makes it (`batmon user ...` beside serve).
    """

    def version(self) -> int:
        """The change counter (it only grows)."""
        ...

    def load(self) -> CredentialRows:
        """Version, users and tokens, consistent with each other (one read transaction)."""
        ...


class Credentials(CredentialReads, Protocol):
    """Api key resets and users' MQTT tokens (Home Assistant). Secrets are never stored,
    only their SHA-256 (bridge/security.py); each method is one transaction."""

    def set_api_key_hash(self, user_id: int, api_key_hash: str) -> None:
        """Replace a user's api key (the old one stops matching anything)."""
        ...

    def add_token(self, user_id: int, name: str, secret_hash: str, created: float) -> bool:
        """Insert a token; False (nothing written) if the user has one of that name."""
        ...

    def tokens_of(self, user_id: int) -> list[dict[str, Any]]:
        """The user's tokens (name, created), oldest first; never their hashes."""
        ...

    def revoke_token(self, user_id: int, name: str) -> bool:
        """Delete the user's token of that name; False if there is none."""
        ...


class Leader(Protocol):
    """One of several processes elected to do a job (the offline watchdog) while it lives."""

    def start(self, changed: Callable[[bool], None]) -> None:
        """Try to lead from now on, on a thread of its own; ``changed(leading)`` is called from
        that thread each time this process gains or loses the lead."""
        ...

    def stop(self) -> None:
        """Give the lead up (another process takes it) and stop trying."""
        ...


AlarmDecision = tuple[str, dict[str, Any]]
"""(kind, alarm columns to change): what bridge/extensions/alarms.py decided for one value."""


class SharedState(Protocol):
    """What workers sharing one database (PostgreSQL) need to do each change once, deciding
    against the database's rows rather than their own memory (docs/SCALE-OUT.md)."""

    def expire_overdue(self, now: float) -> tuple[list[tuple[int, float | None]], float | None]:
        """Mark Offline every Online batmon whose last_reading + update_period <= now, in one
        conditional UPDATE: ((id, last_reading) of each one this call changed, the earliest
        deadline still pending or None)."""
        ...

    def decide_alarm(self, alarm_id: int, reading_ts: float,
                     decide: Callable[[dict[str, Any]], AlarmDecision | None]
                     ) -> tuple[str, dict[str, Any]] | None:  # fmt: skip
        """In one transaction: lock the alarm's row, and unless a newer reading than
        ``reading_ts`` is already its batmon's latest, apply ``decide(row)``'s changes.
        Returns (kind, the row after) when something changed, else None."""
        ...

    def leader(self, job: str) -> Leader:
        """An election among the processes on this database for ``job`` (not started)."""
        ...



class Store(ReadingSink, Protocol):
    """Everything durable: users, batmons, alarms and their state, readings, history,
    the notice outbox, retention and rollups. Opened (and migrated) by its module's
    ``open``; the event loop never calls it (see docs/DESIGN.md, "The store")."""

    def another(self) -> Store:
        """A second handle on the same database, for another thread."""
        ...

    def ping(self) -> bool:
        """True when the database answers a query."""
        ...

    # -- users ------------------------------------------------------------------
    def add_user(self, email: str, api_key_hash: str, created: float) -> int:
        """Insert a user and return its id; Conflict if the email is taken."""
        ...

    def users(self) -> list[dict[str, Any]]:
        """Every user (id, email, api_key_hash, email_url, whatsapp_url, sms_url), oldest first."""
        ...

    def user_by_key_hash(self, api_key_hash: str) -> dict[str, Any] | None: ...
    def user_by_email(self, email: str) -> dict[str, Any] | None: ...
    def user_by_id(self, user_id: int) -> dict[str, Any] | None: ...

    def set_user_targets(self, user_id: int, targets: dict[str, str]) -> None:
        """Set notification target URLs (email_url, whatsapp_url, sms_url)."""
        ...

    # -- batmons ----------------------------------------------------------------
    def retired_ids(self) -> set[int]:
        """Ids of deleted batmons and alarms: never handed out again."""
        ...

    def add_batmon(self, row: dict[str, Any]) -> None:
        """Insert a batmon (its id chosen by the caller); Conflict if the id was ever used."""
        ...

    def batmons(self) -> list[dict[str, Any]]:
        """Every batmon not deleted, oldest first."""
        ...

    def update_batmon(self, batmon_id: int, changes: dict[str, Any]) -> None:
        """Change some columns of one batmon (an older ``last_reading`` changes nothing)."""
        ...

    def delete_batmon(self, batmon_id: int) -> None:
        """Delete a batmon and its alarms at once and retire their ids; its readings and
        rollups stay marked for ``purge_deleted`` (a few rows at a time, resumable)."""
        ...

    def deleted_with_data(self) -> list[int]:
        """Deleted batmons whose readings or rollups are not purged yet (resume after restart)."""
        ...

    def purge_deleted(self, batmon_id: int, max_rows: int) -> bool:
        """Delete at most about ``max_rows`` readings of a deleted batmon in one transaction;
        True once nothing of it is left (its rollups go with the last chunk)."""
        ...

    # -- readings ---------------------------------------------------------------
    def history(self, batmon_id: int, min_ts: float, max_ts: float) -> Iterator[dict[str, Any]]:
        """Readings with min_ts <= ts < max_ts, in time then arrival order (tools and tests)."""
        ...

    def reading_count(self, batmon_id: int) -> int: ...

    def history_reader(self, workers: int = 2) -> HistoryReads:
        """Read-only workers for history answers (one per thread)."""
        ...

    # -- alarms -----------------------------------------------------------------
    def add_alarm(self, row: dict[str, Any]) -> None:
        """Insert an alarm (its id chosen by the caller); Conflict if the id was ever used."""
        ...

    def alarms(self) -> list[dict[str, Any]]: ...
    def update_alarm(self, alarm_id: int, changes: dict[str, Any]) -> None: ...

    def delete_alarm(self, alarm_id: int) -> None:
        """Delete an alarm; its id is never handed out again."""
        ...

    # -- banks ------------------------------------------------------------------
    def banks(self) -> list[dict[str, Any]]:
        """Every bank (id, user_id, name, created, batmon_ids in their order), oldest first."""
        ...

    def add_bank(self, bank_id: int, user_id: int, name: str, created: float, batmon_ids: list[int]) -> None:
        """Insert a bank (its id chosen by the caller) with its members."""
        ...

    def rename_bank(self, bank_id: int, name: str) -> None: ...

    def set_bank_members(self, bank_id: int, batmon_ids: list[int]) -> None:
        """Replace a bank's members and their order (a deleted batmon leaves by itself)."""
        ...

    def delete_bank(self, bank_id: int) -> None:
        """Delete a bank (not its batmons); its id is never handed out again."""
        ...

    # -- credentials ------------------------------------------------------------
    @property
    def credentials(self) -> Credentials:
        """Api keys, MQTT tokens and their change counter, on this handle."""
        ...

    # -- notices ----------------------------------------------------------------
    @property
    def outbox(self) -> NoticeOutbox: ...

    # -- several processes ---------------------------------------------------------
    def shared(self) -> SharedState | None:
        """The queries that decide each change once when several processes share this
        database (PostgreSQL), or None: one process, whose memory decides (SQLite, memory)."""
        ...

    # -- retention and rollups ----------------------------------------------------
    def batmons_with_readings_before(self, cutoff: float) -> list[int]:
        """Ids of batmons that have readings older than ``cutoff``."""
        ...

    def prune_batch(self, batmon_id: int, cutoff: float, batch_rows: int) -> int:
        """Fold the oldest readings (at most batch_rows) older than ``cutoff`` into hourly
        rollups and delete them, in one transaction; returns how many."""
        ...

    def rollups(self, batmon_id: int) -> list[dict[str, Any]]:
        """The batmon's hourly rollups (hour, count, min/max/sum/count per metric), in hour order."""
        ...
