"""The scale-out deployment files (issue 16), checked with the real tools:
- deploy/batmon@.service, the template for N workers: `systemd-analyze verify` has nothing to
  say about it or an instance, its hardening scores as the single-server unit's, and
  `Restart=always`;
- deploy/nginx-batmon.conf: `nginx -t` accepts it, its upstream names the workers' ports
  the template gives them, and a real nginx in front of two real `batmon serve` spreads
  requests over both and passes the dashboard's live stream on unbuffered.

systemd-analyze comes from Debian's `systemd` package and nginx from `nginx-light`; .ci/run
installs both. These tests fail, never skip, where either is missing. This container has no
systemd as PID 1, so the unit is checked offline, not run.
"""

from __future__ import annotations

import json
import os
import pwd
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest

from tests.conftest import ServeProcess
from tests.support import ROOT, batmon, free_port, wait_until
from tests.test_deploy import INSTALLED_BATMON, directives, systemd_analyze

DEPLOY = ROOT / "deploy"
TEMPLATE = DEPLOY / "batmon@.service"
NGINX_CONF = DEPLOY / "nginx-batmon.conf"
LIVE_DEADLINE_S = 1.0  # issue 16: a reading appears on a dashboard within 1 s


def tool(name: str, package: str) -> str:
    """The path of a required tool; a clear failure (never a skip) naming the package."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    assert found, f"{name} is missing: apt-get install -y {package} (.ci/run does)"
    return found


def template_here(tmp_path: Path) -> Path:
    """The template with ExecStart pointing at this checkout's batmon (verify checks that the
    program exists); every other line as shipped."""
    text = TEMPLATE.read_text()
    assert f"ExecStart={INSTALLED_BATMON} serve" in text
    here = Path(sys.executable).with_name("batmon")
    assert here.exists()
    folder = tmp_path / "units"
    folder.mkdir()
    copy = folder / TEMPLATE.name
    copy.write_text(text.replace(INSTALLED_BATMON, str(here)))
    return copy


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([systemd_analyze(), *args], capture_output=True, text=True, timeout=60)


def test_the_worker_template_and_an_instance_verify_clean(tmp_path: Path) -> None:
    template = template_here(tmp_path)
    # The instance is found through the template beside it, with %i filled in.
    for unit in (template, template.with_name("batmon@3.service")):
        result = analyze("verify", str(unit))
        assert result.returncode == 0, result.stderr
        assert result.stderr.strip() == "", result.stderr  # not even a warning


def test_the_worker_template_restarts_always_and_is_hardened(tmp_path: Path) -> None:
    found = directives(TEMPLATE.read_text())
    own_user = found.get("User") == ["batmon"] or found.get("DynamicUser") == ["yes"]
    assert own_user
    for key, value in {"Restart": "always", "ProtectSystem": "strict", "NoNewPrivileges": "yes",
                       "PrivateTmp": "yes", "StateDirectory": "batmon-worker-%i",
                       "StateDirectoryMode": "0700", "KillSignal": "SIGTERM"}.items():  # fmt: skip
        assert found.get(key) == [value], key
    # Every worker reads the shared options, then its own (optional) file.
    assert found["EnvironmentFile"] == ["/etc/batmon/workers.env", "-/etc/batmon/worker-%i.env"]
    instance = template_here(tmp_path).with_name("batmon@2.service")
    result = analyze("security", "--offline=true", str(instance))
    score = re.search(r"Overall exposure level for batmon@2.service: ([\d.]+)", result.stdout)
    assert score, result.stdout + result.stderr
    print(f"systemd-analyze security batmon@2.service: exposure {score.group(1)}")
    assert float(score.group(1)) <= 2.0, result.stdout


def test_the_nginx_upstream_names_the_ports_the_template_gives_workers_1_to_3() -> None:
    [port_line] = [v for v in directives(TEMPLATE.read_text())["Environment"]
                   if v.startswith("BATMON_HTTP_PORT=")]  # fmt: skip
    template_ports = {int(port_line.removeprefix("BATMON_HTTP_PORT=").replace("%i", str(n)))
                      for n in (1, 2, 3)}  # fmt: skip
    upstream = re.search(r"upstream batmon_workers \{(.*?)\}", NGINX_CONF.read_text(), re.S)
    assert upstream
    assert set(map(int, re.findall(r"server 127\.0\.0\.1:(\d+)", upstream.group(1)))) == template_ports


# -- nginx -----------------------------------------------------------------------------------


class Nginx:
    """A private nginx running the shipped file inside a wrapper of our own: only the listen
    port and the upstream servers are moved; everything else is as shipped."""

    def __init__(self, folder: Path, workers: list[str], *, ignore_accel_header: bool = True) -> None:
        self.binary = tool("nginx", "nginx-light")
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        text = NGINX_CONF.read_text()
        text, count = re.subn(r"^(\s*)listen 80;$", rf"\1listen 127.0.0.1:{self.port};", text, flags=re.M)
        assert count == 1, "deploy/nginx-batmon.conf: no single `listen 80;`"
        servers = "".join(f"    server {w} max_fails=3 fail_timeout=10s;\n" for w in workers)
        text, count = re.subn(r"(upstream batmon_workers \{\n)(?:\s*server [^\n]*\n)+", rf"\g<1>{servers}",
                              text)  # fmt: skip
        assert count == 1, "deploy/nginx-batmon.conf: no upstream batmon_workers with server lines"
        (folder / "nginx-batmon.conf").write_text(text)
        temp = "".join(f"    {kind}_temp_path {folder}/{kind};\n"
                       for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))  # fmt: skip
        # serve sends `X-Accel-Buffering: no` on /events itself; the stream is checked with
        # nginx ignoring that header, so with the shipped file's own settings only. And in a
        # site that compresses event streams: gzip holds the stream back (not even its headers
        # came within 10 s) unless /events turns buffering or gzip off (either one suffices on
        # nginx 1.22; the file does both).
        ignore = "    proxy_ignore_headers X-Accel-Buffering;\n" if ignore_accel_header else ""
        ignore += "    gzip on;\n    gzip_types text/event-stream;\n"
        user = f"user {pwd.getpwuid(os.getuid()).pw_name};\n" if os.getuid() == 0 else ""
        self.config = folder / "nginx.conf"
        self.config.write_text(
            f"{user}worker_processes 1;\npid {folder}/nginx.pid;\nerror_log {folder}/error.log;\n"
            "daemon off;\nevents { worker_connections 64; }\n"
            f"http {{\n    access_log {folder}/access.log;\n{temp}{ignore}"
            f"    include {folder}/nginx-batmon.conf;\n}}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self, *args: str) -> list[str]:
        return [self.binary, "-p", str(self.folder), "-e", str(self.folder / "error.log"),
                "-c", str(self.config), *args]  # fmt: skip

    def test(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command("-t"), capture_output=True, text=True, timeout=30)

    def start(self) -> Nginx:
        log = (self.folder / "nginx.out").open("ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log)
        wait_until(lambda: self._answers() or self.proc is None or self.proc.poll() is not None, 10,
                   "nginx listening")  # fmt: skip
        assert self.proc.poll() is None, (self.folder / "error.log").read_text()
        return self

    def _answers(self) -> bool:
        try:
            httpx.get(f"{self.url}/healthz", timeout=1)
        except httpx.HTTPError:
            return False
        return True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: workers finish, then exit
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def test_nginx_accepts_the_shipped_file(tmp_path: Path) -> None:
    result = Nginx(tmp_path / "nginx", ["127.0.0.1:8081", "127.0.0.1:8082"]).test()
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr
    assert "[warn]" not in result.stderr, result.stderr


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[list[ServeProcess]]:
    """Two real `batmon serve`, SQLite each, with the one session key workers share and the same
    users (a backup of the first), so a login on one is good on the other, as on one PostgreSQL
    database with deploy/batmon@.service. (A session cookie names its user and a fingerprint of
    the user's api_key: two folders with different admins would refuse each other's cookies.)"""
    first = ServeProcess(tmp_path / "worker-1" / "data")
    second = ServeProcess(tmp_path / "worker-2" / "data")
    try:
        first.start()
        second.data_dir.mkdir(parents=True, mode=0o700)
        copied = batmon("backup", str(second.data_dir / "batmon.sqlite3"), "--data-dir", str(first.data_dir))
        assert copied.returncode == 0, copied.stderr
        shutil.copy(first.data_dir / "session.key", second.data_dir / "session.key")
        second.start()
        second.admin_key = first.admin_key  # the same users: the second made no admin of its own
        yield [first, second]
    finally:
        for worker in (first, second):
            if worker.proc is not None:
                worker.stop()


@pytest.fixture
def proxy(tmp_path: Path, two_workers: list[ServeProcess]) -> Iterator[Nginx]:
    nginx = Nginx(tmp_path / "nginx", [w.http_url.removeprefix("http://") for w in two_workers])
    try:
        yield nginx.start()
    finally:
        nginx.stop()


class LiveStream:
    """GET /events through the proxy, read on a thread, each event put on a queue with the
    time it arrived."""

    def __init__(self, url: str, cookies: httpx.Cookies) -> None:
        self.events: queue.Queue[tuple[float, str, object]] = queue.Queue()
        self._client = httpx.Client(base_url=url, cookies=cookies, timeout=httpx.Timeout(10, read=None))
        self._response: httpx.Response | None = None
        opened = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(opened,), daemon=True)
        self._thread.start()
        assert opened.wait(10), "the stream did not open"
        assert self._response is not None and self._response.status_code == 200

    def _read(self, opened: threading.Event) -> None:
        with self._client.stream("GET", "/events") as response:
            self._response = response
            opened.set()
            event = ""
            try:
                for line in response.iter_lines():
                    if line.startswith("event: "):
                        event = line.removeprefix("event: ")
                    elif line.startswith("data: ") and event:
                        self.events.put((time.monotonic(), event, json.loads(line.removeprefix("data: "))))
            except httpx.HTTPError:
                return  # closed under us

    def next(self, event: str, timeout: float, **fields: object) -> tuple[float, object]:
        """The next `event` whose data has these fields (others are passed over)."""
        deadline = time.monotonic() + timeout
        while True:
            at, name, data = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            if name == event and all(isinstance(data, dict) and data.get(k) == v for k, v in fields.items()):
                return at, data

    def close(self) -> None:
        self._client.close()


@pytest.mark.timeout(180)
def test_nginx_spreads_requests_over_two_workers_and_streams_events_unbuffered(
    proxy: Nginx, two_workers: list[ServeProcess]
) -> None:
    # /healthz names each worker's own (embedded) broker port: both answer through nginx.
    seen = {httpx.get(f"{proxy.url}/healthz", timeout=10).json()["mqtt_port"] for _ in range(6)}
    assert seen == {int(w.mqtt_url.rsplit(":", 1)[1]) for w in two_workers}
    # A login on worker 1 (its admin is user 1, as worker 2's) is good on either worker.
    first = httpx.Client(base_url=two_workers[0].http_url, timeout=10)
    assert first.post("/interface/login", json={"api_key": two_workers[0].admin_key}).status_code == 200
    batmons = []
    for worker in two_workers:
        http = httpx.Client(base_url=worker.http_url, headers={"X-API-Key": worker.admin_key or ""},
                            timeout=10)  # fmt: skip
        added = http.post("/interface/add/batmon", json={"batmon_name": "House bank"}).json()["success"]
        batmons.append((http, added["batmon_id"]))
    stream = LiveStream(proxy.url, first.cookies)
    try:
        stream.next("snapshot", 10)
        # Whichever worker holds the stream, a reading on each reaches it.
        for voltage in (12.5, 12.6, 12.7):
            sent = time.monotonic()
            for http, batmon_id in batmons:
                r = http.post("/interface/update/batmon", json={"batmon_id": batmon_id, "voltage": voltage})
                assert r.status_code == 200, r.text
            at, _ = stream.next("batmon", 10, batmon_voltage=voltage)
            print(f"live event through nginx {at - sent:.3f} s after the updates were sent")
            assert at - sent <= LIVE_DEADLINE_S
    finally:
        stream.close()
        first.close()
        for http, _ in batmons:
            http.close()


# -- serve as the unit runs it -----------------------------------------------------------------


@pytest.mark.timeout(120)
def test_serve_runs_from_the_units_environment_alone_and_keeps_the_shared_key(tmp_path: Path) -> None:
    """No flags: the template's Environment= lines for instance 1, the shared options file as
    docs/SCALE-OUT.md writes it (broker, host), and a worker-1.env moving the port to a free
    one. The key the unit copies in before the start is the one serve keeps."""
    from tests.support import PrivateMosquitto

    (tmp_path / "broker").mkdir()
    broker = PrivateMosquitto(tmp_path / "broker").start()
    unit_env = dict(
        value.replace("%i", "1").split("=", 1) for value in directives(TEMPLATE.read_text())["Environment"]
    )
    data_dir = tmp_path / "var-lib" / "batmon-worker-1"
    unit_env["BATMON_DATA_DIR"] = str(data_dir)  # %S/batmon-worker-1, moved into tmp_path
    assert unit_env["BATMON_HTTP_PORT"] == "8081"
    # The unit makes every instance a member of one share group under an id of its own.
    assert (unit_env["BATMON_MQTT_SHARE_GROUP"], unit_env["BATMON_MQTT_CLIENT_ID"]) == (
        "batmon", "batmon-worker-1")
    port = free_port()
    shared = {"BATMON_MQTT_URL": f"mqtt://127.0.0.1:{broker.port}", "BATMON_HOST": "127.0.0.1"}
    own = {"BATMON_HTTP_PORT": str(port)}  # worker-1.env overrides the unit's 8081
    data_dir.mkdir(parents=True, mode=0o700)
    key = os.urandom(32)
    (data_dir / "session.key").write_bytes(key)  # what ExecStartPre installs
    (data_dir / "session.key").chmod(0o600)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BATMON_")}
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("batmon")), "serve"], cwd=tmp_path,
                            env={**environ, **unit_env, **shared, **own}, stdout=subprocess.PIPE,
                            stderr=log, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("ready"):
                break
        else:
            raise AssertionError((tmp_path / "serve.log").read_text())
        health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).json()
        assert health["status"] == "ok"
        assert (health["mqtt"], health["mqtt_port"]) == ("connected", broker.port)
        assert (data_dir / "session.key").read_bytes() == key
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
        broker.stop()
