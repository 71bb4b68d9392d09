"""Several `batmon serve` workers on one PostgreSQL database (issue 16), as real processes:
the embedded broker refused to a second worker, updates shared out through `$share`."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests import pg_support
from tests.conftest import ServeProcess
from tests.support import batmon, wait_until
from tests.workers import Device, workers


def test_a_second_worker_with_the_embedded_broker_on_one_database_is_refused(tmp_path: Path) -> None:
    url = pg_support.fresh_database_url()
    first = ServeProcess(tmp_path / "first", args=["--database-url", url]).start()
    try:
        second = batmon("serve", "--data-dir", str(tmp_path / "second"), "--database-url", url,
                        "--http-port", "0", "--mqtt-port", "0")  # fmt: skip
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip().count("\n") == 0 and "Traceback" not in second.stderr
        assert "--mqtt-url" in second.stderr and "embedded broker" in second.stderr
        assert "batmon_test_" in second.stderr  # names the database (never a password)
    finally:
        first.stop(signal.SIGKILL)  # the lock goes with its session, however serve ended
    again = ServeProcess(tmp_path / "second", args=["--database-url", url]).start()
    assert again.stop() == 0


DEVICES = 100
READINGS = 30_000  # in all: 300 per device, each with its own device timestamp
KILL_AT = READINGS // 3  # stored readings when one worker is killed
RESTART_S = 2.0  # deploy/batmon@.service's RestartSec


def worker_args(i: int) -> list[str]:
    """As deploy/batmon@.service runs worker i: one share group, a client id of its own."""
    return ["--mqtt-share-group", "batmon", "--mqtt-client-id", f"batmon-worker-{i}"]


@pytest.mark.timeout(600)
def test_three_workers_store_every_acknowledged_reading_once_through_a_kill_9(tmp_path: Path) -> None:
    """Issue 16, acceptance 1: 3 workers, 100 devices, 30,000 QoS 1 readings; one worker
    killed with kill -9 at about a third and restarted as systemd would."""
    with workers(tmp_path, worker_args) as group:
        group.start(1)
        batmons = group.add_batmons(DEVICES)  # before the others start: they load them at start
        group.start(3)
        devices = [Device(group.broker.port, batmon_id, token) for batmon_id, token in batmons]
        for device in devices:
            assert device.connected.wait(10), "a device did not connect"
        per_device = READINGS // DEVICES
        t0 = int(time.time()) - 10 * per_device  # device timestamps in the past, 1 s apart
        started = time.monotonic()

        def publish_all() -> None:  # on a thread: the kill below watches the load meanwhile
            for k in range(per_device):
                for device in devices:
                    device.publish({"ts": t0 + k, "voltage": 12 + k / 1000, "soc": k % 101})

        publisher = threading.Thread(target=publish_all, name="devices")
        publisher.start()

        def stored() -> int:
            return int(group.query("SELECT count(*) FROM readings")[0][0])

        last: dict[str, Any] = {}

        def a_third_stored() -> bool:  # worker 1's counters as of just before the kill
            last.update(group.health(1)["mqtt_stats"], stored=stored())
            return bool(last["stored"] >= KILL_AT)

        wait_until(a_third_stored, 180, "a third of the readings stored")
        killed_at_s = time.monotonic() - started
        group.kill(1)
        before_kill = dict(last)
        killed_at = before_kill["stored"]
        time.sleep(RESTART_S)
        group.restart(1)
        publisher.join(60)
        wait_until(lambda: all(len(d.acked) == per_device for d in devices), 180, "every PUBACK")
        wait_until(lambda: stored() >= READINGS, 180, "every acknowledged reading stored")
        time.sleep(2)  # anything stored twice would show by now
        elapsed = time.monotonic() - started
        stats = [group.health(i)["mqtt_stats"] for i in range(3)]
        for device in devices:
            device.close()

        rows = group.query("SELECT batmon_id, ts, count(*) FROM readings GROUP BY batmon_id, ts")
        latest = {row[0]: row[1:] for row in group.query(
            "SELECT id, last_reading, voltage FROM batmons")}  # fmt: skip
    stored_once = {(batmon_id, ts) for batmon_id, ts, n in rows if n == 1}
    duplicates = sum(n - 1 for _, _, n in rows)
    acked = {(d.batmon_id, float(ts)) for d in devices for ts in d.acked}
    assert len(acked) == READINGS
    assert acked <= stored_once, f"{len(acked - stored_once)} acknowledged readings not stored once"
    assert duplicates == 0 and len(rows) == READINGS
    for device in devices:  # the latest value is the newest reading, whoever committed last
        assert latest[device.batmon_id] == (t0 + per_device - 1, 12 + (per_device - 1) / 1000)
    received = [s["received"] for s in stats]
    accepted = [s["accepted"] for s in stats]
    # Worker 1's own readings: what the others did not take. It committed (and acked) about
    # before_kill["accepted"] of them before the kill; what it took after its restart beyond
    # the rest of them came a second time.
    again = before_kill["accepted"] + accepted[1] - (READINGS - accepted[0] - accepted[2])
    print(f"\n{READINGS} readings in {elapsed:.1f} s; worker 1 killed at {killed_at} stored"
          f" ({killed_at_s:.1f} s into the run), having received {before_kill['received']} and"
          f" committed {before_kill['accepted']} (its last /healthz); after the run, per worker"
          f" (worker 1 since its restart): received {received}, committed {accepted},"
          f" with DUP set {[s['redelivered'] for s in stats]}; delivered twice (approx.): {again};"
          f" deliveries in all: {sum(received) + before_kill['received']}; rows stored twice: {duplicates}")
    # The share group split the load: no worker took every reading.
    assert all(0 < n < READINGS for n in received), received
