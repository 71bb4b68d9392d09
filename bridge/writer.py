"""The one writer: readings from both doors are committed in groups, in order, on
its own thread and connection, so no commit ever runs on the event loop.

A door submits a batmon's readings and gets a future that resolves once they are
committed and applied (memory updated, events emitted); only then may it answer
``success`` or send a PUBACK. A group that fails to commit fails every future in
it: nothing is acknowledged that is not on disk.

Planning (which reading becomes the batmon's current value) happens in the
writer's thread, in submission order, against the latest timestamp committed or
pending, so an older reading still goes to history only. Memory is changed on the
submitter's event loop, after the commit, by the ``apply`` callback.

The same thread and connection run the control plane's writes (users, batmons,
alarms and their state, outbox rows, Offline transitions: ``call``), in one queue
with the readings, so their order holds; and purge deleted batmons' readings a chunk
at a time, between groups (``purge``). The store is reached only through its
interface (bridge/store/interface.py); its errors are the store's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from bridge.energy import COLUMNS as ENERGY_COLUMNS
from bridge.energy import EnergyState, advance
from bridge.errors import StorageFailed, Unavailable
from bridge.store.energy_guard import PLANNED_FROM, StaleState

MAX_REPLANS = 3  # a batmon whose readings race on more workers than this is refused (503), not lost

if TYPE_CHECKING:
    from bridge.core import Batmon
    from bridge.store.interface import CurrentUpdate, ReadingRow, StatusBefore, Store

__all__ = ["Overloaded", "ReadingWriter", "StorageFailed", "WriterStats"]

log = logging.getLogger(__name__)

MAX_GROUP_ROWS = 1_000
"""Rows committed in one transaction at most: past this, latency grows for little gain."""
MAX_PENDING_ROWS = 5_000
HTTP_PENDING_ROWS = 2 * MAX_GROUP_ROWS
"""Rows queued or being committed at most; past this a door is told to come back later."""
APPLY_SLICE = 16  # committed submissions applied per loop callback
LINGER_S = 0.001
PROBE_EVERY_S = 1.0
PURGE_CHUNK_ROWS = 10_000
"""Readings of a deleted batmon removed per transaction: ~4 ms of SQLite work, so a
reading waits at most that long behind a purge (measured: 0.37 s per million rows)."""
COMMIT_DELAY_ENV = "BATMON_TEST_COMMIT_DELAY_MS"
"""Tests slow each commit by this many ms, to show back-pressure; never set in production."""

Door = Literal["http", "mqtt"]


class Overloaded(Unavailable):
    """The writer's queue is full: the doors push back instead of buffering without bound."""


@dataclass(slots=True)
class Plan:
    """What one submission did, decided in the writer's thread and applied on its loop."""

    batmon: Batmon
    rows: list[tuple[float, dict[str, Any]]]
    current_flags: list[bool]
    current: dict[str, Any]
    received: float
    door: Door
    energy: list[tuple[float | None, float | None]]  # kWh (charged, discharged) each row added
    # (rows, seconds) of the group's commit, on the group's first plan only: the loop
    # that applies it tells the bus (CommitObserved), the writer's thread tells nobody.
    commit: tuple[int, float] | None = None
    # A store shared by several workers decides status changes (Store.write's answer):
    # then only a plan with ``status_before`` (status, last_reading) announces one.
    status_by_store: bool = False
    status_before: tuple[str, float | None] | None = None


@dataclass(slots=True, eq=False)
class _Submission:
    batmon: Batmon
    rows: list[tuple[float, dict[str, Any]]]  # (ts, values) in time order
    received: float
    door: Door
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]


@dataclass(slots=True, eq=False)
class _Barrier:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]


@dataclass(slots=True, frozen=True)
class _Forget:
    batmon_id: int


