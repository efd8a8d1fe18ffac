// Node socket.io over its WebSocket transport: subscribers join a room, a
// publication is emitted to the room (socket.io encodes it once).
import { createServer } from "node:http";
import { Server } from "socket.io";

const port = Number(process.argv[2]);
const http = createServer();
const io = new Server(http, { transports: ["websocket"], perMessageDeflate: false, serveClient: false });
io.on("connection", (socket) => {
  socket.on("sub", () => socket.join("subs"));
  socket.on("pub", (data) => io.to("subs").emit("m", data));
});
http.listen(port, "127.0.0.1", () => console.log("ready"));
