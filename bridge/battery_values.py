"""A batmon's numeric values by name: the one place that says what each value is.

Alarms, the status object's extra keys, Home Assistant, the dashboard and banks all
read a batmon through :func:`battery_values`, so "cell_min" or "temperature" means the
same thing everywhere. The well-known details keys are validated at the edge
(bridge/models.py), so here they are only read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from types import MappingProxyType
from typing import Any, Protocol

BASE_METRICS = ("voltage", "current", "power", "soc")
DETAILS_VALUES = ("temperature", "time_to_go", "consumed_ah", "capacity_ah")
CELL_VALUES = ("cell_min", "cell_max", "cell_delta", "cell_min_index", "cell_max_index")
ENERGY_VALUES = ("energy_charged_kwh", "energy_discharged_kwh")
EXTRA_VALUES = (*ENERGY_VALUES, *DETAILS_VALUES, *CELL_VALUES)
"""The keys the batmon object and the retained state gain beyond the seed's."""
ENERGY_DIGITS = 9  # kWh: a sum of floats shows 0.3, not 0.30000000000000004
ROUND_DIGITS = 6  # a delta of 3.32 - 2.95 is 0.37, not 0.36999999999999966


# The unit of each value beyond the base metrics (whose units a batmon may set).
VALUE_UNITS = {
    "temperature": "°C", "time_to_go": "min", "consumed_ah": "Ah", "capacity_ah": "Ah",
    "cell_min": "V", "cell_max": "V", "cell_delta": "V", "cell_min_index": "", "cell_max_index": "",
    "energy_charged_kwh": "kWh", "energy_discharged_kwh": "kWh",
}  # fmt: skip


class BatteryReading(Protocol):
    """What is read of a batmon: its current values and details text."""

    voltage: float
    current: float
    power: float
    soc: float
    details: str


def battery_values(batmon: BatteryReading) -> dict[str, float]:
    """Every numeric value the batmon has now, by name; a value it lacks is absent.

    The four base metrics, the well-known details keys, the cell values derived from
    ``cells`` (indices 1-based, the first cell on a tie), the capacity (the owner's
    setting, else the device's), and the energy counters: the batmon's own (never
    decreasing) where it keeps them, else the device's from details.
    """
    values: dict[str, float] = {m: getattr(batmon, m) for m in BASE_METRICS}
    values.update(_details_values(batmon.details))
    setting = getattr(batmon, "capacity_ah", None)  # the owner's setting beats the device's
    if setting is not None and setting > 0:
        values["capacity_ah"] = setting
    for name in ENERGY_VALUES:
        counter = getattr(batmon, name, None)
        if counter is not None:
            values[name] = round(counter, ENERGY_DIGITS)
    return values


def reading_values(values: dict[str, Any]) -> dict[str, float]:
    """The numeric values one reading carries (its fields, short names), by the same
    names as :func:`battery_values`: a value the reading does not carry is absent."""
    found: dict[str, float] = {m: values[m] for m in BASE_METRICS if values.get(m) is not None}
    details = values.get("details")
    if details:
        found.update(_details_values(details))
    return found


def extra_keys(batmon: BatteryReading) -> dict[str, float | None]:
    """The batmon object's extra keys: each of EXTRA_VALUES, None while unknown."""
    values = battery_values(batmon)
    return {name: values.get(name) for name in EXTRA_VALUES}


@lru_cache(maxsize=16_384)  # a list of many batmons reads each one
def _details_values(details: str) -> Mapping[str, float]:
    # Cached by text: every consumer of one reading reads the same details. The mapping is
    # shared between callers: read it, never change it.
    try:
        data: Any = json.loads(details)
    except ValueError:
        return _NONE
    if not isinstance(data, dict):
        return _NONE
    found: dict[str, float] = {}
    for name in (*DETAILS_VALUES, *ENERGY_VALUES):
        value = data.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            found[name] = value
    cells = data.get("cells")
    if isinstance(cells, list) and cells and all(_is_number(c) for c in cells):
        low = min(cells)
        high = max(cells)
        found.update(cell_min=low, cell_max=high, cell_delta=round(high - low, ROUND_DIGITS),
                     cell_min_index=cells.index(low) + 1, cell_max_index=cells.index(high) + 1)  # fmt: skip
    return MappingProxyType(found)


_NONE: Mapping[str, float] = MappingProxyType({})


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
