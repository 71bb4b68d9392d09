"""An acknowledgement is a promise (SPEC 5): every reading acknowledged by a PUBACK or an
HTTP `success` is in history afterwards, once, whatever happened to `batmon serve`.

Black-box: a real `batmon serve` subprocess on free ports, real devices (paho) at
800+ readings/s, kill -9 or SIGTERM mid-load, a restart on the same data folder, and
each acknowledged reading looked up in history by its unique value (issue 9, acceptance
1; issue 8, acceptance 2).
"""

from __future__ import annotations

import queue
import signal
import subprocess
import threading
import time

import httpx2 as httpx
import pytest

from tests.conftest import ServeProcess
from tests.load import (
    WAIT_S,
    DeviceClient,
    Landing,
    Load,
    add_batmons,
    admin_headers,
    history_values,
    landings,
    restarted,
    wait_history,
)
from tests.support import retained, wait_until
from tests.test_serve_end_to_end import Client, mqtt_port

DEVICES = 10
RATE = 1000.0  # messages/s offered, above the 800/s of issue 9's measurements
KILL_AFTER_ACKED = 3000  # mid-load: the broker has acknowledged this many when the signal comes
# At-least-once on an external broker: a reading committed but not yet acknowledged to the
# broker when the bridge is killed is redelivered and stored again (docs/CHOICES.md, "At
# least once"). Only what was in flight to the bridge can come twice, which the broker's
# inflight window bounds; this is a generous ceiling for any window the bridge may ask for.
REDELIVERY_CEILING = 2000

pytestmark = pytest.mark.timeout(300)


def describe(found: dict[int, Landing]) -> str:
    """Totals over the batmons: sent, acknowledged, rows found, acknowledged but missing, twice."""
    fs = found.values()
    return (f"{len(found)} batmon(s): sent {sum(len(f.sent) for f in fs)},"
            f" acked {sum(len(f.acked) for f in fs)}, found {sum(len(f.history) for f in fs)},"
            f" acked but missing {sum(len(f.missing) for f in fs)},"
            f" duplicates {sum(f.duplicates for f in fs)}, unknown {sum(f.unknown for f in fs)}")


def load_until_signal(clients: list[DeviceClient], serve: ServeProcess, sig: int) -> Load:
    """Publish at RATE; once KILL_AFTER_ACKED are acknowledged, send ``sig`` to serve."""
    load = Load(clients, total=60_000, rate=RATE).start()
    wait_until(lambda: load.acked() >= KILL_AFTER_ACKED, WAIT_S, f"{KILL_AFTER_ACKED} PUBACKs")
    assert serve.proc is not None
    serve.proc.send_signal(sig)
    return load


def exit_code(serve: ServeProcess, timeout: float = 30) -> int | None:
    """The exit code after a signal; None (and a kill -9) if it did not end in ``timeout`` s."""
    assert serve.proc is not None
    try:
        return serve.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        serve.proc.kill()
        serve.proc.wait(WAIT_S)
        return None


def assert_rate(load: Load) -> None:
    # The load must really be the (800+/s); a machine too busy to offer it would
    # make a pass meaningless. Measured over the whole publishing window.
    assert load.offered_rate() >= 800, f"only {load.offered_rate():.0f} messages/s offered"


# -- embedded broker: PUBACK means committed ------------------------------------

def test_kill_9_under_load_loses_no_reading_the_embedded_broker_acknowledged(serve: ServeProcess) -> None:
    serve.start(timeout=WAIT_S)
    clients = [DeviceClient(mqtt_port(serve), d, auth=True) for d in add_batmons(serve, DEVICES)]
    load = load_until_signal(clients, serve, signal.SIGKILL)
    assert serve.proc is not None
    serve.proc.wait(WAIT_S)
    load.stop()
    for client in clients:
        client.close()
    assert_rate(load)
    with restarted(serve) as again:
        found = landings(again, clients)
    acked = sum(len(f.acked) for f in found.values())
    print(f"kill -9, embedded: {load.published} published, {acked} acked; {describe(found)}")
    assert acked >= KILL_AFTER_ACKED
    assert all(not f.missing for f in found.values()), describe(found)
    # Each device sent each reading once and never reconnected: nobody redelivers.
    assert all(f.duplicates == 0 and f.unknown == 0 for f in found.values()), describe(found)


