"""PostgreSQL stopped for 10 s under load (issue 16, acceptance 2): nothing is acknowledged
while it is down, /healthz answers 503 naming the database, ingest resumes by itself once it
is back, and every acknowledged reading is stored. And a notice delivered while it is down
is recorded once it is back, not sent again.

Black-box: a private PostgreSQL (tests/pg_support.py, `pg_ctl stop -m fast` and `start`), a
real `batmon serve --database-url` with its embedded broker (a PUBACK follows the commit), a
device publishing QoS 1 over MQTT and another updating over HTTP, both all along.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx2 as httpx
import psycopg
import pytest

from tests.conftest import ServeProcess
from tests.load import (
    WAIT_S,
    HttpSender,
    Landing,
    Load,
    TimedDevice,
    add_batmons,
    admin_headers,
    alarm_notices,
    healthz,
    history_values,
    wait_history,
)
from tests.pg_support import private_postgres
from tests.support import Sink, wait_until
from tests.test_serve_end_to_end import mqtt_port

pytestmark = pytest.mark.timeout(300)

DOWN_S = 10.0
DEVICES = 4
RATE = 80.0  # messages/s over the devices: 20/s each, within the embedded broker's 50/s per device,
# so the backlog of the outage drains at once after it instead of at the broker's abuse limit
PING_FRESH_S = 1.0  # /healthz asks the database at most this often (bridge/core.py)
LEASE_S = 2  # --notify-lease-s of the notice test


def test_postgresql_stopped_for_10_s_under_load_acknowledges_nothing_and_ingest_resumes_by_itself(
    tmp_path: Path,
) -> None:
    with private_postgres() as pg:
        serve = ServeProcess(tmp_path / "data", args=["--database-url", pg.create_database()])
        try:
            serve.start(timeout=WAIT_S)
            *mqtt_devices, http_device = add_batmons(serve, DEVICES + 1)
            publishers = [TimedDevice(mqtt_port(serve), device) for device in mqtt_devices]
            load = Load(publishers, total=1_000_000, rate=RATE).start()
            sender = HttpSender(serve, http_device, pause_s=0.02).start()
            health: list[tuple[float, int, dict[str, Any]]] = []
            with httpx.Client(base_url=serve.http_url, timeout=30) as http:
                try:
                    wait_until(lambda: load.acked() >= 100 and len(sender.with_status(200)) >= 20, WAIT_S,
                               "ingest before the fault")  # fmt: skip
                    assert healthz(http)[0] == 200

                    pg.stop("fast")
                    down = time.monotonic()  # from here no commit can succeed
                    while time.monotonic() - down < DOWN_S:
                        code, body = healthz(http)
                        health.append((time.monotonic(), code, body))
                        time.sleep(0.2)
                    restarting = time.monotonic()
                    pg.start()
                    up = time.monotonic()
                    wait_until(lambda: healthz(http)[0] == 200, WAIT_S, "/healthz 200 again, no restart")
                    healthy_in = time.monotonic() - restarting
                    wait_until(lambda: [a for a in sender.with_status(200) if a.sent > up], WAIT_S,
                               "an HTTP update sent after the start accepted")  # fmt: skip
                    wait_until(lambda: [1 for p in publishers for m, at in p.published_at.items()
                                        if at > up and m in p.acked_at], WAIT_S,
                               "a reading published after the start PUBACKed")  # fmt: skip
                finally:
                    load.stop()
                    sender.stop()
                unacked = sum(p.unacked() for p in publishers)
                assert load.wait_acked(), f"{unacked} publishes never acknowledged after it"
                sent = sum(len(p.sent_values()) for p in publishers)
                landings = wait_history(serve, publishers, want=sent, timeout=60).values()
                http_rows = history_values(http, serve, http_device.batmon_id)
            for publisher in publishers:
                publisher.close()
        finally:
            if serve.proc is not None:
                serve.stop()

    # Nothing acknowledged while it was down: no success for an HTTP update sent after the stop,
    # and no PUBACK for a reading published after it, before the start began (once `pg_ctl start`
    # runs, the server may take commits a little before the command returns).
    in_outage = [a for a in sender.answers if down < a.sent < restarting]
    assert in_outage and not [a for a in in_outage if a.status == 200 and a.at < restarting], "acked, down"
    assert {a.status for a in in_outage} <= {200, 503}, Counter(a.status for a in in_outage)
    early_acks = [(round(at - down, 3), round(p.acked_at[m] - down, 3)) for p in publishers
                  for m, at in p.published_at.items()
                  if down < at < restarting and p.acked_at.get(m, restarting) < restarting]  # fmt: skip
    published_down = sum(1 for p in publishers for at in p.published_at.values() if down < at < restarting)
    assert published_down and not early_acks, f"PUBACKed while down, (published, acked) s after: {early_acks}"
    # /healthz answered 503 naming the database (once its one-second ping cache had expired).
    settled = [(code, body) for at, code, body in health if at > down + PING_FRESH_S + 0.5]
    assert settled and all(code == 503 and body["database"] == "error" for code, body in settled), settled[-1]
    # Every acknowledged reading is stored, once.
    missing = sum(len(f.missing) for f in landings)
    assert not missing, f"{missing} PUBACKed readings lost"
    assert all(f.duplicates == 0 and f.unknown == 0 for f in landings)
    http_landing = Landing.of([a.value for a in sender.answers], [a.value for a in sender.with_status(200)],
                              http_rows)  # fmt: skip
    assert not http_landing.missing, f"{len(http_landing.missing)} HTTP `success` readings lost"
    assert http_landing.duplicates == 0
    assert not {a.value for a in sender.with_status(503)} & set(http_rows), "a 503 reading was stored"

    # How long after the start command began (it returned after `up - restarting`).
    http_back = min(a.at for a in sender.with_status(200) if a.sent > restarting) - restarting
    mqtt_back = min(at for p in publishers for m, at in p.acked_at.items() if p.published_at.get(m, 0) > down)
    mqtt_back -= restarting
    drained = max(p.acked_at[m] for p in publishers for m, at in p.published_at.items()
                  if down < at < restarting) - restarting  # the outage's backlog all PUBACKed
    print(f"\nPostgreSQL down {restarting - down:.1f} s; after `pg_ctl start` began (it returned after"
          f" {up - restarting:.2f} s): /healthz 200 in {healthy_in:.2f} s, first HTTP success in"
          f" {http_back:.2f} s, first PUBACK"
          f" of a reading published during the outage in {mqtt_back:.2f} s, of all of them in"
          f" {drained:.2f} s; /healthz during the outage"
          f" {dict(Counter(code for _, code, _ in health))}; HTTP during the outage"
          f" {dict(Counter(a.status for a in in_outage))};"
          f" MQTT published {sum(len(f.sent) for f in landings)}"
          f" ({published_down} during the outage), acked {sum(len(f.acked) for f in landings)}, stored"
          f" {sum(len(set(f.history)) for f in landings)}, missing {missing}, duplicates"
          f" {sum(f.duplicates for f in landings)};"
          f" HTTP sent {len(sender.answers)}, acked {len(sender.with_status(200))}, stored {len(http_rows)},"
          f" missing {len(http_landing.missing)}")


def test_a_notice_delivered_while_postgresql_is_down_is_recorded_once_it_is_back_not_sent_again(
    tmp_path: Path,
) -> None:
    """The notifier writes a delivery's outcome again until the database takes it: a lost
    outcome would leave the notice `sending`, and once its lease ran out it would go twice."""
    sink = Sink()
    sink.hang = True
    try:
        with private_postgres() as pg:
            url = pg.create_database()
            lease = ["--notify-lease-s", str(LEASE_S)]
            serve = ServeProcess(tmp_path / "data", args=["--database-url", url, *lease])
            try:
                serve.start(timeout=WAIT_S)
                with httpx.Client(base_url=serve.http_url, timeout=10, headers=admin_headers(serve)) as http:
                    alarm_notices(http, sink.url("?rto=30"), 1)
                wait_until(lambda: sink.hung, WAIT_S, "the notice's send held at the sink")
                pg.stop("fast")
                sink.late_status = 200
                sink.release.set()  # delivered, while its outcome cannot be written
                wait_until(lambda: sink.posts(), WAIT_S, "the held send answered")
                time.sleep(3 * LEASE_S)  # the claim's lease runs out meanwhile
                pg.start()
                with psycopg.connect(url, autocommit=True) as conn:

                    def row() -> tuple[str, int] | None:
                        return conn.execute("SELECT state, attempts FROM outbox").fetchone()

                    wait_until(lambda: row() == ("sent", 1), WAIT_S, "the delivery recorded")
                    time.sleep(3 * LEASE_S)  # a resend would have been claimed by now
                    assert row() == ("sent", 1)
                assert len(sink.hung) == 1 and len(sink.posts()) == 1  # sent once, never again
            finally:
                if serve.proc is not None:
                    serve.stop()
    finally:
        sink.close()
