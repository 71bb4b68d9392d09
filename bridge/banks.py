"""Battery banks: several batmons of one owner shown as one battery.

The rules live here, once: who may group which batmons (:class:`Banks`), and how a
bank's values follow from its members' (:func:`aggregate`). Values a member may get
from elsewhere (its energy counters, a capacity its device reports in ``details``) are
read through :func:`member_capacity_ah` and :func:`member_energy` only, defensively, so
the source can change without touching the rules.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from bridge.errors import NotFound
from bridge.events import BankChanged, BankDeleted

if TYPE_CHECKING:
    from bridge.core import Alarm, Batmon, Core, User
    from bridge.models import AddBank, EditBank

ENERGY_KEYS = ("energy_charged_kwh", "energy_discharged_kwh")
# A bank's values are sums and means of its members' numbers, shown in these units.
BANK_UNITS = {"soc": "%", "voltage": "V", "current": "A", "power": "W"}
Weighting = Literal["capacity", "equal"]


@dataclass
class Bank:
    """A named, ordered group of one user's batmons."""

    id: int
    user_id: int
    name: str
    batmon_ids: list[int] = field(default_factory=list)
    created: float = 0.0
    alarms: dict[int, Alarm] = field(default_factory=dict)  # on the bank's values (docs/BANKS.md)


# -- what a bank reads from its members ----------------------------------------------
@functools.lru_cache(maxsize=4096)
def _details(text: str) -> Mapping[str, Any]:
    # Details are stored as normalised JSON text; the same text parses once.
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def member_capacity_ah(batmon: Batmon) -> float | None:
    """The batmon's capacity: the owner's setting, else what the device reports in
    ``details.capacity_ah``, else None (unknown)."""
    for value in (getattr(batmon, "capacity_ah", None), _details(batmon.details).get("capacity_ah")):
        number = _number(value)
        if number is not None and number > 0:
            return number
    return None


def member_energy(batmon: Batmon) -> dict[str, float | None]:
    """The batmon's energy counters (kWh): its own where the batmon keeps them, else the
    device's in ``details``, else None."""
    details = _details(batmon.details)
    energy: dict[str, float | None] = {}
    for key in ENERGY_KEYS:
        own = _number(getattr(batmon, key, None))
        energy[key] = own if own is not None else _number(details.get(key))
    return energy


# -- the aggregation ---------------------------------------------------------------
def aggregate(bank: Bank, batmons: Mapping[int, Batmon], now: float) -> dict[str, Any]:
    """The bank object: its own status and values from its Online members.

    SoC is weighted by capacity when every Online member's is known, else a plain mean
    (Ah against a guessed weight would mean nothing); ``bank_soc_weighting`` says which.
    Current and power are summed and voltage averaged over Online members; with none
    Online they are null. Energy counters are summed over every member, Offline ones
    too: a sum that fell whenever a pack went quiet would read as a meter reset.
    """
    members = [batmons[i] for i in bank.batmon_ids if i in batmons]
    online = [b for b in members if b.status_at(now) == "Online"]
    online_ids = {b.id for b in online}
    capacities = [member_capacity_ah(b) for b in online]
    weighting: Weighting = "capacity" if online and None not in capacities else "equal"
    soc = voltage = current = power = None
    if online:
        weights = [c or 0.0 for c in capacities] if weighting == "capacity" else [1.0] * len(online)
        soc = sum(b.soc * w for b, w in zip(online, weights, strict=True)) / sum(weights)
        voltage = sum(b.voltage for b in online) / len(online)
        current = sum(b.current for b in online)
        power = sum(b.power for b in online)
    energy: dict[str, float | None] = dict.fromkeys(ENERGY_KEYS)
    for member in members:
        for key, value in member_energy(member).items():
            if value is not None:
                energy[key] = (energy[key] or 0.0) + value
    return {
        "bank_id": bank.id,
        "bank_name": bank.name,
        "batmon_ids": list(bank.batmon_ids),
        "bank_status": "Online" if online else "Offline",
        "bank_soc": soc,
        "bank_soc_weighting": weighting,
        "bank_voltage": voltage,
        "bank_current": current,
        "bank_power": power,
        **energy,
        "offline_batmon_ids": [b.id for b in members if b.id not in online_ids],
    }


