"""The full lifecycle of a batmon through the HTTP API, as a client lives it."""

from __future__ import annotations

import calendar
import time

from openapi_spec_validator import validate as validate_openapi

from tests.conftest import Api
from tests.support import wait_until


def test_full_lifecycle(api: Api) -> None:
    c, auth = api.client, api.auth
    batmon_id, token = api.add_batmon(update_period=120)
    assert c.get("/interface/batmon/count", headers=auth).json()["success"]["batmons"] == 1
    [listed] = c.get("/interface/batmon/list", headers=auth).json()["success"]
    assert listed["batmon_id"] == batmon_id and listed["batmon_status"] == "Offline"

    before = int(time.time())
    readings = [{"batmon_voltage": 12.0 + i, "batmon_soc": 50 + i} for i in range(3)]
    for reading in readings:
        r = c.post("/interface/update/batmon",
                   json={"batmon_id": batmon_id, "batmon_token": token, **reading})
        assert r.json() == {"success": "success"}
    # A reading without voltage keeps the current voltage; history holds null for it.
    c.post("/interface/update/batmon",
           json={"batmon_id": batmon_id, "batmon_token": token, "current": -3.5})
    after = int(time.time())

    status = c.get("/interface/batmon/status", headers=auth,
                   params={"batmon_id": batmon_id}).json()["success"]
    assert (status["batmon_voltage"], status["batmon_soc"], status["batmon_current"]) == (
        14.0, 52.0, -3.5)
    assert status["batmon_status"] == "Online"
    assert before <= status["last_modified"] <= after

    [history] = c.get("/interface/batmon/history", headers=auth,
                      params={"min_epoch_tm_sec": before, "batmon_id": batmon_id}
                      ).json()["success"]
    assert [row["batmon_voltage"] for row in history["data"]] == [12.0, 13.0, 14.0, None]
    assert history["data"][-1]["batmon_current"] == -3.5
    assert before <= history["min_time"] <= history["max_time"] <= after
    for row in history["data"]:
        stamp = calendar.timegm(time.strptime(row["update_time"], "%Y-%m-%dT%H:%M:%S"))
        assert before <= stamp <= after
    # Both ends of the range are inclusive.
    [exact] = c.get("/interface/batmon/history", headers=auth, params={
        "min_epoch_tm_sec": history["min_time"], "max_epoch_tm_sec": history["max_time"],
        "batmon_id": batmon_id}).json()["success"]  # fmt: skip
    assert len(exact["data"]) == 4
    [empty] = c.get("/interface/batmon/history", headers=auth, params={
        "min_epoch_tm_sec": 1, "max_epoch_tm_sec": 2, "batmon_id": batmon_id}).json()["success"]
    assert empty["data"] == [] and empty["min_time"] is None and empty["max_time"] is None

    r = c.post("/interface/edit/batmon", headers=auth, json={
        "batmon_id": batmon_id, "batmon_name": "House bank", "voltage_units": "V",
        "update_period": 600, "batmon_token": "new-token-1"})  # fmt: skip
    assert r.json() == {"success": "success"}
    old = c.post("/interface/update/batmon",
                 json={"batmon_id": batmon_id, "batmon_token": token, "soc": 1})
    assert old.status_code == 403
    new = c.post("/interface/update/batmon",
                 json={"batmon_id": batmon_id, "batmon_token": "new-token-1", "soc": 1})
    assert new.status_code == 200
    edited = c.get("/interface/batmon/status", headers=auth,
                   params={"batmon_id": batmon_id}).json()["success"]
    assert (edited["batmon_name"], edited["voltage_units"], edited["update_period"]) == (
        "House bank", "V", 600)

    for flag, key in (("alerts", "notification_enabled"), ("whatsapp", "whatsapp_enabled"),
                      ("sms", "sms_enabled")):
        for action, expected in (("disable", False), ("enable", True)):
            c.post(f"/interface/batmon/{action}/{flag}", headers=auth,
                   data={"batmon_id": str(batmon_id)})
            got = c.get("/interface/batmon/status", headers=auth,
                        params={"batmon_id": batmon_id}).json()["success"][key]
            assert got is expected, (flag, action)

    assert c.post("/interface/delete/batmon", headers=auth,
                  json={"batmon_id": batmon_id}).json() == {"success": "success"}
    gone = c.get("/interface/batmon/status", headers=auth, params={"batmon_id": batmon_id})
    assert gone.status_code == 404
    assert c.get("/interface/batmon/count", headers=auth).json()["success"]["batmons"] == 0
    # Its readings are purged off the loop after the answer (tests/test_batmon_delete.py).
    wait_until(lambda: api.core.store.reading_count(batmon_id) == 0, 10, "the readings purged")


