"""Simulated devices: plausible battery readings published over MQTT, for demos and
for trying a broker, the bridge and Home Assistant without hardware.

Each device is its own MQTT 3.1.1 client logging in as a real device would on the
embedded broker (username = batmon_id, password = token) and publishes QoS 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from bridge.doors.mqtt_link import MqttConnectError, new_client
from bridge.topics import Topics

CONNECT_TIMEOUT_S = 10.0
PUBLISH_TIMEOUT_S = 10.0
HTTP_TIMEOUT_S = 10.0
CONFIRM_TIMEOUT_S = 10.0
_LOCAL_HOSTS = ("0.0.0.0", "::", "127.0.0.1", "::1", "localhost", "")


class SimulateError(Exception):
    """The API would not create the batmons, or no reading landed on the server."""


class _Landed:
    """The readings a device sent, and what the server made of them: landed when its state
    topic shows one, refused when its error topic says why (MQTT 3.1.1 has no negative
    PUBACK, so the error topic is where a refusal is told)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, batmon_id: int,
                 announce: Callable[[str], None]) -> None:  # fmt: skip
        self.sent: set[tuple[Any, ...]] = set()
        self.landed = 0
        self.refused = 0
        self.event = asyncio.Event()
        self._loop = loop
        self._batmon_id = batmon_id
        self._announce = announce

    @staticmethod
    def key(values: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(values.get(f"batmon_{m}") for m in ("voltage", "current", "soc"))

    def on_state(self, payload: bytes) -> None:
        """paho's thread: a state message; a match with a sent reading means it landed."""
        try:
            state = json.loads(payload)
        except ValueError:
            return
        if isinstance(state, dict):
            self._loop.call_soon_threadsafe(self._check, self.key(state))

    def on_error(self, payload: bytes) -> None:
        """paho's thread: the server refused a message of this device, and says why."""
        try:
            reason = str(json.loads(payload).get("error", ""))
        except (ValueError, AttributeError):
            reason = payload.decode(errors="replace")
        self._loop.call_soon_threadsafe(self._refuse, reason)

    def _check(self, key: tuple[Any, ...]) -> None:
        if key in self.sent:
            self.sent.discard(key)
            self.landed += 1
            self.event.set()

    def _refuse(self, reason: str) -> None:
        self.refused += 1
        self._announce(f"refused: batmon {self._batmon_id}: {reason}")


@dataclass
class SimulatedBattery:
    """A 12 V lead-acid-like battery: current drifts, soc integrates it, V follows both."""

    capacity_ah: float = 100.0
    soc: float = 75.0
    current: float = 0.0
    charged_kwh: float = 0.0  # the device's own counters, as a shunt keeps them
    discharged_kwh: float = 0.0
    cells: int = 4
    rng: random.Random = field(default_factory=random.Random)

    def step(self, dt: float) -> dict[str, Any]:
        """Advance ``dt`` seconds and return the reading a device would send."""
        # Random walk between 20 A of discharge and 10 A of charge.
        self.current = min(10.0, max(-20.0, self.current + self.rng.gauss(0.0, 1.0)))
        self.soc = min(100.0, max(0.0, self.soc + self.current * dt / 3600 / self.capacity_ah * 100))
        # Open-circuit voltage rises with soc (11.8-12.9 V); charging lifts and
        # discharging sags it through ~30 mOhm of internal resistance.
        voltage = round(11.8 + 1.1 * self.soc / 100 + 0.03 * self.current, 3)
        current = round(self.current, 3)
        kwh = voltage * current * dt / 3.6e6
        if kwh > 0:
            self.charged_kwh += kwh
        else:
            self.discharged_kwh -= kwh
        # The well-known details keys (docs/BATTERY.md), as a shunt or BMS sends them.
        details: dict[str, Any] = {
            "temperature": round(22 + self.rng.uniform(-0.5, 0.5), 1),
            "consumed_ah": round(-(100 - self.soc) / 100 * self.capacity_ah, 3),
            "time_to_go": round(self.soc / 100 * self.capacity_ah / -current * 60) if current < 0 else None,
            "cells": [round(voltage / self.cells + self.rng.uniform(-0.02, 0.02), 3)
                      for _ in range(self.cells)],
            "capacity_ah": self.capacity_ah,
            "energy_charged_kwh": round(self.charged_kwh, 2),  # VE.Direct's 0.01 kWh steps
            "energy_discharged_kwh": round(self.discharged_kwh, 2),
        }  # fmt: skip
        return {
            "batmon_voltage": voltage,
            "batmon_current": current,
            "batmon_power": round(voltage * current, 3),
            "batmon_soc": round(self.soc, 2),
            "batmon_details": details,
        }


async def simulate(
    *,
    host: str,
    port: int,
    devices: list[tuple[int, str]],
    interval: float,
    count: int | None,
    base_topic: str = "batmon",
    username_mode: Literal["device", "none"] = "device",
    confirm_timeout: float = CONFIRM_TIMEOUT_S,
    announce: Callable[[str], None] = lambda line: None,
    tls: ssl.SSLContext | None = None,
) -> None:
    """Publish a reading from each (batmon_id, token) every ``interval`` seconds.

    ``count`` readings per device, or until cancelled when None. ``username_mode``
    "device" logs in as the device (embedded broker), "none" connects anonymously.
    Raises MqttConnectError when a device cannot connect, and SimulateError when the
    first readings do not show on the devices' state topics within ``confirm_timeout``
    (a broker that acknowledged them is not proof that a bridge took them).
    ``announce`` gets one line per interval (sent, refused, landed so far) and one per
    refusal the server reports on a device's error topic.
    """
    topics = Topics(base=base_topic)
    loop = asyncio.get_running_loop()
    clients = []
    landed = [_Landed(loop, batmon_id, announce) for batmon_id, _ in devices]
    try:
        for (batmon_id, token), seen in zip(devices, landed, strict=True):
            client = new_client(f"batmon-sim-{batmon_id}", clean_session=True)
            if username_mode == "device":
                client.username_pw_set(str(batmon_id), token)
            if tls is not None:  # mqtts://
                client.tls_set_context(tls)
            error_topic = topics.error(batmon_id, token)

            def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage, seen: _Landed = seen,
                           error_topic: str = error_topic) -> None:  # fmt: skip
                if msg.topic == error_topic:
                    seen.on_error(bytes(msg.payload))
                else:
                    seen.on_state(bytes(msg.payload))

            client.on_message = on_message
            clients.append(client)
            await _connect(client, host, port, batmon_id)
            client.subscribe([(topics.state(batmon_id), 1), (error_topic, 1)])
        batteries = [SimulatedBattery(soc=random.uniform(40, 95)) for _ in devices]
        pending: list[mqtt.MQTTMessageInfo] = []
        sent = 0
        last = time.monotonic()
        while count is None or sent < count:
            now = time.monotonic()
            for client, battery, seen, (batmon_id, token) in zip(
                clients, batteries, landed, devices, strict=True
            ):
                reading = battery.step(now - last if sent else interval)
                seen.sent.add(_Landed.key(reading))
                pending.append(client.publish(topics.update(batmon_id, token), json.dumps(reading), qos=1))
            last = now
            sent += 1
            if sent == 1:
                await _confirm_landed(landed, devices, topics, host, port, confirm_timeout)
            # Forget what the broker has acknowledged, so a long run holds no history.
            pending = [info for info in pending if not info.is_published()]
            if count is None or sent < count:
                await asyncio.sleep(interval)
                announce(_tally(sent, landed))
        for info in pending:
            await asyncio.to_thread(info.wait_for_publish, PUBLISH_TIMEOUT_S)
        # The last round's answers: wait (bounded) until each reading landed, or until the
        # refusals could account for the rest (a refusal names no reading: give it a second).
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < confirm_timeout:
            arrived = sum(s.landed for s in landed)
            if arrived >= sent * len(devices) or (
                    elapsed > 1.0 and arrived + sum(s.refused for s in landed) >= sent * len(devices)):
                break
            await asyncio.sleep(0.05)
        announce(_tally(sent, landed))
    finally:
        for client in clients:
            client.disconnect()
            await asyncio.to_thread(client.loop_stop)


