"""Embedded MQTT broker (amqtt) for ``batmon serve``, with our own auth and topic ACL.

amqtt's packaged AnonymousAuthPlugin admits any client that sends a username, so the
only auth/ACL plugin loaded is :class:`BatmonAccessPlugin`, fed with live objects (the
core's :class:`CredentialCheck`, the :class:`~bridge.topics.Topics`, the bridge's own
credential). One concept per module:

- ``access``: :class:`AccessPolicy`, :class:`Principal`, :class:`CredentialCheck` (the rules);
- ``plugin``: :class:`BatmonAccessPlugin` (amqtt's plugin API around the policy);
- ``amqtt_patches``: the amqtt Broker subclass, the only code touching amqtt internals;
- ``embedded``: :class:`EmbeddedBroker` (broker.yaml, wiring, start/stop).
"""

from bridge.doors.broker.access import AccessPolicy, CredentialCheck, Principal
from bridge.doors.broker.embedded import PLUGIN_PATH, BrokerStartError, EmbeddedBroker
from bridge.doors.broker.plugin import BatmonAccessPlugin

__all__ = [
    "PLUGIN_PATH",
    "AccessPolicy",
    "BatmonAccessPlugin",
    "BrokerStartError",
    "CredentialCheck",
    "EmbeddedBroker",
    "Principal",
]
