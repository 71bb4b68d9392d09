"""Credentials a running `batmon serve` honours at once: Home Assistant's MQTT token
(`batmon user token add|list|revoke`) and `batmon user reset-key`, each run while serving.

Real `batmon serve` subprocesses, the real CLI, real HTTP and MQTT over sockets.
"""

from __future__ import annotations

import json
import re
import shlex
import threading
import time
from pathlib import Path

import httpx2 as httpx

from tests.broker_support import NOT_AUTHORIZED, SUBACK_FAILURE, Client
from tests.conftest import ServeProcess
from tests.home_assistant import DISCOVERY_FILTERS, discovery_problems
from tests.support import ROOT, batmon, wait_until
from tests.test_home_assistant_e2e import HomeAssistant, mqtt_port

# How long a running server may take to honour a credential change: "at once" for a person
# at a terminal, generous for a loaded machine (the server polls once a second).
HONOURED_WITHIN_S = 5.0


def readme_token_command() -> list[str]:
    """The `batmon user token add` line of the README's Home Assistant recipe, as argv."""
    readme = (ROOT / "README.md").read_text()
    recipe = readme.split("### Home Assistant", 1)[1].split("\n### ", 1)[0]
    line = next(line for line in recipe.splitlines() if " user token add " in line)
    argv = shlex.split(line.split("#", 1)[0])
    assert argv[0].endswith("batmon"), argv
    return argv[1:]


def mqtt_login(port: int, username: str, password: str) -> int:
    """Connect once and return the CONNACK code (0 accepted, 135 not authorized)."""
    client = Client(port, f"login-{time.monotonic_ns()}", username, password)
    try:
        return client.connect()
    finally:
        client.close()


def status_of(serve: ServeProcess, key: str) -> int:
    """HTTP status of an owner request made with ``key`` as api_key."""
    with httpx.Client(base_url=serve.http_url, timeout=10) as http:
        return http.get("/interface/batmon/count", headers={"X-API-Key": key}).status_code


def test_home_assistant_with_the_readme_token_sees_only_its_owners_batmons_until_revoked(
    serve: ServeProcess,
) -> None:
    serve.start()
    data = ["--data-dir", str(serve.data_dir)]
    owner = {"X-API-Key": serve.admin_key or ""}
    other_key = batmon("user", "add", "other@example.org", *data).stdout.strip()
    with httpx.Client(base_url=serve.http_url, timeout=10) as http:
        mine, mine_token = http.post("/interface/add/batmon", headers=owner,
                                     json={"batmon_name": "House bank"}).json()["success"].values()
        theirs, theirs_token = http.post("/interface/add/batmon", headers={"X-API-Key": other_key},
                                         json={"batmon_name": "Not yours"}).json()["success"].values()

        # The README's recipe, run while serve runs: it prints the secret alone, once.
        made = batmon(*readme_token_command(), *data)
        assert made.returncode == 0, made.stderr
        assert len(made.stdout.splitlines()) == 1
        secret = made.stdout.strip()
        assert len(secret) >= 40 and " " not in secret
        email = re.search(r"token add (\S+)", " ".join(readme_token_command())).group(1)  # type: ignore[union-attr]
        assert email == "admin@localhost"

        port = mqtt_port(serve)
        wait_until(lambda: mqtt_login(port, email, secret) == 0, HONOURED_WITHIN_S,
                   "the new token accepted by the running server")  # fmt: skip
        # It is no api_key: over HTTP it is refused like a wrong key. (401, or 429 once the
        # polling above has failed 30 logins from this address: the source throttle answers
        # a wrong key that way too.)
        assert status_of(serve, secret) in (401, 429)
        assert mqtt_login(port, "other@example.org", secret) == NOT_AUTHORIZED

        ha = HomeAssistant(port, email, secret)
        closed = threading.Event()
        ha.client.on_disconnect = lambda *_: closed.set()
        try:
            assert ha.subscribe_discovery() == [0] * len(DISCOVERY_FILTERS)
            ha.client.publish("homeassistant/status", "online")  # its birth message
            config = json.loads(ha.next_on(f"homeassistant/device/batmon_{mine}/config").payload)
            assert config["dev"]["name"] == "House bank" and discovery_problems(config) == []
            ha.client.subscribe([(config["state_topic"], 1),
                                 *((a["topic"], 1) for a in config["availability"])])  # fmt: skip
            assert ha.subacks.get(timeout=10) == [1, 1, 1]
            # Another owner's topics: refused by name, filtered out of a wildcard.
            ha.client.subscribe([(f"batmon/{theirs}/state", 1), ("batmon/+/state", 1)])
            assert ha.subacks.get(timeout=10) == [SUBACK_FAILURE, 1]

            # Theirs reports first, mine second: when mine's state arrives, theirs would have.
            for batmon_id, token, volts in ((theirs, theirs_token, 11.1), (mine, mine_token, 12.9)):
                r = http.post("/interface/update/batmon",
                              json={"batmon_id": batmon_id, "batmon_token": token, "voltage": volts})
                assert r.status_code == 200, r.text
            while json.loads(ha.next_on(f"batmon/{mine}/state").payload).get("batmon_voltage") != 12.9:
                pass
            # It may publish Home Assistant's status only: no update is taken, no state forged
            # (it subscribes to that state topic itself, so a forged one would come back).
            for topic, payload in ((f"batmon/{mine}/{mine_token}/update", '{"voltage": 99}'),
                                   (f"batmon/{mine}/state", "forged")):  # fmt: skip
                ha.client.publish(topic, payload, qos=1).wait_for_publish(10)
            # A reading after them, as a marker: a forged message would have come before it.
            r = http.post("/interface/update/batmon",
                          json={"batmon_id": mine, "batmon_token": mine_token, "voltage": 12.8})
            assert r.status_code == 200, r.text
            while json.loads(ha.next_on(f"batmon/{mine}/state").payload).get("batmon_voltage") != 12.8:
                pass
            history = http.get("/interface/batmon/history", headers=owner,
                               params={"batmon_id": mine, "min_epoch_tm_sec": 0}).json()["success"]
            assert [row["batmon_voltage"] for row in history[0]["data"]] == [12.9, 12.8]
            assert not [m for m in ha.seen if m.payload == b"forged"]
            assert not [m.topic for m in ha.seen if str(theirs) in m.topic]
            assert {m.topic.split("/")[0] for m in ha.seen} == {"homeassistant", "batmon"}

            # Revoked while connected: the session is closed, and the next login refused.
            listed = batmon("user", "token", "list", email, *data)
            assert listed.returncode == 0 and "home-assistant" in listed.stdout
            assert secret not in listed.stdout
            revoked = batmon("user", "token", "revoke", email, "home-assistant", *data)
            assert revoked.returncode == 0, revoked.stderr
            assert closed.wait(HONOURED_WITHIN_S), "the revoked token's session stayed connected"
        finally:
            ha.close()
        assert mqtt_login(port, email, secret) == NOT_AUTHORIZED
        assert "home-assistant" not in batmon("user", "token", "list", email, *data).stdout
        # The owner's own key was never touched.
        assert status_of(serve, serve.admin_key or "") == 200


