"""`batmon agent vedirect` as a user runs it: a real agent process reads the slave end of a
pseudo-terminal while the test plays the Victron device on the master end, and readings
arrive in a real `batmon serve` (embedded broker) through MQTT."""

from __future__ import annotations

import calendar
import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import tty
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from bridge.agent.vedirect_parser import encode_block
from bridge.store.agent_queue import ReadingQueue
from tests.conftest import ServeProcess
from tests.support import ROOT, batmon, wait_until

RECORDINGS = ROOT / "bridge" / "agent" / "recordings"


class PtyDevice:
    """A pseudo-terminal pair: the agent opens ``path``, the test writes as the device."""

    def __init__(self, folder: Path) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)  # no line discipline: CR stays CR, as on a real UART
        # Devices are named through a stable link (like /dev/serial/by-id/...), so a
        # "replugged" device can come back under the same name.
        self.path = folder / "ttyVE"
        self.path.unlink(missing_ok=True)
        self.path.symlink_to(os.ttyname(self.slave))

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def close(self) -> None:
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)


def bmv_pair(n: int) -> bytes:
    """A BMV's two blocks for second ``n``: V counts up in mV, so each reading is known."""
    main = encode_block([
        ("PID", "0x204"), ("V", str(12000 + n)), ("VS", "12640"), ("I", str(-1000 - n)),
        ("P", str(-12 - n % 5)), ("CE", str(-45000 - n)), ("SOC", "839"), ("TTG", "-1"),
        ("Alarm", "ON"), ("Relay", "OFF"), ("AR", "4"), ("XYZ", "17"), ("BMV", "702"), ("FW", "0308"),
    ])  # fmt: skip
    history = encode_block([
        ("H1", "-102345"), ("H2", "-45400"), ("H3", "-30120"), ("H4", "87"), ("H5", "0"),
        ("H6", "-8760345"), ("H7", "10894"), ("H8", "14712"), ("H9", str(86400 + n)), ("H10", "42"),
        ("H11", "0"), ("H12", "0"), ("H13", "0"), ("H14", "0"), ("H15", "11802"), ("H16", "14550"),
        ("H17", "10450"), ("H18", "12690"),
    ])  # fmt: skip
    return main + history


class Device(threading.Thread):
    """Writes a BMV pair every ``period`` s until stopped; remembers what it sent."""

    def __init__(self, port: PtyDevice, period: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.port, self.period = port, period
        self.sent: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            self.port.write(bmv_pair(n))
            self.sent.append(n)
            n += 1
            self.stop.wait(self.period)


STARTED: list[AgentProcess] = []


@pytest.fixture(autouse=True)
def _kill_leftover_agents() -> Iterator[None]:
    yield
    while STARTED:
        proc = STARTED.pop().proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)


