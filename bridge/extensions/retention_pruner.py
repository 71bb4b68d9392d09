"""`--retention-days N`: prune raw readings older than N days, off the hot path.

An extension with start()/stop(): every ``interval_s`` it runs one pass on a worker
thread with a store handle of its own (``Store.another()``). A pass folds old readings into hourly rollups
and deletes them in small transactions, pausing between them so the ingest writer
gets the database in between. Long-range bucketed history reads the rollups, so
charts survive pruning.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from bridge.threads import run_on_own_thread

if TYPE_CHECKING:
    from bridge.store.interface import Store

log = logging.getLogger(__name__)

DAY = 86_400
HOUR = 3_600


class RetentionPruner:
    """Keeps raw readings for ``days`` days; older ones live on as hourly rollups."""

    def __init__(self, store: Store, days: int, *, interval_s: float = 600.0,
                 batch_rows: int = 5_000, pause_s: float = 0.05,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.store = store  # opened again on the pruner's thread: never used here
        self.days = days
        self.interval_s = interval_s
        self.batch_rows = batch_rows
        self.pause_s = pause_s
        self.clock = clock
        self.pruned = 0  # readings pruned since start
        self.batches = 0  # transactions committed since start
        self._stopping = threading.Event()
        self._store: Store | None = None
        self._task: asyncio.Task[None] | None = None
        self._pass: asyncio.Future[int] | None = None

    def cutoff(self) -> int:
        """Readings before this (a whole hour, ``days`` ago) are pruned."""
        return int(self.clock() - self.days * DAY) // HOUR * HOUR

    async def start(self) -> None:
        """Start pruning: a pass now, then one every interval."""
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name="retention")

    async def stop(self) -> None:
        """Stop after the current batch; the connection is closed."""
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._pass is not None:  # the thread ends after its current batch
            with contextlib.suppress(Exception):
                await self._pass
            self._pass = None
        store, self._store = self._store, None
        if store is not None:  # off the loop, as every store call (docs/DESIGN.md, "Threads")
            await run_on_own_thread(store.close, name="retention-close")

    async def _run(self) -> None:
        while True:
            try:
                # Shielded: cancelling this task must not abandon a pass mid-batch;
                # stop() sets the event and waits for the pass to end instead.
                self._pass = asyncio.ensure_future(run_on_own_thread(self.prune_pass, name="retention-pass"))
                await asyncio.shield(self._pass)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("retention pass failed; trying again next interval")
            await asyncio.sleep(self.interval_s)

    def prune_pass(self) -> int:
        """Prune everything older than the cutoff, batch by batch; returns rows pruned."""
        if self._store is None:
            self._store = self.store.another()
        store = self._store
        cutoff = self.cutoff()
        pruned = 0
        for batmon_id in store.batmons_with_readings_before(cutoff):
            while not self._stopping.is_set():
                started = time.monotonic()
                count = store.prune_batch(batmon_id, cutoff, self.batch_rows)
                pruned += count
                self.pruned += count
                self.batches += 1
                if count < self.batch_rows:
                    break
                # Let the ingest writer in between two of our transactions, for at least
                # as long as the batch held the lock: pruning takes at most half the time.
                self._stopping.wait(max(self.pause_s, time.monotonic() - started))
        if pruned:
            log.info("retention: pruned %d readings older than %d days into hourly rollups",
                     pruned, self.days)  # fmt: skip
        return pruned
