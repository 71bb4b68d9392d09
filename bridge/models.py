"""Validation of everything that comes from outside: one pydantic model per input.

HTTP and MQTT both validate with these models, so a rule (soc within 0..100,
token charset, details normalisation) exists exactly once.
"""

from __future__ import annotations

import ast
import json
import math
import re
import time
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from bridge.errors import InvalidInput

MAX_SAFE_ID = 2**53 - 1
MAX_DETAILS_BYTES = 16 * 1024
MAX_FUTURE_SKEW_S = 60
MAX_BATCH_READINGS = 1000
MAX_PAYLOAD_BYTES = 64 * 1024  # an MQTT update, as an HTTP body
MAX_CELLS = 64
READING_FIELDS = ("voltage", "current", "power", "soc", "details")
_READING_ATTRIBUTES = tuple(f"batmon_{name}" for name in READING_FIELDS)  # built once: hot path

# Tokens become MQTT topic levels, so the wildcard and separator characters
# are excluded, as are whitespace and control characters.
# Spelled out, not \s: Python's \s and JSON Schema's (ECMA) differ (\x85, \ufeff...);
# this is the union of both, plus the control characters.
_CONTROL = r"\x00-\x1f\x7f-\x9f"
_SPACE = r"\x09-\x0d\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
_TOKEN_PATTERN = rf"^[^/+#{_CONTROL}{_SPACE}]+$"
# Names are shown on dashboards and in notices: printable (no C0/C1 control characters,
# NUL included) and not only whitespace.
_NAME_PATTERN = rf"^[^{_CONTROL}]*[^{_CONTROL}{_SPACE}][^{_CONTROL}]*$"
_UNITS_PATTERN = rf"^[^{_CONTROL}]*$"
# The patterns go into the OpenAPI document as they are (JSON Schema "pattern"), and the
# validators below apply them with their own messages: one constant, no drift.


def _no_bool(value: Any) -> Any:
    # pydantic's lax mode turns true into 1; an id or a number is never a boolean.
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


def _token_chars(value: str) -> str:
    if not re.fullmatch(_TOKEN_PATTERN, value):
        raise ValueError("must not contain '/', '+', '#', whitespace or control characters")
    return value


def _printable_name(value: str) -> str:
    if not re.fullmatch(_NAME_PATTERN, value):
        if value.strip():
            raise ValueError("must not contain control characters")
        raise ValueError("must not be only whitespace")
    return value


def _printable_units(value: str) -> str:
    if not re.fullmatch(_UNITS_PATTERN, value):
        raise ValueError("must not contain control characters")
    return value


NotBool = BeforeValidator(_no_bool)
BatmonId = Annotated[int, Field(ge=1, le=MAX_SAFE_ID), NotBool]
AlarmId = Annotated[int, Field(ge=1, le=MAX_SAFE_ID), NotBool]
_TOKEN_SCHEMA: dict[str, Any] = {"pattern": _TOKEN_PATTERN}
Token = Annotated[str, Field(min_length=1, max_length=128, json_schema_extra=_TOKEN_SCHEMA),
                  AfterValidator(_token_chars)]  # fmt: skip
# A token a user chooses is a device password: too short and it is guessed.
NewToken = Annotated[str, Field(min_length=8, max_length=128, json_schema_extra=_TOKEN_SCHEMA),
                     AfterValidator(_token_chars)]  # fmt: skip
Name = Annotated[str, Field(min_length=1, max_length=100, json_schema_extra={"pattern": _NAME_PATTERN}),
                 AfterValidator(_printable_name)]  # fmt: skip
Units = Annotated[str, Field(max_length=16, json_schema_extra={"pattern": _UNITS_PATTERN}),
                  AfterValidator(_printable_units)]  # fmt: skip
UpdatePeriod = Annotated[int, Field(ge=1, le=31_536_000)]
Finite = Annotated[float, Field(allow_inf_nan=False), NotBool]
Soc = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False), NotBool]
EpochSeconds = Annotated[float, Field(ge=0, le=MAX_SAFE_ID, allow_inf_nan=False), NotBool]
CapacityAh = Annotated[float, Field(gt=0, le=1e9, allow_inf_nan=False), NotBool]


class InputModel(BaseModel):
    """Base for outside input: unknown fields ignored, numbers may come as strings."""

    model_config = ConfigDict(extra="ignore", coerce_numbers_to_str=True, populate_by_name=True)