def _tally(rounds: int, landed: list[_Landed]) -> str:
    """One interval's line: what was sent, refused and landed so far, over all devices."""
    sent = rounds * len(landed)
    refused = sum(s.refused for s in landed)
    arrived = sum(s.landed for s in landed)
    return f"round {rounds}: sent {sent}, refused {refused}, landed {arrived}"


async def _confirm_landed(
    landed: list[_Landed], devices: list[tuple[int, str]], topics: Topics, host: str, port: int,
    timeout: float,
) -> None:
    """Wait until every device's state topic shows one of its readings, or fail loudly."""
    for seen, (batmon_id, _token) in zip(landed, devices, strict=True):
        try:
            await asyncio.wait_for(seen.event.wait(), timeout)
        except TimeoutError:
            raise SimulateError(
                f"no reading of batmon {batmon_id} landed: nothing came back on"
                f" {topics.state(batmon_id)} within {timeout:g} s. Is mqtt://{host}:{port} the"
                " broker of `batmon serve` (it prints its MQTT address; give --mqtt-port, or"
                " --api-url to ask the server) and are the id and token right?"
            ) from None


async def health_mqtt_address(api_url: str) -> tuple[str, int]:
    """The MQTT host and port a server reports in /healthz; its host if that is local."""
    try:
        body = await asyncio.to_thread(_get_json, api_url.rstrip("/") + "/healthz")
        host, port = str(body.get("mqtt_host") or ""), int(body["mqtt_port"])
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as exc:
        raise SimulateError(f"could not read the MQTT port from {api_url}/healthz: {exc}") from None
    if host in _LOCAL_HOSTS:  # a wildcard or loopback address of the server: its API host
        host = urllib.parse.urlsplit(api_url).hostname or "127.0.0.1"
    return host, port


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
        return json.load(response)


