"""The offline watchdog: a batmon goes Offline when ``last_reading + update_period``
passes without a new reading, whether or not any request arrives.

It keeps a heap of (deadline, batmon_id) and sleeps until the earliest deadline, so
its cost follows the readings, not the number of batmons. The rule itself (is the
batmon due?) stays in ``Core.expire_if_due``, which also emits StatusChanged.

On a database several workers share (PostgreSQL), no worker's memory sees every reading:
there the watchdog is bridge/extensions/shared_watchdog.py, run by one elected worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections.abc import Callable
from typing import Any

from bridge.core import Core
from bridge.events import NO_SUBSCRIPTION, BatmonChanged, ReadingAccepted, Subscription
from bridge.extensions.shared_watchdog import SharedWatchdog

log = logging.getLogger(__name__)

# A due batmon the core still counts as Online (float rounding at the boundary) is
# looked at again this soon.
RECHECK_S = 0.05
# After an unexpected failure (a locked database, say) try that batmon again later.
RETRY_S = 1.0


class OfflineWatchdog:
    """Flips Online batmons to Offline within a moment of their deadline."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self._subscription: Subscription = NO_SUBSCRIPTION
        self._heap: list[tuple[float, int]] = []
        # The deadline each batmon has in the heap; an entry that differs is stale.
        self._armed: dict[int, float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.shared: SharedWatchdog | None = None

    async def start(self) -> None:
        """Arm every Online batmon (expiring the overdue at once) and start watching."""
        shared = self.core.store.shared()
        if shared is not None:  # several workers: the database's rows decide, on one leader
            self.shared = SharedWatchdog(self.core, shared)
            await self.shared.start()
            return
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._heap.clear()
        self._armed.clear()
        for batmon in list(self.core.batmons.values()):
            if batmon.status == "Online":
                self._arm(batmon.id)
        self._expire_due()
        self._subscription = self.core.bus.subscribe_all(
            {ReadingAccepted: self._on_reading, BatmonChanged: self._on_changed}
        )
        self._task = asyncio.create_task(self._run(), name="offline-watchdog")

    async def stop(self) -> None:
        """Stop watching; statuses stay as they are."""
        if self.shared is not None:
            await self.shared.stop()
        self._subscription.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @property
    def armed(self) -> int:
        """How many batmons have a pending deadline."""
        return len(self._armed)

    # -- events --------------------------------------------------------------
    def _on_reading(self, event: ReadingAccepted) -> None:
        if event.current:  # a back-filled older reading does not move the deadline
            self._in_loop(self._arm, event.batmon.id)

    def _on_changed(self, event: BatmonChanged) -> None:
        self._in_loop(self._arm, event.batmon.id)  # update_period may have changed

    def _in_loop(self, callback: Callable[..., Any], *args: Any) -> None:
        # The bus runs handlers in the emitter's thread, which need not be ours.
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:  # the usual case: no self-pipe write per reading
            callback(*args)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(callback, *args)

    # -- heap ----------------------------------------------------------------
    def _arm(self, batmon_id: int) -> None:
        batmon = self.core.batmons.get(batmon_id)
        if batmon is not None and batmon.deadline is not None:
            self._push(batmon_id, batmon.deadline)

    def _push(self, batmon_id: int, deadline: float) -> None:
        armed = self._armed.get(batmon_id)
        if armed is not None and armed <= deadline:
            # The earlier entry fires first and re-arms to the real deadline then,
            # so a chatty device keeps one heap entry, not one per reading.
            return
        self._armed[batmon_id] = deadline
        heapq.heappush(self._heap, (deadline, batmon_id))
        if self._heap[0] == (deadline, batmon_id) and self._wakeup is not None:
            self._wakeup.set()  # earlier than what the sleeper waits for

    def _expire_due(self) -> float | None:
        """Handle every entry that is due; return seconds until the next one."""
        while self._heap:
            deadline, batmon_id = self._heap[0]
            now = self.core.clock()
            if deadline > now:
                return deadline - now
            heapq.heappop(self._heap)
            if self._armed.get(batmon_id) != deadline:
                continue  # superseded by an earlier deadline
            del self._armed[batmon_id]
            batmon = self.core.batmons.get(batmon_id)
            if batmon is None or batmon.status != "Online" or batmon.deadline is None:
                continue  # deleted, or already Offline: the next reading re-arms it
            if batmon.deadline > now:
                self._push(batmon_id, batmon.deadline)  # newer readings moved it on
                continue
            try:
                expired = self.core.expire_if_due(batmon_id)
            except Exception:
                log.exception("could not mark batmon %s Offline; retrying", batmon_id)
                self._push(batmon_id, now + RETRY_S)
                continue
            if not expired:
                self._push(batmon_id, now + RECHECK_S)
        return None

    async def _run(self) -> None:
        assert self._wakeup is not None
        while True:
            self._wakeup.clear()
            delay = self._expire_due()
            if delay is None:
                await self._wakeup.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), delay)
