// Node socket.io over its WebSocket transport: subscribers join a room, a
// publication is emitted to the room (socket.io encodes it once).
import { createServer } from "node:http";
import { Server } from "socket.io";

const port = Number(process.argv[2]);
const http = createServer();
const io = new Server(http, { transports: ["websocket"], perMessageDeflate: false, serveClient: false });
io.on("connection", (socket) => {
  // "sub" joins the room "subs", or the channel it names; a publication
  // {"ch": ..., "data": ...} goes to that channel's room.
  socket.on("sub", (channel) => socket.join(channel || "subs"));
  socket.on("pub", (data) => (data.ch ? io.to(data.ch).emit("m", data.data) : io.to("subs").emit("m", data)));
});
http.listen(port, "127.0.0.1", () => console.log("ready"));