def normalise_details(value: Any) -> str:
    """Turn details (object, JSON text or Python-literal dict text) into JSON text.

    The seed sends ``"{'key': 25}"``, so Python-style dict text is accepted too.
    """
    if isinstance(value, str):
        if len(value.encode()) > MAX_DETAILS_BYTES:
            raise ValueError(f"must be at most {MAX_DETAILS_BYTES} bytes")
        text = value.strip() or "{}"
        try:
            value = parse_json_text(text)
        except ValueError:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                raise ValueError("must be a JSON object (or a dict literal)") from None
    if not isinstance(value, dict):
        raise ValueError("must be a JSON object")
    check_well_known_details(value)
    try:
        normalised = json.dumps(value, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        raise ValueError(
            "must hold only JSON values (finite numbers, strings, lists, objects)"
        ) from None
    if len(normalised.encode()) > MAX_DETAILS_BYTES:
        raise ValueError(f"must be at most {MAX_DETAILS_BYTES} bytes")
    return normalised


def _number(key: str, value: Any, *, minimum: float | None = None, above: float | None = None
            ) -> None:  # fmt: skip
    # bool is an int in Python, and JSON true is never a measurement.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{key} must be a number")
    if minimum is not None and value < minimum:
        raise ValueError(f"{key} must be at least {minimum:g}")
    if above is not None and value <= above:
        raise ValueError(f"{key} must be more than {above:g}")


def check_well_known_details(details: dict[str, Any]) -> None:
    """Check the details keys whose meaning the bridge knows (SPEC 7); others pass as sent.

    These feed derived values, energy counters and alarms, so a wrong type is refused
    here, naming the key, rather than misread later.
    """
    # null is "no value" (a VE.Direct TTG of -1, infinite, arrives as null): stored as sent.
    for key in ("temperature", "consumed_ah"):
        if details.get(key) is not None:
            _number(key, details[key])
    for key in ("time_to_go", "energy_charged_kwh", "energy_discharged_kwh"):
        if details.get(key) is not None:
            _number(key, details[key], minimum=0)
    if details.get("capacity_ah") is not None:
        _number("capacity_ah", details["capacity_ah"], above=0)
    if details.get("cells") is not None:
        cells = details["cells"]
        if not isinstance(cells, list) or not 1 <= len(cells) <= MAX_CELLS:
            raise ValueError(f"cells must be a list of 1 to {MAX_CELLS} cell voltages")
        for index, cell in enumerate(cells, start=1):
            _number(f"cells[{index}]", cell, minimum=0)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed")


# One decoder for every message: json.loads with an option builds a new JSONDecoder per call,
# 2-4 % of a worker's CPU per reading under MQTT ingest (docs/SCALE-OUT.md, "CPU per reading").
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def parse_json_text(text: str | bytes) -> Any:
    """JSON as devices send it: NaN and Infinity are refused (ValueError), as is
    nesting deep enough to exhaust the parser (RecursionError becomes ValueError).
    Bytes and a leading BOM are handled as ``json.loads`` does."""
    try:
        if isinstance(text, str):
            if text.startswith("\ufeff"):
                raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        else:
            text = text.decode(json.detect_encoding(text), "surrogatepass")
        return _DECODER.decode(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def parse_batmon_id(text: str) -> int | None:
    """A batmon id written canonically in a topic or username ("12", not "012",
    "+12" or "1_2"), within 1..2^53-1; else None."""
    if not text.isascii() or not text.isdigit() or text.startswith("0") or len(text) > 16:
        return None
    value = int(text)
    return value if value <= MAX_SAFE_ID else None


def _alias(name: str) -> Any:
    """Accept both ``batmon_voltage`` and ``voltage``; errors name the key the client sent."""
    return Field(None, validation_alias=AliasChoices(f"batmon_{name}", name))


def _reading_schema(schema: dict[str, Any]) -> None:
    """The document says what the validator below says: at least one value."""
    schema["anyOf"] = [{"required": [f"batmon_{name}"]} for name in READING_FIELDS]


def _not_far_future(schema: dict[str, Any]) -> None:
    """ts may be at most MAX_FUTURE_SKEW_S ahead of the clock of the document's making."""
    schema["maximum"] = int(time.time()) + MAX_FUTURE_SKEW_S


# The document offers details as an object; a string holding a JSON object or a Python
# dict literal (the seed's "{'key': 25}") is accepted too, but no schema can say which
# strings those are.
_NUMBER: dict[str, Any] = {"type": "number"}
_AT_LEAST_0: dict[str, Any] = {"type": "number", "minimum": 0}
# The well-known keys, as check_well_known_details checks them; any other key is free.
_WELL_KNOWN_DETAILS: dict[str, Any] = {
    "temperature": {**_NUMBER, "description": "battery temperature, °C"},
    "time_to_go": {**_AT_LEAST_0, "description": "minutes until empty at the present draw"},
    "consumed_ah": {**_NUMBER, "description": "Ah taken out since full"},
    "cells": {"type": "array", "minItems": 1, "maxItems": MAX_CELLS, "items": _AT_LEAST_0,
              "description": "cell voltages, V, cell 1 first"},
    "capacity_ah": {"type": "number", "exclusiveMinimum": 0, "description": "capacity, Ah"},
    "energy_charged_kwh": {**_AT_LEAST_0, "description": "the device's energy-in counter, kWh"},
    "energy_discharged_kwh": {**_AT_LEAST_0, "description": "the device's energy-out counter, kWh"},
}  # fmt: skip
_DETAILS_SCHEMA = WithJsonSchema({
    "type": "object",
    "description": "a JSON object (also accepted: a string holding one, or a Python dict"
                   f" literal); at most {MAX_DETAILS_BYTES} bytes as JSON. The keys below are"
                   " checked (a wrong type is a 400 naming the key); any other is stored as sent",
    "properties": _WELL_KNOWN_DETAILS,
})  # fmt: skip


class Reading(InputModel):
    """One reading as a device sends it; every field optional but not all absent."""

    model_config = ConfigDict(json_schema_extra=_reading_schema)

    batmon_voltage: Finite | None = _alias("voltage")
    batmon_current: Finite | None = _alias("current")
    batmon_power: Finite | None = _alias("power")
    batmon_soc: Soc | None = _alias("soc")
    batmon_details: Annotated[str, _DETAILS_SCHEMA] | None = _alias("details")
    ts: EpochSeconds | None = Field(
        None, description="epoch seconds of a reading buffered on the device",
        json_schema_extra=_not_far_future,
    )

    @field_validator("batmon_details", mode="before")
    @classmethod
    def _details(cls, value: Any) -> str | None:
        return None if value is None else normalise_details(value)

    @model_validator(mode="after")
    def _at_least_one_value(self) -> Reading:
        if all(getattr(self, attribute) is None for attribute in _READING_ATTRIBUTES):
            raise ValueError(
                "An update must carry at least one of batmon_voltage, batmon_current,"
                " batmon_power, batmon_soc, batmon_details"
            )
        if self.ts is not None and self.ts > time.time() + MAX_FUTURE_SKEW_S:
            raise ValueError(f"ts must not be more than {MAX_FUTURE_SKEW_S} s in the future")
        return self

    def values(self) -> dict[str, float | str]:
        """The reading fields that were given, by short name."""
        return {k: v for k in READING_FIELDS if (v := getattr(self, f"batmon_{k}")) is not None}


class DeviceRef(InputModel):
    """A batmon named by id, with an optional token (a guard against a mistyped id)."""

    batmon_id: BatmonId
    batmon_token: Token | None = None


class UpdateRequest(Reading):
    """POST /interface/update/batmon: a reading plus the batmon it belongs to."""

    batmon_id: BatmonId
    batmon_token: Token | None = None


class AddBatmon(InputModel):
    """POST /interface/add/batmon."""

    batmon_name: Name
    batmon_type: Name = "generic"
    batmon_token: NewToken | None = None
    update_period: UpdatePeriod = 300


class EditBatmon(InputModel):
    """POST /interface/edit/batmon: only the fields given change."""

    batmon_id: BatmonId
    batmon_name: Name | None = None
    batmon_type: Name | None = None
    batmon_token: NewToken | None = None
    update_period: UpdatePeriod | None = None
    voltage_units: Units | None = None
    current_units: Units | None = None
    power_units: Units | None = None
    soc_units: Units | None = None
    capacity_ah: CapacityAh | None = Field(None, description=(
        "the battery's capacity in Ah (> 0); weighs its SoC in a bank, before details.capacity_ah"))

    def changes(self) -> dict[str, Any]:
        """The batmon fields to change, by batmon field name."""
        return {
            k: v
            for k, v in self.model_dump(exclude={"batmon_id"}).items()
            if v is not None and k in self.model_fields_set
        }


MAX_POINTS = 10_000


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
# Ten digits at most: 9999999999w is still below 2^53 seconds.
_DURATION_PATTERN = r"^[1-9][0-9]{0,9}[smhdw]$"


def _duration(value: Any) -> Any:
    """``1d`` is 86400 (s, m, h, d, w); anything else goes on to the integer rules."""
    if isinstance(value, str) and re.fullmatch(_DURATION_PATTERN, value):
        return int(value[:-1]) * _DURATION_UNITS[value[-1]]
    return value


Bucket = Annotated[int, Field(ge=1, le=MAX_SAFE_ID), NotBool, BeforeValidator(_duration),
                   WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 1, "maximum": MAX_SAFE_ID},
                                             {"type": "string", "pattern": _DURATION_PATTERN}]})]  # fmt: skip


