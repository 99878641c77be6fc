"""Reference peer: the original design's stack, FastAPI on uvicorn, sequential awaited broadcast.

Run: ``uvicorn bench.peers.fastapi_server:app --port 8001 --ws-ping-interval 0 --log-level warning``
Contract (as every server in the benchmark): a client's text frame is broadcast to every client,
the sender included, with the text verbatim inside a JSON frame.
"""

from __future__ import annotations

import json
import time

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

app = FastAPI()
clients: set[WebSocket] = set()
message_id = 0


@app.websocket("/ws")
@app.websocket("/ws/{client_id}")
async def endpoint(websocket: WebSocket, client_id: str = "anon") -> None:
    global message_id
    await websocket.accept()
    clients.add(websocket)
    try:
        while True:
            text = await websocket.receive_text()
            message_id += 1
            frame = json.dumps(
                {
                    "type": "message",
                    "id": message_id,
                    "from": client_id,
                    "text": text,
                    "ts": time.time(),
                }
            )
            # As the original design: await each client's send in turn.
            for client in list(clients):
                try:
                    await client.send_text(frame)
                except Exception:
                    clients.discard(client)
    except WebSocketDisconnect:
        pass
    finally:
        clients.discard(websocket)
