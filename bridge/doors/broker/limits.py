"""Abuse limits of the embedded broker: packet size, per-client message rate, connections.

:class:`ConnectionRooms` keeps two rooms apart: sockets that have not logged in (at most
``max_unauthenticated_per_address`` per client address, each with ``connect_timeout_s``
to send its CONNECT) and logged-in clients (``max_connections``). A socket that has not
logged in never takes the room of a logged-in one, so one address holding many silent
sockets locks no device out.

:class:`PacketLimitReader` sits between the socket and amqtt and hands amqtt whole MQTT
packets only: it reads each packet's fixed header itself, so a packet over
``max_packet_size`` closes the connection before its body is read (amqtt would buffer
all of it). A PUBLISH over its sender's rate is held back (QoS 1 and 2: the socket is
not read until the rate allows, so the device slows down and loses nothing it was
acknowledged) or dropped (QoS 0, which promises nothing), before amqtt sees it.
The first packet is the CONNECT, whose protocol level the broker checks before amqtt
parses the rest (amqtt misreads an MQTT 5 CONNECT and hangs). A PUBLISH, SUBSCRIBE or
UNSUBSCRIBE naming a topic that is not well-formed UTF-8 (or holds U+0000) closes the
connection, as MQTT 3.1.1 section 1.5.3 requires (amqtt would take the bytes' repr as the topic).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

from amqtt.adapters import ReaderAdapter
from amqtt.session import Session
from pydantic import BaseModel, ConfigDict, Field

from bridge.doors.broker.plugin import PRINCIPAL_KEY

log = logging.getLogger(__name__)

CONNECT, PUBLISH, SUBSCRIBE, UNSUBSCRIBE = 1, 3, 8, 10  # MQTT 3.1.1 control packet types (2.2.1)
MQTT_311_LEVEL = 4
MAX_REMAINING_LENGTH = 268_435_455  # four length bytes (section 2.2.3)


class BrokerLimits(BaseModel):
    """The ``limits`` section of broker.yaml."""

    model_config = ConfigDict(extra="forbid")

    max_packet_size: Annotated[int, Field(ge=128, le=MAX_REMAINING_LENGTH)] = 66_560
    """Bytes of a whole packet: the 64 KiB payload the HTTP door also takes, plus headers."""
    max_connections: Annotated[int, Field(ge=1)] = 1000
    """Logged-in clients at once; past it a client gets CONNACK 3 (server unavailable)."""
    max_unauthenticated_per_address: Annotated[int, Field(ge=1)] = 16
    """Sockets of one client address (an IPv6 /64) that have not logged in yet; more are
    closed at once. Room for a household's devices booting together behind one NAT."""
    connect_timeout_s: Annotated[float, Field(gt=0, le=300)] = 5.0
    """Time a new connection has to send its whole CONNECT."""
    messages_per_second: Annotated[float, Field(gt=0)] = 50.0
    """Sustained PUBLISH rate of one device or user, across its connections."""
    message_burst: Annotated[int, Field(ge=1)] = 200
    """PUBLISH packets one device or user may send at once above that rate."""


@dataclass
class MessageRate:
    """Token buckets per sender: ``burst`` tokens, refilled at ``per_second``."""

    per_second: float
    burst: int
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)

    def wait(self, key: str) -> float:
        """Take a token for ``key`` and return 0, or return the seconds until one is there."""
        now = self.clock()
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.per_second)
        if len(self._buckets) > 100_000:
            self._forget_full(now)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.per_second
        self._buckets[key] = (tokens - 1.0, now)
        return 0.0

    def _forget_full(self, now: float) -> None:
        """Drop buckets that have refilled: they hold nothing a new one would not."""
        refill = self.burst / self.per_second
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < refill}


@dataclass
class ConnectionRooms:
    """Sockets waiting to log in, per address, and logged-in clients: two rooms, two limits."""

    max_logged_in: int
    max_waiting_per_address: int
    logged_in: int = 0
    _waiting: Counter[str] = field(default_factory=Counter)
    _warned: set[str] = field(default_factory=set)

    @property
    def waiting(self) -> int:
        """Sockets that have not logged in, over all addresses."""
        return self._waiting.total()

    def enter(self, address: str) -> bool:
        """Take a waiting place for a new socket from ``address``; False if it has none left."""
        if self._waiting[address] >= self.max_waiting_per_address:
            if address not in self._warned:  # one line per address and episode, not per socket
                self._warned.add(address)
                log.warning("closing new MQTT sockets from %s at once: %d of its sockets have not"
                            " logged in yet", address, self.max_waiting_per_address)  # fmt: skip
            return False
        self._waiting[address] += 1
        return True

    def leave_waiting(self, address: str) -> None:
        """A waiting socket logged in or closed."""
        self._waiting[address] -= 1
        if self._waiting[address] <= 0:
            del self._waiting[address]
            self._warned.discard(address)

    def log_in(self) -> bool:
        """Take a logged-in place; False while the room is full."""
        if self.logged_in >= self.max_logged_in:
            return False
        self.logged_in += 1
        return True

    def log_out(self) -> None:
        """A logged-in client left."""
        self.logged_in -= 1


class PacketTooLarge(asyncio.IncompleteReadError):
    """A packet over max_packet_size: to amqtt, the end of the stream."""


class InvalidUtf8(asyncio.IncompleteReadError):
    """A topic that is not well-formed UTF-8: to amqtt, the end of the stream."""


