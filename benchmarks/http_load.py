"""HTTP load: keep-alive clients on raw sockets, one thread each.

Requests are prebuilt bytes and responses are parsed only as far as framing needs, so a
client costs a few microseconds of Python per request and the server is what saturates.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from dataclasses import dataclass, field

from benchmarks.procs import BenchError


def build_request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    """An HTTP/1.1 keep-alive request as bytes."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: keep-alive"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body or method == "POST":
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class KeepAlive:
    """One persistent connection; ``call`` sends a prebuilt request and returns the status."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def call(self, request: bytes) -> tuple[int, bytes]:
        self.sock.sendall(request)
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self._more()
        head, self.buf = self.buf[:end].decode("latin-1"), self.buf[end + 4 :]
        status = int(head.split(" ", 2)[1])
        lowered = head.lower()
        if "transfer-encoding: chunked" in lowered:
            return status, self._chunked()
        length = 0
        for line in lowered.split("\r\n")[1:]:
            if line.startswith("content-length:"):
                length = int(line.split(":", 1)[1])
        while len(self.buf) < length:
            self._more()
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, body

    def _chunked(self) -> bytes:
        body = b""
        while True:
            while (end := self.buf.find(b"\r\n")) < 0:
                self._more()
            size = int(self.buf[:end].split(b";")[0], 16)
            while len(self.buf) < end + 2 + size + 2:
                self._more()
            body += self.buf[end + 2 : end + 2 + size]
            self.buf = self.buf[end + 2 + size + 2 :]
            if size == 0:
                return body

    def _more(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise BenchError("server closed the connection")
        self.buf += chunk

    def close(self) -> None:
        self.sock.close()


@dataclass
class LoadResult:
    requests: int = 0
    errors: list[str] = field(default_factory=list)


def closed_loop(port: int | list[int], requests: list[bytes], duration: float) -> float:
    """Requests/s from ``len(requests)`` keep-alive clients, client i sending requests[i]
    back to back for ``duration`` seconds. Any non-200 answer fails the run. Several
    ports (workers): client i talks to ports[i % len(ports)], round robin."""
    ports = [port] if isinstance(port, int) else port
    clients = [KeepAlive(ports[i % len(ports)]) for i in range(len(requests))]
    result = LoadResult()
    lock = threading.Lock()
    go = threading.Barrier(len(clients) + 1)
    deadline = [0.0]

    def work(client: KeepAlive, request: bytes) -> None:
        done = 0
        go.wait()
        try:
            while time.monotonic() < deadline[0]:
                status, body = client.call(request)
                if status != 200:
                    raise BenchError(f"HTTP {status}: {body[:200]!r}")
                done += 1
        except Exception as exc:
            with lock:
                result.errors.append(str(exc))
        with lock:
            result.requests += done

    threads = [threading.Thread(target=work, args=pair, daemon=True)
               for pair in zip(clients, requests, strict=True)]  # fmt: skip
    for t in threads:
        t.start()
    started = time.monotonic()
    deadline[0] = started + duration
    go.wait()
    for t in threads:
        t.join(duration + 120)
    elapsed = time.monotonic() - started
    for c in clients:
        c.close()
    if result.errors:
        raise BenchError(result.errors[0])
    return result.requests / elapsed


def timed_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[float, bytes]:
    """(seconds until the whole body is in, body) for one GET on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    started = time.monotonic()
    conn.request("GET", path, headers=headers or {})
    response = conn.getresponse()
    body = response.read()
    elapsed = time.monotonic() - started
    conn.close()
    if response.status != 200:
        raise BenchError(f"GET {path.split('?')[0]}: HTTP {response.status}: {body[:200]!r}")
    return elapsed, body


class HealthPoller:
    """GETs /healthz (or ``path``) every ``interval`` s on one keep-alive connection, on a thread, and
    keeps (start time, latency ms) per request."""

    def __init__(self, port: int, interval: float = 0.05, path: str = "/healthz") -> None:
        self.port = port
        self.interval = interval
        self.path = path  # another GET to poll the same way (a batmon's status...)
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HealthPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(130)

    def _run(self) -> None:
        client = KeepAlive(self.port)
        request = build_request("GET", self.path)
        while not self._stop.is_set():
            started = time.monotonic()
            client.call(request)
            self.samples.append((started, (time.monotonic() - started) * 1000))
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))
        client.close()

    def latencies(self, start: float = 0.0, end: float = float("inf")) -> list[float]:
        """Latencies of the requests sent within [start, end)."""
        return sorted(ms for at, ms in self.samples if start <= at < end)

    def overlapping(self, start: float, end: float) -> list[float]:
        """Latencies of the requests under way at some moment within [start, end)."""
        return sorted(ms for at, ms in self.samples if at < end and at + ms / 1000 >= start)

    def done_before(self, moment: float) -> list[float]:
        """Latencies of the requests answered before ``moment``."""
        return sorted(ms for at, ms in self.samples if at + ms / 1000 < moment)
