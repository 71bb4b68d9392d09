"""Well-known details keys (validated at the edge) and the values derived from them."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from bridge.battery_values import battery_values
from tests.conftest import Api
from tests.support import Env, payload_json


def update(api: Api, batmon_id: int, token: str, **fields: Any) -> Any:
    return api.client.post("/interface/update/batmon",
                           json={"batmon_id": batmon_id, "batmon_token": token, **fields})  # fmt: skip


def status(api: Api, batmon_id: int) -> dict[str, Any]:
    r = api.client.get("/interface/batmon/status", headers=api.auth, params={"batmon_id": batmon_id})
    assert r.status_code == 200, r.text
    return r.json()["success"]  # type: ignore[no-any-return]


WRONG_TYPES = [
    ("temperature", "warm"),
    ("temperature", True),
    ("time_to_go", -5),
    ("time_to_go", [1]),
    ("consumed_ah", "12"),
    ("cells", 3.3),
    ("cells", []),
    ("cells", [3.3, "x"]),
    ("cells", [3.3] * 65),
    ("cells", [3.3, -1]),
    ("capacity_ah", 0),
    ("energy_charged_kwh", -0.01),
    ("energy_discharged_kwh", {"kwh": 1}),
]


@pytest.mark.parametrize("key,value", WRONG_TYPES, ids=[f"{k}={v!r}"[:40] for k, v in WRONG_TYPES])
def test_a_well_known_details_key_of_the_wrong_type_is_a_400_naming_it(api: Api, key: str,
                                                                       value: Any) -> None:  # fmt: skip
    batmon_id, token = api.add_batmon()
    r = update(api, batmon_id, token, batmon_voltage=12.5, batmon_details={key: value, "other": 1})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert "batmon_details" in error and key in error, error
    assert api.core.store.reading_count(batmon_id) == 0


def test_a_python_style_details_text_is_checked_too(api: Api) -> None:
    batmon_id, token = api.add_batmon()
    r = update(api, batmon_id, token, batmon_details="{'temperature': 'hot'}")
    assert r.status_code == 400 and "temperature" in r.json()["error"], r.text


def test_well_known_keys_are_stored_as_sent_and_other_keys_kept(api: Api) -> None:
    batmon_id, token = api.add_batmon()
    details = {"temperature": 21.5, "time_to_go": 600, "consumed_ah": -12.3,
               "cells": [3.31, 3.30, 2.95, 3.32], "capacity_ah": 200, "energy_charged_kwh": 1.5,
               "energy_discharged_kwh": 0, "vendor": {"x": [1, "y"]}, "temperature2": "n/a"}  # fmt: skip
    r = update(api, batmon_id, token, batmon_details=details)
    assert r.status_code == 200, r.text
    assert json.loads(status(api, batmon_id)["batmon_details"]) == details


def reading(voltage: float, current: float, power: float, soc: float,
            details: dict[str, Any]) -> SimpleNamespace:
    """What battery_values reads of a batmon: its current values and details text."""
    return SimpleNamespace(voltage=voltage, current=current, power=power, soc=soc,
                           details=json.dumps(details))


def test_cells_give_min_max_delta_and_the_one_based_index() -> None:
    values = battery_values(reading(12.9, -3.0, -38.7, 80.0,
                                    {"cells": [3.31, 3.30, 2.95, 3.32], "temperature": 21.5}))
    assert values["cell_min"] == 2.95 and values["cell_min_index"] == 3
    assert values["cell_max"] == 3.32 and values["cell_max_index"] == 4
    assert values["cell_delta"] == 0.37
    assert values["temperature"] == 21.5
    assert (values["voltage"], values["current"], values["power"], values["soc"]) == (12.9, -3.0, -38.7, 80.0)


def test_no_cells_no_cell_values_and_unknown_keys_are_not_numbers() -> None:
    values = battery_values(reading(0.0, 0.0, 0.0, 0.0, {"key": 25, "temperature": 20}))
    assert "cell_min" not in values and "key" not in values and values["temperature"] == 20


def test_the_status_object_carries_the_battery_values_as_extra_keys(api: Api) -> None:
    batmon_id, token = api.add_batmon()
    before = status(api, batmon_id)
    assert before["temperature"] is None and before["cell_delta"] is None
    r = update(api, batmon_id, token, batmon_voltage=13.1,
               batmon_details={"cells": [3.31, 3.30, 2.95, 3.32], "time_to_go": 90})  # fmt: skip
    assert r.status_code == 200, r.text
    after = status(api, batmon_id)
    assert (after["cell_min"], after["cell_min_index"], after["cell_delta"]) == (2.95, 3, 0.37)
    assert after["time_to_go"] == 90 and after["temperature"] is None


def test_a_wrong_well_known_key_over_mqtt_gets_an_error_naming_it(env: Env) -> None:
    batmon = env.add_batmon()
    env.bridge()
    device = env.probe(env.topics.error(batmon.id, batmon.token))
    device.publish(env.topics.update(batmon.id, batmon.token),
                   b'{"voltage": 12.1, "details": {"cells": [3.3, "low"]}}')  # fmt: skip
    error = payload_json(device.wait_for(env.topics.error(batmon.id, batmon.token)))["error"]
    assert "details" in error and "cells" in error, error
    assert env.count(batmon) == 0


def test_null_in_a_well_known_key_is_no_value(api: Api) -> None:
    batmon_id, token = api.add_batmon()
    # What the VE.Direct agent sends for TTG -1 (infinite: not discharging).
    r = update(api, batmon_id, token, batmon_details={"time_to_go": None, "temperature": 20})
    assert r.status_code == 200, r.text
    assert status(api, batmon_id)["time_to_go"] is None


def test_batmon_simulate_sends_the_well_known_keys_the_server_accepts() -> None:
    import random

    from bridge.models import Reading
    from bridge.simulate import SimulatedBattery

    battery = SimulatedBattery(soc=80, rng=random.Random(7))
    readings = [Reading.model_validate(battery.step(10)) for _ in range(200)]
    details = [json.loads(r.batmon_details or "{}") for r in readings]
    for key in ("temperature", "consumed_ah", "cells", "capacity_ah", "energy_charged_kwh",
                "energy_discharged_kwh", "time_to_go"):  # fmt: skip
        assert key in details[-1], key
    counters = [(d["energy_charged_kwh"], d["energy_discharged_kwh"]) for d in details]
    assert counters == sorted(counters) and counters[-1] > (0, 0)
