"""The dashboard over HTTP, without a browser: who may see which page, what the pages
load, the cross-site guard on cookie-authenticated changes, the test notice, the live
stream over a real socket, and the package shipping the pages' files."""

from __future__ import annotations

import fnmatch
import json
import re
import signal
import tomllib
from collections.abc import Iterator
from typing import Any

import httpx2 as httpx
import pytest

from tests.conftest import Api, ServeProcess
from tests.support import ROOT, Sink, batmon, wait_until

HTTP_API = ROOT / "http_api"


def logged_in(api: Api) -> Api:
    r = api.client.post("/interface/login", json={"api_key": api.api_key})
    assert r.status_code == 200 and "batmon_session" in api.client.cookies
    return api


def test_pages_show_the_login_form_until_logged_in(api: Api) -> None:
    batmon_id, _ = api.add_batmon()
    api.client.cookies.clear()  # an api_key request sets the cookie: start logged out
    home = api.client.get("/")
    assert home.status_code == 200 and 'id="login-form"' in home.text
    assert 'for="api_key"' in home.text  # the field has a label
    for path in (f"/batmon/{batmon_id}", "/account"):
        r = api.client.get(path, follow_redirects=False)
        assert (r.status_code, r.headers["location"]) == (303, "/"), path
    events = api.client.get("/events")
    assert events.status_code == 401 and "error" in events.json()


def test_an_api_key_alone_opens_no_page_only_the_cookie_does(api: Api) -> None:
    api.client.cookies.clear()
    r = api.client.get("/account", headers=api.auth, follow_redirects=False)
    assert r.status_code == 303


def test_logged_in_the_list_shows_each_batmon_with_units_and_no_token(api: Api) -> None:
    batmon_id, token = api.add_batmon(batmon_name="House bank")
    api.client.post("/interface/edit/batmon", headers=api.auth,
                    json={"batmon_id": batmon_id, "voltage_units": "mV"})  # fmt: skip
    api.client.post("/interface/update/batmon", headers=api.auth,
                    json={"batmon_id": batmon_id, "voltage": 12800, "soc": 81.5})  # fmt: skip
    page = logged_in(api).client.get("/")
    assert page.status_code == 200
    assert "House bank" in page.text
    # The values are in the page's data; static/common.js formats them (one rule, one place).
    [shown] = json.loads(re.search(r'id="initial-batmons">(.*?)</script>', page.text, re.S)[1])
    assert (shown["batmon_voltage"], shown["units"]["voltage"], shown["batmon_soc"]) == (12800, "mV", 81.5)
    # ... with when each was last reported (null: never), for "—" and the stale marks.
    assert shown["reported"]["current"] is None and int(shown["reported"]["voltage"]) == shown["last_reading"]
    assert shown["stale"] == []
    assert token not in page.text  # tokens are shown on demand only


def test_another_users_batmon_page_is_not_found(api: Api) -> None:
    theirs, _ = api.add_batmon(batmon_name="Secret boat")
    stranger_key = api.new_user("stranger@example.org")
    api.client.post("/interface/login", json={"api_key": stranger_key})
    for path in (f"/batmon/{theirs}", "/batmon/1", "/batmon/99999999999999999999"):
        r = api.client.get(path)
        assert r.status_code == 404, path
        assert "Secret boat" not in r.text


def test_a_batmon_name_is_escaped_in_html_and_in_the_page_data(api: Api) -> None:
    name = '</script><script>alert("x")</script>'
    batmon_id, _ = api.add_batmon(batmon_name=name)
    for path in ("/", f"/batmon/{batmon_id}"):
        text = logged_in(api).client.get(path).text
        assert name not in text and "<script>alert" not in text, path


def test_pages_load_only_this_servers_files_under_a_strict_csp(api: Api) -> None:
    batmon_id, _ = logged_in(api).add_batmon()
    for path in ("/", f"/batmon/{batmon_id}", "/account", "/docs"):
        r = api.client.get(path)
        assert r.status_code == 200, path
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self';" in csp, path
        assert "<script>" not in r.text, f"{path} has an inline script"
        urls = re.findall(r'(?:src|href)="([^"]*)"', r.text)
        outside = [u for u in urls if not u.startswith(("/", "#"))]
        assert outside == [], f"{path} loads {outside}"
        for url in (u for u in urls if u.startswith("/static/")):
            assert api.client.get(url).status_code == 200, url


def test_vendored_files_carry_their_licences() -> None:
    vendor = HTTP_API / "static" / "vendor"
    for folder in ("uplot", "swagger-ui"):
        assert (vendor / folder / "LICENSE").stat().st_size > 500, folder
    table = (vendor / "VENDORED.md").read_text()
    assert "| uplot | 1.6.32 |" in table and "| swagger-ui-dist | 5.35.0 |" in table


def test_the_package_data_ships_every_template_and_static_file() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    globs = config["package-data"]["http_api"]
    files = [p.relative_to(HTTP_API).as_posix() for folder in ("templates", "static")
             for p in (HTTP_API / folder).rglob("*") if p.is_file()]  # fmt: skip
    missing = [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)]
    assert files and missing == []


