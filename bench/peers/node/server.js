// Reference peer: Node's `ws` library, same contract as every server in bench/run.py: a client's
// text frame is broadcast to every client, the sender included, the text verbatim inside JSON.
//
// Run: (cd bench/peers/node && npm install) && node bench/peers/node/server.js PORT [BACKLOG]
"use strict";

const { WebSocketServer, WebSocket } = require("ws");

const port = Number(process.argv[2] || 8004);
const backlog = Number(process.argv[3] || 511);
const wss = new WebSocketServer({
  host: "127.0.0.1",
  port,
  backlog,
  maxPayload: 1 << 20,
  perMessageDeflate: false,
  clientTracking: true,
});
let messageId = 0;

wss.on("connection", (socket, request) => {
  const path = request.url || "/ws";
  const clientId = path.startsWith("/ws/") ? path.slice(4) : "anon";
  socket.on("message", (data, isBinary) => {
    if (isBinary) return;
    messageId += 1;
    const frame = JSON.stringify({
      type: "message",
      id: messageId,
      from: clientId,
      text: data.toString(),
      ts: Date.now() / 1000,
    });
    for (const client of wss.clients) {
      if (client.readyState === WebSocket.OPEN) client.send(frame);
    }
  });
  socket.on("error", () => {});
});

wss.on("listening", () => console.log(`Running on http://127.0.0.1:${port}`));
