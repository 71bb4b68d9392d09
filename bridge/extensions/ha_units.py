"""The units Home Assistant accepts for each sensor device class we use.

Home Assistant rejects (current releases) or warns about (2025.4) a sensor whose
``unit_of_measurement`` is not one its ``device_class`` allows; the sensor then loses
its entity. Its table is ``DEVICE_CLASS_UNITS`` in
https://github.com/home-assistant/core/blob/dev/homeassistant/components/sensor/const.py
built from the unit enums in
https://github.com/home-assistant/core/blob/dev/homeassistant/const.py
(``UnitOfElectricPotential``, ``UnitOfElectricCurrent``, ``UnitOfPower``, ``PERCENTAGE``,
``UnitOfEnergy``, ``UnitOfTemperature``, ``UnitOfTime``),
and it is checked in ``validate_sensor_state_and_device_class_config`` of
https://github.com/home-assistant/core/blob/dev/homeassistant/components/mqtt/sensor.py

Below is what every release since device-based discovery (2024.11) accepts: later ones
added units (``µV``, ``kV``, ``MW``, ``BTU/h``...) that older ones refuse, and a config
must work on the Home Assistant the user has.
"""

from __future__ import annotations

from types import MappingProxyType

DEVICE_CLASS_UNITS: MappingProxyType[str, frozenset[str]] = MappingProxyType({
    "voltage": frozenset({"V", "mV"}),
    "current": frozenset({"A", "mA"}),
    "power": frozenset({"W", "kW"}),
    "battery": frozenset({"%"}),
    # UnitOfEnergy, UnitOfTemperature, UnitOfTime: the ones we send are in every release.
    "energy": frozenset({"Wh", "kWh", "MWh"}),
    "temperature": frozenset({"°C", "°F", "K"}),
    "duration": frozenset({"d", "h", "min", "s", "ms"}),
})  # fmt: skip


def device_class_for_unit(device_class: str, unit: str) -> str | None:
    """``device_class`` if Home Assistant accepts ``unit`` with it, else None (no class)."""
    allowed = DEVICE_CLASS_UNITS.get(device_class)
    if allowed is None or unit in allowed:
        return device_class
    return None
