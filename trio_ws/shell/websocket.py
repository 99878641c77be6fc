"""The ``/ws`` endpoint: a lean ASGI WebSocket handler inside the Quart-Trio app.

Quart serves the page and every HTTP route; WebSockets on ``/ws`` and ``/ws/<client id>`` skip
Quart's per-connection machinery (its request context, queues and tasks) and speak ASGI
directly, which halves what a connection costs (docs/benchmarks.md). Per connection there is
one task, this handler, which reads the client's frames and publishes them; the outbox's writer
is a second task only while the client has a backlog (core/outbox.py). A close request from
the core (drain, slow consumer, replaced) cancels both at once; the handler then sends the
close frame. The connection leaves the registry in ``finally``,
however it ended.
"""

from __future__ import annotations

import logging
import urllib.parse
from typing import TYPE_CHECKING, Any

import trio

from trio_ws.core import protocol
from trio_ws.core.hub import REFUSED_REASON
from trio_ws.core.limits import address_key
from trio_ws.core.protocol import (
    ClientIdError,
    CloseCode,
    Frame,
    ResumeError,
    StaleAttemptError,
)
from trio_ws.core.publish_limits import RATE_LIMITED_REASON, PublishLimit, PublishPolicy
from trio_ws.core.words import loggable

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from trio_ws.core.hub import Hub
    from trio_ws.core.registry import Connection
    from trio_ws.shell.sinks import AsgiSink, DirectPath

    Receive = Callable[[], Awaitable[dict[str, Any]]]
    Send = Callable[[dict[str, Any]], Awaitable[None]]

LOGGER = logging.getLogger(__name__)

#: How long a close handshake may take before we give up on it.
CLOSE_TIMEOUT_S = 5.0

PATH = "/ws"


def is_websocket_path(path: str) -> bool:
    """``/ws`` and everything below it: every malformed id ("", "a/b", "%2F") must reach the
    endpoint, to be refused with 1008 and a reason rather than an HTTP 404."""
    return path == PATH or path.startswith(PATH + "/")


def client_id_from_path(path: str) -> str | None:
    """The client id in a ``/ws`` path: None for ``/ws`` (the server assigns one), else the
    text after ``/ws/``, validated later."""
    return None if path == PATH else path[len(PATH) + 1 :]