def test_sigterm_under_load_drains_every_acknowledged_reading_and_exits_0_embedded(
    serve: ServeProcess,
) -> None:
    serve.start(timeout=WAIT_S)
    clients = [DeviceClient(mqtt_port(serve), d, auth=True) for d in add_batmons(serve, DEVICES)]
    # A user may watch the bridge's state (SPEC 5): it must hear `offline` before the end.
    watcher = Client(mqtt_port(serve), "admin@localhost", serve.admin_key or "")
    assert watcher.accepted
    assert watcher.subscribe("batmon/bridge/state") == [1]
    assert watcher.next_on("batmon/bridge/state").payload == b"online"
    load = load_until_signal(clients, serve, signal.SIGTERM)
    code = exit_code(serve)
    load.stop()
    for client in clients:
        client.close()
    try:
        last_word = watcher.next_on("batmon/bridge/state", timeout=5).payload
    except (AssertionError, queue.Empty):
        last_word = None
    watcher.close()
    assert_rate(load)
    with restarted(serve) as again:
        found = landings(again, clients)
    print(f"SIGTERM, embedded: exit {code}, bridge state {last_word!r}; {describe(found)}")
    assert all(not f.missing for f in found.values()), describe(found)
    assert all(f.duplicates == 0 and f.unknown == 0 for f in found.values()), describe(found)
    assert code == 0, serve.log_path.read_text()[-2000:]
    assert last_word == b"offline", "no `offline` on batmon/bridge/state before the broker went"


# -- external Mosquitto: the broker keeps the session, at least once ----------

@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_bridge_stopped_under_load_on_external_mosquitto_loses_nothing_the_broker_acknowledged(
    serve: ServeProcess, mosquitto_port: int, sig: int,
) -> None:
    """Mosquitto PUBACKs the devices itself; the bridge acks Mosquitto only after its commit,
    so what the bridge had not committed is redelivered from the session when it is back."""
    serve.start(timeout=WAIT_S)
    clients = [DeviceClient(mosquitto_port, d, auth=False)
               for d in add_batmons(serve, DEVICES, base_topic="fleet")]  # fmt: skip
    load = Load(clients, total=8000, rate=RATE).start()
    # Kill once the bridge is well into the stream (rows in history), not at its start.
    wait_history(serve, clients, want=2000)
    assert serve.proc is not None
    serve.proc.send_signal(sig)
    code = exit_code(serve)
    if sig == signal.SIGTERM:
        assert code == 0, serve.log_path.read_text()[-2000:]
        state = retained(mosquitto_port, "fleet/bridge/state")
        assert state is not None and state.payload == b"offline"
    # Devices keep publishing while the bridge is away: Mosquitto queues for its session.
    time.sleep(1)
    with restarted(serve) as again:
        assert load.wait_acked(), "Mosquitto did not acknowledge every publish"
        assert_rate(load)
        found = wait_history(again, clients, want=8000)
    for client in clients:
        client.close()
    duplicates = sum(f.duplicates for f in found.values())
    print(f"{signal.Signals(sig).name}, external: {load.published} published; duplicates"
          f" {duplicates}; {describe(found)}")  # fmt: skip
    assert all(not f.missing for f in found.values()), describe(found)
    assert all(f.unknown == 0 for f in found.values())
    if sig == signal.SIGTERM:
        # A clean stop acks everything it committed before disconnecting: nothing twice.
        assert duplicates == 0, describe(found)
    else:
        assert duplicates <= REDELIVERY_CEILING, describe(found)
        assert all(max(f.history.count(v) for v in set(f.history)) <= 2 for f in found.values())


