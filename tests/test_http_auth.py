"""Authentication and scoping (SPEC section 3)."""

from __future__ import annotations

import pytest

from bridge.ratelimit import FailureLimiter
from http_api.app import create_app
from tests.conftest import Api


@pytest.mark.parametrize("path,method", [
    ("/interface/add/batmon", "POST"), ("/interface/batmon/count", "GET"),
    ("/interface/batmon/list", "GET"), ("/interface/batmon/history", "GET"),
    ("/interface/edit/batmon", "POST"), ("/interface/delete/batmon", "POST"),
    ("/interface/batmon/enable/alerts", "POST"), ("/interface/batmon/alarm/add", "POST"),
])  # fmt: skip
def test_no_credentials_is_401(api: Api, path: str, method: str) -> None:
    api.add_batmon()
    api.client.cookies.clear()
    r = api.client.request(method, path, params={"min_epoch_tm_sec": 0, "batmon_name": "x"})
    assert r.status_code == 401
    assert "api_key" in r.json()["error"]


@pytest.mark.parametrize("how", ["query", "body", "form", "header", "bearer"])
def test_api_key_is_accepted_everywhere_the_spec_says(api: Api, how: str) -> None:
    key = api.api_key
    kwargs = {
        "query": {"params": {"api_key": key}},
        "body": {"json": {"api_key": key}},
        "form": {"data": {"api_key": key}},
        "header": {"headers": {"X-API-Key": key}},
        "bearer": {"headers": {"Authorization": f"Bearer {key}"}},
    }[how]
    r = api.client.post("/interface/batmon/count", **kwargs)
    assert r.status_code == 200 and r.json() == {"success": {"batmons": 0}}


def test_wrong_api_key_is_401_even_with_a_valid_cookie(api: Api) -> None:
    api.client.get("/interface/batmon/count", headers=api.auth)
    r = api.client.get("/interface/batmon/count", params={"api_key": "not-a-key"})
    assert r.status_code == 401 and "api_key" in r.json()["error"]


def test_cookie_from_an_api_key_request_authenticates_the_next_request_alone(api: Api) -> None:
    api.client.cookies.clear()
    first = api.client.get("/interface/batmon/count", headers=api.auth)
    cookie = first.headers["set-cookie"]
    assert "batmon_session=" in cookie and "HttpOnly" in cookie
    assert "samesite=lax" in cookie.lower()
    r = api.client.get("/interface/batmon/count")
    assert r.status_code == 200


def test_cookie_is_set_even_on_an_error_response(api: Api) -> None:
    api.client.cookies.clear()
    r = api.client.get("/interface/batmon/status", headers=api.auth, params={"batmon_id": 5})
    assert r.status_code == 404 and "batmon_session=" in r.headers["set-cookie"]


def test_forged_cookie_is_ignored(api: Api) -> None:
    api.client.cookies.clear()
    api.client.cookies.set("batmon_session", "eyJ1aWQiOjF9.forged.signature")
    assert api.client.get("/interface/batmon/count").status_code == 401


@pytest.mark.parametrize("header", ["X-API-Key", "Authorization"])
def test_login_with_a_header_key_sets_the_cookie(api: Api, header: str) -> None:
    api.client.cookies.clear()
    value = api.api_key if header == "X-API-Key" else f"Bearer {api.api_key}"
    r = api.client.post("/interface/login", headers={header: value})
    assert r.json() == {"success": "success"} and "batmon_session" in r.cookies


def test_api_key_that_is_not_text_is_401_not_500(api: Api) -> None:
    for body in ('{"api_key": "\\ud800"}', '{"api_key": 12345}', '{"api_key": ["a"]}'):
        r = api.client.post("/interface/batmon/count", content=body,
                            headers={"Content-Type": "application/json"})
        assert r.status_code == 401, body


def test_login_and_logout(api: Api) -> None:
    api.client.cookies.clear()
    assert api.client.post("/interface/login", json={"api_key": "bad"}).status_code == 401
    assert api.client.post("/interface/login", json={}).status_code == 400
    assert api.client.post("/interface/login", json={"api_key": api.api_key}).status_code == 200
    assert api.client.get("/interface/batmon/count").status_code == 200
    assert api.client.post("/interface/logout").json() == {"success": "success"}
    assert api.client.get("/interface/batmon/count").status_code == 401


