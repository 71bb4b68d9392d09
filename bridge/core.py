"""The bridge core: the in-memory registry of users, batmons and alarms, the
ownership and credential rules, and the one ingest path both doors call.

Memory holds current values and credentials so a reading costs no SELECT; the
store (bridge/store/interface.py) is the durable copy. No SQL runs on the event loop:
readings and every control-plane write go through the writer's thread, in one ordered
queue (``_persist``); a request that must not answer before its write is on disk runs
inside ``durable_writes()`` (the facade does). Without a running loop (tools, `batmon
user`, loading at start) the same writes run at once on the core's own store handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from bridge.banks import Bank, Banks
from bridge.battery_values import VALUE_UNITS, extra_keys
from bridge.errors import Conflict, NotFound, WrongToken
from bridge.events import (
    BatmonChanged,
    BatmonDeleted,
    CommitObserved,
    CredentialsChanged,
    EventBus,
    ReadingAccepted,
    StatusChanged,
)
from bridge.history_answers import HistoryPlan, Streamed, check_size, utc_text
from bridge.history_answers import stream as stream_history
from bridge.models import MAX_SAFE_ID, AddAlarm, AddBatmon, EditAlarm, EditBatmon, HistoryQuery, Reading
from bridge.security import hash_api_key, new_api_key, new_device_token, same_secret
from bridge.store.interface import CredentialReads, CredentialRows, HistoryReads, Store
from bridge.writer import Door, Plan, ReadingWriter

log = logging.getLogger(__name__)
T = TypeVar("T")
# The writes a request has made, while it runs inside Core.durable_writes().
_DURABLE: contextvars.ContextVar[list[asyncio.Future[Any]] | None] = contextvars.ContextVar(
    "durable_writes", default=None)  # fmt: skip

Status = Literal["Online", "Offline"]
FLAGS = {"alerts": "notification_enabled", "whatsapp": "whatsapp_enabled", "sms": "sms_enabled"}
DEFAULT_UNITS = {"voltage": "V", "current": "A", "power": "W", "soc": "%", **VALUE_UNITS}


PING_FRESH_S = 1.0  # /healthz asks the database at most this often


@dataclass
class User:
    """A person with an api key (stored hashed) and notification targets."""

    id: int
    email: str
    api_key_hash: str


@dataclass
class Alarm:
    """A threshold on one metric of one batmon, or of one bank, with its trigger state."""

    id: int
    batmon_id: int | None  # None for a bank's alarm (bank_id), docs/BANKS.md
    name: str
    metric: str
    condition: str
    threshold: float
    repeat_delay: int
    enabled: bool
    triggered: bool = False
    trigger_time: float | None = None
    akn: float | None = None
    last_notice: float | None = None
    update_time: float = 0.0
    clear_value: float | None = None  # hysteresis (bridge/extensions/alarms.py)
    bank_id: int | None = None

    def to_api(self) -> dict[str, Any]:
        """The seed's alarm object plus alarm_metric and alarm_clear_value; a bank's
        alarm has bank_id where a batmon's has device_id."""
        subject = {"device_id": self.batmon_id} if self.bank_id is None else {"bank_id": self.bank_id}
        return {
            "alarm_id": self.id,
            **subject,
            "alarm_name": self.name,
            "alarm_enabled": self.enabled,
            "alarm_threshold_value": self.threshold,
            "alarm_condition": self.condition,
            "alarm_trigger_time": _epoch(self.trigger_time),
            "alarm_repeat_delay": self.repeat_delay,
            "alarm_akn": _epoch(self.akn),
            "update_time": int(self.update_time),
            "alarm_triggered": self.triggered,
            "alarm_metric": self.metric,
            "alarm_clear_value": self.clear_value,
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Alarm:
        return cls(**{**row, "enabled": bool(row["enabled"]), "triggered": bool(row["triggered"])})


@dataclass
class Batmon:
    """A battery monitor: its settings, current values and last announced status."""

    id: int
    user_id: int
    name: str
    type: str
    token: str
    update_period: int
    created: float
    voltage: float = 0.0
    current: float = 0.0
    power: float = 0.0
    soc: float = 0.0
    details: str = "{}"
    last_reading: float | None = None
    # The status last announced (events, MQTT, notices); the API computes it afresh.
    status: Status = "Offline"
    notification_enabled: bool = True
    whatsapp_enabled: bool = False
    sms_enabled: bool = False
    voltage_units: str = ""
    current_units: str = ""
    power_units: str = ""
    soc_units: str = ""
    capacity_ah: float | None = None  # the owner's setting; see member_capacity_ah
    # Energy counters and their integration state (bridge/energy.py); the writer
    # changes them with the readings, in the same transaction.
    energy_charged_kwh: float = 0.0
    energy_discharged_kwh: float = 0.0
    energy_point_ts: float | None = None
    energy_point_power: float | None = None
    device_charged_kwh: float | None = None
    device_discharged_kwh: float | None = None
    alarms: dict[int, Alarm] = field(default_factory=dict)

    def status_at(self, now: float) -> Status:
        """Online while the latest reading is younger than update_period."""
        if self.last_reading is not None and now - self.last_reading < self.update_period:
            return "Online"
        return "Offline"

    def unit(self, metric: str) -> str:
        """The unit a metric is shown in: the batmon's own, else V, A, W or %."""
        return getattr(self, f"{metric}_units", "") or DEFAULT_UNITS.get(metric, "")

    @property
    def deadline(self) -> float | None:
        """When the batmon goes Offline without another reading."""
        return None if self.last_reading is None else self.last_reading + self.update_period

    @property
    def last_modified(self) -> int:
        """Epoch seconds of the latest reading, else of creation."""
        return int(self.last_reading if self.last_reading is not None else self.created)

    def to_api(self, now: float) -> dict[str, Any]:
        """The batmon object of the seed's list/status examples, plus the battery values."""
        return {
            "batmon_id": self.id,
            "batmon_name": self.name,
            "batmon_type": self.type,
            "batmon_status": self.status_at(now),
            "batmon_voltage": self.voltage,
            "batmon_current": self.current,
            "batmon_power": self.power,
            "batmon_soc": self.soc,
            "batmon_details": self.details,
            "update_period": self.update_period,
            "last_modified": self.last_modified,
            "batmon_token": self.token,
            "notification_enabled": self.notification_enabled,
            "alarms": [a.to_api() for a in self.alarms.values()],
            "whatsapp_enabled": self.whatsapp_enabled,
            "sms_enabled": self.sms_enabled,
            "voltage_units": self.voltage_units,
            "current_units": self.current_units,
            "power_units": self.power_units,
            "soc_units": self.soc_units,
            **extra_keys(self),  # beyond the seed: energy counters, temperature, cells...
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Batmon:
        values = {k: v for k, v in row.items() if k in cls.__dataclass_fields__}
        for flag in FLAGS.values():
            values[flag] = bool(values[flag])
        return cls(**values)


class Peers(Protocol):
    """Other workers on the same database (bridge/extensions/peers.py)."""

    async def catch_up(self, batmon_ids: Sequence[int] = ()) -> None:
        """Take in every change committed elsewhere before now, and these batmons' latest values."""


@dataclass(frozen=True)
class CredentialMaps:
    """The registry's credential lookups, built from stored rows on any thread."""

    version: int
    users_by_key: dict[str, User]
    users_by_id: dict[int, User]
    token_holders: dict[str, int]
    """An MQTT token's secret hash -> its user's id."""

    @classmethod
    def of(cls, rows: CredentialRows) -> CredentialMaps:
        users = [User(id=r["id"], email=r["email"], api_key_hash=r["api_key_hash"]) for r in rows.users]
        return cls(
            version=rows.version,
            users_by_key={u.api_key_hash: u for u in users},
            users_by_id={u.id: u for u in users},
            token_holders={r["secret_hash"]: r["user_id"] for r in rows.tokens},
        )


class Core:
    """Owns every rule about users, batmons, readings and alarms; emits events."""

    def __init__(self, store: Store, bus: EventBus, clock: Callable[[], float] = time.time,
                 max_history_rows: int | None = None,
                 open_writer_store: Callable[[], Store] | None = None) -> None:  # fmt: skip
        # The core's own handle: loading at start and tools (no loop running) only.
        self.store = store
        self.bus = bus
        self.clock = clock
        # History answers stream with flat memory, so by default there is no cap; one
        # may be set (a raw answer over it is a 400 asking to narrow the range).
        self.max_history_rows = max_history_rows
        self._history_reader: HistoryReads | None = None
        self.batmons: dict[int, Batmon] = {}
        self.alarms: dict[int, Alarm] = {}
        self._users_by_key: dict[str, User] = {}
        self._users_by_id: dict[int, User] = {}
        # Users' MQTT-only tokens (Home Assistant): secret hash -> user id.
        self._token_holders: dict[str, int] = {}
        self.credentials_version = -1
        """The store's credential change counter this memory reflects (-1: never loaded)."""
        self._refreshing: asyncio.Future[None] | None = None  # the refresh_credentials() under way
        # Who owned each batmon deleted during this run: the clearing of its retained
        # topics (discovery, state) must still reach that owner's subscribers.
        self._deleted_owners: dict[int, int] = {}
        # One thread at a time on the core's own handle (read_store's workers, tools).
        self._own_handle = threading.Lock()
        self._pinged: tuple[float, bool] | None = None  # (monotonic time, answered) of the last ping
        # Ids of deleted batmons and alarms: a new id is never one of them.
        self._retired_ids: set[int] = set()
        # Every reading and control-plane write is committed by this one writer, off the loop,
        # on a store handle of its own.
        self.writer = ReadingWriter(open_writer_store or store.another, self._apply_committed)
        self.banks = Banks(self)
        # Set while other workers share the database (PostgreSQL): a request is answered
        # after catching up with them. None alone (SQLite): no query added anywhere.
        self.peers: Peers | None = None

    def close(self) -> None:
        """Stop the writer (after what it holds) and the history workers; close the store."""
        self.writer.stop()
        self.close_history()
        self.store.close()

    def load(self) -> Core:
        """Fill the registry from the store (at start); resume purging deleted batmons."""
        self._retired_ids = self.store.retired_ids()
        self.replace_credentials(self.store.credentials.load())
        for row in self.store.batmons():
            batmon = Batmon.from_row(row)
            self.batmons[batmon.id] = batmon
        self.banks.load()
        for row in self.store.alarms():
            alarm = Alarm.from_row(row)
            if (subject := self.alarm_subject(alarm)) is not None:
                self.alarms[alarm.id] = alarm
                subject.alarms[alarm.id] = alarm
        # A delete cut short by a stop: its readings go on being purged, off the loop.
        self.writer.purge(self.store.deleted_with_data())
        return self

    # -- where writes run ------------------------------------------------------
    def persist(self, write: Callable[[Store], Any]) -> None:
        """Make a control-plane write durable, in order with the readings.

        On an event loop it goes to the writer's thread: inside durable_writes() the
        request waits for it, elsewhere (event handlers, the watchdog) a failure is
        logged and memory stays as changed. With no loop running it runs at once.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            write(self.store)
            return
        future = self.writer.call(write)
        waiting = _DURABLE.get()
        if waiting is not None:
            waiting.append(future)
        else:
            future.add_done_callback(_log_failed_write)

    @contextlib.asynccontextmanager
    async def durable_writes(self) -> AsyncIterator[None]:
        """Within the block, writes are only queued; leaving it waits until they are
        committed and raises the first failure (StorageFailed, Conflict)."""
        waiting: list[asyncio.Future[Any]] = []
        token = _DURABLE.set(waiting)
        try:
            yield
        finally:
            _DURABLE.reset(token)
            if waiting:
                results = await asyncio.gather(*waiting, return_exceptions=True)
                failed = next((r for r in results if isinstance(r, BaseException)), None)
                if failed is not None:
                    raise failed

    async def in_store(self, fn: Callable[[Store], T]) -> T:
        """Run ``fn(store)`` on the writer's thread, after every write queued before it."""
        return await self.writer.call(fn)

    async def read_store(self, fn: Callable[[Store], T]) -> T:
        """Run a read ``fn(store)`` on a worker thread, on the core's own handle (idle once the
        loop serves): behind no write and no history page, unlike ``in_store``."""

        def locked() -> T:
            with self._own_handle:
                return fn(self.store)

        return await asyncio.to_thread(locked)

    async def ping(self) -> bool:
        """True when the database answered, asked off the loop at most once per PING_FRESH_S.

        /healthz is polled often, and each ask crosses to a worker thread and back, waiting
        for the GIL behind the writer's thread. A fresh answer costs nothing; the writer's own
        health is never cached.
        """
        now = time.monotonic()
        if self._pinged is not None and now - self._pinged[0] < PING_FRESH_S:
            return self._pinged[1]
        answered = await self.read_store(lambda store: store.ping())
        self._pinged = (time.monotonic(), answered)
        return answered

    def new_id(self) -> int:
        """A random id below 2^53 that no batmon, alarm or bank has or ever had (the store
        refuses a retired one too: Conflict)."""
        while True:
            candidate = secrets.randbelow(MAX_SAFE_ID) + 1
            if (candidate not in self.batmons and candidate not in self.alarms
                    and self.banks.get(candidate) is None
                    and candidate not in self._retired_ids):  # fmt: skip
                return candidate

    def retire_ids(self, *ids: int) -> None:
        """Ids deleted now: never handed out again (the store keeps them too)."""
        self._retired_ids.update(ids)

    # -- users ---------------------------------------------------------------
    def create_user(self, email: str) -> tuple[User, str]:
        """Make a user and return it with its api key (the only time it is shown).

        For tools (`batmon user add`) and tests, with no loop running: on the core's own
        handle. While the loop serves, ``create_user_off_loop``.
        """
        row, api_key = _insert_user(self.store, email, self.clock())
        return self._remember_user(row), api_key

    async def create_user_off_loop(self, email: str) -> tuple[User, str]:
        """``create_user`` while the loop serves (serve's first admin): the insert runs on
        the writer's lane, memory is updated back on the loop."""
        created = self.clock()
        row, api_key = await self.in_store(lambda store: _insert_user(store, email, created))
        return self._remember_user(row), api_key

    def _user_by_email(self, email: str) -> User:
        row = self.store.user_by_email(email.lower())
        if row is None:
            raise NotFound(f"no user with email {email}")
        return self._remember_user(row)

    def reset_api_key(self, email: str) -> str:
        """Give the user a new api key (shown once); the old one matches nothing from now on."""
        user = self._user_by_email(email)
        api_key = new_api_key()
        self.store.credentials.set_api_key_hash(user.id, hash_api_key(api_key))
        self._users_by_key.pop(user.api_key_hash, None)
        user.api_key_hash = hash_api_key(api_key)
        self._users_by_key[user.api_key_hash] = user
        return api_key

    def add_mqtt_token(self, email: str, name: str) -> str:
        """Make an MQTT-only secret for the user (Home Assistant), shown once; stored hashed."""
        user = self._user_by_email(email)
        secret = new_api_key()
        if not self.store.credentials.add_token(user.id, name, hash_api_key(secret), self.clock()):
            raise Conflict(f"a token named {name} of {user.email} exists already: revoke it,"
                           " or choose another --name")  # fmt: skip
        self._token_holders[hash_api_key(secret)] = user.id
        return secret

    def mqtt_tokens(self, email: str) -> list[dict[str, Any]]:
        """The user's tokens: name and creation time, never a secret."""
        return self.store.credentials.tokens_of(self._user_by_email(email).id)

    def revoke_mqtt_token(self, email: str, name: str) -> None:
        """Delete the user's token of that name; a running server drops its sessions."""
        user = self._user_by_email(email)
        if not self.store.credentials.revoke_token(user.id, name):
            raise NotFound(f"{user.email} has no token named {name}")
        self.replace_credentials(self.store.credentials.load())

    # Lookups answer from memory only: never a query on the event loop. A user made or
    # changed by another process (`batmon user ...` beside serve, another worker) arrives
    # with the credential watcher's next poll (once a second), or at once when a door that
    # met an unknown secret awaits refresh_credentials() and asks again.
    def user_for_api_key(self, api_key: str) -> User | None:
        """The user this api key belongs to, or None (memory only)."""
        return self._users_by_key.get(hash_api_key(api_key))

    def user_by_id(self, user_id: int) -> User | None:
        """A user by id (session cookies carry the id; memory only)."""
        return self._users_by_id.get(user_id)

    def user_has_data(self) -> bool:
        """True once any user exists (``serve`` creates admin@localhost otherwise); load()
        read every user."""
        return bool(self._users_by_id)

    async def refresh_credentials(self) -> bool:
        """Reload keys and tokens now if the store's change counter moved (read off the loop,
        on the core's own handle); True when they changed. Callers at the same moment share
        one read, so a burst of unknown secrets costs one query, not one each. True too when
        the watcher's poll swapped them in meanwhile."""
        before = self.credentials_version
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh_credentials())
        await asyncio.shield(self._refreshing)
        return self.credentials_version != before

    async def _refresh_credentials(self) -> None:
        known = self.credentials_version
        try:
            maps = await self.read_store(lambda store: changed_credentials(store.credentials, known))
        except Exception as exc:  # the watcher reports outages; here the secret stays unknown
            log.debug("cannot refresh credentials: %s", exc)
            return
        self.adopt_credentials(maps)

    def adopt_credentials(self, maps: CredentialMaps | None) -> bool:
        """Swap in credentials read off the loop (None: unchanged), unless memory is already
        at their version; announce CredentialsChanged (the broker ends sessions whose secret
        is gone). True when they changed."""
        if maps is None or maps.version == self.credentials_version:
            return False
        self.replace_credentials(maps)
        log.info("credentials changed in the database: reloaded keys and tokens")
        self.bus.emit(CredentialsChanged(maps.version))
        return True

    def replace_credentials(self, rows: CredentialRows | CredentialMaps) -> None:
        """Hold exactly these users' keys and tokens (at start, and when another process
        changed one: a reset key or a revoked token matches nothing from now on).

        Given maps built beforehand (off the loop), this is a swap of three references.
        """
        maps = rows if isinstance(rows, CredentialMaps) else CredentialMaps.of(rows)
        self._users_by_key, self._users_by_id = maps.users_by_key, maps.users_by_id
        self._token_holders = maps.token_holders
        self.credentials_version = maps.version

    def _remember_user(self, row: dict[str, Any]) -> User:
        user = User(id=row["id"], email=row["email"], api_key_hash=row["api_key_hash"])
        self._users_by_key[user.api_key_hash] = user
        self._users_by_id[user.id] = user
        return user

    # -- credentials (also the embedded broker's CredentialCheck) -------------
    def check_device(self, batmon_id: int, token: str) -> bool:
        """True when ``token`` is this batmon's token (constant-time compare)."""
        batmon = self.batmons.get(batmon_id)
        return batmon is not None and same_secret(token, batmon.token)

    def check_user(self, email: str, secret: str) -> int | None:
        """The user id for an email + (api key or MQTT token) pair, else None."""
        holder = self.credential_holder(hash_api_key(secret))
        user = self._users_by_id.get(holder) if holder is not None else None
        return user.id if user is not None and user.email == email.lower() else None

    def credential_holder(self, secret_hash: str) -> int | None:
        """The user id holding this api key or MQTT token now (memory only), else None."""
        user = self._users_by_key.get(secret_hash)
        return user.id if user is not None else self._token_holders.get(secret_hash)

    def owns(self, user_id: int, batmon_id: int) -> bool:
        """True when the batmon exists and belongs to the user."""
        batmon = self.batmons.get(batmon_id)
        return batmon is not None and batmon.user_id == user_id

    def owns_bank(self, user_id: int, bank_id: int) -> bool:
        """True when the user owns the bank, or owned it until it was deleted this run."""
        return self.banks.visible_to(user_id, bank_id)

    def owned_until_deleted(self, user_id: int, batmon_id: int) -> bool:
        """True when the user owned this batmon until it was deleted (during this run)."""
        return self._deleted_owners.get(batmon_id) == user_id

    def device(self, batmon_id: int, token: str) -> Batmon:
        """The batmon a device names with id + token; 404 unknown, 403 wrong token."""
        batmon = self.batmons.get(batmon_id)
        if batmon is None:
            raise NotFound(f"batmon_id {batmon_id} does not exist.")
        if not same_secret(token, batmon.token):
            raise WrongToken(f"batmon_token does not match batmon_id {batmon_id}.")
        return batmon

    def owned(self, user: User, batmon_id: int, token: str | None = None) -> Batmon:
        """A batmon of ``user``; others' batmons do not exist for them (404).

        A token given alongside must match (a guard against a mistyped id).
        """
        batmon = self.batmons.get(batmon_id)
        if batmon is None or batmon.user_id != user.id:
            raise NotFound(f"batmon_id {batmon_id} does not exist.")
        if token is not None and not same_secret(token, batmon.token):
            raise WrongToken(f"batmon_token does not match batmon_id {batmon_id}.")
        return batmon

    # -- batmons -------------------------------------------------------------
    def batmons_of(self, user: User) -> list[Batmon]:
        """The user's batmons, oldest first."""
        return [b for b in self.batmons.values() if b.user_id == user.id]

    def add_batmon(self, user: User, spec: AddBatmon) -> Batmon:
        """Create a batmon for ``user``; a token is generated when none is given."""
        batmon = Batmon(
            id=self.new_id(),
            user_id=user.id,
            name=spec.batmon_name,
            type=spec.batmon_type,
            token=spec.batmon_token or new_device_token(),
            update_period=spec.update_period,
            created=self.clock(),
        )
        row = {k: getattr(batmon, k) for k in Batmon.__dataclass_fields__ if k != "alarms"}
        self.persist(lambda store: store.add_batmon(row))
        self.batmons[batmon.id] = batmon
        self.bus.emit(BatmonChanged(batmon, created=True))
        return batmon

    def edit_batmon(self, batmon: Batmon, edit: EditBatmon) -> None:
        """Apply the fields given; a new token retires the old one at once."""
        names = {"batmon_name": "name", "batmon_type": "type", "batmon_token": "token"}
        changes = {names.get(k, k): v for k, v in edit.changes().items()}
        if not changes:
            return
        old_token = batmon.token if changes.get("token", batmon.token) != batmon.token else None
        now = self.clock()
        previous = batmon.status
        if "update_period" in changes and batmon.last_reading is not None:
            # A longer period can make an Offline batmon Online again (a shorter
            # one is the watchdog's to notice); announce it like any change.
            online = now - batmon.last_reading < changes["update_period"]
            changes["status"] = "Online" if online else previous
        self.persist(lambda store: store.update_batmon(batmon.id, changes))
        for name, value in changes.items():
            setattr(batmon, name, value)
        self.bus.emit(BatmonChanged(batmon, old_token=old_token))
        if batmon.status != previous:
            self.bus.emit(StatusChanged(batmon, batmon.status, previous, now))

    def set_flag(self, batmon: Batmon, flag: str, enabled: bool) -> None:
        """Enable or disable alerts, WhatsApp or SMS notices for a batmon."""
        column = FLAGS[flag]
        self.persist(lambda store: store.update_batmon(batmon.id, {column: int(enabled)}))
        setattr(batmon, column, enabled)

    async def delete_batmon(self, batmon: Batmon) -> None:
        """Delete a batmon with its alarms at once; its id is never reused.

        Its readings and rollups are purged afterwards by the writer, a chunk per
        transaction between reading groups (a restart resumes), so the answer does not
        wait for them and no request waits behind them.
        """
        # Out of memory first, so no door can submit for it; the delete is queued
        # behind what was submitted, so no reading lands after it.
        self.batmons.pop(batmon.id, None)
        try:
            await self.writer.call(lambda store: store.delete_batmon(batmon.id))
        except BaseException:
            self.batmons[batmon.id] = batmon  # still stored: still there
            raise
        self.forget_deleted(batmon)
        self.writer.purge([batmon.id])
        self.banks.batmon_deleted(batmon.id)
        self.bus.emit(BatmonDeleted(batmon))

    def forget_deleted(self, batmon: Batmon) -> None:
        """Memory only: the batmon and its alarms are gone from the store (here or on another
        worker); its ids are never handed out again."""
        self.batmons.pop(batmon.id, None)
        self._deleted_owners[batmon.id] = batmon.user_id
        self.retire_ids(batmon.id, *batmon.alarms)
        self.writer.forget(batmon.id)
        for alarm_id in batmon.alarms:
            self.alarms.pop(alarm_id, None)

    # -- readings ------------------------------------------------------------
    def submit_readings(self, batmon: Batmon, readings: Iterable[Reading], door: Door = "http"
                        ) -> asyncio.Future[None]:  # fmt: skip
        """The one ingest path of HTTP and MQTT: queue readings for the writer.

        The future resolves once they are committed and applied (memory updated,
        events emitted); it fails with Unavailable when they could not be stored.
        Raises Overloaded at once when the writer's queue is full.
        """
        now = self.clock()
        rows = sorted(((r.ts if r.ts is not None else now, r.values()) for r in readings),
                      key=lambda item: item[0])  # fmt: skip
        return self.writer.submit(batmon, rows, now, door)

    def writer_health(self) -> dict[str, Any]:
        """The writer's state for /healthz: failing while its last commit failed."""
        stats = self.writer.stats
        return {
            "state": "failing" if stats.failing else "ok",
            "queued_rows": self.writer.pending_rows,
            "commits": stats.commits,
            "rows": stats.rows,
            "failed_commits": stats.failed_commits,
            "refused_overloaded": self.writer.refused_overloaded,
            "last_error": stats.last_error,
            "last_error_at": None if stats.last_error_at is None else int(stats.last_error_at),
        }

    async def ingest_readings(self, batmon: Batmon, readings: Iterable[Reading],
                              door: Door = "http") -> None:  # fmt: skip
        """Submit readings and return once they are committed (see submit_readings)."""
        await self.submit_readings(batmon, readings, door)

    def _apply_committed(self, plans: Sequence[Plan]) -> None:
        """After a commit, on the loop: current values into memory, then events.

        Readings are applied in time order; one older than the latest went into
        history only (the writer decided that, against what was pending too).
        """
        for plan in plans:
            if plan.commit is not None:
                self.bus.emit(CommitObserved(*plan.commit))
            batmon = plan.batmon
            if self.batmons.get(batmon.id) is not batmon:
                continue  # deleted meanwhile: nobody to tell
            first_reading = batmon.last_reading is None
            previous = batmon.status
            for name, value in plan.current.items():
                setattr(batmon, name, value)
            for (ts, values), is_current in zip(plan.rows, plan.current_flags, strict=True):
                self.bus.emit(ReadingAccepted(batmon, values, ts, is_current, plan.door))
            if plan.status_by_store:  # several workers: the database said who changed it
                if plan.status_before is None:
                    continue
                was, was_reading = plan.status_before
                previous, first_reading = ("Online" if was == "Online" else "Offline"), was_reading is None
            elif batmon.status == previous:
                continue
            self.bus.emit(StatusChanged(batmon, batmon.status, previous, plan.received,
                                        first_reading=first_reading))  # fmt: skip

    def expire_if_due(self, batmon_id: int) -> bool:
        """Announce Offline if the batmon's deadline has passed; True if it changed."""
        batmon = self.batmons.get(batmon_id)
        now = self.clock()
        if batmon is None or batmon.status != "Online" or batmon.status_at(now) == "Online":
            return False
        self.persist(lambda store: store.update_batmon(batmon.id, {"status": "Offline"}))
        batmon.status = "Offline"
        self.bus.emit(StatusChanged(batmon, "Offline", "Online", now))
        return True

    @property
    def history_reader(self) -> HistoryReads:
        """The store's history workers (a thread pool), made on first use."""
        if self._history_reader is None:
            self._history_reader = self.store.history_reader()
        return self._history_reader

    def close_history(self) -> None:
        """Stop the history workers and close their connections."""
        if self._history_reader is not None:
            self._history_reader.close()
            self._history_reader = None

    async def stream_history(self, batmons: Iterable[Batmon], query: HistoryQuery) -> Streamed:
        """History per batmon as a stream (JSON envelope or CSV), raw or in buckets.

        Both ends are inclusive at whole-second precision; every read runs off the loop.
        """
        plan = HistoryPlan.of(query, self.clock())
        batmons = list(batmons)
        await check_size(self.history_reader, batmons, plan, self.max_history_rows)
        return stream_history(self.history_reader, batmons, plan)

    def history(self, batmons: Iterable[Batmon], min_ts: float, max_ts: float | None
                ) -> list[dict[str, Any]]:  # fmt: skip
        """Raw history as a list, read on the calling thread: for tools and tests only."""
        upper = int(max_ts if max_ts is not None else self.clock()) + 1
        result = []
        for batmon in batmons:
            rows = self.history_reader.raw_rows(batmon.id, min_ts, upper)
            result.append({
                "batmon_id": batmon.id,
                "batmon_name": batmon.name,
                "batmon_type": batmon.type,
                "min_time": int(rows[0][0]) if rows else None,
                "max_time": int(rows[-1][0]) if rows else None,
                "data": [
                    {"batmon_voltage": v, "batmon_current": c, "batmon_power": p,
                     "batmon_soc": s, "batmon_details": d, "update_time": utc_text(ts)}
                    for ts, v, c, p, s, d in rows
                ],
            })  # fmt: skip
        return result

    # -- alarms --------------------------------------------------------------
    def alarm_subject(self, alarm: Alarm) -> Batmon | Bank | None:
        """The batmon or bank the alarm is on (None once that is gone)."""
        if alarm.bank_id is not None:
            return self.banks.get(alarm.bank_id)
        return self.batmons.get(alarm.batmon_id) if alarm.batmon_id is not None else None

    def owned_alarm(self, user: User, alarm_id: int) -> Alarm:
        """An alarm on one of ``user``'s batmons or banks, else 404."""
        alarm = self.alarms.get(alarm_id)
        subject = self.alarm_subject(alarm) if alarm is not None else None
        if alarm is None or subject is None or subject.user_id != user.id:
            raise NotFound(f"alarm_id {alarm_id} does not exist.")
        return alarm

    def add_alarm(self, subject: Batmon | Bank, spec: AddAlarm) -> Alarm:
        """Create an alarm on a batmon or a bank; it is evaluated from the next reading on."""
        on_bank = isinstance(subject, Bank)
        alarm = Alarm(
            id=self.new_id(),
            batmon_id=None if on_bank else subject.id,
            bank_id=subject.id if on_bank else None,
            name=spec.alarm_name,
            metric=spec.alarm_metric,
            condition=spec.alarm_condition,
            threshold=spec.alarm_threshold_value,
            clear_value=spec.alarm_clear_value,
            repeat_delay=spec.alarm_repeat_delay,
            enabled=spec.alarm_enabled,
            update_time=self.clock(),
        )
        row = {k: getattr(alarm, k) for k in Alarm.__dataclass_fields__}
        self.persist(lambda store: store.add_alarm(row))
        self.alarms[alarm.id] = alarm
        subject.alarms[alarm.id] = alarm
        return alarm

    def edit_alarm(self, alarm: Alarm, edit: EditAlarm) -> None:
        """Apply the fields given."""
        names = {
            "alarm_name": "name", "alarm_metric": "metric", "alarm_condition": "condition",
            "alarm_threshold_value": "threshold", "alarm_repeat_delay": "repeat_delay",
            "alarm_clear_value": "clear_value",
            "alarm_enabled": "enabled",
        }  # fmt: skip
        changes = {names[k]: v for k, v in edit.changes().items()}
        if not changes:
            return
        if changes.get("enabled") is False or changes.get("metric", alarm.metric) != alarm.metric:
            # A disabled or re-aimed alarm starts afresh, not stuck "triggered".
            changes.update(triggered=False, trigger_time=None, akn=None, last_notice=None)
        changes["update_time"] = self.clock()
        self.update_alarm_state(alarm, changes)

    def update_alarm_state(self, alarm: Alarm, changes: dict[str, Any]) -> None:
        """Apply alarm changes and make them durable (also used by the alarm evaluator)."""
        changes = dict(changes)
        self.persist(lambda store: store.update_alarm(alarm.id, changes))
        for name, value in changes.items():
            setattr(alarm, name, value)

    def ack_alarm(self, alarm: Alarm) -> None:
        """Acknowledge: no repeated notices until the alarm clears and triggers again."""
        self.update_alarm_state(alarm, {"akn": self.clock()})

    def delete_alarm(self, alarm: Alarm) -> None:
        """Delete an alarm; its id is never reused."""
        self.persist(lambda store: store.delete_alarm(alarm.id))
        self.retire_ids(alarm.id)
        self.alarms.pop(alarm.id, None)
        subject = self.alarm_subject(alarm)
        if subject is not None:
            subject.alarms.pop(alarm.id, None)


def changed_credentials(reads: CredentialReads, known: int) -> CredentialMaps | None:
    """On a worker thread: every credential, ready to swap in, if the change counter moved
    past ``known``; else None (one small query)."""
    if reads.version() == known:
        return None
    return CredentialMaps.of(reads.load())


def _insert_user(store: Store, email: str, created: float) -> tuple[dict[str, Any], str]:
    """Insert a user with a new api key, on any thread: (its row, the key in clear)."""
    api_key = new_api_key()
    try:
        user_id = store.add_user(email, hash_api_key(api_key), created)
    except Conflict:
        raise Conflict(f"a user with email {email} exists already") from None
    return {"id": user_id, "email": email, "api_key_hash": hash_api_key(api_key)}, api_key


def _log_failed_write(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("a control-plane write failed: %s", future.exception())


def _epoch(ts: float | None) -> int | None:
    return None if ts is None else int(ts)
