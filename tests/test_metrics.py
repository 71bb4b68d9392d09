"""Prometheus /metrics: an in-process `Service` on free ports (its embedded broker, real
HTTP over a socket, Apprise to a local sink), scraped and parsed with prometheus_client's
own parser; counters must move when readings, rejections, alarms and notices happen.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from batmon.service import Service
from bridge.config import ServeOptions
from bridge.core import Core
from bridge.doors.mqtt_link import new_client
from bridge.events import CommitObserved, EventBus, HttpRejected
from bridge.extensions.metrics import Metrics
from bridge.store.db import Store
from bridge.writer import COMMIT_DELAY_ENV
from tests.conftest import ServeProcess
from tests.support import LoopThread, PrivateMosquitto, Probe, Sink, wait_until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Running:
    """A started Service with an HTTP client and the admin's key."""

    def __init__(self, service: Service, loop: LoopThread) -> None:
        self.service = service
        self.loop = loop
        self.http = httpx.Client(base_url=service.http_url, timeout=10)
        self.admin = {"X-API-Key": service.admin_api_key or ""}

    def add_batmon(self, **fields: Any) -> tuple[int, str]:
        r = self.http.post("/interface/add/batmon", headers=self.admin,
                           data={"batmon_name": "House bank", **fields})  # fmt: skip
        assert r.status_code == 200, r.text
        added = r.json()["success"]
        return added["batmon_id"], added["batmon_token"]

    def update(self, batmon_id: int, token: str, **values: Any) -> httpx.Response:
        return self.http.post("/interface/update/batmon",
                              json={"batmon_id": batmon_id, "batmon_token": token, **values})  # fmt: skip

    def publish(self, batmon_id: int, token: str, payload: str) -> None:
        """Publish one update as the device (QoS 1) on the embedded broker."""
        client = new_client(f"device-{uuid.uuid4().hex[:8]}", clean_session=True)
        client.username_pw_set(str(batmon_id), token)
        assert self.service.mqtt_port is not None
        client.connect("127.0.0.1", self.service.mqtt_port)
        client.loop_start()
        try:
            info = client.publish(f"batmon/{batmon_id}/{token}/update", payload, qos=1)
            info.wait_for_publish(5)
            assert info.is_published(), "the broker did not ack the update"
        finally:
            client.disconnect()
            client.loop_stop()

    def scrape(self, **headers: str) -> Samples:
        r = self.http.get("/metrics", headers=headers)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/plain")
        return samples(r.text)

    def close(self) -> None:
        self.http.close()