class HistoryQuery(InputModel):
    """GET /interface/batmon/history; the range is inclusive at both ends.

    Without bucket/points the rows are the raw readings; with either, one row per
    non-empty bucket with count and min/avg/max of each metric.
    """

    min_epoch_tm_sec: EpochSeconds
    max_epoch_tm_sec: EpochSeconds | None = None
    batmon_id: BatmonId | None = None
    batmon_token: Token | None = None
    bucket: Bucket | None = Field(None, description=(
        "seconds per bucket, or a duration such as 15m, 1h, 1d, 1w: one row per non-empty"
        " bucket, aligned at floor(ts/bucket)*bucket (UTC), with count, min/avg/max of each"
        " metric and the kWh charged and discharged"))  # fmt: skip
    points: Annotated[int, Field(ge=1, le=MAX_POINTS), NotBool] | None = Field(None, description=(
        "about how many buckets: picks bucket = ceil((max - min + 1) / points) seconds"))
    format: Literal["json", "csv"] = Field("json", description=(
        "csv streams the same rows as CSV with a header line (also chosen by Accept: text/csv)"))

    # max before min is an empty range (data: []), not an error: no JSON Schema can say
    # "max >= min", and the document must not allow what the server refuses. For the
    # same reason bucket and points together are not refused: bucket wins.


