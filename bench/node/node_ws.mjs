// Node `ws`: send() to each subscriber, the way a ws user broadcasts.
// "sub" (or "sub:<channel>") makes a client a subscriber; anything else is a
// publication, broadcast as it is (or, as "<channel>\n<payload>", to that
// channel's subscribers).
import { WebSocketServer } from "ws";

const port = Number(process.argv[2]);
const wss = new WebSocketServer({ host: "127.0.0.1", port, path: "/connection/websocket", perMessageDeflate: false });
const channels = new Map();
wss.on("connection", (ws) => {
  ws.on("message", (data) => {
    const text = data.toString();
    if (text.startsWith("sub")) {
      const name = text.slice(4);
      if (!channels.has(name)) channels.set(name, new Set());
      channels.get(name).add(ws);
      (ws.subs ??= []).push(channels.get(name));
      return;
    }
    const cut = text.lastIndexOf("\n");
    const subs = channels.get(cut < 0 ? "" : text.slice(0, cut));
    if (subs) for (const sub of subs) sub.send(cut < 0 ? data : text.slice(cut + 1), { binary: false });
  });
  ws.on("close", () => { for (const subs of ws.subs ?? []) subs.delete(ws); });
});
wss.on("listening", () => console.log("ready"));
