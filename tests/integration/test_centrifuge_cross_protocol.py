"""One channel, every protocol: a publication from the HTTP API, a
Squall-protocol client or a Centrifugo-protocol client (JSON and Protobuf)
reaches the subscribers of every protocol with the same offset and epoch, on
the memory broker and across two nodes on Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
import tornado.httpclient
import tornado.websocket

from server import session as session_module
from server.codecs import centrifuge_pb2
from server.codecs.centrifuge import CENTRIFUGE_PROTOBUF, CentrifugeJSON, _uvarint
from tests.conftest import RawWS, Running, ServerFactory

pb: Any = centrifuge_pb2
NAMESPACES = {"namespaces": {"room": {"allow_publish": True}}}


class CentJSON:
    """A Centrifugo-protocol client in JSON, at the wire level."""

    def __init__(self, ws: tornado.websocket.WebSocketClientConnection) -> None:
        self.ws = ws
        self.next_id = 0
        self.pubs: list[dict[str, Any]] = []

    @classmethod
    async def open(cls, server: Running) -> CentJSON:
        url = f"ws://127.0.0.1:{server.port}/connection/centrifuge/websocket"
        return cls(await tornado.websocket.websocket_connect(url))

    async def call(self, method: str, request: dict[str, Any]) -> dict[str, Any]:
        self.next_id += 1
        self.ws.write_message(orjson.dumps({"id": self.next_id, method: request}).decode())
        while True:
            frame = await asyncio.wait_for(self.ws.read_message(), 5)
            assert frame is not None, f"closed: {self.ws.close_code} {self.ws.close_reason}"
            for line in frame.split("\n") if isinstance(frame, str) else frame.split(b"\n"):
                msg = orjson.loads(line)
                if msg.get("id") == self.next_id:
                    assert "error" not in msg, msg
                    result: dict[str, Any] = msg[method]
                    return result
                if "pub" in msg.get("push", {}):
                    self.pubs.append(msg["push"]["pub"])

    async def pub(self) -> dict[str, Any]:
        while not self.pubs:
            frame = await asyncio.wait_for(self.ws.read_message(), 5)
            assert frame is not None
            for line in frame.split("\n") if isinstance(frame, str) else frame.split(b"\n"):
                msg = orjson.loads(line)
                if "pub" in msg.get("push", {}):
                    self.pubs.append(msg["push"]["pub"])
        return self.pubs.pop(0)


class CentProto:
    """A Centrifugo-protocol client in Protobuf, at the wire level."""

    def __init__(self, ws: tornado.websocket.WebSocketClientConnection) -> None:
        self.ws = ws
        self.next_id = 0
        self.pubs: list[Any] = []

    @classmethod
    async def open(cls, server: Running) -> CentProto:
        request = tornado.httpclient.HTTPRequest(
            f"ws://127.0.0.1:{server.port}/connection/centrifuge/websocket"
        )
        ws = await tornado.websocket.websocket_connect(
            request, subprotocols=["centrifuge-protobuf"]
        )
        assert ws.selected_subprotocol == "centrifuge-protobuf"
        return cls(ws)

    async def _replies(self) -> list[Any]:
        frame = await asyncio.wait_for(self.ws.read_message(), 5)
        assert isinstance(frame, bytes), frame
        out, pos = [], 0
        while pos < len(frame):
            size, pos = CENTRIFUGE_PROTOBUF._read_uvarint(frame, pos)
            reply = pb.Reply()
            reply.ParseFromString(frame[pos : pos + size])
            out.append(reply)
            pos += size
        return out

    async def call(self, method: str, fill: dict[str, Any]) -> Any:
        self.next_id += 1
        command = pb.Command(id=self.next_id)
        request = getattr(command, method)
        request.SetInParent()
        for key, value in fill.items():
            setattr(request, key, value)
        body = command.SerializeToString()
        self.ws.write_message(_uvarint(len(body)) + body, binary=True)
        while True:
            for reply in await self._replies():
                if reply.id == self.next_id:
                    assert not reply.HasField("error"), reply
                    return getattr(reply, method)
                if reply.push.HasField("pub"):
                    self.pubs.append(reply.push.pub)

    async def pub(self) -> Any:
        while not self.pubs:
            for reply in await self._replies():
                if reply.push.HasField("pub"):
                    self.pubs.append(reply.push.pub)
        return self.pubs.pop(0)


async def subscribers(where: list[Running], channel: str) -> tuple[RawWS, CentJSON, CentProto, str]:
    """A Squall client, a Centrifugo JSON and a Protobuf one, subscribed to
    ``channel`` on the nodes of ``where`` (round robin); and the epoch."""
    squall = await where[0].connected("sam")
    reply = await squall.call("subscribe", {"channel": channel})
    epoch = reply["result"]["epoch"]
    cj = await CentJSON.open(where[1 % len(where)])
    await cj.call("connect", {"token": where[0].token("jay")})
    assert (await cj.call("subscribe", {"channel": channel}))["epoch"] == epoch
    cp = await CentProto.open(where[2 % len(where)])
    await cp.call("connect", {"token": where[0].token("pat")})
    assert (await cp.call("subscribe", {"channel": channel})).epoch == epoch
    return squall, cj, cp, epoch


async def check_everyone_gets(
    squall: RawWS, cj: CentJSON, cp: CentProto, data: Any, offset: int, epoch: str
) -> None:
    push = await squall.push("pub")
    assert (push["pub"]["data"], push["pub"]["offset"], push["pub"]["epoch"]) == (
        data,
        offset,
        epoch,
    )
    got = await cj.pub()
    assert (got["data"], got["offset"]) == (data, offset)
    got_pb = await cp.pub()
    assert (orjson.loads(got_pb.data), got_pb.offset) == (data, offset)


async def publish_from_every_protocol(where: list[Running]) -> None:
    squall, cj, cp, epoch = await subscribers(where, "room:x")
    # The HTTP API.
    result = await where[0].api().publish("room:x", {"from": "api"})
    assert result["offset"] == 1
    await check_everyone_gets(squall, cj, cp, {"from": "api"}, 1, epoch)
    # A Squall-protocol client.
    reply = await squall.call("publish", {"channel": "room:x", "data": {"from": "squall"}})
    assert reply["result"]["offset"] == 2
    await check_everyone_gets(squall, cj, cp, {"from": "squall"}, 2, epoch)
    # Centrifugo JSON, then Protobuf (whose data is JSON text).
    await cj.call("publish", {"channel": "room:x", "data": {"from": "json"}})
    await check_everyone_gets(squall, cj, cp, {"from": "json"}, 3, epoch)
    await cp.call("publish", {"channel": "room:x", "data": b'{"from":"protobuf"}'})
    await check_everyone_gets(squall, cj, cp, {"from": "protobuf"}, 4, epoch)
    # History is one stream too.
    history = await cj.call("history", {"channel": "room:x", "limit": 10})
    assert [p["data"]["from"] for p in history["publications"]] == [
        "api",
        "squall",
        "json",
        "protobuf",
    ]
    for client in (cj, cp):
        client.ws.close()


async def test_one_channel_every_protocol_memory_broker(make_server: ServerFactory) -> None:
    server = await make_server(NAMESPACES)
    await publish_from_every_protocol([server])


async def test_metrics_count_connections_by_protocol(make_server: ServerFactory) -> None:
    server = await make_server(NAMESPACES)
    _, cj, cp, _ = await subscribers([server], "room:m")
    client = tornado.httpclient.AsyncHTTPClient()
    text = (await client.fetch(f"{server.http_url}/metrics")).body.decode()
    cj.ws.close()
    cp.ws.close()
    for protocol in ("squall", "centrifuge-json", "centrifuge-protobuf"):
        assert f'squall_protocol_connections{{protocol="{protocol}"}} 1.0' in text


async def test_a_text_frame_on_a_protobuf_connection_closes_it(make_server: ServerFactory) -> None:
    server = await make_server(NAMESPACES)
    cp = await CentProto.open(server)
    cp.ws.write_message('{"id":1,"connect":{}}')
    assert await asyncio.wait_for(cp.ws.read_message(), 5) is None
    assert (cp.ws.close_code, cp.ws.close_reason) == (3501, "bad request")
    cp.ws.close()


@pytest.mark.slow
async def test_one_channel_every_protocol_across_nodes_on_redis(
    make_server: ServerFactory, redis_server: Any, prefix: str
) -> None:
    config = {"broker": {"url": redis_server.url, "prefix": prefix}, **NAMESPACES}
    nodes = [await make_server(config) for _ in range(3)]
    await publish_from_every_protocol(nodes)


async def test_a_private_subscription_ends_when_its_token_expires_unless_refreshed(
    make_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_module, "SUB_EXPIRY_GRACE", 0.0)
    server = await make_server({"namespaces": {"vip": {"private": True}}})
    expiring, refreshed = await CentJSON.open(server), await CentJSON.open(server)
    ids = []
    for client in (expiring, refreshed):
        ids.append((await client.call("connect", {"token": server.token("vic")}))["client"])
        token = server.token("vic", channel="vip:a", ttl=2)
        assert (await client.call("subscribe", {"channel": "vip:a", "token": token}))["ttl"] <= 2
    longer = server.token("vic", channel="vip:a", ttl=60)
    assert (await refreshed.call("sub_refresh", {"channel": "vip:a", "token": longer}))["ttl"] > 50
    # Unsubscribed with 2501: the SDK subscribes again with a new token.
    frame = await asyncio.wait_for(expiring.ws.read_message(), 5)
    assert frame is not None and orjson.loads(frame) == {
        "push": {
            "channel": "vip:a",
            "unsubscribe": {"code": 2501, "reason": "subscription expired"},
        }
    }
    await server.api().publish("vip:a", "after")
    assert (await refreshed.pub())["data"] == "after"
    assert not expiring.pubs
    assert list(server.node.sessions[ids[0]].subs) == []
    assert list(server.node.sessions[ids[1]].subs) == ["vip:a"]
    for client in (expiring, refreshed):
        client.ws.close()


async def test_an_expired_connection_closes_after_the_grace_unless_refreshed(
    make_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(CentrifugeJSON, "expiry_grace", 1.0)
    server = await make_server(NAMESPACES)
    late, fresh = await CentJSON.open(server), await CentJSON.open(server)
    for client in (late, fresh):
        reply = await client.call("connect", {"token": server.token("eve", ttl=1)})
        assert reply["expires"] is True and reply["ttl"] <= 1
    # Refreshed after the token ran out, within the grace: still connected.
    await asyncio.sleep(1.2)
    refreshed = await fresh.call("refresh", {"token": server.token("eve", ttl=60)})
    assert refreshed["ttl"] > 50
    assert await asyncio.wait_for(late.ws.read_message(), 5) is None
    assert (late.ws.close_code, late.ws.close_reason) == (3005, "expired")
    assert "epoch" in await fresh.call("subscribe", {"channel": "room:alive"})
    for client in (late, fresh):
        client.ws.close()


async def test_server_side_subscriptions_come_in_the_connect_reply_and_recover(
    make_server: ServerFactory,
) -> None:
    server = await make_server(NAMESPACES)
    api = server.api()
    first = await api.publish("room:s", {"n": 1})
    for n in (2, 3):
        await api.publish("room:s", {"n": n})
    client = await CentJSON.open(server)
    token = server.token("sid", channels=["room:s"])
    position = {"recover": True, "offset": first["offset"], "epoch": first["epoch"]}
    reply = await client.call("connect", {"token": token, "subs": {"room:s": position}})
    sub = reply["subs"]["room:s"]
    assert sub["recovered"] is True and sub["was_recovering"] is True
    assert [p["data"]["n"] for p in sub["publications"]] == [2, 3]
    # Live publications follow, once each.
    await api.publish("room:s", {"n": 4})
    assert (await client.pub())["data"] == {"n": 4}
    client.ws.close()
