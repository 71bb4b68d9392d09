"""Live updates for the dashboard: an extension that fans the core's events out to
every open Server-Sent Events stream of the batmons' owner.

A stream starts with a snapshot of all the user's batmons (so nothing that changed
between rendering the page and opening the stream is missed, and a reconnecting
browser catches up). Then it remembers *which* batmons changed, not every event,
and sends each one's state as it is when the browser is ready: a slow browser gets
the latest values instead of a growing backlog. Past ``max_pending`` distinct
batmons it forgets them and sends a fresh snapshot instead.

Banks ride on the same stream: a snapshot is followed by a ``banks`` message (every bank
of the user, as /interface/bank/list shows them), and a bank whose member, membership or
alarm changed is sent again as a ``bank`` message (``bank_deleted`` once it is gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from bridge.banks import Bank
from bridge.core import Batmon, Core
from bridge.errors import BatmonError, StorageFailed
from bridge.events import (
    NO_SUBSCRIPTION,
    AlarmChanged,
    BankAlarmChanged,
    BankChanged,
    BankDeleted,
    BatmonChanged,
    BatmonDeleted,
    ChangedElsewhere,
    ReadingAccepted,
    StatusChanged,
    Subscription,
)

log = logging.getLogger(__name__)

METRICS = ("voltage", "current", "power", "soc")


class TooManyStreams(BatmonError):
    """A user already has as many live streams open as we allow."""

    status = 429


def batmon_snapshot(batmon: Batmon, now: float) -> dict[str, Any]:
    """What the dashboard shows of a batmon: the API object without the token,
    plus the units it is shown in (the batmon's own, else V, A, W, %)."""
    data = batmon.to_api(now)
    del data["batmon_token"]  # shown on demand only, never pushed
    data["units"] = {metric: batmon.unit(metric) for metric in METRICS}
    data["last_reading"] = None if batmon.last_reading is None else int(batmon.last_reading)
    return data


class LiveStream:
    """One browser's stream: the ids of the batmons changed since its last send."""

    def __init__(self, user_id: int, max_pending: int) -> None:
        self.user_id = user_id
        self.max_pending = max_pending
        self._changed: dict[int, bool] = {}  # batmon_id -> deleted; insertion-ordered
        self._banks: dict[int, bool] = {}  # bank_id -> deleted, the same way
        self._full = True  # a snapshot of every batmon is due (first, and after overflow)
        self._closed = False
        self._wake = asyncio.Event()

    def mark(self, batmon_id: int, deleted: bool = False) -> None:
        """Note a change; a batmon already noted costs nothing (coalesced)."""
        if self._full:
            pass  # the snapshot due covers it
        elif batmon_id in self._changed or len(self._changed) < self.max_pending:
            self._changed[batmon_id] = deleted or self._changed.get(batmon_id, False)
        else:
            self._changed.clear()
            self._full = True
        self._wake.set()

    def mark_bank(self, bank_id: int, deleted: bool = False) -> None:
        """Note a change of a bank, coalesced like a batmon's (and bounded the same way)."""
        if self._full:
            pass
        elif bank_id in self._banks or len(self._banks) < self.max_pending:
            self._banks[bank_id] = deleted or self._banks.get(bank_id, False)
        else:
            self._banks.clear()
            self._full = True
        self._wake.set()

    def take_banks(self) -> dict[int, bool]:
        """The banks changed since the last call (after ``take``)."""
        banks, self._banks = self._banks, {}
        return banks

    def close(self) -> None:
        """End the stream at its next wake-up."""
        self._closed = True
        self._wake.set()

    @property
    def closed(self) -> bool:
        return self._closed

    async def take(self, timeout: float) -> tuple[dict[int, bool], bool] | None:
        """Wait up to ``timeout`` for changes; (changed, full snapshot due), or None once closed."""
        if not (self._changed or self._banks or self._full or self._closed):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
        self._wake.clear()
        if self._closed:
            return None
        changed, self._changed = self._changed, {}
        full, self._full = self._full, False
        return changed, full


def sse(event: str, data: Any) -> str:
    """One Server-Sent Events message (JSON has no raw newlines, so one data line)."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class LiveFeed:
    """Subscribes to the bus and marks each owner's open streams; serves them as SSE."""

    def __init__(self, core: Core, *, max_pending: int = 256, max_streams_per_user: int = 16,
                 keepalive_s: float = 15.0) -> None:  # fmt: skip
        self.core = core
        self.max_pending = max_pending
        self.max_streams_per_user = max_streams_per_user
        self.keepalive_s = keepalive_s
        self._streams: dict[int, set[LiveStream]] = {}
        self._subscription: Subscription = NO_SUBSCRIPTION
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False  # stopped by its owner: a late page does not start it again
        # When each value of a batmon was last in a reading (epoch s): from the readings
        # accepted while we run, and for a batmon first shown, from its history.
        self._reported: dict[int, dict[str, float]] = {}
        self._learned: set[int] = set()

    @property
    def started(self) -> bool:
        return self._loop is not None

    async def start(self) -> None:
        """Listen to every event that changes what a dashboard shows (once)."""
        if self._loop is not None:
            return
        self._stopped = False
        self._loop = asyncio.get_running_loop()
        changed = self._on_changed
        self._subscription = self.core.bus.subscribe_all({
            ReadingAccepted: self._on_reading, StatusChanged: changed, BatmonChanged: changed,
            AlarmChanged: changed, BatmonDeleted: self._on_deleted,
            BankChanged: lambda e: self._mark_bank(e.bank, deleted=False),
            BankAlarmChanged: lambda e: self._mark_bank(e.bank, deleted=False),
            BankDeleted: lambda e: self._mark_bank(e.bank, deleted=True),
            ChangedElsewhere: self._on_elsewhere,
        })  # fmt: skip

    async def stop(self) -> None:
        """Unsubscribe and end every open stream (so the HTTP server can stop); no new
        stream opens after (``started`` is False again)."""
        self._subscription.cancel()
        self._loop = None
        self._stopped = True
        for streams in self._streams.values():
            for stream in streams:
                stream.close()
        self._streams.clear()

    # -- event handlers: mark, never block ----------------------------------------
    def _on_changed(self, event: Any) -> None:
        self._mark(event.batmon, deleted=False)

    def _on_reading(self, event: ReadingAccepted) -> None:
        self._on_loop(self._note_reported, event.batmon.id, tuple(event.values), event.ts)
        self._mark(event.batmon, deleted=False)

    def _on_elsewhere(self, event: ChangedElsewhere) -> None:
        """Another worker's change (bridge/extensions/peers.py): a reading there moved the
        latest values; when each value was last reported is asked of history again."""
        self._on_loop(self._forget_reported, event.batmon.id)
        self._mark(event.batmon, deleted=event.deleted)

    def _on_deleted(self, event: BatmonDeleted) -> None:
        self._on_loop(self._forget_reported, event.batmon.id)
        self._mark(event.batmon, deleted=True)

    def _note_reported(self, batmon_id: int, names: tuple[str, ...], ts: float) -> None:
        reported = self._reported.setdefault(batmon_id, {})
        for name in names:
            if name in METRICS and ts > reported.get(name, -math.inf):
                reported[name] = ts

    def _forget_reported(self, batmon_id: int) -> None:
        self._reported.pop(batmon_id, None)
        self._learned.discard(batmon_id)

    # -- what a page shows -----------------------------------------------------------
    async def learn_reported(self, batmons: Iterable[Batmon]) -> None:
        """Ask history, once per batmon, when each of its values was last reported.

        A reading accepted meanwhile is noted too; the later time wins either way. What is
        learned stays right only while the feed listens to readings: it starts listening
        (the composition root starts it anyway; a feed its owner stopped stays stopped).
        """
        if not self.started:
            if self._stopped:
                return
            await self.start()
        new = [b for b in batmons if b.id not in self._learned]
        with_readings = [b.id for b in new if b.last_reading is not None]
        found = await self.core.history_reader.last_reported(with_readings) if with_readings else {}
        for batmon in new:
            if self.core.batmons.get(batmon.id) is not batmon:
                continue  # deleted meanwhile
            for name, ts in found.get(batmon.id, {}).items():
                self._note_reported(batmon.id, (name,), ts)
            self._learned.add(batmon.id)

    def snapshot(self, batmon: Batmon, now: float) -> dict[str, Any]:
        """``batmon_snapshot`` plus, once learned, when each value was last reported
        (null: never) and which are ``stale`` (older than the latest reading)."""
        data = batmon_snapshot(batmon, now)
        if batmon.id in self._learned:
            reported = self._reported.get(batmon.id, {})
            latest = batmon.last_reading
            data["reported"] = {name: reported.get(name) for name in METRICS}
            data["stale"] = [name for name in METRICS if latest is not None
                             and reported.get(name, latest) < latest]  # fmt: skip
        return data

    def _mark(self, batmon: Batmon, deleted: bool) -> None:
        if not self._streams.get(batmon.user_id):
            return  # no open stream of its owner to mark (most readings); a later one starts fresh
        # Events come on the loop today; a writer thread may emit some later.
        self._on_loop(self._mark_streams, batmon.user_id, batmon.id, deleted)

    def _mark_bank(self, bank: Bank, deleted: bool) -> None:
        self._on_loop(self._mark_bank_streams, bank.user_id, bank.id, deleted)

    def _mark_streams(self, user_id: int, batmon_id: int, deleted: bool) -> None:
        streams = self._streams.get(user_id, ())
        for stream in streams:
            stream.mark(batmon_id, deleted)
        if streams and not deleted:  # a member's change is its banks' (a delete edits them)
            for bank in self.core.banks.containing(batmon_id):
                for stream in streams:
                    stream.mark_bank(bank.id)

    def _mark_bank_streams(self, user_id: int, bank_id: int, deleted: bool) -> None:
        for stream in self._streams.get(user_id, ()):
            stream.mark_bank(bank_id, deleted)

    def _on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            same_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            same_loop = False
        if same_loop:
            fn(*args)
        elif not loop.is_closed():
            loop.call_soon_threadsafe(fn, *args)

    # -- streams -------------------------------------------------------------------
    def open(self, user_id: int) -> LiveStream:
        """A new stream for ``user_id``; 429 past max_streams_per_user."""
        streams = self._streams.setdefault(user_id, set())
        if len(streams) >= self.max_streams_per_user:
            raise TooManyStreams(
                f"Too many live streams open ({self.max_streams_per_user}); close a dashboard tab."
            )
        stream = LiveStream(user_id, self.max_pending)
        streams.add(stream)
        return stream

    def release(self, stream: LiveStream) -> None:
        """Forget a stream whose browser went away."""
        streams = self._streams.get(stream.user_id)
        if streams is not None:
            streams.discard(stream)
            if not streams:
                del self._streams[stream.user_id]

    def stream_count(self, user_id: int | None = None) -> int:
        """Open streams, of one user or of all."""
        if user_id is not None:
            return len(self._streams.get(user_id, ()))
        return sum(len(s) for s in self._streams.values())

    async def messages_for(self, stream: LiveStream, changed: dict[int, bool], full: bool
                           ) -> list[str]:  # fmt: skip
        """The SSE messages for one batch of changes, each batmon's state as of now."""
        if full and self.core.peers is not None:  # other workers' readings since this worker's
            with contextlib.suppress(StorageFailed):  # the database away: memory's snapshot
                await self.core.peers.catch_up([b.id for b in self.core.batmons.values()
                                                if b.user_id == stream.user_id])  # fmt: skip
        await self.learn_reported([b for b in self.core.batmons.values()
                                   if b.user_id == stream.user_id and (full or b.id in changed)])
        now = self.core.clock()
        banks = self.core.banks
        changed_banks = stream.take_banks()
        if full:
            mine = [b for b in self.core.batmons.values() if b.user_id == stream.user_id]
            out = [sse("snapshot", [self.snapshot(b, now) for b in mine])]
            if banks.known_to(stream.user_id):  # a user who never had a bank gets no banks message
                out.append(sse("banks", [banks.view(k) for k in banks.all() if k.user_id == stream.user_id]))
            return out
        out = []
        for batmon_id, deleted in changed.items():
            batmon = self.core.batmons.get(batmon_id)
            if deleted or batmon is None:
                out.append(sse("deleted", {"batmon_id": batmon_id}))
            elif batmon.user_id == stream.user_id:
                out.append(sse("batmon", self.snapshot(batmon, now)))
        for bank_id, deleted in changed_banks.items():
            bank = banks.get(bank_id)
            if deleted or bank is None:
                out.append(sse("bank_deleted", {"bank_id": bank_id}))
            elif bank.user_id == stream.user_id:
                out.append(sse("bank", banks.view(bank)))
        return out

    async def serve(self, stream: LiveStream) -> AsyncIterator[str]:
        """The text of one SSE response, until the stream is closed or the client leaves."""
        try:
            # The browser retries after 3 s if the connection drops.
            yield "retry: 3000\n\n"
            while True:
                batch = await stream.take(self.keepalive_s)
                if batch is None:
                    return
                messages = await self.messages_for(stream, *batch)
                # A comment line keeps proxies from timing out an idle stream.
                yield "".join(messages) if messages else ": keep-alive\n\n"
        finally:
            self.release(stream)
