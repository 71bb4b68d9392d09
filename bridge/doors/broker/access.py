"""Who may connect to the embedded broker and which topics each principal may use.

Pure rules, no amqtt: :class:`AccessPolicy` answers for a :class:`Principal` (bridge,
device or user) built at CONNECT from the core's :class:`CredentialCheck`.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass, field
from typing import Literal, Protocol

from bridge.models import parse_batmon_id
from bridge.ratelimit import FailureLimiter
from bridge.security import hash_api_key
from bridge.topics import Topics

log = logging.getLogger(__name__)


class CredentialCheck(Protocol):
    """What the broker needs from the core to decide who may connect and see what."""

    def check_device(self, batmon_id: int, token: str) -> bool:
        """True if ``token`` is the batmon's token (constant-time, in memory)."""
        ...

    def check_user(self, email: str, secret: str) -> int | None:
        """The user's id if ``secret`` (its api_key or an MQTT token) belongs to ``email``."""
        ...

    def credential_holder(self, secret_hash: str) -> int | None:
        """The user id holding this secret (by hash) now, else None (reset or revoked)."""
        ...

    async def refresh_credentials(self) -> bool:
        """Re-read users' secrets if another process changed them; True when they changed."""
        ...

    def owns(self, user_id: int, batmon_id: int) -> bool:
        """True if the user owns the batmon (asked at subscribe and delivery time)."""
        ...

    def owned_until_deleted(self, user_id: int, batmon_id: int) -> bool:
        """True if the user owned the batmon until it was deleted: its clears still reach it."""
        ...

    def owns_bank(self, user_id: int, bank_id: int) -> bool:
        """True if the user owns the bank, or owned it until it was deleted (its clears)."""
        ...


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a session authenticated as; stored on the amqtt session at CONNECT."""

    kind: Literal["bridge", "device", "user"]
    ident: int = 0
    """batmon_id for a device, user_id for a user, 0 for the bridge."""
    publish: frozenset[str] = field(default=frozenset(), repr=False)
    """Exact topics a device or user may publish to (a device's carry its token: keep out
    of logs)."""
    subscribe: frozenset[str] = field(default=frozenset(), repr=False)
    """Exact topics a device may subscribe to and receive."""
    credential: str = field(default="", repr=False)
    """A user's: the hash of the secret it logged in with, so its session can be closed
    once that secret is reset or revoked."""


class AccessPolicy:
    """Authentication and topic rules of one embedded broker, shared with its plugin."""

    def __init__(
        self,
        *,
        credentials: CredentialCheck,
        topics: Topics,
        bridge_username: str,
        bridge_password: str,
        limiter: FailureLimiter | None = None,
    ) -> None:
        if not bridge_username or not bridge_password:
            raise ValueError("the bridge credential must not be empty")
        self._credentials = credentials
        self._topics = topics
        self._bridge_username = bridge_username.encode()
        self._bridge_password = bridge_password.encode()
        # Failed logins per source address; past 30 a minute (the default) a source's
        # failing CONNECTs are held back (BatmonAccessPlugin); a correct one never is.
        self._limiter = limiter if limiter is not None else FailureLimiter()
        # The only wildcard filters a user may hold, besides Home Assistant's discovery
        # filters (Topics.is_ha_discovery_filter): a dashboard following all its batmons.
        # Each message any of them matches is vetted at delivery (may_receive).
        self._user_wildcards = frozenset({topics.state_filter, topics.availability_filter})

    def __repr__(self) -> str:  # keep the bridge password out of any config dump
        return f"AccessPolicy(topics={self._topics!r})"

    # -- CONNECT ------------------------------------------------------------
    def authenticate(
        self, username: str | None, password: str | None, peer: str | None = None
    ) -> Principal | None:
        """The principal for these credentials, or None to refuse the connection.

        Every credential is checked, whatever failed before: a failure only counts against
        its ``peer`` address (bridge/ratelimit.py, as over HTTP).
        """
        if not username or not password:
            return None  # no secret tried: nothing to count
        # Both compares always run: no timing hint about which half was wrong.
        user_ok = hmac.compare_digest(username.encode(), self._bridge_username)
        pass_ok = hmac.compare_digest(password.encode(), self._bridge_password)
        if user_ok and pass_ok:
            return Principal("bridge")
        principal = self._check(username, password)
        if principal is None:
            self._limiter.record_failure(peer)
        return principal

    async def credentials_refreshed(self) -> bool:
        """True when the core re-read the users' secrets because another process changed
        them (`batmon user add` a moment ago): a refused CONNECT is worth checking again."""
        return await self._credentials.refresh_credentials()

    def source_throttled(self, peer: str | None) -> bool:
        """True while ``peer`` is over its failed-login limit: its refusals are held back."""
        return self._limiter.throttled(peer)

    def _check(self, username: str, password: str) -> Principal | None:
        """A device's or user's principal for these credentials, else None."""
        batmon_id = parse_batmon_id(username)
        if batmon_id is not None:
            if not self._credentials.check_device(batmon_id, password):
                return None
            t = self._topics
            return Principal(
                "device",
                batmon_id,
                publish=frozenset({t.update(batmon_id, password)}),
                subscribe=frozenset(
                    {t.error(batmon_id, password), t.state(batmon_id), t.availability(batmon_id)}
                ),
            )
        user_id = self._credentials.check_user(username, password)
        if user_id is None:
            return None
        # Home Assistant's birth message and last will: what makes the bridge re-send discovery.
        return Principal("user", user_id, publish=frozenset({self._topics.homeassistant_status}),
                         credential=hash_api_key(password))  # fmt: skip

    def still_valid(self, principal: Principal) -> bool:
        """False for a user whose login secret was reset or revoked since: its session ends."""
        if principal.kind != "user":
            return True
        return self._credentials.credential_holder(principal.credential) == principal.ident

    # -- PUBLISH / SUBSCRIBE / delivery ---------------------------------------
    def may_publish(self, principal: Principal, topic: str) -> bool:
        """Devices publish only their own update topic; users only Home Assistant's status."""
        if principal.kind == "bridge":
            return True
        return topic in principal.publish

    def may_subscribe(self, principal: Principal, topic_filter: str) -> bool:
        """Exact own topics; for users also the few wildcards whose deliveries are vetted."""
        if principal.kind == "bridge":
            return True
        if principal.kind == "user" and (
            topic_filter in self._user_wildcards or self._topics.is_ha_discovery_filter(topic_filter)
        ):
            return True  # what it matches is filtered per message by may_receive
        if "+" in topic_filter or "#" in topic_filter:
            return False
        return self.may_receive(principal, topic_filter)

    def may_receive(self, principal: Principal, topic: str) -> bool:
        """Whether a message on this concrete topic may be delivered to the principal.

        Asked for every delivery, live or retained, whatever filter matched it: a wildcard
        also matches other users' batmons and other integrations' discovery topics, and
        ownership can change while subscribed. After a delete only the bridge's clearing
        messages are published on a batmon's topics (ids are never reused): they reach
        the former owner, so a Home Assistant connected at that moment drops the device.
        """
        if principal.kind == "bridge":
            return True
        if principal.kind == "device":
            return topic in principal.subscribe
        if not self.still_valid(principal):
            # Reset or revoked: nothing more, not even queued for a persistent session,
            # in the moment before the broker closes the connection.
            return False
        if topic == self._topics.bridge_state:
            return True
        batmon_id = self._topics.batmon_of_user_topic(topic)
        if batmon_id is None:
            bank_id = self._topics.bank_of_user_topic(topic)
            return bank_id is not None and self._credentials.owns_bank(principal.ident, bank_id)
        return self._credentials.owns(principal.ident, batmon_id) or (
            self._credentials.owned_until_deleted(principal.ident, batmon_id)
        )
