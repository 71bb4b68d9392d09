"""The data folder holds secrets (device tokens, Apprise URLs, the cookie key): it is
private to the user running batmon, and a folder batmon cannot write is one clear line,
never a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from batmon.service import session_secret
from bridge.store.db import DB_FILENAME, Store
from tests.conftest import ServeProcess
from tests.support import batmon


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def test_serve_makes_the_data_folder_0700_and_every_file_in_it_0600(
    serve: ServeProcess,
) -> None:
    # Under a umask that would leave everything open: the modes must be set explicitly.
    with umask(0):
        serve.start()
    data = serve.data_dir
    assert serve.admin_key  # a user was written, so the WAL is in use
    files = {p.name: mode(p) for p in data.iterdir()}
    assert mode(data) == 0o700
    assert {DB_FILENAME, f"{DB_FILENAME}-wal", f"{DB_FILENAME}-shm", "session.key"} <= set(files)
    assert set(files.values()) == {0o600}, files


def test_files_left_readable_by_an_older_version_are_made_0600(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)
    db = data / DB_FILENAME
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    (data / "session.key").write_bytes(os.urandom(32))
    for name in (DB_FILENAME, f"{DB_FILENAME}-wal", f"{DB_FILENAME}-shm", "session.key"):
        os.chmod(data / name, 0o644)
    with caplog.at_level(logging.WARNING):
        Store.open(db).close()
        session_secret(data)
    files = {p.name: mode(p) for p in data.iterdir()}  # the -wal and -shm live while conn does
    conn.close()
    assert {DB_FILENAME, f"{DB_FILENAME}-wal", f"{DB_FILENAME}-shm", "session.key"} <= set(files)
    assert set(files.values()) == {0o600}, files
    # An existing folder is the operator's: left as it is, with a warning.
    assert mode(data) == 0o755
    assert any("other users can list it" in r.getMessage() for r in caplog.records)


def test_user_add_on_a_new_folder_makes_it_private(tmp_path: Path) -> None:
    data = tmp_path / "new" / "data"
    result = batmon("user", "add", "a@example.org", "--data-dir", str(data))
    assert result.returncode == 0, result.stderr
    assert mode(data) == 0o700
    assert all(mode(p) == 0o600 for p in data.iterdir()), {p.name: mode(p) for p in data.iterdir()}


# -- a data folder batmon cannot write ----------------------------------------------


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture(params=["empty", "with-database"])
def read_only_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A folder nobody, root included, can write: a read-only tmpfs when we are root
    (root ignores file modes), else a 0500 folder."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        if request.param == "with-database":
            Store.open(folder / DB_FILENAME).close()
        os.chmod(folder, 0o500)
        yield folder
        os.chmod(folder, 0o700)
        return
    if not _mount("-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(folder)):
        pytest.fail("root, and no tmpfs can be mounted here: no way to make a read-only folder")
    try:
        if request.param == "with-database":
            store = Store.open(folder / DB_FILENAME)
            store.add_user("ro@example.org", "0" * 64, 0.0)
            store.close()
        assert _mount("-o", "remount,ro", str(folder))
        with pytest.raises(OSError):
            (folder / "probe").write_text("x")  # really read-only, for root too
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


def _one_clear_line(result: subprocess.CompletedProcess[str], command: str) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"batmon {command}: cannot use data folder"), lines
    return lines[0]


def test_user_list_on_a_read_only_folder_is_one_clear_line(read_only_dir: Path) -> None:
    result = batmon("user", "list", "--data-dir", str(read_only_dir))
    line = _one_clear_line(result, "user")
    assert "Read-only file system" in line or "Permission denied" in line, line


def test_serve_on_a_read_only_folder_is_one_clear_line(read_only_dir: Path) -> None:
    result = batmon("serve", "--data-dir", str(read_only_dir), "--http-port", "0", "--mqtt-port", "0")
    line = _one_clear_line(result, "serve")
    assert "Read-only file system" in line or "Permission denied" in line, line


def test_a_folder_where_the_database_file_should_be_is_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / DB_FILENAME).mkdir()
    for command in (["user", "list"], ["serve", "--http-port", "0", "--mqtt-port", "0"]):
        result = batmon(*command, "--data-dir", str(tmp_path))
        assert "Is a directory" in _one_clear_line(result, command[0])