@dataclass(slots=True, eq=False)
class _Call:
    fn: Callable[[Store], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


@dataclass(slots=True, frozen=True)
class _Purge:
    batmon_ids: tuple[int, ...]


_STOP = object()
Apply = Callable[[Sequence[Plan]], None]
T = TypeVar("T")
# What the writer hands back: a committed plan, or None with the error of a failed
# commit (None for a barrier); the future to settle, and its result (of a call).
Entry = tuple["Plan | None", "asyncio.Future[Any]", "BaseException | None", Any]
LoopEntry = tuple[asyncio.AbstractEventLoop, "Plan | None", "asyncio.Future[Any]", "BaseException | None",
                  Any]


@dataclass
class WriterStats:
    """Counters for /healthz and metrics; written by the writer's thread only."""

    commits: int = 0
    rows: int = 0
    failed_commits: int = 0
    replans: int = 0  # groups planned again: another worker had moved a batmon on
    last_error: str | None = None
    last_error_at: float | None = None
    failing: bool = False
    last_group_rows: int = 0
    max_group_rows: int = 0
    last_commit_s: float = 0.0


class ReadingWriter:
    """Owns the write connection; commits groups of readings from a bounded queue."""

    def __init__(self, open_sink: Callable[[], Store], apply: Apply, *,
                 max_pending_rows: int = MAX_PENDING_ROWS) -> None:  # fmt: skip
        self._open_sink = open_sink
        self._apply = apply
        self.max_pending_rows = max_pending_rows
        self.stats = WriterStats()
        # Submissions refused as Overloaded: counted where they are refused, on the
        # submitting event loop's thread, never by the writer's (WriterStats is its own).
        self.refused_overloaded = 0
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _pending_rows (doors may live on several loops)
        self._pending_rows = 0
        self._thread: threading.Thread | None = None
        self._latest: dict[int, float | None] = {}  # planned latest ts per batmon
        self._energy: dict[int, EnergyState] = {}  # planned energy state per batmon
        self._deliveries: dict[asyncio.AbstractEventLoop, _Deliveries] = {}  # writer's thread only
        self._delay_s = float(os.environ.get(COMMIT_DELAY_ENV, "0") or 0) / 1000
        self._purging: deque[int] = deque()  # deleted batmons whose readings go, writer's thread only
        self._purge_resume_at = 0.0  # monotonic time of the next purge chunk, writer's thread only
        self.purge_chunk_rows = PURGE_CHUNK_ROWS

    # -- doors' side (any event loop) -------------------------------------------
    @property
    def pending_rows(self) -> int:
        """Rows submitted and not yet committed or failed."""
        return self._pending_rows

    @property
    def has_room(self) -> bool:
        """True while a new submission would be taken."""
        return self._pending_rows < self.max_pending_rows

    def submit(self, batmon: Batmon, rows: list[tuple[float, dict[str, Any]]], received: float,
               door: Door) -> asyncio.Future[None]:  # fmt: skip
        """Queue readings (sorted by ts); the future resolves once committed and applied.

        Raises Overloaded when the queue is full: the door answers 503 or stops reading.
        HTTP is refused earlier (two groups ahead): an MQTT door waits within its window,
        an HTTP client is better told to come back than kept waiting.
        """
        loop = asyncio.get_running_loop()
        limit = min(self.max_pending_rows, HTTP_PENDING_ROWS) if door == "http" else self.max_pending_rows
        with self._lock:
            refused = self._pending_rows + len(rows) > limit and self._pending_rows > 0
            if not refused:
                self._pending_rows += len(rows)
        if refused:
            self.refused_overloaded += 1
            raise Overloaded("The server is busy storing readings; try again in a moment.")
        self._ensure_thread()
        future: asyncio.Future[None] = loop.create_future()
        self._queue.put(_Submission(batmon, rows, received, door, loop, future))
        return future

    async def barrier(self) -> None:
        """Return once everything submitted before this call is committed (or failed) and applied."""
        loop = asyncio.get_running_loop()
        if self._thread is None:
            return
        future: asyncio.Future[None] = loop.create_future()
        self._queue.put(_Barrier(loop, future))
        await future

    def forget(self, batmon_id: int) -> None:
        """Drop planning state of a deleted batmon (ids are never reused)."""
        self._queue.put(_Forget(batmon_id))

    def call(self, fn: Callable[[Store], T]) -> asyncio.Future[T]:
        """Run ``fn(store)`` on the writer's thread and connection, after everything
        submitted before; the future (of the calling loop) gets its result or error."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._ensure_thread()
        self._queue.put(_Call(fn, loop, future))
        return future

    def purge(self, batmon_ids: Sequence[int]) -> None:
        """Delete these deleted batmons' readings, a chunk per transaction between groups,
        until none is left (Store.purge_deleted); a restart resumes from the store's marks."""
        if batmon_ids:
            self._ensure_thread()
            self._queue.put(_Purge(tuple(batmon_ids)))

    async def drain(self) -> None:
        """Commit everything queued, then stop the thread (for a clean stop)."""
        await self.barrier()
        self.stop()

    def stop(self) -> None:
        """Stop the thread after what is queued; safe to call twice."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_STOP)
            thread.join(timeout=30)

    # -- the writer's thread ------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="batmon-writer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        sink: Store | None = None
        stopping = False
        try:
            while not stopping:
                # While failing, try the disk every second even with no traffic,
                # so /healthz turns ok again by itself once the fault clears.
                timeout = PROBE_EVERY_S if self.stats.failing else None
                if self._purging:
                    rest = self._purge_resume_at - time.monotonic()
                    if rest <= 0 and self._queue.empty():
                        sink = self._purge_chunk(sink)  # idle: the next chunk of a delete
                        continue
                    timeout = max(0.0, rest) if timeout is None else min(timeout, max(0.0, rest))
                try:
                    item = self._queue.get(timeout=timeout)
                except queue.Empty:
                    if not self.stats.failing:
                        continue  # a purge chunk is due
                    sink = self._probe(sink)
                    continue
                group: list[_Submission] = []
                rows = 0
                lingered = False
                while True:
                    if item is _STOP:
                        stopping = True
                        break
                    if isinstance(item, _Barrier):
                        # Everything before it is in an earlier group or in this one.
                        sink = self._flush(sink, group)
                        group, rows = [], 0
                        self._hand_back([(item.loop, None, item.future, None, None)])
                    elif isinstance(item, _Call):
                        sink = self._flush(sink, group)
                        group, rows = [], 0
                        sink = self._run_call(sink, item)
                    elif isinstance(item, _Forget):
                        sink = self._flush(sink, group)
                        group, rows = [], 0
                        self._latest.pop(item.batmon_id, None)
                        self._energy.pop(item.batmon_id, None)
                    elif isinstance(item, _Purge):
                        self._purging.extend(i for i in item.batmon_ids if i not in self._purging)
                    else:
                        group.append(item)
                        rows += len(item.rows)
                    if rows >= MAX_GROUP_ROWS:
                        break
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        if lingered or self.stats.last_group_rows <= 1 or _http_only(group):
                            break
                        # Busy (the last group held several readings): wait a moment
                        # for more, so one commit and one wake-up serve many readings.
                        # Not for HTTP alone: its clients wait for their answers, those in
                        # this group send nothing more until it commits, so the wait mostly
                        # delays them (docs/PERFORMANCE.md, "HTTP update").
                        lingered = True
                        time.sleep(LINGER_S)
                        try:
                            item = self._queue.get_nowait()
                        except queue.Empty:
                            break
                sink = self._flush(sink, group)
                if self._purging and not stopping and time.monotonic() >= self._purge_resume_at:
                    # Busy: one chunk between two groups, so a delete ends even under load
                    # while a reading waits behind at most one chunk.
                    sink = self._purge_chunk(sink)
        finally:
            if sink is not None:
                with contextlib.suppress(Exception):
                    sink.close()

    def _run_call(self, sink: Store | None, call: _Call) -> Store | None:
        """One control-plane call on this thread's store handle; its outcome goes back in order."""
        result: Any = None
        error: BaseException | None = None
        try:
            if sink is None:
                sink = self._open_sink()
            result = call.fn(sink)
        except Exception as exc:  # the caller's to handle; the connection stays usable
            error = exc
        self._hand_back([(call.loop, None, call.future, error, result)])
        return sink

    def _purge_chunk(self, sink: Store | None) -> Store | None:
        """Delete one chunk of the first deleted batmon's readings; drop it once none is left."""
        batmon_id = self._purging[0]
        started = time.monotonic()
        try:
            if sink is None:
                sink = self._open_sink()
            if sink.purge_deleted(batmon_id, self.purge_chunk_rows):
                self._purging.popleft()
            # Rest as long as the chunk took: a purge uses at most half a core and half the
            # database's time, so the loop and other writers keep theirs on a busy machine.
            self._purge_resume_at = time.monotonic() + (time.monotonic() - started)
        except Exception as exc:
            # The mark stays in the store: the purge resumes at the next start.
            log.error("could not purge the readings of deleted batmon %s: %s", batmon_id, _describe(exc))
            self._purging.popleft()
        return sink

    def _flush(self, sink: Store | None, group: list[_Submission]) -> Store | None:
        """Plan, commit and hand back one group; returns the sink to keep using."""
        if not group:
            return sink
        saved = {s.batmon.id: self._latest.get(s.batmon.id, _UNSET) for s in group}
        saved_energy = {s.batmon.id: self._energy.get(s.batmon.id, _UNSET) for s in group}
        submitted = sum(len(s.rows) for s in group)  # every row of the group becomes one ReadingRow
        started = time.perf_counter()
        try:
            if sink is None:
                sink = self._open_sink()
            if self._delay_s:
                time.sleep(self._delay_s)
            replanned: list[list[Plan]] = []

            def replan(states: dict[int, dict[str, Any]]) -> tuple[list[ReadingRow], list[CurrentUpdate]]:
                # Called by a shared store under the rows' locks (energy_guard.py).
                self._adopt(saved, saved_energy, states)
                again, again_rows, again_updates = self._planned(group)
                replanned.append(again)
                return again_rows, again_updates

            for replans in range(MAX_REPLANS + 1):
                replanned.clear()
                plans, rows, current_updates = self._planned(group)
                try:
                    status_before = sink.write(rows, current_updates, replan=replan)
                    if replanned:
                        plans = replanned[-1]
                    break
                except StaleState as stale:
                    # Another worker wrote newer readings of these batmons: plan again from
                    # the state it left (bridge/store/energy_guard.py); nothing was written.
                    if replans == MAX_REPLANS:
                        raise
                    self._adopt(saved, saved_energy, stale.states)
        except Exception as exc:
            self._restore(saved, saved_energy)  # plans after this start from the truth
            self.stats.failed_commits += 1
            self.stats.failing = True
            self.stats.last_error = _describe(exc)
            self.stats.last_error_at = time.time()
            log.error("could not store %d reading(s): %s", submitted, self.stats.last_error)
            error = StorageFailed(f"The reading could not be stored ({self.stats.last_error}); "
                                  "try again later.")  # fmt: skip
            self._release(submitted)
            self._hand_back([(sub.loop, None, sub.future, error, None) for sub in group])
            if isinstance(exc, StorageFailed | StaleState):
                return sink  # the store said no, the connection is fine; the next group may succeed
            with contextlib.suppress(Exception):
                if sink is not None:
                    sink.close()
            return None
        elapsed = time.perf_counter() - started
        stats = self.stats
        stats.commits += 1
        stats.rows += len(rows)
        stats.failing = False
        stats.last_group_rows = len(rows)
        stats.max_group_rows = max(stats.max_group_rows, len(rows))
        stats.last_commit_s = elapsed
        plans[0].commit = (len(rows), elapsed)
        if status_before is not None:
            _mark_status_changes(plans, status_before)
        self._release(len(rows))
        self._hand_back([(s.loop, plan, s.future, None, None) for s, plan in zip(group, plans, strict=True)])
        return sink

    def _probe(self, sink: Store | None) -> Store | None:
        """A write that touches the disk; success clears the failing state."""
        try:
            if sink is None:
                sink = self._open_sink()
            sink.probe()
        except Exception as exc:
            self.stats.last_error = _describe(exc)
            return sink if isinstance(exc, StorageFailed) else None
        self.stats.failing = False
        log.info("storage works again")
        return sink

    def _planned(self, group: list[_Submission]) -> tuple[list[Plan], list[ReadingRow], list[CurrentUpdate]]:
        """Plan a group: its plans, the rows to write, and one update per batmon that says
        which last_reading its plan started from (the store's guard, energy_guard.py)."""
        starts = {s.batmon.id: self._start(s.batmon) for s in group}
        plans = [self._plan(s) for s in group]
        rows: list[ReadingRow] = []
        updates: dict[int, dict[str, Any]] = {}
        for plan in plans:
            batmon_id = plan.batmon.id
            rows.extend(
                (batmon_id, ts, v.get("voltage"), v.get("current"), v.get("power"), v.get("soc"),
                 v.get("details"), charged, discharged)
                for (ts, v), (charged, discharged) in zip(plan.rows, plan.energy, strict=True)
            )  # fmt: skip
            if plan.current:
                updates.setdefault(batmon_id, {PLANNED_FROM: starts[batmon_id]}).update(plan.current)
        return plans, rows, list(updates.items())

    def _start(self, batmon: Batmon) -> float | None:
        """The last_reading the next plan of ``batmon`` starts from."""
        latest = self._latest.get(batmon.id, _UNSET)
        return batmon.last_reading if latest is _UNSET else latest

    def _adopt(self, saved: dict[int, Any], saved_energy: dict[int, Any],
               states: dict[int, dict[str, Any]]) -> None:  # fmt: skip
        """Plan from these stored states (another worker moved the batmons on) from now on."""
        self._restore(saved, saved_energy)
        for batmon_id, state in states.items():
            self._latest[batmon_id] = state["last_reading"]
            self._energy[batmon_id] = EnergyState(**{k: state[k] for k in ENERGY_COLUMNS})
        self.stats.replans += 1

    def _restore(self, saved: dict[int, Any], saved_energy: dict[int, Any]) -> None:
        """Back to the planning state from before a group that was not written."""
        for batmon_id, latest in saved.items():
            if latest is _UNSET:
                self._latest.pop(batmon_id, None)
            else:
                self._latest[batmon_id] = latest
        for batmon_id, energy in saved_energy.items():
            if energy is _UNSET:
                self._energy.pop(batmon_id, None)
            else:
                self._energy[batmon_id] = energy

    def _plan(self, submission: _Submission) -> Plan:
        batmon = submission.batmon
        latest = self._start(batmon)
        # A copy: the state before this plan stays as it was, for a commit that fails.
        energy = (self._energy.get(batmon.id) or EnergyState.of(batmon)).copy()
        current: dict[str, Any] = {}
        flags: list[bool] = []
        added: list[tuple[float | None, float | None]] = []
        for ts, values in submission.rows:
            is_current = latest is None or ts >= latest
            charged = discharged = 0.0
            if is_current:
                current.update(values)
                latest = ts
                # Integrated here, in reading order, and committed with the reading.
                charged, discharged = advance(energy, ts, values, batmon.update_period)
            flags.append(is_current)
            added.append((charged or None, discharged or None))
        if current:
            current["last_reading"] = latest
            online = latest is not None and submission.received - latest < batmon.update_period
            current["status"] = "Online" if online else "Offline"
            current.update(energy.columns())
        self._latest[batmon.id] = latest
        self._energy[batmon.id] = energy
        return Plan(batmon, submission.rows, flags, current, submission.received, submission.door,
                    added)  # fmt: skip

    def _release(self, rows: int) -> None:
        with self._lock:
            self._pending_rows -= rows

    def _hand_back(self, entries: list[LoopEntry]) -> None:
        """From the writer's thread: to each loop, its entries in order."""
        by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
        for loop, plan, future, error, result in entries:
            by_loop.setdefault(loop, []).append((plan, future, error, result))
        for closed in [loop for loop in self._deliveries if loop.is_closed()]:
            del self._deliveries[closed]  # nobody waits there any more
        for loop, items in by_loop.items():
            deliveries = self._deliveries.get(loop)
            if deliveries is None:
                deliveries = self._deliveries[loop] = _Deliveries(loop, self._apply)
            deliveries.push(items)


class _Deliveries:
    """What the writer hands back to one event loop, in order, a slice per iteration.

    asyncio runs every ready callback before it polls sockets again, so applying a
    1,000-reading group in one go (or in slices queued together) held HTTP requests
    behind its events. Failures and barriers go through the same queue, so a barrier
    still means "everything before me is applied".
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, apply: Apply) -> None:
        self._loop = loop
        self._apply = apply
        self._entries: deque[Entry] = deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def push(self, entries: list[Entry]) -> None:
        """From the writer's thread: queue (plan, future, error, result) entries for the loop."""
        with self._lock:
            self._entries.extend(entries)
            if self._scheduled:
                return
            self._scheduled = True
        with contextlib.suppress(RuntimeError):  # that loop closed: nobody waits
            self._loop.call_soon_threadsafe(self._run)

    def _run(self) -> None:
        """On the loop: settle one run of like entries (plans, or failures and barriers)."""
        run: list[Entry] = []
        with self._lock:
            while self._entries and len(run) < APPLY_SLICE:
                entry = self._entries[0]
                if run and (entry[0] is None) != (run[0][0] is None):
                    break  # plans are applied before a later failure or barrier settles
                run.append(self._entries.popleft())
        plans = [plan for plan, _, _, _ in run if plan is not None]
        if plans:
            try:
                self._apply(plans)
            except Exception:  # the readings are stored: a bug here must not fail the door
                log.exception("applying committed readings failed")
        for _, future, error, result in run:
            if future.done():
                continue
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)
        with self._lock:
            if not self._entries:
                self._scheduled = False
                return
        self._loop.call_soon(self._run)


def _http_only(group: list[_Submission]) -> bool:
    """True when no submission in the group came through MQTT: a group worth lingering
    for is fed by a stream (a broker's flood), not by clients waiting for their answers."""
    return all(submission.door == "http" for submission in group)


def _mark_status_changes(plans: list[Plan], before: StatusBefore) -> None:
    """The store said which batmons' status this commit changed: the last plan of each (its
    status is the one written) announces it, and no plan judges by memory."""
    last: dict[int, Plan] = {}
    for plan in plans:
        plan.status_by_store = True
        if plan.current:
            last[plan.batmon.id] = plan
    for batmon_id, was in before.items():
        if batmon_id in last:
            last[batmon_id].status_before = was


class _Unset:
    pass


_UNSET: Any = _Unset()


def _describe(exc: BaseException) -> str:
    """One line, no paths or SQL: what an operator needs to recognise the fault."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
