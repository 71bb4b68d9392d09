"""Bank alarms over a real `batmon serve` (docs/BANKS.md): added with the alarm endpoints
and a bank_id, evaluated on the bank's values as member readings arrive, noticed through
Apprise to a local HTTP sink naming the bank, kept across a restart, owner-only, and
deleted with their bank.
"""

from __future__ import annotations

import signal
from typing import Any

import httpx2 as httpx

from tests.conftest import ServeProcess
from tests.support import Sink, batmon
from tests.test_serve_end_to_end import wait_for


def ok(r: httpx.Response) -> Any:
    assert r.status_code == 200, r.text
    return r.json()["success"]


def test_bank_alarm_over_http_triggers_notices_acks_survives_restart_and_goes_with_its_bank(
    serve: ServeProcess,
) -> None:
    sink = Sink()
    try:
        serve.start()
        admin = {"X-API-Key": serve.admin_key or ""}
        other = {"X-API-Key": batmon("user", "add", "other@example.org", "--data-dir",
                                     str(serve.data_dir)).stdout.strip()}  # fmt: skip
        with httpx.Client(base_url=serve.http_url, timeout=10, headers=admin) as http:
            ok(http.post("/interface/user/notifications", json={"email_url": sink.url("owner")}))
            packs = [ok(http.post("/interface/add/batmon", json={"batmon_name": name}))
                     for name in ("Pack A", "Pack B")]  # fmt: skip
            ids = [p["batmon_id"] for p in packs]
            bank_id = ok(http.post("/interface/add/bank", json={"bank_name": "House bank",
                                                                "batmon_ids": ids}))["bank_id"]  # fmt: skip

            def send(pack: dict[str, Any], soc: float) -> None:
                ok(http.post("/interface/update/batmon", json={"batmon_id": pack["batmon_id"],
                   "batmon_token": pack["batmon_token"], "batmon_soc": soc}))  # fmt: skip

            # A form body, as the seed's clients send it: bank_id as text.
            alarm_id = ok(http.post("/interface/batmon/alarm/add", data={
                "bank_id": str(bank_id), "alarm_name": "Bank low", "alarm_metric": "soc",
                "alarm_condition": "<", "alarm_threshold_value": "30", "alarm_clear_value": "35",
                "alarm_repeat_delay": "3600"}))["alarm_id"]  # fmt: skip

            # Refusals: both subjects, a member's value, another user's bank, a token.
            both = http.post("/interface/batmon/alarm/add", json={
                "bank_id": bank_id, "batmon_id": ids[0], "alarm_name": "x", "alarm_metric": "soc",
                "alarm_condition": "<", "alarm_threshold_value": 1})  # fmt: skip
            assert both.status_code == 400
            assert both.json() == {"error": "give batmon_id or bank_id, not both: an alarm is on one batmon"
                                            " or one bank."}  # fmt: skip
            cells = http.post("/interface/batmon/alarm/edit", json={"alarm_id": alarm_id,
                                                                    "alarm_metric": "cell_min"})  # fmt: skip
            assert cells.status_code == 400 and "alarm_metric of a bank's alarm" in cells.json()["error"]
            foreign = http.post("/interface/batmon/alarm/add", headers=other, json={
                "bank_id": bank_id, "alarm_name": "x", "alarm_metric": "soc", "alarm_condition": "<",
                "alarm_threshold_value": 1})  # fmt: skip
            assert foreign.status_code == 404
            assert foreign.json() == {"error": f"bank_id {bank_id} does not exist."}
            assert http.post("/interface/batmon/alarm/ack", headers=other,
                             json={"alarm_id": alarm_id}).status_code == 404  # fmt: skip

            send(packs[0], 40)
            send(packs[1], 40)
            send(packs[1], 10)  # (40 + 10) / 2 = 25 %
            post = wait_for(lambda: sink.posts("owner"), "the bank's triggered notice")[0]
            assert post["title"] == f"Alarm 'Bank low' triggered on bank 'House bank' (id {bank_id}): soc 25%"

            def bank_alarm() -> dict[str, Any]:
                (alarm,) = ok(http.get("/interface/bank/status", params={"bank_id": bank_id}))["alarms"]
                return alarm  # type: ignore[no-any-return]

            shown = wait_for(lambda: (a := bank_alarm())["alarm_triggered"] and a, "the alarm triggered")
            assert (shown["alarm_id"], shown["bank_id"]) == (alarm_id, bank_id)
            assert shown["alarm_clear_value"] == 35.0
            assert "device_id" not in shown
            listed = ok(http.get("/interface/bank/list"))
            assert [a["alarm_id"] for a in listed[0]["alarms"]] == [alarm_id]
            ok(http.post("/interface/batmon/alarm/ack", json={"alarm_id": alarm_id}))
            send(packs[1], 20)  # 30 %: within the hysteresis, still triggered
            wait_for(lambda: bank_alarm()["alarm_akn"] is not None, "the acknowledgement")
            assert bank_alarm()["alarm_triggered"] is True
        serve.stop(signal.SIGTERM)

        again = ServeProcess(serve.data_dir).start()
        try:
            with httpx.Client(base_url=again.http_url, timeout=10, headers=admin) as http:
                alarm = ok(http.get("/interface/bank/status", params={"bank_id": bank_id}))["alarms"][0]
                assert (alarm["alarm_triggered"], alarm["alarm_akn"] is not None) == (True, True)
                send(packs[0], 62)  # 41 %: past the clear value
                wait_for(lambda: len(sink.posts("owner")) == 2, "the bank's cleared notice")
                assert sink.posts("owner")[1]["title"].startswith(
                    f"Alarm 'Bank low' cleared on bank 'House bank' (id {bank_id}): soc 41%")
                ok(http.post("/interface/delete/bank", json={"bank_id": bank_id}))
                gone = http.post("/interface/batmon/alarm/ack", json={"alarm_id": alarm_id})
                assert gone.status_code == 404
                assert gone.json() == {"error": f"alarm_id {alarm_id} does not exist."}
                assert [ok(http.get("/interface/batmon/status", params={"batmon_id": i}))["alarms"]
                        for i in ids] == [[], []]  # fmt: skip
        finally:
            again.stop(signal.SIGTERM)
    finally:
        sink.close()
