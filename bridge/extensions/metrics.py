"""Prometheus metrics of one running service.

Counters and histograms are fed by events on the bus (readings, alarms, status
changes, commits, notice outcomes, HTTP refusals); gauges and counters someone else
already keeps are read at scrape time (the core's registry, the writer's queue and
stats, the MQTT doors' counters, the notice outbox), so nothing is counted twice. The
outbox is read off the loop by ``refresh``, which the facade awaits before each scrape.

Each ``Metrics`` has its own ``CollectorRegistry``: several services in one process
(tests) keep their figures apart, and prometheus_client's global registry is unused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from bridge.events import (
    NO_SUBSCRIPTION,
    AlarmChanged,
    BankAlarmChanged,
    CommitObserved,
    HttpRejected,
    NoticeOutcome,
    ReadingAccepted,
    StatusChanged,
    Subscription,
)
from bridge.store.interface import CHANNELS

if TYPE_CHECKING:
    from bridge.core import Core

log = logging.getLogger(__name__)

# A `_created` sample beside every counter doubles the text and no query here uses it.
# (prometheus_client keeps this switch process-wide; the process is ours.)
disable_created_metrics()

MqttStats = Callable[[], Mapping[str, Any] | None]
# MqttBridge.stats counters that are refusals of a device's update, by `reason` label.
MQTT_REJECTIONS = {
    "rejected": "invalid",
    "dropped_bad_topic": "bad_topic",
    "dropped_unknown_batmon": "not_found",
    "dropped_wrong_token": "wrong_token",
    "dropped_backlog": "backlog_full",
    "dropped_duplicate": "duplicate",
    "dropped_retained": "retained_replay",
    "not_stored": "unavailable",  # the writer could not store it: not acked, the broker resends
}
# What happened to a notice: queued or skipped when written, then per attempt sent,
# retry (failed, will be tried again) or failed (given up).
NOTICE_OUTCOMES = ("queued", "skipped", "sent", "retry", "failed")
PENDING_STATES = ("queued", "sending")
ALARM_KINDS = ("triggered", "repeated", "cleared")
LAG_INTERVAL_S = 0.25  # how often the loop-lag probe wakes up
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
COMMIT_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
COMMIT_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """The service's metrics: an extension that listens to the bus, plus ``render`` (and
    ``refresh``, awaited before it) for the HTTP facade's /metrics."""

    def __init__(self, core: Core, *, mqtt_stats: MqttStats = lambda: None,
                 per_batmon: bool = False) -> None:  # fmt: skip
        self.core = core
        self.mqtt_stats = mqtt_stats
        self.per_batmon = per_batmon
        # Notices pending by (state, channel), read off the loop by refresh(); None unread.
        self._pending: dict[tuple[str, str], int] | None = None
        self._subscription: Subscription = NO_SUBSCRIPTION
        self._lag_task: asyncio.Task[None] | None = None
        self._http_rejections: Counter[str] = Counter()

        self.registry = registry = CollectorRegistry()
        self.readings_accepted = PromCounter(
            "batmon_readings_accepted", "Readings committed, by the door they came in.",
            ["door"], registry=registry)  # fmt: skip
        self.alarm_changes = PromCounter(
            "batmon_alarm_changes", "Alarms that triggered, repeated their notice, or cleared.",
            ["kind"], registry=registry)  # fmt: skip
        self.status_changes = PromCounter(
            "batmon_status_changes", "Batmons that went online or offline.",
            ["status"], registry=registry)  # fmt: skip
        self.loop_lag = Histogram(
            "batmon_event_loop_lag_seconds",
            f"How late the event loop ran a timer due every {LAG_INTERVAL_S} s.",
            buckets=LAG_BUCKETS, registry=registry)  # fmt: skip
        self.commit_rows = Histogram(
            "batmon_commit_rows", "Readings written per commit by the writer.",
            buckets=COMMIT_ROWS_BUCKETS, registry=registry)  # fmt: skip
        self.commit_seconds = Histogram(
            "batmon_commit_seconds", "Time one writer commit took.",
            buckets=COMMIT_SECONDS_BUCKETS, registry=registry)  # fmt: skip
        self.notices = PromCounter(
            "batmon_notices", "Notices written to the outbox and the outcome of each attempt.",
            ["channel", "outcome"], registry=registry)  # fmt: skip
        notice_duplicates = PromCounter(
            "batmon_notice_duplicates",
            "Deliveries of a notice another worker had delivered already (its send outlived its lease).",
            ["channel"], registry=registry)  # fmt: skip
        notices_reclaimed = PromCounter(
            "batmon_notices_reclaimed",
            "Notices claimed again after their worker's lease ran out mid-send (may arrive twice).",
            ["channel"], registry=registry)  # fmt: skip
        # Outcomes across workers (docs/SCALE-OUT.md, "Notices"): not an attempt's end, counted apart.
        self._lease_counters = {"duplicate": notice_duplicates, "reclaimed": notices_reclaimed}
        writer_queue = Gauge("batmon_writer_queue_depth", "Readings waiting for the writer.",
                             registry=registry)  # fmt: skip
        writer_queue.set_function(lambda: self.core.writer.pending_rows)
        # Children made once: labels() costs ~10 us a call, an increment ~1 us.
        self._accepted = {door: self.readings_accepted.labels(door=door) for door in ("http", "mqtt")}
        self._alarms = {kind: self.alarm_changes.labels(kind=kind) for kind in ALARM_KINDS}
        self._status = {s: self.status_changes.labels(status=s.lower()) for s in ("Online", "Offline")}
        for channel in CHANNELS:
            for outcome in NOTICE_OUTCOMES:
                self.notices.labels(channel=channel, outcome=outcome)
            for counter in self._lease_counters.values():
                counter.labels(channel=channel)
        registry.register(_ScrapeTimeCollector(self))
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)

    # -- extension -------------------------------------------------------------------
    async def start(self) -> None:
        """Subscribe to the core's events and start the loop-lag probe."""
        self._subscription = self.core.bus.subscribe_all({
            ReadingAccepted: self._on_reading,
            AlarmChanged: self._on_alarm,
            BankAlarmChanged: self._on_alarm,  # a bank's alarms count with the batmons'
            StatusChanged: self._on_status,
            CommitObserved: self._on_commit,
            NoticeOutcome: self._on_notice,
            HttpRejected: self._on_http_rejected,
        })  # fmt: skip
        self._lag_task = asyncio.create_task(self._probe_loop_lag(), name="metrics-loop-lag")

    async def stop(self) -> None:
        """Unsubscribe and stop the probe; the figures stay readable."""
        self._subscription.cancel()
        if self._lag_task is not None:
            self._lag_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lag_task
            self._lag_task = None

    async def refresh(self) -> None:
        """Read the scrape-time figures the store keeps (off the event loop)."""
        try:
            # A read on the core's own handle: a scrape never waits behind the writer's queue.
            self._pending = await self.core.read_store(lambda store: store.outbox.pending_by_channel())
        except Exception as exc:  # a scrape must not fail for one figure
            log.warning("metrics could not count notices: %s", exc)
            self._pending = None

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition for a scraper's Accept header: (body, content type).

        Call it on the event loop: scrape-time gauges read the core's registry.
        """
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    # -- event handlers (synchronous, a counter increment each) ------------------------
    def _on_reading(self, event: ReadingAccepted) -> None:
        self._accepted[event.door].inc()

    def _on_alarm(self, event: AlarmChanged | BankAlarmChanged) -> None:
        self._alarms[event.kind].inc()

    def _on_status(self, event: StatusChanged) -> None:
        if event.status != event.previous:
            self._status[event.status].inc()

    def _on_commit(self, event: CommitObserved) -> None:
        self.commit_rows.observe(event.rows)
        self.commit_seconds.observe(event.seconds)

    def _on_notice(self, event: NoticeOutcome) -> None:
        counter = self._lease_counters.get(event.outcome)
        if counter is not None:
            counter.labels(channel=event.channel).inc()
        else:
            self.notices.labels(channel=event.channel, outcome=event.outcome).inc()

    def _on_http_rejected(self, event: HttpRejected) -> None:
        self._http_rejections[event.reason] += 1

    async def _probe_loop_lag(self) -> None:
        """Sleep a fixed interval and record how much later than asked we woke up:
        the time something held the event loop (a slow handler, a blocking call)."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(LAG_INTERVAL_S)
            self.loop_lag.observe(max(0.0, loop.time() - started - LAG_INTERVAL_S))


