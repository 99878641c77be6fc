"""Reference peer: the ``websockets`` library with its ``broadcast()``.

Run: ``python bench/peers/websockets_server.py PORT [BACKLOG]``. Same contract as the other servers.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from websockets.asyncio.server import ServerConnection, broadcast, serve

clients: set[ServerConnection] = set()
message_id = 0


async def handler(websocket: ServerConnection) -> None:
    global message_id
    client_id = websocket.request.path.rsplit("/", 1)[-1] if websocket.request else "anon"
    clients.add(websocket)
    try:
        async for text in websocket:
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
            broadcast(clients, frame)
    finally:
        clients.discard(websocket)


async def main(port: int, backlog: int) -> None:
    async with serve(
        handler, "127.0.0.1", port, ping_interval=None, max_size=2**20, backlog=backlog
    ):
        print(f"Running on http://127.0.0.1:{port}", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 100))
