"""Notices for status changes and alarms, fanned out through Apprise via a durable outbox.

Event handlers only queue outbox rows (written on the writer's thread, in order with
everything else, never on the event loop) and wake the worker once they are
committed, so ingestion never waits on the network or the disk. The worker sends due rows concurrently
(bounded, each with a timeout), and retries failures with exponential back-off.

Target URLs are read from the user's row when a notice is sent, not copied into the
outbox: a user who fixes or removes a target while notices wait in the queue is
obeyed at once, and the secrets in the URLs live in one table only. The outbox keeps
the masked URL a notice went to.

Several workers may share one outbox (PostgreSQL). Each claims a notice under its own id
with a lease, renews the leases of its sends in flight, and records an outcome only while
its claim holds; a notice whose worker died mid-send is claimed again by any worker once
the lease ran out (counted ``reclaimed``), and a delivery that finds the notice recorded
sent already is counted ``duplicate`` (docs/SCALE-OUT.md, "Notices"). On SQLite (one
process) the same calls hold without a lease. Delivery is at least once either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote, unquote, urlsplit

import apprise
from pydantic import ValidationError

from bridge.banks import BANK_UNITS
from bridge.errors import InvalidInput, NotFound, StorageFailed
from bridge.events import (
    NO_SUBSCRIPTION,
    AlarmChanged,
    BankAlarmChanged,
    NoticeOutcome,
    StatusChanged,
    Subscription,
    TestNoticeRequested,
)
from bridge.models import NotificationTargets, describe_error
from bridge.store.interface import CHANNELS, Channel

if TYPE_CHECKING:
    from bridge.core import Alarm, Batmon, Core
    from bridge.store.interface import Claim, Store

log = logging.getLogger(__name__)

OutcomeName = Literal["queued", "skipped", "sent", "retry", "failed", "duplicate", "reclaimed"]

TARGET_COLUMNS: dict[Channel, str] = {ch: f"{ch}_url" for ch in CHANNELS}
RETENTION_S = 30 * 86400  # finished notices are kept this long for the user to read
TEST_NOTICE_BATMON_ID = 0  # outbox rows need a batmon; ids start at 1, so 0 is none
IDLE_WAIT_S = 60.0  # a safety net: the worker looks at the queue at least this often
LEASE_S = 30.0
"""How long a claim holds without renewal (renewed every third of it while the send runs):
a worker that died mid-send has its notice sent by another within about this long."""
RECORD_RETRY_S = 1.0  # an outcome the store could not take is written again this often
NOTIFY_TYPES = {
    "offline": apprise.NotifyType.WARNING,
    "online": apprise.NotifyType.SUCCESS,
    "triggered": apprise.NotifyType.WARNING,
    "repeated": apprise.NotifyType.WARNING,
    "cleared": apprise.NotifyType.SUCCESS,
}
# Query parameters whose values are secrets even where Apprise's privacy URL shows
# them: custom headers (+), payload fields (:, -) and anything named like a key.
_SECRET_PARAM = re.compile(r"^[+:\-]|pass|secret|token|key|auth|sid|sig|pwd|cred", re.I)
_URL_WORDS = re.compile(r"[^/:@?&=#,+%\s]{4,}")


# -- target URLs ----------------------------------------------------------------
def mask_url(url: str) -> str:
    """The URL with its secrets masked, for showing and logging.

    Apprise's privacy URL masks passwords and tokens; on top of that only query
    parameters the user wrote are kept, and secret-looking ones are starred.
    """
    if not url:
        return ""
    plugin = apprise.Apprise.instantiate(url)
    if plugin is None:
        return "****"
    private = plugin.url(privacy=True)
    head, _, query = private.partition("?")
    given = {name for name, _ in _query_pairs(urlsplit(url).query)}
    kept = [
        f"{quote(name, safe='+:-_.')}={'****' if _SECRET_PARAM.search(name) else quote(value)}"
        for name, value in _query_pairs(query)
        if name in given
    ]
    return head + ("?" + "&".join(kept) if kept else "")


def _query_pairs(query: str) -> list[tuple[str, str]]:
    """Split a query string keeping '+' literal (Apprise uses it for header names)."""
    pairs = []
    for part in query.split("&"):
        if part:
            name, _, value = part.partition("=")
            pairs.append((unquote(name), unquote(value)))
    return pairs


def scrub(text: str, url: str) -> str:
    """Remove from ``text`` every part of ``url`` that its masked form hides."""
    masked = mask_url(url)
    for word in set(_URL_WORDS.findall(url)) | set(_URL_WORDS.findall(unquote(url))):
        if word not in masked:
            text = text.replace(word, "****")
    return text


# The target functions take a store handle: tools call them directly, the facade through
# ``Core.in_store`` (off the event loop).
def set_targets(store: Store, user_id: int, targets: NotificationTargets | dict[str, str]) -> None:
    """Store a user's target URLs (email_url, whatsapp_url, sms_url); a dict is
    validated by the NotificationTargets model first, naming a bad field."""
    if store.user_by_id(user_id) is None:
        raise NotFound(f"user {user_id} does not exist.")
    if isinstance(targets, dict):
        unknown = set(targets) - set(TARGET_COLUMNS.values())
        if unknown:
            raise InvalidInput(f"{sorted(unknown)[0]} is not a notification target"
                               " (email_url, whatsapp_url or sms_url).")  # fmt: skip
        try:
            targets = NotificationTargets.model_validate(targets)
        except ValidationError as exc:
            raise InvalidInput(describe_error(exc)) from None
    cleaned = targets.changes()
    store.set_user_targets(user_id, cleaned)
    log.info("user %s notification targets set: %s", user_id,
             {name: mask_url(url) for name, url in cleaned.items()})  # fmt: skip


def targets_view(store: Store, user_id: int) -> dict[str, str]:
    """The user's target URLs with secrets masked ("" where none is set)."""
    row = store.user_by_id(user_id)
    if row is None:
        raise NotFound(f"user {user_id} does not exist.")
    return {column: mask_url(row[column]) for column in TARGET_COLUMNS.values()}


