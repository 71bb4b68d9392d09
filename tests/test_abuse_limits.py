"""Abuse limits hit the failing source, never a credential (issue 15): failed
authentications are counted per source address, and past 30 a minute that source's
*wrong* attempts are answered 429 (HTTP) or held back before their refusal (MQTT),
while a correct token or key is checked and accepted whatever failed before, from
anywhere. One module (bridge/ratelimit.py) gives both doors, HTTP and the embedded
broker, the same rules. In the in-process tests every client shares one address, like
a household behind one NAT; the serve tests come from 127.0.0.2 and 127.0.0.1.
"""

from __future__ import annotations

import secrets
import time
import tracemalloc
from collections.abc import Callable, Iterator

import httpx2 as httpx
import pytest
from starlette.testclient import TestClient

from bridge.doors.broker.plugin import THROTTLED_REFUSAL_DELAY_S
from bridge.ratelimit import MAX_TRACKED, FailureLimiter, address_key
from http_api.app import create_app
from tests.broker_support import (
    ALICE,
    ALICE_KEY,
    NOT_AUTHORIZED,
    TOPICS,
    Client,
    FakeCredentials,
    make_broker,
)
from tests.conftest import Api, ServeProcess
from tests.load import WAIT_S, add_batmons, admin_headers
from tests.support import Clock, LoopThread
from tests.test_serve_end_to_end import mqtt_port

UPDATE = "/interface/update/batmon"


@pytest.fixture
def http(api: Api) -> Iterator[tuple[TestClient, Api]]:
    """The app with the default limits (30 failures a minute per source)."""
    app = create_app(api.core, session_secret=b"s" * 32, limiter=FailureLimiter())
    with TestClient(app) as client:
        yield client, api


def _update(client: TestClient | httpx.Client, batmon_id: int, token: str) -> int:
    return client.post(UPDATE, json={"batmon_id": batmon_id, "batmon_token": token,
                                     "batmon_voltage": 12.5}).status_code  # fmt: skip


def test_100_failures_from_an_address_throttle_its_wrong_guesses_never_a_right_token(
    http: tuple[TestClient, Api],
) -> None:
    client, api = http
    broken_id, broken_token = api.add_batmon()
    good_id, good_token = api.add_batmon()
    codes = [_update(client, broken_id, "an-old-token") for _ in range(100)]
    # The failing source is throttled: past 30 its wrong guesses are told to back off.
    assert codes[:30] == [403] * 30 and set(codes[30:]) == {429}
    refused = client.post(UPDATE, json={"batmon_id": broken_id, "batmon_token": "an-old-token",
                                        "voltage": 1})  # fmt: skip
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "60" and "Too many" in refused.json()["error"]
    # A right token is checked and served, the guessed device's own included.
    assert _update(client, broken_id, broken_token) == 200
    assert _update(client, good_id, good_token) == 200
    assert client.get("/interface/batmon/count", headers=api.auth).status_code == 200
    assert client.get("/interface/batmon/count").status_code == 200  # the cookie just set
    edit = client.post("/interface/edit/batmon", headers=api.auth,
                       json={"batmon_id": broken_id, "batmon_token": "a-new-token"})  # fmt: skip
    assert edit.status_code == 200, edit.text
    assert _update(client, broken_id, "a-new-token") == 200


def test_wrong_api_keys_throttle_the_source_not_the_users_behind_the_address(
    http: tuple[TestClient, Api],
) -> None:
    client, api = http
    other_key = api.new_user("neighbour@example.org")
    # Guesses sharing the owner's first 8 characters (once how a key was counted).
    wrong = api.api_key[:8] + secrets.token_urlsafe(30)
    codes = [client.get("/interface/batmon/count", headers={"X-API-Key": wrong}).status_code
             for _ in range(100)]  # fmt: skip
    assert codes[:30] == [401] * 30 and set(codes[30:]) == {429}
    for key in (api.api_key, other_key):
        assert client.get("/interface/batmon/count", headers={"X-API-Key": key}).status_code == 200
    # Any wrong key from that source, in any place of the request, is throttled.
    assert client.get("/interface/batmon/count", params={"api_key": "another"}).status_code == 429


def test_failures_count_per_source_whatever_credential_they_named(http: tuple[TestClient, Api]) -> None:
    client, api = http
    ids = [api.add_batmon() for _ in range(3)]
    for i in range(30):  # guesses spread over devices, id spellings and api keys
        batmon_id = ids[i % 3][0]
        spelled = [batmon_id, str(batmon_id), f" {batmon_id}", float(batmon_id)][i % 4]
        if i % 5 == 0:
            assert client.get("/interface/batmon/count", params={"api_key": f"k{i}"}).status_code == 401
        else:
            assert _update(client, spelled, "guess-" + str(i)) == 403  # type: ignore[arg-type]
    assert _update(client, ids[0][0], "one-more-guess") == 429
    assert all(_update(client, batmon_id, token) == 200 for batmon_id, token in ids)


