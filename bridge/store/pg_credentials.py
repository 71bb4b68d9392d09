"""Credentials on PostgreSQL: interface.py's ``Credentials`` (api key resets, users'
MQTT tokens, the change counter a running server polls), on a ``PostgresStore``.

Same tables and rule as on SQLite (its migration 5, ours 2): every change of a user's key or
of a token bumps ``credentials_version`` by trigger, whichever process makes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import psycopg

from bridge.store.interface import CredentialRows
from bridge.store.pg_store import OwnConnection, one_line, translated

if TYPE_CHECKING:
    from bridge.store.pg_store import PostgresStore


class PgCredentials:
    """Writes and listings of credentials on one store handle; each method is one transaction."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self.url = store.url  # for the error translation's redaction

    @translated
    def set_api_key_hash(self, user_id: int, api_key_hash: str) -> None:
        """Replace a user's api key (the old one stops matching anything)."""
        with self.store._transaction() as conn:
            conn.execute("UPDATE users SET api_key_hash = %s WHERE id = %s", (api_key_hash, user_id))

    @translated
    def add_token(self, user_id: int, name: str, secret_hash: str, created: float) -> bool:
        """Insert a token; False (nothing written) if the user has one of that name."""
        with self.store._transaction() as conn:
            return conn.execute("INSERT INTO user_tokens (user_id, name, secret_hash, created)"
                                " VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                                (user_id, name, secret_hash, created)).rowcount > 0  # fmt: skip

    @translated
    def tokens_of(self, user_id: int) -> list[dict[str, Any]]:
        """The user's tokens (name, created), oldest first; never their hashes."""
        return self.store._rows("SELECT name, created FROM user_tokens WHERE user_id = %s"
                                " ORDER BY created, id", (user_id,))  # fmt: skip

    @translated
    def revoke_token(self, user_id: int, name: str) -> bool:
        """Delete the user's token of that name; False if there is none."""
        with self.store._transaction() as conn:
            return conn.execute("DELETE FROM user_tokens WHERE user_id = %s AND name = %s",
                                (user_id, name)).rowcount > 0  # fmt: skip

    @translated
    def version(self) -> int:
        """The change counter."""
        return _version(self.store._conn)

    @translated
    def load(self) -> CredentialRows:
        """Every credential (at start, on this store's connection)."""
        return load_rows(self.store._conn)


class PgCredentialReader(OwnConnection):
    """The server's poll of the change counter, on a connection of its own (one thread at a time)."""

    def version(self) -> int:
        """The change counter; OSError when the database cannot be read."""
        try:
            return _version(self._connection())
        except psycopg.Error as exc:
            raise OSError(f"cannot read credentials: {one_line(exc, self._url)}") from None

    def load(self) -> CredentialRows:
        """Every credential, consistent with its version; OSError when the database cannot be read."""
        try:
            return load_rows(self._connection())
        except psycopg.Error as exc:
            raise OSError(f"cannot read credentials: {one_line(exc, self._url)}") from None


def _version(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT version FROM credentials_version WHERE id = 1").fetchone()
    return int(row[0]) if row else 0


def load_rows(conn: psycopg.Connection[Any]) -> CredentialRows:
    """Version, users and tokens from one snapshot (REPEATABLE READ)."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        version = _version(conn)
        users = [dict(zip(("id", "email", "api_key_hash"), r, strict=True))
                 for r in conn.execute("SELECT id, email, api_key_hash FROM users")]  # fmt: skip
        tokens = [dict(zip(("user_id", "secret_hash"), r, strict=True))
                  for r in conn.execute("SELECT user_id, secret_hash FROM user_tokens")]  # fmt: skip
    return CredentialRows(version, users, tokens)