async def request_test_notice(core: Core, user_id: int) -> dict[str, list[str]]:
    """Ask the notifier for a test notice on every channel that has a target; the
    notice goes through the outbox like any other, so it proves the whole path."""
    row = await core.in_store(lambda store: store.user_by_id(user_id))
    if row is None:
        raise NotFound(f"user {user_id} does not exist.")
    channels = tuple(ch for ch, column in TARGET_COLUMNS.items() if row[column])
    if not channels:
        raise InvalidInput("No notification target is set: set email_url, whatsapp_url or"
                           " sms_url first.")  # fmt: skip
    core.bus.emit(TestNoticeRequested(user_id, channels, core.clock()))
    return {"channels": list(channels)}


def notices_view(store: Store, batmon_id: int, limit: int = 50) -> list[dict[str, Any]]:
    """The batmon's latest notices, newest first, times as epoch seconds."""
    return [
        {
            "channel": row["channel"],
            "kind": row["kind"],
            "title": row["title"],
            "body": row["body"],
            "state": row["state"],
            "attempts": row["attempts"],
            "created": int(row["created"]),
            "sent_at": None if row["sent_at"] is None else int(row["sent_at"]),
            "last_error": row["last_error"],
            "target": row["target"],
        }
        for row in store.outbox.latest_for_batmon(batmon_id, limit)
    ]


# -- notice text ------------------------------------------------------------------
def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _who(batmon: Batmon) -> str:
    return f"batmon '{batmon.name}' (id {batmon.id})"


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def _quantity(unit_of: Callable[[str], str], metric: str, value: float) -> str:
    unit = unit_of(metric)
    return f"{value:g}{'' if unit in ('', '%') else ' '}{unit}"


def status_text(event: StatusChanged) -> tuple[str, str]:
    """Title and body of an Online/Offline notice."""
    b = event.batmon
    who = _upper_first(_who(b))
    if event.status == "Offline":
        last = _utc(b.last_reading) if b.last_reading is not None else "never"
        return (
            f"{who} is Offline",
            f"{who} went Offline at {_utc(event.at)}: no reading within its"
            f" update period of {b.update_period} s. Last reading: {last}.",
        )
    return (
        f"{who} is back Online",
        f"{who} is Online again at {_utc(event.at)}: a reading arrived"
        " after it had been Offline.",
    )


