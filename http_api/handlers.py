"""Endpoint handlers: each parses nothing and knows no HTTP, it takes the
validated model, asks the core, and returns the ``success`` payload.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bridge.banks import Bank
from bridge.core import Batmon, Core, User
from bridge.errors import InvalidInput, NotAuthenticated
from bridge.extensions.notifier import notices_view, request_test_notice, set_targets, targets_view
from bridge.history_answers import Streamed
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
    check_bank_alarm_metric,
)


@dataclass
class Call:
    """One request's caller, as the handlers need it."""

    core: Core
    user: User | None

    def owner(self) -> User:
        """The authenticated user, else 401."""
        if self.user is None:
            raise NotAuthenticated(
                "Authentication required: give api_key (or log in to get a session cookie)."
            )
        return self.user

    def owned_batmon(self, batmon_id: int, token: str | None) -> Batmon:
        """An owner-only batmon; a token given must match it."""
        return self.core.owned(self.owner(), batmon_id, token)

    def device_or_owned_batmon(self, batmon_id: int, token: str | None) -> Batmon:
        """A batmon reached by its device token, else by its owner."""
        if token is not None:
            return self.core.device(batmon_id, token)
        return self.core.owned(self.owner(), batmon_id)


async def add_batmon(call: Call, data: AddBatmon) -> dict[str, Any]:
    batmon = call.core.add_batmon(call.owner(), data)
    return {"batmon_id": batmon.id, "batmon_token": batmon.token}


async def count_batmons(call: Call, data: NoFields) -> dict[str, Any]:
    return {"batmons": len(call.core.batmons_of(call.owner()))}


async def list_batmons(call: Call, data: NoFields) -> list[dict[str, Any]]:
    now = call.core.clock()
    return [b.to_api(now) for b in call.core.batmons_of(call.owner())]


async def batmon_status(call: Call, data: DeviceRef) -> dict[str, Any]:
    batmon = call.device_or_owned_batmon(data.batmon_id, data.batmon_token)
    return batmon.to_api(call.core.clock())


async def update_batmon(call: Call, data: UpdateRequest) -> str:
    batmon = call.device_or_owned_batmon(data.batmon_id, data.batmon_token)
    await call.core.ingest_readings(batmon, [data])
    return "success"


async def batmon_history(call: Call, data: HistoryQuery) -> Streamed:
    if data.batmon_id is not None:
        batmons = [call.device_or_owned_batmon(data.batmon_id, data.batmon_token)]
    else:
        batmons = call.core.batmons_of(call.owner())
    return await call.core.stream_history(batmons, data)


async def edit_batmon(call: Call, data: EditBatmon) -> str:
    # In edit, batmon_token is the new token, not a guard.
    batmon = call.owned_batmon(data.batmon_id, None)
    call.core.edit_batmon(batmon, data)
    return "success"


async def delete_batmon(call: Call, data: DeviceRef) -> str:
    await call.core.delete_batmon(call.owned_batmon(data.batmon_id, data.batmon_token))
    return "success"


def flag_setter(flag: str, enabled: bool):
    """A handler for one of the enable/disable endpoints."""

    async def set_flag(call: Call, data: DeviceRef) -> str:
        call.core.set_flag(call.owned_batmon(data.batmon_id, data.batmon_token), flag, enabled)
        return "success"

    set_flag.__name__ = f"{'enable' if enabled else 'disable'}_{flag}"
    return set_flag


async def add_alarm(call: Call, data: AddAlarm) -> dict[str, Any]:
    kind, subject_id = data.subject()
    subject: Batmon | Bank = (call.core.banks.owned(call.owner(), subject_id) if kind == "bank"
                              else call.owned_batmon(subject_id, data.batmon_token))  # fmt: skip
    alarm = call.core.add_alarm(subject, data)
    return {"alarm_id": alarm.id}


async def edit_alarm(call: Call, data: EditAlarm) -> str:
    alarm = call.core.owned_alarm(call.owner(), data.alarm_id)
    if alarm.bank_id is not None and data.alarm_metric is not None:
        try:
            check_bank_alarm_metric(data.alarm_metric)
        except ValueError as exc:
            raise InvalidInput(f"{exc}.") from None
    call.core.edit_alarm(alarm, data)
    return "success"


async def delete_alarm(call: Call, data: AlarmRef) -> str:
    call.core.delete_alarm(call.core.owned_alarm(call.owner(), data.alarm_id))
    return "success"


async def ack_alarm(call: Call, data: AlarmRef) -> str:
    call.core.ack_alarm(call.core.owned_alarm(call.owner(), data.alarm_id))
    return "success"


async def user_notifications(call: Call, data: NotificationTargets) -> dict[str, str]:
    user = call.owner()

    def save_and_show(store: Any) -> dict[str, str]:  # the core's store; the facade never imports it
        if data.changes():
            set_targets(store, user.id, data)
        return targets_view(store, user.id)

    return await call.core.in_store(save_and_show)


async def show_user_notifications(call: Call, data: ShowTargets) -> dict[str, str]:
    # ShowTargets refuses target fields: a GET must not change anything.
    user_id = call.owner().id
    return await call.core.in_store(lambda store: targets_view(store, user_id))


async def send_test_notice(call: Call, data: NoFields) -> dict[str, list[str]]:
    return await request_test_notice(call.core, call.owner().id)


async def batmon_notifications(call: Call, data: DeviceRef) -> list[dict[str, Any]]:
    batmon = call.owned_batmon(data.batmon_id, data.batmon_token)
    return await call.core.in_store(lambda store: notices_view(store, batmon.id))


async def add_bank(call: Call, data: AddBank) -> dict[str, Any]:
    bank = call.core.banks.add(call.owner(), data)
    return {"bank_id": bank.id}


async def list_banks(call: Call, data: NoFields) -> list[dict[str, Any]]:
    banks = call.core.banks
    return [banks.view(b) for b in banks.of_user(call.owner())]


async def bank_status(call: Call, data: BankRef) -> dict[str, Any]:
    banks = call.core.banks
    return banks.view(banks.owned(call.owner(), data.bank_id))


async def edit_bank(call: Call, data: EditBank) -> str:
    banks = call.core.banks
    banks.edit(banks.owned(call.owner(), data.bank_id), data)
    return "success"


async def delete_bank(call: Call, data: BankRef) -> str:
    banks = call.core.banks
    banks.delete(banks.owned(call.owner(), data.bank_id))
    return "success"
