"""The processes a benchmark runs against: `batmon serve`, a private Mosquitto, a plain
amqtt broker, the minimal Starlette anchor and the MQTT sinks, each on free ports.

Everything is a subprocess, so the product is measured black-box and the harness's own
Python (load generators, counters) never shares a GIL with what it measures.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """Something the benchmark needs did not start or answer; the row reports it."""


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[Any], log: Path, timeout: float = 15) -> None:
    """Wait until something accepts on 127.0.0.1:port, or fail with the process's log."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        if proc.poll() is not None:
            raise BenchError(f"{proc.args[0]} exited: {log.read_text()[-500:]}")
        if time.monotonic() > deadline:
            raise BenchError(f"nothing listens on port {port} after {timeout} s")
        time.sleep(0.02)


def stop_process(proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM) -> None:
    """Signal one process we started and reap it; SIGKILL if it does not go in 15 s."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mb(pid: int) -> float:
    """Resident memory of one process in MB, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for pid {pid}")


def unthrottled_broker_config(folder: Path) -> Path:
    """The repository's broker.yaml without its per-device message-rate cap: the rows
    measure ingest, and a benchmark device sends far above what a real one may."""
    import yaml  # a dependency of the product, for its own broker.yaml

    source = ROOT / "broker.yaml"
    if not source.exists():
        source = ROOT / "bridge" / "broker.yaml"
    config = yaml.safe_load(source.read_text()) or {}
    if "limits" in config:  # releases before the limits have no such section, and refuse one
        config["limits"] = {**(config["limits"] or {}), "messages_per_second": 1e9, "message_burst": 10**9}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bench-broker.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _drain(stream: Any) -> None:
    with contextlib.suppress(OSError, ValueError):
        for _ in stream:
            pass


@dataclass
class Serve:
    """A `batmon serve` subprocess on free ports; what it printed is parsed."""

    data_dir: Path
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[str] | None = None
    http_port: int = 0
    mqtt_port: int = 0
    db_path: Path = Path()
    admin_key: str = ""
    ready_at: float = 0.0  # time.monotonic() when "ready" was read

    def start(self, timeout: float = 120) -> Serve:
        cmd = [sys.executable, "-m", "batmon.cli", "serve", "--data-dir", str(self.data_dir),
               "--http-port", "0", "--mqtt-port", "0", *self.args]  # fmt: skip
        if "--mqtt-url" not in self.args and "--broker-config" not in self.args:
            cmd += ["--broker-config", str(unthrottled_broker_config(self.data_dir.parent))]
        log = self.data_dir.parent / f"serve-{time.monotonic_ns()}.log"
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as err:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise BenchError(f"batmon serve exited: {log.read_text()[-800:]}")
            if m := re.match(r"HTTP\s+http://[^:]+:(\d+)", line):
                self.http_port = int(m.group(1))
            elif m := re.match(r"MQTT\s+mqtt://[^:]+:(\d+)", line):
                self.mqtt_port = int(m.group(1))
            elif m := re.match(r"data\s+(\S+)", line):
                self.db_path = Path(m.group(1))
            elif m := re.search(r"api_key \(shown once\): (\S+)", line):
                self.admin_key = m.group(1)
            elif line.startswith("ready"):
                self.ready_at = time.monotonic()
                # Whatever it prints later is read and dropped: a full pipe would block it.
                threading.Thread(target=_drain, args=(self.proc.stdout,), daemon=True).start()
                return self
        raise BenchError("batmon serve did not print ready in time")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        stop_process(self.proc)


@dataclass
class Mosquitto:
    """A private Mosquitto: defaults, except an unbounded queue for the bridge's session
    (the default 1,000 would drop QoS 1 readings under load) and TCP_NODELAY."""

    folder: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    CONFIG = "max_queued_messages 0\nset_tcp_nodelay true\n"

    def start(self) -> Mosquitto:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = self.folder / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n{self.CONFIG}"
            # Started as root, Mosquitto would drop to user `mosquitto` otherwise.
            f"user {pwd.getpwuid(os.getuid()).pw_name}\n"
        )
        log = self.folder / "mosquitto.log"
        with log.open("ab") as out:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=out, stderr=out)
        wait_port(self.port, self.proc, log)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        stop_process(self.proc)


@dataclass
class PythonServer:
    """One of our anchor servers (`python -m benchmarks.<module> --port P ...`)."""

    module: str
    args: list[str]
    folder: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PythonServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        log = self.folder / f"{self.module.rsplit('.', 1)[-1]}-{self.port}.log"
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, "--port", str(self.port), *self.args],
                cwd=ROOT, stdout=out, stderr=out,
            )  # fmt: skip
        wait_port(self.port, self.proc, log, timeout=30)
        return self

    def stop(self) -> None:
        stop_process(self.proc)


@dataclass
class Sink:
    """An MQTT subscriber process writing readings to a database (the batched sink or the
    naive peer on SQLite, the batched sink on PostgreSQL); it reports the rows it committed."""

    kind: str  # "batched" | "naive" | "pg"
    broker_port: int
    db_path: Path  # the SQLite file; for "pg", where its log goes (next to it)
    db_url: str | None = None  # "pg": the database
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Sink:
        log = self.db_path.with_suffix(".log")
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.sinks", self.kind, "--port", str(self.broker_port),
                 "--db", self.db_url or str(self.db_path)],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=out,
            )  # fmt: skip
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"subscribed":
            raise BenchError(f"{self.kind} sink did not subscribe: {log.read_text()[-500:]}")
        return self

    def stop(self) -> None:
        stop_process(self.proc)
