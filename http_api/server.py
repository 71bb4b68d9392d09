"""The HTTP server `batmon serve` runs the facade on: uvicorn on a socket we bound.

Binding is the composition root's job (a busy port is one clear error before anything
starts); this part only serves on that socket, with the same start/stop as every
extension, so the service starts and stops it in its one declared order.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import uvicorn
from starlette.types import ASGIApp


class HttpServerError(RuntimeError):
    """The HTTP server ended while it was starting."""


class HttpServer:
    """uvicorn serving ``app`` on an already bound, listening socket."""

    def __init__(self, app: ASGIApp, sock: socket.socket) -> None:
        self.app = app
        self.sock = sock
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Serve; returns once uvicorn listens (HttpServerError if it ended first)."""
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", access_log=False)
        server = self._server = uvicorn.Server(config)
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
