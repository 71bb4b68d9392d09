"""Devices' updates through an external broker (Mosquitto): submitted in arrival
order, acknowledged in that order once committed.

The MQTT link (``mqtt_link.py``) hands each update message over on the event loop;
one consumer task submits them to the writer without waiting for each commit, and
an update is acked only after its readings are committed. A crash before that means
the broker redelivers it (the session is persistent); a failed commit drops the
connection unacked, so the broker redelivers at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter, deque
from typing import Any

from bridge.core import Core
from bridge.doors.mqtt_link import Inbound, MqttLink
from bridge.doors.update_door import UpdateDoor
from bridge.errors import StorageFailed
from bridge.topics import Topics
from bridge.writer import Overloaded

log = logging.getLogger(__name__)

# QoS 0 messages have no broker-side flow control; past this backlog they are dropped
# rather than letting memory grow (QoS 1 is bounded by the broker's inflight window).
MAX_BACKLOG = 10_000
YIELD_EVERY = 4  # updates submitted between yields to the event loop
STOP_DRAIN_S = 10.0  # how long a stop waits for submitted updates to commit and be acked
# "redelivered": updates that came with DUP set (the broker resending one we had not acked).
COUNTERS = ("dropped_backlog", "dropped_retained", "storage_reconnects", "redelivered")


class ExternalBrokerDoor:
    """Takes updates from the link, submits them in order, acks each after its commit.

    Everything here runs on the event loop, counters included.
    """

    def __init__(self, core: Core, topics: Topics, link: MqttLink, *, share_group: str | None = None) -> None:
        """``share_group``: subscribe through ``$share/<group>/...``, so each update goes to
        one of the bridges (workers) in the group; None: a plain subscription (one bridge)."""
        self.core = core
        self.topics = topics
        self.link = link
        self.share_group = share_group
        self.updates = UpdateDoor(core, topics, self._reply_error)
        self._inbox: asyncio.Queue[Inbound] = asyncio.Queue()
        # Updates submitted and not yet acknowledged, in arrival order: acks go out
        # in that order, each once its commit is done (the broker's inflight window
        # is used, and a failed commit is never acked).
        self._unacked: deque[tuple[Inbound, asyncio.Future[None] | None]] = deque()
        self._consumer: asyncio.Task[None] | None = None
        self._counters: Counter[str] = Counter()

    @property
    def subscription(self) -> str:
        """The filter the link subscribes to for us."""
        if self.share_group is None:
            return self.topics.update_filter
        return self.topics.shared_update_filter(self.share_group)

    @property
    def stale_subscription(self) -> str | None:
        """In a group, the plain filter this client id's session may hold from when it ran
        alone (the link drops it). Not the reverse: which group a session was in is unknown
        (docs/SCALE-OUT.md says how to end such a session)."""
        return self.topics.update_filter if self.share_group is not None else None

    @property
    def stats(self) -> dict[str, int]:
        """The update door's counters plus what was dropped before reaching it."""
        counters = self.updates.stats
        for name in COUNTERS:
            counters[name] = self._counters[name]
        counters["received"] += self._counters["received_dropped"]
        return counters

    async def start(self) -> None:
        """Submit what the link hands over (it may have queued some already)."""
        self._consumer = asyncio.create_task(self._consume(), name="external-door-consumer")

    async def stop(self) -> None:
        """Stop taking updates; ack what was submitted once committed (within STOP_DRAIN_S).

        Messages still queued are not acked: the broker redelivers them. Called
        before the link disconnects, so a clean stop leaves no committed reading for
        the broker to send again.
        """
        if self._consumer is not None:
            self._consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._consumer
            self._consumer = None
        pending = [f for _, f in self._unacked if f is not None]
        if pending:
            await asyncio.wait(pending, timeout=STOP_DRAIN_S)
        self._send_acks()
        self._unacked.clear()
        while not self._inbox.empty():
            self._inbox.get_nowait()

    def receive(self, message: Inbound) -> None:
        """From the link, on the loop: queue an update, or drop (and ack) one that is none."""
        if message.dup:
            self._counters["redelivered"] += 1
        if message.topic is None:
            self._counters["received_dropped"] += 1
            self.updates.counters["dropped_bad_topic"] += 1
            self.link.ack(message)
            return
        if message.retain:
            # RETAIN on an external broker: a stored message replayed on subscribe,
            # an old reading. Clear it, or every (re)subscribe would offer it again.
            self._counters["received_dropped"] += 1
            self._counters["dropped_retained"] += 1
            self.link.ack(message)
            self.link.publish(message.topic, b"", qos=1, retain=True)
            return
        if message.qos == 0 and self._inbox.qsize() >= MAX_BACKLOG:
            self._counters["received_dropped"] += 1
            self._counters["dropped_backlog"] += 1
            return
        self._inbox.put_nowait(message)

    async def _consume(self) -> None:
        """Submit updates in arrival order without waiting for each commit.

        The writer commits them in that order, so each batmon's readings keep their
        order; acks follow in the same order as commits complete.
        """
        taken = 0
        while True:
            item = await self._inbox.get()
            assert item.topic is not None
            taken += 1
            if taken % YIELD_EVERY == 0:
                # get() on a non-empty queue never yields: a backlog of 20,000 would
                # hold the loop (HTTP, the broker, the watchdog) until drained.
                await asyncio.sleep(0)
            future: asyncio.Future[None] | None
            if self.core.peers is not None and not self.updates.knows(item.topic):
                # Made on another worker a moment ago? Look first (off this loop's queue: the
                # ack keeps its place), then submit.
                future = asyncio.ensure_future(self._after_catch_up(item))
            else:
                future = await self._submit(item)
            self._unacked.append((item, future))
            if future is None:
                self._send_acks()
            else:
                future.add_done_callback(lambda _: self._send_acks())

    async def _submit(self, item: Inbound) -> asyncio.Future[None] | None:
        assert item.topic is not None
        while True:
            try:
                return self.updates.submit(item.topic, item.payload, dup=item.dup, mid=item.mid)
            except Overloaded:
                # The writer is full: stop taking messages. The broker stops
                # sending once our unacked window is used: its flow control.
                while not self.core.writer.has_room:
                    await asyncio.sleep(0.005)

    async def _after_catch_up(self, item: Inbound) -> None:
        """An update for a batmon this worker does not know: other workers' changes first."""
        if self.core.peers is not None:
            with contextlib.suppress(StorageFailed):
                await self.core.peers.catch_up()
        future = await self._submit(item)
        if future is not None:
            await future

    def _send_acks(self) -> None:
        """Ack every leading update that is done; a failed commit is never acked."""
        unacked = self._unacked
        while unacked:
            item, future = unacked[0]
            if future is not None and not future.done():
                return
            unacked.popleft()
            if future is not None and (future.cancelled() or future.exception() is not None):
                if item.connection == self.link.connection:
                    self._redeliver_unacked()
                continue
            self.link.ack(item)

    def _redeliver_unacked(self) -> None:
        """A commit failed: drop the connection without acking, so the broker resends
        every unacked update after the link reconnects."""
        self._counters["storage_reconnects"] += 1
        log.warning("storing an MQTT update failed; reconnecting so the broker redelivers it")
        self.link.drop_connection()

    def _reply_error(self, batmon_id: int, token: str, message: str) -> None:
        self.link.publish(self.topics.error(batmon_id, token), json.dumps({"error": message}), qos=1)


def mqtt_stats(link: MqttLink, door: ExternalBrokerDoor | UpdateDoor) -> dict[str, Any]:
    """The link's and the door's counters in one mapping (/healthz's mqtt_stats, metrics)."""
    return {**link.stats, **door.stats}
