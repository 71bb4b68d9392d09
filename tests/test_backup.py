"""`batmon backup FILE` while serve ingests, `batmon restore FILE` while it does not, and one
server per data folder (issue 19, acceptance 3; SPEC 8).

Black-box: real `batmon serve` subprocesses, real devices (paho) publishing QoS 1, the
CLI run as a user runs it, the files checked with SQLite itself.
"""

from __future__ import annotations

import hashlib
import sqlite3
import stat
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from tests.conftest import ServeProcess
from tests.load import WAIT_S, Load, TimedDevice, add_batmons, admin_headers
from tests.support import batmon, wait_until
from tests.test_serve_end_to_end import mqtt_port

pytestmark = pytest.mark.timeout(600)

DEVICES = 100
RATE = 500.0  # readings/s over all devices together (the load)
PREFILL_ROWS = 1_000_000  # a long-running installation: the copy takes long enough to measure
PREFILL_TS = 1_577_836_800.0  # 2020-01-01: far below the load's `ts`, so history can skip them


def p99_ms(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98] * 1000


def database(data_dir: Path) -> Path:
    return data_dir / "batmon.sqlite3"


def values_in(path: Path, batmon_id: int) -> set[float]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {r[0] for r in conn.execute(
            "SELECT voltage FROM readings WHERE batmon_id = ? AND ts > ?", (batmon_id, PREFILL_TS + 1e6))}
    finally:
        conn.close()


def integrity(path: Path) -> list[str]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [r[0] for r in conn.execute("PRAGMA integrity_check")]
    finally:
        conn.close()


def prefill(path: Path, batmon_ids: list[int], rows: int) -> None:
    """Years of history, written straight into the file while serve is stopped."""
    conn = sqlite3.connect(str(path))
    per = rows // len(batmon_ids)
    with conn:
        conn.executemany(
            "INSERT INTO readings (batmon_id, ts, voltage, current) VALUES (?, ?, ?, ?)",
            ((b, PREFILL_TS + i * 60, -1.0 - i, 1.0) for b in batmon_ids for i in range(per)))
    conn.close()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cli_data(data_dir: Path) -> Callable[..., Any]:
    return lambda *args: batmon(*args, "--data-dir", str(data_dir))


# -- acceptance 3 ------------------------------------------------------------------

@pytest.mark.parametrize("method", ["online", "compact"])
def test_backup_under_500_readings_per_s_holds_every_acknowledged_reading_and_restores(
    serve: ServeProcess, tmp_path: Path, method: str, record_property: Callable[[str, object], None],
) -> None:
    serve.start(timeout=WAIT_S)
    devices = add_batmons(serve, DEVICES)
    serve.stop()
    prefill(database(serve.data_dir), [d.batmon_id for d in devices], PREFILL_ROWS)
    running = ServeProcess(serve.data_dir).start(timeout=WAIT_S)
    running.admin_key = serve.admin_key
    try:
        clients = [TimedDevice(mqtt_port(running), d) for d in devices]
        load = Load(clients, total=int(RATE * 120), rate=RATE).start()
        load_started = time.time()
        time.sleep(2)  # connections warm
        idle_start = time.monotonic()
        time.sleep(8)
        acked_before = {c.device.batmon_id: set(c.acked_values()) for c in clients}
        backup_start = time.monotonic()
        target = tmp_path / "backup.sqlite3"
        args = ["backup", str(target), *(["--compact"] if method == "compact" else [])]
        done = cli_data(serve.data_dir)(*args)
        backup_end = time.monotonic()
        time.sleep(2)
        load.stop()
        wait_until(lambda: not any(c.unacked() for c in clients), WAIT_S, "every PUBACK")
        offered = load.offered_rate()
        for client in clients:
            client.close()
        assert done.returncode == 0, done.stderr
        idle = [x for c in clients for x in c.latencies(idle_start, backup_start)]
        during = [x for c in clients for x in c.latencies(backup_start, backup_end)]
        figures = {
            "method": method, "offered_per_s": round(offered),
            "backup_s": round(backup_end - backup_start, 2),
            "backup_bytes": target.stat().st_size, "idle_n": len(idle), "idle_p99_ms": round(p99_ms(idle), 1),
            "during_n": len(during), "during_p99_ms": round(p99_ms(during), 1) if len(during) > 1 else None,
        }  # fmt: skip
        print(f"backup under load: {figures}; {done.stdout.strip()}")
        record_property("ack_latency", figures)
        assert offered >= RATE * 0.8, f"only {offered:.0f} readings/s offered"
        assert sum(len(v) for v in acked_before.values()) >= RATE * 5

        assert stat.S_IMODE(target.stat().st_mode) == 0o600
        assert integrity(target) == ["ok"]
        for batmon_id, acked in acked_before.items():
            assert acked <= values_in(target, batmon_id), f"batmon {batmon_id}: acknowledged, not in backup"

        # While serve runs, restore is refused, naming it, and touches nothing (the file
        # itself changes under the load: nothing is set aside or brought in).
        refused = cli_data(serve.data_dir)("restore", str(target))
        assert refused.returncode == 1
        assert running.proc is not None and str(running.proc.pid) in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert not list(serve.data_dir.glob("*.replaced-*"))
        assert not list(serve.data_dir.glob("*.restoring"))
    finally:
        running.stop()

    restored = cli_data(serve.data_dir)("restore", str(target))
    assert restored.returncode == 0, restored.stderr
    [aside] = serve.data_dir.glob("batmon.sqlite3.replaced-*")
    assert str(aside) in restored.stdout
    assert stat.S_IMODE(database(serve.data_dir).stat().st_mode) == 0o600

    again = ServeProcess(serve.data_dir).start(timeout=WAIT_S)
    try:
        with httpx.Client(base_url=again.http_url, headers=admin_headers(serve), timeout=60) as http:
            assert http.get("/interface/batmon/count").json() == {"success": {"batmons": DEVICES}}
            for batmon_id, acked in acked_before.items():
                r = http.get("/interface/batmon/history", params={
                    "batmon_id": batmon_id, "min_epoch_tm_sec": int(load_started) - 1,
                    "max_epoch_tm_sec": int(time.time()) + 120})  # fmt: skip
                assert r.status_code == 200, r.text
                [entry] = r.json()["success"]
                assert acked <= {row["batmon_voltage"] for row in entry["data"]}, batmon_id
    finally:
        again.stop()


