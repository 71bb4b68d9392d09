"""The event bus that the core emits on and every extension listens to."""

from __future__ import annotations

import logging

import pytest

from bridge.events import NO_SUBSCRIPTION, EventBus


class Ping:
    pass


class Pong:
    pass


def test_subscribe_all_delivers_by_type_and_cancel_removes_every_handler() -> None:
    bus, seen = EventBus(), []
    subscription = bus.subscribe_all({Ping: lambda e: seen.append("ping"),
                                      Pong: lambda e: seen.append("pong")})  # fmt: skip
    bus.emit(Ping())
    bus.emit(Pong())
    assert seen == ["ping", "pong"]
    subscription.cancel()
    subscription.cancel()  # stopping twice is harmless
    bus.emit(Ping())
    bus.emit(Pong())
    assert seen == ["ping", "pong"]


def test_cancelling_before_any_start_is_harmless() -> None:
    NO_SUBSCRIPTION.cancel()


def test_a_failing_handler_is_logged_and_does_not_stop_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus, seen = EventBus(), []

    def broken(event: Ping) -> None:
        raise RuntimeError("boom")

    bus.subscribe(Ping, broken)
    bus.subscribe(Ping, lambda e: seen.append("after"))
    with caplog.at_level(logging.ERROR):
        bus.emit(Ping())
    assert seen == ["after"]
    assert "boom" in caplog.text
