"""The HTTP server of `batmon serve`: uvicorn, with limits at the edge that it lacks.

Measured on uvicorn 0.55 with httptools 0.9 (docs/CHOICES.md, "HTTP limits"): httptools
keeps every byte of an unfinished request line or header, with no bound and no deadline,
and uvicorn closes no connection that never finishes its first request. h11 bounds the
head (16 KiB, then a 400) but has no deadline either, and uvicorn's `limit_concurrency`
answers its 503 only once the head is complete, so a socket that never finishes one holds
its place for ever. So this module bounds, before anything is parsed or buffered:

- the request line plus headers to ``HEAD_LIMIT_BYTES`` (431, then close);
- the time to receive them to ``HEAD_TIMEOUT_S`` (408 if any byte came, then close);
- the open connections to ``max_connections``: one more is answered 503 at once and
  closed, so a flood never stops the server accepting;

and sets uvicorn's own keep-alive timeout.

It subclasses uvicorn's ``HttpToolsProtocol`` and relies on these parts of it, the same
from uvicorn 0.33 to 0.55 (pinned in pyproject): the asyncio protocol methods
(``connection_made``, ``data_received``, ``connection_lost``), the httptools parser
callbacks it implements (``on_headers_complete``, ``on_message_complete``), and the
attributes ``transport``, ``connections`` (the server's set of open protocols) and
``cycle.response_complete`` (whether a response is being sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEAD_LIMIT_BYTES = 16 * 1024
HEAD_TIMEOUT_S = 10.0
# Longer than a dashboard's gaps between fetches, short enough that idle sockets do not
# hold places under the connection limit (uvicorn's, Apache's and Node's default too).
KEEP_ALIVE_S = 5
# After a refusal we stop sending (FIN) and read what the client still sends, for this
# long or this much, before closing: closing with unread bytes makes the kernel send a
# reset, which can destroy our answer before the client has read it.
LINGER_S = 2.0
LINGER_BYTES = 64 * 1024
LIMIT_WARNING_EVERY_S = 60.0

log = logging.getLogger(__name__)


@dataclass
class EdgeStats:
    """Connections the edge refused, for /healthz."""

    heads_too_large: int = 0
    heads_timed_out: int = 0
    over_connection_limit: int = 0
    _warned_at: float = field(default=-math.inf, repr=False)

    def as_dict(self) -> dict[str, int]:
        return {"heads_too_large": self.heads_too_large, "heads_timed_out": self.heads_timed_out,
                "over_connection_limit": self.over_connection_limit}  # fmt: skip

    def count_over_limit(self, max_connections: int) -> None:
        """Count one refused connection, and tell the operator once a minute at most: the
        refused may be their users, and a flood must not fill the log."""
        self.over_connection_limit += 1
        now = time.monotonic()
        if now - self._warned_at >= LIMIT_WARNING_EVERY_S:
            self._warned_at = now
            log.warning("HTTP connection limit reached: %d open, new ones get a 503 (%d so far);"
                        " --http-max-connections raises it", max_connections,
                        self.over_connection_limit)  # fmt: skip


def refusal(status: int, phrase: str, message: str, headers: tuple[str, ...] = ()) -> bytes:
    """A whole HTTP/1.1 response in the API's error shape, ending the connection."""
    body = json.dumps({"error": message}).encode()
    head = [f"HTTP/1.1 {status} {phrase}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close", *headers]  # fmt: skip
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


HEAD_TOO_LARGE = refusal(431, "Request Header Fields Too Large",
                         f"The request line and headers are over {HEAD_LIMIT_BYTES} bytes.")  # fmt: skip