# -- the cross-site guard ------------------------------------------------------------------
@pytest.mark.parametrize("headers", [
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},  # another port of the same host is the same "site"
    {"Origin": "http://localhost:3000"},
    {"Origin": "null"},
])  # fmt: skip
def test_a_cookie_authenticated_change_from_another_origin_is_403(
    api: Api, headers: dict[str, str]
) -> None:
    r = logged_in(api).client.post("/interface/add/batmon", headers=headers,
                                   json={"batmon_name": "forged"})  # fmt: skip
    assert r.status_code == 403
    assert "another site" in r.json()["error"]
    assert api.client.get("/interface/batmon/count").json()["success"]["batmons"] == 0


@pytest.mark.parametrize("headers", [
    {},  # curl, scripts: no browser metadata
    {"Sec-Fetch-Site": "same-origin"},
    {"Origin": "http://testserver"},
])  # fmt: skip
def test_a_cookie_authenticated_change_from_our_own_pages_is_allowed(
    api: Api, headers: dict[str, str]
) -> None:
    r = logged_in(api).client.post("/interface/add/batmon", headers=headers,
                                   json={"batmon_name": "mine"})  # fmt: skip
    assert r.status_code == 200, r.text


def test_without_the_cookie_any_origin_may_post_and_reads_are_not_guarded(api: Api) -> None:
    cross = {"Sec-Fetch-Site": "cross-site", **api.auth}
    api.client.cookies.clear()
    r = api.client.post("/interface/add/batmon", headers=cross, json={"batmon_name": "keyed"})
    assert r.status_code == 200
    logged_in(api)
    r = api.client.get("/interface/batmon/list", headers={"Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 200


def test_the_guard_covers_every_change_even_the_logout(api: Api) -> None:
    logged_in(api)
    r = api.client.post("/interface/logout", headers={"Origin": "http://localhost:3000"})
    assert r.status_code == 403
    assert api.client.get("/interface/batmon/count").status_code == 200


# -- login cross-site request forgery, over a real socket ----------------------------------------
# Another site's page could post its owner's api_key to our login: the victim's browser would
# then hold a session as the attacker, and what the victim enters would land in that account.
CROSS_SITE_LOGINS = [
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},  # another port of this host
    {"Origin": "http://evil.example"},
    {"Origin": "null"},  # a sandboxed or privacy-stripped page
]


def test_a_login_from_another_sites_page_is_403_and_sets_no_cookie(serve: ServeProcess) -> None:
    serve.start()
    key = serve.admin_key or ""
    for headers in CROSS_SITE_LOGINS:
        with httpx.Client(base_url=serve.http_url, timeout=10) as browser:
            # A form post, as a forging page sends it.
            r = browser.post("/interface/login", data={"api_key": key}, headers=headers)
            assert r.status_code == 403, (headers, r.text)
            assert "another site" in r.json()["error"]
            assert "set-cookie" not in r.headers and not browser.cookies
            assert browser.get("/interface/batmon/count").status_code == 401  # no session


def test_an_api_key_request_from_another_sites_page_makes_no_session(serve: ServeProcess) -> None:
    serve.start()
    with httpx.Client(base_url=serve.http_url, timeout=10) as browser:
        r = browser.post("/interface/add/batmon", data={"api_key": serve.admin_key, "batmon_name": "x"},
                         headers={"Origin": "http://evil.example"})  # fmt: skip
        assert r.status_code == 200  # the key's owner may use it from anywhere...
        assert "set-cookie" not in r.headers and not browser.cookies  # ...but it logs no browser in


@pytest.mark.parametrize("headers", [
    {"Sec-Fetch-Site": "same-origin", "Origin": "{url}"},  # the login page's fetch
    {"Origin": "{url}"},  # a browser without Fetch Metadata
    {"Sec-Fetch-Site": "none"},  # typed by the user
    {},  # curl, scripts
])  # fmt: skip
def test_a_login_from_our_own_page_sets_the_session_cookie(serve: ServeProcess,
                                                           headers: dict[str, str]) -> None:  # fmt: skip
    serve.start()
    headers = {name: value.format(url=serve.http_url) for name, value in headers.items()}
    with httpx.Client(base_url=serve.http_url, timeout=10) as browser:
        r = browser.post("/interface/login", json={"api_key": serve.admin_key}, headers=headers)
        assert r.status_code == 200, r.text
        assert "batmon_session" in browser.cookies
        assert browser.get("/interface/batmon/count").status_code == 200  # by the cookie alone


# -- the test notice -------------------------------------------------------------------------
def test_a_test_notice_without_any_target_is_400(api: Api) -> None:
    r = api.client.post("/interface/user/notifications/test", headers=api.auth)
    assert r.status_code == 400
    assert "No notification target" in r.json()["error"]
    api.client.cookies.clear()
    assert api.client.post("/interface/user/notifications/test").status_code == 401
    assert api.client.get("/interface/user/notifications/test", headers=api.auth).status_code == 405


def test_the_test_notice_endpoint_is_in_openapi(api: Api) -> None:
    paths = api.client.get("/openapi.json").json()["paths"]
    assert list(paths["/interface/user/notifications/test"]) == ["post"]


@pytest.fixture
def served(serve: ServeProcess) -> Iterator[ServeProcess]:
    serve.args = ["--notify-retry-s", "0.3"]
    yield serve.start()


def test_a_test_notice_is_delivered_through_the_outbox(served: ServeProcess) -> None:
    sink = Sink()
    try:
        with httpx.Client(base_url=served.http_url, headers={"X-API-Key": served.admin_key or ""},
                          timeout=10) as http:  # fmt: skip
            http.post("/interface/user/notifications", json={"email_url": sink.url("test")})
            boat = http.post("/interface/add/batmon", json={"batmon_name": "Boat"}).json()["success"]
            r = http.post("/interface/user/notifications/test")
            assert r.json() == {"success": {"channels": ["email"]}}
            [post] = wait_until(lambda: sink.posts("test"), 10, "the test notice at the sink")
            assert post["title"] == "Test notice from your batmon bridge"
            # It concerns no batmon, so no batmon's notification log shows it.
            log = http.get("/interface/batmon/notifications", params={"batmon_id": boat["batmon_id"]})
            assert log.json() == {"success": []}
    finally:
        sink.close()


# -- the live stream over a real socket --------------------------------------------------------
class StreamRefused(Exception):
    """/events answered with an error status."""


class Stream:
    """An open /events response, read event by event."""

    def __init__(self, http: httpx.Client) -> None:
        self._cm = http.stream("GET", "/events")
        self.response = self._cm.__enter__()
        if self.response.status_code != 200:
            self.close()
            raise StreamRefused(self.response.status_code)
        assert self.response.headers["content-type"].startswith("text/event-stream")
        self._lines = self.response.iter_lines()
        assert next(self._lines) == "retry: 3000"  # the stream is registered from here on
        self.snapshot = self.next_event()
        assert self.snapshot[0] == "snapshot"

    def next_event(self) -> tuple[str, Any]:
        event = ""
        for line in self._lines:
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event:
                return event, json.loads(line.removeprefix("data: "))
        raise AssertionError("the stream ended")

    def close(self) -> None:
        self._cm.__exit__(None, None, None)


def session(url: str, api_key: str) -> httpx.Client:
    http = httpx.Client(base_url=url, timeout=10)
    assert http.post("/interface/login", json={"api_key": api_key}).status_code == 200
    return http


def test_the_live_stream_carries_only_the_users_own_batmons(served: ServeProcess) -> None:
    stranger_key = batmon("user", "add", "stranger@example.org",
                          "--data-dir", str(served.data_dir)).stdout.strip()  # fmt: skip
    admin, stranger = session(served.http_url, served.admin_key or ""), session(served.http_url, stranger_key)
    mine = admin.post("/interface/add/batmon", json={"batmon_name": "Mine"}).json()["success"]
    theirs = stranger.post("/interface/add/batmon", json={"batmon_name": "Theirs"}).json()["success"]
    admin_stream, stranger_stream = Stream(admin), Stream(stranger)
    assert [b["batmon_id"] for b in stranger_stream.snapshot[1]] == [theirs["batmon_id"]]
    try:
        admin.post("/interface/update/batmon", json={"batmon_id": mine["batmon_id"], "voltage": 12.5})
        stranger.post("/interface/update/batmon", json={"batmon_id": theirs["batmon_id"], "soc": 42})
        event, data = stranger_stream.next_event()
        assert (event, data["batmon_id"], data["batmon_soc"]) == ("batmon", theirs["batmon_id"], 42.0)
        event, data = admin_stream.next_event()
        assert (event, data["batmon_id"], data["batmon_voltage"]) == ("batmon", mine["batmon_id"], 12.5)
        admin.post("/interface/delete/batmon", json={"batmon_id": mine["batmon_id"]})
        assert admin_stream.next_event() == ("deleted", {"batmon_id": mine["batmon_id"]})
    finally:
        admin_stream.close()
        stranger_stream.close()
        admin.close()
        stranger.close()


def test_serve_stops_on_sigterm_while_a_live_stream_is_open(served: ServeProcess) -> None:
    http = session(served.http_url, served.admin_key or "")
    stream = Stream(http)
    try:
        # uvicorn waits for open responses; the service must end live streams itself.
        assert served.stop(signal.SIGTERM) == 0
    finally:
        stream.close()
        http.close()


def test_a_closed_stream_frees_its_place(served: ServeProcess) -> None:
    http = session(served.http_url, served.admin_key or "")
    try:
        # A user may keep 16 streams open; 40 opened and closed one after another
        # would be refused from the 17th on if closed ones were not released.
        for _ in range(40):
            def opened() -> Stream | None:
                try:
                    return Stream(http)
                except StreamRefused as refused:
                    assert refused.args == (429,)
                    return None  # the server has not noticed a close yet

            stream = wait_until(opened, 5, "a stream after closing the previous ones")
            stream.close()
    finally:
        http.close()
