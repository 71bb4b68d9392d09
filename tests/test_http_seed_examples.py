"""Every request example of shared/seed/batmon-api.txt, sent as written (with real
ids and tokens substituted), succeeds with exactly the seed's keys and types.

The examples carry no api_key: the seed relies on the session cookie set by an
earlier authenticated request, so each test logs in once and then sends the
example as it stands.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Api

# Types of the seed's list/status example (whatsapp/sms are null there; SPEC: bool).
BATMON_KEYS: dict[str, type | tuple[type, ...]] = {
    "batmon_id": int, "batmon_name": str, "batmon_type": str, "batmon_status": str,
    "batmon_voltage": float, "batmon_current": float, "batmon_power": float,
    "batmon_soc": float, "batmon_details": str, "update_period": int, "last_modified": int,
    "batmon_token": str, "notification_enabled": bool, "alarms": list,
    "whatsapp_enabled": bool, "sms_enabled": bool, "voltage_units": str,
    "current_units": str, "power_units": str, "soc_units": str,
}  # fmt: skip
ALARM_KEYS: dict[str, type | tuple[type, ...]] = {
    "alarm_id": int, "device_id": int, "alarm_name": str, "alarm_enabled": bool,
    "alarm_threshold_value": float, "alarm_condition": str,
    "alarm_trigger_time": (int, type(None)), "alarm_repeat_delay": int,
    "alarm_akn": (int, type(None)), "update_time": int, "alarm_triggered": bool,
}  # fmt: skip
HISTORY_KEYS = {"batmon_id": int, "batmon_name": str, "batmon_type": str,
                "min_time": int, "max_time": int, "data": list}  # fmt: skip
HISTORY_ROW_KEYS = {"batmon_voltage": float, "batmon_current": float, "batmon_power": float,
                    "batmon_soc": float, "batmon_details": str, "update_time": str}  # fmt: skip


def assert_shape(obj: dict[str, Any], keys: dict[str, Any]) -> None:
    """Every seed key is present with the seed's JSON type (bool is not an int here)."""
    for key, expected in keys.items():
        assert key in obj, f"missing {key}"
        value = obj[key]
        assert isinstance(value, expected), f"{key}={value!r} is not {expected}"
        if expected is int:
            assert not isinstance(value, bool), key


@pytest.fixture
def logged_in(api: Api) -> Api:
    """A client holding the session cookie, as the seed's examples assume."""
    r = api.client.post("/interface/login", data={"api_key": api.api_key})
    assert r.status_code == 200 and "batmon_session" in r.cookies
    return api


def test_add_example_as_form_data(logged_in: Api) -> None:
    r = logged_in.client.post("/interface/add/batmon", files={
        "batmon_name": (None, "Test batmon"), "batmon_type": (None, "BMV"),
        "batmon_token": (None, "f5d6dsewwds"), "update_period": (None, "120"),
    })  # fmt: skip
    assert r.status_code == 200, r.text
    success = r.json()["success"]
    assert set(success) == {"batmon_id", "batmon_token"}
    assert isinstance(success["batmon_id"], int) and success["batmon_token"] == "f5d6dsewwds"
    assert 0 < success["batmon_id"] < 2**53


def test_add_example_as_json(logged_in: Api) -> None:
    r = logged_in.client.post("/interface/add/batmon", json={
        "batmon_name": "Test batmon", "batmon_type": "BMV",
        "batmon_token": "f5d6dsewwds", "update_period": 120,
    })  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["success"]["batmon_token"] == "f5d6dsewwds"


def test_add_without_token_generates_one(logged_in: Api) -> None:
    r = logged_in.client.post("/interface/add/batmon", data={"batmon_name": "b"})
    assert r.status_code == 200
    assert len(r.json()["success"]["batmon_token"]) >= 16


def test_count_example(logged_in: Api) -> None:
    logged_in.add_batmon()
    r = logged_in.client.get("/interface/batmon/count")
    assert r.json() == {"success": {"batmons": 1}}


