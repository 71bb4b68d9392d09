"""PostgreSQL for tests. The machine's: one fresh database per test session, dropped at the end.
A private one (``PrivatePostgres``): a server of a test's own, for fault tests that stop it.

``BATMON_TEST_PG_ADMIN`` names the server (default: the machine's, trust auth, user
postgres). Unreachable is a failure that says so, never a skip: `.ci/run` installs and
starts PostgreSQL first.
"""

from __future__ import annotations

import os
import pwd
import random
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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


# -- a private server ------------------------------------------------------------------------------
class PrivatePostgres:
    """A PostgreSQL server of a test's own, on a free port, in a fresh folder under /tmp: the
    binaries `pg_config --bindir` names (initdb, pg_ctl), so a test may stop, start or kill it
    while the machine's PostgreSQL is never touched.

    initdb refuses to run as root; as root every command runs as user ``postgres``
    (``runuser``), in a folder it owns (pytest's tmp_path is root's, closed to others).
    fsync is off: the faults tried here are the server's process stopping, not the machine's.
    """

    def __init__(self) -> None:
        self.bindir = _bindir()
        self.port = _lasting_port()
        self.folder = Path(tempfile.mkdtemp(prefix="batmon-pg-"))
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        self._as: list[str] = []
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                owner = None
            if runuser is None or owner is None:
                pytest.fail("a private PostgreSQL needs a non-root user: as root, user `postgres`"
                            " and runuser (Debian's postgresql and util-linux)", pytrace=False)  # fmt: skip
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
            self._as = [runuser, "-u", "postgres", "--"]

    def _run(self, tool: str, *args: str, timeout: float = 120) -> None:
        done = subprocess.run([*self._as, str(self.bindir / tool), *args], capture_output=True, text=True,
                              timeout=timeout, cwd=self.folder)  # fmt: skip
        if done.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise AssertionError(f"{tool} {args[:3]} failed: {done.stderr.strip()[-2000:]}\n{log}")

    def init(self) -> PrivatePostgres:
        """An empty cluster: superuser postgres, trust auth (it listens on 127.0.0.1 only)."""
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        return self

    def start(self) -> PrivatePostgres:
        """Start it and return once it accepts connections."""
        options = (f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
                   " -c shared_buffers=16MB -c max_connections=40")  # fmt: skip
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60",
                  "start")  # fmt: skip
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop it (pg_ctl's modes: smart, fast, immediate); returns once it is down."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    @property
    def running(self) -> bool:
        status = subprocess.run([*self._as, str(self.bindir / "pg_ctl"), "-D", str(self.data), "status"],
                                capture_output=True, timeout=30)  # fmt: skip
        return status.returncode == 0

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str = "batmon") -> str:
        """A new database on it; its URL."""
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as admin:
            admin.execute(f"CREATE DATABASE {name}".encode())  # name: the test's
        return self.url(name)

    def close(self) -> None:
        """Stop it (immediately) if it runs, and remove its folder."""
        if self.data.exists() and self.running:
            self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """A started private server, stopped and removed at the end."""
    server = PrivatePostgres()
    try:
        yield server.init().start()
    finally:
        server.close()


def _lasting_port() -> int:
    """A free port below the kernel's ephemeral range: while the server is stopped, no outgoing
    connection (nor another test's bind to port 0) takes it, so it can start there again."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(100):
        port = random.randrange(10_000, low)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port between 10000 and {low}")


def _bindir() -> Path:
    """Where initdb and pg_ctl are (`pg_config --bindir`); a failure that says so if not."""
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        pytest.fail("pg_config is not on PATH: a private PostgreSQL needs its initdb and pg_ctl (Debian:"
                    " postgresql; `.ci/run` installs it)", pytrace=False)  # fmt: skip
    found = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True)
    bindir = Path(found.stdout.strip())
    if not (bindir / "initdb").exists():
        pytest.fail(f"no initdb in {bindir} (`pg_config --bindir`): install the PostgreSQL server",
                    pytrace=False)  # fmt: skip
    return bindir
