"""The data folder holds secrets (device tokens are MQTT passwords, Apprise URLs carry
passwords, session.key signs cookies), so it and its files are private to the user
running batmon: the folder is created 0700 and every file in it is kept 0600.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600
# SQLite creates these beside the database with the database file's mode.
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


def prepare_data_dir(path: Path) -> None:
    """Create the folder 0700; an existing one is left as it is, with a warning if others
    may enter it (it may be shared on purpose, or be /tmp): its files are 0600 anyway."""
    if not path.exists():
        path.mkdir(mode=DIR_MODE, parents=True)
        os.chmod(path, DIR_MODE)  # mkdir's mode is filtered by the umask
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("data folder %s is mode %03o: other users can list it (its files are 0600)",
                    path, mode)  # fmt: skip


def private_file(path: Path) -> None:
    """Make sure ``path`` exists, is writable by us and by nobody else: create it 0600,
    or take group/other permissions off an existing one.

    Raises OSError when the file cannot be opened for writing (a read-only folder, a
    directory where the file should be), so a read-only data folder is one clear error
    and never a SQLite traceback later.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o077:
            os.fchmod(fd, mode & ~0o077)
            log.warning("%s was mode %03o; now %03o", path, mode, mode & ~0o077)
    finally:
        os.close(fd)


def private_database(path: Path) -> None:
    """The database file and whatever companions SQLite left beside it, all 0600."""
    private_file(path)
    for suffix in SQLITE_COMPANIONS:
        companion = path.with_name(path.name + suffix)
        if companion.exists():
            private_file(companion)
