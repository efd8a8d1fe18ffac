// Node `ws`: send() to each subscriber, the way a ws user broadcasts.
// A client's first message "sub" makes it a subscriber; anything else is a
// publication, broadcast as it is.
import { WebSocketServer } from "ws";

const port = Number(process.argv[2]);
const wss = new WebSocketServer({ host: "127.0.0.1", port, path: "/connection/websocket", perMessageDeflate: false });
const subscribers = new Set();
wss.on("connection", (ws) => {
  ws.on("message", (data, isBinary) => {
    if (!isBinary && data.length === 3 && data.toString() === "sub") {
      subscribers.add(ws);
      return;
    }
    for (const sub of subscribers) sub.send(data, { binary: false });
  });
  ws.on("close", () => subscribers.delete(ws));
});
wss.on("listening", () => console.log("ready"));
