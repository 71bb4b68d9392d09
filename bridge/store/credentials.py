"""Named queries over credentials: api key resets, users' MQTT tokens, and the change
counter a running server polls to honour `batmon user ...` commands at once.

Self-contained (its own tables, migration 4 in schema.py): ``SqliteStore.credentials``
is interface.py's ``Credentials``; the PostgreSQL store's are in pg_credentials.py.
Secrets are never stored, only their SHA-256 (bridge/security.py).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge.store.interface import CredentialRows
from bridge.store.sqlite_errors import translated

if TYPE_CHECKING:
    from bridge.store.db import SqliteStore

__all__ = ["CredentialReader", "CredentialRows", "SqliteCredentials", "load_rows"]


class SqliteCredentials:
    """interface.py's ``Credentials`` on one SQLite handle; every method is one query or transaction."""

    def __init__(self, store: SqliteStore) -> None:
        self.db = store.db

    @translated
    def set_api_key_hash(self, user_id: int, api_key_hash: str) -> None:
        """Replace a user's api key (the old one stops matching anything)."""
        with self.db.atomic():
            self.db.execute("UPDATE users SET api_key_hash = ? WHERE id = ?", (api_key_hash, user_id))

    @translated
    def add_token(self, user_id: int, name: str, secret_hash: str, created: float) -> bool:
        """Insert a token; False (nothing written) if the user has one of that name."""
        with self.db.atomic():
            cur = self.db.execute(
                "INSERT OR IGNORE INTO user_tokens (user_id, name, secret_hash, created)"
                " VALUES (?, ?, ?, ?)",
                (user_id, name, secret_hash, created),
            )
        return cur.rowcount > 0

    @translated
    def tokens_of(self, user_id: int) -> list[dict[str, Any]]:
        """The user's tokens (name, created), oldest first; never their hashes."""
        return list(self.db.query(
            "SELECT name, created FROM user_tokens WHERE user_id = ? ORDER BY created, id", [user_id]
        ))  # fmt: skip

    @translated
    def revoke_token(self, user_id: int, name: str) -> bool:
        """Delete the user's token of that name; False if there is none."""
        with self.db.atomic():
            cur = self.db.execute(
                "DELETE FROM user_tokens WHERE user_id = ? AND name = ?", (user_id, name)
            )
        return cur.rowcount > 0

    @translated
    def version(self) -> int:
        """The change counter."""
        return _version(self.db.conn)

    @translated
    def load(self) -> CredentialRows:
        """Every credential, on this store's connection."""
        return load_rows(self.db.conn)


class CredentialReader:
    """A dedicated read-only connection for the server's poll, used from one thread at a time.

    Never on the event loop: the poll runs it on the watcher's own thread.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._conn: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            # check_same_thread off: used on the watcher's thread, closed at stop on another.
            self._conn = sqlite3.connect(f"file:{self._path}?mode=ro", uri=True, timeout=5,
                                         check_same_thread=False, isolation_level=None)  # fmt: skip
        return self._conn

    def version(self) -> int:
        """The change counter: it moves on every change of a user's key or of a token.

        Raises OSError when the database cannot be read (callers need not know SQLite).
        """
        try:
            return _version(self._connection())
        except sqlite3.Error as exc:
            raise OSError(f"cannot read credentials: {exc}") from None

    def load(self) -> CredentialRows:
        """Every credential, read in one transaction (consistent with its version); OSError
        when the database cannot be read."""
        try:
            return load_rows(self._connection())
        except sqlite3.Error as exc:
            raise OSError(f"cannot read credentials: {exc}") from None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _version(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT version FROM credentials_version WHERE id = 1").fetchone()
    return int(row[0]) if row else 0


def load_rows(conn: sqlite3.Connection) -> CredentialRows:
    """Version, users and tokens in one read transaction."""
    in_transaction = conn.in_transaction
    if not in_transaction:
        conn.execute("BEGIN")
    try:
        version = _version(conn)
        users = [dict(zip(("id", "email", "api_key_hash"), row, strict=True))
                 for row in conn.execute("SELECT id, email, api_key_hash FROM users")]  # fmt: skip
        tokens = [dict(zip(("user_id", "secret_hash"), row, strict=True))
                  for row in conn.execute("SELECT user_id, secret_hash FROM user_tokens")]  # fmt: skip
    finally:
        if not in_transaction:
            conn.execute("COMMIT")
    return CredentialRows(version, users, tokens)
