"""`CredentialWatcher`: a running server honours `batmon user ...` commands at once.

The CLI changes keys and tokens in the database from another process. Triggers bump one
counter row on every such change (bridge/store/schema.py, migration 4); this extension
reads that row once a second on a dedicated read connection, off the event loop, and
when it moved, reloads every key and token into the core and emits CredentialsChanged
(the embedded broker then closes sessions whose secret is gone). Why a counter and not
SQLite's ``data_version``: see docs/DESIGN.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from bridge.core import Core, changed_credentials
from bridge.store.credentials import CredentialReader
from bridge.store.interface import CredentialReads
from bridge.threads import run_on_own_thread

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 1.0


class CredentialPoll(CredentialReads, Protocol):
    """A dedicated read connection for the poll (SQLite's CredentialReader, PostgreSQL's
    PgCredentialReader): it raises OSError while the database cannot be read."""

    def close(self) -> None: ...


class CredentialWatcher:
    """Polls the credential change counter and reloads the core's keys and tokens."""

    def __init__(self, core: Core, database: Path, interval_s: float = POLL_INTERVAL_S,
                 open_reader: Callable[[], CredentialPoll] | None = None) -> None:  # fmt: skip
        self._core = core
        self._database = database
        # Another store's reader (PostgreSQL's), else one on the SQLite file at ``database``.
        self._open_reader = open_reader or (lambda: CredentialReader(database))
        self._interval_s = interval_s
        self._reader: CredentialPoll | None = None
        self._task: asyncio.Task[None] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._failing = False

    async def start(self) -> None:
        """Begin polling (the core loaded its credentials at start)."""
        self._reader = self._open_reader()
        # One thread of its own for the polls, closed at stop (asyncio's default executor
        # would keep its threads after the service stopped).
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="credential-watcher")
        self._task = asyncio.create_task(self._run(self._reader), name="credential-watcher")

    async def stop(self) -> None:
        """Stop polling and close the read connection."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        reader, self._reader = self._reader, None
        if reader is not None:
            await run_on_own_thread(reader.close, name="credential-watcher-close")
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)  # idle once the task is cancelled: its thread ends now

    async def _run(self, reader: CredentialPoll) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.check_now(reader)
            except Exception:  # a bug must not end the polling for the rest of the run
                log.exception("checking for credential changes failed")

    async def check_now(self, reader: CredentialPoll | None = None) -> bool:
        """Poll once; True when the credentials changed and were reloaded."""
        reader = reader or self._reader
        if reader is None:
            return False
        known = self._core.credentials_version
        try:
            if self._pool is not None:
                maps = await asyncio.get_running_loop().run_in_executor(
                    self._pool, changed_credentials, reader, known)
            else:  # polled by hand, not started
                maps = await run_on_own_thread(lambda: changed_credentials(reader, known),
                                               name="credential-watcher-poll")
        except OSError as exc:
            if not self._failing:  # once per outage, not once a second
                log.warning("cannot read credential changes (keys and tokens stay as they were): %s", exc)
            self._failing = True
            return False
        self._failing = False
        return self._core.adopt_credentials(maps)