def test_a_throttled_source_gets_one_plain_answer_per_drained_failure() -> None:
    """A leaky bucket: 30 at once, then one more every 2 s; a quiet minute forgets it."""
    clock = Clock()
    limiter = FailureLimiter(clock=clock)
    assert [limiter.record_failure("192.0.2.1") for _ in range(31)] == [False] * 30 + [True]
    assert limiter.throttled("192.0.2.1") and not limiter.throttled("192.0.2.2")
    clock.advance(2.0)
    assert not limiter.throttled("192.0.2.1")
    assert limiter.record_failure("192.0.2.1") is False  # the drained one
    assert limiter.record_failure("192.0.2.1") is True
    for _ in range(100):  # hammering keeps it throttled, but never beyond a minute's quiet
        limiter.record_failure("192.0.2.1")
    clock.advance(60.0)
    assert not limiter.throttled("192.0.2.1")
    assert [limiter.record_failure("192.0.2.1") for _ in range(30)] == [False] * 30


def test_failures_without_credentials_never_block_a_valid_cookie(api: Api) -> None:
    app = create_app(api.core, session_secret=b"s" * 32, limiter=FailureLimiter(max_failures=3))
    with TestClient(app) as client:
        assert client.get("/interface/batmon/count", headers=api.auth).status_code == 200
        stranger = TestClient(app)
        for _ in range(20):
            assert stranger.get("/interface/batmon/list").status_code == 401
        assert client.get("/interface/batmon/count").status_code == 200  # by cookie
        # Asking without a key guessed nothing: the source is not throttled by it.
        assert stranger.get("/interface/batmon/list", params={"api_key": "x"}).status_code == 401


# -- the embedded broker: the same rules at CONNECT -------------------------------


def _login(port: int, username: str, password: str) -> int:
    c = Client(port, f"abuse-{secrets.token_hex(4)}", username, password)
    try:
        return c.connect()
    finally:
        c.close()


def test_failed_connects_throttle_the_source_and_never_a_right_token(loop_thread: LoopThread) -> None:
    clock = Clock()
    limiter = FailureLimiter(max_failures=3, clock=clock)
    r = make_broker(FakeCredentials(), limiter=limiter)
    loop_thread.run(r.broker.start())
    port = r.broker.port
    try:
        assert [_login(port, "5", f"an-old-token-{i}") for i in range(3)] == [NOT_AUTHORIZED] * 3
        assert limiter.throttled("127.0.0.1")
        # Past the limit, a wrong CONNECT waits before its refusal...
        started = time.monotonic()
        assert _login(port, "5", "an-old-token-4") == NOT_AUTHORIZED
        assert time.monotonic() - started >= THROTTLED_REFUSAL_DELAY_S
        # ...a right one is checked and accepted: the guessed device's, its neighbours'.
        assert _login(port, "5", "tok-five") == 0
        assert _login(port, "6", "tok-six") == 0
        assert _login(port, ALICE, ALICE_KEY) == 0
        dev = Client(port, "abuse-device-7", "7", "tok-seven")
        assert dev.connect() == 0
        assert dev.publish(TOPICS.update(7, "tok-seven"), b'{"voltage": 12.5}')
        dev.close()
        clock.advance(61)  # a quiet minute: the source is forgotten
        assert not limiter.throttled("127.0.0.1")
    finally:
        loop_thread.run(r.broker.stop())


def test_an_email_failing_over_mqtt_throttles_the_source_not_the_user(loop_thread: LoopThread) -> None:
    limiter = FailureLimiter(max_failures=3)
    r = make_broker(FakeCredentials(), limiter=limiter)
    loop_thread.run(r.broker.start())
    try:
        for _ in range(3):
            assert _login(r.broker.port, ALICE.upper(), "guess") == NOT_AUTHORIZED
        assert limiter.throttled("127.0.0.1")
        assert _login(r.broker.port, ALICE, ALICE_KEY) == 0
        assert _login(r.broker.port, "5", "tok-five") == 0
    finally:
        loop_thread.run(r.broker.stop())


def test_ipv6_clients_are_counted_by_their_64() -> None:
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::2")
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_key(None) is None
    limiter = FailureLimiter(max_failures=2)
    limiter.record_failure("2001:db8:1:2::1")
    limiter.record_failure("2001:db8:1:2::99")
    assert limiter.throttled("2001:db8:1:2:ffff::7") and not limiter.throttled("2001:db8:1:3::1")
    assert not limiter.record_failure(None) and not limiter.throttled(None)


