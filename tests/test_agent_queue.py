"""The agent's durable queue on a real SQLite file: ordered, bounded with a count of what
was dropped, batches that fit the server's limits, and nothing lost by reopening."""

from __future__ import annotations

import json
from pathlib import Path

from bridge.models import MAX_BATCH_READINGS, MAX_PAYLOAD_BYTES, readings_from_payload
from bridge.store.agent_queue import ReadingQueue


def reading(n: int, details_bytes: int = 0) -> str:
    details = {"n": n, "pad": "x" * details_bytes}
    return json.dumps({"ts": 1_700_000_000 + n, "voltage": 12.0, "details": details})


def test_readings_come_out_oldest_first_and_leave_only_when_removed(tmp_path: Path) -> None:
    queue = ReadingQueue.open(tmp_path, max_readings=100)
    for n in range(5):
        queue.push(reading(n))
    batch = queue.oldest(3, MAX_PAYLOAD_BYTES)
    assert [json.loads(p)["details"]["n"] for _, p in batch] == [0, 1, 2]
    assert len(queue) == 5  # taking a batch removes nothing
    assert queue.remove_through(batch[0][0], batch[-1][0]) == 3
    assert [json.loads(p)["details"]["n"] for _, p in queue.oldest(10, MAX_PAYLOAD_BYTES)] == [3, 4]


def test_a_full_queue_drops_the_oldest_and_counts_them(tmp_path: Path) -> None:
    queue = ReadingQueue.open(tmp_path, max_readings=10)
    dropped = [queue.push(reading(n)) for n in range(25)]
    assert sum(dropped) == 15 and len(queue) == 10
    assert queue.counters() == {"queued": 25, "sent": 0, "dropped": 15}
    assert json.loads(queue.oldest(1, MAX_PAYLOAD_BYTES)[0][1])["details"]["n"] == 15


def test_the_queue_and_its_counts_survive_a_reopen(tmp_path: Path) -> None:
    queue = ReadingQueue.open(tmp_path, max_readings=3)
    for n in range(5):
        queue.push(reading(n))
    queue.close()
    again = ReadingQueue.open(tmp_path, max_readings=3)
    assert len(again) == 3 and again.counters()["dropped"] == 2
    assert [json.loads(p)["details"]["n"] for _, p in again.oldest(10, MAX_PAYLOAD_BYTES)] == [2, 3, 4]


def test_an_old_ack_cannot_remove_a_newer_reading(tmp_path: Path) -> None:
    """Ids are never reused, so removing an acknowledged range spares later rows."""
    queue = ReadingQueue.open(tmp_path, max_readings=100)
    queue.push(reading(0))
    [(first, _)] = queue.oldest(10, MAX_PAYLOAD_BYTES)
    queue.remove_through(first, first)
    queue.push(reading(1))
    assert queue.remove_through(first, first) == 0 and len(queue) == 1


def test_batches_fit_the_servers_payload_and_count_limits(tmp_path: Path) -> None:
    queue = ReadingQueue.open(tmp_path, max_readings=10_000)
    for n in range(3000):
        queue.push(reading(n, details_bytes=400 if n % 2 else 0))
    sent = 0
    while len(queue):
        batch = queue.oldest(MAX_BATCH_READINGS, MAX_PAYLOAD_BYTES)
        payload = ("[" + ",".join(p for _, p in batch) + "]").encode()
        assert len(payload) <= MAX_PAYLOAD_BYTES and len(batch) <= MAX_BATCH_READINGS
        readings = readings_from_payload(payload)  # the server's own check
        assert [r.ts for r in readings] == [1_700_000_000 + sent + i for i in range(len(batch))]
        queue.remove_through(batch[0][0], batch[-1][0])
        sent += len(batch)
    assert sent == 3000


def test_small_readings_are_capped_at_a_thousand_per_batch(tmp_path: Path) -> None:
    queue = ReadingQueue.open(tmp_path, max_readings=5000)
    for n in range(1500):
        queue.push(json.dumps({"ts": 1_700_000_000 + n, "soc": 50}))
    assert len(queue.oldest(MAX_BATCH_READINGS, MAX_PAYLOAD_BYTES)) == 1000
