"""TLS on the embedded broker and on HTTP (issue 19, acceptance 1 and 5; SPEC 8).

A real `batmon serve` with certificates the test makes itself (openssl CLI) in tmp_path;
Mosquitto's own clients (`mosquitto_pub`) and curl as the devices and users.
"""

from __future__ import annotations

import re
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx2 as httpx
import pytest

from tests.conftest import ServeProcess
from tests.load import WAIT_S
from tests.support import PrivateMosquitto, batmon, free_port, wait_until
from tests.test_agent_vedirect import RECORDINGS, AgentProcess, history

pytestmark = pytest.mark.timeout(180)


@dataclass(frozen=True)
class Pki:
    """A CA, a server certificate for 127.0.0.1/localhost, and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_key: Path  # a key that belongs to no certificate here


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=batmon test CA", cwd=folder)  # fmt: skip
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"),
                      ("client", "extendedKeyUsage=clientAuth\n")):  # fmt: skip
        (folder / f"{name}.ext").write_text(ext)
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
                cwd=folder)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
                cwd=folder)  # fmt: skip
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out", "other.key",
            cwd=folder)  # fmt: skip
    return Pki(folder / "ca.pem", folder / "server.pem", folder / "server.key", folder / "client.pem",
               folder / "client.key", folder / "other.key")  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_port(serve: ServeProcess) -> int:
    [port] = [int(m.group(1)) for line in serve.output if (m := re.match(r"MQTTS\s+mqtts://\S+:(\d+)", line))]
    return port


def plain_port(serve: ServeProcess) -> int:
    return int(serve.mqtt_url.rsplit(":", 1)[1])


def trusting(ca: Path | None) -> ssl.SSLContext | bool:
    return ssl.create_default_context(cafile=ca) if ca else True


def add_batmon(serve: ServeProcess, ca: Path | None = None) -> tuple[int, str]:
    with httpx.Client(base_url=serve.http_url, timeout=30, verify=trusting(ca)) as http:
        r = http.post("/interface/add/batmon", headers={"X-API-Key": serve.admin_key or ""},
                      json={"batmon_name": "tls", "update_period": 3600})  # fmt: skip
        assert r.status_code == 200, r.text
        added = r.json()["success"]
        return added["batmon_id"], added["batmon_token"]


def voltage(serve: ServeProcess, batmon_id: int, ca: Path | None = None) -> float:
    with httpx.Client(base_url=serve.http_url, timeout=30, verify=trusting(ca)) as http:
        r = http.get("/interface/batmon/status", headers={"X-API-Key": serve.admin_key or ""},
                     params={"batmon_id": batmon_id})  # fmt: skip
        return float(r.json()["success"]["batmon_voltage"])


def mosquitto_pub(port: int, batmon_id: int, token: str, value: float, *tls: str, base: str = "batmon",
                  ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """One QoS 1 reading, as a device using Mosquitto's client would send it."""
    return subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-V", "mqttv311", "-q", "1",
                           "-i", f"dev-{batmon_id}-{value}", "-u", str(batmon_id), "-P", token,
                           "-t", f"{base}/{batmon_id}/{token}/update", "-m", f'{{"voltage": {value}}}',
                           *tls], capture_output=True, text=True, timeout=30)  # fmt: skip


def lands(serve: ServeProcess, batmon_id: int, value: float) -> None:
    wait_until(lambda: voltage(serve, batmon_id) == value, 10, f"voltage {value} in status")


def stays_unlanded(serve: ServeProcess, batmon_id: int, value: float) -> None:
    assert voltage(serve, batmon_id) != value


# -- acceptance 1 ----------------------------------------------------------------------

