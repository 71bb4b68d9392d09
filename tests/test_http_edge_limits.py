"""The HTTP edge of a real `batmon serve` against a hostile network (issue 15): request
heads are bounded in size (16 KiB, 431) and in time (10 s, 408), idle keep-alive
connections end after 5 s, and past the connection limit a client gets a 503 at once
while the server keeps accepting. Everything here is loopback, bounded in count and time.
"""

from __future__ import annotations

import json
import multiprocessing
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.queues import Queue
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import ServeProcess
from tests.load import rss_mb

HEAD_LIMIT = 16 * 1024
HEAD_TIMEOUT_S = 10.0
KEEP_ALIVE_S = 5.0
SLACK_S = 3.0  # a loaded machine's scheduling, on top of the server's own timers

ATTACKERS = 40
ATTACK_BYTES = 16 * 1024 * 1024
ATTACK_CHUNK = 64 * 1024
ATTACK_START = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: "
RSS_RISE_MB = 64
HEALTHZ_WITHIN_S = 0.100
SETTLE_S = 10.0
FLOOD_ROUNDS = 3


def address(serve: ServeProcess) -> tuple[str, int]:
    parts = urlsplit(serve.http_url)
    assert parts.hostname and parts.port
    return parts.hostname, parts.port


def connect(serve: ServeProcess, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(address(serve), timeout=timeout)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One whole HTTP/1.1 response with a Content-Length: (status, headers, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"closed before a whole response head: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    fields = (line.partition(":") for line in lines)
    headers = {name.strip().lower(): value.strip() for name, _, value in fields}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(status_line.split()[1]), headers, body


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """True when the server closes (EOF or reset) within ``timeout``, whatever it sent before."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def healthz(sock: socket.socket) -> int:
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    return read_response(sock)[0]


def edge_counts(serve: ServeProcess) -> dict[str, int]:
    """What the HTTP edge refused so far, from /healthz."""
    with connect(serve) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        counts: dict[str, int] = json.loads(read_response(sock)[2])["http_edge"]
    return counts


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """One `batmon serve` with the default limits, for the whole module."""
    process = ServeProcess(Path(tmp_path_factory.mktemp("edge")) / "data").start()
    yield process
    process.stop()


# -- size of the head ------------------------------------------------------------------------


def test_a_head_just_under_16_kib_is_answered(server: ServeProcess) -> None:
    with connect(server) as sock:
        filler = b"a" * (HEAD_LIMIT - 1024)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Filler: " + filler + b"\r\n\r\n")
        assert read_response(sock)[0] == 200


def test_a_head_of_17_kib_is_431_and_the_connection_closed(server: ServeProcess) -> None:
    with connect(server) as sock:
        filler = b"a" * (17 * 1024)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Filler: " + filler + b"\r\n\r\n")
        status, headers, body = read_response(sock)
        assert status == 431
        assert headers["connection"] == "close"
        assert "16384" in json.loads(body)["error"]
        assert closed_by_server(sock, 5)


def test_a_long_request_line_counts_against_the_same_bound(server: ServeProcess) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /healthz?" + b"q" * (17 * 1024) + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock)[0] == 431
        assert closed_by_server(sock, 5)


def test_a_body_is_not_a_head_even_in_the_same_packet(server: ServeProcess) -> None:
    """A 40 KB body sent with its head, then two pipelined requests: only heads count."""
    body = json.dumps({"batmon_name": "Big body", "ignored": "a" * 40_000}).encode()
    head = (f"POST /interface/add/batmon HTTP/1.1\r\nHost: x\r\nX-API-Key: {server.admin_key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    with connect(server) as sock:
        sock.sendall(head + body)
        status, _, answer = read_response(sock)
        assert status == 200, answer
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
        answers = b""
        while answers.count(b'"status":"ok"') < 2:
            chunk = sock.recv(65536)
            assert chunk, answers
            answers += chunk
        assert answers.count(b"HTTP/1.1 200 OK\r\n") == 2


# -- time to send the head -------------------------------------------------------------------


def test_a_head_trickled_and_never_finished_is_408_after_the_head_timeout(server: ServeProcess) -> None:
    with connect(server) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        sock.settimeout(0.5)
        answer = b""
        # A slow loris: one more header byte every half second, never the blank line.
        while time.monotonic() - started < HEAD_TIMEOUT_S + SLACK_S:
            try:
                sock.sendall(b"X")
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if not chunk:
                break
            answer += chunk
        elapsed = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert HEAD_TIMEOUT_S - 0.5 <= elapsed <= HEAD_TIMEOUT_S + SLACK_S, elapsed


def test_a_connection_that_never_sends_is_closed_after_the_head_timeout(server: ServeProcess) -> None:
    with connect(server) as sock:
        started = time.monotonic()
        assert closed_by_server(sock, HEAD_TIMEOUT_S + SLACK_S)
        assert time.monotonic() - started >= HEAD_TIMEOUT_S - 0.5


def test_an_idle_keep_alive_connection_is_closed_after_5_s(server: ServeProcess) -> None:
    with connect(server) as sock:
        assert healthz(sock) == 200
        assert healthz(sock) == 200  # the connection is kept alive between requests
        idle_from = time.monotonic()
        assert closed_by_server(sock, KEEP_ALIVE_S + SLACK_S)
        assert time.monotonic() - idle_from >= KEEP_ALIVE_S - 0.5


# -- 40 floods of one unfinished header line (acceptance 1 of issue 15) ----------------------


class HealthPoller(threading.Thread):
    """Asks /healthz every 10 ms over its own connection, noting when each answer came, how
    long it took, and the server's RSS beside it."""

    def __init__(self, serve: ServeProcess) -> None:
        super().__init__(daemon=True)
        self.serve = serve
        assert serve.proc is not None
        self.pid = serve.proc.pid
        self.answers: list[tuple[float, float, float]] = []  # (asked at, seconds to answer, RSS MB)
        self.failures: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        sock = connect(self.serve, timeout=5)
        try:
            while not self.stopping.is_set():
                asked = time.monotonic()
                try:
                    status = healthz(sock)
                except OSError as exc:  # includes a reset or a timeout
                    self.failures.append(repr(exc))
                    sock.close()
                    sock = connect(self.serve, timeout=5)
                    continue
                self.answers.append((asked, time.monotonic() - asked, rss_mb(self.pid)))
                if status != 200:
                    self.failures.append(f"status {status}")
                self.stopping.wait(0.01)
        finally:
            sock.close()

    def between(self, start: float, end: float) -> list[tuple[float, float, float]]:
        return [answer for answer in self.answers if start <= answer[0] <= end]


def flood_one_header(host: str, port: int, sent: list[int]) -> None:
    """Send one header line of up to 16 MB, in chunks, until the server closes the socket."""
    total = 0
    with socket.create_connection((host, port), timeout=20) as sock:
        try:
            sock.sendall(ATTACK_START)
            chunk = b"a" * ATTACK_CHUNK
            while total < ATTACK_BYTES:
                sock.sendall(chunk)
                total += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
    sent.append(total)


def flood_from_another_process(host: str, port: int, results: Queue) -> None:  # type: ignore[type-arg]
    """The 40 floods at once, from a process of their own (so their threads do not slow
    the test's /healthz poller): puts (started, ended, bytes sent by each)."""
    sent: list[int] = []
    attackers = [threading.Thread(target=flood_one_header, args=(host, port, sent)) for _ in range(ATTACKERS)]
    started = time.monotonic()
    for attacker in attackers:
        attacker.start()
    for attacker in attackers:
        attacker.join(120)
    results.put((started, time.monotonic(), sent))


@dataclass
class FloodRound:
    """One round of the 40 floods, as the server lived it."""

    seconds: float
    most_sent: int  # bytes one attacker got out before the server closed its socket
    refused: int  # heads the server refused as too large
    start_rss: float
    peak_rss: float
    end_rss: float  # SETTLE_S after the floods closed
    answers: int  # /healthz answers asked for during the floods
    slowest: float

    def __str__(self) -> str:
        return (f"floods {self.seconds:.2f} s, at most {self.most_sent} bytes sent each, {self.refused}"
                f" refused; RSS start {self.start_rss:.1f} MB, peak {self.peak_rss:.1f}, {SETTLE_S:g} s"
                f" after {self.end_rss:.1f}; /healthz during: {self.answers} answers, slowest"
                f" {self.slowest * 1000:.1f} ms")  # fmt: skip


def flood_round(server: ServeProcess, poller: HealthPoller) -> FloodRound:
    assert server.proc is not None
    start_rss = rss_mb(server.proc.pid)
    refused_before = edge_counts(server)["heads_too_large"]
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    flood = spawn.Process(target=flood_from_another_process, args=(*address(server), results))
    flood.start()
    try:
        started, ended, sent = results.get(timeout=150)
    finally:
        flood.join(10)
        if flood.is_alive():
            flood.kill()
    assert len(sent) == ATTACKERS
    time.sleep(SETTLE_S)
    during = poller.between(started, ended + 0.2)
    return FloodRound(
        seconds=ended - started, most_sent=max(sent),
        refused=edge_counts(server)["heads_too_large"] - refused_before,
        start_rss=start_rss, peak_rss=max(rss for _, _, rss in poller.between(started, ended + 1)),
        end_rss=rss_mb(server.proc.pid),
        answers=len(during), slowest=max((took for _, took, _ in during), default=0.0),
    )  # fmt: skip


def test_forty_floods_of_unfinished_headers_cost_little_memory_and_healthz_stays_quick(
    server: ServeProcess,
) -> None:
    poller = HealthPoller(server)
    poller.start()
    try:
        time.sleep(1)  # the poller's first answers
        for attempt in range(1, FLOOD_ROUNDS + 1):
            flood = flood_round(server, poller)
            print(f"round {attempt}: {flood}")
            # What the server alone decides holds in every round.
            assert flood.most_sent < ATTACK_BYTES, "the server let a whole 16 MB header line in"
            assert flood.refused == ATTACKERS
            assert flood.peak_rss - flood.start_rss <= RSS_RISE_MB
            assert flood.end_rss - flood.start_rss <= RSS_RISE_MB
            assert poller.failures == []
            assert flood.answers >= 3
            # /healthz time also holds the machine's scheduling (two cores shared with other
            # test runs): another round is a fresh try, the bound itself never moves.
            if flood.slowest <= HEALTHZ_WITHIN_S:
                break
        else:
            raise AssertionError(f"/healthz took over {HEALTHZ_WITHIN_S * 1000:.0f} ms during each of"
                                 f" {FLOOD_ROUNDS} rounds of floods")  # fmt: skip
    finally:
        poller.stopping.set()
        poller.join(10)


# -- the connection limit --------------------------------------------------------------------

LIMIT = 16


def test_past_the_connection_limit_a_client_gets_503_and_the_server_keeps_accepting(
    tmp_path: Path,
) -> None:
    serve = ServeProcess(tmp_path / "data", env={"BATMON_HTTP_MAX_CONNECTIONS": str(LIMIT)}).start()
    held: list[socket.socket] = []
    try:
        held = [connect(serve) for _ in range(LIMIT)]
        for sock in held[:2]:  # some of them in use, all of them open
            assert healthz(sock) == 200
        for _ in range(3):  # each one past the limit is told so, and closed
            with connect(serve) as extra:
                extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                status, headers, body = read_response(extra)
                assert status == 503
                assert headers["connection"] == "close" and "retry-after" in headers
                assert "connections" in json.loads(body)["error"]
                assert closed_by_server(extra, 5)
        assert healthz(held[0]) == 200  # those inside still work
        warnings = [line for line in serve.log_path.read_text().splitlines() if "connection limit" in line]
        assert len(warnings) == 1, warnings  # the operator hears of it, once a minute at most
        held[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # from inside: a 4th would be refused
        assert json.loads(read_response(held[0])[2])["http_edge"]["over_connection_limit"] == 3
        for sock in held:
            sock.close()
        held = []
        deadline = time.monotonic() + 5
        while True:  # their places come free as the server sees them close
            with connect(serve) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                status = read_response(sock)[0]
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert status == 200
    finally:
        for sock in held:
            sock.close()
        serve.stop()


def test_a_bad_connection_limit_is_a_usage_error(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "batmon.cli", "serve", "--data-dir", str(tmp_path / "d"),
               "--http-port", "0", "--mqtt-port", "0", "--http-max-connections", "0"]  # fmt: skip
    r = subprocess.run(command, capture_output=True, text=True, timeout=30)
    print(r.stderr)
    assert r.returncode == 2
    assert r.stderr.startswith("batmon serve: --http-max-connections: ") and "Traceback" not in r.stderr
