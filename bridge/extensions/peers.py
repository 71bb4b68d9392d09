"""`PeerSync`: several workers on one PostgreSQL database see each other's changes.

Each worker keeps batmons, alarms, banks and credentials in memory (bridge/core.py). A change
made on another worker reaches this one two ways (bridge/store/pg_notify.py):

- its NOTIFY, at once, on a listening connection: the affected entries are reloaded;
- before every API request is answered, ``catch_up``: one query asks for the change log past
  the version this worker holds (and, for a read, the named batmons' latest values). A NOTIFY
  may still be on its way when the other worker has already answered its client; this query
  may not: what that worker committed before answering is seen. So a batmon deleted on A is
  refused on B right after A's answer, and a status on B returns A's reading or a newer one.

Readings announced by another worker are loaded only for batmons whose owner has a live
dashboard open here (the live feed then pushes them); everything else catches up on demand.
Nothing reloaded here is published, notified or counted again: that was the other worker's
(``ChangedElsewhere`` is for views only). Requests that arrive while a check is under way
share the next one, so the checks run one at a time on one connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from typing import Any

from bridge.core import Alarm, Batmon, Core
from bridge.energy import COLUMNS as ENERGY_COLUMNS
from bridge.errors import StorageFailed
from bridge.events import ChangedElsewhere
from bridge.store.pg_notify import Changes, PgListener, PgPeerReads
from bridge.threads import run_on_own_thread

log = logging.getLogger(__name__)

# A batmon's settings (the columns whose change the trigger logs) and its latest values.
SETTINGS = ("user_id", "name", "type", "token", "update_period", "notification_enabled",
            "whatsapp_enabled", "sms_enabled", "voltage_units", "current_units", "power_units",
            "soc_units", "capacity_ah")  # fmt: skip
CURRENT = ("voltage", "current", "power", "soc", "details", "last_reading", "status", *ENERGY_COLUMNS)
ALARM_FIELDS = tuple(f.name for f in fields(Alarm))


class PeerSync:
    """Keeps this worker's memory in step with the others' commits (PostgreSQL only)."""

    def __init__(self, core: Core, url: str, *,
                 credentials: Callable[[], Awaitable[bool]] | None = None) -> None:  # fmt: skip
        """``credentials()`` reloads keys and tokens (the credential watcher's check)."""
        self.core = core
        self._url = url
        self._credentials = credentials
        self.watched: Callable[[int], bool] = lambda user_id: False
        """Whether a user has a live dashboard open on this worker (the live feed says)."""
        self._reads: PgPeerReads | None = None
        self._listener: PgListener | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._known = -1  # the config version memory reflects (-1: check everything once)
        self._waiting: list[tuple[Sequence[int], asyncio.Future[None]]] = []
        self._draining: asyncio.Task[None] | None = None
        self._failing = False
        self._gone: dict[int, Batmon] = {}  # deleted elsewhere, held until their event is emitted
        self.stats = {"checks": 0, "reloads": 0, "readings_loaded": 0}

    async def start(self) -> None:
        """LISTEN, then take in everything changed since the core loaded; then serve requests."""
        self._loop = asyncio.get_running_loop()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="peer-sync")
        self._reads = PgPeerReads(self._url)
        self._listener = PgListener(self._url, self._on_config, self._on_readings, self._on_reconnect)
        try:
            await run_on_own_thread(self._listener.start, name="peer-listen")
        except OSError as exc:
            raise StorageFailed(str(exc)) from None
        await self.catch_up()  # changes between the core's load and LISTEN
        self.core.peers = self

    async def stop(self) -> None:
        """Stop listening, fail nothing that waits (it is answered from memory), close."""
        self.core.peers = None
        listener, self._listener = self._listener, None
        if listener is not None:
            await run_on_own_thread(listener.stop, name="peer-listen-stop")
        if self._draining is not None:
            await asyncio.gather(self._draining, return_exceptions=True)
        reads, self._reads = self._reads, None
        if reads is not None:
            await run_on_own_thread(reads.close, name="peer-reads-close")
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)

    # -- the request path ----------------------------------------------------------------
    async def catch_up(self, batmon_ids: Sequence[int] = ()) -> None:
        """Return once a check begun after this call has been applied: every change committed
        before now is in memory, and so are these batmons' latest values. StorageFailed when
        the database cannot be read."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._waiting.append((batmon_ids, future))
        if self._draining is None or self._draining.done():
            self._draining = loop.create_task(self._drain(), name="peer-sync")
        await future

    async def _drain(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            ids = sorted({i for asked, _ in batch for i in asked})
            try:
                changes = await self._check(ids)
                await self._apply(changes)
            except Exception as exc:  # the waiters get it; the next batch tries again
                failure = exc if isinstance(exc, StorageFailed) else StorageFailed(str(exc))
                if not isinstance(exc, OSError | StorageFailed):
                    log.exception("applying other workers' changes failed")
                for _, future in batch:
                    if not future.done():
                        future.set_exception(failure)
                continue
            for _, future in batch:
                if not future.done():
                    future.set_result(None)

    async def _check(self, ids: list[int]) -> Changes:
        reads, pool = self._reads, self._pool
        if reads is None or pool is None:
            raise StorageFailed("not listening to other workers (stopped)")
        self.stats["checks"] += 1
        known = self._known
        try:
            changes = await asyncio.get_running_loop().run_in_executor(pool, reads.check, known, ids)
        except OSError as exc:
            if not self._failing:
                log.warning("%s", exc)
            self._failing = True
            raise StorageFailed(str(exc)) from None
        self._failing = False
        return changes

    # -- who of the workers sends (Home Assistant discovery) ---------------------------------
    async def first_to_send(self, batmon_id: int, digest: str) -> bool:
        """True when this worker is the one to send this config (it changed); True as well when
        the database cannot say (a config sent twice beats one never sent)."""
        return await self._shared(lambda reads: reads.first_to_send(batmon_id, digest))

    async def take_turn(self, name: str, every_s: float) -> bool:
        """True when this worker takes the turn ``name`` (at most one worker per ``every_s``)."""
        return await self._shared(lambda reads: reads.take_turn(name, every_s))

    async def record_sent(self, digests: Sequence[tuple[int, str]]) -> None:
        """These configs went out in a re-send."""
        def record(reads: PgPeerReads) -> bool:
            reads.record_sent(digests)
            return True

        await self._shared(record)

    async def _shared(self, ask: Callable[[PgPeerReads], bool]) -> bool:
        reads, pool = self._reads, self._pool
        if reads is None or pool is None:
            return True
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, ask, reads)
        except OSError as exc:
            log.warning("%s: sending anyway", exc)
            return True

    # -- applying (on the loop) ------------------------------------------------------------
    async def _apply(self, changes: Changes) -> None:
        if changes.version != self._known:
            self.stats["reloads"] += 1
        if changes.users and self._credentials is not None:
            await self._credentials()
        touched: dict[int, bool] = {}  # batmon id -> deleted
        for batmon_id, row in changes.batmons.items():
            touched[batmon_id] = self._apply_batmon(batmon_id, row)
        if changes.full:
            for batmon in [b for b in self.core.batmons.values() if b.id not in changes.batmons]:
                self.core.forget_deleted(batmon)
                self._gone[batmon.id] = batmon
                touched[batmon.id] = True
        if changes.banks is not None:  # first: a bank's alarms below attach to its new entry
            self.core.banks.reload(changes.banks)
        for alarm_id, row in changes.alarms.items():
            touched.update(dict.fromkeys(self._apply_alarm(alarm_id, row), False))
        if changes.full:
            for alarm in [a for a in self.core.alarms.values() if a.id not in changes.alarms]:
                touched.update(dict.fromkeys(self._apply_alarm(alarm.id, None), False))
        for row in changes.current.values():
            if self._advance(row):
                touched.setdefault(row["id"], False)
        self._known = changes.version
        for batmon_id, deleted in touched.items():
            shown = self._gone.pop(batmon_id, None) if deleted else self.core.batmons.get(batmon_id)
            if shown is not None:
                self.core.bus.emit(ChangedElsewhere(shown, deleted=deleted))

    def _apply_batmon(self, batmon_id: int, row: dict[str, Any] | None) -> bool:
        """Take in one batmon's stored row (None: deleted); True when it is gone."""
        batmon = self.core.batmons.get(batmon_id)
        if row is None:
            if batmon is not None:
                self.core.forget_deleted(batmon)
                self._gone[batmon_id] = batmon
            return True
        fresh = Batmon.from_row(row)
        if batmon is None:
            self.core.batmons[batmon_id] = fresh
            return False
        for name in SETTINGS:
            setattr(batmon, name, getattr(fresh, name))
        self._advance(row)
        return False

    def _apply_alarm(self, alarm_id: int, row: dict[str, Any] | None) -> list[int]:
        """Take in one alarm's stored row (None: deleted); the batmons it concerns (none for
        a bank's alarm: its bank is redrawn with the bank changes)."""
        alarm = self.core.alarms.get(alarm_id)
        if row is None:
            if alarm is None:
                return []
            self.core.alarms.pop(alarm_id, None)
            self.core.retire_ids(alarm_id)
            if (subject := self.core.alarm_subject(alarm)) is not None:
                subject.alarms.pop(alarm_id, None)
            return [] if alarm.batmon_id is None else [alarm.batmon_id]
        fresh = Alarm.from_row(row)
        subject = self.core.alarm_subject(fresh)
        if subject is None:
            return []
        if alarm is None:
            self.core.alarms[alarm_id] = fresh
            subject.alarms[alarm_id] = fresh
        else:
            for name in ALARM_FIELDS:
                setattr(alarm, name, getattr(fresh, name))
        return [] if fresh.batmon_id is None else [fresh.batmon_id]

    def _advance(self, row: dict[str, Any]) -> bool:
        """A stored latest value newer than memory's replaces it (never an older one)."""
        batmon = self.core.batmons.get(row["id"])
        ts = row.get("last_reading")
        if batmon is None or ts is None or (batmon.last_reading is not None and ts <= batmon.last_reading):
            return False
        for name in CURRENT:
            setattr(batmon, name, row[name])
        return True

    # -- the listener's thread -> the loop --------------------------------------------------
    def _on_config(self, version: int) -> None:
        self._soon(self._config_changed, version)

    def _on_readings(self, batmon_ids: list[int]) -> None:
        self._soon(self._readings_changed, batmon_ids)

    def _on_reconnect(self) -> None:
        self._soon(self._config_changed, None)  # what was said while nobody listened

    def _soon(self, fn: Callable[..., None], arg: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn, arg)

    def _config_changed(self, version: int | None) -> None:
        if version is None or version > self._known:
            self._background(())

    def _readings_changed(self, batmon_ids: list[int]) -> None:
        batmons = self.core.batmons
        wanted = [i for i in batmon_ids if (b := batmons.get(i)) is not None and self.watched(b.user_id)]
        if wanted:
            self.stats["readings_loaded"] += len(wanted)
            self._background(wanted)

    def _background(self, batmon_ids: Sequence[int]) -> None:
        if self.core.peers is not self:
            return  # not started, or stopping
        task = asyncio.get_running_loop().create_task(self.catch_up(batmon_ids))
        task.add_done_callback(_quiet)


def _quiet(task: asyncio.Task[None]) -> None:
    """A background catch-up that failed was logged by the check; the next one retries."""
    if not task.cancelled():
        task.exception()
