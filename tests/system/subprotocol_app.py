"""trio_ws's app behind a wrapper that breaks the WebSocket rules on one path: it accepts a
subprotocol the client never offered, which Hypercorn 0.18 turns into an AttributeError in the
connection's task (tests/system/test_hostile_input.py). trio_ws itself never accepts a
subprotocol; this is the stand-in for an app bug that reaches the same place in Hypercorn.

Run as ``hypercorn --worker-class trio tests.system.subprotocol_app:app`` from the repository.
"""

from __future__ import annotations

from typing import Any

from trio_ws.app import app as trio_ws_app

BROKEN_PATH = "/ws/accepts-unoffered-subprotocol"


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "websocket" and scope["path"] == BROKEN_PATH:
        await send({"type": "websocket.accept", "subprotocol": "never-offered"})
        return
    await trio_ws_app(scope, receive, send)
