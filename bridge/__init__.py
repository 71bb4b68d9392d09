"""batmon bridge: self-hosted, MQTT-first battery-monitor service."""

__version__ = "0.1.0"