class _ScrapeTimeCollector:
    """Figures read when scraped from whoever already keeps them."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        stats = m.mqtt_stats()
        yield from self._batmons(m.core)
        yield self._rejections(m, stats)
        yield from self._writer(m.core)
        yield from self._mqtt(stats)
        notices = self._notices(m._pending)
        if notices is not None:
            yield notices
        if m.per_batmon:
            yield from self._per_batmon(m.core)

    @staticmethod
    def _batmons(core: Core) -> Iterator[Metric]:
        by_status = Counter(b.status for b in core.batmons.values())
        batmons = GaugeMetricFamily("batmon_batmons", "Batmons by the status last announced.",
                                    labels=["status"])  # fmt: skip
        for status in ("Online", "Offline"):
            batmons.add_metric([status.lower()], by_status[status])
        yield batmons
        active = sum(a.triggered for a in list(core.alarms.values()))  # batmons' and banks'
        yield GaugeMetricFamily("batmon_alarms_active", "Alarms triggered now (acknowledged or not).",
                                value=active)  # fmt: skip

    @staticmethod
    def _rejections(m: Metrics, stats: Mapping[str, Any] | None) -> Metric:
        family = CounterMetricFamily(
            "batmon_rejections", "Requests and device updates refused, by door and reason.",
            labels=["door", "reason"])  # fmt: skip
        for reason, count in sorted(m._http_rejections.items()):
            family.add_metric(["http", reason], count)
        if stats is not None:
            for key, reason in MQTT_REJECTIONS.items():
                if key in stats:
                    family.add_metric(["mqtt", reason], stats[key])
        return family

    @staticmethod
    def _writer(core: Core) -> Iterator[Metric]:
        stats = core.writer.stats
        yield CounterMetricFamily("batmon_commit_failures", "Writer commits that failed (nothing acked).",
                                  value=stats.failed_commits)  # fmt: skip
        yield CounterMetricFamily("batmon_writer_refused",
                                  "Submissions refused because the writer's queue was full.",
                                  value=core.writer.refused_overloaded)  # fmt: skip
        yield GaugeMetricFamily("batmon_writer_failing", "1 while the writer's last commit failed.",
                                value=int(stats.failing))  # fmt: skip

    @staticmethod
    def _mqtt(stats: Mapping[str, Any] | None) -> Iterator[Metric]:
        connected = bool(stats and stats.get("connected"))
        yield GaugeMetricFamily("batmon_mqtt_connected", "1 while the bridge's MQTT client is connected.",
                                value=int(connected))  # fmt: skip
        if stats is None:
            return
        for key, help_text in (
            ("connects", "Connections of the bridge's MQTT client to the broker."),
            ("disconnects", "Connections of the bridge's MQTT client that were lost or closed."),
            ("received", "Update messages the bridge received from the broker."),
            ("redelivered", "Update messages the broker sent again (DUP set): ones a worker took"
                            " and never acked, such as a killed worker's, redelivered after its restart."),
        ):
            messages = key in ("received", "redelivered")
            name = f"batmon_mqtt_messages_{key}" if messages else f"batmon_mqtt_{key}"
            yield CounterMetricFamily(name, help_text, value=stats.get(key, 0))

    @staticmethod
    def _notices(counts: dict[tuple[str, str], int] | None) -> Metric | None:
        if counts is None:
            return None
        family = GaugeMetricFamily("batmon_notices_pending",
                                   "Notices waiting to be sent (queued) or being sent (sending).",
                                   labels=["state", "channel"])  # fmt: skip
        for state in PENDING_STATES:
            for channel in CHANNELS:
                family.add_metric([state, channel], counts.get((state, channel), 0))
        return family

    @staticmethod
    def _per_batmon(core: Core) -> Iterator[Metric]:
        batmons = list(core.batmons.values())
        info = GaugeMetricFamily("batmon_info", "Name and type of each batmon (always 1).",
                                 labels=["batmon_id", "batmon_name", "batmon_type"])  # fmt: skip
        online = GaugeMetricFamily("batmon_online", "1 while the batmon is Online.",
                                   labels=["batmon_id"])  # fmt: skip
        last = GaugeMetricFamily("batmon_last_reading_timestamp_seconds",
                                 "Epoch time of the batmon's latest reading.",
                                 labels=["batmon_id"])  # fmt: skip
        # Named like the API's fields (batmon_voltage...), one series per batmon.
        values = {metric: GaugeMetricFamily(f"batmon_{metric}",
                                            f"The batmon's latest {metric} (in its own units).",
                                            labels=["batmon_id"])
                  for metric in ("voltage", "current", "power", "soc")}  # fmt: skip
        for b in batmons:
            batmon_id = str(b.id)
            info.add_metric([batmon_id, b.name, b.type], 1)
            online.add_metric([batmon_id], int(b.status == "Online"))
            if b.last_reading is None:
                continue  # no reading yet: its 0.0 values are placeholders, not measurements
            last.add_metric([batmon_id], b.last_reading)
            for metric, family in values.items():
                family.add_metric([batmon_id], getattr(b, metric))
        yield from (info, online, last, *values.values())
