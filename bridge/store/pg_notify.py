"""What several workers on one PostgreSQL database tell each other: LISTEN/NOTIFY and the
change log (docs/SCALE-OUT.md, "Caches across workers").

Two channels:

- ``batmon_config``: a trigger (bridge/store/pg_schema.py, migration 4) logs every change of a
  batmon's settings, an alarm, a bank or a user in ``config_changes`` under the next
  ``config_version`` and NOTIFYs it, in the change's own transaction. The log, not the
  notification, is the truth: a notification reaches only sessions listening at the time, so a
  worker asks "what changed after the version I hold" (``PgPeerReads.check``), and a request
  asks the same before it is answered (a NOTIFY may still be on its way when the worker that
  made the change has already answered).
- ``batmon_readings``: the writer's commit NOTIFYs the ids of the batmons whose latest value it
  moved (``readings_notices``), tagged with this process's ``WORKER_TAG`` so a worker skips its
  own. The live dashboard on another worker loads those values (``current_rows``).

Each worker holds two connections of its own for this: one that only LISTENs (``PgListener``,
on a thread of its own), and one for the checks (``PgPeerReads``, one thread at a time).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.rows import dict_row

from bridge.errors import StorageFailed
from bridge.store.pg_channels import CONFIG_CHANNEL, READINGS_CHANNEL, parse_readings_notice
from bridge.store.pg_store import OwnConnection, PostgresStore, connect, one_line

log = logging.getLogger(__name__)

LOG_LIMIT = 1000
"""More changes than this since the version held: reload everything instead."""
KEEP_VERSIONS = 10_000
"""The change log keeps this many versions; a worker further behind reloads everything."""
RECONNECT_S = 1.0


@dataclass
class Changes:
    """What ``PgPeerReads.check`` found: the versions now, what changed, and current rows."""

    version: int
    credentials_version: int
    full: bool = False
    """The log did not reach back to the version held (or too much changed): reload all."""
    batmons: dict[int, dict[str, Any] | None] = field(default_factory=dict)
    """Changed batmons' rows (None: deleted); with ``full``, every batmon."""
    alarms: dict[int, dict[str, Any] | None] = field(default_factory=dict)
    banks: list[dict[str, Any]] | None = None
    """Every bank (as ``store.banks()``), when one changed; else None."""
    users: bool = False
    current: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Rows of the batmons asked for (their latest values), those that exist."""


# One round trip when nothing changed: both versions and the rows asked for.
_CHECK = (
    "SELECT (SELECT version FROM config_version WHERE id = 1),"
    " (SELECT version FROM credentials_version WHERE id = 1),"
    " (SELECT coalesce(json_agg(b), '[]'::json) FROM batmons b WHERE b.id = ANY(%s))"
)


class PgPeerReads(OwnConnection):
    """The checks of one worker, on a connection of its own (one thread at a time)."""

    def versions(self) -> tuple[int, int]:
        """(config version, credentials version) now; OSError when the database cannot be read."""
        changes = self.check(None, [])
        return changes.version, changes.credentials_version

    def check(self, known: int | None, batmon_ids: Sequence[int]) -> Changes:
        """Everything changed after version ``known`` (None: nothing wanted) and the rows of
        ``batmon_ids``; OSError when the database cannot be read."""
        try:
            return self._check(self._connection(), known, list(batmon_ids))
        except StorageFailed as exc:  # the store's listing of banks
            raise OSError(f"cannot read other workers' changes: {exc.message}") from None
        except psycopg.Error as exc:
            raise OSError(f"cannot read other workers' changes: {one_line(exc, self._url)}") from None

    def _check(self, conn: psycopg.Connection[Any], known: int | None, ids: list[int]) -> Changes:
        version, credentials, rows = conn.execute(_CHECK, (ids,)).fetchone() or (0, 0, [])
        changes = Changes(int(version), int(credentials or 0))
        changes.current = {row["id"]: row for row in rows}
        if known is None or version == known:
            return changes
        logged = conn.execute("SELECT version, kind, id FROM config_changes WHERE version > %s"
                              " AND version <= %s ORDER BY version LIMIT %s",
                              (known, version, LOG_LIMIT + 1)).fetchall()  # fmt: skip
        if version < known or len(logged) > LOG_LIMIT or not logged or logged[0][0] != known + 1:
            changes.full = True  # pruned past us, or a database made anew
            changes.batmons = {r["id"]: r for r in _rows(conn, "SELECT * FROM batmons", ())}
            changes.alarms = {r["id"]: r for r in _rows(conn, "SELECT * FROM alarms", ())}
            changes.banks, changes.users = PostgresStore(self._url, conn).banks(), True
            return changes
        kinds: dict[str, set[int]] = {}
        for _, kind, changed in logged:
            kinds.setdefault(kind, set()).add(changed)
        if batmon_ids := sorted(kinds.get("batmon", ())):
            found = {r["id"]: r for r in _rows(conn, "SELECT * FROM batmons WHERE id = ANY(%s)",
                                               (batmon_ids,))}  # fmt: skip
            changes.batmons = {i: found.get(i) for i in batmon_ids}
        if alarm_ids := sorted(kinds.get("alarm", ())):
            found = {r["id"]: r for r in _rows(conn, "SELECT * FROM alarms WHERE id = ANY(%s)",
                                               (alarm_ids,))}  # fmt: skip
            changes.alarms = {i: found.get(i) for i in alarm_ids}
        if "bank" in kinds:
            changes.banks = PostgresStore(self._url, conn).banks()
        changes.users = "user" in kinds
        if version % 1000 == 0:  # now and then, one worker trims the log
            conn.execute("DELETE FROM config_changes WHERE version <= %s", (version - KEEP_VERSIONS,))
        return changes

    def current_rows(self, batmon_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """The rows (latest values) of these batmons, those that exist; OSError when unreadable."""
        return self.check(None, batmon_ids).current

    def first_to_send(self, batmon_id: int, digest: str) -> bool:
        """True for the one worker whose record of this config's digest changes it (it sends)."""
        return self._claim("INSERT INTO discovery_sent (batmon_id, digest) VALUES (%s, %s)"
                           " ON CONFLICT (batmon_id) DO UPDATE SET digest = excluded.digest"
                           " WHERE discovery_sent.digest <> excluded.digest RETURNING 1",
                           (batmon_id, digest))  # fmt: skip

    def take_turn(self, name: str, every_s: float) -> bool:
        """True for the one worker taking the turn ``name`` (at most once per ``every_s``, on
        the database's clock)."""
        return self._claim("INSERT INTO shared_turns (name, at)"
                           " VALUES (%s, extract(epoch FROM clock_timestamp()))"
                           " ON CONFLICT (name) DO UPDATE SET at = excluded.at"
                           " WHERE shared_turns.at <= excluded.at - %s RETURNING 1",
                           (name, every_s))  # fmt: skip

    def record_sent(self, digests: Sequence[tuple[int, str]]) -> None:
        """These configs went out (a re-send): what a later change is compared with."""
        if digests:
            self._claim("INSERT INTO discovery_sent (batmon_id, digest)"
                        " SELECT * FROM unnest(%s::bigint[], %s::text[])"
                        " ON CONFLICT (batmon_id) DO UPDATE SET digest = excluded.digest RETURNING 1",
                        ([d[0] for d in digests], [d[1] for d in digests]))  # fmt: skip

    def _claim(self, sql: str, params: Sequence[Any]) -> bool:
        try:
            return self._connection().execute(sql.encode(), params).fetchone() is not None
        except psycopg.Error as exc:
            raise OSError(f"cannot share the discovery turn: {one_line(exc, self._url)}") from None



