"""Pusher webhooks: channel_occupied / vacated, member_added / removed and
client_event, POSTed to a real receiver, signed so that the PyPI pusher
SDK's validate_webhook accepts them, retried after failures, filtered per
URL, and raised once per cluster across two nodes on Redis."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pusher
import pytest
import tornado.httpserver
import tornado.testing
import tornado.web

from tests.conftest import Running, ServerFactory, wait_for
from tests.integration.test_pusher_protocol import APP, auth, open_pusher


@dataclass
class Receiver:
    port: int
    # Answer these statuses to the next requests (then 200).
    fail_next: list[int] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    refused: int = 0

    def url(self, name: str = "hook") -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def events(self) -> list[dict[str, Any]]:
        """Every event delivered (accepted requests only), in order."""
        return [e for body in self.bodies for e in orjson.loads(body)["events"]]

    def names(self) -> list[str]:
        return [e["name"] for e in self.events()]


class HookHandler(tornado.web.RequestHandler):
    def initialize(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def post(self, _name: str) -> None:
        receiver = self.receiver
        if receiver.fail_next:
            receiver.refused += 1
            self.set_status(receiver.fail_next.pop(0))
            self.finish("try again")
            return
        receiver.bodies.append(self.request.body)
        receiver.headers.append(dict(self.request.headers))
        self.finish("ok")


@contextlib.asynccontextmanager
async def receiving() -> AsyncIterator[Receiver]:
    """A webhook receiver on a free loopback port, for the block."""
    sock, port = tornado.testing.bind_unused_port()
    receiver = Receiver(port)
    app = tornado.web.Application([(r"/(\w+)", HookHandler, {"receiver": receiver})])
    http = tornado.httpserver.HTTPServer(app)
    http.add_sockets([sock])
    try:
        yield receiver
    finally:
        http.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(http.close_all_connections(), 5)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with receiving() as hooks:
        yield hooks


def config(receiver: Receiver, **app: Any) -> dict[str, Any]:
    hooks = app.pop("webhooks", [{"url": receiver.url()}])
    return {
        "pusher": {
            "apps": [{**APP, **app, "webhooks": hooks}],
            "webhook_batch_delay": 0.01,
            "webhook_retry_delay": 0.05,
        }
    }


async def test_events_are_signed_as_pushers(make_server: ServerFactory, receiver: Receiver) -> None:
    server = await make_server(config(receiver))
    ann = await open_pusher(server)
    member = orjson.dumps({"user_id": "ann"}).decode()
    await ann.subscribe(
        "presence-room", auth=auth(ann.socket_id, "presence-room", member), channel_data=member
    )
    bob = await open_pusher(server)
    await bob.subscribe("private-chat", auth=auth(bob.socket_id, "private-chat"))
    await ann.subscribe("private-chat", auth=auth(ann.socket_id, "private-chat"))
    bob.send("client-typing", {"n": 1}, channel="private-chat")
    await ann.expect("client-typing")
    ann.close()
    bob.close()
    await wait_for(lambda: receiver.names().count("channel_vacated") == 2)
    assert receiver.events() == [
        {"name": "channel_occupied", "channel": "presence-room"},
        {"name": "member_added", "channel": "presence-room", "user_id": "ann"},
        {"name": "channel_occupied", "channel": "private-chat"},
        {
            "name": "client_event",
            "channel": "private-chat",
            "event": "client-typing",
            "data": '{"n":1}',
            "socket_id": bob.socket_id,
        },
        *receiver.events()[4:],  # the leaves, in whichever order the two closed
    ]
    tail = receiver.events()[4:]
    assert {"name": "member_removed", "channel": "presence-room", "user_id": "ann"} in tail
    assert {"name": "channel_vacated", "channel": "presence-room"} in tail
    assert {"name": "channel_vacated", "channel": "private-chat"} in tail
    assert len(tail) == 3
    # The server SDK's own check accepts every request.
    sdk = pusher.Pusher(app_id=APP["id"], key=APP["key"], secret=APP["secret"])
    for body, headers in zip(receiver.bodies, receiver.headers, strict=True):
        assert headers["X-Pusher-Key"] == APP["key"]
        assert sdk.validate_webhook(headers["X-Pusher-Key"], headers["X-Pusher-Signature"], body)
    other = pusher.Pusher(app_id=APP["id"], key=APP["key"], secret="another-secret-0123")
    assert not other.validate_webhook(
        receiver.headers[0]["X-Pusher-Key"],
        receiver.headers[0]["X-Pusher-Signature"],
        receiver.bodies[0],
    )


async def test_failed_requests_are_retried_without_losing_or_repeating(
    make_server: ServerFactory, receiver: Receiver
) -> None:
    server = await make_server(config(receiver))
    receiver.fail_next = [500, 503]
    ws = await open_pusher(server)
    await ws.subscribe("news")
    await wait_for(lambda: receiver.names() == ["channel_occupied"])
    assert receiver.refused == 2


async def test_a_url_gets_only_the_events_it_asks_for(
    make_server: ServerFactory, receiver: Receiver
) -> None:
    hooks = [
        {"url": receiver.url("occupancy"), "events": ["channel_occupied", "channel_vacated"]},
    ]
    server = await make_server(config(receiver, webhooks=hooks))
    ws = await open_pusher(server)
    member = orjson.dumps({"user_id": "ann"}).decode()
    await ws.subscribe(
        "presence-room", auth=auth(ws.socket_id, "presence-room", member), channel_data=member
    )
    ws.close()
    await wait_for(lambda: "channel_vacated" in receiver.names())
    assert receiver.names() == ["channel_occupied", "channel_vacated"]


async def test_once_per_cluster(
    make_server: ServerFactory, receiver: Receiver, redis_server: Any, prefix: str
) -> None:
    """Two nodes on Redis, a subscriber on each: the channel is occupied
    once and vacated once, member events once per user."""
    redis = {"broker": {"url": redis_server.url, "prefix": prefix, "presence_ttl": 5}}
    nodes: list[Running] = [await make_server({**config(receiver), **redis}) for _ in range(2)]
    clients = []
    member = orjson.dumps({"user_id": "ann"}).decode()
    for node in nodes:  # ann on both nodes, at about the same time
        ws = await open_pusher(node)
        clients.append(ws)
    await asyncio.gather(
        *(
            ws.subscribe(
                "presence-room",
                auth=auth(ws.socket_id, "presence-room", member),
                channel_data=member,
            )
            for ws in clients
        )
    )
    await wait_for(lambda: "member_added" in receiver.names())
    for ws in clients:
        ws.close()
    await wait_for(lambda: "channel_vacated" in receiver.names())
    for node in nodes:
        await wait_for(lambda node=node: not node.node.sessions)
    names = receiver.names()
    assert names.count("channel_occupied") == 1, names
    assert names.count("member_added") == 1, names
    assert names.count("member_removed") == 1, names
    assert names.count("channel_vacated") == 1, names
