"""The Pusher Channels protocol on /app/<key>, frame by frame (the SDK
suites, test_sdk_pusher_*, prove it with the real libraries): the opening,
public, private and presence channels, client events, errors and close
codes, and one channel across Squall's protocols."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
import tornado.websocket

from server.pusher import sign
from tests.conftest import Running, ServerFactory, wait_for
from tests.integration.test_centrifuge_cross_protocol import CentJSON

APP = {
    "id": "1234",
    "key": "app-key",
    "secret": "app-secret-0123456789",
    "enable_client_messages": True,
}
NS = "pusher-1234"


class PusherWS:
    """A bare Pusher protocol client: messages with their string data decoded."""

    def __init__(self, conn: tornado.websocket.WebSocketClientConnection) -> None:
        self.conn = conn
        self.socket_id = ""

    async def recv(self, timeout: float = 5.0) -> dict[str, Any] | None:
        raw = await asyncio.wait_for(self.conn.read_message(), timeout)
        if raw is None:
            return None
        msg: dict[str, Any] = orjson.loads(raw)
        if isinstance(msg.get("data"), str):
            try:
                msg["data"] = orjson.loads(msg["data"])
            except orjson.JSONDecodeError:
                pass
        return msg

    async def expect(self, event: str, timeout: float = 5.0) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            msg = await self.recv(max(0.01, deadline - loop.time()))
            assert msg is not None, f"closed while waiting for {event}"
            if msg["event"] == event:
                return msg
            assert msg["event"] != "pusher:error", msg

    def send(self, event: str, data: Any, channel: str | None = None) -> None:
        msg: dict[str, Any] = {"event": event, "data": data}
        if channel is not None:
            msg["channel"] = channel
        self.conn.write_message(orjson.dumps(msg).decode())

    async def subscribe(self, channel: str, **extra: Any) -> dict[str, Any]:
        self.send("pusher:subscribe", {"channel": channel, **extra})
        return await self.expect("pusher_internal:subscription_succeeded")

    def close(self) -> None:
        self.conn.close()


async def open_pusher(server: Running, key: str = "app-key") -> PusherWS:
    url = f"ws://127.0.0.1:{server.port}/app/{key}?protocol=7&client=test&version=1"
    ws = PusherWS(await tornado.websocket.websocket_connect(url))
    server._clients.append(ws)
    established = await ws.expect("pusher:connection_established")
    ws.socket_id = established["data"]["socket_id"]
    return ws


def auth(socket_id: str, channel: str, channel_data: str | None = None) -> str:
    message = f"{socket_id}:{channel}" + (f":{channel_data}" if channel_data is not None else "")
    return "app-key:" + sign(APP["secret"], message)  # type: ignore[arg-type]


@pytest.fixture
async def pusher_server(make_server: ServerFactory) -> Running:
    return await make_server({"pusher": {"apps": [APP]}})


async def test_opening_and_public_channel(pusher_server: Running) -> None:
    ws = await open_pusher(pusher_server)
    assert ws.socket_id.count(".") == 1
    await ws.subscribe("news")
    await pusher_server.api().publish(f"{NS}:news", {"event": "created", "data": '{"id":1}'})
    event = await ws.expect("created")
    assert event["channel"] == "news"
    assert event["data"] == {"id": 1}
    ws.send("pusher:ping", {})
    await ws.expect("pusher:pong")


async def test_private_channel_needs_the_apps_signature(pusher_server: Running) -> None:
    ws = await open_pusher(pusher_server)
    ws.send("pusher:subscribe", {"channel": "private-a", "auth": auth("1.1", "private-a")})
    error = await ws.expect("pusher:subscription_error")
    assert error["channel"] == "private-a" and error["data"]["status"] == 401
    await ws.subscribe("private-a", auth=auth(ws.socket_id, "private-a"))
    await pusher_server.api().publish(f"{NS}:private-a", {"event": "e", "data": "x"})
    assert (await ws.expect("e"))["data"] == "x"


async def test_presence_members_join_and_leave(pusher_server: Running) -> None:
    ann = await open_pusher(pusher_server)
    member = orjson.dumps({"user_id": "ann", "user_info": {"name": "Ann"}}).decode()
    ok = await ann.subscribe(
        "presence-room", auth=auth(ann.socket_id, "presence-room", member), channel_data=member
    )
    assert ok["data"]["presence"] == {"ids": ["ann"], "hash": {"ann": {"name": "Ann"}}, "count": 1}
    bob = await open_pusher(pusher_server)
    member = orjson.dumps({"user_id": "bob"}).decode()
    ok = await bob.subscribe(
        "presence-room", auth=auth(bob.socket_id, "presence-room", member), channel_data=member
    )
    assert sorted(ok["data"]["presence"]["ids"]) == ["ann", "bob"]
    added = await ann.expect("pusher_internal:member_added")
    assert added["channel"] == "presence-room" and added["data"]["user_id"] == "bob"
    bob.close()
    removed = await ann.expect("pusher_internal:member_removed")
    assert removed["data"] == {"user_id": "bob"}


async def test_presence_refuses_a_member_the_signature_does_not_cover(
    pusher_server: Running,
) -> None:
    ws = await open_pusher(pusher_server)
    signed = orjson.dumps({"user_id": "ann"}).decode()
    forged = orjson.dumps({"user_id": "admin"}).decode()
    ws.send(
        "pusher:subscribe",
        {
            "channel": "presence-room",
            "auth": auth(ws.socket_id, "presence-room", signed),
            "channel_data": forged,
        },
    )
    error = await ws.expect("pusher:subscription_error")
    assert error["data"]["status"] == 401


async def test_client_events_reach_the_others_not_the_sender(pusher_server: Running) -> None:
    one, two = await open_pusher(pusher_server), await open_pusher(pusher_server)
    for ws in (one, two):
        await ws.subscribe("private-chat", auth=auth(ws.socket_id, "private-chat"))
    one.send("client-typing", {"who": "one"}, channel="private-chat")
    got = await two.expect("client-typing")
    assert got["channel"] == "private-chat" and got["data"] == {"who": "one"}
    # The sender got nothing: the next thing it hears is a ping's answer.
    one.send("pusher:ping", {})
    assert (await one.recv())["event"] == "pusher:pong"  # type: ignore[index]
    # Public channels take no client events.
    await one.subscribe("news")
    one.send("client-typing", {}, channel="news")
    error = await one.expect("pusher:error")
    assert "private and presence" in error["data"]["message"]


async def test_client_events_need_the_app_to_allow_them(make_server: ServerFactory) -> None:
    server = await make_server({"pusher": {"apps": [{**APP, "enable_client_messages": False}]}})
    ws = await open_pusher(server)
    await ws.subscribe("private-chat", auth=auth(ws.socket_id, "private-chat"))
    ws.send("client-typing", {}, channel="private-chat")
    error = await ws.expect("pusher:error")
    assert "not enabled" in error["data"]["message"]


async def test_unknown_key_is_closed_with_4001(pusher_server: Running) -> None:
    url = f"ws://127.0.0.1:{pusher_server.port}/app/nope?protocol=7"
    conn = await tornado.websocket.websocket_connect(url)
    try:
        assert await asyncio.wait_for(conn.read_message(), 5) is None
        assert conn.close_code == 4001
    finally:
        conn.close()


async def test_one_channel_across_protocols(pusher_server: Running) -> None:
    """A Pusher client event reaches a Squall-protocol subscriber of the same
    channel (the envelope), and a Squall publication reaches the Pusher
    client as the "message" event."""
    ws = await open_pusher(pusher_server)
    await ws.subscribe("private-mixed", auth=auth(ws.socket_id, "private-mixed"))
    other = await open_pusher(pusher_server)
    await other.subscribe("private-mixed", auth=auth(other.socket_id, "private-mixed"))
    raw = await pusher_server.connected("sam")
    token = pusher_server.token("sam", channel=f"{NS}:private-mixed")
    reply = await raw.call("subscribe", {"channel": f"{NS}:private-mixed", "token": token})
    assert "result" in reply, reply
    other.send("client-hello", {"n": 1}, channel="private-mixed")
    pub = (await raw.push("pub"))["pub"]
    assert pub["data"] == {"event": "client-hello", "data": '{"n":1}', "socket_id": other.socket_id}
    assert (await ws.expect("client-hello"))["data"] == {"n": 1}
    await pusher_server.api().publish(f"{NS}:private-mixed", {"text": "from squall"})
    message = await ws.expect("message")
    assert message["data"] == {"text": "from squall"}
    await wait_for(lambda: pusher_server.node.hub.subscribers(f"{NS}:private-mixed") == 3)


async def test_members_are_users_not_connections(pusher_server: Running) -> None:
    """A user on two connections is added once and removed when the last
    one leaves, as Pusher does; public channels carry no member list."""

    async def join(user_id: str) -> PusherWS:
        ws = await open_pusher(pusher_server)
        member = orjson.dumps({"user_id": user_id}).decode()
        signature = auth(ws.socket_id, "presence-room", member)
        await ws.subscribe("presence-room", auth=signature, channel_data=member)
        return ws

    ann = await join("ann")
    carol_1 = await join("carol")
    assert (await ann.expect("pusher_internal:member_added"))["data"]["user_id"] == "carol"
    carol_2 = await join("carol")
    carol_1.close()
    await wait_for(lambda: len(pusher_server.node.sessions) == 3)
    for _ in range(200):  # bounded: carol's first connection leaves the presence
        if len(await pusher_server.node.broker.presence(f"{NS}:presence-room")) == 2:
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("carol's first connection never left the presence")
    # Neither carol's second connection nor her first one leaving said a thing.
    ann.send("pusher:ping", {})
    assert (await ann.recv())["event"] == "pusher:pong"  # type: ignore[index]
    carol_2.close()
    removed = await ann.recv()
    assert removed is not None and removed["event"] == "pusher_internal:member_removed"
    assert removed["data"] == {"user_id": "carol"}
    public = await ann.subscribe("news")
    assert public["data"] == {}


async def test_an_app_over_its_connection_quota_is_refused(make_server: ServerFactory) -> None:
    server = await make_server({"pusher": {"apps": [{**APP, "max_connections": 2}]}})
    first, second = await open_pusher(server), await open_pusher(server)
    url = f"ws://127.0.0.1:{server.port}/app/app-key?protocol=7"
    third = await tornado.websocket.websocket_connect(url)
    try:
        assert await asyncio.wait_for(third.read_message(), 5) is None
        assert third.close_code == 4004  # over quota: the SDKs do not retry
    finally:
        third.close()
    # A place frees up when one leaves.
    first.close()
    await wait_for(lambda: len(server.node.sessions) == 1)
    again = await open_pusher(server)
    assert again.socket_id and second.socket_id


def user_auth(socket_id: str, user_data: str) -> str:
    return "app-key:" + sign(APP["secret"], f"{socket_id}::user::{user_data}")  # type: ignore[arg-type]


async def test_signin_gives_the_connection_its_user_and_channel(pusher_server: Running) -> None:
    ws = await open_pusher(pusher_server)
    user_data = orjson.dumps({"id": "u7", "user_info": {"name": "Ann"}}).decode()
    ws.send("pusher:signin", {"auth": user_auth("1.1", user_data), "user_data": user_data})
    error = await ws.expect("pusher:signin_error")
    assert "signature" in error["data"]["error"]
    ws.send("pusher:signin", {"auth": user_auth(ws.socket_id, user_data), "user_data": user_data})
    ok = await ws.expect("pusher:signin_success")
    assert orjson.loads(ok["data"]["user_data"]) == {"id": "u7", "user_info": {"name": "Ann"}}
    await wait_for(lambda: [s.user for s in pusher_server.node.sessions.values()] == ["u7"])
    # pusher-js then subscribes to the user's channel: already done.
    await ws.subscribe("#server-to-user-u7")
    await pusher_server.api().publish(
        f"{NS}:#server-to-user-u7", {"event": "notice", "data": "for ann"}
    )
    notice = await ws.expect("notice")
    assert notice["channel"] == "#server-to-user-u7" and notice["data"] == "for ann"
    # Nobody subscribes to another user's channel.
    other = await open_pusher(pusher_server)
    other.send("pusher:subscribe", {"channel": "#server-to-user-u7"})
    refused = await other.expect("pusher:subscription_error")
    assert refused["channel"] == "#server-to-user-u7"
    # The user's connections can be ended by user id.
    await pusher_server.node.disconnect_user("u7")
    assert await ws.recv() is None


@pytest.fixture(params=["memory", "redis"])
async def two_nodes(
    request: pytest.FixtureRequest, make_server: ServerFactory, prefix: str
) -> list[Running]:
    """Two nodes on Redis, or one node twice on the embedded broker."""
    config: dict[str, Any] = {"pusher": {"apps": [APP]}}
    if request.param == "memory":
        node = await make_server(config)
        return [node, node]
    redis = request.getfixturevalue("redis_server")
    config["broker"] = {"url": redis.url, "prefix": prefix}
    return [await make_server(config), await make_server(config)]


async def test_one_channel_for_squall_centrifugo_and_pusher(two_nodes: list[Running]) -> None:
    """A Pusher client's event and an HTTP API publication reach the
    channel's Pusher, Squall-protocol and Centrifugo-protocol subscribers
    on either node, with the channel's offsets; and the reverse."""
    first, second = two_nodes
    channel = f"{NS}:private-all"
    pusher_a = await open_pusher(first)
    await pusher_a.subscribe("private-all", auth=auth(pusher_a.socket_id, "private-all"))
    pusher_b = await open_pusher(second)
    await pusher_b.subscribe("private-all", auth=auth(pusher_b.socket_id, "private-all"))
    squall = await second.connected("sam")
    token = second.token("sam", channel=channel)
    assert "result" in await squall.call("subscribe", {"channel": channel, "token": token})
    cent = await CentJSON.open(second)
    try:
        await cent.call("connect", {"token": second.token("cara")})
        await cent.call(
            "subscribe", {"channel": channel, "token": second.token("cara", channel=channel)}
        )
        pusher_a.send("client-hi", {"n": 1}, channel="private-all")
        assert (await pusher_b.expect("client-hi"))["data"] == {"n": 1}
        pub = (await squall.push("pub"))["pub"]
        assert pub["data"]["event"] == "client-hi" and pub["offset"] == 1
        cent_pub = await cent.pub()
        assert cent_pub["data"]["event"] == "client-hi" and cent_pub.get("offset") == 1
        # The reverse: a Squall publication (through the other node's API).
        await first.api().publish(channel, {"text": "all"})
        for ws in (pusher_a, pusher_b):
            assert (await ws.expect("message"))["data"] == {"text": "all"}
        assert (await squall.push("pub"))["pub"]["offset"] == 2
        assert (await cent.pub())["data"] == {"text": "all"}
    finally:
        cent.ws.close()


async def test_apps_are_isolated(make_server: ServerFactory) -> None:
    other = {"id": "5678", "key": "other-key", "secret": "other-secret-0123456789"}
    server = await make_server({"pusher": {"apps": [APP, other]}})
    mine = await open_pusher(server)
    await mine.subscribe("news")
    theirs = await open_pusher(server, key="other-key")
    await theirs.subscribe("news")
    await server.api().publish("pusher-5678:news", {"event": "theirs", "data": "x"})
    assert (await theirs.expect("theirs"))["channel"] == "news"
    # The same channel name of the first app heard nothing.
    mine.send("pusher:ping", {})
    assert (await mine.recv())["event"] == "pusher:pong"  # type: ignore[index]
    # One app's signature opens nothing of the other's.
    theirs.send(
        "pusher:subscribe", {"channel": "private-a", "auth": auth(theirs.socket_id, "private-a")}
    )
    assert (await theirs.expect("pusher:subscription_error"))["data"]["status"] == 401
