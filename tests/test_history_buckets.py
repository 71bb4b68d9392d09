"""Downsampled history (bucket / points) and CSV, checked against brute force in Python.

The contract the dashboard codes against: per batmon the seed's envelope plus
"bucket"; each row {time, update_time, count, batmon_<metric>_min/avg/max}; buckets
aligned at floor(ts/bucket)*bucket; empty buckets omitted; min/avg/max over the
non-null values, null when a bucket has none.
"""

from __future__ import annotations

import csv
import io
import math
from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Api
from tests.test_history_stream import HISTORY, T0, insert

METRICS = ("voltage", "current", "power", "soc")


def brute_buckets(rows: list[tuple[Any, ...]], lo: float, hi: float, bucket: int) -> list[dict[str, Any]]:
    """The contract, computed row by row in Python."""
    groups: dict[int, list[tuple[Any, ...]]] = {}
    for row in rows:
        ts = row[1]
        if lo <= ts < hi:
            groups.setdefault(math.floor(ts) // bucket * bucket, []).append(row)
    out = []
    for start in sorted(groups):
        members = groups[start]
        item: dict[str, Any] = {
            "time": start,
            "update_time": datetime.fromtimestamp(start, UTC).strftime("%Y-%m-%dT%H:%M:%S"),
            "count": len(members),
        }
        for i, metric in enumerate(METRICS):
            values = [m[2 + i] for m in members if m[2 + i] is not None]
            item[f"batmon_{metric}_min"] = min(values) if values else None
            item[f"batmon_{metric}_avg"] = sum(values) / len(values) if values else None
            item[f"batmon_{metric}_max"] = max(values) if values else None
        out.append(item)
    return out


def assert_same_buckets(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert [list(g) for g in got] == [list(w) for w in want]  # same keys, same order
    for g, w in zip(got, want, strict=True):
        for key, value in w.items():
            if key.endswith("_avg") and value is not None:
                assert math.isclose(g[key], value, rel_tol=1e-9, abs_tol=1e-9), (key, g, w)
            else:
                assert g[key] == value, (key, g, w)


value = st.one_of(st.none(), st.floats(-1000, 1000, allow_nan=False).map(lambda x: round(x, 3)))
reading = st.tuples(st.floats(0, 400, allow_nan=False), value, value, value, value)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(readings=st.lists(reading, max_size=60), bucket=st.integers(1, 150),
       lo=st.floats(-20, 420, allow_nan=False), width=st.floats(0, 450, allow_nan=False))  # fmt: skip
def test_buckets_match_brute_force_including_empty_buckets_and_range_edges(
    api: Api, readings: list[tuple[Any, ...]], bucket: int, lo: float, width: float
) -> None:
    api.core.history_reader.page_seconds = 97  # many small pages, odd boundaries
    batmon_id, _ = api.add_batmon()
    rows = [(batmon_id, T0 + off, v, c, p, s, None) for off, v, c, p, s in readings]
    insert(api, rows)
    low, high = T0 + lo, T0 + lo + width
    r = api.client.get(HISTORY, headers=api.auth, params={
        "batmon_id": batmon_id, "min_epoch_tm_sec": low, "max_epoch_tm_sec": high, "bucket": bucket,
    })  # fmt: skip
    assert r.status_code == 200, r.text
    [entry] = r.json()["success"]
    # A reading written twice (same ts and values) is one reading: the store keeps it once.
    want = brute_buckets(list(dict.fromkeys(rows)), low, int(high) + 1, bucket)
    assert list(entry) == ["batmon_id", "batmon_name", "batmon_type", "min_time", "max_time",
                           "bucket", "data"]  # fmt: skip
    assert entry["bucket"] == bucket
    assert_same_buckets(entry["data"], want)
    assert entry["min_time"] == (want[0]["time"] if want else None)
    assert entry["max_time"] == (want[-1]["time"] if want else None)


def test_points_pick_the_bucket_from_the_range(api: Api) -> None:
    batmon_id, _ = api.add_batmon()
    rows = [(batmon_id, T0 + i, float(i), None, None, None, None) for i in range(0, 1000, 3)]
    insert(api, rows)
    [entry] = api.client.get(HISTORY, headers=api.auth, params={
        "batmon_id": batmon_id, "min_epoch_tm_sec": T0, "max_epoch_tm_sec": T0 + 999, "points": 7,
    }).json()["success"]  # fmt: skip
    assert entry["bucket"] == math.ceil(1000 / 7)
    assert_same_buckets(entry["data"], brute_buckets(rows, T0, T0 + 1000, entry["bucket"]))


def test_bucket_and_points_are_validated(api: Api) -> None:
    base = {"min_epoch_tm_sec": T0}
    for extra, field in (({"bucket": 0}, "bucket"), ({"bucket": "x"}, "bucket"),
                         ({"points": 0}, "points"), ({"points": 10_001}, "points"),
                         ({"format": "xml"}, "format")):
        r = api.client.get(HISTORY, headers=api.auth, params={**base, **extra})
        assert r.status_code == 400 and field in r.json()["error"], (extra, r.text)


def test_bucket_wins_when_points_is_given_too(api: Api) -> None:
    """Both are valid by the OpenAPI document (no schema can forbid the pair), so the
    pair is not refused: bucket is taken."""
    batmon_id, _ = api.add_batmon()
    r = api.client.get(HISTORY, headers=api.auth,
                       params={"min_epoch_tm_sec": T0, "batmon_id": batmon_id, "bucket": 60, "points": 10})
    assert r.status_code == 200 and r.json()["success"][0]["bucket"] == 60, r.text


def test_openapi_documents_bucket_points_and_format(api: Api) -> None:
    doc = api.client.get("/openapi.json").json()
    params = {p["name"]: p for p in doc["paths"][HISTORY]["get"]["parameters"]}
    assert {"bucket", "points", "format"} <= set(params)
    assert params["points"]["schema"]["maximum"] == 10_000
    assert "text/csv" in doc["paths"][HISTORY]["get"]["responses"]["200"]["content"]


# -- CSV -----------------------------------------------------------------------------
def _number(text: str) -> float | None:
    return None if text == "" else float(text)


def test_raw_csv_parses_back_to_the_json_values(api: Api) -> None:
    api.core.history_reader.page_rows = 4
    first, _ = api.add_batmon(batmon_name="One")
    second, _ = api.add_batmon(batmon_name="Two")
    rows = [(first, T0 + i + 0.25, 12.0 + i / 7, None if i % 3 else -2.5, 0.1 + 0.2, 50.0,
             '{"note": "a, \\"quoted\\" text"}' if i == 4 else None) for i in range(11)]
    rows += [(second, T0 + i, 1e-7 * i, 1e20, None, 99.5, None) for i in range(5)]
    insert(api, rows)
    params = {"min_epoch_tm_sec": T0, "max_epoch_tm_sec": T0 + 100}
    as_json = api.client.get(HISTORY, headers=api.auth, params=params).json()["success"]
    r = api.client.get(HISTORY, headers=api.auth, params={**params, "format": "csv"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert "attachment" in r.headers["content-disposition"]
    parsed = list(csv.DictReader(io.StringIO(r.text)))
    want = [(e["batmon_id"], row) for e in as_json for row in e["data"]]
    assert len(parsed) == len(want) == 16
    for line, (batmon_id, row) in zip(parsed, want, strict=True):
        assert int(line["batmon_id"]) == batmon_id
        assert line["update_time"] == row["update_time"]
        moment = datetime.fromtimestamp(int(line["time"]), UTC)
        assert moment.strftime("%Y-%m-%dT%H:%M:%S") == row["update_time"]
        for metric in METRICS:
            assert _number(line[f"batmon_{metric}"]) == row[f"batmon_{metric}"]
        assert (line["batmon_details"] or None) == row["batmon_details"]


def test_bucketed_csv_by_accept_header_parses_back_to_the_json_values(api: Api) -> None:
    batmon_id, _ = api.add_batmon()
    rows = [(batmon_id, T0 + i * 7.5, float(i % 13), None, i / 3, None, None) for i in range(200)]
    insert(api, rows)
    params = {"batmon_id": batmon_id, "min_epoch_tm_sec": T0, "max_epoch_tm_sec": T0 + 2000,
              "bucket": 60}  # fmt: skip
    [entry] = api.client.get(HISTORY, headers=api.auth, params=params).json()["success"]
    r = api.client.get(HISTORY, headers={**api.auth, "Accept": "text/csv"}, params=params)
    assert r.headers["content-type"].startswith("text/csv")
    reader = csv.reader(io.StringIO(r.text))
    header = next(reader)
    assert header == ["batmon_id", *entry["data"][0]]
    lines = list(reader)
    assert len(lines) == len(entry["data"]) > 10
    for line, row in zip(lines, entry["data"], strict=True):
        assert int(line[0]) == batmon_id
        assert int(line[1]) == row["time"] and line[2] == row["update_time"] and int(line[3]) == row["count"]
        for text, key in zip(line[4:], header[4:], strict=True):
            assert _number(text) == row[key], key


def test_csv_of_nothing_is_just_the_header(api: Api) -> None:
    api.add_batmon()
    r = api.client.get(HISTORY, headers=api.auth, params={"min_epoch_tm_sec": T0, "format": "csv"})
    assert r.status_code == 200
    assert list(csv.reader(io.StringIO(r.text))) == [
        ["batmon_id", "time", "update_time", "batmon_voltage", "batmon_current", "batmon_power",
         "batmon_soc", "batmon_details"]]  # fmt: skip
