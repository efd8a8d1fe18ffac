"""python-socketio on Tornado (uvloop), WebSocket transport: subscribers join
a room, a publication is emitted to the room."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import socketio
import tornado.web
import uvloop

sio = socketio.AsyncServer(async_mode="tornado", transports=["websocket"], http_compression=False)


@sio.on("sub")  # type: ignore[misc]
async def sub(sid: str, channel: str | None = None, *args: Any) -> None:
    await sio.enter_room(sid, channel or "subs")


@sio.on("pub")  # type: ignore[misc]
async def pub(sid: str, data: Any) -> None:
    # {"ch": ..., "data": ...} goes to that channel's room.
    if "ch" in data:
        await sio.emit("m", data["data"], room=data["ch"])
    else:
        await sio.emit("m", data, room="subs")


async def main(port: int) -> None:
    app = tornado.web.Application([(r"/socket.io/", socketio.get_tornado_handler(sio))])
    app.listen(port, "127.0.0.1")
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
