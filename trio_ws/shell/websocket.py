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
from trio_ws.core.hub import ID_IN_USE_REASON, REFUSED_REASON
from trio_ws.core.limits import address_key
from trio_ws.core.permissions import PUBLISH_REFUSED, ClientPublish, may_publish, refusal_reason
from trio_ws.core.protocol import (
    ClientIdError,
    CloseCode,
    Frame,
    IdInUseError,
    ResumeError,
    StaleAttemptError,
)
from trio_ws.core.publish_limits import RATE_LIMITED_REASON, PublishLimit, PublishPolicy
from trio_ws.core.tokens import (
    BEARER_SUBPROTOCOL,
    Identity,
    Presented,
    TokenError,
    token_from_request,
    verify_token,
)
from trio_ws.core.words import loggable, redact_query
from trio_ws.shell import hypercorn_limits

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

#: What a handshake presents when tokens are off: no token, and the subprotocol to echo.
_NO_TOKEN = Presented(None)
_NO_TOKEN_BEARER = Presented(None, BEARER_SUBPROTOCOL)


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
        self.client_publish = ClientPublish(hub.settings.client_publish)
        #: Bound once: a bound method made in each reader's frame would be kept per connection.
        self.publish = hub.publish

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        attempt = self.hub.new_attempt()
        client_id = client_id_from_path(scope["path"])
        hub = self.hub
        address, peer = client_address(hub, scope)
        # Escaped and cut once here: the peer goes into log lines all the way down the core.
        peer = loggable(peer)
        # A page from another site: HTTP 403 before the handshake completes. That is fatal to
        # a client, and meant to be: no retry will make its origin right.
        if not origin_allowed(hub, scope):
            await _refuse_origin(hub, scope, send, peer)
            return
        subprotocols = scope.get("subprotocols") or ()
        if hub.token_policy is None:
            # Tokens off: nothing reads a token, so none is looked for; the subprotocol is
            # still echoed (a browser fails a handshake that offered one and got none).
            presented = _NO_TOKEN_BEARER if BEARER_SUBPROTOCOL in subprotocols else _NO_TOKEN
        else:
            presented = token_from_request(
                scope.get("headers", ()), scope.get("query_string", b""), subprotocols
            )
        # The "websocket.connect" event is left for the reader to skip, as Quart does: some ASGI
        # hosts (Quart's test client) never send it. Accept first: refusing before the
        # handshake answers HTTP 403, which clients treat as fatal; a close frame carries a
        # code they can act on. The subprotocol accepted is one the client offered, never the
        # token (Hypercorn's worker fails on one it did not offer).
        # A temporary, not a local: this frame lives as long as the connection does.
        await send(_accept_event(presented.subprotocol))
        sink = self.direct.open_sink(send)
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
            identity = None
            if hub.token_policy is not None:
                try:
                    identity = verify_token(presented.token, hub.token_policy, hub.wall_time())
                    if client_id is not None and client_id != identity.subject:
                        raise TokenError("the token is for another client id")
                except TokenError as error:
                    hub.note_invalid("token")
                    count = hub.token_refusals.event(trio.current_time())
                    if count is not None:
                        LOGGER.info(
                            "refused %s from %s with 4501: %s%s",
                            loggable(_describe_path(scope)),
                            peer,
                            error,
                            _more(count),
                        )
                    await _close(sink, CloseCode.UNAUTHORIZED, str(error), peer)
                    return
                client_id = identity.subject
            await self._serve(scope, receive, send, sink, client_id, attempt, peer, identity)
        finally:
            hub.admission.release(key)

    async def _serve(
        self,
        scope: dict[str, Any],
        receive: Receive,
        send: Send,
        sink: AsgiSink,
        client_id: str | None,
        attempt: int,
        peer: str,
        identity: Identity | None,
    ) -> None:
        """An admitted connection: register it, serve it, forget it."""
        hub = self.hub
        if sink.peer_gone():
            # The client gave up on this attempt (a connect timeout) while it waited here: it
            # must not take its id over from the retry that may already be connected.
            LOGGER.debug("client %s gone before its welcome: not registered", peer)
            return
        query = _query(scope)
        since = _first(query, "since")
        resume_key = _first(query, "key")
        try:
            if since is not None:
                protocol.validate_since(since)
            connection = hub.connect(
                client_id,
                peer,
                resuming=since is not None,
                attempt=attempt,
                resume_key=resume_key,
                authenticated=identity is not None,
            )
        except (ClientIdError, ResumeError) as error:
            hub.note_invalid("bad_request")
            LOGGER.info("refused %s from %s: %s", loggable(_describe_path(scope)), peer, error)
            await _close(sink, CloseCode.POLICY_VIOLATION, str(error), peer)
            return
        except IdInUseError as error:
            hub.note_invalid("id_in_use")
            await _close(sink, CloseCode.ID_IN_USE, str(error), peer)
            return
        except StaleAttemptError as error:
            hub.note_invalid("stale_attempt")
            await _close(sink, CloseCode.REPLACED, str(error), peer)
            return
        if sink.can_ping and hypercorn_limits.watch_reads(send, connection):
            hub.watch(connection)  # pinged from now on, and closed with 4010 if silent
        try:
            if not await hub.claim_across_cluster(connection, resume_key):
                # Registered already: counted as refused, and as closed with 4009.
                hub.note_invalid("id_in_use")
                connection.request_close(CloseCode.ID_IN_USE, ID_IN_USE_REASON)
                await _close(sink, CloseCode.ID_IN_USE, ID_IN_USE_REASON, peer)
                return
            if since is not None:
                await hub.resume(connection, since)
            async with trio.open_nursery() as nursery:
                connection.bind_close(nursery.cancel_scope)
                # The writer runs in this nursery, and only while a backlog exists.
                connection.outbox.start(sink, nursery.start_soon)
                if identity is not None:
                    nursery.start_soon(hub.close_when_expired, connection, identity.expires_at)
                try:
                    await self._read(receive, connection)
                finally:
                    if connection.closing:
                        # A write in progress cannot be cancelled (no half frames): bound it,
                        # so a client that reads nothing cannot hold the close beyond this.
                        sink.limit_writes(trio.current_time() + CLOSE_TIMEOUT_S)
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
        publish = self.publish
        policy = self.publish_policy
        limit = PublishLimit(policy, trio.current_time()) if policy.enabled else None
        # Whether this connection may publish cannot change while it is open.
        allowed = may_publish(self.client_publish, authenticated=connection.authenticated)
        event: dict[str, Any] | None = None
        data: str | None = None
        while True:
            # Let go of the last message before waiting for the next: an idle client would
            # keep it (up to max_message_size) for as long as it stays idle.
            event = data = None
            event = await receive()
            kind = event["type"]
            if kind != "websocket.receive":
                if kind == "websocket.connect":
                    continue
                return  # websocket.disconnect: the client is gone
            data = event.get("text")
            if data is None:
                self.hub.note_limit_hit("binary")
                connection.request_close(
                    CloseCode.UNSUPPORTED_DATA, "binary frames are not supported; send text"
                )
                return
            # len() counts characters, each at least one byte in UTF-8.
            size = max_size + 1 if len(data) > max_size else protocol.utf8_size(data)
            if size > max_size:
                self.hub.note_limit_hit("message_size")
                connection.request_close(
                    CloseCode.MESSAGE_TOO_BIG, f"message larger than {max_size} bytes"
                )
                return
            if limit is not None and not await limit.admit(size):
                self._close_flooder(connection, limit)
                return
            if not allowed:
                self._refuse_publish(connection)
                continue
            await publish(connection.client_id, data)

    def _refuse_publish(self, connection: Connection) -> None:
        """Answer a message the publish policy refuses with an ``error`` frame; nothing is
        broadcast and the connection stays open (core/permissions.py)."""
        error = protocol.error_frame(
            error=PUBLISH_REFUSED,
            reason=refusal_reason(self.client_publish),
            ts=self.hub.wall_time(),
        )
        if not connection.offer(Frame(error)):
            connection.request_close(CloseCode.SLOW_CONSUMER, "slow consumer: outbox overflowed")
        self.hub.note_publish_refused(connection, self.client_publish.value)

    def _close_flooder(self, connection: Connection, limit: PublishLimit) -> None:
        self.hub.note_limit_hit("publish_rate")
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
            extra={"client": connection.client_id, "event": "rate_limited"},
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


