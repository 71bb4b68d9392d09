"""The agent's MQTT link: logs in as the device, publishes batches at QoS 1 and reports
which ones the broker acknowledged.

paho runs the connection on its own thread and reconnects by itself; acks cross to the
agent's thread through a queue, so the agent's state (the durable queue) has one owner.
A batch published while the link is down stays in paho's session and is resent on
reconnect; the durable queue still holds it until its PUBACK, whatever happens.
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import ssl
import threading
import uuid
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

log = logging.getLogger(__name__)

KEEPALIVE_S = 30
RECONNECT_MIN_DELAY_S = 1
RECONNECT_MAX_DELAY_S = 5


class MqttUplink:
    """One MQTT 3.1.1 client (amqtt speaks nothing newer) for one device."""

    def __init__(self, *, host: str, port: int, username: str, password: str, client_id: str,
                 error_topic: str | None = None, tls: ssl.SSLContext | None = None) -> None:  # fmt: skip
        self.host, self.port = host, port
        # MQTT 3.1.1 has no negative PUBACK: a payload the server refuses is acknowledged
        # all the same, and the reason comes on the device's error topic.
        self.error_topic = error_topic
        self.refused = 0
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{client_id}-{uuid.uuid4().hex[:8]}",
            clean_session=True,
            protocol=mqtt.MQTTv311,
        )
        if tls is not None:  # mqtts://
            self.client.tls_set_context(tls)
        self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(RECONNECT_MIN_DELAY_S, RECONNECT_MAX_DELAY_S)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.acks: queue.Queue[int] = queue.Queue()
        self.connected = threading.Event()
        self._said_down = False

    def start(self) -> None:
        """Connect in the background: the broker may well be down when the agent starts."""
        self.client.connect_async(self.host, self.port, keepalive=KEEPALIVE_S)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, topic: str, payload: str) -> int:
        """Publish at QoS 1 (queued by paho while disconnected); return the message id."""
        return self.client.publish(topic, payload, qos=1).mid

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:  # fmt: skip
        if reason.is_failure:
            # Wrong id/token is the usual cause; paho retries, the readings wait on disk.
            log.error("the MQTT broker at %s:%s refused the login: %s (check --batmon-id and"
                      " --token); readings stay queued", self.host, self.port, reason)  # fmt: skip
            return
        sock = client.socket()
        if isinstance(sock, socket.socket):
            # Small packets back to back: do not wait ~40 ms for delayed ACKs.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.error_topic is not None:
            client.subscribe(self.error_topic, qos=1)  # clean session: again on every connect
        self.connected.set()
        self._said_down = False
        log.info("connected to the MQTT broker at %s:%s", self.host, self.port)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:  # fmt: skip
        was_up = self.connected.is_set()
        self.connected.clear()
        if was_up and not self._said_down:
            self._said_down = True
            log.warning("lost the MQTT broker at %s:%s (%s); queuing readings on disk",
                        self.host, self.port, reason)  # fmt: skip

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any,
                    properties: Any) -> None:  # fmt: skip
        self.acks.put(mid)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            reason = str(json.loads(msg.payload).get("error", ""))
        except (ValueError, AttributeError):
            reason = bytes(msg.payload).decode(errors="replace")
        self.refused += 1  # paho's thread only
        log.warning("the server refused a message of this device: %s", reason)
