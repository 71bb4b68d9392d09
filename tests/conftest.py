"""Shared fixtures: real SQLite files in tmp_path, the real app, real servers, real brokers."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from bridge.core import Core, User
from bridge.events import EventBus
from bridge.extensions.alarms import AlarmEvaluator
from bridge.store.db import Store
from http_api.app import create_app
from http_api.live import LiveFeed
from tests.broker_support import FakeCredentials, Running, make_broker
from tests.support import ROOT, Env, LoopThread, make_env


@dataclass
class Api:
    """The HTTP app over a real SQLite file, with one user to call it as."""

    client: TestClient
    core: Core
    api_key: str
    user: User

    def new_user(self, email: str) -> str:
        """Another user's api key."""
        return self.core.create_user(email)[1]

    def add_batmon(self, **fields: object) -> tuple[int, str]:
        body = {"batmon_name": "Test batmon", "batmon_type": "BMV", **fields}
        r = self.client.post("/interface/add/batmon", json=body, headers=self.auth)
        assert r.status_code == 200, r.text
        success = r.json()["success"]
        return success["batmon_id"], success["batmon_token"]

    @property
    def auth(self) -> dict[str, str]:
        return {"X-API-Key": self.api_key}


@pytest.fixture(autouse=True)
def cores_are_closed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every Core a test made in this process has its writer thread and history workers
    stopped at the end. Many tests build a Core and drop it; each left a writer thread with
    its SQLite connection, and by 800 tests the process held over 1,024 descriptors, past
    paho's select() limit: every later MQTT client of the suite then failed to connect."""
    made: list[Core] = []
    original = Core.__init__

    def remember(self: Core, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(Core, "__init__", remember)
    yield
    for core in made:
        core.writer.stop()
        core.close_history()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    store = Store.open(tmp_path / "batmon.sqlite3")
    core = Core(store, EventBus()).load()
    asyncio.run(AlarmEvaluator(core).start())  # alarms react to readings as in `batmon serve`
    user, key = core.create_user("owner@example.org")
    # A live feed, as `batmon serve` gives it; its first page starts it (on TestClient's loop).
    app = create_app(core, session_secret=b"s" * 32, live=LiveFeed(core))
    with TestClient(app) as client:
        yield Api(client, core, key, user)
    # The writer's thread and connection too: left running, 800 tests held 1,500 descriptors,
    # past paho's select() limit of 1,024, and every later MQTT test failed to connect.
    core.close()


@dataclass
class ServeProcess:
    """A real `batmon serve` subprocess on free ports; lines it printed are parsed."""

    data_dir: Path
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path = ROOT
    proc: subprocess.Popen[str] | None = None
    http_url: str = ""
    mqtt_url: str = ""
    admin_key: str | None = None
    output: list[str] = field(default_factory=list)
    log_path: Path = Path("/dev/null")

    def start(self, timeout: float = 30) -> ServeProcess:
        cmd = [sys.executable, "-m", "batmon.cli", "serve", "--data-dir", str(self.data_dir),
               "--http-port", "0", "--mqtt-port", "0", *self.args]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        # stderr (the log) goes to a file: a pipe nobody reads would block the server.
        self.log_path = self.data_dir.parent / f"serve-{time.monotonic_ns()}.log"
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.cwd, stdout=subprocess.PIPE, stderr=log,
                                         text=True, env=env)  # fmt: skip
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"serve exited: {self.log_path.read_text()}")
            self.output.append(line)
            if m := re.match(r"HTTP\s+(\S+)", line):
                self.http_url = m.group(1)
            elif m := re.match(r"MQTT\s+(\S+)", line):
                self.mqtt_url = m.group(1)
            elif m := re.search(r"api_key \(shown once\): (\S+)", line):
                self.admin_key = m.group(1)
            elif line.startswith("ready"):
                return self
        raise AssertionError("serve did not become ready in time")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServeProcess]:
    process = ServeProcess(tmp_path / "data")
    yield process
    if process.proc is not None:
        process.stop(signal.SIGKILL)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    """A core on tmp SQLite, its loop thread, and the shared Mosquitto under this test's topics."""
    with make_env(tmp_path) as env:
        yield env


# -- the embedded broker, one per test module that asks for it ------------------

@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="module")
def running(loop_thread: LoopThread) -> Iterator[Running]:
    """A started embedded broker with test credentials, for the whole module."""
    r = make_broker(FakeCredentials())
    loop_thread.run(r.broker.start())
    yield r
    loop_thread.run(r.broker.stop())


@pytest.fixture
def mosquitto_port(serve: ServeProcess, tmp_path: Path) -> Iterator[int]:
    """A private Mosquitto with persistence, and serve pointed at it (base topic `fleet`)."""
    from tests.load import private_mosquitto

    broker = private_mosquitto(tmp_path / "mosquitto")
    serve.args = ["--mqtt-url", f"mqtt://127.0.0.1:{broker.port}", "--base-topic", "fleet",
                  "--no-discovery"]  # fmt: skip
    yield broker.port
    broker.stop()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Drop the PostgreSQL databases this session made (tests/pg_support.py), if any."""
    from tests import pg_support

    pg_support.drop_session_databases()
