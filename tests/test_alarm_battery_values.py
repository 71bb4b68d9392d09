"""Alarms on any battery value (temperature, cells, time-to-go...), with hysteresis, and a
cell alarm's notice that names the cell."""

from __future__ import annotations

import time
from typing import Any

import httpx2 as httpx
import pytest

from bridge.core import Batmon, Core
from bridge.events import AlarmChanged
from tests import test_alarms
from tests.conftest import ServeProcess
from tests.support import Sink
from tests.test_alarms import add_alarm, ingest, kinds
from tests.test_serve_end_to_end import wait_for

CELLS_LOW = [3.31, 3.30, 2.95, 3.32]
# The alarm tests' fixtures: a real store and core, the evaluator running.
clock, core, batmon, changes = test_alarms.clock, test_alarms.core, test_alarms.batmon, test_alarms.changes


def cells(third: float) -> dict[str, Any]:
    return {"cells": [3.31, 3.30, third, 3.32]}


def test_cell_min_alarm_with_a_clear_value_through_apprise_to_a_sink(serve: ServeProcess) -> None:
    """Acceptance 3: triggers once naming cell 3, stays triggered at 3.05, clears at 3.12."""
    sink = Sink()
    try:
        serve.start()
        admin = {"X-API-Key": serve.admin_key or ""}
        with httpx.Client(base_url=serve.http_url, timeout=10) as http:
            http.post("/interface/user/notifications", headers=admin, json={"email_url": sink.url()})
            added = http.post("/interface/add/batmon", headers=admin, data={
                "batmon_name": "House bank", "update_period": 600}).json()["success"]  # fmt: skip
            batmon_id, token = added["batmon_id"], added["batmon_token"]
            r = http.post("/interface/batmon/alarm/add", headers=admin, json={
                "batmon_id": batmon_id, "alarm_name": "Low cell", "alarm_metric": "cell_min",
                "alarm_condition": "<", "alarm_threshold_value": 3.0, "alarm_clear_value": 3.1,
                "alarm_repeat_delay": 3600})  # fmt: skip
            assert r.status_code == 200, r.text

            def reading(details: dict[str, Any]) -> None:
                r = http.post("/interface/update/batmon", json={
                    "batmon_id": batmon_id, "batmon_token": token, "details": details})
                assert r.status_code == 200, r.text

            def status() -> dict[str, Any]:
                return http.get("/interface/batmon/status", headers=admin,  # type: ignore[no-any-return]
                                params={"batmon_id": batmon_id}).json()["success"]  # fmt: skip

            reading(cells(3.2))
            reading({"cells": CELLS_LOW})
            s = status()
            assert (s["cell_min"], s["cell_min_index"], s["cell_delta"]) == (2.95, 3, 0.37)
            [posted] = wait_for(lambda: sink.posts() or None, "the triggered notice")
            assert "triggered" in posted["title"] and "cell 3 at 2.95 V" in posted["title"], posted
            assert "cell 3 at 2.95 V" in posted["message"], posted
            [alarm] = s["alarms"]
            assert alarm["alarm_triggered"] is True and alarm["alarm_clear_value"] == 3.1

            reading(cells(3.05))  # above the threshold, below the clear value: still triggered
            reading(cells(2.97))
            assert status()["alarms"][0]["alarm_triggered"] is True
            reading(cells(3.12))
            posts = wait_for(lambda: (p := sink.posts()) and len(p) >= 2 and p, "the cleared notice")
            assert "cleared" in posts[1]["title"] and "cell 3 at 3.12 V" in posts[1]["title"], posts[1]
            assert status()["alarms"][0]["alarm_triggered"] is False
            time.sleep(0.5)
            assert len(sink.posts()) == 2  # triggered once, cleared once: no flapping
    finally:
        sink.close()


def test_without_a_clear_value_an_alarm_clears_as_before(core: Core, batmon: Batmon,
                                                         changes: list[AlarmChanged]) -> None:  # fmt: skip
    add_alarm(core, batmon, alarm_metric="cell_min", alarm_condition="<", alarm_threshold_value=3.0)
    for third in (2.95, 3.05, 2.9, 3.12):
        ingest(core, batmon, details=cells(third))
    assert kinds(changes) == ["triggered", "cleared", "triggered", "cleared"]


def test_a_clear_value_on_the_wrong_side_changes_nothing(core: Core, batmon: Batmon,
                                                         changes: list[AlarmChanged]) -> None:  # fmt: skip
    # "< 3.0, clear at 2.5" cannot mean "stay triggered above 3.0": it clears as without one.
    add_alarm(core, batmon, alarm_metric="cell_min", alarm_condition="<", alarm_threshold_value=3.0,
              alarm_clear_value=2.5)  # fmt: skip
    for third in (2.95, 3.05):
        ingest(core, batmon, details=cells(third))
    assert kinds(changes) == ["triggered", "cleared"]


@pytest.mark.parametrize("metric,details,value", [
    ("temperature", {"temperature": 48.5}, 48.5),
    ("time_to_go", {"time_to_go": 30}, 30),
    ("consumed_ah", {"consumed_ah": -150}, -150),
    ("cell_delta", {"cells": CELLS_LOW}, 0.37),
    ("cell_max", {"cells": CELLS_LOW}, 3.32),
])  # fmt: skip
def test_alarms_on_details_values(core: Core, batmon: Batmon, changes: list[AlarmChanged],
                                  metric: str, details: dict[str, Any], value: float) -> None:  # fmt: skip
    add_alarm(core, batmon, alarm_metric=metric, alarm_condition="==", alarm_threshold_value=value)
    ingest(core, batmon, voltage=12.0)  # no details: nothing to evaluate
    assert changes == []
    ingest(core, batmon, details=details)
    assert kinds(changes) == ["triggered"] and changes[0].value == value


def test_an_unknown_metric_is_a_400_naming_the_field(serve: ServeProcess) -> None:
    serve.start()
    admin = {"X-API-Key": serve.admin_key or ""}
    with httpx.Client(base_url=serve.http_url, timeout=10) as http:
        batmon_id = http.post("/interface/add/batmon", headers=admin,
                              data={"batmon_name": "x"}).json()["success"]["batmon_id"]  # fmt: skip
        r = http.post("/interface/batmon/alarm/add", headers=admin, json={
            "batmon_id": batmon_id, "alarm_name": "x", "alarm_metric": "cells",
            "alarm_condition": "<", "alarm_threshold_value": 3})  # fmt: skip
        assert r.status_code == 400 and "alarm_metric" in r.json()["error"]
        r = http.post("/interface/batmon/alarm/add", headers=admin, json={
            "batmon_id": batmon_id, "alarm_name": "x", "alarm_metric": "temperature",
            "alarm_condition": ">", "alarm_threshold_value": 45, "alarm_clear_value": "warm"})  # fmt: skip
        assert r.status_code == 400 and "alarm_clear_value" in r.json()["error"]
