"""A second store: everything in the process's memory, nothing on disk.

It implements bridge/store/interface.py without a line of SQL, which is what keeps the
interface honest: the contract suite (tests/test_store_contract.py) runs on it beside
SQLite, so a rule that only SQLite happened to keep shows up as a failing test here.
It also serves tests and tools that want a core without a file. It is not durable:
`batmon serve` never uses it (a restart forgets everything).

Handles made by ``another()`` share one ``_Data`` behind one lock, as several
connections share one database file.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from bridge.errors import Conflict
from bridge.store import energy_guard
from bridge.store.interface import (
    ENERGY,
    METRICS,
    Claim,
    CredentialRows,
    CurrentUpdate,
    ReadingRow,
    Render,
    Replan,
    Row,
)

HOUR = 3600
BATMON_DEFAULTS: dict[str, Any] = {
    "voltage": 0.0, "current": 0.0, "power": 0.0, "soc": 0.0, "details": "{}", "last_reading": None,
    "status": "Offline", "notification_enabled": True, "whatsapp_enabled": False, "sms_enabled": False,
    "voltage_units": "", "current_units": "", "power_units": "", "soc_units": "", "capacity_ah": None,
    # energy counters and their integration state (bridge/energy.py)
    "energy_charged_kwh": 0.0, "energy_discharged_kwh": 0.0, "energy_point_ts": None,
    "energy_point_power": None, "device_charged_kwh": None, "device_discharged_kwh": None,
}  # fmt: skip
BATMON_COLUMNS = frozenset(BATMON_DEFAULTS) | {"name", "type", "token", "update_period"}
ALARM_DEFAULTS: dict[str, Any] = {"triggered": False, "trigger_time": None, "akn": None, "last_notice": None,
                                  "clear_value": None}  # fmt: skip
ALARM_COLUMNS = frozenset(ALARM_DEFAULTS) | {"name", "metric", "condition", "threshold", "repeat_delay",
                                             "enabled", "update_time"}  # fmt: skip
USER_TARGET_COLUMNS = frozenset({"email_url", "whatsapp_url", "sms_url"})
MAX_ERROR_CHARS = 500

# A stored reading, in history order: (ts, seq, voltage, current, power, soc, details,
# charged_kwh, discharged_kwh); the measured values are r[2:7], what it added r[7:9].
Stored = tuple[float, int, Any, Any, Any, Any, Any, Any, Any]


@dataclass
class _Data:
    lock: threading.RLock = field(default_factory=threading.RLock)
    users: dict[int, dict[str, Any]] = field(default_factory=dict)
    batmons: dict[int, dict[str, Any]] = field(default_factory=dict)
    alarms: dict[int, dict[str, Any]] = field(default_factory=dict)
    banks: dict[int, dict[str, Any]] = field(default_factory=dict)
    retired: set[int] = field(default_factory=set)
    deleted: dict[int, float] = field(default_factory=dict)  # batmon id -> when
    readings: dict[int, list[Stored]] = field(default_factory=dict)
    rollups: dict[int, dict[int, dict[str, Any]]] = field(default_factory=dict)  # batmon -> hour -> row
    outbox: dict[int, dict[str, Any]] = field(default_factory=dict)
    tokens: dict[int, dict[str, Any]] = field(default_factory=dict)  # token id -> row
    credentials_version: int = 0  # moves on every change of a user or a token
    attempts: list[dict[str, Any]] = field(default_factory=list)
    next_id: dict[str, int] = field(default_factory=lambda: {"user": 1, "notice": 1, "seq": 1,
                                                                    "token": 1})  # fmt: skip

    def take(self, kind: str) -> int:
        value = self.next_id[kind]
        self.next_id[kind] = value + 1
        return value


def _checked(changes: dict[str, Any], allowed: frozenset[str]) -> dict[str, Any]:
    unknown = set(changes) - allowed
    if unknown:
        raise ValueError(f"not a changeable column: {sorted(unknown)}")
    return changes


class MemoryStore:
    """The ``Store`` interface over Python dicts and sorted lists, one lock for all handles."""

    def __init__(self, data: _Data | None = None) -> None:
        self._data = data if data is not None else _Data()

    def another(self) -> MemoryStore:
        """Another handle on the same data."""
        return MemoryStore(self._data)

    def close(self) -> None:
        """Nothing to release."""

    def ping(self) -> bool:
        return True

    # -- readings ---------------------------------------------------------------------
    def write(self, rows: Sequence[ReadingRow], updates: Sequence[CurrentUpdate],
              replan: Replan | None = None) -> None:  # fmt: skip
        """Append ``rows`` and apply ``updates`` at once, or change nothing (``replan`` unused:
        never shared between processes)."""
        split = [(batmon_id, *energy_guard.split(changes)) for batmon_id, changes in updates]
        for _, columns, _base in split:
            _checked(columns, BATMON_COLUMNS)  # before anything changes: all or nothing
        d = self._data
        with d.lock:
            stale = {i: {k: row[k] for k in energy_guard.STATE_COLUMNS} for i, _, base in split
                     if (row := d.batmons.get(i)) is not None
                     and not energy_guard.holds(row["last_reading"], base)}  # fmt: skip
            if stale:  # planned from a state another writer moved on (energy_guard.py)
                raise energy_guard.StaleState(stale)
            for batmon_id, ts, *values in rows:
                history = d.readings.setdefault(batmon_id, [])
                at = bisect.bisect_left(history, (ts,))
                same_ts = history[at:bisect.bisect_left(history, (math.nextafter(ts, math.inf),))]
                if any(list(r[2:7]) == values[:5] for r in same_ts):
                    continue  # a redelivery of a stored reading (its measured values)
                history.insert(at + len(same_ts), (ts, d.take("seq"), *values))  # type: ignore[arg-type]
            for batmon_id, columns, base in split:
                self._update_batmon(batmon_id, columns, guarded=energy_guard.guarded(base))

    def probe(self) -> None:
        """Memory takes every write."""

    def history(self, batmon_id: int, min_ts: float, max_ts: float) -> Iterator[dict[str, Any]]:
        names = ("ts", *METRICS, "details")
        return iter([dict(zip(names, row, strict=True)) for row in self._range(batmon_id, min_ts, max_ts)])

    def reading_count(self, batmon_id: int) -> int:
        with self._data.lock:
            return len(self._data.readings.get(batmon_id, ()))

    def history_reader(self, workers: int = 2) -> MemoryHistoryReader:
        return MemoryHistoryReader(self._data)

    def _range(self, batmon_id: int, lo: float, hi: float) -> list[Row]:
        """(ts, voltage, current, power, soc, details) with lo <= ts < hi."""
        with self._data.lock:
            history = self._data.readings.get(batmon_id, [])
            part = history[bisect.bisect_left(history, (lo,)):bisect.bisect_left(history, (hi,))]
        return [(r[0], *r[2:7]) for r in part]

    # -- users -------------------------------------------------------------------------
    def add_user(self, email: str, api_key_hash: str, created: float) -> int:
        d = self._data
        with d.lock:
            if any(u["email"] == email or u["api_key_hash"] == api_key_hash for u in d.users.values()):
                raise Conflict("UNIQUE constraint failed: users.email")
            user_id = d.take("user")
            d.users[user_id] = {"id": user_id, "email": email, "api_key_hash": api_key_hash,
                                "created": created, "email_url": "", "whatsapp_url": "",
                                "sms_url": ""}  # fmt: skip
            d.credentials_version += 1
            return user_id

    def users(self) -> list[dict[str, Any]]:
        with self._data.lock:
            return [dict(u) for _, u in sorted(self._data.users.items())]

    def _user_where(self, key: str, value: Any) -> dict[str, Any] | None:
        with self._data.lock:
            return next((dict(u) for u in self._data.users.values() if u[key] == value), None)

    def user_by_key_hash(self, api_key_hash: str) -> dict[str, Any] | None:
        return self._user_where("api_key_hash", api_key_hash)

    def user_by_email(self, email: str) -> dict[str, Any] | None:
        return self._user_where("email", email)

    def user_by_id(self, user_id: int) -> dict[str, Any] | None:
        return self._user_where("id", user_id)

    def set_user_targets(self, user_id: int, targets: dict[str, str]) -> None:
        _checked(targets, USER_TARGET_COLUMNS)
        with self._data.lock:
            if user_id in self._data.users:
                self._data.users[user_id].update(targets)

    # -- batmons -----------------------------------------------------------------------
    def retired_ids(self) -> set[int]:
        with self._data.lock:
            return set(self._data.retired)

    def _claim_id(self, new_id: int, table: dict[int, Any]) -> None:
        if new_id in self._data.retired:
            raise Conflict(f"id {new_id} was used before")
        if new_id in table:
            raise Conflict(f"id {new_id} exists already")

    def add_batmon(self, row: dict[str, Any]) -> None:
        _checked(row, BATMON_COLUMNS | {"id", "user_id", "created"})
        with self._data.lock:
            self._claim_id(row["id"], self._data.batmons)
            self._data.batmons[row["id"]] = {**BATMON_DEFAULTS, **row}

    def batmons(self) -> list[dict[str, Any]]:
        with self._data.lock:
            ordered = sorted(self._data.batmons.values(), key=lambda b: (b["created"], b["id"]))
            return [dict(b) for b in ordered]

    def update_batmon(self, batmon_id: int, changes: dict[str, Any]) -> None:
        _checked(changes, BATMON_COLUMNS)
        with self._data.lock:
            self._update_batmon(batmon_id, changes)

    def _update_batmon(self, batmon_id: int, changes: dict[str, Any], guarded: bool = False) -> None:
        row = self._data.batmons.get(batmon_id)
        if row is None:
            return
        new = changes.get("last_reading")
        if not guarded and new is not None and row["last_reading"] is not None and row["last_reading"] > new:
            return  # an older reading never replaces the latest
        row.update(changes)

    def delete_batmon(self, batmon_id: int) -> None:
        d = self._data
        with d.lock:
            alarm_ids = [i for i, a in d.alarms.items() if a["batmon_id"] == batmon_id]
            d.retired.update([batmon_id, *alarm_ids])
            for alarm_id in alarm_ids:
                del d.alarms[alarm_id]
            for bank in d.banks.values():
                if batmon_id in bank["batmon_ids"]:
                    bank["batmon_ids"] = [i for i in bank["batmon_ids"] if i != batmon_id]
            if d.batmons.pop(batmon_id, None) is not None:
                d.deleted.setdefault(batmon_id, time.time())

    def deleted_with_data(self) -> list[int]:
        with self._data.lock:
            return [i for i, _ in sorted(self._data.deleted.items(), key=lambda item: (item[1], item[0]))]

    def purge_deleted(self, batmon_id: int, max_rows: int) -> bool:
        d = self._data
        with d.lock:
            if batmon_id not in d.deleted:
                return True
            history = d.readings.get(batmon_id, [])
            if len(history) > max_rows:
                del history[:max_rows]
                return False
            d.readings.pop(batmon_id, None)
            d.rollups.pop(batmon_id, None)
            del d.deleted[batmon_id]
            return True

    # -- alarms ------------------------------------------------------------------------
    def add_alarm(self, row: dict[str, Any]) -> None:
        _checked(row, ALARM_COLUMNS | {"id", "batmon_id", "bank_id"})
        with self._data.lock:
            self._claim_id(row["id"], self._data.alarms)
            # on one batmon or one bank: the other is None (SQLite's CHECK)
            self._data.alarms[row["id"]] = {"batmon_id": None, "bank_id": None, **ALARM_DEFAULTS, **row}

    def alarms(self) -> list[dict[str, Any]]:
        with self._data.lock:
            ordered = sorted(self._data.alarms.values(), key=lambda a: (a["update_time"], a["id"]))
            return [dict(a) for a in ordered]

    def update_alarm(self, alarm_id: int, changes: dict[str, Any]) -> None:
        _checked(changes, ALARM_COLUMNS)
        with self._data.lock:
            if alarm_id in self._data.alarms:
                self._data.alarms[alarm_id].update(changes)

    def delete_alarm(self, alarm_id: int) -> None:
        with self._data.lock:
            self._data.retired.add(alarm_id)
            self._data.alarms.pop(alarm_id, None)

    # -- banks -------------------------------------------------------------------------
    def banks(self) -> list[dict[str, Any]]:
        with self._data.lock:
            ordered = sorted(self._data.banks.values(), key=lambda b: (b["created"], b["id"]))
            return [{**b, "batmon_ids": list(b["batmon_ids"])} for b in ordered]

    def add_bank(self, bank_id: int, user_id: int, name: str, created: float, batmon_ids: list[int]) -> None:
        with self._data.lock:
            self._claim_id(bank_id, self._data.banks)
            self._data.banks[bank_id] = {"id": bank_id, "user_id": user_id, "name": name, "created": created,
                                         "batmon_ids": list(batmon_ids)}  # fmt: skip

    def rename_bank(self, bank_id: int, name: str) -> None:
        with self._data.lock:
            if bank_id in self._data.banks:
                self._data.banks[bank_id]["name"] = name

    def set_bank_members(self, bank_id: int, batmon_ids: list[int]) -> None:
        with self._data.lock:
            if bank_id in self._data.banks:
                self._data.banks[bank_id]["batmon_ids"] = list(batmon_ids)

    def delete_bank(self, bank_id: int) -> None:
        d = self._data
        with d.lock:
            alarm_ids = [i for i, a in d.alarms.items() if a["bank_id"] == bank_id]
            d.retired.update([bank_id, *alarm_ids])
            for alarm_id in alarm_ids:
                del d.alarms[alarm_id]
            d.banks.pop(bank_id, None)

    # -- notices -----------------------------------------------------------------------
    @property
    def outbox(self) -> MemoryOutbox:
        return MemoryOutbox(self._data)

    def shared(self) -> None:
        """Never shared between processes."""
        return None

    @property
    def credentials(self) -> MemoryCredentials:
        return MemoryCredentials(self._data)

    # -- retention and rollups -----------------------------------------------------------
    def batmons_with_readings_before(self, cutoff: float) -> list[int]:
        with self._data.lock:
            return sorted(i for i, rows in self._data.readings.items() if rows and rows[0][0] < cutoff)

    def prune_batch(self, batmon_id: int, cutoff: float, batch_rows: int) -> int:
        d = self._data
        with d.lock:
            history = d.readings.get(batmon_id, [])
            old = history[:min(batch_rows, bisect.bisect_left(history, (cutoff,)))]
            hours = d.rollups.setdefault(batmon_id, {})
            for row in old:
                hour = int(row[0]) // HOUR * HOUR
                _fold(hours.setdefault(hour, _empty_rollup(batmon_id, hour)), row)
            del history[:len(old)]
            return len(old)

    def rollups(self, batmon_id: int) -> list[dict[str, Any]]:
        with self._data.lock:
            return [dict(r) for _, r in sorted(self._data.rollups.get(batmon_id, {}).items())]


def _empty_rollup(batmon_id: int, hour: int) -> dict[str, Any]:
    row: dict[str, Any] = {"batmon_id": batmon_id, "hour": hour, "count": 0}
    for m in METRICS:
        row.update({f"{m}_min": None, f"{m}_max": None, f"{m}_sum": 0.0, f"{m}_count": 0})
    row.update({f"{e}_sum": 0.0 for e in ENERGY})
    return row


def _fold(rollup: dict[str, Any], row: Stored) -> None:
    rollup["count"] += 1
    for m, value in zip(METRICS, row[2:6], strict=True):
        if value is None:
            continue
        rollup[f"{m}_min"] = value if rollup[f"{m}_min"] is None else min(rollup[f"{m}_min"], value)
        rollup[f"{m}_max"] = value if rollup[f"{m}_max"] is None else max(rollup[f"{m}_max"], value)
        rollup[f"{m}_sum"] += value
        rollup[f"{m}_count"] += 1
    for e, added in zip(ENERGY, row[7:9], strict=True):
        if added is not None:
            rollup[f"{e}_sum"] += added


class MemoryCredentials:
    """``Credentials`` over the shared data: every change moves the counter, as the
    SQL stores' triggers do."""

    def __init__(self, data: _Data) -> None:
        self._data = data

    def set_api_key_hash(self, user_id: int, api_key_hash: str) -> None:
        d = self._data
        with d.lock:
            if user_id in d.users:
                d.users[user_id]["api_key_hash"] = api_key_hash
                d.credentials_version += 1

    def add_token(self, user_id: int, name: str, secret_hash: str, created: float) -> bool:
        d = self._data
        with d.lock:
            if any((t["user_id"] == user_id and t["name"] == name) or t["secret_hash"] == secret_hash
                   for t in d.tokens.values()):  # fmt: skip
                return False
            d.tokens[d.take("token")] = {"user_id": user_id, "name": name, "secret_hash": secret_hash,
                                         "created": created}  # fmt: skip
            d.credentials_version += 1
            return True

    def tokens_of(self, user_id: int) -> list[dict[str, Any]]:
        with self._data.lock:
            mine = sorted((t["created"], token_id, t["name"]) for token_id, t in self._data.tokens.items()
                          if t["user_id"] == user_id)  # fmt: skip
        return [{"name": name, "created": created} for created, _, name in mine]

    def revoke_token(self, user_id: int, name: str) -> bool:
        d = self._data
        with d.lock:
            found = [i for i, t in d.tokens.items() if t["user_id"] == user_id and t["name"] == name]
            for token_id in found:
                del d.tokens[token_id]
            if found:
                d.credentials_version += 1
            return bool(found)

    def version(self) -> int:
        with self._data.lock:
            return self._data.credentials_version

    def load(self) -> CredentialRows:
        d = self._data
        with d.lock:
            users = [{"id": u["id"], "email": u["email"], "api_key_hash": u["api_key_hash"]}
                     for u in d.users.values()]  # fmt: skip
            tokens = [{"user_id": t["user_id"], "secret_hash": t["secret_hash"]} for t in d.tokens.values()]
            return CredentialRows(d.credentials_version, users, tokens)


