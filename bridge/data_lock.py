"""One batmon process owns a data folder at a time: `serve` for as long as it runs,
`restore` while it swaps the database file.

The owner holds an exclusive ``flock`` on ``serve.lock`` in the folder and writes its PID
there. The kernel drops the lock when the process ends, kill -9 included, so a crash
never leaves a stale lock behind; the PID is only there to name the owner.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from bridge.datadir import FILE_MODE, prepare_data_dir

LOCK_FILENAME = "serve.lock"


class DataDirInUse(RuntimeError):
    """Another process holds the data folder."""

    def __init__(self, data_dir: Path, pid: int | None) -> None:
        who = f"batmon process PID {pid}" if pid else "another batmon process"
        super().__init__(f"data folder {data_dir} is in use by {who}; stop it first")
        self.pid = pid


class DataDirLock:
    """A held lock; ``release`` (or the process's end) gives the folder back."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def lock_data_dir(data_dir: Path) -> DataDirLock:
    """Take the data folder (creating it 0700), or raise DataDirInUse naming the holder's PID.

    Raises OSError when the folder or the lock file cannot be made.
    """
    prepare_data_dir(data_dir)
    fd = os.open(data_dir / LOCK_FILENAME, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _read_pid(fd)
        os.close(fd)
        raise DataDirInUse(data_dir, pid) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return DataDirLock(fd)


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None
