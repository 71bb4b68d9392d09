"""Battery banks over the HTTP API (issue 17, SPEC §7): several batmons of one owner shown
as one battery, its SoC weighted by capacity, offline members left out and listed.

The app runs over a real SQLite file; acceptance 4 over a real `batmon serve` is in
tests/test_banks_serve.py.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.banks import aggregate
from bridge.core import Batmon, Core
from bridge.events import EventBus
from tests.conftest import Api

BANK_KEYS = {
    "bank_id", "bank_name", "batmon_ids", "bank_status", "bank_soc", "bank_voltage",
    "bank_current", "bank_power", "energy_charged_kwh", "energy_discharged_kwh",
    "offline_batmon_ids",
}  # fmt: skip


def ok(r: Any) -> Any:
    assert r.status_code == 200, r.text
    return r.json()["success"]


def add_bank(api: Api, name: str, ids: list[int], key: str | None = None) -> int:
    headers = {"X-API-Key": key} if key else api.auth
    return int(ok(api.client.post("/interface/add/bank", headers=headers,
                                  json={"bank_name": name, "batmon_ids": ids}))["bank_id"])  # fmt: skip


def status(api: Api, bank_id: int) -> dict[str, Any]:
    return dict(ok(api.client.get("/interface/bank/status", headers=api.auth,
                                  params={"bank_id": bank_id})))  # fmt: skip


def reading(api: Api, batmon_id: int, token: str, **values: Any) -> None:
    ok(api.client.post("/interface/update/batmon",
                       json={"batmon_id": batmon_id, "batmon_token": token, **values}))


def set_capacity(api: Api, batmon_id: int, capacity: float) -> None:
    ok(api.client.post("/interface/edit/batmon", headers=api.auth,
                       json={"batmon_id": batmon_id, "capacity_ah": capacity}))


# -- the aggregation rules ------------------------------------------------------------
def test_soc_weighted_by_capacity_offline_member_left_out_and_listed(api: Api) -> None:
    (a, ta), (b, tb), (c, tc) = (api.add_batmon(update_period=300) for _ in range(3))
    set_capacity(api, a, 100)
    set_capacity(api, c, 100)
    reading(api, a, ta, voltage=12.0, current=-10, power=-120, soc=50)
    # Capacity from the device's details when no setting exists.
    reading(api, b, tb, voltage=13.0, current=5, power=65, soc=80, details={"capacity_ah": 200})
    # Its only reading is older than its update period: Offline.
    reading(api, c, tc, voltage=11.0, current=-3, power=-33, soc=20, ts=time.time() - 1000)
    bank_id = add_bank(api, "House bank", [a, b, c])
    bank = status(api, bank_id)
    assert set(bank) >= BANK_KEYS
    assert bank["bank_soc"] == pytest.approx((50 * 100 + 80 * 200) / 300) == pytest.approx(70)
    assert bank["offline_batmon_ids"] == [c]
    assert bank["batmon_ids"] == [a, b, c]
    assert bank["bank_status"] == "Online"
    assert bank["bank_voltage"] == pytest.approx(12.5)  # mean over Online members
    assert bank["bank_current"] == pytest.approx(-5)  # sums over Online members
    assert bank["bank_power"] == pytest.approx(-55)
    assert bank["bank_soc_weighting"] == "capacity"


def test_the_capacity_setting_wins_over_the_details(api: Api) -> None:
    (a, ta), (b, tb) = api.add_batmon(), api.add_batmon()
    reading(api, a, ta, soc=10, details={"capacity_ah": 900})
    reading(api, b, tb, soc=40)
    set_capacity(api, a, 100)
    set_capacity(api, b, 200)
    assert status(api, add_bank(api, "Pair", [a, b]))["bank_soc"] == pytest.approx(30)


def test_equal_weights_when_a_members_capacity_is_unknown(api: Api) -> None:
    (a, ta), (b, tb) = api.add_batmon(), api.add_batmon()
    set_capacity(api, a, 100)  # b has none: Ah against a guess would mean nothing
    reading(api, a, ta, soc=20)
    reading(api, b, tb, soc=60)
    bank = status(api, add_bank(api, "Pair", [a, b]))
    assert bank["bank_soc"] == pytest.approx(40)
    assert bank["bank_soc_weighting"] == "equal"


def test_a_bank_without_online_members_is_offline_with_no_values(api: Api) -> None:
    (a, _), (b, tb) = api.add_batmon(), api.add_batmon()
    reading(api, b, tb, soc=60, ts=time.time() - 1000)
    bank = status(api, add_bank(api, "Cold", [a, b]))
    assert bank["bank_status"] == "Offline"
    assert bank["offline_batmon_ids"] == [a, b]
    assert [bank[k] for k in ("bank_soc", "bank_voltage", "bank_current", "bank_power")] == [None] * 4


def test_energy_counters_are_summed_over_every_member(api: Api) -> None:
    (a, ta), (b, tb) = api.add_batmon(), api.add_batmon()
    reading(api, a, ta, soc=50, details={"energy_charged_kwh": 1.5, "energy_discharged_kwh": 2.0})
    # Offline, yet its counters still count: a sum that fell when a pack went quiet would
    # look like a meter reset to Home Assistant.
    reading(api, b, tb, soc=50, ts=time.time() - 1000,
            details={"energy_charged_kwh": 0.25, "energy_discharged_kwh": 4})  # fmt: skip
    bank = status(api, add_bank(api, "Sum", [a, b]))
    for key, device_sum in (("energy_charged_kwh", 1.75), ("energy_discharged_kwh", 6.0)):
        # Each member's counter as its batmon object shows it where it has one (issue 17's
        # server-kept counters), else as its device sent it.
        members = [ok(api.client.get("/interface/batmon/status", headers=api.auth,
                                     params={"batmon_id": i})) for i in (a, b)]  # fmt: skip
        shown = [m[key] for m in members if key in m]
        expected = sum(shown) if len(shown) == 2 else device_sum
        assert bank[key] == pytest.approx(expected), key


def test_aggregate_reads_energy_from_the_batmon_before_its_details() -> None:
    # When batmons carry their own (server-integrated) counters, those are the truth.
    now = 1_700_000_000.0
    member = Batmon(id=1, user_id=1, name="a", type="t", token="x" * 8, update_period=300,
                    created=now, soc=50, last_reading=now - 1,
                    details='{"energy_charged_kwh": 9.0}')  # fmt: skip
    member.energy_charged_kwh = 3.0  # type: ignore[attr-defined]
    from bridge.banks import Bank

    bank = Bank(id=7, user_id=1, name="b", batmon_ids=[1], created=now)
    assert aggregate(bank, {1: member}, now)["energy_charged_kwh"] == 3.0


# -- the endpoints ----------------------------------------------------------------------
def test_add_takes_ids_as_json_array_form_list_or_comma_separated_text(api: Api) -> None:
    (a, _), (b, _) = api.add_batmon(), api.add_batmon()
    by_json = add_bank(api, "json", [a, b])
    add = "/interface/add/bank"
    by_text = ok(api.client.post(add, headers=api.auth,
                                 json={"bank_name": "text", "batmon_ids": f"{a}, {b}"}))["bank_id"]
    by_form = ok(api.client.post(add, headers=api.auth,
                                 data={"bank_name": "form", "batmon_ids": f"{a},{b}"}))["bank_id"]
    query = {"bank_name": "query", "batmon_ids": f"{a},{b},{a}"}  # a repeated id counts once
    by_query = ok(api.client.post(add, headers=api.auth, params=query))["bank_id"]
    for bank_id in (by_json, by_text, by_form, by_query):
        assert status(api, bank_id)["batmon_ids"] == [a, b]
    assert 0 < by_json < 2**53


def test_list_edit_and_delete(api: Api) -> None:
    (a, _), (b, _), (c, _) = api.add_batmon(), api.add_batmon(), api.add_batmon()
    first = add_bank(api, "First", [a])
    second = add_bank(api, "Second", [b, c])
    listed = ok(api.client.get("/interface/bank/list", headers=api.auth))
    assert [(x["bank_id"], x["bank_name"]) for x in listed] == [(first, "First"), (second, "Second")]
    assert all(set(x) >= BANK_KEYS for x in listed)

    assert ok(api.client.post("/interface/edit/bank", headers=api.auth,
                              json={"bank_id": str(first), "bank_name": "Renamed"})) == "success"  # fmt: skip
    assert status(api, first)["bank_name"] == "Renamed"
    assert status(api, first)["batmon_ids"] == [a]
    ok(api.client.post("/interface/edit/bank", headers=api.auth,
                       data={"bank_id": first, "batmon_ids": f"{c},{a}"}))  # fmt: skip
    assert status(api, first)["batmon_ids"] == [c, a]

    assert ok(api.client.post("/interface/delete/bank", headers=api.auth,
                              json={"bank_id": second})) == "success"  # fmt: skip
    r = api.client.get("/interface/bank/status", headers=api.auth, params={"bank_id": second})
    assert r.status_code == 404 and f"bank_id {second}" in r.json()["error"]
    assert [x["bank_id"] for x in ok(api.client.get("/interface/bank/list", headers=api.auth))] == [first]


def test_a_deleted_batmon_leaves_its_banks(api: Api) -> None:
    (a, _), (b, _) = api.add_batmon(), api.add_batmon()
    bank_id = add_bank(api, "Pair", [a, b])
    ok(api.client.post("/interface/delete/batmon", headers=api.auth, json={"batmon_id": a}))
    assert status(api, bank_id)["batmon_ids"] == [b]
    # ...and stays gone after a restart (the store agrees with memory).
    again = Core(api.core.store, EventBus()).load()
    kept = again.banks.get(bank_id)
    assert kept is not None and kept.batmon_ids == [b]


def test_banks_survive_a_restart(api: Api) -> None:
    (a, _), (b, _) = api.add_batmon(), api.add_batmon()
    set_capacity(api, a, 150.5)
    bank_id = add_bank(api, "Kept", [b, a])
    again = Core(api.core.store, EventBus()).load()
    kept = again.banks.get(bank_id)
    assert kept is not None and (kept.name, kept.batmon_ids, kept.user_id) == ("Kept", [b, a], api.user.id)
    assert again.batmons[a].capacity_ah == 150.5


def test_capacity_setting_is_shown_in_the_batmon_object(api: Api) -> None:
    a, ta = api.add_batmon()
    shown = ok(api.client.get("/interface/batmon/status", headers=api.auth, params={"batmon_id": a}))
    assert shown["capacity_ah"] is None
    reading(api, a, ta, soc=5, details={"capacity_ah": 50})
    assert ok(api.client.get("/interface/batmon/status", headers=api.auth,
                             params={"batmon_id": a}))["capacity_ah"] == 50  # fmt: skip
    set_capacity(api, a, 280)
    assert ok(api.client.get("/interface/batmon/status", headers=api.auth,
                             params={"batmon_id": a}))["capacity_ah"] == 280  # fmt: skip


# -- owner scoping ----------------------------------------------------------------------
def test_another_users_batmon_cannot_join_a_bank(api: Api) -> None:
    mine, _ = api.add_batmon()
    theirs = ok(api.client.post("/interface/add/batmon", headers={"X-API-Key": api.new_user("o@x.org")},
                                json={"batmon_name": "theirs"}))["batmon_id"]  # fmt: skip
    cases: list[tuple[str, dict[str, Any]]] = [
        ("/interface/add/bank", {"bank_name": "x"}),
        ("/interface/edit/bank", {"bank_id": add_bank(api, "Mine", [mine])}),
    ]
    for path, extra in cases:
        r = api.client.post(path, headers=api.auth, json={**extra, "batmon_ids": [mine, theirs]})
        # The same refusal as the batmon endpoints give for another user's batmon.
        assert r.status_code == 404, r.text
        assert r.json() == {"error": f"batmon_id {theirs} does not exist."}
    assert [x["batmon_ids"] for x in ok(api.client.get("/interface/bank/list", headers=api.auth))] == [[mine]]


def test_another_users_bank_does_not_exist_for_you(api: Api) -> None:
    mine, _ = api.add_batmon()
    bank_id = add_bank(api, "Mine", [mine])
    other = {"X-API-Key": api.new_user("other@example.org")}
    other_batmon = ok(api.client.post("/interface/add/batmon", headers=other,
                                      json={"batmon_name": "theirs"}))["batmon_id"]  # fmt: skip
    for path, body in (
        ("/interface/bank/status", {"bank_id": bank_id}),
        ("/interface/edit/bank", {"bank_id": bank_id, "bank_name": "stolen"}),
        ("/interface/edit/bank", {"bank_id": bank_id, "batmon_ids": [other_batmon]}),
        ("/interface/delete/bank", {"bank_id": bank_id}),
    ):
        r = api.client.post(path, headers=other, json=body)
        assert r.status_code == 404, (path, r.text)
        assert r.json() == {"error": f"bank_id {bank_id} does not exist."}
    assert ok(api.client.get("/interface/bank/list", headers=other)) == []
    assert status(api, bank_id)["bank_name"] == "Mine"


def test_bank_endpoints_need_authentication(api: Api) -> None:
    for path in ("/interface/add/bank", "/interface/bank/status", "/interface/edit/bank",
                 "/interface/delete/bank", "/interface/bank/list"):  # fmt: skip
        r = api.client.post(path, json={"bank_id": 1, "bank_name": "x", "batmon_ids": [1]})
        assert r.status_code == 401, (path, r.text)
        assert "api_key" in r.json()["error"]


def test_changes_are_post_only(api: Api) -> None:
    for path in ("/interface/add/bank", "/interface/edit/bank", "/interface/delete/bank"):
        assert api.client.get(path, headers=api.auth).status_code == 405


# -- bad input ------------------------------------------------------------------------------
ADD_CASES: list[tuple[dict[str, Any], str]] = [
    ({"batmon_ids": "{a}"}, "bank_name is required"),
    ({"bank_name": "", "batmon_ids": "{a}"}, "bank_name"),
    ({"bank_name": "x" * 101, "batmon_ids": "{a}"}, "bank_name"),
    ({"bank_name": "  ", "batmon_ids": "{a}"}, "bank_name"),
    ({"bank_name": "ok"}, "batmon_ids is required"),
    ({"bank_name": "ok", "batmon_ids": []}, "batmon_ids"),
    ({"bank_name": "ok", "batmon_ids": ""}, "batmon_ids"),
    ({"bank_name": "ok", "batmon_ids": "{a},abc"}, "batmon_ids"),
    ({"bank_name": "ok", "batmon_ids": "0"}, "batmon_ids"),
    ({"bank_name": "ok", "batmon_ids": [True]}, "batmon_ids"),
    ({"bank_name": "ok", "batmon_ids": [2**53]}, "batmon_ids"),
    ({"bank_name": "ok", "batmon_ids": [1.5]}, "batmon_ids"),
    ({"bank_name": "ok", "batmon_ids": {"a": 1}}, "batmon_ids"),
    ({"bank_name": "ok", "batmon_ids": list(range(1, 102))}, "batmon_ids"),
]


@pytest.mark.parametrize("fields,words", ADD_CASES)
def test_bad_add_is_a_clear_400_and_adds_nothing(api: Api, fields: dict[str, Any], words: str) -> None:
    a, _ = api.add_batmon()
    body = {k: v.format(a=a) if isinstance(v, str) else v for k, v in fields.items()}
    r = api.client.post("/interface/add/bank", headers=api.auth, json=body)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"], r.json()
    assert ok(api.client.get("/interface/bank/list", headers=api.auth)) == []


@pytest.mark.parametrize("fields,words", [
    ({}, "bank_id is required"),
    ({"bank_id": "abc"}, "bank_id"),
    ({"bank_id": 0}, "bank_id"),
    ({"bank_id": True}, "bank_id"),
])  # fmt: skip
def test_bad_bank_id_is_a_clear_400(api: Api, fields: dict[str, Any], words: str) -> None:
    for path in ("/interface/bank/status", "/interface/edit/bank", "/interface/delete/bank"):
        r = api.client.post(path, headers=api.auth, json=fields)
        assert r.status_code == 400, (path, r.text)
        assert words in r.json()["error"]


def test_bad_edit_changes_nothing(api: Api) -> None:
    a, _ = api.add_batmon()
    bank_id = add_bank(api, "Kept", [a])
    before = status(api, bank_id)
    bad: list[dict[str, Any]] = [{"bank_name": ""}, {"batmon_ids": []}, {"batmon_ids": "x"},
                                 {"batmon_ids": [a, 0]}]  # fmt: skip
    for fields in bad:
        r = api.client.post("/interface/edit/bank", headers=api.auth, json={"bank_id": bank_id, **fields})
        assert r.status_code == 400, r.text
        assert next(iter(fields)) in r.json()["error"]
    assert status(api, bank_id) == before


@pytest.mark.parametrize("value", [0, -5, "NaN", "inf", "abc", True])
def test_capacity_must_be_a_positive_number(api: Api, value: Any) -> None:
    a, _ = api.add_batmon()
    r = api.client.post("/interface/edit/batmon", headers=api.auth,
                        json={"batmon_id": a, "capacity_ah": value})  # fmt: skip
    assert r.status_code == 400, r.text
    assert "capacity_ah" in r.json()["error"]
    assert api.core.batmons[a].capacity_ah is None


# -- the rules hold for any bank ----------------------------------------------------------
_MEMBER = st.tuples(
    st.floats(0, 100), st.one_of(st.none(), st.floats(0.1, 10_000)),  # soc, capacity
    st.booleans(), st.floats(-500, 500), st.floats(0, 60),  # online, current, voltage
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_MEMBER, min_size=1, max_size=8))
def test_any_banks_values_follow_from_its_online_members(members: list[Any]) -> None:
    now = 1_700_000_000.0
    batmons = {}
    for i, (soc, capacity, online, current, voltage) in enumerate(members, start=1):
        batmons[i] = Batmon(id=i, user_id=1, name=f"p{i}", type="t", token="x" * 8, update_period=300,
                            created=now, soc=soc, current=current, voltage=voltage, power=current * voltage,
                            capacity_ah=capacity, last_reading=now - (1 if online else 1000))  # fmt: skip
    from bridge.banks import Bank

    bank = aggregate(Bank(id=1, user_id=1, name="b", batmon_ids=list(batmons)), batmons, now)
    online = [b for b in batmons.values() if b.status_at(now) == "Online"]
    assert bank["offline_batmon_ids"] == [i for i, b in batmons.items() if b not in online]
    assert bank["bank_status"] == ("Online" if online else "Offline")
    if not online:
        assert bank["bank_soc"] is bank["bank_voltage"] is bank["bank_current"] is None
        return
    socs = [b.soc for b in online]
    assert min(socs) - 1e-9 <= bank["bank_soc"] <= max(socs) + 1e-9
    assert bank["bank_current"] == pytest.approx(sum(b.current for b in online))
    assert bank["bank_voltage"] == pytest.approx(sum(b.voltage for b in online) / len(online))
    known = all(b.capacity_ah is not None for b in online)
    assert bank["bank_soc_weighting"] == ("capacity" if known else "equal")
    weights = [b.capacity_ah if known else 1.0 for b in online]
    expected = sum(b.soc * w for b, w in zip(online, weights, strict=True)) / sum(weights)
    assert bank["bank_soc"] == pytest.approx(expected)