def topics_are_utf8(packet_type: int, body: bytes) -> bool:
    """False if a topic (name or filter) of this PUBLISH, SUBSCRIBE or UNSUBSCRIBE body is
    not well-formed UTF-8 or holds U+0000 (MQTT 3.1.1 section 1.5.3); other packets pass.
    A length running past the body is left to amqtt, which refuses the packet as malformed."""
    if packet_type == PUBLISH:
        position, last = 0, 0  # the topic name comes first
    elif packet_type in (SUBSCRIBE, UNSUBSCRIBE):
        position, last = 2, len(body)  # after the packet identifier, topic filters to the end
    else:
        return True
    while True:
        if position + 2 > len(body):
            return True
        end = position + 2 + int.from_bytes(body[position : position + 2], "big")
        if end > len(body):
            return True
        try:
            topic = body[position + 2 : end].decode("utf-8")  # strict: no surrogates, no overlongs
        except UnicodeDecodeError:
            return False
        if "\0" in topic:
            return False
        position = end + (1 if packet_type == SUBSCRIBE else 0)  # a filter's requested QoS
        if position >= last:
            return True


class PacketLimitReader(ReaderAdapter):
    """Hands amqtt one whole MQTT packet at a time within the size and rate limits (see the
    module docstring); pacing by commits is amqtt_patches.CommitPacedReader's job."""

    def __init__(
        self,
        inner: ReaderAdapter,
        limits: BrokerLimits,
        rate: MessageRate,
        counters: Counter[str],
        peer: str,
    ) -> None:
        self._inner = inner
        self._limits = limits
        self._rate = rate
        self._counters = counters
        self._peer = peer
        self._buffer = bytearray()
        self.session: Session | None = None
        """The connection's session, set once amqtt made it: rates are per principal."""
        self.address = "unknown"
        """The client address this connection counts under (ratelimit.address_key)."""
        self.logged_in = False
        """True once it moved from the waiting room to the logged-in one (ConnectionRooms)."""

    async def first_packet(self) -> tuple[int, bytes]:
        """Read the first packet into the buffer; its type and body (without header)."""
        packet_type, header, body = await self._read_packet()
        self._buffer += header + body
        return packet_type, body

    async def read(self, n: int = -1) -> bytes:
        """amqtt's reads, served from whole packets that passed the limits."""
        if n < 0:
            data = bytes(self._buffer) + await self._inner.read(-1)
            self._buffer.clear()
            return data
        while len(self._buffer) < n:
            packet_type, header, body = await self._read_packet()
            if not topics_are_utf8(packet_type, body):
                self._counters["closed_invalid_utf8"] += 1
                log.warning("closed MQTT client %s (%s): a topic that is not UTF-8 (MQTT 3.1.1 1.5.3)",
                            self._client_id(), self._peer)  # fmt: skip
                raise InvalidUtf8(bytes(header), None)
            if packet_type == PUBLISH and not await self._within_rate(qos=(header[0] >> 1) & 3):
                continue
            self._buffer += header + body
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    def feed_eof(self) -> None:
        """Pass amqtt's end-of-stream on."""
        self._inner.feed_eof()

    async def _read_packet(self) -> tuple[int, bytes, bytes]:
        """One packet from the socket: (type, fixed header bytes, body); the body is read
        only once its length is known to be within max_packet_size."""
        header = bytearray(await self._inner.read(1))
        length, multiplier = 0, 1
        for _ in range(4):
            byte = (await self._inner.read(1))[0]
            header.append(byte)
            length += (byte & 0x7F) * multiplier
            if not byte & 0x80:
                break
            multiplier *= 128
        else:  # a fifth length byte: malformed (amqtt would drop the connection too)
            raise asyncio.IncompleteReadError(bytes(header), None)
        if len(header) + length > self._limits.max_packet_size:
            self._counters["closed_packet_too_large"] += 1
            log.warning(
                "closed MQTT client %s (%s): a %d-byte packet is over max_packet_size %d",
                self._client_id(), self._peer, len(header) + length, self._limits.max_packet_size,
            )  # fmt: skip
            raise PacketTooLarge(bytes(header), None)
        body = await self._inner.read(length) if length else b""
        return header[0] >> 4, bytes(header), body

    async def _within_rate(self, *, qos: int) -> bool:
        """Wait until this PUBLISH is within its sender's rate; False to drop it (QoS 0)."""
        principal = self.session.attributes.get(PRINCIPAL_KEY) if self.session is not None else None
        if principal is None or principal.kind == "bridge":
            return True
        key = f"{principal.kind}:{principal.ident}"
        delay = self._rate.wait(key)
        if not delay:
            return True
        if qos == 0:
            self._counters["dropped_over_rate"] += 1
            log.debug("dropped a QoS 0 PUBLISH of client %s: over its message rate", self._client_id())
            return False
        self._counters["delayed_over_rate"] += 1
        while delay:
            await asyncio.sleep(delay)
            delay = self._rate.wait(key)
        return True

    def _client_id(self) -> str:
        return repr(self.session.client_id) if self.session is not None else "(connecting)"


def protocol_level(connect_body: bytes) -> int | None:
    """The protocol level of a CONNECT packet's body, None if too short to say."""
    if len(connect_body) < 2:
        return None
    name_length = int.from_bytes(connect_body[:2], "big")
    return connect_body[2 + name_length] if len(connect_body) > 2 + name_length else None
