"""amqtt auth + topic plugin that applies an :class:`~bridge.doors.broker.access.AccessPolicy`.

Public plugin API only (``BaseAuthPlugin``/``BaseTopicPlugin``); the policy arrives
through the plugin's ``Config`` dataclass, so two brokers can run in one process.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from bridge.doors.broker.access import AccessPolicy, Principal

log = logging.getLogger(__name__)

PRINCIPAL_KEY = "batmon.principal"
"""Key of the Principal in ``Session.attributes`` (amqtt's slot for plugin data)."""
THROTTLED_REFUSAL_DELAY_S = 1.0
"""How long a refused CONNECT from a source over its failed-login limit waits for its CONNACK."""
WILL_KEY = "batmon.will"
"""Key of the last will vetted at the session's last accepted CONNECT."""


class BatmonAccessPlugin(BaseAuthPlugin, BaseTopicPlugin):
    """amqtt auth + topic plugin enforcing an :class:`AccessPolicy` (SPEC section 5)."""

    @dataclass
    class Config:
        """Filled in by EmbeddedBroker; a broker.yaml used without it fails closed."""

        policy: AccessPolicy | None = None

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        policy = self.config.policy
        if not isinstance(policy, AccessPolicy):
            raise TypeError("BatmonAccessPlugin needs a policy: start it via EmbeddedBroker")
        self._policy: AccessPolicy = policy

    async def authenticate(self, *, session: Session) -> bool:
        """Refuse anonymous and wrong credentials; pin the principal on the session."""
        # Asked before this attempt counts, as over HTTP: the 31st failure is the first held.
        throttled = self._policy.source_throttled(session.remote_address)
        try:
            principal = self._policy.authenticate(
                session.username, session.password, peer=session.remote_address
            )
            if principal is None and session.password and await self._policy.credentials_refreshed():
                # A secret made by another process a moment ago: asked again (the memory
                # only changes off the loop, so the check itself never queries).
                principal = self._policy.authenticate(
                    session.username, session.password, peer=session.remote_address
                )
        except Exception:  # a bug in the checker must not let anyone in nor kill the broker
            log.exception("credential check failed for client %r", session.client_id)
            return False
        if principal is None:
            log.debug("refused CONNECT of client %r", session.client_id)
            if throttled:
                # A source that keeps failing waits before each refusal, so each of its
                # sockets tries at most one guess a second; a correct CONNECT never waits.
                await asyncio.sleep(THROTTLED_REFUSAL_DELAY_S)
            return False
        previous = session.attributes.get(PRINCIPAL_KEY)
        if previous is not None and (previous.kind, previous.ident) != (
            principal.kind,
            principal.ident,
        ):
            # amqtt resumes a persistent session by client id alone: without this, anyone
            # could take over another client's subscriptions and queued messages.
            log.warning(
                "refused client %r: its persistent session belongs to another principal",
                session.client_id,
            )
            return False
        if session.will_flag and not self._policy.may_publish(principal, session.will_topic or ""):
            # amqtt broadcasts (and retains) a last will without asking the topic plugins, so
            # drop it here, like any refused PUBLISH (many clients set a will by default:
            # refusing the CONNECT would lock them out). Home Assistant's default will, on
            # '{prefix}/status', is a user's allowed topic and is kept.
            log.debug("dropped the last will of client %r: topic not allowed", session.client_id)
            session.will_flag = False
            session.will_topic = session.will_message = None
        session.attributes[PRINCIPAL_KEY] = principal
        session.attributes[WILL_KEY] = (
            session.will_flag,
            session.will_topic,
            session.will_message,
            session.will_qos,
            session.will_retain,
        )
        return True

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool:
        """Apply the policy to PUBLISH, SUBSCRIBE and delivery (RECEIVE) of a topic."""
        if session is None or not topic:
            return False
        principal = session.attributes.get(PRINCIPAL_KEY)
        if not isinstance(principal, Principal):
            return False
        try:
            if action == Action.PUBLISH:
                allowed = self._policy.may_publish(principal, topic)
            elif action == Action.SUBSCRIBE:
                allowed = self._policy.may_subscribe(principal, topic)
            elif action == Action.RECEIVE:
                # Asked with the concrete topic of each delivery, whatever filter matched
                # (BatmonBroker in amqtt_patches routes retained and queued messages through it too).
                allowed = self._policy.may_receive(principal, topic)
            else:
                allowed = False
        except Exception:
            log.exception("topic check failed for client %r", session.client_id)
            return False
        if not allowed:
            log.debug("refused %s for client %r (%r)", action, session.client_id, principal)
        return allowed