HEAD_TOO_SLOW = refusal(408, "Request Timeout",
                        f"The request line and headers took over {HEAD_TIMEOUT_S:g} s.")  # fmt: skip


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol that counts the bytes and the time of each request
    head before the parser sees them; subclassed per server with its limits."""

    max_connections: ClassVar[int]
    stats: ClassVar[EdgeStats]
    over_limit: ClassVar[bytes]

    _head_bytes = 0  # bytes of the head being received so far
    _heads_done = 0  # heads completed on this connection
    _in_head = True  # the next bytes belong to a request head
    _refused = False
    _discarded = 0
    _timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            # Out of the count at once: the places are for connections we serve.
            self.connections.discard(self)
            self.stats.count_over_limit(self.max_connections)
            self._refuse(self.over_limit)
            return
        self._arm(HEAD_TIMEOUT_S, self._head_timed_out)  # a socket that never sends is closed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            self._discarded += len(data)
            if self._discarded > LINGER_BYTES:
                self.transport.close()
            return
        if not self._in_head:  # a body: the app bounds it (413)
            super().data_received(data)
            return
        if self._timer is None:  # the first byte of a head after a keep-alive wait
            self._arm(HEAD_TIMEOUT_S, self._head_timed_out)
        room = HEAD_LIMIT_BYTES - self._head_bytes
        if len(data) <= room:
            self._head_bytes += len(data)
            super().data_received(data)
            return
        # More than the head may still hold: the parser gets what fits. If the head ends in
        # it, the rest is a body or the next request, and is counted as such.
        heads_before = self._heads_done
        self._head_bytes = HEAD_LIMIT_BYTES
        super().data_received(data[:room])
        if self.transport.is_closing() or self.transport.get_protocol() is not self:
            return  # the parser refused it (400), or it became a WebSocket
        if self._heads_done == heads_before:
            self.stats.heads_too_large += 1
            self._refuse(HEAD_TOO_LARGE)
        else:
            self.data_received(data[room:])

    def on_headers_complete(self) -> None:
        self._disarm()
        self._in_head, self._head_bytes = False, 0
        self._heads_done += 1
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        # The next bytes start a head; its clock starts with its first byte, and until
        # then uvicorn's keep-alive timeout governs the idle connection.
        self._in_head = True
        super().on_message_complete()

    def _head_timed_out(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        self.stats.heads_timed_out += 1
        if self._head_bytes:
            self._refuse(HEAD_TOO_SLOW)
        else:
            self.transport.close()  # nothing asked, nothing to answer

    def _refuse(self, response: bytes) -> None:
        """Answer, stop sending, and close once the client has read it (or LINGER_S)."""
        self._refused = True
        self._disarm()
        if self.cycle is not None and not self.cycle.response_complete:
            # A head pipelined behind a response still being sent: no answer can go in
            # the middle of that one. Only a misbehaving client pipelines such a head.
            self.transport.close()
            return
        self.transport.write(response)
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self._arm(LINGER_S, self.transport.close)
        else:
            self.transport.close()

    def _arm(self, delay: float, callback: Any) -> None:
        self._disarm()
        self._timer = asyncio.get_running_loop().call_later(delay, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def edge_protocol(max_connections: int, stats: EdgeStats) -> type[EdgeProtocol]:
    """The protocol class of one server: its connection limit and its counters."""
    over_limit = refusal(503, "Service Unavailable",
                         f"The server has {max_connections} connections open, its limit; try again"
                         " in a few seconds.", ("retry-after: 5",))  # fmt: skip
    return type("LimitedEdgeProtocol", (EdgeProtocol,),
                {"max_connections": max_connections, "stats": stats, "over_limit": over_limit})  # fmt: skip


def build_server(app: Any, *, max_connections: int, stats: EdgeStats, **tls: Any) -> uvicorn.Server:
    """A uvicorn server for ``app`` with the edge limits; it serves sockets bound elsewhere.
    ``tls``: uvicorn's ssl_certfile/ssl_keyfile for HTTPS."""
    config = uvicorn.Config(
        app, http=edge_protocol(max_connections, stats), timeout_keep_alive=KEEP_ALIVE_S,
        log_level="warning", lifespan="off", access_log=False, **tls,
    )  # fmt: skip
    return uvicorn.Server(config)


class HttpServerError(RuntimeError):
    """The HTTP server ended while it was starting."""


class HttpServer:
    """The HTTP server as a part the service starts and stops: uvicorn with the edge
    limits, serving ``app`` on a socket the service already bound (a busy port is then
    one clear error before anything starts)."""

    def __init__(self, app: Any, sock: socket.socket, *, max_connections: int, stats: EdgeStats,
                 tls: dict[str, Any] | None = None) -> None:  # fmt: skip
        """``tls``: uvicorn's ssl_certfile/ssl_keyfile for HTTPS (none: plain HTTP)."""
        self.app = app
        self.sock = sock
        self.max_connections = max_connections
        self.stats = stats
        self.tls = tls or {}
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Serve; returns once uvicorn listens (HttpServerError if it ended first)."""
        server = self._server = build_server(self.app, max_connections=self.max_connections,
                                             stats=self.stats, **self.tls)  # fmt: skip
        # Signals are the service's (the CLI stops the whole service), not uvicorn's: from
        # 0.29 uvicorn takes SIGINT/SIGTERM for the whole of serve() unless this is a no-op.
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign, assignment]
        self._task = asyncio.create_task(server.serve(sockets=[self.sock]), name="http-server")
        while not server.started:
            if self._task.done():
                raise HttpServerError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Answer the requests in flight, then close (open live streams must have ended)."""
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await self._task
        self._server = self._task = None
        self.sock.close()