def alarm_text(event: AlarmChanged) -> tuple[str, str]:
    """Title and body of an alarm triggered/repeated/cleared notice."""
    b = event.batmon
    return _alarm_text(event.alarm, event.kind, event.value, event.at, _who(b), b.unit, event.cell)


def bank_alarm_text(event: BankAlarmChanged) -> tuple[str, str]:
    """The same notice for an alarm on a bank's values; it names the bank."""
    who = f"bank '{event.bank.name}' (id {event.bank.id})"
    return _alarm_text(event.alarm, event.kind, event.value, event.at, who,
                       lambda metric: BANK_UNITS.get(metric, ""))  # fmt: skip


def _alarm_text(a: Alarm, kind: str, value_now: float, at: float, who: str,
                unit_of: Callable[[str], str], cell: int | None = None) -> tuple[str, str]:  # fmt: skip
    value = _quantity(unit_of, a.metric, value_now)
    condition = f"{a.metric} {a.condition} {_quantity(unit_of, a.metric, a.threshold)}"
    subject = f"Alarm '{a.name}' (id {a.id}) on {who}"
    reading = f"{a.metric} {value}"
    if cell is not None:  # "cell 3 at 2.95 V": which cell, not only how low
        reading = f"cell {cell} at {value}"
        value = f"{value} (cell {cell})"
    if a.clear_value is not None:
        condition += f", clears past {_quantity(unit_of, a.metric, a.clear_value)}"
    if kind == "triggered":
        title = f"Alarm '{a.name}' triggered on {who}: {reading}"
        body = f"{subject} triggered at {_utc(at)}: {reading} ({condition})."
    elif kind == "repeated":
        since = _utc(a.trigger_time) if a.trigger_time is not None else "earlier"
        title = f"Alarm '{a.name}' still active on {who}: {reading}"
        body = (
            f"{subject} is still active at {_utc(at)} (triggered at {since}): {a.metric}"
            f" is {value} ({condition}). Acknowledge the alarm to stop these reminders."
        )
    else:
        title = f"Alarm '{a.name}' cleared on {who}: {reading}"
        body = (
            f"{subject} cleared at {_utc(at)}: {a.metric} is {value}, so {condition}"
            " no longer holds."
        )
    return title, body