def origin_allowed(hub: Hub, scope: dict[str, Any]) -> bool:
    """Whether the handshake's ``Origin`` (if any) may connect: see core/origins.py."""
    if hub.origins.any:
        return True  # ``*``: no header needs reading
    origin, host, scheme = _origin_and_target(hub, scope)
    return hub.origins.allows(origin, host, scheme)


def _origin_and_target(hub: Hub, scope: dict[str, Any]) -> tuple[str | None, str | None, str]:
    """The ``Origin``, and the host and scheme the request was made to: from a trusted
    proxy's ``X-Forwarded-Host`` / ``-Proto`` when it sent them, else ``Host`` and the
    connection's own scheme."""
    origin = host = None
    headers = scope.get("headers", ())
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"origin":
            origin = value.decode("latin-1")
        elif lowered == b"host":
            host = value.decode("latin-1")
    scheme = str(scope.get("scheme", "ws"))
    client = scope.get("client")
    if origin is not None and client:
        forwarded_host, forwarded_scheme = hub.trusted_proxies.forwarded_origin(
            str(client[0]), headers
        )
        host = forwarded_host or host
        scheme = forwarded_scheme or scheme
    return origin, host, scheme


def _accept_event(subprotocol: str | None) -> dict[str, Any]:
    accept: dict[str, Any] = {"type": "websocket.accept"}
    if subprotocol is not None:
        accept["subprotocol"] = subprotocol
    return accept


