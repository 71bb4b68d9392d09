"""The rules of one MQTT update (topic + payload), whichever broker carried it: checked,
validated with the HTTP door's models and submitted to the writer.

Both broker doors use it: the embedded broker hands a device's publish over directly,
the external broker's door (``external_door.py``) what the MQTT link received. Each
caller acknowledges only when the returned future succeeds. Runs on the event loop,
counters included.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

from bridge.core import Core
from bridge.errors import BatmonError, NotFound, WrongToken
from bridge.models import parse_batmon_id, readings_from_payload
from bridge.topics import Topics
from bridge.writer import Overloaded

log = logging.getLogger(__name__)

# Committed updates remembered to recognise retransmissions, by packet id and content: a
# resend keeps its packet id (MQTT 3.1.1 4.4, 5.0 4.4), so equal values sent again as a new
# message (another id) are a new reading, and a message whose commit failed is not mistaken
# for an earlier equal one when it comes back.
DEDUP_WINDOW = 4096
COUNTERS = (
    "received", "accepted", "readings", "rejected", "dropped_bad_topic", "dropped_unknown_batmon",
    "dropped_wrong_token", "dropped_duplicate", "not_stored",
)  # fmt: skip

# (batmon_id, token, message): tell a device with valid credentials why its update was refused.
ErrorReply = Callable[[int, str, str], None]


class UpdateDoor:
    """Validates MQTT updates with the HTTP door's models and submits them to the writer."""

    def __init__(self, core: Core, topics: Topics, reply_error: ErrorReply) -> None:
        self.core = core
        self.topics = topics
        self.reply_error = reply_error
        self.counters: Counter[str] = Counter()
        # Digests of recently committed updates: a retransmission (DUP) of one of them
        # is the same reading again whose ack was lost, not a new reading.
        self._committed: OrderedDict[bytes, None] = OrderedDict()

    @property
    def stats(self) -> dict[str, int]:
        """Counters for /healthz and metrics."""
        return {name: self.counters[name] for name in COUNTERS}

    def has_room(self) -> bool:
        """False while the writer's queue is full (a door then stops taking messages)."""
        return self.core.writer.has_room

    async def settle(self) -> None:
        """Return once every update submitted so far is committed (or failed) and applied."""
        await self.core.writer.barrier()

    def knows(self, topic: str) -> bool:
        """True when the topic names a batmon this worker holds (whatever its token)."""
        ids = self.topics.parse_update(topic)
        batmon_id = parse_batmon_id(ids[0]) if ids is not None else None
        return batmon_id is not None and batmon_id in self.core.batmons

    def submit(self, topic: str, payload: bytes, *, dup: bool = False,
               mid: int | None = None) -> asyncio.Future[None] | None:  # fmt: skip
        """Submit one update; None when there is nothing to wait for (dropped or refused,
        counted, and acknowledged at once: sending it again would not help).

        The future fails with Unavailable if the readings could not be stored: then the
        message must not be acknowledged. Raises Overloaded when the writer is full.
        """
        self.counters["received"] += 1
        packet = b"" if mid is None else mid.to_bytes(4, "big")
        digest = hashlib.blake2b(packet + topic.encode() + b"\0" + payload, digest_size=16).digest()
        if dup and digest in self._committed:
            self.counters["dropped_duplicate"] += 1
            return None
        ids = self.topics.parse_update(topic)
        batmon_id = parse_batmon_id(ids[0]) if ids is not None else None
        if ids is None or batmon_id is None:
            self.counters["dropped_bad_topic"] += 1
            return None
        token = ids[1]
        try:
            batmon = self.core.device(batmon_id, token)
        except NotFound:
            self.counters["dropped_unknown_batmon"] += 1
            return None
        except WrongToken:
            self.counters["dropped_wrong_token"] += 1
            return None
        try:
            readings = readings_from_payload(payload)
        except BatmonError as exc:
            self.counters["rejected"] += 1
            log.debug("rejected update from batmon %s: %s", batmon_id, exc.message)
            self.reply_error(batmon_id, token, exc.message)
            return None
        try:
            future = self.core.submit_readings(batmon, readings, "mqtt")
        except Overloaded:
            self.counters["received"] -= 1  # not taken: the caller submits it again
            raise
        future.add_done_callback(lambda f: self._settled(f, digest, len(readings)))
        return future

    def _settled(self, future: asyncio.Future[Any], digest: bytes, readings: int) -> None:
        if future.cancelled() or future.exception() is not None:
            self.counters["not_stored"] += 1
            return
        self.counters["accepted"] += 1
        self.counters["readings"] += readings
        self._committed[digest] = None
        if len(self._committed) > DEDUP_WINDOW:
            self._committed.popitem(last=False)
