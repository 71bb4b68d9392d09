"""Energy counters: integrated from power in device time, or following the device's own
counters; never down, never back to 0, through a restart of `batmon serve`."""

from __future__ import annotations

import itertools
import json
import signal
import time
from typing import Any

import httpx2 as httpx
import pytest

from tests.conftest import Api, ServeProcess
from tests.test_serve_end_to_end import Client, mqtt_port, wait_for

STEP_S = 10
UPDATE_PERIOD_S = 60


def profile(start: float) -> list[tuple[float, float]]:
    """Acceptance 1: 2 h at -120 W, 1 h at +300 W, a 30 min gap, 1 h at -60 W; a reading per 10 s."""
    points: list[tuple[float, float]] = []
    t = start
    for seconds, watts in ((7200, -120.0), (3600, 300.0)):
        for _ in range(seconds // STEP_S):
            points.append((t, watts))
            t += STEP_S
    t += 1800  # the gap: no readings
    for _ in range(3600 // STEP_S):
        points.append((t, -60.0))
        t += STEP_S
    return points


def trapezoid(points: list[tuple[float, float]], max_gap: float) -> tuple[float, float]:
    """(charged, discharged) kWh by the contract's rule, written out independently:
    trapezoids between consecutive readings, split where power crosses zero, none over a gap."""
    charged = discharged = 0.0
    for (t0, p0), (t1, p1) in itertools.pairwise(points):
        dt = t1 - t0
        if dt > max_gap:
            continue
        if p0 * p1 < 0:
            at = dt * abs(p0) / (abs(p0) + abs(p1))
            parts = [(p0 / 2 * at), (p1 / 2 * (dt - at))]
        else:
            parts = [(p0 + p1) / 2 * dt]
        for joules in parts:
            if joules > 0:
                charged += joules / 3.6e6
            else:
                discharged -= joules / 3.6e6
    return charged, discharged


def test_the_trapezoid_of_the_profile_is_within_1_percent_of_the_exact_energy() -> None:
    charged, discharged = trapezoid(profile(1_700_000_000), 2 * UPDATE_PERIOD_S)
    assert charged == pytest.approx(0.3, rel=0.01)
    assert discharged == pytest.approx(0.24 + 0.06, rel=0.01)


class Device:
    """A batmon over MQTT to a real serve: readings with device timestamps, in arrays."""

    def __init__(self, serve: ServeProcess, batmon_id: int, token: str) -> None:
        self.serve, self.batmon_id, self.token = serve, batmon_id, token
        self.client = Client(mqtt_port(serve), str(batmon_id), token)
        assert self.client.accepted

    def send(self, readings: list[dict[str, Any]]) -> None:
        for i in range(0, len(readings), 500):
            self.client.publish(f"batmon/{self.batmon_id}/{self.token}/update",
                                json.dumps(readings[i:i + 500]))  # fmt: skip

    def close(self) -> None:
        self.client.close()


def status(serve: ServeProcess, batmon_id: int) -> dict[str, Any]:
    r = httpx.get(f"{serve.http_url}/interface/batmon/status", params={"batmon_id": batmon_id},
                  headers={"X-API-Key": serve.admin_key or ""}, timeout=10)  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()["success"]  # type: ignore[no-any-return]


def add_batmon(serve: ServeProcess) -> tuple[int, str]:
    r = httpx.post(f"{serve.http_url}/interface/add/batmon", headers={"X-API-Key": serve.admin_key or ""},
                   data={"batmon_name": "Van", "update_period": UPDATE_PERIOD_S}, timeout=10)  # fmt: skip
    success = r.json()["success"]
    return success["batmon_id"], success["batmon_token"]


def restart(serve: ServeProcess, sig: int) -> None:
    serve.stop(sig)
    serve.proc = None
    serve.start()


def test_a_known_power_profile_over_mqtt_through_a_killed_serve(serve: ServeProcess) -> None:
    serve.start()
    admin_key = serve.admin_key
    batmon_id, token = add_batmon(serve)
    start = time.time() - 6 * 3600
    points = profile(start)
    readings = [{"power": watts, "voltage": 12.0, "ts": t} for t, watts in points]
    half = len(readings) // 2 + 7  # inside the +300 W hour

    device = Device(serve, batmon_id, token)
    device.send(readings[:half])
    wait_for(lambda: status(serve, batmon_id)["last_modified"] == int(points[half - 1][0]), "first half")
    before = status(serve, batmon_id)
    device.close()
    restart(serve, signal.SIGKILL)  # no clean stop: what was acked must be enough
    after = status(serve, batmon_id)
    assert (after["energy_charged_kwh"], after["energy_discharged_kwh"]) == (
        before["energy_charged_kwh"], before["energy_discharged_kwh"])

    device = Device(serve, batmon_id, token)
    device.send(readings[half:])
    wait_for(lambda: status(serve, batmon_id)["last_modified"] == int(points[-1][0]), "second half")
    device.close()
    final = status(serve, batmon_id)
    charged, discharged = trapezoid(points, 2 * UPDATE_PERIOD_S)
    # The server's integration is the contract's rule, the restart changed nothing...
    assert final["energy_charged_kwh"] == pytest.approx(charged, abs=1e-6)
    assert final["energy_discharged_kwh"] == pytest.approx(discharged, abs=1e-6)
    # ... and the rule is within 1 % of the exact energy; the 30 min gap added nothing.
    assert final["energy_charged_kwh"] == pytest.approx(0.3, rel=0.01)
    assert final["energy_discharged_kwh"] == pytest.approx(0.30, rel=0.01)
    print(f"charged {final['energy_charged_kwh']} kWh (exact 0.3), "
          f"discharged {final['energy_discharged_kwh']} kWh (exact 0.3)")

    # The retained state carries them too (Home Assistant reads it).
    # (The state is coalesced, 250 ms: the retained one may come just before the last.)
    user = Client(mqtt_port(serve), "admin@localhost", admin_key or "")
    assert user.subscribe(f"batmon/{batmon_id}/state") == [1]
    want = (final["energy_charged_kwh"], final["energy_discharged_kwh"])
    seen = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and want not in seen:
        message = user.next_on(f"batmon/{batmon_id}/state", timeout=deadline - time.monotonic())
        state = json.loads(message.payload)
        seen.append((state["energy_charged_kwh"], state["energy_discharged_kwh"]))
    user.close()
    assert seen[-1] == want, seen

    # Per day and per bucket: the history's buckets sum to the counters.
    r = httpx.get(f"{serve.http_url}/interface/batmon/history", headers={"X-API-Key": admin_key or ""},
                  params={"batmon_id": batmon_id, "min_epoch_tm_sec": int(start) - 1, "bucket": 3600},
                  timeout=10)  # fmt: skip
    rows = r.json()["success"][0]["data"]
    assert sum(row["energy_charged_kwh"] for row in rows) == pytest.approx(charged, abs=1e-6)
    assert sum(row["energy_discharged_kwh"] for row in rows) == pytest.approx(discharged, abs=1e-6)


def test_a_device_counter_that_resets_never_takes_the_batmons_counter_down(serve: ServeProcess) -> None:
    serve.start()
    batmon_id, token = add_batmon(serve)
    device = Device(serve, batmon_id, token)
    counters = [(5.00, 2.00), (5.10, 2.00), (5.30, 2.05), (0.00, 0.00), (0.05, 0.01), (0.25, 0.01)]
    start = time.time() - 600
    seen: list[tuple[float, float]] = []
    for i, (charged, discharged) in enumerate(counters):
        # power is given too: with the device's counters it must not be integrated as well
        device.send([{"power": 500.0, "ts": start + 10 * i, "details": {
            "energy_charged_kwh": charged, "energy_discharged_kwh": discharged}}])
        wait_for(lambda i=i: status(serve, batmon_id)["last_modified"] == int(start + 10 * i), "reading")
        s = status(serve, batmon_id)
        seen.append((s["energy_charged_kwh"], s["energy_discharged_kwh"]))
    device.close()
    assert seen == sorted(seen), f"a counter went down: {seen}"
    # From its first counter on, the batmon counts the device's increments: 0.1 + 0.2,
    # then the reset (nothing lost, nothing counted twice), then 0.05 + 0.2.
    assert seen[-1][0] == pytest.approx(0.55, abs=1e-9)
    assert seen[-1][1] == pytest.approx(0.06, abs=1e-9)
    restart(serve, signal.SIGTERM)
    s = status(serve, batmon_id)
    assert (s["energy_charged_kwh"], s["energy_discharged_kwh"]) == seen[-1]


def test_a_new_batmon_has_counters_at_zero_and_the_seeds_keys_unchanged(api: Api) -> None:
    batmon_id, _ = api.add_batmon()
    s = api.client.get("/interface/batmon/status", headers=api.auth,
                       params={"batmon_id": batmon_id}).json()["success"]  # fmt: skip
    assert (s["energy_charged_kwh"], s["energy_discharged_kwh"]) == (0.0, 0.0)
    assert s["batmon_details"] == "{}" and s["batmon_power"] == 0.0


def test_daily_energy_buckets_survive_retention_and_sum_to_the_counters(api: Api) -> None:
    from bridge.extensions.retention_pruner import DAY, RetentionPruner

    batmon_id, token = api.add_batmon(update_period=3600)
    t0 = 1_700_000_000 // DAY * DAY
    for i in range(4 * 24 * 6):  # 4 days, a reading every 10 minutes
        watts = 200.0 if (i // 6) % 24 < 8 else -50.0
        r = api.client.post("/interface/update/batmon", json={
            "batmon_id": batmon_id, "batmon_token": token, "batmon_power": watts, "ts": t0 + 600 * i})
        assert r.status_code == 200, r.text

    def days() -> list[dict[str, Any]]:
        r = api.client.get("/interface/batmon/history", headers=api.auth, params={
            "batmon_id": batmon_id, "min_epoch_tm_sec": t0, "max_epoch_tm_sec": t0 + 4 * DAY, "bucket": DAY})
        assert r.status_code == 200, r.text
        return r.json()["success"][0]["data"]  # type: ignore[no-any-return]

    before = days()
    assert len(before) == 4
    s = api.client.get("/interface/batmon/status", headers=api.auth,
                       params={"batmon_id": batmon_id}).json()["success"]  # fmt: skip
    assert sum(d["energy_charged_kwh"] for d in before) == pytest.approx(s["energy_charged_kwh"], abs=1e-6)
    assert sum(d["energy_discharged_kwh"] for d in before) == pytest.approx(s["energy_discharged_kwh"],
                                                                           abs=1e-6)  # fmt: skip
    # 8 h a day at 200 W (1.6 kWh) less the steps; 16 h at 50 W (0.8 kWh)
    assert before[1]["energy_charged_kwh"] == pytest.approx(1.6, rel=0.05)
    assert before[1]["energy_discharged_kwh"] == pytest.approx(0.8, rel=0.05)

    pruner = RetentionPruner(api.core.store, 1, clock=lambda: t0 + 4 * DAY)
    assert pruner.prune_pass() > 0
    after = days()
    for b, a in zip(before, after, strict=True):
        assert a["energy_charged_kwh"] == pytest.approx(b["energy_charged_kwh"], abs=1e-9)
        assert a["energy_discharged_kwh"] == pytest.approx(b["energy_discharged_kwh"], abs=1e-9)


@pytest.mark.parametrize("text,seconds", [("1d", 86400), ("6h", 21600), ("15m", 900), ("30s", 30),
                                          ("1w", 604800), ("86400", 86400)])  # fmt: skip
def test_bucket_takes_a_duration_like_1d(api: Api, text: str, seconds: int) -> None:
    batmon_id, _ = api.add_batmon()
    r = api.client.get("/interface/batmon/history", headers=api.auth, params={
        "batmon_id": batmon_id, "min_epoch_tm_sec": 0, "bucket": text})
    assert r.status_code == 200, r.text
    assert r.json()["success"][0]["bucket"] == seconds


@pytest.mark.parametrize("text", ["0d", "1y", "d", "1.5d", "-1d", "1 d"])
def test_a_bad_duration_bucket_is_a_400_naming_it(api: Api, text: str) -> None:
    r = api.client.get("/interface/batmon/history", headers=api.auth,
                       params={"min_epoch_tm_sec": 0, "bucket": text})  # fmt: skip
    assert r.status_code == 400 and "bucket" in r.json()["error"], r.text


def test_the_state_columns_name_every_field_with_its_value() -> None:
    """columns() is spelled out for speed (docs/PERFORMANCE.md); a field added to EnergyState
    and not to columns() would silently not be stored."""
    from dataclasses import fields

    from bridge.energy import COLUMNS, EnergyState

    values = [1.5, 2.5, 1_700_000_000.0, -42.0, 10.0, 20.0]
    state = EnergyState(*values)
    assert state.columns() == dict(zip([f.name for f in fields(EnergyState)], values, strict=True))
    assert tuple(state.columns()) == COLUMNS
    assert EnergyState.of(state) == state