def _rows(conn: psycopg.Connection[Any], sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql.encode(), params)  # sql: this module's own statements
        return cur.fetchall()


class PgListener:
    """LISTENs on both channels on a connection of its own, in a thread of its own.

    ``on_config(version)`` and ``on_readings(batmon_ids)`` are called on that thread (the
    caller hands them to its loop); ``on_reconnect()`` after each (re)connection, since a
    notification sent while nobody listened is lost: the caller checks the log then.
    """

    def __init__(self, url: str, on_config: Callable[[int], None], on_readings: Callable[[list[int]], None],
                 on_reconnect: Callable[[], None]) -> None:  # fmt: skip
        self._url = url
        self._on_config = on_config
        self._on_readings = on_readings
        self._on_reconnect = on_reconnect
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection[Any] | None = None
        self.listening = threading.Event()

    def start(self) -> None:
        """Connect and LISTEN now (raises OSError if that fails), then wait on the thread."""
        self._conn = self._listen()
        self._thread = threading.Thread(target=self._run, name="peer-listener", daemon=True)
        self._thread.start()

    def _listen(self) -> psycopg.Connection[Any]:
        try:
            conn = connect(self._url)
            conn.execute(f"LISTEN {CONFIG_CHANNEL}")
            conn.execute(f"LISTEN {READINGS_CHANNEL}")
        except psycopg.Error as exc:
            raise OSError(f"cannot listen for other workers: {one_line(exc, self._url)}") from None
        self.listening.set()
        return conn

    def _run(self) -> None:
        while not self._stop.is_set():
            conn = self._conn
            try:
                if conn is None or conn.closed or conn.broken:
                    self.listening.clear()
                    self._conn = conn = self._listen()
                    self._on_reconnect()
                for note in conn.notifies(timeout=0.5):
                    if note.channel == READINGS_CHANNEL:
                        ids = parse_readings_notice(note.payload)
                        if ids:
                            self._on_readings(ids)
                    else:
                        self._on_config(int(note.payload) if note.payload.isdigit() else 0)
            except (OSError, psycopg.Error) as exc:
                if self._conn is not None and not self._conn.broken:
                    with contextlib.suppress(psycopg.Error):
                        self._conn.close()
                log.warning("listening for other workers failed (retrying): %s", exc)
                self._stop.wait(RECONNECT_S)

    def stop(self) -> None:
        """End the thread (within half a second) and close the connection."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None
