"""Real local peers the tests talk to (not mocks): an HTTP sink for Apprise's json://."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Sink:
    """A local HTTP endpoint for Apprise's json:// service; records what it is sent.

    In ``hang`` mode it holds each request without answering (a stuck provider).
    """

    def __init__(self, port: int = 0, hang: bool = False) -> None:
        self.hang = hang
        self.received: list[dict[str, Any]] = []
        self.hung: list[dict[str, Any]] = []
        self.release = threading.Event()
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.port = self.server.server_address[1]
        serve = self.server.serve_forever
        threading.Thread(target=serve, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def url(self, path: str = "", auth: str = "") -> str:
        return f"json://{auth}127.0.0.1:{self.port}/{path}"

    def posts(self, path: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [p for p in self.received if path is None or p["path"] == f"/{path}"]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def _record(self, body: dict[str, Any]) -> bool:
        """Keep the body; False when the request must hang instead of being answered."""
        with self._lock:
            (self.hung if self.hang else self.received).append(body)
        return not self.hang

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = {**json.loads(self.rfile.read(length)), "path": self.path}
                if not sink._record(body):
                    sink.release.wait(30)
                    return
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        return Handler
