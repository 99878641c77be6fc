"""Who may publish: the decision behind ``TRIO_WS_CLIENT_PUBLISH``, pure.

A WebSocket client's message is broadcast only if the policy lets that connection publish;
otherwise the endpoint answers with an ``error`` frame (``publish_refused``) and broadcasts
nothing. The connection stays open: a listen-only client that sends by mistake still receives.
Refused messages count against the publish limits like any other, so sending them in a loop
ends with 1008 as a flood does.
"""

from __future__ import annotations

import enum

#: The ``error`` field of the frame a refused message gets.
PUBLISH_REFUSED = "publish_refused"


class ClientPublish(enum.Enum):
    """``TRIO_WS_CLIENT_PUBLISH``."""

    #: Every client may publish (the default, and the behaviour before the setting existed).
    ALL = "all"
    #: Only connections that presented a valid token.
    TOKEN = "token"
    #: Nobody: clients listen, backends publish through ``POST /publish``.
    NONE = "none"


def may_publish(policy: ClientPublish, *, authenticated: bool) -> bool:
    """Whether a connection may broadcast what it sends."""
    if policy is ClientPublish.ALL:
        return True
    if policy is ClientPublish.TOKEN:
        return authenticated
    return False


def refusal_reason(policy: ClientPublish) -> str:
    """The sentence of the ``error`` frame a refused message gets (for people)."""
    if policy is ClientPublish.TOKEN:
        return "only clients that connect with a valid token may publish here; not broadcast"
    return "this server is listen-only: clients may not publish; not broadcast"
