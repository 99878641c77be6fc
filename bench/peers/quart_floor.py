"""Memory floor: the least a Quart-Trio WebSocket costs on Hypercorn (accept, then wait).

Not a broadcast server: only for ``--scenarios idle5000``, to see what trio_ws adds to its stack.
"""

from __future__ import annotations

from quart import websocket
from quart_trio import QuartTrio

app = QuartTrio(__name__)


@app.websocket("/ws")
@app.websocket("/ws/<client_id>")
async def endpoint(client_id: str = "") -> None:
    await websocket.accept()
    while True:
        await websocket.receive()