def samples(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, keyed by name and labels."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, frozenset(s.labels.items()))] = s.value
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when the series does not exist (yet)."""
    return found.get((name, frozenset(labels.items())), 0.0)


def total(found: Samples, name: str) -> float:
    """The sum of a metric over all its label sets."""
    return sum(v for (n, _), v in found.items() if n == name)


def start_service(tmp_path: Path, **options: Any) -> tuple[Running, LoopThread]:
    loop = LoopThread()
    opts = ServeOptions(data_dir=tmp_path / "data", http_port=0, mqtt_port=0,
                        notify_retry_s=0.3, **options)  # fmt: skip
    service = Service(opts)
    loop.run(service.start(), timeout=30)
    return Running(service, loop), loop


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    r, loop = start_service(tmp_path)
    yield r
    r.close()
    loop.run(r.service.stop(), timeout=30)
    loop.close()


@pytest.fixture
def running_per_batmon(tmp_path: Path) -> Iterator[Running]:
    r, loop = start_service(tmp_path / "per-batmon", metrics_per_batmon=True)
    yield r
    r.close()
    loop.run(r.service.stop(), timeout=30)
    loop.close()


# -- what /metrics says ------------------------------------------------------------

def test_metrics_is_prometheus_text_with_every_documented_family(running: Running) -> None:
    r = running.http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    names = {family.name for family in text_string_to_metric_families(r.text)}
    documented = {
        "batmon_readings_accepted", "batmon_rejections", "batmon_alarm_changes",
        "batmon_alarms_active", "batmon_status_changes", "batmon_batmons", "batmon_mqtt_connected",
        "batmon_mqtt_connects", "batmon_mqtt_disconnects", "batmon_mqtt_messages_received",
        "batmon_mqtt_messages_redelivered",
        "batmon_notices", "batmon_notices_pending", "batmon_event_loop_lag_seconds", "batmon_commit_rows",
        "batmon_commit_seconds", "batmon_writer_queue_depth", "batmon_commit_failures",
        "batmon_writer_refused", "batmon_writer_failing", "process_cpu_seconds",
    }
    assert documented <= names, documented - names
    assert "batmon_voltage" not in names  # per-batmon series are opt-in
    assert not [line for line in r.text.splitlines() if "_created" in line]


def test_readings_over_http_and_mqtt_move_the_accepted_counter(running: Running) -> None:
    batmon_id, token = running.add_batmon()
    before = total(running.scrape(), "batmon_readings_accepted_total")
    assert running.update(batmon_id, token, voltage=12.6).status_code == 200
    running.publish(batmon_id, token, '[{"voltage": 12.5, "ts": 1}, {"voltage": 12.4, "ts": 2}]')
    found = wait_until(
        lambda: (s := running.scrape()) and total(s, "batmon_readings_accepted_total") == before + 3 and s,
        timeout=10, what="three readings counted")  # fmt: skip
    # The writer committed them: 3 rows in one or two commits, none failed.
    assert value(found, "batmon_commit_rows_sum") == 3
    assert 1 <= value(found, "batmon_commit_rows_count") <= 2
    assert value(found, "batmon_commit_seconds_count") == value(found, "batmon_commit_rows_count")
    assert value(found, "batmon_commit_failures_total") == 0
    assert value(found, "batmon_writer_queue_depth") == 0


def test_accepted_readings_are_labelled_with_their_door(running: Running) -> None:
    batmon_id, token = running.add_batmon()
    assert running.update(batmon_id, token, voltage=12.6).status_code == 200
    running.publish(batmon_id, token, '{"voltage": 12.5}')
    found = wait_until(lambda: (s := running.scrape()) and
                       value(s, "batmon_readings_accepted_total", door="mqtt") == 1 and s,
                       timeout=5, what="the MQTT reading counted")  # fmt: skip
    assert value(found, "batmon_readings_accepted_total", door="http") == 1


def test_writer_queue_depth_shows_readings_waiting_for_their_commit(serve: ServeProcess) -> None:
    serve.env = {COMMIT_DELAY_ENV: "400"}  # each commit takes 0.4 s: readings wait in the queue
    serve.start()
    http = httpx.Client(base_url=serve.http_url, timeout=20)
    admin = {"X-API-Key": serve.admin_key or ""}
    added = http.post("/interface/add/batmon", headers=admin, data={"batmon_name": "Slow"}).json()
    batmon_id, token = added["success"]["batmon_id"], added["success"]["batmon_token"]

    def post() -> None:
        with httpx.Client(base_url=serve.http_url, timeout=20) as client:
            client.post("/interface/update/batmon",
                        json={"batmon_id": batmon_id, "batmon_token": token, "voltage": 12})  # fmt: skip

    senders = [threading.Thread(target=post) for _ in range(4)]
    for sender in senders:
        sender.start()
    try:
        wait_until(lambda: value(samples(http.get("/metrics").text), "batmon_writer_queue_depth") >= 1,
                   timeout=10, what="a reading seen waiting for the writer")  # fmt: skip
    finally:
        for sender in senders:
            sender.join(20)
    found = wait_until(
        lambda: (s := samples(http.get("/metrics").text))
        and value(s, "batmon_commit_rows_sum") == 4 and s,
        timeout=10, what="the four readings committed")  # fmt: skip
    assert value(found, "batmon_writer_queue_depth") == 0
    assert value(found, "batmon_commit_seconds_bucket", le="0.25") == 0  # every commit slowed
    http.close()


def test_rejections_are_counted_by_door_and_reason(running: Running) -> None:
    batmon_id, token = running.add_batmon()
    before = running.scrape()
    assert running.update(batmon_id, "wrong-token-123", voltage=1).status_code == 403
    assert running.update(batmon_id, token, soc=250).status_code == 400
    assert running.update(batmon_id, token, soc=-1).status_code == 400
    stranger = httpx.get(f"{running.service.http_url}/interface/batmon/count")  # no cookie
    assert stranger.status_code == 401
    running.publish(batmon_id, token, '{"soc": 250}')

    def moved(door: str, reason: str) -> float:
        return (value(running.scrape(), "batmon_rejections_total", door=door, reason=reason)
                - value(before, "batmon_rejections_total", door=door, reason=reason))  # fmt: skip

    wait_until(lambda: moved("mqtt", "invalid") == 1, timeout=10, what="the MQTT rejection")
    assert moved("http", "wrong_token") == 1
    assert moved("http", "invalid") == 2
    assert moved("http", "unauthenticated") == 1
    assert moved("mqtt", "wrong_token") == 0


def test_alarms_status_and_notices_move_their_metrics(running: Running) -> None:
    sink = Sink()
    try:
        r = running.http.post("/interface/user/notifications", headers=running.admin,
                              json={"email_url": sink.url()})  # fmt: skip
        assert r.status_code == 200, r.text
        batmon_id, token = running.add_batmon()
        r = running.http.post("/interface/batmon/alarm/add", headers=running.admin, json={
            "batmon_id": batmon_id, "alarm_name": "Low", "alarm_metric": "soc",
            "alarm_condition": "<", "alarm_threshold_value": 20, "alarm_repeat_delay": 3600,
        })  # fmt: skip
        assert r.status_code == 200, r.text
        before = running.scrape()
        assert value(before, "batmon_batmons", status="offline") == 1
        assert value(before, "batmon_notices_total", channel="email", outcome="sent") == 0

        assert running.update(batmon_id, token, soc=15).status_code == 200
        wait_until(lambda: sink.posts(), timeout=10, what="the triggered notice at the sink")
        after = wait_until(
            lambda: (s := running.scrape())
            and value(s, "batmon_notices_total", channel="email", outcome="sent") == 1 and s,
            timeout=10, what="the sent notice counted",
        )  # fmt: skip
        assert value(after, "batmon_notices_total", channel="email", outcome="queued") == 1
        assert value(after, "batmon_notices_pending", state="queued", channel="email") == 0
        assert value(after, "batmon_alarm_changes_total", kind="triggered") == 1
        assert value(after, "batmon_alarms_active") == 1
        assert value(after, "batmon_batmons", status="online") == 1
        assert value(after, "batmon_batmons", status="offline") == 0
        assert value(after, "batmon_status_changes_total", status="online") == 1

        assert running.update(batmon_id, token, soc=80).status_code == 200
        cleared = running.scrape()
        assert value(cleared, "batmon_alarm_changes_total", kind="cleared") == 1
        assert value(cleared, "batmon_alarms_active") == 0
    finally:
        sink.close()


def test_notices_without_a_target_or_to_a_dead_one_are_counted(running: Running) -> None:
    dead = Sink()
    dead_url = dead.url()
    dead.close()  # nothing listens there any more: every attempt fails
    r = running.http.post("/interface/user/notifications", headers=running.admin,
                          json={"email_url": dead_url})  # fmt: skip
    assert r.status_code == 200, r.text
    batmon_id, token = running.add_batmon()
    running.http.post("/interface/batmon/enable/sms", headers=running.admin,
                      json={"batmon_id": batmon_id})  # fmt: skip
    running.http.post("/interface/batmon/alarm/add", headers=running.admin, json={
        "batmon_id": batmon_id, "alarm_name": "High", "alarm_metric": "voltage",
        "alarm_condition": ">", "alarm_threshold_value": 10, "alarm_repeat_delay": 3600,
    })  # fmt: skip
    assert running.update(batmon_id, token, voltage=14).status_code == 200
    found = wait_until(
        lambda: (s := running.scrape())
        and value(s, "batmon_notices_total", channel="email", outcome="retry") >= 2 and s,
        timeout=15, what="failed attempts counted as retries",
    )  # fmt: skip
    assert value(found, "batmon_notices_total", channel="sms", outcome="skipped") == 1
    assert value(found, "batmon_notices_total", channel="email", outcome="queued") == 1
    assert value(found, "batmon_notices_total", channel="email", outcome="sent") == 0
    pending = (value(found, "batmon_notices_pending", state="queued", channel="email")
               + value(found, "batmon_notices_pending", state="sending", channel="email"))  # fmt: skip
    assert pending == 1


def test_mqtt_connection_state_is_exposed(running: Running) -> None:
    found = running.scrape()
    assert value(found, "batmon_mqtt_connected") == 1
    assert value(found, "batmon_mqtt_connects_total") >= 1


def test_external_broker_counts_wrong_tokens_and_a_lost_connection(tmp_path: Path) -> None:
    """On an external broker anyone may publish: the bridge itself drops wrong tokens."""
    broker = PrivateMosquitto(tmp_path).start()
    r, loop = start_service(tmp_path / "ext", mqtt_url=f"mqtt://127.0.0.1:{broker.port}")
    try:
        batmon_id, token = r.add_batmon()
        device = Probe(broker.port)
        device.publish(f"batmon/{batmon_id}/not-the-token/update", '{"voltage": 1}')
        device.publish(f"batmon/{batmon_id}/{token}/update", '{"voltage": 12.1}')
        device.close()
        found = wait_until(
            lambda: (s := r.scrape()) and total(s, "batmon_readings_accepted_total") == 1 and s,
            timeout=10, what="the good reading counted",
        )  # fmt: skip
        assert value(found, "batmon_rejections_total", door="mqtt", reason="wrong_token") == 1
        assert value(found, "batmon_mqtt_messages_received_total") == 2
        assert value(found, "batmon_mqtt_messages_redelivered_total") == 0  # DUP unset: first sends
        assert value(found, "batmon_mqtt_connected") == 1

        broker.stop()
        gone = wait_until(lambda: (s := r.scrape()) and value(s, "batmon_mqtt_connected") == 0 and s,
                          timeout=10, what="the lost connection shown")  # fmt: skip
        assert value(gone, "batmon_mqtt_disconnects_total") >= 1
    finally:
        r.close()
        loop.run(r.service.stop(), timeout=30)
        loop.close()
        broker.stop()


def test_a_blocked_event_loop_shows_as_lag(running: Running) -> None:
    def slow_bucket_gap() -> float:
        found = running.scrape()
        return (value(found, "batmon_event_loop_lag_seconds_count")
                - value(found, "batmon_event_loop_lag_seconds_bucket", le="0.5"))  # fmt: skip

    assert slow_bucket_gap() == 0
    running.loop.call(time.sleep, 1.0)  # a handler that blocks the loop for a second
    wait_until(lambda: slow_bucket_gap() >= 1, timeout=10, what="a lag over 0.5 s observed")


def test_per_batmon_gauges_only_when_asked(running: Running, running_per_batmon: Running) -> None:
    for r in (running, running_per_batmon):
        batmon_id, token = r.add_batmon(batmon_name="Van")
        assert r.update(batmon_id, token, voltage=12.7, soc=88).status_code == 200
    plain = running.scrape()
    assert not [k for k in plain if k[0] in ("batmon_voltage", "batmon_info", "batmon_online")]
    found = running_per_batmon.scrape()
    labels = {"batmon_id": str(batmon_id)}
    assert value(found, "batmon_voltage", **labels) == 12.7
    assert value(found, "batmon_soc", **labels) == 88
    assert value(found, "batmon_online", **labels) == 1
    assert value(found, "batmon_info", batmon_name="Van", batmon_type="generic", **labels) == 1
    assert value(found, "batmon_last_reading_timestamp_seconds", **labels) > 0


# -- events on the bus and the registry per Service ---------------------------------

def test_writer_commits_told_on_the_bus_are_exposed(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "batmon.sqlite3")
    loop = asyncio.new_event_loop()
    try:
        core = Core(store, EventBus()).load()
        metrics = Metrics(core)
        loop.run_until_complete(metrics.start())
        core.bus.emit(CommitObserved(rows=8, seconds=0.004))
        core.bus.emit(CommitObserved(rows=1, seconds=0.001))
        found = samples(metrics.render("")[0].decode())
        assert value(found, "batmon_commit_rows_count") == 2
        assert value(found, "batmon_commit_rows_sum") == 9
        assert value(found, "batmon_commit_rows_bucket", le="1.0") == 1
        assert value(found, "batmon_commit_seconds_count") == 2
        loop.run_until_complete(metrics.stop())
    finally:
        loop.close()
        store.close()


def test_two_services_in_one_process_keep_their_own_figures(tmp_path: Path) -> None:
    stores = [Store.open(tmp_path / f"{n}.sqlite3") for n in (1, 2)]
    loop = asyncio.new_event_loop()
    try:
        first, second = (Metrics(Core(s, EventBus()).load()) for s in stores)
        for metrics in (first, second):
            loop.run_until_complete(metrics.start())
        first.core.bus.emit(HttpRejected("wrong_token"))
        assert value(samples(first.render("")[0].decode()), "batmon_rejections_total",
                     door="http", reason="wrong_token") == 1  # fmt: skip
        assert value(samples(second.render("")[0].decode()), "batmon_rejections_total",
                     door="http", reason="wrong_token") == 0  # fmt: skip
        for metrics in (first, second):
            loop.run_until_complete(metrics.stop())
    finally:
        loop.close()
        for s in stores:
            s.close()


def test_openmetrics_is_served_to_a_scraper_that_asks_for_it(running: Running) -> None:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse

    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    r = running.http.get("/metrics", headers={"Accept": accept})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert "batmon_readings_accepted" in {f.name for f in om_parse(r.text)}
