"""Abuse limits hit the abuser only: failed authentications are counted per presented
credential (batmon_id, email, api-key prefix), with a much higher per-address ceiling,
and one module (bridge/ratelimit.py) gives both doors, HTTP and the embedded broker,
the same rules. Every client here shares the address 127.0.0.1, like a household
behind one NAT.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from bridge.ratelimit import MAX_TRACKED, FailureLimiter, address_key, api_key_credential
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
from tests.conftest import Api
from tests.support import Clock, LoopThread

UPDATE = "/interface/update/batmon"


@pytest.fixture
def http(api: Api) -> Iterator[tuple[TestClient, Api]]:
    """The app with the default limits (30 failures a minute per credential)."""
    app = create_app(api.core, session_secret=b"s" * 32, limiter=FailureLimiter())
    with TestClient(app) as client:
        yield client, api


def _update(client: TestClient, batmon_id: int, token: str) -> int:
    return client.post(UPDATE, json={"batmon_id": batmon_id, "batmon_token": token,
                                     "batmon_voltage": 12.5}).status_code  # fmt: skip


def test_100_failures_from_an_address_do_not_stop_valid_devices_and_users_there(
    http: tuple[TestClient, Api],
) -> None:
    client, api = http
    broken_id, broken_token = api.add_batmon()
    good_id, good_token = api.add_batmon()
    codes = [_update(client, broken_id, "an-old-token") for _ in range(100)]
    assert codes[:30] == [403] * 30 and set(codes[30:]) == {429}
    # The failing credential itself is throttled: even its right token waits the window.
    assert _update(client, broken_id, broken_token) == 429
    refused = client.post(UPDATE, json={"batmon_id": broken_id, "batmon_token": broken_token,
                                        "voltage": 1})  # fmt: skip
    assert refused.headers["retry-after"] == "60" and "Too many" in refused.json()["error"]
    # Its neighbours are not: another device, the owner's api key, the owner's cookie.
    assert _update(client, good_id, good_token) == 200
    assert client.get("/interface/batmon/count", headers=api.auth).status_code == 200
    assert client.get("/interface/batmon/count").status_code == 200  # the cookie just set
    # The owner can still give the broken device a new token (edit takes no credential).
    edit = client.post("/interface/edit/batmon", headers=api.auth,
                       json={"batmon_id": broken_id, "batmon_token": "a-new-token"})  # fmt: skip
    assert edit.status_code == 200, edit.text


def test_wrong_api_keys_throttle_that_key_not_the_other_users_behind_the_address(
    http: tuple[TestClient, Api],
) -> None:
    client, api = http
    other_key = api.new_user("neighbour@example.org")
    wrong = "wrong" + secrets.token_urlsafe(30)
    codes = [client.get("/interface/batmon/count", headers={"X-API-Key": wrong}).status_code
             for _ in range(100)]  # fmt: skip
    assert codes[:30] == [401] * 30 and set(codes[30:]) == {429}
    for key in (api.api_key, other_key):
        assert client.get("/interface/batmon/count", headers={"X-API-Key": key}).status_code == 200
    # The same wrong key in another place of the request is the same credential.
    assert client.get("/interface/batmon/count", params={"api_key": wrong}).status_code == 429


def test_a_batmon_id_written_differently_is_still_one_credential(http: tuple[TestClient, Api]) -> None:
    client, api = http
    batmon_id, token = api.add_batmon()
    for i in range(30):
        spelled = [batmon_id, str(batmon_id), f" {batmon_id}", float(batmon_id)][i % 4]
        assert _update(client, spelled, "guess-" + str(i)) == 403  # type: ignore[arg-type]
    assert _update(client, batmon_id, token) == 429


def test_past_the_address_ceiling_a_sprayer_gets_one_try_per_credential(api: Api) -> None:
    limiter = FailureLimiter(max_failures=30, max_failures_per_address=50)
    app = create_app(api.core, session_secret=b"s" * 32, limiter=limiter)
    ids = [api.add_batmon() for _ in range(30)]
    with TestClient(app) as client:
        # Two guesses at each of 30 devices: 60 failures, over the ceiling of 50.
        for batmon_id, _ in ids * 2:
            assert _update(client, batmon_id, "guess") in (403, 429)
        # Each guessed device is now refused unchecked from this address...
        assert _update(client, ids[0][0], "guess") == 429
        # ...while a device nobody guessed at is still checked, and accepted.
        fresh_id, fresh_token = api.add_batmon()
        assert _update(client, fresh_id, fresh_token) == 200
        assert _update(client, fresh_id, "its-first-wrong-guess") == 403
        assert _update(client, fresh_id, fresh_token) == 429  # it failed here once
        assert client.get("/interface/batmon/count", headers=api.auth).status_code == 200


def test_failures_without_credentials_never_block_a_valid_cookie(api: Api) -> None:
    app = create_app(api.core, session_secret=b"s" * 32,
                     limiter=FailureLimiter(max_failures=3, max_failures_per_address=5))  # fmt: skip
    with TestClient(app) as client:
        assert client.get("/interface/batmon/count", headers=api.auth).status_code == 200
        stranger = TestClient(app)
        for _ in range(20):
            assert stranger.get("/interface/batmon/list").status_code == 401
        assert client.get("/interface/batmon/count").status_code == 200  # by cookie


# -- the embedded broker: the same rules at CONNECT -------------------------------


def _login(port: int, username: str, password: str) -> int:
    c = Client(port, f"abuse-{secrets.token_hex(4)}", username, password)
    try:
        return c.connect()
    finally:
        c.close()


def test_100_failed_connects_from_an_address_do_not_stop_valid_devices_and_users_there(
    loop_thread: LoopThread,
) -> None:
    clock = Clock()
    r = make_broker(FakeCredentials(), limiter=FailureLimiter(clock=clock))  # the defaults
    loop_thread.run(r.broker.start())
    port = r.broker.port
    try:
        codes = [_login(port, "5", f"an-old-token-{i}") for i in range(100)]
        assert set(codes) == {NOT_AUTHORIZED}
        # The failing credential itself is refused even with its right token...
        assert _login(port, "5", "tok-five") == NOT_AUTHORIZED
        # ...its neighbours at the same address are not.
        assert _login(port, "6", "tok-six") == 0
        assert _login(port, ALICE, ALICE_KEY) == 0
        dev = Client(port, "abuse-device-7", "7", "tok-seven")
        assert dev.connect() == 0
        assert dev.publish(TOPICS.update(7, "tok-seven"), b'{"voltage": 12.5}')
        dev.close()
        clock.advance(61)  # the window has passed
        assert _login(port, "5", "tok-five") == 0
    finally:
        loop_thread.run(r.broker.stop())


def test_an_email_failing_over_mqtt_is_throttled_case_blind(loop_thread: LoopThread) -> None:
    r = make_broker(FakeCredentials(), limiter=FailureLimiter(max_failures=3))
    loop_thread.run(r.broker.start())
    try:
        for _ in range(3):
            assert _login(r.broker.port, ALICE.upper(), "guess") == NOT_AUTHORIZED
        assert _login(r.broker.port, ALICE, ALICE_KEY) == NOT_AUTHORIZED
        assert _login(r.broker.port, "5", "tok-five") == 0
    finally:
        loop_thread.run(r.broker.stop())


def test_one_limiter_serves_both_doors_with_the_same_credential_names() -> None:
    limiter = FailureLimiter(max_failures=2)
    for _ in range(2):
        limiter.record_failure("192.0.2.1", api_key_credential("abcdefgh-wrong-1"))
    # A key is counted by its prefix; other keys and other credentials are untouched.
    assert limiter.blocked("192.0.2.9", api_key_credential("abcdefgh-wrong-2"))
    assert not limiter.blocked("192.0.2.1", api_key_credential("zyxwvuts-right"))
    assert not limiter.blocked("192.0.2.1", None)


def test_ipv6_clients_are_counted_by_their_64() -> None:
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::2")
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_key(None) is None


def test_a_spray_of_distinct_credentials_keeps_memory_bounded() -> None:
    clock = Clock()
    limiter = FailureLimiter(clock=clock)
    for n in range(MAX_TRACKED + 10):
        limiter.record_failure(f"198.51.100.{n % 250}", api_key_credential(f"{n:08d}"))
    assert len(limiter._by_credential) + len(limiter._by_address) <= MAX_TRACKED
    # What was recorded last still counts.
    for _ in range(30):
        limiter.record_failure("198.51.100.1", api_key_credential("recent-1"))
    assert limiter.blocked("198.51.100.1", api_key_credential("recent-1"))