def test_a_reading_over_tls_lands_beside_the_plain_listener_and_plain_text_to_the_tls_port_is_refused(
    tmp_path: Path, pki: Pki,
) -> None:
    # Given as BATMON_<NAME> variables, as an installation's /etc/batmon/env would.
    serve = ServeProcess(tmp_path / "data", env={
        "BATMON_MQTT_TLS_PORT": "0", "BATMON_TLS_CERT": str(pki.server_cert),
        "BATMON_TLS_KEY": str(pki.server_key)}).start(timeout=WAIT_S)  # fmt: skip
    try:
        batmon_id, token = add_batmon(serve)
        sent = mosquitto_pub(tls_port(serve), batmon_id, token, 12.5, "--cafile", str(pki.ca))
        assert sent.returncode == 0, sent.stderr
        lands(serve, batmon_id, 12.5)
        # The plain listener still works, side by side.
        assert mosquitto_pub(plain_port(serve), batmon_id, token, 12.25).returncode == 0
        lands(serve, batmon_id, 12.25)
        # Plain text to the TLS port: no session, nothing lands.
        refused = mosquitto_pub(tls_port(serve), batmon_id, token, 11.0)
        assert refused.returncode != 0
        # Same auth on the TLS listener: a wrong token is refused there too.
        wrong = mosquitto_pub(tls_port(serve), batmon_id, "not-the-token", 10.0, "--cafile", str(pki.ca))
        assert wrong.returncode != 0
        stays_unlanded(serve, batmon_id, 11.0)
        stays_unlanded(serve, batmon_id, 10.0)
    finally:
        serve.stop()


def test_with_a_client_ca_a_device_without_a_certificate_is_refused_and_one_with_it_lands(
    tmp_path: Path, pki: Pki,
) -> None:
    serve = ServeProcess(tmp_path / "data", args=[
        "--mqtt-tls-port", "0", "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
        "--tls-client-ca", str(pki.ca)]).start(timeout=WAIT_S)  # fmt: skip
    try:
        batmon_id, token = add_batmon(serve)
        without = mosquitto_pub(tls_port(serve), batmon_id, token, 13.0, "--cafile", str(pki.ca))
        assert without.returncode != 0
        stays_unlanded(serve, batmon_id, 13.0)
        with_cert = mosquitto_pub(tls_port(serve), batmon_id, token, 13.5, "--cafile", str(pki.ca),
                                  "--cert", str(pki.client_cert), "--key", str(pki.client_key))  # fmt: skip
        assert with_cert.returncode == 0, with_cert.stderr
        lands(serve, batmon_id, 13.5)
    finally:
        serve.stop()


