"""The event bus: the core and the doors emit, extensions (watchdog, alarms, notifier,
MQTT state, discovery, metrics, live feed) react, so a feature is a new subscriber,
not an edit of the core.

Events are emitted on the event loop's thread only (docs/DESIGN.md, "Threads"), so
handlers run there, synchronously, and must not block; anything slow (network,
Apprise) goes on the extension's own task. A failing handler is logged and never
breaks ingestion or other handlers.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:
    from bridge.banks import Bank
    from bridge.core import Alarm, Batmon

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReadingAccepted:
    """A reading was persisted; ``current`` is False for a back-filled older one."""

    batmon: Batmon
    values: dict[str, Any]
    ts: float
    current: bool
    door: Literal["http", "mqtt"] = "http"


@dataclass(frozen=True)
class StatusChanged:
    """A batmon went Online or Offline; ``first_reading`` marks its very first reading."""

    batmon: Batmon
    status: Literal["Online", "Offline"]
    previous: Literal["Online", "Offline"]
    at: float
    first_reading: bool = False


@dataclass(frozen=True)
class AlarmChanged:
    """An alarm triggered, repeated its notice, or cleared."""

    batmon: Batmon
    alarm: Alarm
    kind: Literal["triggered", "repeated", "cleared"]
    value: float
    at: float
    cell: int | None = None  # which cell (1-based), for an alarm on cell_min / cell_max


@dataclass(frozen=True)
class BankAlarmChanged:
    """An alarm on a bank's values triggered, repeated its notice, or cleared."""

    bank: Bank
    alarm: Alarm
    kind: Literal["triggered", "repeated", "cleared"]
    value: float
    at: float


@dataclass(frozen=True)
class BatmonChanged:
    """A batmon was created or edited (name, units, update_period, token...)."""

    batmon: Batmon
    created: bool = False
    old_token: str | None = None


@dataclass(frozen=True)
class BatmonDeleted:
    """A batmon is gone; subscribers clean up what they published for it."""

    batmon: Batmon


@dataclass(frozen=True)
class ChangedElsewhere:
    """Another worker on the same database changed this batmon (a reading, its settings, an
    alarm) or deleted it, and this worker's memory now holds that. Only views react (the live
    feed): the worker that made the change published, notified and counted it."""

    batmon: Batmon
    deleted: bool = False


@dataclass(frozen=True)
class BankChanged:
    """A bank was created, renamed, or its members changed (a deleted batmon leaving too)."""

    bank: Bank
    created: bool = False


@dataclass(frozen=True)
class BankDeleted:
    """A bank is gone; subscribers clean up what they published for it."""

    bank: Bank


@dataclass(frozen=True)
class CredentialsChanged:
    """Users' keys or MQTT tokens changed (another process, e.g. `batmon user reset-key`):
    the core holds the new set; sessions logged in with a secret now gone must end."""

    version: int


@dataclass(frozen=True)
class TestNoticeRequested:
    """A user asked for a test notice on the channels that have a target."""

    __test__ = False  # not a pytest test class, despite the name

    user_id: int
    channels: tuple[str, ...]
    at: float


@dataclass(frozen=True)
class CommitObserved:
    """The writer committed a group of ``rows`` readings in ``seconds`` (told on the loop)."""

    rows: int
    seconds: float


@dataclass(frozen=True)
class NoticeOutcome:
    """A notice was written (queued/skipped) or one attempt ended (sent/retry/failed); or,
    with several workers, one was claimed again after its lease ran out (reclaimed), or an
    attempt delivered one recorded sent already (duplicate)."""

    channel: str
    outcome: Literal["queued", "skipped", "sent", "retry", "failed", "duplicate", "reclaimed"]


@dataclass(frozen=True)
class HttpRejected:
    """The HTTP facade refused a request; ``reason`` is a short fixed label."""

    reason: str


@dataclass(frozen=True)
class MqttConnected:
    """The bridge's MQTT client (re)connected: retained topics are to be sent afresh."""


@dataclass(frozen=True)
class HomeAssistantStatus:
    """Home Assistant announced itself (its birth ``online``, or ``offline``), not retained.

    ``user_id``: whose Home Assistant, when the embedded broker saw the login; None on an
    external broker, where nobody can say.
    """

    payload: bytes
    user_id: int | None = None


E = TypeVar("E")
Handlers = dict[type, Callable[[Any], None]]


class Subscription:
    """Handlers subscribed together and cancelled together, so an extension names
    its events once and cannot forget one when it stops."""

    def __init__(self, bus: EventBus | None, handlers: Handlers) -> None:
        self._bus = bus
        self._handlers = handlers

    def cancel(self) -> None:
        """Unsubscribe every handler; calling it again does nothing."""
        if self._bus is not None:
            for event_type, handler in self._handlers.items():
                self._bus.unsubscribe(event_type, handler)
        self._handlers = {}


NO_SUBSCRIPTION = Subscription(None, {})  # what an extension holds before start()


class EventBus:
    """Typed publish/subscribe within one process."""

    def __init__(self) -> None:
        self._handlers: dict[type, list[Callable[[Any], None]]] = defaultdict(list)

    def subscribe(self, event_type: type[E], handler: Callable[[E], None]) -> None:
        """Call ``handler`` for every event of ``event_type``."""
        self._handlers[event_type].append(handler)

    def unsubscribe(self, event_type: type[E], handler: Callable[[E], None]) -> None:
        """Stop calling ``handler``; unknown handlers are ignored."""
        handlers = self._handlers.get(event_type, [])
        if handler in handlers:
            handlers.remove(handler)

    def subscribe_all(self, handlers: Handlers) -> Subscription:
        """Subscribe each handler to its event type; cancel them all at once later."""
        for event_type, handler in handlers.items():
            self.subscribe(event_type, handler)
        return Subscription(self, dict(handlers))

    def emit(self, event: object) -> None:
        """Deliver ``event`` to its subscribers, isolating their failures."""
        for handler in list(self._handlers.get(type(event), ())):
            try:
                handler(event)
            except Exception:
                log.exception("handler %r failed on %s", handler, type(event).__name__)
