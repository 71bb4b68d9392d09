"""The writer's side of the SQLite store: a store handle on its own connection.

The writer needs ``ReadingSink`` (bridge/store/interface.py) for readings and the rest
of ``Store`` for the control-plane writes it runs in order with them; so its sink is
simply a second ``SqliteStore`` handle.
"""

from __future__ import annotations

from pathlib import Path

from bridge.store.db import SqliteStore
from bridge.store.interface import CurrentUpdate, ReadingRow, ReadingSink

__all__ = ["CurrentUpdate", "ReadingRow", "ReadingSink", "SqliteReadingSink"]


class SqliteReadingSink(SqliteStore):
    """A store handle of its own on ``path`` (the file must exist and be migrated)."""

    def __init__(self, path: Path, *, synchronous: str = "NORMAL") -> None:
        super().__init__(self._connect(path, synchronous), path)