@dataclass
class AgentProcess:
    """A real `batmon agent vedirect` subprocess; its log goes to a file."""

    args: list[str]
    folder: Path
    proc: subprocess.Popen[str] | None = None
    log_path: Path = Path("/dev/null")
    output: list[str] = field(default_factory=list)

    def start(self) -> AgentProcess:
        STARTED.append(self)
        self.log_path = self.folder / f"agent-{time.monotonic_ns()}.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "batmon.cli", "agent", "vedirect", *self.args],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("reading VE.Direct from"), (line, self.log())
        self.output.append(line)
        return self

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> str:
        """SIGTERM; return what it printed on the way out (its final counts)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=20)
        assert self.proc.returncode == 0, self.log()
        return out


@pytest.fixture
def pty_device(tmp_path: Path) -> Iterator[PtyDevice]:
    device = PtyDevice(tmp_path)
    yield device
    device.close()


def add_batmon(serve: ServeProcess) -> tuple[int, str]:
    with httpx.Client(base_url=serve.http_url, timeout=10) as http:
        added = http.post("/interface/add/batmon", headers={"X-API-Key": serve.admin_key or ""},
                          data={"batmon_name": "House bank", "batmon_type": "BMV"}).json()  # fmt: skip
    return added["success"]["batmon_id"], added["success"]["batmon_token"]


def history(serve: ServeProcess, batmon_id: int) -> list[dict[str, Any]]:
    with httpx.Client(base_url=serve.http_url, timeout=10) as http:
        [h] = http.get("/interface/batmon/history", headers={"X-API-Key": serve.admin_key or ""},
                       params={"batmon_id": batmon_id, "min_epoch_tm_sec": 0}).json()["success"]  # fmt: skip
    return list(h["data"])


def agent_args(serve_mqtt_url: str, batmon_id: int, token: str, port: Path, data: Path,
               *extra: str) -> list[str]:  # fmt: skip
    return ["--port", str(port), "--batmon-id", str(batmon_id), "--token", token,
            "--mqtt-url", serve_mqtt_url, "--data-dir", str(data), *extra]  # fmt: skip


def epoch(update_time: str) -> int:
    return calendar.timegm(time.strptime(update_time, "%Y-%m-%dT%H:%M:%S"))


def test_frames_on_a_serial_port_become_readings_with_units_and_details(
    serve: ServeProcess, pty_device: PtyDevice, tmp_path: Path
) -> None:
    serve.start()
    batmon_id, token = add_batmon(serve)
    agent = AgentProcess(agent_args(serve.mqtt_url, batmon_id, token, pty_device.path,
                                    tmp_path / "agent", "--interval", "0.5"), tmp_path).start()  # fmt: skip
    device = Device(pty_device)
    try:
        device.start()
        rows = wait_until(lambda: len(history(serve, batmon_id)) >= 3 and history(serve, batmon_id),
                          timeout=20, what="readings in history")  # fmt: skip
    finally:
        device.stop.set()
        device.join()
    final = agent.stop()
    row = rows[-1]
    n = round(row["batmon_voltage"] * 1000) - 12000
    assert n in device.sent
    assert row["batmon_voltage"] == (12000 + n) / 1000  # mV -> V
    assert row["batmon_current"] == (-1000 - n) / 1000  # mA -> A
    assert row["batmon_power"] == -12 - n % 5  # W
    assert row["batmon_soc"] == 83.9  # per mille -> %
    details = json.loads(row["batmon_details"])
    assert details["time_to_go_min"] is None  # TTG -1: infinite
    assert details["alarm"] is True and details["alarm_reasons"] == ["low_soc"]
    assert details["consumed_ah"] == (-45000 - n) / 1000 and details["starter_v"] == 12.64
    assert details["charge_cycles"] == 87 and details["charged_kwh"] == 126.9  # 2nd block
    assert details["XYZ"] == "17" and details["product"] == "BMV-702"
    # Readings carry the block's time, not the arrival's.
    assert abs(epoch(row["update_time"]) - time.time()) < 60
    assert "bad checksum" in final and " 0 waiting" in final, final


def test_every_reading_of_a_broker_outage_lands_after_it_in_order_once(
    serve: ServeProcess, pty_device: PtyDevice, tmp_path: Path
) -> None:
    outage_s = float(os.environ.get("BATMON_TEST_OUTAGE_S", "30"))
    interval = 0.2  # ~150 readings of ~450 bytes in 30 s: the backlog needs several messages
    serve.start()
    batmon_id, token = add_batmon(serve)
    mqtt_port = serve.mqtt_url.rsplit(":", 1)[1]
    agent = AgentProcess(agent_args(serve.mqtt_url, batmon_id, token, pty_device.path,
                                    tmp_path / "agent", "--interval", str(interval)),
                         tmp_path).start()  # fmt: skip
    device = Device(pty_device, period=0.1)
    device.start()
    try:
        wait_until(lambda: len(history(serve, batmon_id)) >= 2, timeout=20, what="readings before")
        serve.stop()
        down_at = time.time()
        time.sleep(outage_s)  # frames keep flowing; the agent queues on disk
        up_at = time.time()
        serve.args = ["--mqtt-port", mqtt_port]  # the same broker address, as after a reboot
        serve.start()
        wait_until(lambda: agent.log().count("connected to the MQTT broker") >= 2, timeout=30,
                   what="the agent back on the broker")  # fmt: skip
        time.sleep(2)
    finally:
        device.stop.set()
        device.join()
    final = agent.stop()  # publishes what the last interval saw, then drains
    made = int(final.split("this run: ", 1)[1].split(" readings made")[0])
    try:
        rows = wait_until(lambda: (r := history(serve, batmon_id)) and len(r) >= made and r,
                          timeout=30, what=f"all {made} readings in history")  # fmt: skip
    except AssertionError:
        rows = history(serve, batmon_id)
        raise AssertionError(f"{len(rows)} of {made} readings landed; agent said {final};"
                             f" agent log: {agent.log()[-3000:]}") from None
    volts = [row["batmon_voltage"] for row in rows]
    assert len(rows) == made, final  # each exactly once
    assert volts == sorted(set(volts))  # in order of their ts, no duplicates
    times = [epoch(row["update_time"]) for row in rows]
    during = [t for t in times if down_at + 1 < t < up_at - 1]
    # The outage's readings kept the times they were made at, one per interval.
    assert len(during) >= (outage_s - 2) / 2, (len(during), final)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) <= 2, gaps  # no hole anywhere (whole-second update_time)
    assert " 0 waiting" in final and " 0 dropped" in final, final
    # The backlog (~150 readings of ~700 bytes) went as several messages under 64 KiB.
    assert agent.log().count("backlog: delivered") >= 2, agent.log()


def test_readings_queued_before_a_kill_9_land_after_a_restart_once_each(
    serve: ServeProcess, pty_device: PtyDevice, tmp_path: Path
) -> None:
    """The queue is on disk before anything is sent: a killed agent loses none of it."""
    serve.start()
    batmon_id, token = add_batmon(serve)
    mqtt_port = serve.mqtt_url.rsplit(":", 1)[1]
    serve.stop()  # the broker is away from the start
    args = agent_args(serve.mqtt_url, batmon_id, token, pty_device.path, tmp_path / "agent",
                      "--interval", "0.3")  # fmt: skip
    agent = AgentProcess(args, tmp_path).start()
    device = Device(pty_device)
    device.start()

    def queued() -> list[float]:
        queue = ReadingQueue.open(tmp_path / "agent", max_readings=1000)
        try:
            return [json.loads(p)["voltage"] for _, p in queue.oldest(1000, 10**9)]
        finally:
            queue.close()

    try:
        wait_until(lambda: len(queued()) >= 10, timeout=20, what="10 readings queued")
        assert agent.proc is not None
        agent.proc.kill()  # kill -9: no goodbye, no drain
        agent.proc.wait(5)
        survived = queued()
        serve.args = ["--mqtt-port", mqtt_port]
        serve.start()
        AgentProcess(args, tmp_path).start()
        rows = wait_until(lambda: (r := history(serve, batmon_id)) and len(r) > len(survived) and r,
                          timeout=30, what="the queued readings in history")  # fmt: skip
    finally:
        device.stop.set()
        device.join()
    volts = [row["batmon_voltage"] for row in rows]
    assert volts[: len(survived)] == survived  # first, in order, once each
    assert volts == sorted(set(volts))


def test_a_recording_replays_into_history(serve: ServeProcess, tmp_path: Path) -> None:
    serve.start()
    batmon_id, token = add_batmon(serve)
    agent = AgentProcess(["--replay", str(RECORDINGS / "mppt-75-15.vedirect"), "--replay-rate", "20",
                          "--batmon-id", str(batmon_id), "--token", token, "--mqtt-url", serve.mqtt_url,
                          "--data-dir", str(tmp_path / "agent"), "--interval", "0.5"],
                         tmp_path).start()  # fmt: skip
    rows = wait_until(lambda: len(history(serve, batmon_id)) >= 3 and history(serve, batmon_id),
                      timeout=20, what="replayed readings")  # fmt: skip
    agent.stop()
    details = json.loads(rows[0]["batmon_details"])
    assert details["charge_state"] == "bulk" and details["product"] == "SmartSolar MPPT 75/15"
    assert 13.4 <= rows[0]["batmon_voltage"] <= 13.6


def test_an_unplugged_cable_is_logged_and_the_port_is_retried(
    serve: ServeProcess, tmp_path: Path
) -> None:
    serve.start()
    batmon_id, token = add_batmon(serve)
    first = PtyDevice(tmp_path)
    agent = AgentProcess(agent_args(serve.mqtt_url, batmon_id, token, first.path, tmp_path / "agent",
                                    "--interval", "0.3"), tmp_path).start()  # fmt: skip
    first.write(bmv_pair(1))
    wait_until(lambda: history(serve, batmon_id), timeout=20, what="a first reading")
    first.close()  # the cable is pulled
    wait_until(lambda: "lost" in agent.log(), timeout=10, what="a log line about the lost port")
    assert "retrying every" in agent.log()
    second = PtyDevice(tmp_path)  # plugged in again: the same name, a new device node
    try:
        wait_until(lambda: "is back" in agent.log(), timeout=15, what="the port reopened")
        second.write(bmv_pair(2))
        wait_until(lambda: any(r["batmon_voltage"] == 12.002 for r in history(serve, batmon_id)),
                   timeout=20, what="a reading after the replug")  # fmt: skip
    finally:
        agent.stop()
        second.close()
    assert "Traceback" not in agent.log()


# -- clear errors, no tracebacks ------------------------------------------------------

def run_agent(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return batmon("agent", "vedirect", "--batmon-id", "5", "--token", "abcdefgh", *args)


def test_a_missing_port_is_one_line_and_exit_2(tmp_path: Path) -> None:
    r = run_agent("--port", str(tmp_path / "ttyUSB9"), "--data-dir", str(tmp_path))
    assert r.returncode == 2 and "no such serial device" in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr


def test_a_file_that_is_no_serial_port_is_one_line_and_exit_2(tmp_path: Path) -> None:
    plain = tmp_path / "notatty"
    plain.write_text("x")
    r = run_agent("--port", str(plain), "--data-dir", str(tmp_path))
    assert r.returncode == 2 and "not a serial port" in r.stderr and "Traceback" not in r.stderr


def test_a_port_without_permission_is_one_line_and_exit_2(pty_device: PtyDevice, tmp_path: Path) -> None:
    """As an unprivileged user (root may open anything), like a Pi user not in 'dialout'."""
    os.chmod(os.ttyname(pty_device.slave), 0o600)
    cmd = [sys.executable, "-m", "batmon.cli", "agent", "vedirect", "--port", str(pty_device.path),
           "--batmon-id", "5", "--token", "abcdefgh", "--data-dir", "/tmp"]  # fmt: skip
    if os.geteuid() == 0:
        os.chmod(tmp_path, 0o755)
        cmd = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *cmd]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "permission denied" in r.stderr and "dialout" in r.stderr and "Traceback" not in r.stderr


def test_a_device_that_speaks_no_vedirect_is_a_clear_error(pty_device: PtyDevice, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "batmon.cli", "agent", "vedirect", "--port", str(pty_device.path),
         "--batmon-id", "5", "--token", "abcdefgh", "--data-dir", str(tmp_path),
         "--mqtt-url", "mqtt://127.0.0.1:9", "--first-block-timeout", "2"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    for _ in range(30):  # a GPS or a modem: lines, but no checksummed blocks
        pty_device.write(b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47\r\n")
        time.sleep(0.1)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert "no valid VE.Direct block" in last and "within 2 s" in last
    assert "Traceback" not in err


@pytest.mark.parametrize("args,word", [
    (["--port", "/dev/x", "--replay", "f"], "exactly one of --port"),
    (["--port", "/dev/x", "--interval", "0"], "--interval"),
    (["--port", "/dev/x", "--mqtt-url", "http://x"], "--mqtt-url"),
    (["--port", "/dev/x", "--queue-max", "0"], "--queue-max"),
])  # fmt: skip
def test_bad_options_are_one_line_and_exit_2(args: list[str], word: str) -> None:
    r = run_agent(*args)
    assert r.returncode == 2 and word in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0


def test_options_come_from_environment_variables_and_flags_win(tmp_path: Path) -> None:
    r = batmon("agent", "vedirect", "--port", str(tmp_path / "none"), "--batmon-id", "5",
               env={"BATMON_TOKEN": "abcdefgh", "BATMON_INTERVAL": "x"})  # fmt: skip
    assert r.returncode == 2 and "--interval" in r.stderr
    r = batmon("agent", "vedirect", "--port", str(tmp_path / "none"), "--interval", "5",
               env={"BATMON_TOKEN": "abcdefgh", "BATMON_BATMON_ID": "5", "BATMON_INTERVAL": "x",
                    "BATMON_DATA_DIR": str(tmp_path)})  # fmt: skip
    assert r.returncode == 2 and "no such serial device" in r.stderr, r.stderr


def test_the_agent_says_what_its_counters_count_and_prints_refusals(
    serve: ServeProcess, tmp_path: Path,
) -> None:  # fmt: skip
    """Issue 18: the final line names this run's readings apart from the queue's lifetime, and a
    refusal the server reports on the device's error topic (MQTT 3.1.1 has no negative PUBACK)
    is logged by the agent."""
    import paho.mqtt.client as mqtt

    serve.start()
    batmon_id, token = add_batmon(serve)
    args = ["--replay", str(RECORDINGS / "mppt-75-15.vedirect"), "--replay-rate", "20",
            "--batmon-id", str(batmon_id), "--token", token, "--mqtt-url", serve.mqtt_url,
            "--data-dir", str(tmp_path / "agent"), "--interval", "0.5"]  # fmt: skip
    first = AgentProcess(args, tmp_path).start()
    wait_until(lambda: len(history(serve, batmon_id)) >= 2, timeout=20, what="first readings")
    host, port = serve.mqtt_url.removeprefix("mqtt://").rsplit(":", 1)
    device = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"second-{batmon_id}",
                         protocol=mqtt.MQTTv311)  # fmt: skip
    device.username_pw_set(str(batmon_id), token)
    device.connect(host, int(port))
    device.loop_start()
    device.publish(f"batmon/{batmon_id}/{token}/update", '{"soc": 150}', qos=1).wait_for_publish(10)
    device.disconnect()
    device.loop_stop()
    wait_until(lambda: "the server refused a message" in first.log(), timeout=10, what="the refusal logged")
    assert "soc" in first.log().split("the server refused a message", 1)[1].splitlines()[0]
    final_first = first.stop()
    made_first = int(re.search(r"this run: (\d+) readings made", final_first).group(1))  # type: ignore[union-attr]
    second = AgentProcess(args, tmp_path).start()
    wait_until(lambda: len(history(serve, batmon_id)) >= made_first + 2, timeout=20, what="more readings")
    final = second.stop()
    this_run = re.search(r"this run: (\d+) readings made, (\d+) delivered", final)
    assert this_run is not None, final
    made, delivered = map(int, this_run.groups())
    assert 0 < delivered <= made < made_first + made, final  # this run only, not the queue's lifetime
