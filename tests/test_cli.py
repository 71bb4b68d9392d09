"""The `batmon` command as a user runs it: real processes, real sockets, real files."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import httpx2 as httpx
import pytest

from tests.conftest import ServeProcess
from tests.support import batmon


def test_user_add_prints_the_api_key_alone_and_list_shows_users(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    added = batmon("user", "add", "Ann@Example.org", "--data-dir", data)
    assert added.returncode == 0, added.stderr
    lines = added.stdout.splitlines()
    assert len(lines) == 1 and len(lines[0]) >= 40 and " " not in lines[0]
    batmon("user", "add", "bob@example.org", "--data-dir", data)
    listed = batmon("user", "list", "--data-dir", data)
    assert listed.stdout.splitlines() == ["ann@example.org", "bob@example.org"]


def test_user_add_twice_is_one_clear_line_and_exit_1(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    batmon("user", "add", "ann@example.org", "--data-dir", data)
    again = batmon("user", "add", "ann@example.org", "--data-dir", data)
    assert again.returncode == 1
    assert again.stderr.strip().count("\n") == 0 and "exists" in again.stderr
    assert "Traceback" not in again.stderr


def test_user_add_bad_email_is_usage_error(tmp_path: Path) -> None:
    bad = batmon("user", "add", "not-an-email", "--data-dir", str(tmp_path))
    assert bad.returncode == 2 and "email" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("args,word", [
    (["--http-port", "abc"], "--http-port"),
    (["--http-port", "70000"], "--http-port"),
    (["--base-topic", "a/#"], "--base-topic"),
    (["--mqtt-url", "http://x"], "--mqtt-url"),
    (["--frobnicate"], "unrecognized"),
    (["--mqtt-url", "mqtt://127.0.0.1:1", "--mqtt-share-group", "a/#"], "--mqtt-share-group"),
    (["--mqtt-url", "mqtt://127.0.0.1:1", "--mqtt-client-id", "a b"], "--mqtt-client-id"),
    (["--mqtt-share-group", "batmon"], "--mqtt-url"),
])  # fmt: skip
def test_serve_bad_option_is_one_line_and_exit_2(tmp_path: Path, args: list[str], word: str) -> None:
    r = batmon("serve", "--data-dir", str(tmp_path), *args)
    assert r.returncode == 2, r.stderr
    assert word in r.stderr and r.stderr.strip().count("\n") == 0
    assert "Traceback" not in r.stderr


def test_environment_variable_is_validated_and_flag_wins(tmp_path: Path) -> None:
    r = batmon("serve", "--data-dir", str(tmp_path), env={"BATMON_HTTP_PORT": "nope"})
    assert r.returncode == 2 and "--http-port" in r.stderr
    process = ServeProcess(tmp_path / "data", env={"BATMON_HTTP_PORT": "nope"}).start()
    try:
        assert process.http_url.startswith("http://127.0.0.1:")  # the flag's 0 won
    finally:
        process.stop()


def test_serve_on_a_busy_port_is_one_line_and_exit_1(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = batmon("serve", "--data-dir", str(tmp_path), "--http-port", str(port),
                   "--mqtt-port", "0")  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert str(port) in r.stderr and r.stderr.strip().count("\n") == 0
    assert "Traceback" not in r.stderr


def test_first_start_creates_admin_once_and_data_survives_restarts(serve: ServeProcess) -> None:
    serve.start()
    assert serve.admin_key, serve.output
    auth = {"X-API-Key": serve.admin_key}
    with httpx.Client(base_url=serve.http_url, timeout=10) as c:
        added = c.post("/interface/add/batmon", headers=auth, data={"batmon_name": "kept"})
        batmon_id = added.json()["success"]["batmon_id"]
        token = added.json()["success"]["batmon_token"]
        for soc in (40, 41):
            c.post("/interface/update/batmon",
                   json={"batmon_id": batmon_id, "batmon_token": token, "soc": soc})
    assert serve.stop() == 0

    # Restart after a clean stop: no new admin, same data.
    again = ServeProcess(serve.data_dir).start()
    assert again.admin_key is None
    with httpx.Client(base_url=again.http_url, timeout=10) as c:
        status = c.get("/interface/batmon/status", headers=auth,
                       params={"batmon_id": batmon_id}).json()["success"]
        assert status["batmon_soc"] == 41.0 and status["batmon_name"] == "kept"
        c.post("/interface/update/batmon",
               json={"batmon_id": batmon_id, "batmon_token": token, "soc": 42})
    again.stop(signal.SIGKILL)  # a reading acknowledged before a kill is kept

    third = ServeProcess(serve.data_dir).start()
    try:
        with httpx.Client(base_url=third.http_url, timeout=10) as c:
            [h] = c.get("/interface/batmon/history", headers=auth,
                        params={"batmon_id": batmon_id, "min_epoch_tm_sec": 0}).json()["success"]
            assert [row["batmon_soc"] for row in h["data"]] == [40.0, 41.0, 42.0]
    finally:
        third.stop()


def test_user_added_while_serving_can_call_the_api_at_once(serve: ServeProcess) -> None:
    serve.start()
    key = batmon("user", "add", "late@example.org", "--data-dir", str(serve.data_dir)).stdout.strip()
    with httpx.Client(base_url=serve.http_url, timeout=10) as c:
        r = c.get("/interface/batmon/count", headers={"X-API-Key": key})
        assert r.json() == {"success": {"batmons": 0}}


def test_serve_outside_the_repo_uses_the_shipped_broker_config(tmp_path: Path) -> None:
    assert not (tmp_path / "broker.yaml").exists()
    process = ServeProcess(tmp_path / "data", cwd=tmp_path).start()
    try:
        assert process.mqtt_url.startswith("mqtt://127.0.0.1:")
    finally:
        assert process.stop() == 0


def test_missing_broker_config_given_explicitly_is_one_line_and_exit_1(tmp_path: Path) -> None:
    r = batmon("serve", "--data-dir", str(tmp_path), "--http-port", "0", "--mqtt-port", "0",
               "--broker-config", str(tmp_path / "nope.yaml"))  # fmt: skip
    assert r.returncode == 1 and "nope.yaml" in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr


def test_user_notify_sets_masked_targets_and_refuses_bad_urls(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    batmon("user", "add", "ann@example.org", "--data-dir", data)
    ok = batmon("user", "notify", "ann@example.org", "--data-dir", data,
                "--email", "json://ann:hunter22@127.0.0.1:9/", "--sms", "")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "email_url: json://" in ok.stdout and "hunter22" not in ok.stdout
    assert "sms_url: -" in ok.stdout
    bad = batmon("user", "notify", "ann@example.org", "--data-dir", data,
                 "--whatsapp", "nosuch://x")  # fmt: skip
    assert bad.returncode == 2 and "whatsapp_url" in bad.stderr
    assert bad.stderr.strip().count("\n") == 0
    unknown = batmon("user", "notify", "zed@example.org", "--data-dir", data, "--email", "")
    assert unknown.returncode == 1 and "zed@example.org" in unknown.stderr
    again = batmon("user", "notify", "ann@example.org", "--data-dir", data)
    assert "email_url: json://" in again.stdout  # a target not given keeps its value


def test_a_failed_first_start_does_not_swallow_the_admin_key(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = batmon("serve", "--data-dir", str(data), "--http-port", "0",
                   "--mqtt-port", str(busy.getsockname()[1]))  # fmt: skip
    assert r.returncode == 1 and "api_key" not in r.stdout
    assert batmon("user", "list", "--data-dir", str(data)).stdout == ""
    process = ServeProcess(data).start()
    try:
        assert process.admin_key, process.output
    finally:
        process.stop()


# -- one data folder: commands that read data never make one (issue 18) ----------------------
@pytest.mark.parametrize("command", [["user", "list"], ["user", "notify", "a@example.org", "--email",
                                                         "json://127.0.0.1:9/x"]])  # fmt: skip
def test_a_command_reading_data_refuses_a_missing_folder_and_creates_nothing(
    tmp_path: Path, command: list[str],
) -> None:  # fmt: skip
    missing = tmp_path / "nonexistent"
    done = batmon(*command, "--data-dir", str(missing))
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert str(missing.resolve()) in done.stderr and "batmon user add" in done.stderr
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    assert not missing.exists()


def test_user_add_creates_the_folder_and_says_where_on_stderr(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "data"
    added = batmon("user", "add", "ann@example.org", "--data-dir", str(folder))
    assert added.returncode == 0, added.stderr
    assert len(added.stdout.split()) == 1  # stdout stays the key alone, for KEY=$(batmon user add ...)
    assert f"created data folder {folder.resolve()}" in added.stderr
    again = batmon("user", "add", "bob@example.org", "--data-dir", str(folder))
    assert "created data folder" not in again.stderr


def test_serve_prints_the_absolute_data_path(serve: ServeProcess) -> None:
    serve.start()
    assert any(line.startswith(f"data  {serve.data_dir.resolve()}") for line in serve.output), serve.output
