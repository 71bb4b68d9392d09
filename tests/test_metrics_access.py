"""Who may read /metrics: nobody (off), loopback clients (local, the default), or a
scraper holding the bearer token (token). Real sockets where the address matters.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from bridge.core import Core
from bridge.events import EventBus
from bridge.extensions.metrics import Metrics
from bridge.store.db import Store
from http_api.app import create_app
from http_api.metrics_access import MetricsExposure
from tests.conftest import ServeProcess
from tests.support import batmon

TOKEN = "scrape-me-0123456789abcdef"


@pytest.fixture
def metrics(tmp_path: Path) -> Iterator[Metrics]:
    """Started (it counts refusals from the bus) on a loop of its own."""
    store = Store.open(tmp_path / "batmon.sqlite3")
    loop = asyncio.new_event_loop()
    metrics = Metrics(Core(store, EventBus()).load())
    loop.run_until_complete(metrics.start())
    yield metrics
    loop.run_until_complete(metrics.stop())
    loop.close()
    store.close()


def app_client(metrics: Metrics, access: str, client: tuple[str, int], token: str | None = None,
               ) -> TestClient:  # fmt: skip
    exposure = MetricsExposure(render=metrics.render, access=access, token=token)  # type: ignore[arg-type]
    app = create_app(metrics.core, session_secret=b"s" * 32, metrics=exposure)
    return TestClient(app, client=client)


# -- local: loopback only ----------------------------------------------------------

@pytest.mark.parametrize("address", ["127.0.0.1", "127.8.9.10", "::1"])
def test_local_mode_serves_loopback_clients(metrics: Metrics, address: str) -> None:
    r = app_client(metrics, "local", (address, 40000)).get("/metrics")
    assert r.status_code == 200
    assert list(text_string_to_metric_families(r.text))


@pytest.mark.parametrize("address", ["192.0.2.10", "2001:db8::1", "testclient"])
def test_local_mode_refuses_other_clients_with_403(metrics: Metrics, address: str) -> None:
    r = app_client(metrics, "local", (address, 40000)).get("/metrics")
    assert r.status_code == 403
    assert r.json() == {"error": "/metrics is served to loopback clients only (--metrics local)."}
    after = app_client(metrics, "local", ("127.0.0.1", 1)).get("/metrics").text
    assert 'batmon_rejections_total{door="http",reason="forbidden"} 1.0' in after


def test_local_mode_over_a_real_socket_by_default(serve: ServeProcess) -> None:
    """The proxy case: uvicorn takes X-Forwarded-For from a loopback peer (its default
    `forwarded_allow_ips`), so a remote client behind a local reverse proxy is refused."""
    serve.start()
    with httpx.Client(base_url=serve.http_url, timeout=10) as http:
        assert http.get("/metrics").status_code == 200
        proxied = http.get("/metrics", headers={"X-Forwarded-For": "198.51.100.7"})
        assert proxied.status_code == 403


def test_local_mode_is_not_blinded_by_a_neighbours_failed_logins(metrics: Metrics) -> None:
    client = app_client(metrics, "local", ("127.0.0.1", 40000))
    # One wrong key tried 31 times: the source is throttled (bridge/ratelimit.py).
    codes = {client.get("/interface/batmon/count", params={"api_key": "bad-key"}).status_code
             for _ in range(31)}  # fmt: skip
    assert codes == {401, 429}
    assert client.get("/metrics").status_code == 200  # nothing to guess here


# -- off ---------------------------------------------------------------------------

def test_off_mode_has_no_metrics_endpoint(metrics: Metrics) -> None:
    r = app_client(metrics, "off", ("127.0.0.1", 40000)).get("/metrics")
    assert r.status_code == 404
    assert r.json() == {"error": "No endpoint at /metrics."}


def test_off_from_the_environment(serve: ServeProcess) -> None:
    serve.env = {"BATMON_METRICS": "off"}
    serve.start()
    with httpx.Client(base_url=serve.http_url, timeout=10) as http:
        assert http.get("/metrics").status_code == 404
        assert http.get("/healthz").status_code == 200


# -- token -------------------------------------------------------------------------

@pytest.mark.parametrize("header", [None, "Bearer wrong-token-0123456789", f"Basic {TOKEN}", "Bearer"])
def test_token_mode_without_the_right_bearer_is_401(metrics: Metrics, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    r = app_client(metrics, "token", ("127.0.0.1", 40000), TOKEN).get("/metrics", headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer realm="metrics"'
    assert TOKEN not in r.text


def test_token_mode_serves_any_address_with_the_bearer(metrics: Metrics) -> None:
    client = app_client(metrics, "token", ("192.0.2.10", 40000), TOKEN)
    r = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200
    assert list(text_string_to_metric_families(r.text))


def test_token_guessing_is_throttled_like_api_keys(metrics: Metrics) -> None:
    client = app_client(metrics, "token", ("192.0.2.10", 40000), TOKEN)
    codes = [client.get("/metrics", headers={"Authorization": f"Bearer guess-{n:020d}"}).status_code
             for n in range(31)]  # fmt: skip
    assert codes[:30] == [401] * 30
    assert codes[30] == 429
    # Counted per source, like api keys (bridge/ratelimit.py): its wrong guesses wait out
    # the minute, the right token (at least 16 characters) is still served.
    guess = client.get("/metrics", headers={"Authorization": "Bearer guess-00000000000000000000"})
    assert guess.status_code == 429
    assert client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_token_mode_from_flags_and_environment(serve: ServeProcess) -> None:
    serve.args = ["--metrics", "token"]
    serve.env = {"BATMON_METRICS_TOKEN": TOKEN}
    serve.start()
    with httpx.Client(base_url=serve.http_url, timeout=10) as http:
        assert http.get("/metrics").status_code == 401
        r = http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200
        assert "batmon_readings_accepted" in {f.name for f in text_string_to_metric_families(r.text)}
    assert TOKEN not in serve.log_path.read_text()
    assert not any(TOKEN in line for line in serve.output)


# -- options -----------------------------------------------------------------------

def test_token_mode_without_a_token_is_a_usage_error(tmp_path: Path) -> None:
    r = batmon("serve", "--data-dir", str(tmp_path), "--metrics", "token",
               env={"BATMON_METRICS_TOKEN": ""})  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "batmon serve: --metrics token needs --metrics-token (or BATMON_METRICS_TOKEN)."
    ]


def test_unknown_metrics_mode_is_a_usage_error(tmp_path: Path) -> None:
    r = batmon("serve", "--data-dir", str(tmp_path), "--metrics", "public")
    assert r.returncode == 2
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("batmon serve: --metrics: ") and "'off', 'local' or 'token'" in line


def test_a_short_metrics_token_is_refused_without_echoing_it(tmp_path: Path) -> None:
    r = batmon("serve", "--data-dir", str(tmp_path), "--metrics", "token",
               "--metrics-token", "tiny-sec")  # fmt: skip
    assert r.returncode == 2
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("batmon serve: --metrics-token: ") and "16" in line
    assert "tiny-sec" not in line


def test_a_token_without_token_mode_is_a_usage_error(tmp_path: Path) -> None:
    # Otherwise an operator who set only the token would believe /metrics was guarded by it.
    r = batmon("serve", "--data-dir", str(tmp_path), "--metrics-token", TOKEN)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "batmon serve: --metrics-token is only used with --metrics token."
    ]
    assert TOKEN not in r.stderr