def test_a_spray_from_many_sources_keeps_memory_bounded() -> None:
    clock = Clock()
    limiter = FailureLimiter(clock=clock)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(MAX_TRACKED + 10):
            limiter.record_failure(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}")
        per_source = (tracemalloc.get_traced_memory()[0] - before) / limiter.tracked
    finally:
        tracemalloc.stop()
    print(f"{limiter.tracked} sources remembered, {per_source:.0f} bytes each")
    assert limiter.tracked <= MAX_TRACKED
    assert per_source < 256  # was about 1.7 KB per failing credential
    # What was recorded last still counts.
    for _ in range(30):
        limiter.record_failure("198.51.100.1")
    assert limiter.throttled("198.51.100.1")


# -- acceptance 5, against a real `batmon serve` -----------------------------------

ATTACKER, OWNER = "127.0.0.2", "127.0.0.1"


def _http_from(serve: ServeProcess, source: str) -> httpx.Client:
    return httpx.Client(base_url=serve.http_url, timeout=30,
                        transport=httpx.HTTPTransport(local_address=source))  # fmt: skip


def _connack(serve: ServeProcess, username: str, password: str, source: str) -> int:
    c = Client(mqtt_port(serve), f"cred-{secrets.token_hex(4)}", username, password, source=source)
    try:
        return c.connect()
    finally:
        c.close()


def _throttled_within_the_leak(started: float, guess: Callable[[], int]) -> None:
    """After 30 failures the source's bucket is full, less what leaked out since ``started``
    (one failure per window/30 s, 2 s by default): on a slow machine 30 guesses take long
    enough for a few to leak, so that many more guesses may still be answered before the 429."""
    limiter = FailureLimiter()
    leaked = int((time.monotonic() - started) / (limiter.window_s / limiter.max_failures))
    answers = []
    for _ in range(leaked + 1):
        answers.append(guess())
        if answers[-1] == 429:
            return
    took = time.monotonic() - started
    raise AssertionError(f"not throttled after 30 + {leaked + 1} failures in {took:.1f} s: {answers}")


@pytest.mark.parametrize("door", ["http", "mqtt"])
def test_30_wrong_tokens_then_the_right_one_from_anywhere_is_accepted_over_http_and_mqtt(
    serve: ServeProcess, door: str,
) -> None:
    """Issue 15, acceptance 5: 30 wrong tokens for batmon X from 127.0.0.2 (over ``door``),
    then its correct token from 127.0.0.2 and from 127.0.0.1, over HTTP and over MQTT."""
    serve.start(timeout=WAIT_S)
    (device,) = add_batmons(serve, 1)
    with _http_from(serve, ATTACKER) as attacker:
        started = time.monotonic()
        for i in range(30):
            if door == "http":
                assert _update(attacker, device.batmon_id, f"guess-{i}") == 403
            else:
                assert _connack(serve, str(device.batmon_id), f"guess-{i}", ATTACKER) == NOT_AUTHORIZED
        # The source is throttled, over both doors (one limiter).
        _throttled_within_the_leak(started, lambda: _update(attacker, device.batmon_id, "guess-31"))
        for source in (ATTACKER, OWNER):
            with _http_from(serve, source) as http:
                assert _update(http, device.batmon_id, device.token) == 200, source
            assert _connack(serve, str(device.batmon_id), device.token, source) == 0, source


@pytest.mark.parametrize("door", ["http", "mqtt"])
def test_30_wrong_api_keys_then_the_right_one_from_anywhere_is_accepted_over_http_and_mqtt(
    serve: ServeProcess, door: str,
) -> None:
    """The same for a user's api_key, guessed with its first 8 characters known."""
    serve.start(timeout=WAIT_S)
    key = serve.admin_key or ""
    email = "admin@localhost"
    with _http_from(serve, ATTACKER) as attacker:
        started = time.monotonic()
        for _ in range(30):
            guess = key[:8] + secrets.token_urlsafe(32)
            if door == "http":
                r = attacker.get("/interface/batmon/count", headers={"X-API-Key": guess})
                assert r.status_code == 401
            else:
                assert _connack(serve, email, guess, ATTACKER) == NOT_AUTHORIZED
        _throttled_within_the_leak(started, lambda: attacker.get(
            "/interface/batmon/count", headers={"X-API-Key": key[:8] + "x" * 35}).status_code)  # fmt: skip
        for source in (ATTACKER, OWNER):
            with _http_from(serve, source) as http:
                r = http.get("/interface/batmon/count", headers=admin_headers(serve))
                assert r.status_code == 200, (source, r.text)
            assert _connack(serve, email, key, source) == 0, source
