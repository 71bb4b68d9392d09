"""One worker at a time does a job (the offline watchdog): a PostgreSQL session advisory lock.

``pg_try_advisory_lock`` on a connection of its own: the worker that gets it leads until that
session ends, which a crash ends too (the kernel closes a killed process's socket and the
server drops the session and its locks at once). The others try again every
``RETRY_S``; the leader checks its session as often, so a cut connection makes it stop
leading. A worker whose machine vanishes without closing its socket is dropped by the
server after the TCP keepalive and user timeouts set on the session (about 10 s), and stops
leading by its own ``tcp_user_timeout``.

Leading is an economy (one worker polls), not what makes a change happen once: the watchdog's
UPDATE is conditional (bridge/store/pg_shared.py), so two workers that both believe they lead
for a moment still flip each batmon once. A pooler in transaction mode (PgBouncer) would break
this: session locks need a session (docs/SCALE-OUT.md).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from bridge.store.pg_store import describe_url, one_line

log = logging.getLogger(__name__)

RETRY_S = 1.0
"""How often a follower tries the lock and a leader checks its session."""
# The advisory lock key of each job: "batmon" and 0x100 + n, away from pg_schema's keys.
JOBS = {"offline-watchdog": 0x6261_746D_6F6E_0101}
# Both ends give up on a silent peer within seconds rather than the kernel's 2 hours.
CLIENT_KEEPALIVE = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
                    "keepalives_count": 3, "tcp_user_timeout": 10_000}  # fmt: skip
SERVER_KEEPALIVE = ("SET tcp_keepalives_idle = 5", "SET tcp_keepalives_interval = 2",
                    "SET tcp_keepalives_count = 3", "SET tcp_user_timeout = 10000")  # fmt: skip


class PgLeader:
    """Holds (or keeps trying for) one job's advisory lock, on its own thread and connection."""

    def __init__(self, url: str, job: str, retry_s: float = RETRY_S) -> None:
        self.url = url
        self.job = job
        self.key = JOBS[job]
        self.retry_s = retry_s
        self.leading = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection[Any] | None = None

    def start(self, changed: Callable[[bool], None]) -> None:
        """Try to lead from now on; ``changed(leading)`` is called from this object's thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(changed,), name=f"leader-{self.job}",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def stop(self) -> None:
        """Close the session (the lock goes with it: another worker takes over at once)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
            self._thread = None

    def _run(self, changed: Callable[[bool], None]) -> None:
        failing = False
        try:
            while not self._stop.is_set():
                try:
                    self._step(changed)
                    failing = False
                except psycopg.Error as exc:
                    if not failing:  # once per outage, not every second
                        log.warning("leader election for %s on %s: %s", self.job, describe_url(self.url),
                                    one_line(exc, self.url))  # fmt: skip
                    failing = True
                    self._close()
                    self._set(False, changed)
                self._stop.wait(self.retry_s)
        finally:
            self._close()
            self._set(False, changed)

    def _step(self, changed: Callable[[bool], None]) -> None:
        """Try the lock, or (leading) check the session that holds it; raises when cut."""
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            self._close()
            self._set(False, changed)  # a new session holds nothing
            conninfo = make_conninfo(self.url, connect_timeout=10, application_name=f"batmon {self.job}",
                                     **CLIENT_KEEPALIVE)  # fmt: skip
            conn = self._conn = psycopg.connect(conninfo, autocommit=True)
            for setting in SERVER_KEEPALIVE:
                conn.execute(setting)
        if self.leading:
            conn.execute("SELECT 1")  # the session is alive, so the lock is still ours
            return
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()
        self._set(bool(row and row[0]), changed)

    def _set(self, leading: bool, changed: Callable[[bool], None]) -> None:
        if leading != self.leading:
            self.leading = leading
            changed(leading)

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()
