"""Upgrades never lose data (issue 19, acceptance 4): a database made by each earlier release,
committed under tests/fixtures/databases/ (how: the README there), opens with this release's
code, migrated, with every user, batmon, alarm, reading and notice still there; a database
from a newer release is refused with one clear line.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.core import Core
from bridge.events import EventBus
from bridge.store.db import Store
from bridge.store.outbox import Outbox
from bridge.store.schema import LATEST
from tests.support import batmon

FIXTURES = Path(__file__).parent / "fixtures" / "databases"
EARLIER = range(1, LATEST)


def installed_copy(version: int, tmp_path: Path) -> Path:
    """The fixture copied into a data folder (the committed file is never opened for writing)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700, parents=True)
    shutil.copyfile(FIXTURES / f"v{version}.sqlite3", data_dir / "batmon.sqlite3")
    (data_dir / "batmon.sqlite3").chmod(0o600)  # as the data folder keeps it
    return data_dir


@pytest.fixture
def opened(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Core, dict[str, Any]]]:
    version = request.param
    expected = json.loads((FIXTURES / f"v{version}.expected.json").read_text())
    assert expected["schema_version"] == version
    store = Store.open(installed_copy(version, tmp_path) / "batmon.sqlite3")
    core = Core(store, EventBus()).load()
    yield core, expected
    core.close_history()
    store.close()


def test_every_earlier_schema_version_has_a_committed_database(tmp_path: Path) -> None:
    committed = {int(p.stem.removeprefix("v")) for p in FIXTURES.glob("v*.sqlite3")}
    assert committed == set(EARLIER)
    for version in EARLIER:
        assert (FIXTURES / f"v{version}.expected.json").is_file()
        assert (FIXTURES / f"v{version}.sqlite3").stat().st_size < 256 * 1024  # KBs, not MBs
        # Read from a copy: even a read-only open of a WAL file leaves -wal/-shm beside it.
        conn = sqlite3.connect(str(installed_copy(version, tmp_path / f"v{version}") / "batmon.sqlite3"))
        try:  # made by that release: its schema, not ours
            assert conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] == version
        finally:
            conn.close()
    assert not list(FIXTURES.glob("*-wal")) and not list(FIXTURES.glob("*-shm"))


@pytest.mark.parametrize("opened", EARLIER, ids=[f"v{v}" for v in EARLIER], indirect=True)
def test_a_database_of_an_earlier_release_opens_with_nothing_lost(
    opened: tuple[Core, dict[str, Any]],
) -> None:
    core, expected = opened
    assert expected["batmons"] and expected["alarms"] and expected["readings"]
    for user in expected["users"]:
        found = core.user_for_api_key(user["api_key"])
        assert found is not None and found.email == user["email"]

    assert set(core.batmons) == {b["id"] for b in expected["batmons"]}
    for want in expected["batmons"]:
        have = core.batmons[want["id"]]
        for name, value in want.items():
            if name != "id" and value is not None:
                assert getattr(have, name) == value, f"batmon {want['id']} {name}"

    assert set(core.alarms) == {a["id"] for a in expected["alarms"]}
    for want in expected["alarms"]:
        alarm = core.alarms[want["id"]]
        assert alarm.id in core.batmons[want["batmon_id"]].alarms
        for name, value in want.items():
            if name == "akn" and value is not None:
                assert alarm.akn is not None and int(alarm.akn) == int(value)
            elif name not in ("id", "akn"):
                assert getattr(alarm, name) == value, f"alarm {want['id']} {name}"

    for batmon_id in core.batmons:
        sent = [{k: v for k, v in r.items() if k != "batmon_id"}
                for r in expected["readings"] if r["batmon_id"] == batmon_id]  # fmt: skip
        kept = [{k: v for k, v in row.items() if v is not None}
                for row in core.store.history(batmon_id, 0, 2**40)]  # fmt: skip
        assert kept == sent, f"batmon {batmon_id}"

    outbox = Outbox(core.store)
    for want in expected["notices"]:
        [have] = [n for n in outbox.latest_for_batmon(want["batmon_id"], 100) if n["id"] == want["id"]]
        assert {k: have[k] for k in want} == want


def test_the_committed_notices_include_a_queued_one() -> None:
    """The v2 release queued notices; a fixture without one would test nothing about them."""
    expected = [json.loads((FIXTURES / f"v{v}.expected.json").read_text()) for v in EARLIER]
    notices = [n for e in expected for n in e["notices"]]
    assert any(n["state"] == "queued" for n in notices)


def test_a_database_from_a_newer_release_is_refused_with_one_clear_line(tmp_path: Path) -> None:
    data_dir = installed_copy(LATEST - 1, tmp_path)
    conn = sqlite3.connect(str(data_dir / "batmon.sqlite3"))
    with conn:
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (LATEST + 1,))
    conn.close()
    before = (data_dir / "batmon.sqlite3").read_bytes()
    for command in (["serve", "--http-port", "0", "--mqtt-port", "0"], ["user", "list"]):
        result = batmon(*command, "--data-dir", str(data_dir))
        assert result.returncode == 1, result.stdout
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert f"schema version {LATEST + 1} is newer than this release knows ({LATEST})" in lines[0]
    assert (data_dir / "batmon.sqlite3").read_bytes() == before