def test_list_is_oldest_first(api: Api) -> None:
    ids = [api.add_batmon(batmon_name=f"b{i}")[0] for i in range(4)]
    listed = api.client.get("/interface/batmon/list", headers=api.auth).json()["success"]
    assert [b["batmon_id"] for b in listed] == ids


def test_history_without_batmon_id_returns_all_of_the_callers_batmons(api: Api) -> None:
    a, ta = api.add_batmon(batmon_name="a")
    b, tb = api.add_batmon(batmon_name="b")
    for batmon_id, token in ((a, ta), (b, tb)):
        api.client.post("/interface/update/batmon",
                        json={"batmon_id": batmon_id, "batmon_token": token, "soc": 10})
    entries = api.client.get("/interface/batmon/history", headers=api.auth,
                             params={"min_epoch_tm_sec": 0}).json()["success"]
    assert {e["batmon_id"] for e in entries} == {a, b}
    assert all(len(e["data"]) == 1 for e in entries)


def test_backfilled_older_reading_goes_to_history_only(api: Api) -> None:
    batmon_id, token = api.add_batmon()
    now = time.time()
    api.client.post("/interface/update/batmon",
                    json={"batmon_id": batmon_id, "batmon_token": token, "soc": 80})
    r = api.client.post("/interface/update/batmon", json={
        "batmon_id": batmon_id, "batmon_token": token, "soc": 20, "ts": now - 3600})
    assert r.status_code == 200
    status = api.client.get("/interface/batmon/status", headers=api.auth,
                            params={"batmon_id": batmon_id}).json()["success"]
    assert status["batmon_soc"] == 80.0
    [h] = api.client.get("/interface/batmon/history", headers=api.auth,
                         params={"min_epoch_tm_sec": 0, "batmon_id": batmon_id}
                         ).json()["success"]
    assert [row["batmon_soc"] for row in h["data"]] == [20.0, 80.0]


def test_ids_are_never_reused(api: Api) -> None:
    seen = set()
    for _ in range(5):
        batmon_id, _ = api.add_batmon()
        assert batmon_id not in seen
        seen.add(batmon_id)
        api.client.post("/interface/delete/batmon", headers=api.auth, json={"batmon_id": batmon_id})
    retired = {r[0] for r in api.core.store.db.execute("SELECT id FROM retired_ids")}
    assert seen <= retired


def test_healthz_and_openapi(api: Api) -> None:
    health = api.client.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["database"] == "ok"
    doc = api.client.get("/openapi.json").json()
    validate_openapi(doc)  # a real OpenAPI 3.1 document, not just JSON
    ids = [op["operationId"] for path in doc["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids))
    status_security = doc["paths"]["/interface/batmon/status"]["get"]["security"]
    assert {} in status_security  # a device needs no api_key
    for path in ("/interface/add/batmon", "/interface/batmon/history", "/interface/login",
                 "/interface/batmon/alarm/add", "/healthz"):
        assert path in doc["paths"], path
    add = doc["paths"]["/interface/add/batmon"]["post"]["requestBody"]["content"]
    schema = doc["components"]["schemas"]["AddBatmon"]
    assert add["application/json"]["schema"]["$ref"].endswith("/AddBatmon")
    assert schema["properties"]["batmon_name"]["maxLength"] == 100
    assert schema["required"] == ["batmon_name"]


def test_history_too_large_for_one_answer_is_a_400_asking_to_narrow(api: Api) -> None:
    api.core.max_history_rows = 3
    batmon_id, token = api.add_batmon()
    for soc in range(4):
        api.client.post("/interface/update/batmon",
                        json={"batmon_id": batmon_id, "batmon_token": token, "soc": soc})
    r = api.client.get("/interface/batmon/history", headers=api.auth,
                       params={"min_epoch_tm_sec": 0})
    assert r.status_code == 400 and "narrow" in r.json()["error"] and "4" in r.json()["error"]
    now = int(time.time())
    ok = api.client.get("/interface/batmon/history", headers=api.auth,
                        params={"min_epoch_tm_sec": now + 10, "batmon_id": batmon_id})
    assert ok.status_code == 200 and ok.json()["success"][0]["data"] == []


def test_generated_tokens_never_start_with_a_dash() -> None:
    """They are pasted into command lines (`batmon agent vedirect --token ...`)."""
    from bridge.security import new_device_token

    assert not any(new_device_token().startswith("-") for _ in range(2000))
