"""`batmon serve --database-url postgresql://...` as a whole: a real process with its embedded
broker on free ports, on a database of its own on the machine's PostgreSQL; readings over
HTTP and MQTT, status and history over HTTP, and all of it still there after a restart."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import httpx2 as httpx

from tests import pg_support
from tests.conftest import ServeProcess
from tests.support import Sink, batmon
from tests.test_serve_end_to_end import Client, mqtt_port, wait_for

PASSWORD = "never-printed-pw"  # trust auth ignores it; it must not show anywhere


def test_serve_on_postgresql_keeps_http_and_mqtt_readings_across_a_restart(tmp_path: Path) -> None:
    url = pg_support.fresh_database_url().replace("postgres@", f"postgres:{PASSWORD}@", 1)
    serve = ServeProcess(tmp_path / "data", args=["--database-url", url])
    try:
        serve.start()
        assert any(line.startswith("data  postgresql://postgres@127.0.0.1:5432/batmon_test_")
                   for line in serve.output), serve.output  # fmt: skip
        admin = {"X-API-Key": serve.admin_key or ""}
        with httpx.Client(base_url=serve.http_url, timeout=10) as http:
            added = http.post("/interface/add/batmon", headers=admin,
                              data={"batmon_name": "Van", "update_period": 60}).json()["success"]  # fmt: skip
            batmon_id, token = added["batmon_id"], added["batmon_token"]
            r = http.post("/interface/update/batmon", json={"batmon_id": batmon_id, "batmon_token": token,
                                                            "voltage": 12.1, "soc": 80})  # fmt: skip
            assert r.status_code == 200, r.text
            device = Client(mqtt_port(serve), str(batmon_id), token)
            assert device.accepted
            device.publish(f"batmon/{batmon_id}/{token}/update", json.dumps({"voltage": 12.7, "soc": 88}))
            device.close()

            def status() -> dict[str, Any]:
                return http.get("/interface/batmon/status", headers=admin,
                                params={"batmon_id": batmon_id}).json()["success"]  # fmt: skip

            wait_for(lambda: status()["batmon_voltage"] == 12.7, "the MQTT reading in HTTP status")
            before = history(http, admin, batmon_id)
            assert [row["batmon_voltage"] for row in before] == [12.1, 12.7]
            assert status()["batmon_status"] == "Online"
        assert serve.stop(signal.SIGTERM) == 0

        serve.admin_key = None
        serve.start()
        assert serve.admin_key is None  # the users are in PostgreSQL, not in a new file
        with httpx.Client(base_url=serve.http_url, timeout=10) as http:
            after = http.get("/interface/batmon/status", headers=admin,
                             params={"batmon_id": batmon_id}).json()["success"]  # fmt: skip
            assert (after["batmon_voltage"], after["batmon_soc"]) == (12.7, 88.0)
            assert history(http, admin, batmon_id) == before
            health = http.get("/healthz")
            assert health.status_code == 200 and health.json()["database"] == "ok", health.text
            r = http.post("/interface/update/batmon", json={"batmon_id": batmon_id, "batmon_token": token,
                                                            "voltage": 13.0})  # fmt: skip
            assert r.status_code == 200, r.text
            assert [row["batmon_voltage"] for row in history(http, admin, batmon_id)] == [12.1, 12.7, 13.0]
            [bucket] = http.get("/interface/batmon/history", headers=admin, params={
                "batmon_id": batmon_id, "min_epoch_tm_sec": 0, "bucket": 10**9}).json()["success"][0]["data"]
            assert bucket["count"] == 3, bucket
            # `batmon user add` writes to the same database, and serve finds the user.
            added_key = batmon("user", "add", "second@example.org", "--database-url", url).stdout.strip()
            r = http.get("/interface/batmon/count", headers={"X-API-Key": added_key})
            assert r.status_code == 200 and r.json()["success"] == {"batmons": 0}, r.text
            wrong = batmon("user", "list", "--database-url", url.replace("postgresql:", "mysql:"))
            assert wrong.returncode == 2 and PASSWORD not in wrong.stderr, wrong.stderr
            # A running serve on PostgreSQL honours `batmon user reset-key` and tokens at once.
            token = batmon("user", "token", "add", "admin@localhost", "--name", "ha", "--database-url", url)
            assert token.returncode == 0, token.stderr

            def token_accepted() -> bool:
                ha = Client(mqtt_port(serve), "admin@localhost", token.stdout.strip())
                ha.close()
                return ha.accepted

            wait_for(token_accepted, "the new token accepted by the running serve")
            new_key = batmon("user", "reset-key", "admin@localhost", "--database-url", url).stdout.strip()
            wait_for(lambda: http.get("/interface/batmon/count", headers=admin).status_code == 401,
                     "the old key refused by the running serve")  # fmt: skip
            assert http.get("/interface/batmon/count", headers={"X-API-Key": new_key}).status_code == 200
    finally:
        if serve.proc is not None:
            serve.stop(signal.SIGKILL)
    printed = "".join(serve.output) + serve.log_path.read_text()
    assert PASSWORD not in printed


def history(http: httpx.Client, headers: dict[str, str], batmon_id: int) -> list[dict[str, Any]]:
    [h] = http.get("/interface/batmon/history", headers=headers,
                   params={"batmon_id": batmon_id, "min_epoch_tm_sec": 0}).json()["success"]  # fmt: skip
    return h["data"]


def test_serve_on_postgresql_sends_alarm_notices_and_keeps_banks(tmp_path: Path) -> None:
    """The outbox, alarms, banks and a delete, through a real serve on PostgreSQL."""
    url = pg_support.fresh_database_url()
    sink = Sink()
    serve = ServeProcess(tmp_path / "data", args=["--database-url", url, "--notify-retry-s", "0.3"])
    try:
        serve.start()
        admin = {"X-API-Key": serve.admin_key or ""}
        with httpx.Client(base_url=serve.http_url, timeout=10, headers=admin) as http:
            r = http.post("/interface/user/notifications", json={"email_url": sink.url("/")})
            assert r.status_code == 200, r.text
            added = [http.post("/interface/add/batmon", json={"batmon_name": name}).json()["success"]
                     for name in ("Pack A", "Pack B")]  # fmt: skip
            (a, token), b = (added[0]["batmon_id"], added[0]["batmon_token"]), added[1]["batmon_id"]
            r = http.post("/interface/batmon/alarm/add", json={
                "batmon_id": a, "alarm_name": "High", "alarm_metric": "voltage", "alarm_condition": ">=",
                "alarm_threshold_value": 10, "alarm_repeat_delay": 3600})  # fmt: skip
            assert r.status_code == 200, r.text
            http.post("/interface/update/batmon", json={"batmon_id": a, "batmon_token": token, "voltage": 12})
            wait_for(lambda: sink.posts(), "the alarm's notice")
            wait_for(lambda: {n["state"] for n in http.get("/interface/batmon/notifications",
                                                           params={"batmon_id": a}).json()["success"]}
                     == {"sent"}, "the notice marked sent")  # fmt: skip
            bank_id = http.post("/interface/add/bank", json={"bank_name": "House", "batmon_ids": [a, b]}
                                ).json()["success"]["bank_id"]  # fmt: skip
            r = http.post("/interface/delete/batmon", json={"batmon_id": b})
            assert r.status_code == 200, r.text
        serve.stop(signal.SIGTERM)
        serve.admin_key = None
        serve.start()
        with httpx.Client(base_url=serve.http_url, timeout=10, headers=admin) as http:
            bank = http.get("/interface/bank/status", params={"bank_id": bank_id}).json()["success"]
            assert bank["batmon_ids"] == [a], bank  # b left the bank with its delete
            assert http.get("/interface/batmon/status", params={"batmon_id": b}).status_code == 404
            r = http.post("/interface/add/batmon", json={"batmon_name": "Pack C"})
            assert r.json()["success"]["batmon_id"] not in (a, b)
        titles = [post["title"] for post in sink.posts()]
        assert len(titles) == 1 and "triggered" in titles[0].lower(), titles
    finally:
        if serve.proc is not None:
            serve.stop(signal.SIGKILL)
        sink.close()