# -- restore refuses what it must not use -----------------------------------------

@pytest.fixture
def installed(tmp_path: Path) -> Path:
    """A data folder with one user, made by the CLI."""
    data_dir = tmp_path / "data"
    assert cli_data(data_dir)("user", "add", "owner@example.org").returncode == 0
    return data_dir


def assert_untouched(data_dir: Path, before: str) -> None:
    assert digest(database(data_dir)) == before
    assert not list(data_dir.glob("*.replaced-*"))
    assert not list(data_dir.glob("*.restoring"))


def test_restore_refuses_a_damaged_file_before_replacing_anything(installed: Path, tmp_path: Path) -> None:
    good = tmp_path / "good.sqlite3"
    assert cli_data(installed)("backup", str(good)).returncode == 0
    damaged = tmp_path / "damaged.sqlite3"
    data = bytearray(good.read_bytes())
    page = 4096
    data[2 * page + 8: 3 * page] = b"\xff" * (page - 8)  # a b-tree page's cells overwritten
    damaged.write_bytes(bytes(data))
    before = digest(database(installed))
    for bad, why in ((damaged, ""), (tmp_path / "missing.sqlite3", "no file"),
                     (Path(__file__), "not a sound SQLite database")):  # fmt: skip
        result = cli_data(installed)("restore", str(bad))
        assert result.returncode == 1, result.stdout
        assert result.stderr.startswith("batmon restore: ") and why in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert_untouched(installed, before)


def test_restore_refuses_a_database_from_a_newer_release(installed: Path, tmp_path: Path) -> None:
    newer = tmp_path / "newer.sqlite3"
    assert cli_data(installed)("backup", str(newer)).returncode == 0
    conn = sqlite3.connect(str(newer))
    with conn:
        conn.execute("INSERT INTO schema_version (version) VALUES (999)")
    conn.close()
    before = digest(database(installed))
    result = cli_data(installed)("restore", str(newer))
    assert result.returncode == 1
    assert "newer batmon (schema 999" in result.stderr, result.stderr
    assert_untouched(installed, before)


def test_restore_refuses_a_sqlite_file_that_is_not_a_batmon_database(installed: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.sqlite3"
    conn = sqlite3.connect(str(other))
    conn.execute("CREATE TABLE t (x)")
    conn.close()
    before = digest(database(installed))
    result = cli_data(installed)("restore", str(other))
    assert result.returncode == 1 and "not a batmon database" in result.stderr, result.stderr
    assert_untouched(installed, before)


def test_backup_is_private_refuses_to_overwrite_and_restores_into_a_new_folder(
    installed: Path, tmp_path: Path,
) -> None:
    target = tmp_path / "b.sqlite3"
    assert cli_data(installed)("backup", str(target)).returncode == 0
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    again = cli_data(installed)("backup", str(target))
    assert again.returncode == 1 and "exists" in again.stderr
    fresh = tmp_path / "new-machine" / "data"
    result = cli_data(fresh)("restore", str(target))
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    listed = cli_data(fresh)("user", "list")
    assert listed.stdout.split() == ["owner@example.org"]


def test_backup_of_a_folder_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    result = cli_data(tmp_path / "nowhere")("backup", str(tmp_path / "b.sqlite3"))
    assert result.returncode == 1 and "no data folder" in result.stderr, result.stderr
    assert not (tmp_path / "nowhere").exists()


# -- one server per data folder -----------------------------------------------------

def test_a_second_serve_on_the_same_data_folder_exits_naming_the_running_pid(serve: ServeProcess) -> None:
    serve.start(timeout=WAIT_S)
    second = batmon("serve", "--data-dir", str(serve.data_dir), "--http-port", "0", "--mqtt-port", "0")
    assert second.returncode == 1
    assert serve.proc is not None and f"PID {serve.proc.pid}" in second.stderr, second.stderr
    assert len(second.stderr.strip().splitlines()) == 1, second.stderr
    with httpx.Client(base_url=serve.http_url, timeout=30) as http:
        assert http.get("/healthz").status_code == 200  # the first one still serves
    serve.stop()
    # The lock went with the process: the folder can be served again.
    again = ServeProcess(serve.data_dir).start(timeout=WAIT_S)
    again.stop()
