"""The embedded broker's test kit: test credentials (standing in for the core's
registry), a broker factory and a paho client with bounded, blocking helpers."""

from __future__ import annotations

import contextlib
import queue
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from bridge.doors.broker import EmbeddedBroker
from bridge.ratelimit import FailureLimiter
from bridge.security import hash_api_key
from bridge.topics import Topics

BROKER_YAML = Path(__file__).resolve().parents[1] / "broker.yaml"
TOPICS = Topics()
WAIT = 2.0  # seconds: every wait in this file is bounded by this
NOT_AUTHORIZED = 135  # paho's reason code for an MQTT 3.1.1 CONNACK return code 5
SUBACK_FAILURE = 0x80

ALICE, ALICE_KEY, ALICE_ID = "alice@example.org", "key-alice", 1
BOB, BOB_KEY, BOB_ID = "bob@example.org", "key-bob", 2



@dataclass
class FakeCredentials:
    """Test data standing in for the core's in-memory registry (a CredentialCheck)."""

    tokens: dict[int, str] = field(default_factory=lambda: {5: "tok-five", 6: "tok-six", 7: "tok-seven"})
    users: dict[str, tuple[str, int]] = field(
        default_factory=lambda: {ALICE: (ALICE_KEY, ALICE_ID), BOB: (BOB_KEY, BOB_ID)}
    )
    owner: dict[int, int] = field(default_factory=lambda: {5: ALICE_ID, 6: BOB_ID, 7: ALICE_ID})
    deleted_owner: dict[int, int] = field(default_factory=dict)
    bank_owner: dict[int, int] = field(default_factory=lambda: {9: ALICE_ID})

    def check_device(self, batmon_id: int, token: str) -> bool:
        return self.tokens.get(batmon_id) == token

    def check_user(self, email: str, api_key: str) -> int | None:
        key, user_id = self.users.get(email, ("", 0))
        return user_id if key and key == api_key else None

    def credential_holder(self, secret_hash: str) -> int | None:
        return next((uid for key, uid in self.users.values() if hash_api_key(key) == secret_hash), None)

    async def refresh_credentials(self) -> bool:
        return False  # nothing else changes these

    def owns(self, user_id: int, batmon_id: int) -> bool:
        return self.owner.get(batmon_id) == user_id

    def owned_until_deleted(self, user_id: int, batmon_id: int) -> bool:
        return self.deleted_owner.get(batmon_id) == user_id

    def owns_bank(self, user_id: int, bank_id: int) -> bool:
        return self.bank_owner.get(bank_id) == user_id

    def delete(self, batmon_id: int) -> None:
        """What Core.delete_batmon does to ownership."""
        self.deleted_owner[batmon_id] = self.owner.pop(batmon_id)
        self.tokens.pop(batmon_id, None)


@dataclass
class CountingCredentials(FakeCredentials):
    """FakeCredentials that count how often a secret was checked."""

    asked: int = 0

    def check_device(self, batmon_id: int, token: str) -> bool:
        self.asked += 1
        return super().check_device(batmon_id, token)

    def check_user(self, email: str, api_key: str) -> int | None:
        self.asked += 1
        return super().check_user(email, api_key)


@dataclass
class Running:
    broker: EmbeddedBroker
    credentials: FakeCredentials
    bridge_username: str
    bridge_password: str


def broker_yaml_with(folder: Path, **limits: Any) -> Path:
    """The project's broker.yaml with some ``limits`` changed, written into ``folder``."""
    config = yaml.safe_load(BROKER_YAML.read_text())
    config["limits"] = {**config.get("limits", {}), **limits}
    path = folder / "broker.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def make_broker(
    credentials: FakeCredentials,
    port: int = 0,
    limiter: FailureLimiter | None = None,
    config_path: Path = BROKER_YAML,
) -> Running:
    username, password = f"bridge-{secrets.token_hex(4)}", secrets.token_urlsafe(24)
    broker = EmbeddedBroker(
        host="127.0.0.1",
        port=port,
        config_path=config_path,
        credentials=credentials,
        topics=TOPICS,
        bridge_username=username,
        bridge_password=password,
        # Refused logins are what many tests here do; only the throttle tests count them.
        limiter=limiter or FailureLimiter(max_failures=10**9),
    )
    return Running(broker, credentials, username, password)


class Client:
    """A paho 2.x MQTT 3.1.1 client with blocking helpers bounded by WAIT."""

    def __init__(
        self,
        port: int,
        client_id: str,
        username: str | None,
        password: str | None,
        clean_session: bool = True,
        source: str = "",
    ) -> None:
        self.received: list[tuple[str, bytes, bool]] = []
        self._messages: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self._connacks: queue.Queue[Any] = queue.Queue()
        self._subacks: queue.Queue[tuple[int, list[Any]]] = queue.Queue()
        self._disconnects: queue.Queue[Any] = queue.Queue()
        self._port = port
        self._source = source  # a loopback address to connect from ("": the system's choice)
        self.paho = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=clean_session,
            reconnect_on_failure=False,  # a refused client must stay refused, not retry
        )
        if username is not None:
            self.paho.username_pw_set(username, password)
        self.paho.on_connect = lambda _c, _u, _f, rc, _p: self._connacks.put(rc)
        self.paho.on_subscribe = lambda _c, _u, mid, rcs, _p: self._subacks.put((mid, rcs))
        self.paho.on_message = lambda _c, _u, m: self._messages.put((m.topic, m.payload, m.retain))
        self.paho.on_disconnect = lambda _c, _u, _f, rc, _p: self._disconnects.put(rc)

    def connect(self) -> int:
        """Connect and return the CONNACK reason code value (0 = accepted)."""
        self.paho.connect("127.0.0.1", self._port, keepalive=30, bind_address=self._source)
        self.paho.loop_start()
        return self._connacks.get(timeout=WAIT).value

    def subscribe(self, topic_filter: str, qos: int = 0) -> int:
        """Subscribe and return the SUBACK code for the filter (0x80 = refused)."""
        _, mid = self.paho.subscribe(topic_filter, qos)
        while True:
            got_mid, codes = self._subacks.get(timeout=WAIT)
            if got_mid == mid:
                return codes[0].value

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> bool:
        """Publish and wait for the broker's acknowledgement (PUBACK for QoS 1)."""
        info = self.paho.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(WAIT)
        return info.is_published()

    def wait_for(self, topic: str, payload: bytes | None = None) -> tuple[str, bytes, bool]:
        """The first message on `topic` (with `payload` if given); all seen go to .received."""
        while True:
            msg = self._messages.get(timeout=WAIT)
            self.received.append(msg)
            if msg[0] == topic and payload in (None, msg[1]):
                return msg

    def wait_disconnected(self, timeout: float = WAIT) -> bool:
        """True once the broker has closed (or the client left) the connection."""
        try:
            self._disconnects.get(timeout=timeout)
        except queue.Empty:
            return False
        return True

    def topics_received(self) -> list[str]:
        return [t for t, _, _ in self.received]

    def close(self) -> None:
        """Disconnect cleanly and stop the network loop."""
        if self.paho.is_connected():
            self.paho.disconnect()
            # Without this wait loop_stop() can end the loop thread before it has sent the
            # DISCONNECT: the socket then stays open and the broker sees the client online.
            with contextlib.suppress(queue.Empty):
                self._disconnects.get(timeout=WAIT)
        self.paho.loop_stop()
