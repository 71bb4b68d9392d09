"""Notices across workers on PostgreSQL (issue 16, "Notices"): real `batmon serve` workers on
one database (tests/workers.py), each notice's first send held open by a local HTTP sink,
the worker sending it killed or stopped mid-send, and another worker delivering it once the
lease has run out. Delivery is at least once: the duplicates are counted, at the sink and
in /metrics."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx
import psycopg

from tests.conftest import ServeProcess
from tests.load import alarm_notices
from tests.support import Sink
from tests.test_serve_end_to_end import wait_for
from tests.workers import Workers, workers

LEASE_S = 2  # --notify-lease-s: short, so a takeover takes seconds
NOTICES = 4


def lease(i: int) -> list[str]:
    return ["--notify-lease-s", str(LEASE_S)]


def queue_held_notices(group: Workers, sink: Sink) -> list[int]:
    """NOTICES alarm notices written and claimed by worker 0, each send held open by the sink."""
    (first,) = group.start(1)
    sink.hang = True
    with httpx.Client(base_url=first.http_url, timeout=10, headers=group.auth) as http:
        # rto: Apprise waits for the held answer (its own read timeout is 4 s)
        ids = alarm_notices(http, sink.url("?rto=30"), NOTICES)
    wait_for(lambda: len(sink.hung) == NOTICES, "every notice's first send held at the sink")
    return ids


def outbox(group: Workers) -> list[dict[str, Any]]:
    with psycopg.connect(group.database_url, row_factory=psycopg.rows.dict_row) as conn:
        return conn.execute("SELECT id, title, state, attempts, claimed_by FROM outbox"
                            " ORDER BY id").fetchall()  # fmt: skip


def held_by(proc: ServeProcess, rows: list[dict[str, Any]]) -> bool:
    assert proc.proc is not None
    return all(r["state"] == "sending" and r["claimed_by"].split(":")[1] == str(proc.proc.pid) for r in rows)


def counter(proc: ServeProcess, name: str) -> float:
    """A counter's sum over its labels, from the worker's /metrics (loopback: allowed)."""
    text = httpx.get(f"{proc.http_url}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(rf"^{name}_total{{[^}}]*}} (\S+)$", text, re.M))


def took_them_all_over(proc: ServeProcess) -> None:
    """The worker claimed every notice again after a lease ran out, and counted no duplicate:
    its sends were the first to be recorded."""
    assert counter(proc, "batmon_notices_reclaimed") == NOTICES
    assert counter(proc, "batmon_notice_duplicates") == 0


def test_a_notice_whose_worker_is_killed_mid_send_is_delivered_by_another_after_the_lease(
    tmp_path: Path,
) -> None:
    sink = Sink()
    try:
        with workers(tmp_path, extra=lease) as group:
            queue_held_notices(group, sink)
            a, b = group.start(2)
            # A live worker keeps its sends: b's start requeued nothing, and a renews its
            # leases, so three leases later b has taken none of them.
            time.sleep(3 * LEASE_S)
            rows = outbox(group)
            assert len(rows) == NOTICES and held_by(a, rows), rows
            assert sink.posts() == [] and len(sink.hung) == NOTICES
            sink.hang = False
            group.kill(0)  # kill -9, its sends held at the sink
            killed = time.monotonic()
            wait_for(lambda: all(r["state"] == "sent" for r in outbox(group)), "b delivering them", 30)
            took = time.monotonic() - killed
            rows = outbox(group)
            assert all(r["attempts"] == 2 and r["claimed_by"].split(":")[1] == str(b.proc.pid)
                       for r in rows), rows  # fmt: skip
            delivered = [p["title"] for p in sink.posts()]
            assert sorted(delivered) == sorted(r["title"] for r in rows)  # every notice, once by b
            # The killed sends had reached the sink: each notice arrived there twice. Nobody can
            # count those (a died before it knew): b counts them as reclaimed, not as duplicates.
            seen_twice = set(delivered) & {p["title"] for p in sink.hung}
            assert len(seen_twice) == NOTICES
            took_them_all_over(b)
            print(f"\ntakeover after kill -9: {took:.1f} s (lease {LEASE_S} s); notices {NOTICES},"
                  f" delivered {len(set(delivered))}, arrived twice {len(seen_twice)}, reclaimed"
                  f" {NOTICES}, counted duplicates 0")
    finally:
        sink.close()


def test_a_send_that_outlives_its_lease_and_lands_late_is_counted_a_duplicate(tmp_path: Path) -> None:
    sink = Sink()
    try:
        with workers(tmp_path, extra=lease) as group:
            queue_held_notices(group, sink)
            a, b = group.start(2)
            assert a.proc is not None
            a.proc.send_signal(signal.SIGSTOP)  # a stalls mid-send: no renewal, its lease runs out
            try:
                sink.hang = False
                wait_for(lambda: all(r["state"] == "sent" for r in outbox(group)), "b delivering them", 30)
                assert len(sink.posts()) == NOTICES
                sink.late_status = 200  # a's held sends land after all
                sink.release.set()
            finally:
                a.proc.send_signal(signal.SIGCONT)
            wait_for(lambda: counter(a, "batmon_notice_duplicates") == NOTICES, "a counting its duplicates")
            rows = outbox(group)
            assert all(r["state"] == "sent" and r["attempts"] == 2 for r in rows), rows  # b's record stands
            titles = [p["title"] for p in sink.posts()]
            assert len(titles) == 2 * NOTICES and len(set(titles)) == NOTICES  # each twice: at least once
            took_them_all_over(b)
            print(f"\nstalled sender: notices {NOTICES}, delivered {len(set(titles))}, arrived twice"
                  f" {len(titles) - len(set(titles))}, counted duplicates {NOTICES} (by a), reclaimed"
                  f" {NOTICES} (by b)")
    finally:
        sink.close()