class WebSocketEndpoint:
    """Serves one WebSocket connection per call, for the hub."""

    def __init__(self, hub: Hub, direct: DirectPath) -> None:
        self.hub = hub
        self.direct = direct
        self.max_message_size = hub.settings.max_message_size
        self.publish_policy = PublishPolicy.from_settings(hub.settings)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        attempt = self.hub.new_attempt()
        client_id = client_id_from_path(scope["path"])
        # The "websocket.connect" event is left for the reader to skip, as Quart does: some ASGI
        # hosts (Quart's test client) never send it. Accept first: refusing before the
        # handshake answers HTTP 403, which clients treat as fatal; a close frame carries a
        # code they can act on.
        await send({"type": "websocket.accept"})
        sink = self.direct.open_sink(send)
        hub = self.hub
        address, peer = client_address(hub, scope)
        # Escaped and cut once here: the peer goes into log lines all the way down the core.
        peer = loggable(peer)
        if hub.draining:
            hub.note_refused(peer)
            await _close(sink, CloseCode.GOING_AWAY, REFUSED_REASON, peer)
            return
        # The limits, before anything is registered: a refused client costs its handshake only.
        key = address_key(address)
        refused = hub.admission.admit(key, peer)
        if refused is not None:
            await _close(sink, CloseCode.TRY_AGAIN_LATER, refused.close_reason, peer)
            return
        try:
            await self._serve(scope, receive, sink, client_id, attempt, peer)
        finally:
            hub.admission.release(key)

    async def _serve(
        self,
        scope: dict[str, Any],
        receive: Receive,
        sink: AsgiSink,
        client_id: str | None,
        attempt: int,
        peer: str,
    ) -> None:
        """An admitted connection: register it, serve it, forget it."""
        hub = self.hub
        if sink.peer_gone():
            # The client gave up on this attempt (a connect timeout) while it waited here: it
            # must not take its id over from the retry that may already be connected.
            LOGGER.debug("client %s gone before its welcome: not registered", peer)
            return
        since = _query_value(scope, "since")
        try:
            if since is not None:
                protocol.validate_since(since)
            connection = hub.connect(client_id, peer, resuming=since is not None, attempt=attempt)
        except (ClientIdError, ResumeError) as error:
            LOGGER.info("refused %s from %s: %s", loggable(_describe_path(scope)), peer, error)
            await _close(sink, CloseCode.POLICY_VIOLATION, str(error), peer)
            return
        except StaleAttemptError as error:
            await _close(sink, CloseCode.REPLACED, str(error), peer)
            return
        try:
            if since is not None:
                await hub.resume(connection, since)
            async with trio.open_nursery() as nursery:
                connection.bind_close(nursery.cancel_scope)
                # The writer runs in this nursery, and only while a backlog exists.
                connection.outbox.start(sink, nursery.start_soon)
                try:
                    await self._read(receive, connection)
                finally:
                    connection.outbox.stop()  # no writer may start once the nursery closes
                nursery.cancel_scope.cancel()  # the client left: stop a writer still running
            if connection.close_code is not None:
                await _close(
                    sink,
                    connection.close_code,
                    connection.close_reason,
                    connection.client_id,
                    final=connection.final_frame,
                )
        finally:
            hub.disconnect(connection)

    async def _read(self, receive: Receive, connection: Connection) -> None:
        """Publish what the client sends until it disconnects or breaks a rule.

        Over its publish limit, the client is not read until its tokens are back (TCP slows it
        down); over it for too long, it gets an ``error`` frame and 1008 (core/publish_limits.py).
        """
        max_size = self.max_message_size
        publish = self.hub.publish
        policy = self.publish_policy
        limit = PublishLimit(policy, trio.current_time()) if policy.enabled else None
        while True:
            event = await receive()
            kind = event["type"]
            if kind != "websocket.receive":
                if kind == "websocket.connect":
                    continue
                return  # websocket.disconnect: the client is gone
            data = event.get("text")
            if data is None:
                connection.request_close(
                    CloseCode.UNSUPPORTED_DATA, "binary frames are not supported; send text"
                )
                return
            # len() counts characters, each at least one byte in UTF-8.
            size = max_size + 1 if len(data) > max_size else protocol.utf8_size(data)
            if size > max_size:
                connection.request_close(
                    CloseCode.MESSAGE_TOO_BIG, f"message larger than {max_size} bytes"
                )
                return
            if limit is not None and not await limit.admit(size):
                self._close_flooder(connection, limit)
                return
            await publish(connection.client_id, data)

    def _close_flooder(self, connection: Connection, limit: PublishLimit) -> None:
        policy = limit.policy
        rules = []
        if policy.rate > 0:
            rules.append(f"{policy.rate:g} messages/s (bursts of {policy.burst})")
        if policy.bytes_rate > 0:
            rules.append(f"{policy.bytes_rate} bytes/s")
        reason = (
            f"over the publish limit ({' and '.join(rules)}) for {policy.close_after_s:g}s; "
            "closing with 1008"
        )
        LOGGER.warning(
            "client %s (%s) closed with 1008: over its publish limit for %gs",
            connection.client_id,
            connection.peer,
            policy.close_after_s,
        )
        error = protocol.error_frame(error="rate_limited", reason=reason, ts=self.hub.wall_time())
        connection.request_close(CloseCode.POLICY_VIOLATION, RATE_LIMITED_REASON, Frame(error))


def client_address(hub: Hub, scope: dict[str, Any]) -> tuple[str, str]:
    """The client's address (what the per-address limits count), and how the logs name the
    client: ``host:port``, or behind a trusted proxy ``client (via proxy host:port)``."""
    client = scope.get("client")
    if not client:
        return "<unknown>", "<unknown>"
    host, port = str(client[0]), client[1]
    direct = f"{host}:{port}"
    forwarded = hub.trusted_proxies.client_address(host, scope.get("headers", ()))
    if forwarded is None:
        return host, direct
    return forwarded, f"{forwarded} (via {direct})"


def _query_value(scope: dict[str, Any], name: str) -> str | None:
    query = scope.get("query_string", b"").decode("latin-1")
    values = urllib.parse.parse_qs(query).get(name)
    return values[0] if values else None


def _describe_path(scope: dict[str, Any]) -> str:
    query = scope.get("query_string", b"").decode("latin-1")
    path: str = scope["path"]
    return path + (f"?{query}" if query else "")


async def _close(
    sink: AsgiSink, code: int, reason: str, who: str, *, final: Frame | None = None
) -> None:
    """Send ``final`` (if any), then a close frame; an error here concerns this client only,
    so log it and move on."""
    with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True) as scope:
        try:
            if final is not None:
                await sink.write([final])
            await sink.close(code, reason)
        except Exception as error:
            LOGGER.warning("error closing client %s with %d: %r", loggable(who), code, error)
    if scope.cancelled_caught:
        LOGGER.warning(
            "client %s did not take its close frame within %gs", loggable(who), CLOSE_TIMEOUT_S
        )
