"""Every MQTT topic string the project uses, in one place.

Topics are built from a base topic (default ``batmon``) and a Home Assistant
discovery prefix (default ``homeassistant``) so one broker can host several
bridges or test runs side by side.
"""

from __future__ import annotations

from dataclasses import dataclass

from bridge.models import parse_batmon_id


@dataclass(frozen=True)
class Topics:
    """Topic names for one bridge; parse and build, never hand-format elsewhere."""

    base: str = "batmon"
    discovery_prefix: str = "homeassistant"

    # -- device -> bridge -------------------------------------------------
    def update(self, batmon_id: int, token: str) -> str:
        return f"{self.base}/{batmon_id}/{token}/update"

    def error(self, batmon_id: int, token: str) -> str:
        return f"{self.base}/{batmon_id}/{token}/error"

    @property
    def update_filter(self) -> str:
        """Subscription filter that matches every device's update topic."""
        return f"{self.base}/+/+/update"

    def shared_update_filter(self, group: str) -> str:
        """Shared subscription so several bridges process each reading once."""
        return f"$share/{group}/{self.update_filter}"

    def parse_update(self, topic: str) -> tuple[str, str] | None:
        """Return (batmon_id text, token) for an update topic, else None.

        The id is returned as text: validating it is the models' job.
        """
        parts = topic.split("/")
        base_parts = self.base.split("/")
        n = len(base_parts)
        if len(parts) != n + 3 or parts[:n] != base_parts or parts[n + 2] != "update":
            return None
        return parts[n], parts[n + 1]

    # -- bridge -> everyone -----------------------------------------------
    def state(self, batmon_id: int) -> str:
        return f"{self.base}/{batmon_id}/state"

    def availability(self, batmon_id: int) -> str:
        return f"{self.base}/{batmon_id}/availability"

    @property
    def bridge_state(self) -> str:
        return f"{self.base}/bridge/state"

    def discovery(self, batmon_id: int) -> str:
        return f"{self.discovery_prefix}/device/batmon_{batmon_id}/config"

    # -- banks (several batmons shown as one battery) -----------------------
    def bank_state(self, bank_id: int) -> str:
        return f"{self.base}/bank/{bank_id}/state"

    def bank_availability(self, bank_id: int) -> str:
        return f"{self.base}/bank/{bank_id}/availability"

    def bank_discovery(self, bank_id: int) -> str:
        return f"{self.discovery_prefix}/device/batmon_bank_{bank_id}/config"

    def bank_of_user_topic(self, topic: str) -> int | None:
        """The bank id of a bank's state, availability or discovery topic spelled exactly
        as built here (canonical id), else None."""
        for head in (f"{self.base}/bank/", f"{self.discovery_prefix}/device/batmon_bank_"):
            if not topic.startswith(head):
                continue
            bank_id = parse_batmon_id(topic[len(head) :].split("/", 1)[0])  # same id rules
            if bank_id is not None and topic in (
                self.bank_state(bank_id),
                self.bank_availability(bank_id),
                self.bank_discovery(bank_id),
            ):
                return bank_id
        return None

    @property
    def homeassistant_status(self) -> str:
        return f"{self.discovery_prefix}/status"

    # -- what users may subscribe to (embedded broker ACL) ------------------
    def is_ha_discovery_filter(self, topic_filter: str) -> bool:
        """True for a filter Home Assistant subscribes to for MQTT discovery.

        Current releases subscribe ``{prefix}/{component}/+/config`` and
        ``{prefix}/{component}/+/+/config`` for each component they support, ``device``
        included; older ones ``{prefix}/+/+/config`` and ``{prefix}/+/+/+/config``. Any
        plain topic level is taken as a component, so a newer release that supports one
        more still connects.
        """
        head = f"{self.discovery_prefix}/"
        if not topic_filter.startswith(head):
            return False
        levels = topic_filter[len(head) :].split("/")
        if len(levels) not in (3, 4) or levels[-1] != "config" or any(lv != "+" for lv in levels[1:-1]):
            return False
        component = levels[0]
        return component == "+" or (component != "" and not any(c in component for c in "+#$"))

    @property
    def state_filter(self) -> str:
        """Subscription filter that matches every batmon's state topic."""
        return f"{self.base}/+/state"

    @property
    def availability_filter(self) -> str:
        """Subscription filter that matches every batmon's availability topic."""
        return f"{self.base}/+/availability"

    def batmon_of_user_topic(self, topic: str) -> int | None:
        """The batmon id of a state, availability or discovery topic spelled exactly as
        built here (canonical id), else None."""
        for head in (f"{self.base}/", f"{self.discovery_prefix}/device/batmon_"):
            if not topic.startswith(head):
                continue
            batmon_id = parse_batmon_id(topic[len(head) :].split("/", 1)[0])
            if batmon_id is not None and topic in (
                self.state(batmon_id),
                self.availability(batmon_id),
                self.discovery(batmon_id),
            ):
                return batmon_id
        return None
