"""The offline watchdog of workers sharing one database (PostgreSQL): one leader marks them.

Each worker sees only its own share of the readings, so no worker's memory knows when a
batmon fell silent. The database does: the worker that leads (an advisory lock,
bridge/store/pg_leader.py) asks it, at the earliest pending deadline and at least every
``POLL_S``, to flip every overdue Online batmon to Offline in one conditional UPDATE, and
announces exactly those (StatusChanged: notices, retained state, the live feed). The others
stand by and take over within about a second of the leader's session ending.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from bridge.core import Core
from bridge.events import StatusChanged
from bridge.store.interface import Leader, SharedState, Store

log = logging.getLogger(__name__)

POLL_S = 1.0
"""The longest a leader waits between two looks: a batmon made Online by another worker
may have an earlier deadline than the leader last saw."""
RETRY_S = 1.0
MIN_WAIT_S = 0.05


class SharedWatchdog:
    """Marks overdue batmons Offline while this worker leads; stands by otherwise."""

    def __init__(self, core: Core, shared: SharedState) -> None:
        self.core = core
        self.leader: Leader = shared.leader("offline-watchdog")
        self.leading = False
        self._changed: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Join the election (on the leader's own thread) and watch while leading."""
        loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()

        def changed(leading: bool) -> None:  # on the election's thread
            with contextlib.suppress(RuntimeError):  # the loop closed: nothing to lead
                loop.call_soon_threadsafe(self._set_leading, leading)

        self.leader.start(changed)
        self._task = asyncio.create_task(self._run(), name="offline-watchdog-shared")

    async def stop(self) -> None:
        """Stop watching and give the lead up (another worker takes it)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await asyncio.to_thread(self.leader.stop)

    def _set_leading(self, leading: bool) -> None:
        self.leading = leading
        log.info("offline watchdog: this worker %s", "leads" if leading else "no longer leads")
        if self._changed is not None:
            self._changed.set()

    async def _run(self) -> None:
        assert self._changed is not None
        while True:
            self._changed.clear()
            wait: float | None = None
            if self.leading:
                wait = await self._expire_due()
            if wait is None:
                await self._changed.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), wait)

    async def _expire_due(self) -> float:
        """Flip the overdue in the database, announce them; seconds until the next look."""
        now = self.core.clock()

        def expire(store: Store) -> tuple[list[tuple[int, float | None]], float | None]:
            shared = store.shared()
            assert shared is not None, "the writer's store is the core's kind"
            return shared.expire_overdue(now)

        try:
            expired, upcoming = await self.core.in_store(expire)
        except Exception as exc:  # the database is away: the writer reports it too
            log.warning("offline watchdog could not look for overdue batmons: %s", exc)
            return RETRY_S
        for batmon_id, last_reading in expired:
            self._announce(batmon_id, last_reading, now)
        if upcoming is None:
            return POLL_S
        return max(MIN_WAIT_S, min(POLL_S, upcoming - self.core.clock()))

    def _announce(self, batmon_id: int, last_reading: float | None, now: float) -> None:
        batmon = self.core.batmons.get(batmon_id)
        if batmon is None:
            log.warning("batmon %s went Offline but this worker does not know it yet", batmon_id)
            return
        if last_reading is not None and (batmon.last_reading is None or last_reading > batmon.last_reading):
            batmon.last_reading = last_reading  # another worker's reading: the notice names it
        batmon.status = "Offline"
        self.core.bus.emit(StatusChanged(batmon, "Offline", "Online", now))
