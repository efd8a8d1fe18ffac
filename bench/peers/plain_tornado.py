"""Plain Tornado: write_message to each subscriber, nothing else."""

from __future__ import annotations

import asyncio
import sys

import tornado.web
import tornado.websocket
import uvloop

subscribers: set[tornado.websocket.WebSocketHandler] = set()


class Handler(tornado.websocket.WebSocketHandler):
    def on_message(self, message: str | bytes) -> None:
        if message == "sub":
            subscribers.add(self)
            return
        for sub in subscribers:
            sub.write_message(message)

    def on_close(self) -> None:
        subscribers.discard(self)


async def main(port: int) -> None:
    app = tornado.web.Application([(r"/connection/websocket", Handler)])
    app.listen(port, "127.0.0.1")
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