def _more(count: int) -> str:
    """The tail of a throttled refusal line: how many more were refused since the last one."""
    return f" ({count - 1} more refused since the last line)" if count > 1 else ""


async def _refuse_origin(hub: Hub, scope: dict[str, Any], send: Send, peer: str) -> None:
    origin, host, scheme = _origin_and_target(hub, scope)
    hub.note_invalid("origin")
    count = hub.origin_refusals.event(trio.current_time())
    if count is not None:
        LOGGER.info(
            "refused %s from %s with HTTP 403: origin %s is not allowed (allowed: %s; the "
            "request was made to %s://%s)%s",
            loggable(_describe_path(scope)),
            peer,
            loggable(origin or ""),
            hub.origins.describe(),
            loggable({"ws": "http", "wss": "https"}.get(scheme, scheme)),
            loggable(host or "?"),
            _more(count),
        )
    if "websocket.http.response" in scope.get("extensions", {}):
        body = b"origin not allowed\n"
        await send(
            {
                "type": "websocket.http.response.start",
                "status": 403,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008})  # Hypercorn answers 403


def _query(scope: dict[str, Any]) -> dict[str, list[str]]:
    """The handshake's query parameters, parsed once (most handshakes have none)."""
    query: bytes = scope.get("query_string", b"")
    return urllib.parse.parse_qs(query.decode("latin-1")) if query else {}


def _first(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[0] if values else None


def _describe_path(scope: dict[str, Any]) -> str:
    """The path and query for a log line, tokens and resume keys replaced by ``***``."""
    query = redact_query(scope.get("query_string", b"").decode("latin-1"))
    path: str = scope["path"]
    return path + (f"?{query}" if query else "")


async def _close(
    sink: AsgiSink, code: int, reason: str, who: str, *, final: Frame | None = None
) -> None:
    """Send ``final`` (if any), then a close frame; an error here concerns this client only,
    so log it and move on.

    Within :data:`CLOSE_TIMEOUT_S`: a client that takes nothing (its socket full) is aborted
    then. The write of a frame cannot be cancelled (Hypercorn's is shielded too), so a timer
    beside it resets the connection, which makes the write fail at once.
    """
    with trio.CancelScope(shield=True):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_abort_when_stuck, sink, code, who)
            try:
                if final is not None:
                    await sink.write([final])
                await sink.close(code, reason)
            except Exception as error:
                LOGGER.warning("error closing client %s with %d: %r", loggable(who), code, error)
            nursery.cancel_scope.cancel()


async def _abort_when_stuck(sink: AsgiSink, code: int, who: str) -> None:
    await trio.sleep(CLOSE_TIMEOUT_S)
    LOGGER.warning(
        "client %s did not take its close frame (%d) within %gs: connection reset",
        loggable(who),
        code,
        CLOSE_TIMEOUT_S,
    )
    sink.abort()
