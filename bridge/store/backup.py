"""Backup and restore of the SQLite file, safe while `batmon serve` writes to it.

A backup is one read transaction: in WAL mode the writer keeps committing beside it, and
the copy holds exactly what was committed when it began. SQLite's backup API in steps
is no use here: any write by another connection restarts it from the first page, and
under a steady ingest it never ends (measured: 3,000 steps of 1,000 pages without
finishing a 10,000-page file while another connection inserted 500 rows/s). So the copy
is made in one step (``online``) or with ``VACUUM INTO`` (``compact``: a smaller file,
rebuilt page by page, more CPU). Both write beside the target and rename at the end, so
a failed backup never leaves a half file under the name asked for.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from bridge.datadir import FILE_MODE, SQLITE_COMPANIONS, prepare_data_dir
from bridge.store.schema import LATEST


class BackupError(RuntimeError):
    """A backup or restore that cannot be done; the message is one line for the user."""


@dataclass(frozen=True)
class BackupDone:
    """What a backup wrote."""

    path: Path
    size_bytes: int
    seconds: float
    schema_version: int


def backup_database(source: Path, target: Path, *, compact: bool = False) -> BackupDone:
    """Copy the database at ``source`` to ``target`` (created 0600), checked before it is named."""
    if not source.is_file():
        raise BackupError(f"no database at {source}")
    if target.exists():
        raise BackupError(f"{target} exists; remove it or choose another name")
    partial = target.with_name(target.name + ".partial")
    started = time.monotonic()
    _new_private_file(partial)
    try:
        src = sqlite3.connect(str(source), timeout=30)
        try:
            if compact:
                src.execute("VACUUM INTO ?", (str(partial),))
            else:
                _copy(src, partial)
        finally:
            src.close()
        version = check_database(partial)
        _fsync(partial)
        os.replace(partial, target)
        _fsync(target.parent)
    except sqlite3.Error as exc:
        raise BackupError(f"cannot back up {source}: {exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    return BackupDone(target, target.stat().st_size, time.monotonic() - started, version)


def check_database(path: Path) -> int:
    """The schema version of a sound batmon database at ``path``, else BackupError saying why.

    Sound: SQLite's integrity check passes, it has our schema_version table, and its
    version is not newer than this release (an older one is migrated when serve opens it).
    """
    if not path.is_file():
        raise BackupError(f"no file at {path}")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as exc:
        raise BackupError(f"cannot open {path}: {exc}") from None
    try:
        problems = [row[0] for row in conn.execute("PRAGMA integrity_check")]
        if problems != ["ok"]:
            # SQLite's first problem may span lines ("*** in database main ***\nOn tree page 3..."):
            # the CLI's answer is one line.
            first = " ".join(problems[0].split())
            raise BackupError(f"{path} fails SQLite's integrity check: {first}")
        try:
            version = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0]
        except sqlite3.OperationalError:
            raise BackupError(f"{path} is not a batmon database (no schema_version table)") from None
    except sqlite3.DatabaseError as exc:  # "file is not a database", malformed pages
        raise BackupError(f"{path} is not a sound SQLite database: {exc}") from None
    finally:
        conn.close()
    if not isinstance(version, int) or version < 1:
        raise BackupError(f"{path} is not a batmon database (no schema version recorded)")
    if version > LATEST:
        raise BackupError(f"{path} was written by a newer batmon (schema {version}; this release"
                          f" knows up to {LATEST}): upgrade batmon to restore it")  # fmt: skip
    return version


def restore_database(backup: Path, database: Path) -> Path | None:
    """Replace ``database`` with a checked copy of ``backup``; the file replaced is kept beside,
    renamed ``<name>.replaced-<UTC time>``, and its path returned (None if there was none).

    The caller must hold the data folder (no server may have the file open).
    """
    check_database(backup)  # before anything is touched
    prepare_data_dir(database.parent)
    incoming = database.with_name(database.name + ".restoring")
    with contextlib.suppress(FileNotFoundError):
        incoming.unlink()  # left by an interrupted restore
    _new_private_file(incoming)
    try:
        src = sqlite3.connect(f"file:{backup}?mode=ro", uri=True, timeout=30)
        try:
            _copy(src, incoming)
        finally:
            src.close()
        check_database(incoming)  # what lands is what was checked
        _fsync(incoming)
        replaced = _set_aside(database) if database.exists() else None
        os.replace(incoming, database)
        _fsync(database.parent)
    except sqlite3.Error as exc:
        raise BackupError(f"cannot restore {backup}: {exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            incoming.unlink()
    return replaced


def _copy(src: sqlite3.Connection, target: Path) -> None:
    """Copy in one step (one snapshot), then make the copy a single self-contained file."""
    dst = sqlite3.connect(str(target))
    try:
        src.backup(dst)  # pages=-1: every page in one step; see the module docstring
        dst.execute("PRAGMA journal_mode=DELETE")
    finally:
        dst.close()


def _set_aside(database: Path) -> Path:
    """Rename the current file (and any WAL beside it, paired by name) out of the way."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = database.with_name(f"{database.name}.replaced-{stamp}")
    n = 1
    while aside.exists():  # two restores in one second: never overwrite what was set aside
        aside, n = database.with_name(f"{database.name}.replaced-{stamp}-{n}"), n + 1
    with contextlib.suppress(sqlite3.Error):
        # Fold the WAL in, so the file set aside stands alone; if it cannot be (a damaged
        # file), the companions move with it under the names SQLite looks for.
        conn = sqlite3.connect(str(database), timeout=30)
        try:
            conn.execute("PRAGMA journal_mode=DELETE")
        finally:
            conn.close()
    os.replace(database, aside)
    for suffix in SQLITE_COMPANIONS:
        companion = database.with_name(database.name + suffix)
        if companion.exists():
            # A stale WAL left beside the restored file would be replayed into it.
            os.replace(companion, aside.with_name(aside.name + suffix))
    return aside


def _new_private_file(path: Path) -> None:
    """An empty file only we can read: SQLite writes into it and keeps its mode."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE))
    os.chmod(path, FILE_MODE)  # an existing file keeps its mode through O_CREAT


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