class Login(InputModel):
    """POST /interface/login."""

    api_key: Annotated[str, Field(min_length=1, max_length=200)]


class NoFields(InputModel):
    """Endpoints that take nothing but authentication."""


# -- banks: several batmons of one owner shown as one battery ----------------------
MAX_BANK_MEMBERS = 100
BankId = Annotated[int, Field(ge=1, le=MAX_SAFE_ID), NotBool]


def _ids_from_text(value: Any) -> Any:
    """A form or query field carries ids as text, "1,2,3"; a JSON body may too."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",")] if value.strip() else []
    return value


def _first_of_each(ids: list[int]) -> list[int]:
    # A repeated id is the same member: kept once, where it first appears.
    return list(dict.fromkeys(ids))


BatmonIds = Annotated[
    list[BatmonId],
    BeforeValidator(_ids_from_text),
    Field(min_length=1, max_length=MAX_BANK_MEMBERS, description=(
        "ids of your batmons: a JSON array, or text with the ids separated by commas")),
    AfterValidator(_first_of_each),
]  # fmt: skip


class AddBank(InputModel):
    """POST /interface/add/bank."""

    bank_name: Name
    batmon_ids: BatmonIds


class BankRef(InputModel):
    """A bank named by id (status, delete)."""

    bank_id: BankId


class EditBank(InputModel):
    """POST /interface/edit/bank: only the fields given change."""

    bank_id: BankId
    bank_name: Name | None = None
    batmon_ids: BatmonIds | None = None

    def changes(self) -> dict[str, Any]:
        """The bank fields to change."""
        return {k: getattr(self, k) for k in ("bank_name", "batmon_ids")
                if getattr(self, k) is not None and k in self.model_fields_set}  # fmt: skip


# The base metrics, and the battery values of details (bridge/battery_values.py).
AlarmMetric = Literal["voltage", "current", "power", "soc", "temperature", "time_to_go", "consumed_ah",
                      "cell_min", "cell_max", "cell_delta"]  # fmt: skip
_CLEAR_VALUE = Field(None, description=(
    "hysteresis: once triggered, the alarm stays triggered while the condition holds against"
    " this value or the threshold, so it clears only once the value has crossed both"))
AlarmCondition = Literal[">", ">=", "<", "<=", "==", "!="]
RepeatDelay = Annotated[int, Field(ge=0, le=86_400)]


# A bank's alarm may be on the values a bank has (bridge/banks.py aggregate, docs/BANKS.md).
BANK_ALARM_METRICS = ("soc", "voltage", "current", "power")


def check_bank_alarm_metric(metric: str) -> None:
    """Refuse (ValueError) a metric a bank has no value for: cells, temperature... are a
    member's, and a bank's energy counters are lifetime sums that would trigger once."""
    if metric not in BANK_ALARM_METRICS:
        raise ValueError(f"alarm_metric of a bank's alarm must be one of {', '.join(BANK_ALARM_METRICS)}")


def _one_subject_schema(schema: dict[str, Any]) -> None:
    """The document says what the validator below says: batmon_id or bank_id, not both;
    with bank_id, no batmon_token and a metric the bank has."""
    schema["oneOf"] = [
        {"required": ["batmon_id"], "not": {"required": ["bank_id"]}},
        {"required": ["bank_id"],
         "not": {"anyOf": [{"required": ["batmon_id"]}, {"required": ["batmon_token"]}]},
         "properties": {"alarm_metric": {"enum": list(BANK_ALARM_METRICS)}}},
    ]  # fmt: skip


class AddAlarm(InputModel):
    """POST /interface/batmon/alarm/add: an alarm on one batmon (batmon_id) or on one bank
    (bank_id), exactly one of them."""

    model_config = ConfigDict(json_schema_extra=_one_subject_schema)

    batmon_id: BatmonId | None = None
    bank_id: BankId | None = None
    batmon_token: Token | None = None
    alarm_name: Name
    alarm_metric: AlarmMetric
    alarm_condition: AlarmCondition
    alarm_threshold_value: Finite
    alarm_clear_value: Finite | None = _CLEAR_VALUE
    alarm_repeat_delay: RepeatDelay = 300
    alarm_enabled: bool = True

    @model_validator(mode="after")
    def _one_subject(self) -> AddAlarm:
        if self.batmon_id is None and self.bank_id is None:
            raise ValueError("batmon_id is required (or bank_id, for a bank's alarm)")
        if self.bank_id is not None:
            if self.batmon_id is not None:
                raise ValueError("give batmon_id or bank_id, not both: an alarm is on one batmon or one bank")
            if self.batmon_token is not None:
                raise ValueError("batmon_token goes with batmon_id; a bank's alarm is its owner's only")
            check_bank_alarm_metric(self.alarm_metric)
        return self

    def subject(self) -> tuple[Literal["batmon", "bank"], int]:
        """What the alarm is on: ("bank", bank_id) or ("batmon", batmon_id)."""
        if self.bank_id is not None:
            return "bank", self.bank_id
        assert self.batmon_id is not None  # _one_subject made sure
        return "batmon", self.batmon_id


class EditAlarm(InputModel):
    """POST /interface/batmon/alarm/edit: only the fields given change."""

    alarm_id: AlarmId
    alarm_name: Name | None = None
    alarm_metric: AlarmMetric | None = None
    alarm_condition: AlarmCondition | None = None
    alarm_threshold_value: Finite | None = None
    alarm_clear_value: Finite | None = _CLEAR_VALUE
    alarm_repeat_delay: RepeatDelay | None = None
    alarm_enabled: bool | None = None

    def changes(self) -> dict[str, Any]:
        """The alarm fields to change."""
        return {
            k: v
            for k, v in self.model_dump(exclude={"alarm_id"}).items()
            if v is not None and k in self.model_fields_set
        }


class AlarmRef(InputModel):
    """An alarm named by id (delete, ack)."""

    alarm_id: AlarmId


def _email_check(value: str) -> str:
    if not re.fullmatch(r"[^@\s]+@[^@\s]+", value):
        raise ValueError("must be an email address like name@example.org")
    return value.lower()


MAX_URL_CHARS = 2048


def validate_target_url(url: str) -> str:
    """Return ``url`` if Apprise can load it ("" removes a target); ValueError otherwise.

    The message never repeats the URL: it may hold a password or token.
    """
    url = url.strip()
    if not url:
        return ""
    if len(url) > MAX_URL_CHARS:
        raise ValueError(f"must be at most {MAX_URL_CHARS} characters")
    if re.search(r"[\s\x00-\x1f\x7f]", url):
        raise ValueError("must not contain whitespace or control characters")
    scheme, sep, _ = url.partition("://")
    if not sep:
        raise ValueError("must be an Apprise URL such as mailto://user:password@example.com")
    import apprise  # here: only this rule needs it, and it is slow to import

    if scheme.lower() not in apprise.NotificationManager():
        raise ValueError(f"uses {scheme!r}, which is not an Apprise service this server knows")
    if apprise.Apprise.instantiate(url) is None:
        raise ValueError(f"is not a {scheme}:// URL that Apprise can load; check its parts")
    return url


# Which URLs Apprise can load is decided by the plugin of each scheme: the document
# names the format and tools that generate requests (our schemathesis tests) supply it.
_TARGET_URL = Field(None, json_schema_extra={
    "format": "apprise-url",
    "description": "an Apprise URL such as mailto://user:password@example.com; '' removes the target",
})  # fmt: skip


class NotificationTargets(InputModel):
    """POST /interface/user/notifications: a field not given keeps its value."""

    email_url: str | None = _TARGET_URL
    whatsapp_url: str | None = _TARGET_URL
    sms_url: str | None = _TARGET_URL

    @field_validator("email_url", "whatsapp_url", "sms_url")
    @classmethod
    def _loadable(cls, value: str | None) -> str | None:
        return None if value is None else validate_target_url(value)

    def changes(self) -> dict[str, str]:
        """The targets to set, by column name ("" removes one)."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class ShowTargets(InputModel):
    """GET /interface/user/notifications: shows, never changes (a GET may be followed
    cross-site with the cookie), so a target field is refused rather than ignored."""

    @model_validator(mode="before")
    @classmethod
    def _no_targets(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(k in data for k in NotificationTargets.model_fields):
            raise ValueError("Notification targets are changed with POST, not GET")
        return data


class NewUser(InputModel):
    """`batmon user add EMAIL`."""

    email: Annotated[str, Field(min_length=3, max_length=254)]

    _check = field_validator("email")(_email_check)


class UserTokenName(InputModel):
    """`batmon user token add|revoke EMAIL NAME`: the user's email and the token's name."""

    email: Annotated[str, Field(min_length=3, max_length=254)]
    name: str

    _check = field_validator("email")(_email_check)

    @field_validator("name")
    @classmethod
    def _name_check(cls, value: str) -> str:
        # Safe to type in a shell and to print in a list: no spaces, quotes or controls.
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", value):
            raise ValueError("must be 1-64 letters, digits, '.', '_' or '-', starting with a"
                             " letter or digit (e.g. home-assistant)")  # fmt: skip
        return value


def describe_error(exc: ValidationError) -> str:
    """One sentence naming the first bad field and what is wrong with it."""
    err = exc.errors(include_url=False)[0]
    field = ".".join(str(p) for p in err["loc"] if not isinstance(p, int)) or "body"
    message = err["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if err["type"] == "missing":
        return f"{field} is required."
    if field == "body":
        return message.rstrip(".") + "."
    return f"{field}: {message[:1].lower() + message[1:]}."


# -- MQTT update payloads ------------------------------------------------------
def readings_from_payload(payload: bytes) -> list[Reading]:
    """Validate an update payload: one reading object, or an array of them each with ts.

    Raises InvalidInput with a one-sentence message for the device's error topic.
    """
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise InvalidInput(f"payload must be at most {MAX_PAYLOAD_BYTES} bytes.")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput("payload must be UTF-8 text.") from None
    if not text.strip():
        raise InvalidInput("payload is empty: send a JSON object of reading fields.")
    try:
        data = parse_json_text(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"payload is not valid JSON: {exc.msg} at position {exc.pos}.") from None
    except ValueError as exc:  # NaN / Infinity, or nested too deeply
        raise InvalidInput(f"payload is not valid JSON: {exc}.") from None
    if isinstance(data, dict):
        return [_reading(data)]
    if not isinstance(data, list):
        raise InvalidInput("payload must be a JSON object or an array of objects.")
    if not data:
        raise InvalidInput("payload array must hold at least one reading.")
    if len(data) > MAX_BATCH_READINGS:
        raise InvalidInput(f"payload array must hold at most {MAX_BATCH_READINGS} readings.")
    readings = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise InvalidInput(f"readings[{i}] must be a JSON object.")
        reading = _reading(item, f"readings[{i}]: ")
        if reading.ts is None:
            # Without ts the readings of one array would all share the arrival time.
            raise InvalidInput(f"readings[{i}]: ts is required in an array of readings.")
        readings.append(reading)
    return readings


def _reading(data: dict[str, Any], where: str = "") -> Reading:
    try:
        return Reading.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(where + describe_error(exc)) from None