def test_tls_alone_from_broker_yaml_with_no_plain_listener_for_devices(tmp_path: Path, pki: Pki) -> None:
    config = tmp_path / "broker.yaml"
    shipped = (Path(__file__).parent.parent / "bridge" / "broker.yaml").read_text()
    config.write_text(shipped + f"\ntls:\n  port: 0\n  cert: {pki.server_cert}\n  key: {pki.server_key}\n")
    args = ["--host", "127.0.0.2", "--mqtt-port", "off", "--broker-config", str(config)]
    serve = ServeProcess(tmp_path / "data", args=args).start(timeout=WAIT_S)
    try:
        assert "127.0.0.1" in serve.mqtt_url  # the bridge's own, loopback only
        [line] = [x for x in serve.output if x.startswith("MQTTS")]
        assert "127.0.0.2" in line
        batmon_id, token = add_batmon(serve)
        sent = subprocess.run(["mosquitto_pub", "-h", "127.0.0.2", "-p", str(tls_port(serve)),
                               "-V", "mqttv311", "-q", "1", "-u", str(batmon_id), "-P", token,
                               "--cafile", str(pki.ca),
                               "--insecure",  # the certificate names 127.0.0.1, not .2
                               "-t", f"batmon/{batmon_id}/{token}/update", "-m", '{"voltage": 14.5}'],
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        lands(serve, batmon_id, 14.5)
        # Nothing plain where devices reach the server.
        plain = subprocess.run(["mosquitto_pub", "-h", "127.0.0.2", "-p", str(plain_port(serve)), "-V",
                                "mqttv311", "-u", str(batmon_id), "-P", token, "-t", "x", "-m", "1"],
                               capture_output=True, text=True, timeout=30)  # fmt: skip
        assert plain.returncode != 0
    finally:
        serve.stop()


@pytest.mark.parametrize("problem", ["missing cert", "mismatched key", "not PEM"])
def test_an_unusable_certificate_or_key_fails_at_start_with_one_clear_line(
    tmp_path: Path, pki: Pki, problem: str,
) -> None:
    cert, key = pki.server_cert, pki.server_key
    if problem == "missing cert":
        cert, expect = tmp_path / "nowhere.pem", f"cannot read TLS file {tmp_path / 'nowhere.pem'}"
    elif problem == "mismatched key":
        key, expect = pki.other_key, f"TLS key {pki.other_key} does not match certificate {cert}"
    else:
        cert = tmp_path / "garbage.pem"
        cert.write_text("not a certificate\n")
        expect = f"TLS certificate {cert} or key {key} is not usable"
    for flags in (["--mqtt-tls-port", "0", "--tls-cert", str(cert), "--tls-key", str(key)],
                  ["--http-tls-cert", str(cert), "--http-tls-key", str(key)]):  # fmt: skip
        result = batmon("serve", "--data-dir", str(tmp_path / "data"), "--http-port", "0", "--mqtt-port", "0",
                        *flags)  # fmt: skip
        assert result.returncode == 1, result.stdout
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("batmon serve: ") and expect in lines[0], result.stderr


def test_tls_options_that_do_not_go_together_are_usage_errors(tmp_path: Path, pki: Pki) -> None:
    for flags, expect in ((["--tls-cert", str(pki.server_cert)], "--tls-cert and --tls-key go together"),
                          (["--http-tls-key", str(pki.server_key)], "--http-tls-cert and --http-tls-key"),
                          (["--mqtt-url", "mqtt://127.0.0.1:1", "--mqtt-tls-port", "8883"],
                           "embedded broker"),
                          (["--mqtt-tls-port", "0"], "tls.cert")):  # fmt: skip
        result = batmon("serve", "--data-dir", str(tmp_path / "data"), "--http-port", "0", "--mqtt-port", "0",
                        *flags)  # fmt: skip
        assert result.returncode in (1, 2) and expect in result.stderr, (flags, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# -- acceptance 5: HTTPS ----------------------------------------------------------------

def test_https_with_a_self_signed_certificate_answers_curl_with_cacert(tmp_path: Path, pki: Pki) -> None:
    args = ["--http-tls-cert", str(pki.server_cert), "--http-tls-key", str(pki.server_key)]
    serve = ServeProcess(tmp_path / "data", args=args).start(timeout=WAIT_S)
    try:
        assert serve.http_url.startswith("https://127.0.0.1:")
        ok = subprocess.run(["curl", "-sS", "--cacert", str(pki.ca), f"{serve.http_url}/healthz"],
                            capture_output=True, text=True, timeout=30)  # fmt: skip
        assert ok.returncode == 0 and '"status":"ok"' in ok.stdout.replace(" ", ""), ok.stderr
        untrusted = subprocess.run(["curl", "-sS", f"{serve.http_url}/healthz"],
                                   capture_output=True, text=True, timeout=30)  # fmt: skip
        assert untrusted.returncode != 0  # the self-signed CA is not in the system's store
        plain = subprocess.run(["curl", "-sS", serve.http_url.replace("https", "http") + "/healthz"],
                               capture_output=True, text=True, timeout=30)  # fmt: skip
        assert '"status"' not in plain.stdout
        batmon_id, _ = add_batmon(serve, ca=pki.ca)  # the API over HTTPS, as a client would use it
        assert voltage(serve, batmon_id, ca=pki.ca) == 0.0
    finally:
        serve.stop()


# -- acceptance 2: an external broker over TLS ------------------------------------------

def tls_mosquitto(folder: Path, pki: Pki) -> tuple[PrivateMosquitto, int]:
    """A private Mosquitto with a TLS listener (its own certificate) beside its plain one."""
    folder.mkdir(parents=True, exist_ok=True)
    broker = PrivateMosquitto(folder)
    port = free_port()
    broker.config.write_text(broker.config.read_text() + (
        f"listener {port} 127.0.0.1\ncafile {pki.ca}\n"
        f"certfile {pki.server_cert}\nkeyfile {pki.server_key}\n"))
    return broker.start(), port


def test_the_bridge_ingests_over_mqtts_and_the_agent_publishes_over_mqtts(tmp_path: Path, pki: Pki) -> None:
    broker, port = tls_mosquitto(tmp_path / "mosquitto", pki)
    url = f"mqtts://127.0.0.1:{port}"
    args = ["--mqtt-url", url, "--base-topic", "fleet", "--no-discovery"]
    serve = ServeProcess(tmp_path / "data", args=args, env={"BATMON_MQTT_CA": str(pki.ca)})
    agent: AgentProcess | None = None
    try:
        serve.start(timeout=WAIT_S)
        assert serve.mqtt_url == f"mqtts://127.0.0.1:{port}"
        batmon_id, token = add_batmon(serve)
        sent = mosquitto_pub(port, batmon_id, token, 12.75, "--cafile", str(pki.ca), base="fleet")
        assert sent.returncode == 0, sent.stderr
        lands(serve, batmon_id, 12.75)

        agent = AgentProcess(["--replay", str(RECORDINGS / "mppt-75-15.vedirect"), "--replay-rate", "20",
                              "--batmon-id", str(batmon_id), "--token", token, "--mqtt-url", url,
                              "--mqtt-ca", str(pki.ca), "--base-topic", "fleet",
                              "--data-dir", str(tmp_path / "agent"), "--interval", "0.5"],
                             tmp_path).start()  # fmt: skip
        assert "-> mqtts://127.0.0.1" in agent.output[0]
        rows = wait_until(lambda: [r for r in history(serve, batmon_id) if r["batmon_voltage"] != 12.75],
                          timeout=30, what="the agent's readings over mqtts")  # fmt: skip
        assert 13.4 <= rows[0]["batmon_voltage"] <= 13.6
        agent.stop()
        agent = None
    finally:
        if agent is not None and agent.proc is not None:
            agent.proc.kill()
        serve.stop()
        broker.stop()


def test_an_mqtts_broker_whose_certificate_is_not_trusted_is_refused_at_start(
    tmp_path: Path, pki: Pki,
) -> None:
    broker, port = tls_mosquitto(tmp_path / "mosquitto", pki)
    try:
        # No --mqtt-ca: the system's CAs do not know the test CA, so the connection must fail.
        result = batmon("serve", "--data-dir", str(tmp_path / "data"), "--http-port", "0",
                        "--mqtt-url", f"mqtts://127.0.0.1:{port}")  # fmt: skip
        assert result.returncode == 1
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        missing = batmon("serve", "--data-dir", str(tmp_path / "data"), "--http-port", "0",
                         "--mqtt-url", f"mqtts://127.0.0.1:{port}",
                         "--mqtt-ca", str(tmp_path / "none.pem"))  # fmt: skip
        assert missing.returncode == 1 and "cannot read TLS file" in missing.stderr, missing.stderr
        plain = batmon("serve", "--data-dir", str(tmp_path / "data"), "--http-port", "0",
                       "--mqtt-url", f"mqtt://127.0.0.1:{port}", "--mqtt-ca", str(pki.ca))  # fmt: skip
        assert plain.returncode == 2 and "need an mqtts:// --mqtt-url" in plain.stderr, plain.stderr
    finally:
        broker.stop()


def test_simulate_publishes_over_mqtts(tmp_path: Path, pki: Pki) -> None:
    broker, port = tls_mosquitto(tmp_path / "mosquitto", pki)
    url = f"mqtts://127.0.0.1:{port}"
    serve = ServeProcess(tmp_path / "data", args=["--mqtt-url", url, "--mqtt-ca", str(pki.ca),
                                                  "--no-discovery"])  # fmt: skip
    try:
        serve.start(timeout=WAIT_S)
        batmon_id, token = add_batmon(serve)
        result = batmon("simulate", "--mqtt-url", url, "--mqtt-ca", str(pki.ca), "--device",
                        f"{batmon_id}:{token}", "--interval", "0.2", "--readings", "2")  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert f"on mqtts://127.0.0.1:{port}" in result.stdout
        wait_until(lambda: voltage(serve, batmon_id) > 0, 10, "a simulated reading")
    finally:
        serve.stop()
        broker.stop()
