"""The README, followed literally on a fresh clone (issue 18).

A newcomer copies the blocks in order: the install-and-serve command, then every `sh` block of the
walk-through in one shell. The only edits are the ones the README itself asks for: the api_key and
the ports `serve` printed (it runs on free ports here, since the machine's Mosquitto holds 1883).
Blocks for another machine are fenced `sh on-the-pi` and are not run. The test command (the second
set-up block) is not run either: it is what runs this test.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import httpx2 as httpx
import pytest

from tests.support import ROOT

pytestmark = pytest.mark.timeout(900)

FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.M | re.S)


def sh_blocks(readme: str) -> list[str]:
    """The blocks fenced exactly `sh`, in order (not `sh on-the-pi`, not yaml or plain)."""
    return [body for info, body in FENCE.findall(readme) if info.strip() == "sh"]


def fresh_clone(folder: Path) -> Path:
    """A clone of the committed tree: what a newcomer gets (uncommitted edits are not in it)."""
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(folder)], check=True,
                   timeout=120)  # fmt: skip
    return folder


def test_the_readme_commands_work_as_written_on_a_fresh_clone(tmp_path: Path) -> None:
    clone = fresh_clone(tmp_path / "batmon-bridge")
    readme = (clone / "README.md").read_text()
    blocks = sh_blocks(readme)
    install, test_command, *walk_through = blocks
    assert "batmon serve" in install and "pytest" in test_command
    assert walk_through, "no walk-through blocks found"

    # 1. Install and serve, exactly as written; the ports come from the environment, as the README
    #    says options may (BATMON_<NAME>), so the command text is unchanged.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATMON_", "VIRTUAL_ENV"))}
    env.update(BATMON_HTTP_PORT="0", BATMON_MQTT_PORT="0", PYTHONUNBUFFERED="1")
    log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen(["bash", "-c", install.strip()], cwd=clone, env=env, stdout=subprocess.PIPE,
                             stderr=log, text=True, start_new_session=True)  # fmt: skip
    try:
        printed: dict[str, str] = {}
        assert serve.stdout is not None
        deadline = time.monotonic() + 600  # pip install . under load
        while time.monotonic() < deadline:
            line = serve.stdout.readline()
            assert line, f"serve ended: {(tmp_path / 'serve.log').read_text()[-3000:]}"
            if m := re.match(r"HTTP\s+http://127\.0\.0\.1:(\d+)", line):
                printed["http"] = m.group(1)
            elif m := re.match(r"MQTT\s+mqtt://127\.0\.0\.1:(\d+)", line):
                printed["mqtt"] = m.group(1)
            elif m := re.search(r"api_key \(shown once\): (\S+)", line):
                printed["key"] = m.group(1)
            elif line.startswith("ready"):
                break
        assert printed.keys() == {"http", "mqtt", "key"}, printed

        # 2. The walk-through, in one shell, with what serve printed put where the README says.
        script = "\n".join(walk_through)
        script = (script.replace("<KEY>", printed["key"])
                  .replace("127.0.0.1:8080", f"127.0.0.1:{printed['http']}")
                  .replace("MQTT_PORT=1883", f"MQTT_PORT={printed['mqtt']}"))  # fmt: skip
        # A second shell: the newcomer's own environment, without serve's port variables.
        shell_env = {k: v for k, v in env.items() if not k.startswith("BATMON_")}
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=clone, env=shell_env, text=True,
                              capture_output=True, timeout=180)  # fmt: skip
        assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
        assert '"error"' not in done.stdout, done.stdout[-3000:]

        # 3. The reading sent over MQTT is in history (voltage 12.8, after the HTTP one at 12.9).
        added = re.search(r'"batmon_id":(\d+)', done.stdout)
        assert added is not None, done.stdout[:2000]
        with httpx.Client(base_url=f"http://127.0.0.1:{printed['http']}", timeout=10) as http:
            def voltages() -> list[float]:
                answer = http.get("/interface/batmon/history", headers={"X-API-Key": printed["key"]},
                                  params={"batmon_id": added.group(1), "min_epoch_tm_sec": 0})  # fmt: skip
                [h] = answer.json()["success"]
                return [row["batmon_voltage"] for row in h["data"]]

            deadline = time.monotonic() + 10
            while 12.8 not in (seen := voltages()) and time.monotonic() < deadline:
                time.sleep(0.2)
        assert 12.9 in seen and 12.8 in seen, seen
    finally:
        os.killpg(serve.pid, 15)
        serve.wait(timeout=30)
        log.close()