def test_reset_key_while_serving_the_new_key_works_and_the_old_one_is_refused(serve: ServeProcess) -> None:
    serve.start()
    data = ["--data-dir", str(serve.data_dir)]
    old_key = batmon("user", "add", "bob@example.org", *data).stdout.strip()
    port = mqtt_port(serve)
    wait_until(lambda: status_of(serve, old_key) == 200, HONOURED_WITHIN_S, "the new user's key")
    # Sessions open before the reset: bob's (old key) and the admin's (untouched).
    bob = Client(port, "bob-dashboard", "bob@example.org", old_key)
    admin = Client(port, "admin-dashboard", "admin@localhost", serve.admin_key)
    assert bob.connect() == 0 and admin.connect() == 0
    browser = httpx.Client(base_url=serve.http_url, timeout=10)  # a dashboard login, by cookie
    assert browser.post("/interface/login", data={"api_key": old_key}).status_code == 200
    assert browser.get("/interface/batmon/count").status_code == 200
    try:
        reset = batmon("user", "reset-key", "bob@example.org", *data)
        assert reset.returncode == 0, reset.stderr
        new_key = reset.stdout.strip()
        assert reset.stdout.count("\n") == 1 and len(new_key) >= 40 and new_key != old_key

        wait_until(lambda: status_of(serve, old_key) == 401, HONOURED_WITHIN_S,
                   "the old key refused over HTTP")  # fmt: skip
        assert status_of(serve, new_key) == 200
        assert bob.wait_disconnected(HONOURED_WITHIN_S), "a session of the old key stayed connected"
        # A login made with the old key ends too (the key may have leaked with its cookie).
        assert browser.get("/interface/batmon/count").status_code == 401
        assert browser.post("/interface/login", data={"api_key": new_key}).status_code == 200
        assert browser.get("/interface/batmon/count").status_code == 200
        assert mqtt_login(port, "bob@example.org", old_key) == NOT_AUTHORIZED
        assert mqtt_login(port, "bob@example.org", new_key) == 0
        assert admin.paho.is_connected() and status_of(serve, serve.admin_key or "") == 200
    finally:
        browser.close()
        bob.close()
        admin.close()


