"""After a broker outage the bridge is back within a few seconds: its reconnect
back-off is capped (with per-process jitter), and readings sent meanwhile arrive."""

from __future__ import annotations

import time
from pathlib import Path

from bridge.doors.mqtt_link import RECONNECT_MAX_DELAY_S, RECONNECT_MIN_DELAY_S
from tests.support import PrivateMosquitto, make_env

OUTAGE_S = 16  # long enough that the old back-off (doubling to 30 s) waited 15 s more
RESUME_WITHIN_S = 8


def test_ingest_resumes_within_seconds_after_the_broker_comes_back(tmp_path: Path) -> None:
    assert 0 < RECONNECT_MIN_DELAY_S <= RECONNECT_MAX_DELAY_S <= 5
    broker = PrivateMosquitto(tmp_path).start()
    try:
        with make_env(tmp_path, port=broker.port) as env:
            batmon = env.add_batmon()
            env.bridge()
            update = env.topics.update(batmon.id, batmon.token)
            device = env.probe()
            device.publish(update, '{"voltage": 12.1}')
            env.wait_count(batmon, 1)
            device.close()
            env.probes.remove(device)

            broker.stop()
            time.sleep(OUTAGE_S)  # the outage itself, not a wait for a result
            broker.start()
            back = time.monotonic()
            device = env.probe()
            device.publish(update, '{"voltage": 12.2}')  # queued for the bridge's session
            env.wait_count(batmon, 2, timeout=RESUME_WITHIN_S)
            print(f"ingest resumed {time.monotonic() - back:.1f} s after the broker came back")
            assert [row["batmon_voltage"] for row in env.history(batmon)] == [12.1, 12.2]
    finally:
        broker.stop()
