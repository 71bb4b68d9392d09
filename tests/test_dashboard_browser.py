"""The dashboard in a real headless Chromium (Debian's `chromium`, driven by Playwright
with the system browser) against a real `batmon serve` with its embedded broker.

Each step names itself when it fails and leaves a screenshot. Screenshots go to
$BATMON_TEST_ARTIFACTS (else the test's tmp folder); with BATMON_UPDATE_SCREENSHOTS=1
the list and a batmon's page are also written to docs/img/ for the README.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2 as httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from playwright.sync_api import Browser, Page, sync_playwright

from tests.conftest import ServeProcess
from tests.support import ROOT, Sink, wait_until

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

README_IMAGES = ROOT / "docs" / "img"
UPDATE_README = os.environ.get("BATMON_UPDATE_SCREENSHOTS") == "1"



# -- the server, its data, and a device ------------------------------------------------
class Site:
    """A running `batmon serve`, its admin key, and the batmons made for the tests."""

    def __init__(self, serve: ServeProcess) -> None:
        self.serve = serve
        self.url = serve.http_url
        self.key = serve.admin_key or ""
        self.http = httpx.Client(base_url=self.url, timeout=10, headers={"X-API-Key": self.key})
        self.batmons: dict[str, dict[str, Any]] = {}

    def call(self, path: str, **fields: Any) -> Any:
        r = self.http.post(path, json=fields)
        assert r.status_code == 200, f"{path}: {r.status_code} {r.text}"
        return r.json()["success"]

    def add(self, name: str, **fields: Any) -> dict[str, Any]:
        self.batmons[name] = self.call("/interface/add/batmon", batmon_name=name, **fields)
        return self.batmons[name]

    def history(self, batmon_id: int, lo: str, hi: str, points: str | None = None
                ) -> list[dict[str, Any]]:  # fmt: skip
        """History rows of the API: buckets with ``points``, else the raw readings."""
        params = {"batmon_id": batmon_id, "min_epoch_tm_sec": lo, "max_epoch_tm_sec": hi,
                  **({"points": points} if points else {})}  # fmt: skip
        r = self.http.get("/interface/batmon/history", params=params)
        assert r.status_code == 200, r.text
        return r.json()["success"][0]["data"]

    @property
    def mqtt_port(self) -> int:
        return int(self.serve.mqtt_url.rsplit(":", 1)[1])

    def publish(self, name: str, reading: dict[str, Any]) -> None:
        """Publish one reading as the device does (QoS 1), and wait for the broker's ack."""
        b = self.batmons[name]
        client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        client.username_pw_set(str(b["batmon_id"]), b["batmon_token"])
        client.connect("127.0.0.1", self.mqtt_port)
        client.loop_start()
        try:
            info = client.publish(f"batmon/{b['batmon_id']}/{b['batmon_token']}/update",
                                  json.dumps(reading), qos=1)  # fmt: skip
            info.wait_for_publish(5)
            assert info.is_published(), "the broker did not acknowledge the reading"
        finally:
            client.disconnect()
            client.loop_stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    serve = ServeProcess(tmp_path_factory.mktemp("dashboard") / "data").start()
    site = Site(serve)
    now = time.time()
    house = site.add("House bank", batmon_type="BMV-712", update_period=300)
    # An hour of readings, one a minute, the last one 30 s ago: Online, with a curve to draw.
    for i in range(60):
        ts = now - 3600 + 30 + i * 60
        current = round(4.0 * math.sin(i / 8) - 1.0, 2)  # charging by day, a fridge by night
        voltage = round(12.5 + 0.05 * current + 0.006 * i, 3)
        site.call("/interface/update/batmon", batmon_id=house["batmon_id"], ts=ts, voltage=voltage,
                  current=current, power=round(voltage * current, 1), soc=round(62 + i / 4, 1))  # fmt: skip
    site.add("Van starter", batmon_type="generic", update_period=120)
    site.add("Cabin", batmon_type="SmartShunt", update_period=600)
    yield site
    site.http.close()
    # SIGTERM with live streams open: the service must end them and exit by itself.
    assert serve.stop(signal.SIGTERM) == 0, "batmon serve did not stop cleanly on SIGTERM"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():  # never a silent skip: fail, saying what to install
        pytest.fail("Debian's chromium is not installed at /usr/bin/chromium (apt-get install -y chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def artifacts(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    root = Path(os.environ.get("BATMON_TEST_ARTIFACTS") or tmp_path / "artifacts")
    folder = root / request.node.name
    folder.mkdir(parents=True, exist_ok=True)
    print(f"screenshots in {folder}")
    return folder


class Steps:
    """Names each step of a browser test: a failure says which step, with a screenshot;
    a JavaScript error on the page fails the step it happened in."""

    def __init__(self, page: Page, folder: Path) -> None:
        self.page = page
        self.folder = folder
        self.count = 0
        self.js_errors: list[str] = []
        page.on("pageerror", lambda exc: self.js_errors.append(str(exc)))
        # A failed request shows up as a console error too; the response handler judges those.
        page.on("console", lambda msg: msg.type == "error" and not msg.text.startswith(
            "Failed to load resource") and self.js_errors.append(msg.text))  # fmt: skip
        self.expected_errors: set[str] = {"/events", "/interface/login"}  # tested for their 401s
        page.on("response", lambda r: r.status >= 400 and urlsplit(r.url).path not in self.expected_errors
                and self.js_errors.append(f"{r.status} on {r.url}"))  # fmt: skip

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.count += 1
        slug = f"{self.count:02d}-{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}"
        try:
            yield
            assert not self.js_errors, f"JavaScript errors on the page: {self.js_errors}"
        except Exception as exc:
            shot = self.folder / f"FAILED-{slug}.png"
            with contextlib.suppress(Exception):
                self.page.screenshot(path=shot, full_page=True)
            raise AssertionError(f"step '{name}' failed: {exc}\n(screenshot: {shot})") from exc
        self.page.screenshot(path=self.folder / f"{slug}.png", full_page=True)


def row(page: Page, site: Site, name: str) -> Any:
    return page.locator(f'tr[data-batmon-id="{site.batmons[name]["batmon_id"]}"]')


def visible_names(page: Page) -> list[str]:
    return page.locator("#batmons tbody tr:visible a.name").all_inner_texts()


def number(text: str) -> float | None:
    return None if text == "" else float(text)


# -- the walk-through of issue 10's acceptance ----------------------------------------------
def test_dashboard_walk_through(site: Site, browser: Browser, artifacts: Path) -> None:
    context = browser.new_context(base_url=site.url, viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(10_000)
    step = Steps(page, artifacts)
    sink = Sink()
    house_id = site.batmons["House bank"]["batmon_id"]
    try:
        with step("log in with the keyboard"):
            page.goto("/")
            # Reach the api_key field with Tab alone: labels and focus order work.
            for _ in range(10):
                page.keyboard.press("Tab")
                if page.evaluate("document.activeElement.id") == "api_key":
                    break
            assert page.evaluate("document.activeElement.id") == "api_key", "Tab never reached api_key"
            assert page.get_by_label("api_key").count() == 1
            page.keyboard.type("not-a-key")
            page.keyboard.press("Enter")
            refused = page.locator('#login-form .form-status[data-kind="error"]')
            refused.filter(has_text="api_key is not valid").wait_for()
            page.keyboard.press("Control+A")
            page.keyboard.type(site.key)
            page.keyboard.press("Enter")
            page.wait_for_selector("table#batmons")
            assert any(c["name"] == "batmon_session" and c["httpOnly"] for c in context.cookies())

        with step("see the batmon list"):
            names = page.locator("#batmons a.name").all_inner_texts()
            assert names == ["House bank", "Van starter", "Cabin"], names
            house = row(page, site, "House bank")
            assert house.locator(".status").inner_text() == "Online"
            assert house.locator('[data-metric="voltage"]').inner_text().endswith(" V")
            assert house.locator('[data-metric="soc"]').inner_text().endswith("%")
            assert "ago" in house.locator(".age").inner_text()
            assert row(page, site, "Cabin").locator(".status").inner_text() == "Offline"
            assert row(page, site, "Cabin").locator(".age").inner_text() == "never"
            page.wait_for_selector('#live-state[data-state="open"]')

        with step("a batmon that never reported shows — for each value, not 0"):
            for name in ("Cabin", "Van starter"):
                for metric in ("voltage", "current", "power", "soc"):
                    cell = row(page, site, name).locator(f'[data-metric="{metric}"]')
                    assert cell.get_attribute("data-state") == "never", (name, metric)
                    assert cell.inner_text().startswith("—"), (name, metric, cell.inner_text())
            house = row(page, site, "House bank")
            voltage = house.locator('[data-metric="voltage"]').inner_text()
            assert re.fullmatch(r"1\d\.\d\d V", voltage), voltage  # two decimals
            assert re.fullmatch(r"-?\d+ W", house.locator('[data-metric="power"]').inner_text())

        with step("a reading sent over MQTT appears live within 2 s, with no reload"):
            page.evaluate("window.__notReloaded = true")
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            sent = time.monotonic()
            site.publish("Van starter", {"voltage": 13.37, "current": 1.5, "power": 20.1, "soc": 77})
            van = row(page, site, "Van starter")
            page.wait_for_function(
                """id => document.querySelector(`tr[data-batmon-id="${id}"] [data-metric="voltage"]`)
                          .textContent === "13.37 V" """,
                arg=site.batmons["Van starter"]["batmon_id"], timeout=2000,
            )
            print(f"MQTT publish to the value on screen: {(time.monotonic() - sent) * 1000:.0f} ms")
            assert van.locator(".status").inner_text() == "Online"
            assert van.locator('[data-metric="soc"]').inner_text() == "77%"
            assert page.evaluate("window.__notReloaded === true"), "the page was reloaded"
            assert requests == [], f"the page polled instead of listening: {requests}"

        with step("the overview row adds up every batmon"):
            listed = site.http.get("/interface/batmon/list").json()["success"]
            online = [b for b in listed if b["batmon_status"] == "Online"]
            power = page.locator('#overview [data-overview="power"]').inner_text()
            assert power == f"{round(sum(b['batmon_power'] for b in online))} W", power
            lowest = min(online, key=lambda b: b["batmon_soc"])
            soc = page.locator('#overview [data-overview="soc"]').inner_text()
            assert soc.endswith(f"({lowest['batmon_name']})"), soc
            assert page.locator('#overview [data-overview="count"]').inner_text() == "3 · 2 Online"
            if UPDATE_README:
                page.screenshot(path=README_IMAGES / "dashboard.png")

        with step("search, filter and sort the list"):
            assert visible_names(page) == ["House bank", "Van starter", "Cabin"]
            page.get_by_label("Search").fill("VAN")
            page.locator("#shown-count", has_text="1 of 3 shown").wait_for()
            assert visible_names(page) == ["Van starter"]
            assert "q=VAN" in page.url  # a reload or bookmark keeps the choice
            page.get_by_label("Search").fill("smartshunt")  # the type matches too
            assert visible_names(page) == ["Cabin"]
            page.get_by_label("Search").fill("")
            page.get_by_label("Sort by").select_option(label="SoC (lowest first)")
            assert visible_names(page) == ["House bank", "Van starter", "Cabin"]  # never reported last
            page.get_by_label("Sort by").select_option(label="SoC (highest first)")
            assert visible_names(page) == ["Van starter", "House bank", "Cabin"]
            page.get_by_label("Sort by").select_option(label="Name")
            assert visible_names(page) == ["Cabin", "House bank", "Van starter"]
            page.reload()
            page.wait_for_selector('#live-state[data-state="open"]')
            assert visible_names(page) == ["Cabin", "House bank", "Van starter"], "the sort was not kept"
            page.get_by_label("Show", exact=True).select_option(label="Offline")
            assert visible_names(page) == ["Cabin"]
            page.get_by_label("Show", exact=True).select_option(label="All")
            page.get_by_label("SoC at most (%)").fill("77")
            assert visible_names(page) == ["House bank", "Van starter"]
            page.get_by_label("SoC at most (%)").fill("50")
            page.get_by_role("button", name="Show all").click()  # nothing matches: one click back
            assert visible_names(page) == ["House bank", "Van starter", "Cabin"]
            assert "?" not in page.url

        with step("open a batmon"):
            row(page, site, "House bank").locator("a.name").click()
            page.wait_for_url(f"**/batmon/{house_id}")
            assert page.locator("h1").inner_text() == "House bank"

        for range_name in ("Last hour", "Day", "Custom"):
            with step(f"the charts draw the points of the range '{range_name}'"):
                if range_name == "Custom":
                    # 40 to 10 minutes ago, typed as the browser's local time.
                    local = page.evaluate("""() => [40, 10].map(m => {
                        const d = new Date(Date.now() - m * 60000), p = n => String(n).padStart(2, "0");
                        return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T` +
                               `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`; })""")
                    page.get_by_label("From", exact=True).fill(local[0])
                    page.get_by_label("To", exact=True).fill(local[1])
                    page.get_by_role("button", name="Show custom range").click()
                elif range_name != "Last hour":
                    page.get_by_role("button", name=range_name).click()
                    page.wait_for_selector(f'.ranges button[aria-pressed="true"]:text("{range_name}")')
                charts = page.locator('#charts[data-state="ready"]')
                charts.wait_for()
                if range_name == "Custom":
                    assert int(charts.get_attribute("data-max") or 0) - int(
                        charts.get_attribute("data-min") or 0) in range(1799, 1802)
                lo, hi, points = (charts.get_attribute(a) or "" for a in
                                  ("data-min", "data-max", "data-requested-points"))  # fmt: skip
                expected = site.history(house_id, lo, hi, points)
                assert len(expected) > 0, "the API has no points in this range"
                # A "last ..." chart also appends readings that arrive live after its fetch.
                appended = int(charts.get_attribute("data-appended") or 0)
                for metric in ("voltage", "current", "power", "soc"):
                    figure = page.locator(f'.chart[data-metric="{metric}"]')
                    drawn = int(figure.get_attribute("data-points") or -1)
                    assert drawn == len(expected) + appended, (
                        f"{metric}: drew {drawn}, API has {len(expected)}, {appended} appended live")
                    assert figure.locator("canvas").count() == 1, f"{metric}: no uPlot canvas"
                if range_name == "Last hour" and UPDATE_README:
                    page.screenshot(path=README_IMAGES / "dashboard-batmon.png")

        with step("the CSV button downloads the readings of the shown range"):
            lo, hi = (charts.get_attribute(a) or "" for a in ("data-min", "data-max"))
            with page.expect_download() as info:
                page.get_by_role("link", name="Download CSV of this range").click()
            text = Path(info.value.path()).read_text(encoding="utf-8")
            rows = list(csv.DictReader(io.StringIO(text)))
            expected = site.history(house_id, lo, hi)
            assert len(rows) == len(expected) > 0, (len(rows), len(expected))
            for got, want in zip(rows, expected, strict=True):
                assert got["update_time"] == want["update_time"]
                for metric in ("voltage", "current", "power", "soc"):
                    assert number(got[f"batmon_{metric}"]) == want[f"batmon_{metric}"], (metric, got)

        with step("battery values: energy today and per day, temperature, cells, time-to-go"):
            values = page.locator("#battery-values")
            assert values.locator('[data-value="temperature"]').is_hidden()  # none sent yet
            assert values.locator('[data-value="cells"]').is_hidden()
            site.publish("House bank", {"details": {"cells": [3.31, 3.30, 2.95, 3.32], "temperature": 21.5,
                                                    "time_to_go": 95}})  # fmt: skip
            values.locator('[data-value="cells"] dd', has_text="min 2.95 V (cell 3)").wait_for()
            cells = values.locator('[data-value="cells"] dd').inner_text()
            assert cells == "min 2.95 V (cell 3) · max 3.32 V (cell 4) · delta 0.37 V", cells
            assert values.locator('[data-value="temperature"] dd').inner_text() == "21.5 °C"
            assert values.locator('[data-value="time_to_go"] dd').inner_text() == "1 h 35 min"
            # Today's kWh: what the history API says since the browser's midnight.
            today = page.locator("#energy-today")
            page.wait_for_function("document.querySelector('#energy-today').dataset.charged !== undefined")
            midnight = page.evaluate("(() => { const d = new Date(); d.setHours(0, 0, 0, 0);"
                                     " return Math.floor(d.getTime() / 1000); })()")
            r = site.http.get("/interface/batmon/history", params={
                "batmon_id": house_id, "min_epoch_tm_sec": midnight, "bucket": 86400})
            rows = r.json()["success"][0]["data"]
            for key, attribute in (("energy_charged_kwh", "data-charged"),
                                   ("energy_discharged_kwh", "data-discharged")):  # fmt: skip
                assert float(today.get_attribute(attribute) or "nan") == pytest.approx(
                    sum(row[key] for row in rows), abs=1e-6), key  # sums of 9-digit bucket values
            assert re.fullmatch(r"[\d.]+ kWh in · [\d.]+ kWh out", today.inner_text()), today.inner_text()
            status = site.http.get("/interface/batmon/status",
                                   params={"batmon_id": house_id}).json()["success"]  # fmt: skip
            assert status["energy_charged_kwh"] > 0 and status["energy_discharged_kwh"] > 0
            # The chart of energy per day: one bar pair per UTC day with readings.
            chart = page.locator('#energy-chart[data-state="ready"]')
            chart.wait_for()
            now = int(time.time())
            days = site.http.get("/interface/batmon/history", params={
                "batmon_id": house_id, "min_epoch_tm_sec": now // 86400 * 86400 - 29 * 86400,
                "bucket": 86400}).json()["success"][0]["data"]  # fmt: skip
            assert int(chart.get_attribute("data-points") or -1) == len(days) > 0
            assert chart.locator("canvas").count() == 1

        with step("add an alarm"):
            form = page.locator("#alarm-form")
            form.get_by_label("Name").fill("High voltage")
            form.get_by_label("Metric").select_option("voltage")
            form.get_by_label("Condition").select_option(">")
            form.get_by_label("Threshold").fill("13")
            form.get_by_role("button", name="Add alarm").click()
            alarm_row = page.locator("#alarms-table tbody tr", has_text="High voltage")
            alarm_row.wait_for()
            assert alarm_row.locator(".alarm-state").inner_text() == "OK"
            status = site.http.get("/interface/batmon/status", params={"batmon_id": house_id})
            [alarm] = status.json()["success"]["alarms"]
            assert (alarm["alarm_name"], alarm["alarm_condition"], alarm["alarm_threshold_value"]) == (
                "High voltage", ">", 13.0)

        with step("the alarm triggers live and is acknowledged"):
            site.publish("House bank", {"voltage": 14.2})
            page.locator('#alarms-table tr[data-triggered="true"]').wait_for()
            page.get_by_role("button", name="Acknowledge alarm High voltage").click()
            page.locator('#alarms-table tr[data-acknowledged="true"]').wait_for()
            assert "acknowledged" in alarm_row.locator(".alarm-state").inner_text()
            status = site.http.get("/interface/batmon/status", params={"batmon_id": house_id})
            assert status.json()["success"]["alarms"][0]["alarm_akn"] is not None
            page.locator("#log-table tbody tr").first.wait_for()  # the notice it queued

        with step("a voltage-only reading marks the other values stale"):
            values = page.locator("#now-values")
            values.locator('[data-metric="voltage"]', has_text="14.20 V").wait_for()
            assert values.locator('[data-metric="voltage"]').get_attribute("data-state") == "fresh"
            for metric in ("current", "power", "soc"):
                cell = values.locator(f'[data-metric="{metric}"]')
                assert cell.get_attribute("data-state") == "stale", metric
                assert cell.locator(".stale-mark").inner_text() == "stale"
                assert "Not in the latest reading" in (cell.get_attribute("title") or "")

        with step("an alarm on the lowest cell, with a clear value, names its rule and triggers"):
            form = page.locator("#alarm-form")
            form.get_by_label("Name").fill("Low cell")
            form.get_by_label("Metric").select_option("cell_min")
            form.get_by_label("Condition").select_option("<")
            form.get_by_label("Threshold").fill("3")
            form.get_by_label("Clears past (optional)").fill("3.1")
            form.get_by_role("button", name="Add alarm").click()
            cell_row = page.locator("#alarms-table tbody tr", has_text="Low cell")
            cell_row.wait_for()
            assert cell_row.locator("td").first.inner_text() == "cell_min < 3 V, clears past 3.1 V"
            site.publish("House bank", {"details": {"cells": [3.31, 3.30, 2.95, 3.32]}})
            page.locator('#alarms-table tr[data-triggered="true"]', has_text="Low cell").wait_for()
            # Deleted again: the steps after this one expect the batmon's single alarm.
            alarms = site.http.get("/interface/batmon/status",
                                   params={"batmon_id": house_id}).json()["success"]["alarms"]  # fmt: skip
            [low_cell] = [a for a in alarms if a["alarm_name"] == "Low cell"]
            site.call("/interface/batmon/alarm/delete", alarm_id=low_cell["alarm_id"])

        with step("set a notification target"):
            page.get_by_role("link", name="Account").click()
            page.wait_for_url("**/account")
            page.get_by_label("Email").fill(sink.url("dashboard", auth="boat:s3cret-pass@"))
            page.get_by_role("button", name="Save targets").click()
            page.locator("#email_url-current", has_text=f"127.0.0.1:{sink.port}").wait_for()
            assert "s3cret-pass" not in page.content(), "the target's password is shown"
            page.reload()
            assert "s3cret-pass" not in page.content(), "the target's password is in the page"
            assert "boat:" in page.locator("#email_url-current").inner_text()
            targets = site.http.get("/interface/user/notifications").json()["success"]
            assert f"127.0.0.1:{sink.port}" in targets["email_url"]

        with step("send a test notice through the outbox"):
            page.get_by_role("button", name="Send a test notice").click()
            page.locator("#test-status", has_text="queued for: email").wait_for()
            posts = wait_until(lambda: sink.posts("dashboard"), 10, "the test notice at the sink")
            assert "Test notice" in posts[0]["title"]

        with step("log out"):
            page.get_by_role("button", name="Log out").click()
            page.wait_for_selector("#login-form")
            assert page.request.get("/events").status == 401
    finally:
        sink.close()
        context.close()


def test_dashboard_on_a_phone_in_dark_mode(site: Site, browser: Browser, artifacts: Path) -> None:
    context = browser.new_context(base_url=site.url, viewport={"width": 390, "height": 844},
                                  device_scale_factor=2, is_mobile=True, has_touch=True,
                                  color_scheme="dark")  # fmt: skip
    page = context.new_page()
    page.set_default_timeout(10_000)
    step = Steps(page, artifacts)
    try:
        assert context.request.post("/interface/login", data={"api_key": site.key}).ok
        house_id = site.batmons["House bank"]["batmon_id"]
        # A notice with a long target and error in the House bank's log (it used to be clipped).
        site.call("/interface/user/notifications",
                  email_url="json://127.0.0.1:9/" + "averylongpathwithoutanyplacetobreak" * 4)  # fmt: skip
        site.call("/interface/batmon/alarm/add", batmon_id=house_id, alarm_name="Phone check",
                  alarm_metric="voltage", alarm_condition=">", alarm_threshold_value=0)  # fmt: skip
        site.publish("House bank", {"voltage": 12.9})
        for name, path in (("list", "/"), ("batmon", f"/batmon/{house_id}"), ("account", "/account")):
            with step(f"the {name} page fits a phone screen in dark colours"):
                page.goto(path)
                if name == "batmon":
                    page.locator('#charts[data-state="ready"]').wait_for()
                    page.locator("#log-table tbody tr").first.wait_for()
                overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
                assert overflow <= 0, f"{overflow} px wider than the screen"
                clipped = page.evaluate(CLIPPED)
                assert clipped == [], f"content cut off on the right: {clipped}"
                background = page.evaluate("getComputedStyle(document.body).backgroundColor")
                rgb = [int(v) for v in re.findall(r"\d+", background)[:3]]
                assert sum(rgb) < 150, f"background {background} is not dark"
                if UPDATE_README and name in ("list", "batmon"):
                    page.locator('#live-state[data-state="open"]').wait_for()
                    image = "dashboard-phone.png" if name == "list" else "dashboard-batmon-phone.png"
                    page.screenshot(path=README_IMAGES / image)
            if name == "list":
                with step("the list is compact on a phone: a few short lines per batmon"):
                    heights = page.evaluate("""() => [...document.querySelectorAll('#batmons tbody tr')]
                        .map(tr => tr.getBoundingClientRect().height)""")
                    print(f"batmon rows on a 390 px phone: {[round(h) for h in heights]} px")
                    # Three lines, four when a stale mark wraps (it was 285 px a batmon).
                    assert heights and max(heights) <= 120, heights
    finally:
        context.close()


def test_the_connect_cards_mosquitto_pub_line_lands_a_reading_when_run(
    site: Site, browser: Browser, artifacts: Path
) -> None:
    context = browser.new_context(base_url=site.url, viewport={"width": 1280, "height": 800})
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    page = context.new_page()
    page.set_default_timeout(10_000)
    step = Steps(page, artifacts)
    van = site.batmons["Van starter"]
    van_id = van["batmon_id"]
    try:
        assert context.request.post("/interface/login", data={"api_key": site.key}).ok
        with step("the card names this server's MQTT address, and the token only on demand"):
            page.goto(f"/batmon/{van_id}")
            card = page.locator("#connect")
            card.locator("#mqtt-port", has_text=str(site.mqtt_port)).wait_for()
            assert card.locator("#mqtt-host").inner_text() == "127.0.0.1"
            assert card.locator("#mqtt-username").inner_text() == str(van_id)
            assert van["batmon_token"] not in page.content(), "the token is in the page before asked"
            assert "TOKEN" in card.locator("#pub-line").inner_text()

        with step("copying the mosquitto_pub line shows the token and copies the whole line"):
            card.get_by_role("button", name="Copy the mosquitto_pub line").click()
            card.locator("#copy-status", has_text="Copied the mosquitto_pub line.").wait_for()
            line = card.locator("#pub-line").inner_text()
            assert page.evaluate("navigator.clipboard.readText()") == line
            assert card.locator("#token").inner_text() == van["batmon_token"]
            assert f"-p {site.mqtt_port}" in line and van["batmon_token"] in line, line

        with step("the copied line, run in a shell, lands its reading in history"):
            before = time.time() - 1
            done = subprocess.run(["sh", "-c", line], capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, done.stderr
            [answer] = site.http.get("/interface/batmon/history", params={
                "batmon_id": van_id, "min_epoch_tm_sec": int(before)}).json()["success"]
            landed = [r for r in answer["data"] if r["batmon_voltage"] == 12.8]
            assert len(landed) == 1 and landed[0]["batmon_soc"] == 86, answer["data"]
            page.locator('#now-values [data-metric="voltage"]', has_text="12.80 V").wait_for()

        with step("the curl line works too"):
            line = card.locator("#curl-line").inner_text()
            assert line.startswith(f"curl -s -X POST {site.url}/interface/update/batmon "), line
            done = subprocess.run(["sh", "-c", line], capture_output=True, text=True, timeout=30)
            assert done.returncode == 0 and json.loads(done.stdout) == {"success": "success"}, done
    finally:
        context.close()


def test_api_docs_page_renders_with_nothing_from_outside(site: Site, browser: Browser,
                                                          artifacts: Path) -> None:  # fmt: skip
    context = browser.new_context(base_url=site.url)
    outside: list[str] = []

    def only_ours(route: Any) -> None:
        if route.request.url.startswith(site.url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context.route("**/*", only_ours)
    page = context.new_page()
    step = Steps(page, artifacts)
    try:
        with step("Swagger UI shows every path of /openapi.json"):
            page.goto("/docs")
            paths = httpx.get(f"{site.url}/openapi.json").json()["paths"]
            page.locator(".opblock").first.wait_for(timeout=15_000)
            shown = set(page.locator(".opblock-summary-path").all_inner_texts())
            shown = {p.replace("\u200b", "") for p in shown}
            assert set(paths) <= shown, f"missing: {set(paths) - shown}"
            assert outside == [], f"the page asked outside hosts for {outside}"
    finally:
        context.close()


# Boxes that hide overflowing content (a table's scroll wrapper, a card) must not have any.
CLIPPED = """() => [...document.querySelectorAll('.table-wrap, .card, pre')]
  .filter(el => el.offsetParent !== null && el.scrollWidth > el.clientWidth + 1)
  .map(el => `${el.className || el.tagName}: ${el.scrollWidth} > ${el.clientWidth}`)"""

UNNAMED_CONTROLS = """() => [...document.querySelectorAll(
    'input:not([type=hidden]), select, textarea, button, a[href]')]
  .filter(el => el.offsetParent !== null)
  .filter(el => !((el.labels && el.labels.length) || el.getAttribute('aria-label')
                  || el.textContent.trim()))
  .map(el => el.outerHTML.slice(0, 120))"""

FOCUS_RING = """() => { const el = document.activeElement, s = getComputedStyle(el);
  return el === document.body ? 'body' : (s.outlineStyle !== 'none' && parseFloat(s.outlineWidth) >= 2)
    ? '' : el.outerHTML.slice(0, 120); }"""


def test_every_control_has_a_name_and_a_visible_focus(site: Site, browser: Browser,
                                                       artifacts: Path) -> None:  # fmt: skip
    context = browser.new_context(base_url=site.url)
    page = context.new_page()
    page.set_default_timeout(10_000)
    step = Steps(page, artifacts)
    try:
        assert context.request.post("/interface/login", data={"api_key": site.key}).ok
        house_id = site.batmons["House bank"]["batmon_id"]
        for name, path in (("list", "/"), ("batmon", f"/batmon/{house_id}"), ("account", "/account")):
            with step(f"the {name} page: labelled controls, a focus ring on every Tab stop"):
                page.goto(path)
                page.wait_for_selector('#live-state[data-state="open"], #targets-form')
                assert page.evaluate(UNNAMED_CONTROLS) == []
                rings = []
                for _ in range(25):
                    page.keyboard.press("Tab")
                    rings.append(page.evaluate(FOCUS_RING))
                assert [r for r in rings if r not in ("", "body")] == []
    finally:
        context.close()


# -- a battery bank (issue 17, acceptance 4) ----------------------------------------------
def test_a_bank_made_on_the_list_page_shows_its_weighted_soc_and_offline_member(
    site: Site, browser: Browser, artifacts: Path
) -> None:
    # Runs last: its batmons would change the list the walk-through expects.
    now = time.time()
    packs = {}
    for name, capacity, soc, ts in (("Pack A", 100, 50, now), ("Pack B", None, 80, now),
                                    ("Pack C", 100, 20, now - 1200)):  # fmt: skip
        pack = packs[name] = site.add(name, update_period=300)
        if capacity:
            site.call("/interface/edit/batmon", batmon_id=pack["batmon_id"], capacity_ah=capacity)
        details = {} if capacity else {"capacity_ah": 200}  # B's comes from its device
        site.call("/interface/update/batmon", batmon_id=pack["batmon_id"], soc=soc, voltage=13.0,
                  current=2.0, power=26.0, ts=ts, details=details)  # fmt: skip
    context = browser.new_context(base_url=site.url, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(10_000)
    step = Steps(page, artifacts)
    try:
        assert context.request.post("/interface/login", data={"api_key": site.key}).ok
        with step("make a bank of three packs on the list page"):
            page.goto("/")
            form = page.locator("#bank-form")
            form.get_by_label("Bank name").fill("Boat bank")
            for name in packs:
                form.get_by_label(name, exact=True).check()
            form.get_by_role("button", name="Add bank").click()
            page.wait_for_url("**/bank/*")
            bank_id = int(page.url.rsplit("/", 1)[1])
            assert page.locator("h1").inner_text() == "Boat bank"

        with step("its SoC is weighted by capacity and the Offline pack is listed"):
            api = site.http.get("/interface/bank/status", params={"bank_id": bank_id}).json()["success"]
            assert round(api["bank_soc"], 9) == 70
            assert api["offline_batmon_ids"] == [packs["Pack C"]["batmon_id"]]
            page.locator('#live-state[data-state="open"]').wait_for()
            assert page.locator('dd[data-value="bank_soc"]').inner_text() == "70%"
            assert page.locator("#offline").inner_text() == "Left out (Offline): Pack C"
            pack_c = page.locator(f'#members tr[data-batmon-id="{packs["Pack C"]["batmon_id"]}"]')
            assert pack_c.locator(".included").inner_text() == "left out (Offline)"
            assert pack_c.locator(".status").inner_text() == "Offline"
            assert page.locator("#weighting").get_attribute("data-weighting") == "capacity"

        with step("a member's MQTT reading moves the bank's SoC live"):
            page.evaluate("window.__notReloaded = true")
            site.publish("Pack B", {"soc": 20})  # (50x100 + 20x200) / 300 = 30
            page.wait_for_function(
                """() => document.querySelector('dd[data-value="bank_soc"]').textContent === "30%" """,
                timeout=5000,
            )
            assert page.evaluate("window.__notReloaded === true"), "the page was reloaded"

        with step("the list's bank entry follows a member's reading and a bank alarm live"):
            page.goto("/")
            page.locator('#live-state[data-state="open"]').wait_for()
            entry = page.locator(f'#banks li[data-bank-id="{bank_id}"]')
            assert entry.locator('[data-bank-value="bank_soc"]').inner_text() == "30%"
            assert entry.locator(".status").inner_text() == "Online"
            site.call("/interface/batmon/alarm/add", bank_id=bank_id, alarm_name="Bank low",
                      alarm_metric="soc", alarm_condition="<", alarm_threshold_value=25)  # fmt: skip
            page.evaluate("window.__notReloaded = true")
            site.publish("Pack A", {"soc": 80})  # (80x100 + 20x200) / 300 = 40
            page.wait_for_function(f"""() => document.querySelector(
                '#banks li[data-bank-id="{bank_id}"] [data-bank-value="bank_soc"]').textContent === "40%" """,
                timeout=5000)  # fmt: skip
            assert entry.locator(".alarm-chip").count() == 0
            site.publish("Pack A", {"soc": 5})  # (5x100 + 20x200) / 300 = 15: the alarm triggers
            entry.locator(".alarm-chip", has_text="Bank low").wait_for(timeout=5000)
            assert entry.locator('[data-bank-value="bank_soc"]').inner_text() == "15%"
            assert page.evaluate("window.__notReloaded === true"), "the page was reloaded"

        with step("the list links to the bank"):
            page.goto("/")
            page.locator(f'#banks li[data-bank-id="{bank_id}"] a.bank-name', has_text="Boat bank").click()
            page.wait_for_url(f"**/bank/{bank_id}")

        with step("the bank page: labelled controls, a focus ring on every Tab stop"):
            page.locator('#live-state[data-state="open"]').wait_for()
            assert page.evaluate(UNNAMED_CONTROLS) == []
            rings = []
            for _ in range(15):
                page.keyboard.press("Tab")
                rings.append(page.evaluate(FOCUS_RING))
            assert [r for r in rings if r not in ("", "body")] == []

        with step("the bank page adds an alarm on the bank, shows it triggered live, acknowledges it"):
            low = page.locator("#bank-alarms li", has_text="Bank low")  # added over the API above
            assert low.locator(".alarm-state").get_attribute("data-state") == "triggered"  # at 15 %
            form = page.locator("#bank-alarm-form")
            form.get_by_label("Alarm name", exact=True).fill("Bank high")
            form.get_by_label("Value", exact=True).select_option("soc")
            form.get_by_label("Condition", exact=True).select_option(">")
            form.get_by_label("Threshold", exact=True).fill("50")
            form.get_by_role("button", name="Add alarm").click()
            form.locator(".form-status", has_text="Alarm Bank high added.").wait_for()
            high = page.locator("#bank-alarms li", has_text="Bank high")
            assert high.locator(".alarm-state").get_attribute("data-state") == "ok"
            assert "soc > 50%" in high.inner_text()
            page.evaluate("window.__notReloaded = true")
            site.publish("Pack B", {"soc": 80})  # (5x100 + 80x200) / 300 = 55 %
            high.locator('.alarm-state[data-state="triggered"]').wait_for(timeout=5000)
            low.locator('.alarm-state[data-state="ok"]').wait_for(timeout=5000)
            high.get_by_role("button", name="Acknowledge alarm Bank high").click()
            high.locator('.alarm-state[data-state="acknowledged"]').wait_for()
            assert page.evaluate("window.__notReloaded === true"), "the page was reloaded"
            shown = site.http.get("/interface/bank/status", params={"bank_id": bank_id}).json()["success"]
            matching = [a for a in shown["alarms"] if a["alarm_name"] == "Bank high"]
            (alarm,) = matching
            assert alarm["alarm_akn"] is not None and alarm["bank_id"] == bank_id

        with step("rename it and drop the Offline pack"):
            form = page.locator("#bank-form")
            form.get_by_label("Name", exact=True).fill("Boat house bank")
            form.get_by_label("Pack C", exact=True).uncheck()
            form.get_by_role("button", name="Save bank").click()
            form.locator(".form-status", has_text="Bank saved.").wait_for()
            assert page.locator("h1").inner_text() == "Boat house bank"
            assert page.locator("#offline").is_hidden()
            assert page.locator("#members tbody tr").count() == 2
            api = site.http.get("/interface/bank/status", params={"bank_id": bank_id}).json()["success"]
            assert api["bank_name"] == "Boat house bank" and api["offline_batmon_ids"] == []
    finally:
        context.close()
    phone = browser.new_context(base_url=site.url, viewport={"width": 390, "height": 844},
                                device_scale_factor=2, is_mobile=True, has_touch=True,
                                color_scheme="dark")  # fmt: skip
    page = phone.new_page()
    step = Steps(page, artifacts)
    try:
        assert phone.request.post("/interface/login", data={"api_key": site.key}).ok
        with step("the bank page fits a phone screen"):
            page.goto(f"/bank/{bank_id}")
            page.locator('#live-state[data-state="open"]').wait_for()
            overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"{overflow} px wider than the screen"
    finally:
        phone.close()
