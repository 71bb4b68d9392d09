"""VE.Direct labels to a batmon reading: voltage in V, current in A, power in W, soc in %,
everything else into ``details`` with its unit in the key (``consumed_ah``) or a
decoded value (``alarm_reasons: ["low_soc"]``). Labels we do not know are kept
as they came, under their own label, so nothing the device said is lost.

Units and codes: Victron, "VE.Direct Protocol" 3.33, and the BlueSolar/SmartSolar
MPPT and BMV/SmartShunt manuals.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bridge.agent.vedirect_parser import Block

# Alarm / warning reason bits (AR, WARN).
ALARM_BITS = {
    1: "low_voltage",
    2: "high_voltage",
    4: "low_soc",
    8: "low_starter_voltage",
    16: "high_starter_voltage",
    32: "low_temperature",
    64: "high_temperature",
    128: "midpoint_voltage",
    256: "overload",
    512: "dc_ripple",
    1024: "low_ac_out_voltage",
    2048: "high_ac_out_voltage",
    4096: "short_circuit",
    8192: "bms_lockout",
}
# Off reason bits (OR), sent by MPPT chargers and inverters as 0x hex.
OFF_REASON_BITS = {
    0x1: "no_input_power",
    0x2: "switched_off_power_switch",
    0x4: "switched_off_device_mode",
    0x8: "remote_input",
    0x10: "protection_active",
    0x20: "paygo",
    0x40: "bms",
    0x80: "engine_shutdown",
    0x100: "analysing_input_voltage",
}
# State of operation (CS).
CHARGE_STATES = {
    0: "off", 1: "low_power", 2: "fault", 3: "bulk", 4: "absorption", 5: "float",
    6: "storage", 7: "equalize_manual", 9: "inverting", 11: "power_supply",
    245: "starting_up", 246: "repeated_absorption", 247: "auto_equalize",
    248: "battery_safe", 252: "external_control",
}  # fmt: skip
# Charger error code (ERR).
CHARGER_ERRORS = {
    0: "no_error", 2: "battery_voltage_too_high", 17: "charger_temperature_too_high",
    18: "charger_over_current", 19: "charger_current_reversed", 20: "bulk_time_limit_exceeded",
    21: "current_sensor_issue", 26: "terminals_overheated", 28: "converter_issue",
    33: "input_voltage_too_high", 34: "input_current_too_high",
    38: "input_shutdown_battery_voltage", 39: "input_shutdown_current_while_off",
    65: "lost_communication", 66: "synchronised_charging_config_issue", 67: "bms_connection_lost",
    68: "network_misconfigured", 116: "factory_calibration_lost", 117: "invalid_firmware",
    119: "user_settings_invalid",
}  # fmt: skip
MPPT_MODES = {0: "off", 1: "limited", 2: "active"}
PRODUCTS = {
    0x203: "BMV-700", 0x204: "BMV-702", 0x205: "BMV-700H",
    0xA381: "BMV-712 Smart", 0xA389: "SmartShunt 500A/50mV",
    0xA042: "BlueSolar MPPT 75/15", 0xA053: "SmartSolar MPPT 75/15",
}  # fmt: skip


def _scaled(divisor: float, digits: int) -> Callable[[str], float]:
    def convert(value: str) -> float:
        return round(int(value) / divisor, digits)

    return convert


def _on_off(value: str) -> bool:
    if value.upper() not in ("ON", "OFF"):
        raise ValueError(value)
    return value.upper() == "ON"


def _bits(names: dict[int, str]) -> Callable[[str], list[str]]:
    def decode(value: str) -> list[str]:
        mask = int(value, 0)
        found = [name for bit, name in names.items() if mask & bit]
        found += [f"bit_{1 << n}" for n in range(32) if mask & (1 << n) and (1 << n) not in names]
        return found

    return decode


def _code(names: dict[int, str]) -> Callable[[str], str]:
    def decode(value: str) -> str:
        code = int(value, 0)
        return names.get(code, f"code_{code}")

    return decode


def _minutes_or_infinite(value: str) -> int | None:
    # TTG -1 means "infinite": the battery is not being discharged. null, not a number:
    # the server takes null in a well-known key as "no value" (docs/BATTERY.md).
    minutes = int(value)
    return None if minutes == -1 else minutes


def _text(value: str) -> str:
    return value


milli = _scaled(1000, 3)
centi_kwh = _scaled(100, 2)
per_mille_as_percent = _scaled(10, 1)

# label -> (details key, converter). A converter that raises keeps the raw text.
DETAILS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "V2": ("battery2_v", milli), "V3": ("battery3_v", milli),
    "VS": ("starter_v", milli), "VM": ("midpoint_v", milli),
    "DM": ("midpoint_deviation_pct", per_mille_as_percent),
    "VPV": ("panel_v", milli), "PPV": ("panel_w", int),
    "I2": ("battery2_a", milli), "I3": ("battery3_a", milli), "IL": ("load_a", milli),
    # T, CE, TTG, H17 and H18 go to the well-known details keys the server understands
    # (docs/BATTERY.md): temperature, alarms, time-to-go and the energy counters.
    "LOAD": ("load_on", _on_off), "T": ("temperature", int),
    "CE": ("consumed_ah", milli), "TTG": ("time_to_go", _minutes_or_infinite),
    "Alarm": ("alarm", _on_off), "Relay": ("relay_on", _on_off),
    "AR": ("alarm_reasons", _bits(ALARM_BITS)), "WARN": ("warning_reasons", _bits(ALARM_BITS)),
    "OR": ("off_reasons", _bits(OFF_REASON_BITS)),
    "CS": ("charge_state", _code(CHARGE_STATES)), "ERR": ("charger_error", _code(CHARGER_ERRORS)),
    "MPPT": ("mppt_mode", _code(MPPT_MODES)),
    "H1": ("deepest_discharge_ah", milli), "H2": ("last_discharge_ah", milli),
    "H3": ("average_discharge_ah", milli), "H4": ("charge_cycles", int),
    "H5": ("full_discharges", int), "H6": ("cumulative_drawn_ah", milli),
    "H7": ("min_battery_v", milli), "H8": ("max_battery_v", milli),
    "H9": ("since_full_charge_s", int), "H10": ("automatic_syncs", int),
    "H11": ("low_voltage_alarms", int), "H12": ("high_voltage_alarms", int),
    "H13": ("low_starter_voltage_alarms", int), "H14": ("high_starter_voltage_alarms", int),
    "H15": ("min_starter_v", milli), "H16": ("max_starter_v", milli),
    "H17": ("energy_discharged_kwh", centi_kwh), "H18": ("energy_charged_kwh", centi_kwh),
    "H19": ("yield_total_kwh", centi_kwh), "H20": ("yield_today_kwh", centi_kwh),
    "H21": ("max_power_today_w", int), "H22": ("yield_yesterday_kwh", centi_kwh),
    "H23": ("max_power_yesterday_w", int), "HSDS": ("day_sequence", int),
    "FW": ("firmware", _text), "FWE": ("firmware", _text), "BMV": ("bmv_model", _text),
    "SER#": ("serial_number", _text), "MON": ("monitor_mode", int),
}  # fmt: skip
# label -> (reading field, converter): the four values a batmon shows.
VALUES: dict[str, tuple[str, Callable[[str], float]]] = {
    "V": ("voltage", milli),
    "I": ("current", milli),
    "P": ("power", lambda v: float(int(v))),
    "SOC": ("soc", per_mille_as_percent),
}


def reading_fields(block: Block) -> dict[str, Any]:
    """The reading (voltage, current, power, soc, details) that a merged block says."""
    reading: dict[str, Any] = {}
    details: dict[str, Any] = {}
    for label, value in block.items():
        value = value.strip()
        if label in VALUES:
            name, convert = VALUES[label]
            try:
                reading[name] = convert(value)
                continue
            except ValueError:
                pass  # kept in details below, as the device sent it
        if label == "PID":
            details.update(_product(value))
        elif label in DETAILS:
            key, convert = DETAILS[label]
            try:
                details[key] = convert(value)
            except ValueError:
                details[label] = value
        else:
            details[label] = value
    if "soc" in reading and not 0 <= reading["soc"] <= 100:
        details["SOC"] = block["SOC"]  # SOC is '---' or out of range while unsynchronised
        del reading["soc"]
    if details:
        reading["details"] = details
    return reading


def _product(value: str) -> dict[str, str]:
    try:
        pid = int(value, 16)
    except ValueError:
        return {"product_id": value}
    found = {"product_id": f"0x{pid:04X}"}
    if pid in PRODUCTS:
        found["product"] = PRODUCTS[pid]
    return found
