"""Plain Tornado: write_message to each subscriber, nothing else. Also the
HTTP reference for bench.http: GET /status answers a small JSON document,
POST /api/publish parses the body and broadcasts it."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import tornado.web
import tornado.websocket
import uvloop

# "sub" or "sub:<channel>" subscribes; "<channel>\n<payload>" publishes there.
channels: dict[str, set[tornado.websocket.WebSocketHandler]] = {}
started = time.time()


class Handler(tornado.websocket.WebSocketHandler):
    def on_message(self, message: str | bytes) -> None:
        assert isinstance(message, str)
        if message[:3] == "sub":
            subs = channels.setdefault(message[4:], set())
            subs.add(self)
            self.subs = [*getattr(self, "subs", []), subs]
            return
        channel, _, body = message.rpartition("\n")
        for sub in channels.get(channel, ()):
            sub.write_message(body)

    def on_close(self) -> None:
        for subs in getattr(self, "subs", []):
            subs.discard(self)


class Status(tornado.web.RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(
            json.dumps(
                {"uptime": time.time() - started, "subscribers": sum(map(len, channels.values()))}
            )
        )


class Publish(tornado.web.RequestHandler):
    def post(self) -> None:
        body = json.loads(self.request.body)
        message = json.dumps(body["data"])
        for sub in channels.get("", ()):
            sub.write_message(message)
        self.set_header("Content-Type", "application/json")
        self.finish('{"result":{}}')


async def main(port: int) -> None:
    app = tornado.web.Application(
        [(r"/connection/websocket", Handler), (r"/status", Status), (r"/api/publish", Publish)]
    )
    app.listen(port, "127.0.0.1")
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