def test_list_example_has_the_seed_keys_and_types(logged_in: Api) -> None:
    batmon_id, _ = logged_in.add_batmon(update_period=15000)
    logged_in.client.post("/interface/batmon/alarm/add", json={
        "batmon_id": batmon_id, "alarm_name": "Batmon voltage", "alarm_metric": "voltage",
        "alarm_condition": ">=", "alarm_threshold_value": 10.0,
    })  # fmt: skip
    r = logged_in.client.get("/interface/batmon/list")
    assert r.status_code == 200
    [batmon] = r.json()["success"]
    assert_shape(batmon, BATMON_KEYS)
    assert batmon["batmon_details"] == "{}" and batmon["batmon_voltage"] == 0.0
    assert batmon["batmon_status"] == "Offline"
    [alarm] = batmon["alarms"]
    assert_shape(alarm, ALARM_KEYS)
    assert alarm["device_id"] == batmon_id


def test_status_example_as_params(api: Api) -> None:
    batmon_id, token = api.add_batmon()
    api.client.cookies.clear()
    r = api.client.get(f"/interface/batmon/status?batmon_id={batmon_id}&batmon_token={token}")
    assert r.status_code == 200, r.text
    assert_shape(r.json()["success"], BATMON_KEYS)


def test_status_example_as_json_body_on_get(api: Api) -> None:
    batmon_id, token = api.add_batmon()
    api.client.cookies.clear()
    r = api.client.request("GET", "/interface/batmon/status",
                           json={"batmon_id": batmon_id, "batmon_token": token})  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["success"]["batmon_id"] == batmon_id


def test_update_example_as_params(api: Api) -> None:
    batmon_id, token = api.add_batmon()
    api.client.cookies.clear()
    r = api.client.post(
        f"/interface/update/batmon?batmon_id={batmon_id}&batmon_token={token}"
        "&batmon_voltage=41&batmon_power=33&batmon_current=10&batmon_soc=22"
    )
    assert r.json() == {"success": "success"}
    status = api.client.get("/interface/batmon/status",
                            params={"batmon_id": batmon_id, "batmon_token": token}).json()
    s = status["success"]
    assert (s["batmon_voltage"], s["batmon_power"], s["batmon_current"], s["batmon_soc"]) == (
        41.0, 33.0, 10.0, 22.0)
    assert s["batmon_status"] == "Online"


def test_update_example_as_json_with_python_style_details(api: Api) -> None:
    batmon_id, token = api.add_batmon()
    api.client.cookies.clear()
    r = api.client.post("/interface/update/batmon", json={
        "batmon_id": batmon_id, "batmon_token": token, "batmon_details": "{'key': 25}",
        "batmon_voltage": 47, "batmon_power": 33, "batmon_current": 10, "batmon_soc": 33,
    })  # fmt: skip
    assert r.json() == {"success": "success"}
    s = api.client.get("/interface/batmon/status",
                       params={"batmon_id": batmon_id, "batmon_token": token}).json()["success"]
    assert s["batmon_details"] == '{"key": 25}'


def test_history_examples_as_params_and_json(logged_in: Api) -> None:
    batmon_id, token = logged_in.add_batmon()
    for voltage in (47, 48):
        logged_in.client.post("/interface/update/batmon", json={
            "batmon_id": batmon_id, "batmon_token": token, "batmon_details": "{'key': 25}",
            "batmon_voltage": voltage, "batmon_power": 33, "batmon_current": 10, "batmon_soc": 33,
        })  # fmt: skip
    by_params = logged_in.client.get("/interface/batmon/history?min_epoch_tm_sec=1641502593")
    by_json = logged_in.client.request("GET", "/interface/batmon/history", json={
        "min_epoch_tm_sec": 1641502593, "max_epoch_tm_sec": 1999999999, "batmon_id": batmon_id,
    })  # fmt: skip
    for r in (by_params, by_json):
        assert r.status_code == 200, r.text
        [entry] = r.json()["success"]
        assert_shape(entry, HISTORY_KEYS)
        assert entry["batmon_type"] == "BMV"  # the seed's "TODO" is the real type here
        assert [row["batmon_voltage"] for row in entry["data"]] == [47.0, 48.0]
        for row in entry["data"]:
            assert_shape(row, HISTORY_ROW_KEYS)
            assert row["batmon_details"] == '{"key": 25}'