# -- the registry ----------------------------------------------------------------------
class Banks:
    """Every user's banks in memory, their durable copy in the store; emits bank events.

    A bank holds only its owner's batmons; others' batmons and banks do not exist for a
    user (404), exactly as the batmon endpoints refuse them.
    """

    def __init__(self, core: Core) -> None:
        self.core = core
        self._banks: dict[int, Bank] = {}
        self._by_member: dict[int, set[int]] = {}
        # Owners of banks deleted during this run: their clearing messages still reach them.
        self._deleted_owners: dict[int, int] = {}

    def load(self) -> None:
        """Fill memory from the store (at start)."""
        self.reload(self.core.store.banks())

    def reload(self, rows: list[dict[str, Any]]) -> None:
        """Hold exactly these stored banks (another worker changed one): memory only, no event."""
        self._banks.clear()
        self._by_member.clear()
        for row in rows:
            ids = [i for i in row["batmon_ids"] if i in self.core.batmons]
            bank = Bank(row["id"], row["user_id"], row["name"], ids, row["created"])
            bank.alarms = {a.id: a for a in self.core.alarms.values() if a.bank_id == bank.id}
            self._remember(bank)

    # -- reading --------------------------------------------------------------------
    def get(self, bank_id: int) -> Bank | None:
        """A bank by id, whoever owns it (for the doors' own checks)."""
        return self._banks.get(bank_id)

    def all(self) -> list[Bank]:
        """Every bank, oldest first."""
        return list(self._banks.values())

    def of_user(self, user: User) -> list[Bank]:
        """The user's banks, oldest first."""
        return [b for b in self._banks.values() if b.user_id == user.id]

    def containing(self, batmon_id: int) -> list[Bank]:
        """The banks a batmon is a member of."""
        return [self._banks[i] for i in self._by_member.get(batmon_id, ())]

    def owned(self, user: User, bank_id: int) -> Bank:
        """A bank of ``user``; others' banks do not exist for them (404)."""
        bank = self._banks.get(bank_id)
        if bank is None or bank.user_id != user.id:
            raise NotFound(f"bank_id {bank_id} does not exist.")
        return bank

    def visible_to(self, user_id: int, bank_id: int) -> bool:
        """True when the user owns the bank, or owned it until it was deleted this run."""
        bank = self._banks.get(bank_id)
        owner = bank.user_id if bank is not None else self._deleted_owners.get(bank_id)
        return owner == user_id

    def known_to(self, user_id: int) -> bool:
        """True when the user has a bank, or had one deleted during this run."""
        return (any(b.user_id == user_id for b in self._banks.values())
                or user_id in self._deleted_owners.values())  # fmt: skip

    def status(self, bank: Bank) -> dict[str, Any]:
        """The bank object now (its retained MQTT state)."""
        return aggregate(bank, self.core.batmons, self.core.clock())

    def view(self, bank: Bank) -> dict[str, Any]:
        """The bank object with its alarms, as the API and the dashboard show it (the
        retained state leaves the alarms out, as a batmon's does)."""
        return {**self.status(bank), "alarms": [a.to_api() for a in bank.alarms.values()]}

    # -- changing ------------------------------------------------------------------
    def add(self, user: User, spec: AddBank) -> Bank:
        """Group some of ``user``'s batmons as a bank."""
        ids = self._own_batmons(user, spec.batmon_ids)
        bank = Bank(self.core.new_id(), user.id, spec.bank_name, ids, self.core.clock())
        self.core.persist(lambda store: store.add_bank(bank.id, bank.user_id, bank.name, bank.created, ids))
        self._remember(bank)
        self.core.bus.emit(BankChanged(bank, created=True))
        return bank

    def edit(self, bank: Bank, spec: EditBank) -> None:
        """Rename it and/or replace its members; all checked before anything changes."""
        changes = spec.changes()
        ids = self._own_batmons(self._owner(bank), changes["batmon_ids"]) if "batmon_ids" in changes else None
        if "bank_name" in changes:
            name = changes["bank_name"]
            self.core.persist(lambda store: store.rename_bank(bank.id, name))
            bank.name = changes["bank_name"]
        if ids is not None:
            members = list(ids)
            self.core.persist(lambda store: store.set_bank_members(bank.id, members))
            self._forget_members(bank)
            bank.batmon_ids = ids
            self._index_members(bank)
        if changes:
            self.core.bus.emit(BankChanged(bank))

    def delete(self, bank: Bank) -> None:
        """Delete a bank with its alarms; its batmons stay as they are."""
        self.core.persist(lambda store: store.delete_bank(bank.id))
        self.core.retire_ids(bank.id, *bank.alarms)
        for alarm_id in bank.alarms:
            self.core.alarms.pop(alarm_id, None)
        self._forget_members(bank)
        self._banks.pop(bank.id, None)
        self._deleted_owners[bank.id] = bank.user_id
        self.core.bus.emit(BankDeleted(bank))

    def batmon_deleted(self, batmon_id: int) -> None:
        """A deleted batmon leaves its banks (the store's cascade removed its rows)."""
        for bank in self.containing(batmon_id):
            bank.batmon_ids = [i for i in bank.batmon_ids if i != batmon_id]
            self.core.bus.emit(BankChanged(bank))
        self._by_member.pop(batmon_id, None)

    # -- inside ------------------------------------------------------------------------
    def _owner(self, bank: Bank) -> User:
        user = self.core.user_by_id(bank.user_id)
        if user is None:
            raise NotFound(f"bank_id {bank.id} does not exist.")
        return user

    def _own_batmons(self, user: User, batmon_ids: list[int]) -> list[int]:
        for batmon_id in batmon_ids:
            self.core.owned(user, batmon_id)  # 404 for another user's batmon, as everywhere
        return list(batmon_ids)

    def _remember(self, bank: Bank) -> None:
        self._banks[bank.id] = bank
        self._index_members(bank)

    def _index_members(self, bank: Bank) -> None:
        for batmon_id in bank.batmon_ids:
            self._by_member.setdefault(batmon_id, set()).add(bank.id)

    def _forget_members(self, bank: Bank) -> None:
        for batmon_id in bank.batmon_ids:
            self._by_member.get(batmon_id, set()).discard(bank.id)