def test_token_and_reset_key_commands_validate_their_input(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path / "data")]
    batmon("user", "add", "ann@example.org", *data)

    def run(*args: str, code: int, says: str = "") -> str:
        result = batmon("user", *args, *data)
        assert result.returncode == code, (args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        if code:
            assert result.stderr.strip().count("\n") == 0 and says in result.stderr, result.stderr
        return result.stdout

    secret = run("token", "add", "ann@example.org", "--name", "home-assistant", code=0).strip()
    listed = run("token", "list", "ann@example.org", code=0)
    assert re.fullmatch(r"home-assistant\s+created \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\n", listed), listed
    assert secret not in listed
    run("token", "add", "ann@example.org", "--name", "home-assistant", code=1, says="exists")
    run("token", "add", "ann@example.org", "--name", "a b", code=2, says="name")
    run("token", "add", "ann@example.org", "--name", "x" * 65, code=2, says="name")
    run("token", "add", "ann@example.org", code=2, says="--name")
    run("token", "add", "nobody@example.org", "--name", "ha", code=1, says="no user")
    run("token", "add", "not-an-email", "--name", "ha", code=2, says="email")
    run("token", "list", "nobody@example.org", code=1, says="no user")
    run("token", "revoke", "ann@example.org", "nothing", code=1, says="no token")
    run("token", "revoke", "ann@example.org", "home-assistant", code=0)
    assert run("token", "list", "ann@example.org", code=0) == ""
    run("reset-key", "nobody@example.org", code=1, says="no user")
    run("reset-key", "not-an-email", code=2, says="email")
    assert len(run("reset-key", "ANN@example.org", code=0).strip()) >= 40
    elsewhere = batmon("user", "token", "list", "ann@example.org", "--data-dir", str(tmp_path / "absent"))
    assert elsewhere.returncode == 1 and "no data folder" in elsewhere.stderr
    assert not (tmp_path / "absent").exists()


def test_a_database_from_before_tokens_keeps_its_users_and_gains_tokens(tmp_path: Path) -> None:
    import sqlite3

    from sqlite_utils import Database

    from bridge.security import hash_api_key
    from bridge.store import schema

    path = tmp_path / "data" / "batmon.sqlite3"
    path.parent.mkdir(mode=0o700)
    db = Database(sqlite3.connect(path))
    latest = schema.MIGRATIONS
    before = next(i for i, m in enumerate(latest) if any("CREATE TABLE user_tokens" in s for s in m))
    try:
        schema.MIGRATIONS = latest[:before]  # the release before tokens
        schema.LATEST = before
        schema.migrate(db)
    finally:
        schema.MIGRATIONS, schema.LATEST = latest, len(latest)
    db.execute("INSERT INTO users (email, api_key_hash, created) VALUES (?, ?, 0)",
               ("old@example.org", hash_api_key("the-old-key")))  # fmt: skip
    db.conn.commit()
    db.close()

    data = ["--data-dir", str(path.parent)]
    made = batmon("user", "token", "add", "old@example.org", "--name", "home-assistant", *data)
    assert made.returncode == 0, made.stderr
    assert batmon("user", "list", *data).stdout.split() == ["old@example.org"]
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT api_key_hash FROM users").fetchone()[0] == hash_api_key("the-old-key")
        assert conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] == len(latest)


def test_the_watcher_reloads_only_when_a_credential_changed(tmp_path: Path) -> None:
    import asyncio

    from bridge.core import Core
    from bridge.events import CredentialsChanged, EventBus
    from bridge.extensions.credential_watcher import CredentialWatcher
    from bridge.models import AddBatmon, Reading
    from bridge.store.db import Store

    path = tmp_path / "batmon.sqlite3"
    server = Core(Store.open(path), EventBus()).load()
    user, old_key = server.create_user("ann@example.org")
    changes: list[CredentialsChanged] = []
    server.bus.subscribe(CredentialsChanged, changes.append)
    cli = Core(Store.open(path), EventBus()).load()  # what `batmon user ...` opens

    async def scenario() -> None:
        watcher = CredentialWatcher(server, path, interval_s=3600)  # polled by hand below
        await watcher.start()
        try:
            await watcher.check_now()  # the user made above
            changes.clear()
            # Readings commit on the writer's connection: not a credential change.
            batmon = server.add_batmon(user, AddBatmon(batmon_name="Shed"))
            await server.ingest_readings(batmon, [Reading(voltage=12.5)])
            assert not await watcher.check_now()
            new_key = cli.reset_api_key("ann@example.org")
            secret = cli.add_mqtt_token("ann@example.org", "home-assistant")
            assert await watcher.check_now() and len(changes) == 1
            assert server.user_for_api_key(old_key) is None
            assert server.check_user("ann@example.org", new_key) == user.id
            assert server.check_user("ann@example.org", secret) == user.id
            assert server.user_for_api_key(secret) is None  # a token is no api key
            cli.revoke_mqtt_token("ann@example.org", "home-assistant")
            assert await watcher.check_now()
            assert server.check_user("ann@example.org", secret) is None
        finally:
            await watcher.stop()
            server.writer.stop()

    asyncio.run(scenario())
    cli.close()
    server.close_history()
    server.store.close()


def test_the_watcher_keeps_the_credentials_it_has_while_the_database_cannot_be_read(
    tmp_path: Path,
) -> None:
    import asyncio

    from bridge.core import Core
    from bridge.events import EventBus
    from bridge.extensions.credential_watcher import CredentialWatcher
    from bridge.store.db import Store

    store = Store.open(tmp_path / "batmon.sqlite3")
    core = Core(store, EventBus()).load()
    _, key = core.create_user("ann@example.org")

    async def scenario() -> None:
        watcher = CredentialWatcher(core, tmp_path / "elsewhere.sqlite3", interval_s=3600)
        await watcher.start()
        try:
            assert not await watcher.check_now()
        finally:
            await watcher.stop()

    asyncio.run(scenario())
    assert core.check_user("ann@example.org", key) is not None
    core.close()