def test_edit_example_as_params(logged_in: Api) -> None:
    batmon_id, token = logged_in.add_batmon()
    r = logged_in.client.post(
        f"/interface/edit/batmon?batmon_id={batmon_id}&batmon_token={token}"
        "&batmon_name=batmon&update_period=300"
    )
    assert r.json() == {"success": "success"}
    [b] = logged_in.client.get("/interface/batmon/list").json()["success"]
    assert (b["batmon_name"], b["update_period"]) == ("batmon", 300)


def test_edit_example_as_json_with_id_as_string(logged_in: Api) -> None:
    batmon_id, token = logged_in.add_batmon()
    r = logged_in.client.post("/interface/edit/batmon", json={
        "batmon_id": str(batmon_id), "batmon_token": token, "batmon_name": "batmon",
        "update_period": 300, "voltage_units": "V", "current_units": "I",
        "power_units": "W", "soc_units": "%",
    })  # fmt: skip
    assert r.json() == {"success": "success"}
    [b] = logged_in.client.get("/interface/batmon/list").json()["success"]
    assert (b["voltage_units"], b["current_units"], b["power_units"], b["soc_units"]) == (
        "V", "I", "W", "%")


def test_delete_example_as_params_with_unknown_batmon_state(logged_in: Api) -> None:
    batmon_id, token = logged_in.add_batmon()
    r = logged_in.client.post(
        f"/interface/delete/batmon?batmon_state=true&batmon_token={token}&batmon_id={batmon_id}"
    )
    assert r.json() == {"success": "success"}
    assert logged_in.client.get("/interface/batmon/count").json()["success"]["batmons"] == 0


def test_delete_example_json_with_its_trailing_comma_is_accepted(logged_in: Api) -> None:
    batmon_id, token = logged_in.add_batmon()
    body = f'{{\n    "batmon_id":{batmon_id},\n    "batmon_token": "{token}",\n}}'
    r = logged_in.client.post("/interface/delete/batmon", content=body,
                              headers={"Content-Type": "application/json"})  # fmt: skip
    assert r.json() == {"success": "success"}
    assert logged_in.client.get("/interface/batmon/count").json()["success"]["batmons"] == 0


def test_a_trailing_comma_anywhere_else_is_still_invalid_json(logged_in: Api) -> None:
    batmon_id, _ = logged_in.add_batmon()
    for body in (f'{{"batmon_id": {batmon_id},, }}', f'{{"batmon_id": [{batmon_id},],}}'):
        r = logged_in.client.post("/interface/delete/batmon", content=body,
                                  headers={"Content-Type": "application/json"})  # fmt: skip
        assert r.status_code == 400 and "JSON" in r.json()["error"], body
    assert logged_in.client.get("/interface/batmon/count").json()["success"]["batmons"] == 1


@pytest.mark.parametrize("flag,key", [("alerts", "notification_enabled"),
                                      ("whatsapp", "whatsapp_enabled"),
                                      ("sms", "sms_enabled")])  # fmt: skip
def test_enable_disable_examples(logged_in: Api, flag: str, key: str) -> None:
    batmon_id, token = logged_in.add_batmon()

    def current() -> bool:
        [b] = logged_in.client.get("/interface/batmon/list").json()["success"]
        return b[key]

    start = current()
    for action, expected in (("enable", True), ("disable", False), ("enable", True)):
        r = logged_in.client.post(
            f"/interface/batmon/{action}/{flag}?batmon_token={token}&batmon_id={batmon_id}"
        )
        assert r.json() == {"success": "success"}
        assert current() is expected
    # The seed's JSON body, trailing comma and all.
    body = f'{{\n    "batmon_id":{batmon_id},\n    "batmon_token": "{token}",\n}}'
    r = logged_in.client.post(f"/interface/batmon/disable/{flag}", content=body,
                              headers={"Content-Type": "application/json"})  # fmt: skip
    assert r.json() == {"success": "success"} and current() is False
    assert start is (flag == "alerts")