# -- batching loses nothing and reorders nothing (issue 8, acceptance 2) --------

def assert_in_order_exactly_once(found: dict[int, Landing]) -> None:
    for batmon_id, f in found.items():
        assert not f.missing, f"batmon {batmon_id}: {len(f.missing)} acknowledged readings missing"
        assert f.duplicates == 0 and f.unknown == 0, describe({batmon_id: f})
        assert len(f.history) == len(f.sent), describe({batmon_id: f})
        assert f.in_order(), f"batmon {batmon_id}: history is not in the order the device sent"


def assert_current_is_last_sent(serve: ServeProcess, found: dict[int, Landing]) -> None:
    """The current value is the last reading sent: no older reading overtook it."""
    with httpx.Client(base_url=serve.http_url, timeout=30) as http:
        for batmon_id, f in found.items():
            status = http.get("/interface/batmon/status", headers=admin_headers(serve),
                              params={"batmon_id": batmon_id}).json()["success"]  # fmt: skip
            assert status["batmon_voltage"] == f.sent[-1], batmon_id


TWENTY_THOUSAND = 20_000


@pytest.mark.parametrize("mode", ["embedded", "external"])
def test_20000_mqtt_readings_land_exactly_once_in_order_per_batmon(
    serve: ServeProcess, request: pytest.FixtureRequest, mode: str,
) -> None:
    """No `ts`: a reading's time is its arrival, so history order is the order of ingest."""
    if mode == "external":
        port = request.getfixturevalue("mosquitto_port")
        serve.start(timeout=WAIT_S)
        devices = add_batmons(serve, DEVICES, base_topic="fleet")
    else:
        serve.start(timeout=WAIT_S)
        port = mqtt_port(serve)
        devices = add_batmons(serve, DEVICES)
    clients = [DeviceClient(port, d, auth=mode == "embedded") for d in devices]
    load = Load(clients, total=TWENTY_THOUSAND, rate=2000, with_ts=False).start()
    assert load.wait_acked(timeout=120), f"{sum(c.unacked() for c in clients)} never acknowledged"
    found = wait_history(serve, clients, want=TWENTY_THOUSAND)
    for client in clients:
        client.close()
    print(f"20,000 over MQTT ({mode}): offered {load.offered_rate():.0f}/s; {describe(found)}")
    assert sum(len(f.acked) for f in found.values()) == TWENTY_THOUSAND
    assert_in_order_exactly_once(found)
    assert_current_is_last_sent(serve, found)


def test_2000_http_updates_from_8_keep_alive_clients_land_exactly_once_in_order(
    serve: ServeProcess,
) -> None:
    serve.start(timeout=WAIT_S)
    devices = add_batmons(serve, 8)
    per_client = 250
    answers: dict[int, list[int]] = {d.batmon_id: [] for d in devices}

    def send(batmon_id: int, token: str) -> None:
        with httpx.Client(base_url=serve.http_url, timeout=60) as http:  # one keep-alive connection
            for i in range(per_client):
                r = http.post("/interface/update/batmon", json={
                    "batmon_id": batmon_id, "batmon_token": token, "voltage": float(i)})  # fmt: skip
                answers[batmon_id].append(r.status_code)

    threads = [threading.Thread(target=send, args=(d.batmon_id, d.token)) for d in devices]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    sent = [float(i) for i in range(per_client)]
    with httpx.Client(base_url=serve.http_url, timeout=60) as http:
        found = {d.batmon_id: Landing.of(sent, sent, history_values(http, serve, d.batmon_id))
                 for d in devices}  # fmt: skip
    assert all(codes == [200] * per_client for codes in answers.values()), {
        b: sorted(set(c)) for b, c in answers.items()}  # fmt: skip
    assert_in_order_exactly_once(found)
    assert_current_is_last_sent(serve, found)

