"""Energy counters: what each reading adds to a batmon's kWh charged and discharged.

The rule lives here: :func:`advance` moves an :class:`EnergyState` over one reading.
The writer (bridge/writer.py) applies it to each current reading in order, in its own
thread, on a copy it keeps until the commit, and commits the new state in the same
transaction as the reading, so the counters are exact in reading order and survive
kill -9. (Mutable and slotted, not frozen: this runs for every reading, and copying a
frozen dataclass per reading cost 4 times as much.)

- Without the device's counters, energy is integrated from power (else voltage x
  current) by the trapezoid between consecutive readings in device time, split where
  power crosses zero; never across a gap longer than twice update_period.
- With them (details ``energy_charged_kwh`` / ``energy_discharged_kwh``), the batmon
  counts their increments from the first one seen; a counter that goes down was reset,
  and what it shows since the reset counts. The batmon's counter never goes down and
  never restarts from 0, and a device's lifetime total is not booked into one day.
- Positive power is charging (the seed's sign).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

JOULES_PER_KWH = 3.6e6
DEVICE_KEYS = ("energy_charged_kwh", "energy_discharged_kwh")


@dataclass(slots=True)
class EnergyState:
    """A batmon's counters and what integration needs next: stored as batmon columns."""

    energy_charged_kwh: float = 0.0
    energy_discharged_kwh: float = 0.0
    energy_point_ts: float | None = None  # the last reading with power, in device time
    energy_point_power: float | None = None
    device_charged_kwh: float | None = None  # the device's counters as last seen
    device_discharged_kwh: float | None = None

    @classmethod
    def of(cls, source: Any) -> EnergyState:
        """The state held by an object with these attributes (a Batmon)."""
        return cls(**{name: getattr(source, name) for name in COLUMNS})

    def columns(self) -> dict[str, float | None]:
        """The state as batmon column values (spelled out: the writer asks once per reading,
        and a comprehension over getattr cost twice as much, docs/PERFORMANCE.md)."""
        return {
            "energy_charged_kwh": self.energy_charged_kwh,
            "energy_discharged_kwh": self.energy_discharged_kwh,
            "energy_point_ts": self.energy_point_ts,
            "energy_point_power": self.energy_point_power,
            "device_charged_kwh": self.device_charged_kwh,
            "device_discharged_kwh": self.device_discharged_kwh,
        }

    def copy(self) -> EnergyState:
        """A state to advance while this one stays as it was (until the commit)."""
        return EnergyState(self.energy_charged_kwh, self.energy_discharged_kwh, self.energy_point_ts,
                           self.energy_point_power, self.device_charged_kwh, self.device_discharged_kwh)


COLUMNS = tuple(EnergyState.__dataclass_fields__)


def advance(state: EnergyState, ts: float, values: dict[str, Any], update_period: float
            ) -> tuple[float, float]:  # fmt: skip
    """Move ``state`` over a current reading (ts not before the last one); return the kWh
    (charged, discharged) it added."""
    power = _power(values)
    integrated = (0.0, 0.0)
    if power is not None:
        point_ts, point_power = state.energy_point_ts, state.energy_point_power
        if point_ts is not None and point_power is not None and 0 < ts - point_ts <= 2 * update_period:
            integrated = trapezoid_kwh(point_power, power, ts - point_ts)
        state.energy_point_ts, state.energy_point_power = ts, power
    details = values.get("details")
    if details and "energy_" in details:  # most readings: no parse
        device = _device_counters(details)
        charged, state.device_charged_kwh = _count(integrated[0], device[0], state.device_charged_kwh)
        discharged, state.device_discharged_kwh = _count(integrated[1], device[1],
                                                         state.device_discharged_kwh)  # fmt: skip
    else:
        charged = integrated[0] if state.device_charged_kwh is None else 0.0
        discharged = integrated[1] if state.device_discharged_kwh is None else 0.0
    state.energy_charged_kwh += charged
    state.energy_discharged_kwh += discharged
    return charged, discharged


def trapezoid_kwh(p0: float, p1: float, seconds: float) -> tuple[float, float]:
    """(charged, discharged) kWh of power going linearly from p0 to p1 W over ``seconds``."""
    if p0 * p1 < 0:  # the line crosses zero: each side counts for its own counter
        at = seconds * abs(p0) / (abs(p0) + abs(p1))
        first, second = p0 / 2 * at, p1 / 2 * (seconds - at)
        positive, negative = (first, second) if first > 0 else (second, first)
        return positive / JOULES_PER_KWH, -negative / JOULES_PER_KWH
    joules = (p0 + p1) / 2 * seconds
    return (joules / JOULES_PER_KWH, 0.0) if joules >= 0 else (0.0, -joules / JOULES_PER_KWH)


def _power(values: dict[str, Any]) -> float | None:
    """The reading's own power, else its voltage x current; None if it carries neither."""
    power = values.get("power")
    if power is None and values.get("voltage") is not None and values.get("current") is not None:
        power = values["voltage"] * values["current"]
    return power if power is None or math.isfinite(power) else None


def _device_counters(details: str) -> tuple[float | None, float | None]:
    data = json.loads(details)  # validated at the edge: a JSON object
    found = [data.get(key) for key in DEVICE_KEYS]
    return tuple(v if isinstance(v, int | float) and not isinstance(v, bool) else None
                 for v in found)  # type: ignore[return-value]  # fmt: skip


def _count(integrated: float, device: float | None, last_device: float | None
           ) -> tuple[float, float | None]:  # fmt: skip
    """kWh to add to one counter, and the device counter to remember."""
    if device is None:
        # A batmon whose device keeps this counter follows it alone: integrating the
        # readings that lack it too would count that energy twice.
        return (integrated if last_device is None else 0.0), last_device
    if last_device is None:
        return 0.0, device  # the first one seen is the baseline
    if device >= last_device:
        return device - last_device, device
    return device, device  # reset: it counted `device` since