def test_a_second_user_sees_none_of_the_first_users_batmons(api: Api) -> None:
    batmon_id, _token = api.add_batmon()
    other = {"X-API-Key": api.new_user("other@example.org")}
    c = api.client
    c.cookies.clear()
    assert c.get("/interface/batmon/count", headers=other).json()["success"]["batmons"] == 0
    assert c.get("/interface/batmon/list", headers=other).json()["success"] == []
    hist = c.get("/interface/batmon/history", headers=other, params={"min_epoch_tm_sec": 0})
    assert hist.json()["success"] == []
    for path in ("/interface/batmon/status", "/interface/edit/batmon",
                 "/interface/delete/batmon", "/interface/batmon/disable/alerts"):
        r = c.post(path, headers=other, json={"batmon_id": batmon_id, "batmon_name": "mine"})
        assert r.status_code == 404, path
    assert api.core.batmons[batmon_id].name == "Test batmon"


def test_wrong_token_is_403(api: Api) -> None:
    batmon_id, _ = api.add_batmon()
    c = api.client
    c.cookies.clear()
    r = c.post("/interface/update/batmon", json={"batmon_id": batmon_id,
                                                 "batmon_token": "wrong", "soc": 5})
    assert r.status_code == 403 and "batmon_token" in r.json()["error"]
    r = c.get("/interface/batmon/status", params={"batmon_id": batmon_id, "batmon_token": "x"})
    assert r.status_code == 403
    # On owner endpoints a token given must match too (guard against a mistyped id).
    r = c.post("/interface/delete/batmon", headers=api.auth,
               json={"batmon_id": batmon_id, "batmon_token": "wrong"})
    assert r.status_code == 403
    assert batmon_id in api.core.batmons
    assert api.core.store.reading_count(batmon_id) == 0


def test_unknown_batmon_is_404_for_device_and_owner(api: Api) -> None:
    r = api.client.post("/interface/update/batmon",
                        json={"batmon_id": 424242, "batmon_token": "t", "soc": 5})
    assert r.status_code == 404 and "batmon_id" in r.json()["error"]


def test_device_token_can_update_and_read_status_but_not_manage(api: Api) -> None:
    batmon_id, token = api.add_batmon()
    c = api.client
    c.cookies.clear()
    device = {"batmon_id": batmon_id, "batmon_token": token}
    assert c.post("/interface/update/batmon", json={**device, "soc": 5}).status_code == 200
    assert c.get("/interface/batmon/status", params=device).status_code == 200
    hist = c.get("/interface/batmon/history", params={**device, "min_epoch_tm_sec": 0})
    assert hist.status_code == 200 and len(hist.json()["success"][0]["data"]) == 1
    for path in ("/interface/edit/batmon", "/interface/delete/batmon",
                 "/interface/batmon/disable/alerts"):
        assert c.post(path, json={**device, "batmon_name": "x"}).status_code == 401, path
    assert c.get("/interface/batmon/list", params=device).status_code == 401
    assert batmon_id in api.core.batmons and api.core.batmons[batmon_id].name == "Test batmon"


def test_repeated_auth_failures_are_rate_limited(api: Api) -> None:
    app = create_app(api.core, session_secret=b"s" * 32, limiter=FailureLimiter(max_failures=3))
    from starlette.testclient import TestClient

    with TestClient(app) as c:
        codes = [c.get("/interface/batmon/count", params={"api_key": "guess"}).status_code
                 for _ in range(5)]  # fmt: skip
        assert codes == [401, 401, 401, 429, 429]
        assert "Too many" in c.get("/interface/batmon/count", params={"api_key": "guess"}).json()["error"]
        # Only failing attempts: the valid key from the same address is served.
        assert c.get("/interface/batmon/count", headers=api.auth).status_code == 200


def test_api_keys_are_stored_hashed(api: Api) -> None:
    rows = list(api.core.store.db.execute("SELECT * FROM users"))
    assert rows and not any(api.api_key in str(row) for row in rows)