# -- the notifier -------------------------------------------------------------------
class Notifier:
    """Queues notices on events and delivers them from the outbox with Apprise."""

    def __init__(self, core: Core, *, retry_base_s: float = 30.0,
                 give_up_after_s: float = 86400.0, max_attempts: int = 12,
                 send_timeout_s: float = 20.0, concurrency: int = 8, lease_s: float = LEASE_S,
                 worker: str | None = None) -> None:  # fmt: skip
        self.core = core
        # Who claims: unique per process (a restarted worker is another claimer), and
        # readable in the outbox's claimed_by column.
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.lease_s = lease_s
        self._subscription: Subscription = NO_SUBSCRIPTION
        self.retry_base_s = retry_base_s
        self.give_up_after_s = give_up_after_s
        self.max_attempts = max_attempts
        self.send_timeout_s = send_timeout_s
        self.concurrency = concurrency
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._inflight: dict[asyncio.Task[None], Claim] = {}
        self._pending_writes: set[asyncio.Future[Any]] = set()

    async def start(self) -> None:
        """Requeue notices a stopped or killed process left in flight (where the store can
        tell: SQLite; on PostgreSQL their leases run out), then serve."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        requeued = await self.core.in_store(lambda store: store.outbox.requeue_interrupted())
        if requeued:
            log.info("requeued %d notices left in flight by the previous run", requeued)
        before = self.core.clock() - RETENTION_S
        await self.core.in_store(lambda store: store.outbox.prune(before))
        self._subscription = self.core.bus.subscribe_all({
            StatusChanged: self.on_status, AlarmChanged: self.on_alarm,
            BankAlarmChanged: self.on_bank_alarm,
            TestNoticeRequested: self.on_test_notice,
        })  # fmt: skip
        self._task = asyncio.create_task(self._run(), name="notifier")
        self._renewer = asyncio.create_task(self._renew_leases(), name="notifier-leases")

    async def stop(self) -> None:
        """Stop sending; notices in flight stay 'sending' and are resent on next start
        (SQLite) or by any worker once their lease has run out (PostgreSQL)."""
        self._subscription.cancel()
        tasks = [t for t in (self._task, self._renewer, *self._inflight) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = self._renewer = None

    # -- event handlers (synchronous: queue the rows, wake the worker once they are in) ----
    def on_status(self, event: StatusChanged) -> None:
        """Queue Offline notices, and Online ones after an Offline spell (not the first reading)."""
        if event.first_reading or event.status == event.previous:
            return
        title, body = status_text(event)
        self.enqueue(event.batmon, event.status.lower(), title, body)

    def on_alarm(self, event: AlarmChanged) -> None:
        """Queue an alarm triggered/repeated/cleared notice."""
        title, body = alarm_text(event)
        self.enqueue(event.batmon, event.kind, title, body)

    def on_bank_alarm(self, event: BankAlarmChanged) -> None:
        """Queue a bank alarm's notice: on each channel that at least one member with
        notices enabled has (a bank has no flags of its own), none if no member has
        notices enabled. The outbox row's batmon_id is the bank's id (ids never clash)."""
        bank = event.bank
        members = [m for i in bank.batmon_ids if (m := self.core.batmons.get(i)) and m.notification_enabled]
        if not members:
            return
        channels = [ch for ch in CHANNELS if any(ch in self._channels(m) for m in members)]
        title, body = bank_alarm_text(event)
        self._enqueue(bank.user_id, bank.id, channels, event.kind, title, body)

    def on_test_notice(self, event: TestNoticeRequested) -> None:
        """Queue a test notice on the channels asked for (no batmon: batmon_id 0)."""
        title = "Test notice from your batmon bridge"
        body = (f"This test notice was sent at {_utc(event.at)} from the dashboard."
                " Notices about your batmons reach this target the same way.")  # fmt: skip
        notices = [
            {"user_id": event.user_id, "batmon_id": TEST_NOTICE_BATMON_ID, "channel": channel,
             "kind": "test", "title": title, "body": body, "created": event.at,
             "state": "queued"}
            for channel in event.channels
        ]  # fmt: skip

        def write(store: Store) -> list[dict[str, Any]]:
            store.outbox.enqueue(notices)
            return notices

        self._queue_rows(write)

    def enqueue(self, batmon: Batmon, kind: str, title: str, body: str) -> None:
        """Queue one row per channel the batmon's flags allow; wake the worker once written."""
        if not batmon.notification_enabled:
            return
        self._enqueue(batmon.user_id, batmon.id, self._channels(batmon), kind, title, body)

    def _enqueue(self, user_id: int, batmon_id: int, channels: list[Channel], kind: str, title: str,
                 body: str) -> None:  # fmt: skip
        """One row per channel, for the batmon (or bank) ``batmon_id`` of ``user_id``."""
        now = self.core.clock()

        def write(store: Store) -> list[dict[str, Any]]:
            # The targets are read where the rows are written: the user's latest.
            user = store.user_by_id(user_id) or {}
            notices: list[dict[str, Any]] = []
            for channel in channels:
                has_target = bool(user.get(TARGET_COLUMNS[channel]))
                notices.append({
                    "user_id": user_id, "batmon_id": batmon_id, "channel": channel,
                    "kind": kind, "title": title, "body": body, "created": now,
                    "state": "queued" if has_target else "skipped",
                    "last_error": "" if has_target else _no_target(channel),
                })  # fmt: skip
            store.outbox.enqueue(notices)
            return notices

        self._queue_rows(write)

    def _queue_rows(self, write: Callable[[Store], list[dict[str, Any]]]) -> None:
        """Write outbox rows off the loop (at once when no loop runs: tools and tests)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self._written(write(self.core.store))
            return
        future = self.core.writer.call(write)
        self._pending_writes.add(future)
        future.add_done_callback(self._after_write)

    def _after_write(self, future: asyncio.Future[list[dict[str, Any]]]) -> None:
        self._pending_writes.discard(future)
        if future.cancelled():
            return
        if future.exception() is not None:
            log.error("could not queue notices: %s", future.exception())
            return
        self._written(future.result())

    def _written(self, notices: list[dict[str, Any]]) -> None:
        for notice in notices:
            self._tell(notice["channel"], notice["state"])
        if any(n["state"] == "queued" for n in notices):
            self._wake_worker()

    def _tell(self, channel: str, outcome: OutcomeName) -> None:
        """On the bus (metrics count it): a notice written or an attempt ended."""
        self.core.bus.emit(NoticeOutcome(channel, outcome))

    @staticmethod
    def _channels(batmon: Batmon) -> list[Channel]:
        channels: list[Channel] = ["email"]
        if batmon.whatsapp_enabled:
            channels.append("whatsapp")
        if batmon.sms_enabled:
            channels.append("sms")
        return channels

    def _wake_worker(self) -> None:
        """Set the wake-up event from the loop's thread, whichever thread emitted."""
        if self._loop is None or self._wake is None:
            return
        try:
            same_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            same_loop = False
        if same_loop:
            self._wake.set()
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake.set)

    # -- the worker -------------------------------------------------------------------
    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            self._wake.clear()
            try:
                await self._dispatch_due()
            except Exception:
                log.exception("notifier could not read the outbox; trying again shortly")
                await asyncio.sleep(1.0)
            await self._wait()

    async def _dispatch_due(self) -> None:
        """Start a send task for each due notice, up to the concurrency bound."""
        free = self.concurrency - len(self._inflight)
        if free <= 0:
            return
        now = self.core.clock()
        worker, lease_until = self.worker, now + self.lease_s
        # Ours still: its lease may have run out while the outcome waits for the database.
        busy = {claim.notice_id for claim in self._inflight.values()}

        def claim_due(store: Store) -> list[tuple[dict[str, Any], str, Claim | None]]:
            """Due rows with their targets, claimed (or skipped) in one visit off the loop."""
            claimed: list[tuple[dict[str, Any], str, Claim | None]] = []
            for row in [r for r in store.outbox.due(now, free + len(busy)) if r["id"] not in busy][:free]:
                user = store.user_by_id(row["user_id"])
                target = str(user[TARGET_COLUMNS[row["channel"]]]) if user else ""
                if not target:
                    store.outbox.mark_skipped(row["id"], now, _no_target(row["channel"]))
                    claimed.append((row, "", None))
                elif claim := store.outbox.claim(row["id"], worker, now, lease_until):
                    claimed.append((row, target, claim))
            return claimed

        for row, target, claim in await self.core.in_store(claim_due):
            if claim is None:
                self._tell(row["channel"], "skipped")
                continue
            if row["state"] == "sending":  # its worker's lease ran out: died or stalled mid-send
                self._tell(row["channel"], "reclaimed")
                log.warning("notice %s (%s): the lease of %s ran out mid-send; sending it again"
                            " (at least once: it may arrive twice)", row["id"], row["channel"],
                            row.get("claimed_by") or "another worker")  # fmt: skip
            task = asyncio.create_task(self._deliver(row, target, claim))
            self._inflight[task] = claim
            task.add_done_callback(self._delivered)

    def _delivered(self, task: asyncio.Task[None]) -> None:
        self._inflight.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            # The row stays 'sending' until it is requeued or its lease runs out.
            log.error("recording a notice's outcome failed: %r", task.exception())
        if self._wake is not None:
            self._wake.set()  # a slot is free

    async def _wait(self) -> None:
        """Sleep until the next notice is due, a new one is queued, or a slot frees."""
        assert self._wake is not None
        # At least once a lease: nothing wakes this worker for notices another one queued
        # and died before claiming, or whose lease runs out.
        timeout = min(IDLE_WAIT_S, self.lease_s)
        if len(self._inflight) < self.concurrency:
            try:
                next_at = await self.core.in_store(lambda store: store.outbox.next_due_at())
            except Exception as exc:  # the store is failing: look again within a second
                log.warning("notifier could not read the outbox: %s", exc)
                next_at = self.core.clock() + 1.0
            if next_at is not None:
                timeout = min(timeout, max(0.0, next_at - self.core.clock()))
        # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel (stop())
        # that lands just as the event is set, and the worker would never end.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()

    async def _deliver(self, row: dict[str, Any], target: str, claim: Claim) -> None:
        """One attempt at one notice; records the outcome and schedules any retry."""
        masked = mask_url(target)
        error = await self._attempt(row, target)
        now = self.core.clock()
        attempts = claim.attempt  # the claim counted this attempt
        channel = row["channel"]
        if not error:
            if await self._record(lambda store: store.outbox.mark_sent(claim, now, masked)):
                self._tell(channel, "sent")
                log.info("notice %s (%s) sent to %s", row["id"], channel, masked)
            else:  # another worker delivered it while this send ran past its lease
                self._tell(channel, "duplicate")
                log.warning("notice %s (%s) sent to %s again: another worker had sent it after this"
                            " send's lease ran out (a duplicate)", row["id"], channel, masked)  # fmt: skip
            return
        next_at = now + self.retry_base_s * 2 ** (attempts - 1)
        if attempts >= self.max_attempts or next_at - row["created"] > self.give_up_after_s:
            outcome: OutcomeName = "failed"
            held = await self._record(lambda store: store.outbox.mark_failed(claim, now, error, masked))
        else:
            outcome = "retry"
            held = await self._record(
                lambda store: store.outbox.mark_retry(claim, now, next_at, error, masked))
        if not held:
            log.info("notice %s (%s) to %s failed (%s), but another worker has it since this"
                     " attempt's lease ran out", row["id"], channel, masked, error)  # fmt: skip
        elif outcome == "failed":
            self._tell(channel, "failed")
            log.warning("notice %s (%s) to %s failed for good after %d attempts: %s",
                        row["id"], channel, masked, attempts, error)  # fmt: skip
        else:
            self._tell(channel, "retry")
            log.info("notice %s (%s) to %s failed (%s); retry in %.0f s",
                     row["id"], channel, masked, error, next_at - now)  # fmt: skip

    async def _record(self, write: Callable[[Store], bool]) -> bool:
        """Write an attempt's outcome, again each RECORD_RETRY_S while the store is failing:
        an outcome lost to an outage would send the notice again (on PostgreSQL, uncounted)."""
        while True:
            try:
                return await self.core.in_store(write)
            except StorageFailed as exc:
                log.warning("could not record a notice's outcome (%s); trying again", exc)
                await asyncio.sleep(RECORD_RETRY_S)

    async def _renew_leases(self) -> None:
        """Every third of a lease, extend the leases of this worker's sends in flight."""
        while True:
            await asyncio.sleep(self.lease_s / 3)
            claims = list(self._inflight.values())
            if claims:
                await self._renew(claims, self.core.clock() + self.lease_s)

    async def _renew(self, claims: list[Claim], until: float) -> None:
        try:
            held = await self.core.in_store(lambda store: store.outbox.renew(claims, until))
        except StorageFailed as exc:
            log.warning("could not renew the leases of %d notices in flight: %s", len(claims), exc)
            return
        if held < len(claims):
            log.warning("%d of %d notices in flight were claimed by another worker (their lease"
                        " ran out)", len(claims) - held, len(claims))  # fmt: skip

    async def _attempt(self, row: dict[str, Any], target: str) -> str:
        """Send once within send_timeout_s; "" on success, else a secret-free reason."""
        try:
            async with asyncio.timeout(self.send_timeout_s):
                return await self._send(row, target)
        except TimeoutError:
            return f"no answer within {self.send_timeout_s:g} s"
        except Exception as exc:  # a plugin bug must not kill the worker
            return f"sending failed: {type(exc).__name__}"

    @staticmethod
    async def _send(row: dict[str, Any], target: str) -> str:
        notifier = apprise.Apprise()
        if not notifier.add(target):
            return "the target URL no longer loads in Apprise"
        result = await notifier.async_notify(
            body=row["body"], title=row["title"], notify_type=NOTIFY_TYPES.get(row["kind"],
            apprise.NotifyType.INFO),
        )  # fmt: skip
        try:
            return "" if result else scrub(_describe(result), target)
        finally:
            result.close()


def _describe(result: apprise.AppriseResult) -> str:
    """Apprise's first warning for a failed send, else its status name."""
    for entry in result.logs():
        if entry.level in ("WARNING", "ERROR", "CRITICAL"):
            return f"{result.status.name}: {entry.message}"
    return result.status.name


def _no_target(channel: str) -> str:
    return f"no {channel} target is set for the owner (batmon user notify --{channel} URL)"
