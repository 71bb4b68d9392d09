"""Bad start-up situations of `batmon serve`: one line that says what to do, exit 1."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.support import batmon, free_port


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    [line] = stderr.strip().splitlines()
    return line


def test_a_taken_mqtt_port_suggests_another_port_or_the_broker_already_there(tmp_path: Path) -> None:
    with socket.socket() as busy:  # what a Mosquitto on 1883 looks like to us
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = batmon("serve", "--data-dir", str(tmp_path), "--http-port", "0", "--mqtt-port", str(port))
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert f"127.0.0.1:{port}" in line and "in use" in line
    assert "--mqtt-port" in line and f"--mqtt-url mqtt://127.0.0.1:{port}" in line


def test_a_taken_http_port_names_the_option_to_change(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = batmon("serve", "--data-dir", str(tmp_path), "--http-port", str(port), "--mqtt-port", "0")
    assert r.returncode == 1
    assert "--http-port" in one_line(r.stderr)


def test_an_unreachable_broker_says_so_clearly(tmp_path: Path) -> None:
    nothing_there = free_port()
    r = batmon("serve", "--data-dir", str(tmp_path), "--http-port", "0",
               "--mqtt-url", f"mqtt://127.0.0.1:{nothing_there}")  # fmt: skip
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert f"127.0.0.1:{nothing_there}" in line
    assert "no MQTT broker answered" in line and "--mqtt-url" in line