class MemoryOutbox:
    """``NoticeOutbox`` over the shared data."""

    def __init__(self, data: _Data) -> None:
        self._data = data

    def enqueue(self, notices: Iterable[dict[str, Any]]) -> list[int]:
        d = self._data
        ids = []
        with d.lock:
            for n in notices:
                notice_id = d.take("notice")
                d.outbox[notice_id] = {
                    "id": notice_id, "user_id": n["user_id"], "batmon_id": n["batmon_id"],
                    "channel": n["channel"], "kind": n["kind"], "title": n["title"], "body": n["body"],
                    "state": n["state"], "attempts": 0, "next_attempt_at": n["created"],
                    "last_error": n.get("last_error", ""), "target": "", "created": n["created"],
                    "sent_at": None,
                }  # fmt: skip
                ids.append(notice_id)
        return ids

    def _queued(self) -> list[dict[str, Any]]:
        return sorted((n for n in self._data.outbox.values() if n["state"] == "queued"),
                      key=lambda n: (n["next_attempt_at"], n["id"]))  # fmt: skip

    def due(self, now: float, limit: int) -> list[dict[str, Any]]:
        with self._data.lock:
            return [dict(n) for n in self._queued() if n["next_attempt_at"] <= now][:limit]

    def next_due_at(self) -> float | None:
        with self._data.lock:
            queued = self._queued()
            return float(queued[0]["next_attempt_at"]) if queued else None

    def claim(self, notice_id: int, worker: str, now: float, lease_until: float) -> Claim | None:
        with self._data.lock:  # one process, as SQLite: no lease
            notice = self._data.outbox.get(notice_id)
            if notice is None or notice["state"] != "queued":
                return None
            notice.update(state="sending", attempts=notice["attempts"] + 1)
            return Claim(notice_id, worker, notice["attempts"])

    def renew(self, claims: Sequence[Claim], lease_until: float) -> int:
        with self._data.lock:  # no lease to extend: how many still hold
            rows = [(c, self._data.outbox.get(c.notice_id)) for c in claims]
            return sum(1 for c, n in rows if n and n["state"] == "sending" and n["attempts"] == c.attempt)

    def mark_sent(self, claim: Claim, now: float, target: str) -> bool:
        return self._finish(claim, now, "sent", "", sent_at=now, target=target)

    def mark_retry(self, claim: Claim, now: float, next_attempt_at: float, error: str,
                   target: str = "") -> bool:  # fmt: skip
        return self._finish(claim, now, "queued", error, next_attempt_at=next_attempt_at, target=target)

    def mark_failed(self, claim: Claim, now: float, error: str, target: str = "") -> bool:
        return self._finish(claim, now, "failed", error, target=target)

    def mark_skipped(self, notice_id: int, now: float, reason: str) -> None:
        with self._data.lock:
            notice = self._data.outbox.get(notice_id)
            if notice is not None:
                notice.update(state="skipped", last_error=reason[:MAX_ERROR_CHARS])

    def _finish(self, claim: Claim, now: float, state: str, error: str, **columns: Any) -> bool:
        error = error[:MAX_ERROR_CHARS]
        with self._data.lock:
            notice = self._data.outbox.get(claim.notice_id)
            if notice is None:
                return False
            self._data.attempts.append({"outbox_id": claim.notice_id, "at": now, "error": error,
                                        "outcome": "sent" if state == "sent" else "error"})  # fmt: skip
            holds = (notice["state"] != "sent" if state == "sent"
                     else notice["state"] == "sending" and notice["attempts"] == claim.attempt)  # fmt: skip
            if holds:
                notice.update(state=state, last_error=error, **columns)
            return holds

    def requeue_interrupted(self) -> int:
        with self._data.lock:
            sending = [n for n in self._data.outbox.values() if n["state"] == "sending"]
            for n in sending:
                n["state"] = "queued"
            return len(sending)

    def latest_for_batmon(self, batmon_id: int, limit: int) -> list[dict[str, Any]]:
        with self._data.lock:
            newest_first = sorted(self._data.outbox.items(), reverse=True)
            return [dict(n) for _, n in newest_first if n["batmon_id"] == batmon_id][:limit]

    def attempts(self, notice_id: int) -> list[dict[str, Any]]:
        with self._data.lock:
            return [{k: a[k] for k in ("at", "outcome", "error")} for a in self._data.attempts
                    if a["outbox_id"] == notice_id]  # fmt: skip

    def count_by_state(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        with self._data.lock:
            for n in self._data.outbox.values():
                counts[n["state"]] = counts.get(n["state"], 0) + 1
        return counts

    def pending_by_channel(self) -> dict[tuple[str, str], int]:
        counts: dict[tuple[str, str], int] = {}
        with self._data.lock:
            for n in self._data.outbox.values():
                if n["state"] in ("queued", "sending"):
                    key = (n["state"], n["channel"])
                    counts[key] = counts.get(key, 0) + 1
        return counts

    def prune(self, before: float) -> int:
        d = self._data
        with d.lock:
            gone = {i for i, n in d.outbox.items()
                    if n["state"] in ("sent", "failed", "skipped") and n["created"] < before}  # fmt: skip
            for i in gone:
                del d.outbox[i]
            d.attempts = [a for a in d.attempts if a["outbox_id"] not in gone]
            return len(gone)


class MemoryHistoryReader:
    """``HistoryReads`` over the shared data; pages are cut on a worker thread like SQLite's."""

    def __init__(self, data: _Data, page_rows: int = 10_000) -> None:
        self._data = data
        self.page_rows = page_rows

    def close(self) -> None:
        """Nothing to release."""

    def _rows(self, batmon_id: int, lo: float, hi: float) -> list[Stored]:
        with self._data.lock:
            history = self._data.readings.get(batmon_id, [])
            return history[bisect.bisect_left(history, (lo,)):bisect.bisect_left(history, (hi,))]

    def raw_rows(self, batmon_id: int, lo: float, hi: float) -> list[Row]:
        return [(r[0], *r[2:7]) for r in self._rows(batmon_id, lo, hi)]

    async def raw_span(self, batmon_id: int, lo: float, hi: float) -> tuple[float, float] | None:
        rows = await asyncio.to_thread(self._rows, batmon_id, lo, hi)
        return (rows[0][0], rows[-1][0]) if rows else None

    async def raw_count(self, batmon_id: int, lo: float, hi: float) -> int:
        return len(await asyncio.to_thread(self._rows, batmon_id, lo, hi))

    async def raw_pages(self, batmon_id: int, first: float, last: float, render: Render
                        ) -> AsyncIterator[bytes]:  # fmt: skip
        rows = await asyncio.to_thread(self._rows, batmon_id, first, math.nextafter(last, math.inf))
        for start in range(0, len(rows), self.page_rows):
            # The SQLite page's shape: ts, the metrics, details, then seq.
            page = [(r[0], *r[2:7], r[1]) for r in rows[start:start + self.page_rows]]
            yield await asyncio.to_thread(render, page)

    async def last_reported(self, batmon_ids: list[int]) -> dict[int, dict[str, float]]:
        return await asyncio.to_thread(lambda: {b: self._last_reported(b) for b in batmon_ids})

    def _last_reported(self, batmon_id: int) -> dict[str, float]:
        found: dict[str, float] = {}
        with self._data.lock:
            for row in reversed(self._data.readings.get(batmon_id, [])):
                for metric, value in zip(METRICS, row[2:6], strict=True):
                    if value is not None:
                        found.setdefault(metric, float(row[0]))
                if len(found) == len(METRICS):
                    break
            for hour, rollup in sorted(self._data.rollups.get(batmon_id, {}).items(), reverse=True):
                for metric in METRICS:
                    if metric not in found and rollup[f"{metric}_count"] > 0:
                        found[metric] = float(hour + HOUR - 1)
        return found

    async def bucket_plan(self, batmon_id: int, lo: float, hi: float, bucket: int
                          ) -> tuple[float, float, bool] | None:  # fmt: skip
        raw = await self.raw_span(batmon_id, lo, hi)
        hours = self._hours(batmon_id, lo - (HOUR - 1), hi) if bucket >= HOUR else []
        spans = [s for s in (raw, (hours[0], hours[-1]) if hours else None) if s is not None]
        if not spans:
            return None
        return min(s[0] for s in spans), max(s[1] for s in spans), bool(hours)

    def _hours(self, batmon_id: int, lo: float, hi: float) -> list[int]:
        with self._data.lock:
            return sorted(h for h in self._data.rollups.get(batmon_id, {}) if lo <= h < hi)

    async def bucket_pages(self, batmon_id: int, lo: float, first: float, last: float, bucket: int,
                           with_rollups: bool, render: Render) -> AsyncIterator[bytes]:  # fmt: skip
        rows = await asyncio.to_thread(self._buckets, batmon_id, lo, last, bucket, with_rollups)
        if rows:
            yield await asyncio.to_thread(render, rows)

    def _buckets(self, batmon_id: int, lo: float, last: float, bucket: int, with_rollups: bool) -> list[Row]:
        end = math.nextafter(last, math.inf)
        parts: dict[int, dict[str, Any]] = {}
        for row in self._rows(batmon_id, lo, end):
            t = int(row[0]) // bucket * bucket
            _fold(parts.setdefault(t, _empty_rollup(batmon_id, t)), row)
        if with_rollups:
            with self._data.lock:
                hours = dict(self._data.rollups.get(batmon_id, {}))
            for hour, rollup in hours.items():
                if lo - (HOUR - 1) <= hour < end:
                    _merge(parts.setdefault(hour // bucket * bucket, _empty_rollup(batmon_id, hour)), rollup)
        out: list[Row] = []
        for t, p in sorted(parts.items()):
            values: list[Any] = [t, p["count"]]
            for m in METRICS:
                count = p[f"{m}_count"]
                values += [p[f"{m}_min"], p[f"{m}_sum"] / count if count else None, p[f"{m}_max"]]
            values += [p[f"{e}_sum"] for e in ENERGY]
            out.append(tuple(values))
        return out


def _merge(into: dict[str, Any], rollup: dict[str, Any]) -> None:
    into["count"] += rollup["count"]
    for m in METRICS:
        for part, pick in (("min", min), ("max", max)):
            key = f"{m}_{part}"
            values = [v for v in (into[key], rollup[key]) if v is not None]
            into[key] = pick(values) if values else None
        into[f"{m}_sum"] += rollup[f"{m}_sum"]
        into[f"{m}_count"] += rollup[f"{m}_count"]
    for e in ENERGY:
        into[f"{e}_sum"] += rollup[f"{e}_sum"]

