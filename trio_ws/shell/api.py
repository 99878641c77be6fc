"""The HTTP API for backends and operators, behind a bearer key (``TRIO_WS_API_KEY``).

* ``POST /publish`` with ``{"text": "..."}``: broadcast the text with ``from`` set to
  ``TRIO_WS_API_PUBLISHER_NAME``, through the hub's publish path (so the same ids, history,
  resume and cluster delivery as a client's message, and the same size limit). 202 when the
  broker took it; 503 while the broker cannot (Redis down, or too many messages on their way
  for longer than :data:`PUBLISH_TIMEOUT_S`).
* ``DELETE /clients/<id>``: close that client with 4503 wherever it is connected: on this
  instance at once, on the others of a Redis cluster at their next heartbeat (about 2 s). 200
  if it was connected here or holds its id on another instance, 404 otherwise.

Without a key these routes are not registered at all (404). The key is compared in constant
time; a request without it, or with another, gets 401.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import TYPE_CHECKING, Any

import trio
from quart import request
from werkzeug.exceptions import RequestEntityTooLarge

from trio_ws.core import protocol
from trio_ws.core.broker import BrokerState
from trio_ws.core.limits import REFUSAL_LOG_EVERY_S
from trio_ws.core.throttle import Throttle
from trio_ws.core.words import loggable

if TYPE_CHECKING:
    from quart import Quart

    from trio_ws.core.hub import Hub

LOGGER = logging.getLogger(__name__)

#: How long ``POST /publish`` waits for the broker to take a message (backpressure) before 503.
PUBLISH_TIMEOUT_S = 5.0

#: A JSON body may escape each byte of the text as ``\\u00XX`` (6 bytes): the body's bound, read
#: before anything is parsed, is this many times the message-size limit, plus the envelope.
BODY_EXPANSION = 6
BODY_ENVELOPE_BYTES = 1024


Answer = tuple[dict[str, Any], int, dict[str, str]]


def body_limit(max_message_size: int) -> int:
    return BODY_EXPANSION * max_message_size + BODY_ENVELOPE_BYTES


def bearer_matches(authorization: str | None, key: str) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <key>``, compared in constant time."""
    if authorization is None:
        return False
    scheme, _, given = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode("utf-8"), key.encode("utf-8"))


def _answer(status: int, **fields: Any) -> Answer:
    headers = {"Cache-Control": "no-store"}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="trio_ws"'
    if status == 503:
        headers["Retry-After"] = "1"
    return fields, status, headers


def _who() -> str:
    """The requester, for log lines: its address (Quart's view, not X-Forwarded-For)."""
    return loggable(request.remote_addr or "<unknown>")


def register(app: Quart, hub: Hub, key: str) -> None:
    """Add the API's routes to ``app``."""
    settings = hub.settings
    max_size = settings.max_message_size
    publisher = settings.api_publisher_name

    refusals = Throttle(REFUSAL_LOG_EVERY_S)

    def refused() -> Answer | None:
        if bearer_matches(request.headers.get("Authorization"), key):
            return None
        count = refusals.event(trio.current_time())
        if count is not None:
            LOGGER.warning(
                "api: %s %s refused (401) from %s (%d refused since the last line)",
                request.method,
                loggable(request.path),
                _who(),
                count,
            )
        return _answer(401, error="unauthorized", reason="send Authorization: Bearer <api key>")

    @app.post("/publish")
    async def publish() -> Answer:
        if (answer := refused()) is not None:
            return answer
        try:
            body = await request.get_data(cache=False)
        except RequestEntityTooLarge:
            return _answer(413, error="too_large", reason=f"message larger than {max_size} bytes")
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: nesting too deep to parse
            return _answer(400, error="bad_json", reason='send a JSON object: {"text": "..."}')
        text = parsed.get("text") if isinstance(parsed, dict) else None
        if not isinstance(text, str) or len(parsed) != 1:
            # Strict: a "from" or any other field would be silently ignored otherwise.
            return _answer(400, error="bad_json", reason='send a JSON object: {"text": "..."}')
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:  # a lone surrogate, from a "\\ud800" escape
            return _answer(400, error="bad_json", reason="text must be valid Unicode")
        if size > max_size:
            return _answer(413, error="too_large", reason=f"message larger than {max_size} bytes")
        if hub.broker.state is not BrokerState.UP:
            hub.note_api_publish(accepted=False)
            return _answer(503, accepted=False, reason="broker unavailable; try again")
        with trio.move_on_after(PUBLISH_TIMEOUT_S):
            await hub.publish(publisher, text)
            LOGGER.info(
                "api: message of %d bytes published as %s by %s",
                size,
                publisher,
                _who(),
            )
            hub.note_api_publish(accepted=True)
            return _answer(202, accepted=True, **{"from": publisher})
        hub.note_api_publish(accepted=False)
        return _answer(503, accepted=False, reason="broker busy; try again")

    @app.delete("/clients/<client_id>")
    async def kick(client_id: str) -> Answer:
        if (answer := refused()) is not None:
            return answer
        try:
            protocol.validate_client_id(client_id)
        except protocol.ClientIdError as error:
            return _answer(400, error="bad_client_id", reason=str(error))
        if await hub.kick_anywhere(client_id, _who()):
            return _answer(200, closed=True, instance=hub.instance_id, code=4503)
        return _answer(
            404, closed=False, instance=hub.instance_id, reason="no such client in the cluster"
        )
