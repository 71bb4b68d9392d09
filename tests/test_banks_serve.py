"""Acceptance 4 of issue 17 over real HTTP against a real `batmon serve`: a bank of three
batmons with capacities 100, 200 and 100 Ah at SoC 50, 80 and 20, the third Offline,
reports SoC (50x100 + 80x200)/300 = 70 and lists the Offline member; its Home Assistant
device reaches its owner's Home Assistant (real discovery filters, owner's login) and no
one else's; its dashboard page exists (the browser walks it in test_dashboard_browser.py).
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx2 as httpx
import pytest

from tests.conftest import ServeProcess
from tests.home_assistant import DISCOVERY_FILTERS, discovery_problems
from tests.support import batmon
from tests.test_home_assistant_e2e import HomeAssistant, mqtt_port


def ok(r: httpx.Response) -> Any:
    assert r.status_code == 200, r.text
    return r.json()["success"]


def test_acceptance_4_bank_soc_offline_member_ha_device_and_page(serve: ServeProcess) -> None:
    serve.start()
    admin = {"X-API-Key": serve.admin_key or ""}
    other_key = batmon("user", "add", "other@example.org", "--data-dir", str(serve.data_dir)).stdout.strip()
    with httpx.Client(base_url=serve.http_url, timeout=10, headers=admin) as http:
        ids, tokens = [], []
        for name in ("Pack A", "Pack B", "Pack C"):
            added = ok(http.post("/interface/add/batmon", json={"batmon_name": name, "update_period": 300}))
            ids.append(added["batmon_id"])
            tokens.append(added["batmon_token"])
        a, b, c = ids
        # Capacities: two as the batmon's setting, one as the device reports it in details.
        ok(http.post("/interface/edit/batmon", json={"batmon_id": a, "capacity_ah": 100}))
        ok(http.post("/interface/edit/batmon", data={"batmon_id": str(c), "capacity_ah": "100"}))
        now = time.time()
        for batmon_id, token, values in (
            (a, tokens[0], {"batmon_soc": 50, "batmon_voltage": 13.1, "batmon_current": 4,
                            "batmon_power": 52.4}),
            (b, tokens[1], {"batmon_soc": 80, "batmon_voltage": 13.3, "batmon_current": 6,
                            "batmon_power": 79.8, "batmon_details": {"capacity_ah": 200}}),
            # Its only reading is 20 minutes old, beyond its 300 s period: Offline.
            (c, tokens[2], {"batmon_soc": 20, "batmon_voltage": 12.1, "batmon_current": -2,
                            "batmon_power": -24.2, "ts": now - 1200}),
        ):  # fmt: skip
            ok(http.post("/interface/update/batmon",
                         json={"batmon_id": batmon_id, "batmon_token": token, **values}))  # fmt: skip
        statuses = [ok(http.get("/interface/batmon/status", params={"batmon_id": i}))["batmon_status"]
                    for i in ids]  # fmt: skip
        assert statuses == ["Online", "Online", "Offline"]

        form = {"bank_name": "House bank", "batmon_ids": f"{a},{b},{c}"}
        bank_id = ok(http.post("/interface/add/bank", data=form))["bank_id"]
        bank = ok(http.get("/interface/bank/status", params={"bank_id": bank_id}))
        print("bank status:", json.dumps(bank))
        assert bank["bank_soc"] == pytest.approx((50 * 100 + 80 * 200) / 300)
        assert round(bank["bank_soc"], 9) == 70
        assert bank["offline_batmon_ids"] == [c]
        assert bank["bank_status"] == "Online"
        assert bank["bank_current"] == pytest.approx(10)
        assert bank["bank_voltage"] == pytest.approx(13.2)
        listed = ok(http.get("/interface/bank/list"))
        assert [x["bank_id"] for x in listed] == [bank_id]

        # Another user knows nothing of it.
        other = http.get("/interface/bank/status", params={"bank_id": bank_id},
                         headers={"X-API-Key": other_key})  # fmt: skip
        assert other.status_code == 404 and other.json() == {"error": f"bank_id {bank_id} does not exist."}

        # Its Home Assistant device, as the owner's Home Assistant sees it.
        config_topic = f"homeassistant/device/batmon_bank_{bank_id}/config"
        ha = HomeAssistant(mqtt_port(serve), "admin@localhost", serve.admin_key or "")
        stranger = HomeAssistant(mqtt_port(serve), "other@example.org", other_key)
        try:
            for client in (ha, stranger):
                assert client.subscribe_discovery() == [0] * len(DISCOVERY_FILTERS)
            config = json.loads(ha.next_on(config_topic).payload)
            assert discovery_problems(config) == []
            assert config["dev"]["name"] == "House bank"
            assert config["dev"]["identifiers"] == [f"batmon_bank_{bank_id}"]
            assert config["cmps"]["soc"]["device_class"] == "battery"
            # What Home Assistant then subscribes to: the state and availability topics named.
            named = [config["state_topic"], *(x["topic"] for x in config["availability"])]
            ha.client.subscribe([(topic, 1) for topic in named])
            assert ha.subacks.get(timeout=10) == [1, 1, 1]
            state = json.loads(ha.next_on(config["state_topic"]).payload)
            assert round(state["bank_soc"], 9) == 70 and state["offline_batmon_ids"] == [c]
            availability = next(x["topic"] for x in config["availability"] if "bank" in x["topic"])
            assert ha.next_on(availability).payload == b"online"

            # The stranger subscribed to every discovery filter and may not name our topics.
            ours = [topic for topic in named if "bank" in topic]
            stranger.client.subscribe([(topic, 1) for topic in ours])
            assert stranger.subacks.get(timeout=10) == [0x80] * len(ours) == [0x80, 0x80]

            # A member's reading moves the bank's retained state at once.
            ok(http.post("/interface/update/batmon",
                         json={"batmon_id": b, "batmon_token": tokens[1], "batmon_soc": 20}))  # fmt: skip
            while round(json.loads(ha.next_on(config["state_topic"]).payload)["bank_soc"], 9) != 30:
                pass  # (50x100 + 20x200) / 300

            # Deleting the bank empties its config while Home Assistant is connected.
            ok(http.post("/interface/delete/bank", json={"bank_id": bank_id}))
            while ha.next_on(config_topic).payload != b"":
                pass
            time.sleep(0.3)  # anything late for the stranger would have come by now
            while not stranger.messages.empty():
                stranger.seen.append(stranger.messages.get())
            assert not [m.topic for m in stranger.seen if "bank" in m.topic]
        finally:
            ha.close()
            stranger.close()


def test_the_bank_page_exists_for_its_owner_only(serve: ServeProcess) -> None:
    serve.start()
    admin = {"X-API-Key": serve.admin_key or ""}
    with httpx.Client(base_url=serve.http_url, timeout=10) as http:
        a = ok(http.post("/interface/add/batmon", headers=admin,
                         json={"batmon_name": "Pack A"}))["batmon_id"]  # fmt: skip
        bank_id = ok(http.post("/interface/add/bank", headers=admin,
                               json={"bank_name": "Shed bank", "batmon_ids": [a]}))["bank_id"]  # fmt: skip
        with httpx.Client(base_url=serve.http_url, timeout=10) as stranger:  # no session cookie
            assert stranger.get(f"/bank/{bank_id}", follow_redirects=False).status_code == 303
        ok(http.post("/interface/login", data={"api_key": serve.admin_key}))
        page = http.get(f"/bank/{bank_id}")
        assert page.status_code == 200 and "Shed bank" in page.text
        home = http.get("/")
        assert f'href="/bank/{bank_id}"' in home.text
        assert http.get(f"/bank/{bank_id + 1}").status_code == 404
        ok(http.post("/interface/edit/batmon", headers=admin, json={"batmon_id": a, "capacity_ah": 105}))
        settings = http.get(f"/batmon/{a}").text  # the capacity setting on the batmon's page
        assert 'name="capacity_ah"' in settings and 'value="105"' in settings
