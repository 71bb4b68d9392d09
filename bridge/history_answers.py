"""History answers as streams of bytes: raw or bucketed, JSON or CSV.

The store reads pages in index order on worker threads; the renderers here turn a
page of tuples into bytes on that same worker (orjson, or the csv module), so the
event loop only forwards finished chunks. The JSON body is the seed's envelope,
written piece by piece: each batmon's min_time/max_time come first, from a cheap
min/max query, then its data.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from bridge.errors import InvalidInput
from bridge.store.interface import METRICS, HistoryReads, Render, Row

if TYPE_CHECKING:
    from bridge.core import Batmon
    from bridge.models import HistoryQuery

RAW_CSV_HEADER = ("batmon_id", "time", "update_time", "batmon_voltage", "batmon_current",
                  "batmon_power", "batmon_soc", "batmon_details")  # fmt: skip
BUCKET_KEYS = ("time", "update_time", "count",
               *(f"batmon_{m}_{a}" for m in METRICS for a in ("min", "avg", "max")))  # fmt: skip
BUCKET_CSV_HEADER = ("batmon_id", *BUCKET_KEYS)


@dataclass(frozen=True)
class Streamed:
    """A response body produced chunk by chunk; the HTTP facade streams it as it comes."""

    media_type: str
    chunks: AsyncIterator[bytes]
    filename: str | None = None


# -- update_time without strftime per row ---------------------------------------
class _HourPrefixes(dict[int, str]):
    """"YYYY-MM-DDTHH:" per epoch hour, made once each (bounded: cleared when large)."""

    def __missing__(self, hour: int) -> str:
        if len(self) > 100_000:
            self.clear()
        text = datetime.fromtimestamp(hour * 3600, UTC).strftime("%Y-%m-%dT%H:")
        self[hour] = text
        return text


_HOURS = _HourPrefixes()
_MINUTES_SECONDS = tuple(f"{m:02d}:{s:02d}" for m in range(60) for s in range(60))


def utc_text(ts: float) -> str:
    """UTC ``YYYY-MM-DDTHH:MM:SS`` of epoch seconds (whole seconds, rounded down)."""
    second = int(ts)
    return _HOURS[second // 3600] + _MINUTES_SECONDS[second % 3600]


# -- renderers: a page of store rows -> bytes (they run on the store's workers) ---
def raw_json(rows: list[Row]) -> bytes:
    """Raw rows as the seed's data objects, comma-separated, without brackets."""
    hours, minutes_seconds = _HOURS, _MINUTES_SECONDS
    return orjson.dumps([
        {"batmon_voltage": v, "batmon_current": c, "batmon_power": p, "batmon_soc": s,
         "batmon_details": d, "update_time": hours[(i := int(ts)) // 3600] + minutes_seconds[i % 3600]}
        for ts, v, c, p, s, d, _ in rows
    ])[1:-1]  # fmt: skip


def bucket_json(rows: list[Row]) -> bytes:
    """Bucket rows as data objects (time, update_time, count, min/avg/max per metric)."""
    return orjson.dumps([
        {"time": t, "update_time": utc_text(t), "count": n,
         "batmon_voltage_min": v0, "batmon_voltage_avg": v1, "batmon_voltage_max": v2,
         "batmon_current_min": c0, "batmon_current_avg": c1, "batmon_current_max": c2,
         "batmon_power_min": p0, "batmon_power_avg": p1, "batmon_power_max": p2,
         "batmon_soc_min": s0, "batmon_soc_avg": s1, "batmon_soc_max": s2}
        for t, n, v0, v1, v2, c0, c1, c2, p0, p1, p2, s0, s1, s2 in rows
    ])[1:-1]  # fmt: skip


def raw_csv(batmon_id: int) -> Render:
    """A renderer of raw rows as CSV lines of one batmon."""

    def render(rows: list[Row]) -> bytes:
        out = io.StringIO()
        csv.writer(out).writerows(
            (batmon_id, int(ts), utc_text(ts), v, c, p, s, d) for ts, v, c, p, s, d, _ in rows
        )
        return out.getvalue().encode()

    return render


def bucket_csv(batmon_id: int) -> Render:
    """A renderer of bucket rows as CSV lines of one batmon."""

    def render(rows: list[Row]) -> bytes:
        out = io.StringIO()
        csv.writer(out).writerows((batmon_id, r[0], utc_text(r[0]), *r[1:]) for r in rows)
        return out.getvalue().encode()

    return render


def _csv_line(values: Sequence[str]) -> bytes:
    out = io.StringIO()
    csv.writer(out).writerow(values)
    return out.getvalue().encode()


# -- the request -------------------------------------------------------------------
@dataclass(frozen=True)
class HistoryPlan:
    """What to read: lo <= ts < hi (whole-second inclusive ends), raw or in buckets."""

    lo: float
    hi: float
    bucket: int | None
    csv: bool

    @classmethod
    def of(cls, query: HistoryQuery, now: float) -> HistoryPlan:
        """Range and bucket of a validated query; ``points`` picks the bucket."""
        lo = query.min_epoch_tm_sec
        hi = int(query.max_epoch_tm_sec if query.max_epoch_tm_sec is not None else now) + 1
        bucket = query.bucket
        if bucket is None and query.points is not None:  # both given: bucket wins
            bucket = max(1, math.ceil((hi - math.floor(lo)) / query.points))
        return cls(lo, hi, bucket, query.format == "csv")


async def check_size(reader: HistoryReads, batmons: Sequence[Batmon], plan: HistoryPlan,
                     limit: int | None) -> None:  # fmt: skip
    """Refuse a raw answer over ``limit`` readings (when a limit is set)."""
    if limit is None or plan.bucket is not None:
        return
    total = 0
    for batmon in batmons:
        total += await reader.raw_count(batmon.id, plan.lo, plan.hi)
    if total > limit:
        raise InvalidInput(
            f"The range holds {total} readings, more than the {limit} one answer can carry;"
            " narrow min_epoch_tm_sec/max_epoch_tm_sec, give a batmon_id, or ask for buckets."
        )


def stream(reader: HistoryReads, batmons: Sequence[Batmon], plan: HistoryPlan) -> Streamed:
    """The answer to a history request, as a stream of JSON or CSV bytes."""
    batmons = list(batmons)
    if plan.csv:
        return Streamed("text/csv; charset=utf-8", _csv_body(reader, batmons, plan),
                        "batmon-history.csv")  # fmt: skip
    return Streamed("application/json", _json_body(reader, batmons, plan))


async def _json_body(reader: HistoryReads, batmons: list[Batmon], plan: HistoryPlan
                     ) -> AsyncIterator[bytes]:  # fmt: skip
    yield b'{"success":['
    for index, batmon in enumerate(batmons):
        head: dict[str, Any] = {"batmon_id": batmon.id, "batmon_name": batmon.name,
                                "batmon_type": batmon.type, "min_time": None, "max_time": None}  # fmt: skip
        pages: AsyncIterator[bytes] | None = None
        if plan.bucket is None:
            span = await reader.raw_span(batmon.id, plan.lo, plan.hi)
            if span is not None:
                head.update(min_time=int(span[0]), max_time=int(span[1]))
                pages = reader.raw_pages(batmon.id, span[0], span[1], raw_json)
        else:
            bucket = plan.bucket
            found = await reader.bucket_plan(batmon.id, plan.lo, plan.hi, bucket)
            if found is not None:
                first, last, with_rollups = found
                head.update(min_time=int(first) // bucket * bucket, max_time=int(last) // bucket * bucket)
                pages = reader.bucket_pages(batmon.id, plan.lo, first, last, bucket, with_rollups,
                                            bucket_json)  # fmt: skip
            head["bucket"] = bucket
        head["data"] = []
        # The head without its closing "]}", so the data rows follow inside "data".
        yield (b"," if index else b"") + orjson.dumps(head)[:-2]
        if pages is not None:
            separator = b""
            async for chunk in pages:
                yield separator + chunk
                separator = b","
        yield b"]}"
    yield b"]}"


async def _csv_body(reader: HistoryReads, batmons: list[Batmon], plan: HistoryPlan
                    ) -> AsyncIterator[bytes]:  # fmt: skip
    yield _csv_line(RAW_CSV_HEADER if plan.bucket is None else BUCKET_CSV_HEADER)
    for batmon in batmons:
        if plan.bucket is None:
            span = await reader.raw_span(batmon.id, plan.lo, plan.hi)
            if span is None:
                continue
            pages = reader.raw_pages(batmon.id, span[0], span[1], raw_csv(batmon.id))
        else:
            found = await reader.bucket_plan(batmon.id, plan.lo, plan.hi, plan.bucket)
            if found is None:
                continue
            first, last, with_rollups = found
            pages = reader.bucket_pages(batmon.id, plan.lo, first, last, plan.bucket, with_rollups,
                                        bucket_csv(batmon.id))  # fmt: skip
        async for chunk in pages:
            yield chunk
