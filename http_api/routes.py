"""The route table: every endpoint of the documented API, in one place.

Paths are exactly the seed's. Reads answer GET and POST (the seed sends JSON
bodies on GETs, which some clients cannot); changes are POST only, so a
prefetched or cross-site link cannot change anything.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from bridge.models import (
    AddAlarm,
    AddBank,
    AddBatmon,
    AlarmRef,
    BankRef,
    DeviceRef,
    EditAlarm,
    EditBank,
    EditBatmon,
    HistoryQuery,
    NoFields,
    NotificationTargets,
    ShowTargets,
    UpdateRequest,
)
from http_api import handlers as h

READ = ("GET", "POST")
WRITE = ("POST",)


@dataclass(frozen=True)
class Endpoint:
    """One documented endpoint: its input model is both validator and OpenAPI schema."""

    path: str
    methods: tuple[str, ...]
    model: type[BaseModel]
    handler: Callable[[h.Call, Any], Awaitable[Any]]
    summary: str
    device_access: bool = False  # batmon_id + batmon_token may stand in for the owner


ENDPOINTS: list[Endpoint] = [
    Endpoint("/interface/add/batmon", WRITE, AddBatmon, h.add_batmon, "Add a batmon"),
    Endpoint("/interface/batmon/count", READ, NoFields, h.count_batmons, "Count your batmons"),
    Endpoint("/interface/batmon/list", READ, NoFields, h.list_batmons, "List your batmons"),
    Endpoint("/interface/batmon/status", READ, DeviceRef, h.batmon_status,
             "One batmon's status", device_access=True),
    Endpoint("/interface/update/batmon", WRITE, UpdateRequest, h.update_batmon,
             "Send a reading", device_access=True),
    Endpoint("/interface/batmon/history", READ, HistoryQuery, h.batmon_history,
             "Readings in a time range", device_access=True),
    Endpoint("/interface/edit/batmon", WRITE, EditBatmon, h.edit_batmon, "Edit a batmon"),
    Endpoint("/interface/delete/batmon", WRITE, DeviceRef, h.delete_batmon, "Delete a batmon"),
    *(
        Endpoint(f"/interface/batmon/{action}/{flag}", WRITE, DeviceRef,
                 h.flag_setter(flag, action == "enable"), f"{action.title()} {flag} notices")
        for flag in ("alerts", "whatsapp", "sms")
        for action in ("enable", "disable")
    ),
    Endpoint("/interface/batmon/alarm/add", WRITE, AddAlarm, h.add_alarm, "Add an alarm"),
    Endpoint("/interface/batmon/alarm/edit", WRITE, EditAlarm, h.edit_alarm, "Edit an alarm"),
    Endpoint("/interface/batmon/alarm/delete", WRITE, AlarmRef, h.delete_alarm,
             "Delete an alarm"),
    Endpoint("/interface/batmon/alarm/ack", WRITE, AlarmRef, h.ack_alarm,
             "Acknowledge an alarm"),
    Endpoint("/interface/user/notifications", WRITE, NotificationTargets,
             h.user_notifications, "Set your notification targets"),
    Endpoint("/interface/user/notifications", ("GET",), ShowTargets,
             h.show_user_notifications, "Your notification targets, secrets masked"),
    Endpoint("/interface/user/notifications/test", WRITE, NoFields, h.send_test_notice,
             "Send a test notice to each of your notification targets"),
    Endpoint("/interface/batmon/notifications", READ, DeviceRef, h.batmon_notifications,
             "A batmon's latest notices and their delivery state"),
    # Banks (SPEC §7, docs/BANKS.md): several of your batmons shown as one battery.
    Endpoint("/interface/add/bank", WRITE, AddBank, h.add_bank, "Group some of your batmons as a bank"),
    Endpoint("/interface/bank/list", READ, NoFields, h.list_banks, "List your banks"),
    Endpoint("/interface/bank/status", READ, BankRef, h.bank_status, "One bank's status"),
    Endpoint("/interface/edit/bank", WRITE, EditBank, h.edit_bank, "Rename a bank or change its batmons"),
    Endpoint("/interface/delete/bank", WRITE, BankRef, h.delete_bank, "Delete a bank (not its batmons)"),
]  # fmt: skip
