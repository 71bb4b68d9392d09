"""Alarm and notification-target endpoints: owner-only, validated, nothing changed on refusal."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Api

GOOD_ALARM = {"alarm_name": "High voltage", "alarm_metric": "voltage", "alarm_condition": ">=",
              "alarm_threshold_value": 10, "alarm_repeat_delay": 1}  # fmt: skip


def alarms_of(api: Api, batmon_id: int) -> list[dict[str, Any]]:
    r = api.client.get("/interface/batmon/status", headers=api.auth, params={"batmon_id": batmon_id})
    return r.json()["success"]["alarms"]


def test_alarm_add_edit_ack_delete(api: Api) -> None:
    batmon_id, token = api.add_batmon()
    r = api.client.post("/interface/batmon/alarm/add", headers=api.auth,
                        json={"batmon_id": batmon_id, **GOOD_ALARM})
    alarm_id = r.json()["success"]["alarm_id"]
    assert isinstance(alarm_id, int) and 0 < alarm_id < 2**53
    [alarm] = alarms_of(api, batmon_id)
    assert alarm["alarm_metric"] == "voltage" and alarm["alarm_triggered"] is False

    api.client.post("/interface/update/batmon",
                    json={"batmon_id": batmon_id, "batmon_token": token, "voltage": 12})
    [alarm] = alarms_of(api, batmon_id)
    assert alarm["alarm_triggered"] is True and isinstance(alarm["alarm_trigger_time"], int)

    assert api.client.post("/interface/batmon/alarm/ack", headers=api.auth,
                           json={"alarm_id": alarm_id}).json() == {"success": "success"}
    assert isinstance(alarms_of(api, batmon_id)[0]["alarm_akn"], int)

    r = api.client.post("/interface/batmon/alarm/edit", headers=api.auth,
                        json={"alarm_id": str(alarm_id), "alarm_threshold_value": "20.5",
                              "alarm_enabled": "false"})  # fmt: skip
    assert r.json() == {"success": "success"}
    [alarm] = alarms_of(api, batmon_id)
    assert alarm["alarm_threshold_value"] == 20.5 and alarm["alarm_enabled"] is False
    assert alarm["alarm_triggered"] is False  # a disabled alarm does not stay triggered

    assert api.client.post("/interface/batmon/alarm/delete", headers=api.auth,
                           json={"alarm_id": alarm_id}).json() == {"success": "success"}
    assert alarms_of(api, batmon_id) == []
    again = api.client.post("/interface/batmon/alarm/ack", headers=api.auth,
                            json={"alarm_id": alarm_id})
    assert again.status_code == 404


@pytest.mark.parametrize("fields,word", [
    ({"alarm_condition": ">>"}, "alarm_condition"),
    ({"alarm_condition": "="}, "alarm_condition"),
    ({"alarm_metric": "cells"}, "alarm_metric"),  # temperature is a metric since issue 17
    ({"alarm_clear_value": "low"}, "alarm_clear_value"),
    ({"alarm_threshold_value": "NaN"}, "alarm_threshold_value"),
    ({"alarm_threshold_value": "inf"}, "alarm_threshold_value"),
    ({"alarm_threshold_value": "ten"}, "alarm_threshold_value"),
    ({"alarm_repeat_delay": -1}, "alarm_repeat_delay"),
    ({"alarm_repeat_delay": 86_401}, "alarm_repeat_delay"),
    ({"alarm_name": ""}, "alarm_name"),
    ({"alarm_enabled": "maybe"}, "alarm_enabled"),
])  # fmt: skip
def test_bad_alarm_fields_are_400_and_add_nothing(api: Api, fields: dict[str, Any],
                                                  word: str) -> None:  # fmt: skip
    batmon_id, _ = api.add_batmon()
    r = api.client.post("/interface/batmon/alarm/add", headers=api.auth,
                        json={"batmon_id": batmon_id, **GOOD_ALARM, **fields})
    assert r.status_code == 400 and word in r.json()["error"], r.text
    assert alarms_of(api, batmon_id) == []


def test_bad_alarm_edit_changes_nothing(api: Api) -> None:
    batmon_id, _ = api.add_batmon()
    alarm_id = api.client.post("/interface/batmon/alarm/add", headers=api.auth,
                               json={"batmon_id": batmon_id, **GOOD_ALARM}
                               ).json()["success"]["alarm_id"]  # fmt: skip
    before = alarms_of(api, batmon_id)
    r = api.client.post("/interface/batmon/alarm/edit", headers=api.auth,
                        json={"alarm_id": alarm_id, "alarm_condition": ">>"})
    assert r.status_code == 400 and "alarm_condition" in r.json()["error"]
    assert alarms_of(api, batmon_id) == before


def test_other_users_alarms_do_not_exist_for_them(api: Api) -> None:
    batmon_id, _ = api.add_batmon()
    alarm_id = api.client.post("/interface/batmon/alarm/add", headers=api.auth,
                               json={"batmon_id": batmon_id, **GOOD_ALARM}
                               ).json()["success"]["alarm_id"]  # fmt: skip
    other = {"X-API-Key": api.new_user("other@example.org")}
    api.client.cookies.clear()
    for path in ("edit", "delete", "ack"):
        r = api.client.post(f"/interface/batmon/alarm/{path}", headers=other,
                            json={"alarm_id": alarm_id, "alarm_name": "mine"})
        assert r.status_code == 404 and "alarm_id" in r.json()["error"], path
    add = api.client.post("/interface/batmon/alarm/add", headers=other,
                          json={"batmon_id": batmon_id, **GOOD_ALARM})
    assert add.status_code == 404
    [alarm] = alarms_of(api, batmon_id)
    assert alarm["alarm_name"] == "High voltage"


def test_notification_targets_are_set_masked_and_validated(api: Api) -> None:
    c = api.client
    r = c.post("/interface/user/notifications", headers=api.auth, json={
        "email_url": "json://user:s3cretpass@127.0.0.1:9/", "sms_url": ""})  # fmt: skip
    assert r.status_code == 200, r.text
    shown = r.json()["success"]
    assert set(shown) == {"email_url", "whatsapp_url", "sms_url"}
    assert shown["email_url"].startswith("json://") and "s3cretpass" not in shown["email_url"]
    assert shown["sms_url"] == ""
    # A field not given keeps its value; GET shows the same.
    c.post("/interface/user/notifications", headers=api.auth,
           json={"whatsapp_url": "json://127.0.0.1:9/wa"})
    got = c.get("/interface/user/notifications", headers=api.auth).json()["success"]
    assert got["email_url"] == shown["email_url"] and got["whatsapp_url"].startswith("json://")
    # An empty string removes a target.
    c.post("/interface/user/notifications", headers=api.auth, json={"whatsapp_url": ""})
    assert c.get("/interface/user/notifications", headers=api.auth).json()["success"][
        "whatsapp_url"] == ""
    assert "s3cretpass" in api.core.store.user_by_id(api.user.id)["email_url"]


@pytest.mark.parametrize("fields,word", [
    ({"email_url": "not a url"}, "email_url"),
    ({"sms_url": "nosuchscheme://host/path"}, "sms_url"),
    ({"whatsapp_url": "http//missing-colon"}, "whatsapp_url"),
    ({"email_url": 5}, "email_url"),
])  # fmt: skip
def test_bad_apprise_urls_are_400_and_change_nothing(api: Api, fields: dict[str, Any],
                                                     word: str) -> None:  # fmt: skip
    before = api.client.get("/interface/user/notifications", headers=api.auth).json()
    r = api.client.post("/interface/user/notifications", headers=api.auth, json=fields)
    assert r.status_code == 400 and word in r.json()["error"], r.text
    assert api.client.get("/interface/user/notifications", headers=api.auth).json() == before


def test_changing_targets_with_get_is_refused(api: Api) -> None:
    r = api.client.get("/interface/user/notifications", headers=api.auth,
                       params={"email_url": "json://127.0.0.1:9/"})
    assert r.status_code == 400 and "POST" in r.json()["error"]
    assert api.core.store.user_by_id(api.user.id)["email_url"] == ""


def test_batmon_notifications_is_owner_only(api: Api) -> None:
    batmon_id, token = api.add_batmon()
    ok = api.client.get("/interface/batmon/notifications", headers=api.auth,
                        params={"batmon_id": batmon_id})
    assert ok.status_code == 200 and ok.json() == {"success": []}
    api.client.cookies.clear()
    device = api.client.get("/interface/batmon/notifications",
                            params={"batmon_id": batmon_id, "batmon_token": token})
    assert device.status_code == 401
    other = {"X-API-Key": api.new_user("other@example.org")}
    assert api.client.get("/interface/batmon/notifications", headers=other,
                          params={"batmon_id": batmon_id}).status_code == 404
