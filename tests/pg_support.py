"""The machine's PostgreSQL for tests: one fresh database per test session, dropped at the end.

``BATMON_TEST_PG_ADMIN`` names the server (default: the machine's, trust auth, user
postgres). Unreachable is a failure that says so, never a skip: `.ci/run` installs and
starts PostgreSQL first.
"""

from __future__ import annotations

import os
import secrets
import threading

import psycopg
import pytest

from bridge.store.pg_store import PostgresStore

ADMIN_URL = os.environ.get("BATMON_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")

_lock = threading.Lock()
_database: str | None = None


def _admin() -> psycopg.Connection:
    try:
        return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {ADMIN_URL} ({str(exc).strip()[:200]}); `.ci/run`"
                    " installs and starts it (or set BATMON_TEST_PG_ADMIN)", pytrace=False)  # fmt: skip


def database_url(name: str) -> str:
    """The URL of database ``name`` on the admin URL's server."""
    return ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def session_database_url() -> str:
    """A database made for this test session (on first use), empty but for what tests write."""
    global _database
    with _lock:
        if _database is None:
            name = f"batmon_test_{secrets.token_hex(6)}"
            with _admin() as admin:
                admin.execute(f"CREATE DATABASE {name}")  # name: ours, hex only
            _database = name
        return database_url(_database)


def fresh_database_url() -> str:
    """Another new database of this session (tests of migrations on an empty database)."""
    name = f"batmon_test_{secrets.token_hex(6)}"
    with _admin() as admin:
        admin.execute(f"CREATE DATABASE {name}")
    _extra.append(name)
    return database_url(name)


_extra: list[str] = []


def drop_session_databases() -> None:
    """Drop what this session made (pytest_sessionfinish); open connections are cut."""
    global _database
    names = [*_extra, *([_database] if _database else [])]
    if not names:
        return
    with _admin() as admin:
        for name in names:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    _database = None
    _extra.clear()


def clean_store() -> PostgresStore:
    """A migrated store on the session database with every table emptied."""
    store = PostgresStore.open(session_database_url())
    store.truncate_all_for_tests()
    return store
