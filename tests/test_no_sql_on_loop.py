"""No store query runs on the event loop's thread while `batmon serve` answers who is calling.

The paths that used to query on the loop: an unknown api key (looked up in the store in
case another process had just made it), a session cookie naming a user id not in memory,
an MQTT login with an unknown secret, and serve's first admin made at start. The service
here runs on a real SQLite file behind a store that records the thread of every call
(every method of the store, its credentials and its outbox, on every handle it opens); the
test then asserts that none ran on the loop's thread. A user made by another process is
still honoured within a second or two (the credential watcher's poll).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from itsdangerous import URLSafeTimedSerializer

from batmon.service import Service, session_secret
from bridge.config import ServeOptions
from bridge.core import Core
from bridge.events import EventBus
from bridge.store.db import SqliteStore
from http_api.auth import COOKIE_NAME
from tests.support import LoopThread, wait_until
from tests.test_user_credentials import HONOURED_WITHIN_S, mqtt_login

# No query behind these: history_reader hands out a reader, shared() says which kind of store it is.
NOT_RECORDED = {"history_reader", "shared"}


class Calls:
    """(what, thread ident) of every store call, from any handle."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.made: list[tuple[str, int]] = []

    def add(self, what: str) -> None:
        with self.lock:
            self.made.append((what, threading.get_ident()))

    def on(self, thread_ident: int) -> list[str]:
        with self.lock:
            return [what for what, ident in self.made if ident == thread_ident]


class RecordingStore:
    """A real SqliteStore whose every call (and its credentials' and outbox's) is recorded."""

    def __init__(self, inner: Any, calls: Calls, prefix: str = "") -> None:
        self._inner = inner
        self._calls = calls
        self._prefix = prefix

    def __getattr__(self, name: str) -> Any:
        what = f"{self._prefix}{name}"
        if name in ("credentials", "outbox"):
            self._calls.add(what)
            return RecordingStore(getattr(self._inner, name), self._calls, f"{what}.")
        value = getattr(self._inner, name)
        if not callable(value) or name in NOT_RECORDED:
            return value

        def recorded(*args: Any, **kwargs: Any) -> Any:
            self._calls.add(what)
            result = value(*args, **kwargs)
            return RecordingStore(result, self._calls) if name == "another" else result

        return recorded


class RecordedService(Service):
    def __init__(self, options: ServeOptions, calls: Calls) -> None:
        super().__init__(options)
        self.calls = calls

    def _open_store(self) -> Any:
        return RecordingStore(super()._open_store(), self.calls)


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


def test_who_is_calling_is_answered_without_a_query_on_the_loop(tmp_path: Path, loop: LoopThread) -> None:
    calls = Calls()
    # With retention on: the pruner's handle is opened, used and closed too.
    options = ServeOptions(data_dir=tmp_path / "data", http_port=0, mqtt_port=0, retention_days=30)
    service = RecordedService(options, calls)
    loop.run(service.start(), timeout=30)
    loop_thread = loop.run(_thread_ident())
    try:
        assert service.admin_api_key, "serve made its first admin"
        assert service.mqtt_port is not None
        http = httpx.Client(base_url=f"http://127.0.0.1:{service.http_port}", timeout=10)

        def status(headers: dict[str, str]) -> int:
            return http.get("/interface/batmon/count", headers=headers).status_code

        assert status({"X-API-Key": service.admin_api_key}) == 200
        assert status({"X-API-Key": "no-such-key"}) == 401
        # A session cookie, rightly signed, for a user id nobody has.
        signer = URLSafeTimedSerializer(session_secret(options.data_dir), salt="batmon-session")
        forged = signer.dumps({"uid": 987654, "key": "whatever"})
        assert status({"Cookie": f"{COOKIE_NAME}={forged}"}) == 401
        assert mqtt_login(service.mqtt_port, "nobody@example.org", "no-such-key") != 0

        # Another process (`batmon user add` beside serve) makes a user: honoured soon.
        other = Core(SqliteStore.open(options.database_path), EventBus()).load()
        _, key = other.create_user("bob@example.org")
        other.close()
        wait_until(lambda: status({"X-API-Key": key}) == 200, HONOURED_WITHIN_S, "bob's new api key")
        assert mqtt_login(service.mqtt_port, "bob@example.org", key) == 0
        # The cookie a response to an api-key request sets names bob's id: it logs bob in.
        response = http.get("/interface/batmon/count", headers={"X-API-Key": key})
        cookie = response.cookies[COOKIE_NAME]
        http.cookies.clear()
        assert status({"Cookie": f"{COOKIE_NAME}={cookie}"}) == 200
        http.close()
    finally:
        loop.run(service.stop(), timeout=60)

    # The recording saw the paths in question, on every handle (the writer's, the pruner's).
    made = {what for what, _ in calls.made}
    assert {"credentials.load", "add_user", "credentials.version", "batmons_with_readings_before",
            "close"} <= made, made  # fmt: skip
    assert calls.on(loop_thread) == [], "store calls on the event loop's thread"


async def _thread_ident() -> int:
    return threading.get_ident()