async def _connect(client: mqtt.Client, host: str, port: int, batmon_id: int) -> None:
    """Connect and start the network thread; the client reconnects by itself later."""
    loop = asyncio.get_running_loop()
    connected: asyncio.Future[ReasonCode] = loop.create_future()

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                   properties: Any) -> None:  # fmt: skip
        def settle() -> None:
            if not connected.done():
                connected.set_result(reason)

        loop.call_soon_threadsafe(settle)

    client.on_connect = on_connect
    client.connect_async(host, port, keepalive=30)
    client.loop_start()
    try:
        reason = await asyncio.wait_for(connected, CONNECT_TIMEOUT_S)
    except TimeoutError:
        raise MqttConnectError(
            f"device {batmon_id} could not connect to the MQTT broker at {host}:{port}"
            f" within {CONNECT_TIMEOUT_S:g} s"
        ) from None
    if reason.is_failure:
        with contextlib.suppress(Exception):
            client.disconnect()
        raise MqttConnectError(f"the MQTT broker at {host}:{port} refused device {batmon_id}: {reason}")


SIMULATED_NAME = "Simulated battery {n}"


async def create_batmons(api_url: str, api_key: str, count: int) -> list[tuple[int, str]]:
    """``count`` batmons named "Simulated battery 1..count": those made by an earlier run are
    reused (found by name), only the missing ones are created through the HTTP API."""
    listed = await asyncio.to_thread(_post, api_url, "/interface/batmon/list", api_key, {})
    by_name: dict[str, Any] = {b["batmon_name"]: b for b in reversed(listed)}  # the oldest wins
    devices = []
    for n in range(1, count + 1):
        name = SIMULATED_NAME.format(n=n)
        found: Any = by_name.get(name)
        if found is None:
            body = {"batmon_name": name, "batmon_type": "simulator"}
            found = await asyncio.to_thread(_post, api_url, "/interface/add/batmon", api_key, body)
        devices.append((int(found["batmon_id"]), str(found["batmon_token"])))
    return devices


def _post(api_url: str, path: str, api_key: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        api_url.rstrip("/") + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-API-Key": api_key},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            return json.load(response)["success"]
    except urllib.error.HTTPError as exc:
        try:
            message = json.load(exc).get("error", exc.reason)
        except ValueError:
            message = exc.reason
        raise SimulateError(f"{api_url} answered {exc.code}: {message}") from None
    except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        raise SimulateError(f"could not create a batmon through {api_url}: {exc}") from None
