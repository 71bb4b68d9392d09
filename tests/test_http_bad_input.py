"""Bad input: a 4xx ``{"error": ...}`` naming the field, and nothing changes."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Api


def snapshot(api: Api, batmon_id: int) -> tuple[Any, ...]:
    """What a bad request must not change: count, the batmon object, its history."""
    status = api.client.get("/interface/batmon/status", headers=api.auth,
                            params={"batmon_id": batmon_id}).json()["success"]  # fmt: skip
    count = api.client.get("/interface/batmon/count", headers=api.auth).json()["success"]
    return count, status, api.core.store.reading_count(batmon_id)


UPDATE_CASES = [
    # (fields beyond id+token, status, word the error must contain)
    ({}, 400, "batmon_voltage"),
    ({"batmon_voltage": "abc"}, 400, "batmon_voltage"),
    ({"batmon_voltage": "NaN"}, 400, "batmon_voltage"),
    ({"batmon_current": "Infinity"}, 400, "batmon_current"),
    ({"batmon_power": "-inf"}, 400, "batmon_power"),
    ({"batmon_soc": 150}, 400, "batmon_soc"),
    ({"batmon_soc": -1}, 400, "batmon_soc"),
    ({"soc": "101"}, 400, "soc"),
    ({"batmon_voltage": True}, 400, "batmon_voltage"),
    ({"batmon_voltage": [1]}, 400, "batmon_voltage"),
    ({"batmon_details": "[1, 2]"}, 400, "batmon_details"),
    ({"batmon_details": "not json"}, 400, "batmon_details"),
    ({"batmon_details": "x" * 17000}, 400, "batmon_details"),
    ({"batmon_details": 5}, 400, "batmon_details"),
    ({"batmon_details": "[" * 5000}, 400, "batmon_details"),
    ({"batmon_details": "{'a': " * 3000}, 400, "batmon_details"),
    ({"batmon_soc": 5, "ts": "soon"}, 400, "ts"),
    ({"batmon_soc": 5, "ts": 9_999_999_999}, 400, "ts"),
    ({"unknown_field": 1}, 400, "batmon_voltage"),
]


@pytest.mark.parametrize("fields,status,word", UPDATE_CASES)
def test_bad_update_is_refused_and_changes_nothing(api: Api, fields: dict[str, Any],
                                                   status: int, word: str) -> None:
    batmon_id, token = api.add_batmon()
    before = snapshot(api, batmon_id)
    r = api.client.post("/interface/update/batmon",
                        json={"batmon_id": batmon_id, "batmon_token": token, **fields})
    assert r.status_code == status, r.text
    assert word in r.json()["error"]
    assert snapshot(api, batmon_id) == before


def test_nan_as_a_json_literal_names_the_field(api: Api) -> None:
    batmon_id, token = api.add_batmon()
    body = f'{{"batmon_id": {batmon_id}, "batmon_token": "{token}", "batmon_voltage": NaN}}'
    r = api.client.post("/interface/update/batmon", content=body,
                        headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "batmon_voltage" in r.json()["error"]
    assert api.core.store.reading_count(batmon_id) == 0


ADD_CASES = [
    ({}, "batmon_name"),
    ({"batmon_name": ""}, "batmon_name"),
    ({"batmon_name": "x" * 101}, "batmon_name"),
    ({"batmon_name": "b", "update_period": 0}, "update_period"),
    ({"batmon_name": "b", "update_period": -5}, "update_period"),
    ({"batmon_name": "b", "update_period": "soon"}, "update_period"),
    ({"batmon_name": "b", "update_period": 31_536_001}, "update_period"),
    ({"batmon_name": "b", "update_period": 10**30}, "update_period"),
    ({"batmon_name": "b", "update_period": 1.5}, "update_period"),
    ({"batmon_name": "b", "batmon_token": "a/b"}, "batmon_token"),
    ({"batmon_name": "b", "batmon_token": "a+b"}, "batmon_token"),
    ({"batmon_name": "b", "batmon_token": "a#b"}, "batmon_token"),
    ({"batmon_name": "b", "batmon_token": "a b"}, "batmon_token"),
    ({"batmon_name": "b", "batmon_token": "a\tb"}, "batmon_token"),
    ({"batmon_name": "b", "batmon_token": ""}, "batmon_token"),
    ({"batmon_name": "b", "batmon_token": "short"}, "batmon_token"),
    ({"batmon_name": ["b"]}, "batmon_name"),
]


@pytest.mark.parametrize("fields,word", ADD_CASES)
def test_bad_add_is_400_and_creates_nothing(api: Api, fields: dict[str, Any], word: str) -> None:
    r = api.client.post("/interface/add/batmon", headers=api.auth, json=fields)
    assert r.status_code == 400, r.text
    assert word in r.json()["error"]
    assert api.client.get("/interface/batmon/count", headers=api.auth).json() == {
        "success": {"batmons": 0}}


@pytest.mark.parametrize("fields,word", [
    ({"batmon_name": "x" * 101}, "batmon_name"),
    ({"update_period": "0"}, "update_period"),
    ({"batmon_token": "has space"}, "batmon_token"),
    ({"voltage_units": "x" * 17}, "voltage_units"),
])  # fmt: skip
def test_bad_edit_is_400_and_changes_nothing(api: Api, fields: dict[str, Any], word: str) -> None:
    batmon_id, _ = api.add_batmon()
    before = snapshot(api, batmon_id)
    r = api.client.post("/interface/edit/batmon", headers=api.auth,
                        json={"batmon_id": batmon_id, **fields})
    assert r.status_code == 400 and word in r.json()["error"]
    assert snapshot(api, batmon_id) == before


@pytest.mark.parametrize("batmon_id", ["abc", "1.5", -1, 0, 2**53, "", None, True, [1]])
def test_ids_that_are_not_positive_safe_integers_are_400(api: Api, batmon_id: Any) -> None:
    r = api.client.post("/interface/delete/batmon", headers=api.auth, json={"batmon_id": batmon_id})
    assert r.status_code == 400 and "batmon_id" in r.json()["error"]


def test_unknown_ids_are_404(api: Api) -> None:
    for path in ("/interface/batmon/status", "/interface/delete/batmon",
                 "/interface/edit/batmon", "/interface/batmon/enable/sms"):
        r = api.client.post(path, headers=api.auth, json={"batmon_id": 123456789})
        assert r.status_code == 404 and "batmon_id" in r.json()["error"], path


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'"text"', b"42", b"null",
                                  b'{"batmon_id": 1,,}', b"[" * 5000])  # fmt: skip
def test_malformed_or_non_object_json_is_400(api: Api, body: bytes) -> None:
    r = api.client.post("/interface/add/batmon", headers={**api.auth,
                        "Content-Type": "application/json"}, content=body)  # fmt: skip
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    assert api.core.batmons == {}


def test_body_over_64_kib_is_413(api: Api) -> None:
    big = b'{"batmon_name": "' + b"x" * (65 * 1024) + b'"}'
    r = api.client.post("/interface/add/batmon", headers={**api.auth,
                        "Content-Type": "application/json"}, content=big)  # fmt: skip
    assert r.status_code == 413 and "limit" in r.json()["error"]
    chunked = api.client.post("/interface/add/batmon", headers=api.auth,
                              content=iter([b"x" * 40_000, b"y" * 40_000]))  # fmt: skip
    assert chunked.status_code == 413
    assert api.core.batmons == {}


def test_history_bad_ranges(api: Api) -> None:
    c = api.client
    missing = c.get("/interface/batmon/history", headers=api.auth)
    assert missing.status_code == 400 and "min_epoch_tm_sec" in missing.json()["error"]
    nan = c.get("/interface/batmon/history", headers=api.auth, params={"min_epoch_tm_sec": "nan"})
    assert nan.status_code == 400 and "min_epoch_tm_sec" in nan.json()["error"]


def test_history_with_max_before_min_is_an_empty_range(api: Api) -> None:
    # Not a 400: no JSON Schema can say "max >= min", and /openapi.json allows it.
    batmon_id, token = api.add_batmon()
    api.client.post("/interface/update/batmon", json={"batmon_id": batmon_id, "batmon_token": token,
                                                      "voltage": 12, "ts": 7})  # fmt: skip
    reversed_ = api.client.get("/interface/batmon/history", headers=api.auth,
                               params={"min_epoch_tm_sec": 10, "max_epoch_tm_sec": 5})  # fmt: skip
    assert reversed_.status_code == 200
    assert [h["data"] for h in reversed_.json()["success"]] == [[]]


def test_wrong_method_and_unknown_path_are_json(api: Api) -> None:
    r = api.client.get("/interface/delete/batmon", headers=api.auth)
    assert r.status_code == 405 and r.headers["content-type"] == "application/json"
    assert "error" in r.json()
    r = api.client.get("/interface/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_bad_multipart_body_is_400(api: Api) -> None:
    r = api.client.post("/interface/add/batmon", headers={
        **api.auth, "Content-Type": "multipart/form-data; boundary=zzz"},
        content=b"--zzz\r\nContent-Disposition: form-data\r\n\r\nvalue\r\n--")  # fmt: skip
    assert r.status_code == 400 and "error" in r.json()


@pytest.mark.parametrize("name", ["bad\x00name", "tab\tname", "bell\x07", "c1\x85control", "   ",
                                  "\u3000\u00a0", "\n"])  # fmt: skip
def test_names_must_be_printable_and_not_only_whitespace(api: Api, name: str) -> None:
    r = api.client.post("/interface/add/batmon", headers=api.auth, json={"batmon_name": name})
    assert r.status_code == 400 and r.json()["error"].startswith("batmon_name: must not"), r.text
    batmon_id, _ = api.add_batmon()
    for path, field, extra in [
        ("/interface/edit/batmon", "batmon_type", {"batmon_id": batmon_id}),
        ("/interface/edit/batmon", "voltage_units", {"batmon_id": batmon_id}),
        ("/interface/batmon/alarm/add", "alarm_name", {"batmon_id": batmon_id, "alarm_metric": "soc",
                                                       "alarm_condition": "<", "alarm_threshold_value": 20}),
    ]:  # fmt: skip
        if field == "voltage_units" and not name.strip("\u3000\u00a0 "):
            continue  # units may be blank (no unit)
        r = api.client.post(path, headers=api.auth, json={**extra, field: name})
        assert r.status_code == 400 and r.json()["error"].startswith(f"{field}: must not"), r.text


def test_printable_names_with_inner_spaces_and_any_script_are_kept(api: Api) -> None:
    for name in (" Haus 1 ", "Ñandú ☀", "家のバッテリー"):
        batmon_id, _ = api.add_batmon(batmon_name=name)
        assert api.core.batmons[batmon_id].name == name


def test_a_multipart_field_sent_as_a_file_part_is_read_as_its_text(api: Api) -> None:
    """`curl -F 'batmon_name=<name.txt'` and requests' `files=` send a field as a part with a
    filename; it is the same field. Non-UTF-8 content is refused, never dropped silently."""
    r = api.client.post("/interface/add/batmon", headers=api.auth,
                        files={"batmon_name": ("batmon_name", b"Van house bank")})  # fmt: skip
    assert r.status_code == 200, r.text
    batmon_id = r.json()["success"]["batmon_id"]
    r = api.client.get("/interface/batmon/list", headers=api.auth)
    names = {b["batmon_id"]: b["batmon_name"] for b in r.json()["success"]}
    assert names[batmon_id] == "Van house bank", r.text
    r = api.client.post("/interface/add/batmon", headers=api.auth,
                        files={"batmon_name": ("n.bin", b"\xff\xfe\x00")})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"].startswith("batmon_name"), r.text
