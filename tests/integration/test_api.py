"""The HTTP server API: every method, and bad input changes nothing."""

from __future__ import annotations

import asyncio

import orjson
import pytest
import tornado.httpclient

from server.client import ApiError
from tests.conftest import Running, ServerFactory, wait_for


async def post(
    server: Running, path: str, body: bytes | str, key: str | None = None
) -> tuple[int, dict]:
    headers = {"Authorization": f"apikey {key or server.settings.auth.api_key}"}
    client = tornado.httpclient.AsyncHTTPClient()
    response = await client.fetch(
        f"{server.http_url}{path}", method="POST", body=body, headers=headers, raise_error=False
    )
    return response.code, orjson.loads(response.body)


async def test_publish_reaches_subscribers(server: Running) -> None:
    raw = await server.connected()
    await raw.call("subscribe", {"channel": "news"})
    result = await server.api().publish("news", {"title": "hello"})
    assert result["offset"] == 1
    push = await raw.push("pub")
    assert push["pub"]["data"] == {"title": "hello"}
    assert "info" not in push["pub"]  # published by the back end, not a client


async def test_bad_key_is_401_and_publishes_nothing(server: Running) -> None:
    code, body = await post(server, "/api/publish", '{"channel":"news","data":1}', key="wrong" * 4)
    assert code == 401
    assert body["error"]["code"] == 101
    client = tornado.httpclient.AsyncHTTPClient()
    response = await client.fetch(
        f"{server.http_url}/api/publish", method="POST", body="{}", raise_error=False
    )
    assert response.code == 401
    assert (await server.api().history("news", limit=0))["offset"] == 0


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ("not json", 107),
        ("[1]", 107),
        ('{"channel": "news"}', 107),
        ('{"data": 1}', 107),
        ('{"channel": "bad name", "data": 1}', 107),
        ('{"channel": "nons:x", "data": 1}', 102),
    ],
)
async def test_bad_publish_is_400(server: Running, body: str, code: int) -> None:
    status, reply = await post(server, "/api/publish", body)
    assert status == 400
    assert reply["error"]["code"] == code
    assert server.node.metrics.publications_in == 0


async def test_too_large_is_413(make_server: ServerFactory) -> None:
    server = await make_server({"limits": {"max_publication_bytes": 100, "max_frame_bytes": 2000}})
    with pytest.raises(ApiError) as info:
        await server.api().publish("news", "x" * 200)
    assert info.value.status == 413
    assert info.value.code == 115


async def test_unknown_method_is_404(server: Running) -> None:
    status, reply = await post(server, "/api/nope", "{}")
    assert status == 404
    assert reply["error"]["code"] == 104


async def test_broadcast(server: Running) -> None:
    raw = await server.connected()
    await raw.call("subscribe", {"channel": "a"})
    await raw.call("subscribe", {"channel": "b"})
    result = await server.api().broadcast(["a", "b", "c"], {"x": 1})
    assert [r["channel"] for r in result["responses"]] == ["a", "b", "c"]
    assert all(r["result"]["offset"] == 1 for r in result["responses"])
    got = {(await raw.push("pub"))["channel"] for _ in range(2)}
    assert got == {"a", "b"}


async def test_broadcast_checks_every_channel_first(server: Running) -> None:
    with pytest.raises(ApiError) as info:
        await server.api().broadcast(["a", "bad name"], 1)
    assert info.value.status == 400
    assert (await server.api().history("a", limit=0))["offset"] == 0


async def test_history_and_position(server: Running) -> None:
    api = server.api()
    for i in range(3):
        await api.publish("news", i)
    result = await api.history("news", limit=2, reverse=True)
    assert [p["data"] for p in result["publications"]] == [2, 1]
    assert result["offset"] == 3
    with pytest.raises(ApiError) as info:
        await api.history("news", since={"offset": "x"})
    assert info.value.status == 400


async def test_presence_and_stats(make_server: ServerFactory) -> None:
    server = await make_server({"namespaces": {"room": {"presence": True}}})
    a1 = await server.connected("alice")
    a2 = await server.connected("alice")
    b = await server.connected("bob")
    for raw in (a1, a2, b):
        await raw.call("subscribe", {"channel": "room:1"})
    api = server.api()
    # Presence is written just after each subscribe reply.
    for _ in range(200):
        presence = await api.presence("room:1")
        if len(presence["presence"]) == 3:
            break
        await asyncio.sleep(0.01)
    assert len(presence["presence"]) == 3
    stats = await api.call("presence_stats", {"channel": "room:1"})
    assert stats == {"num_clients": 3, "num_users": 2}
    with pytest.raises(ApiError) as info:
        await api.presence("news")
    assert info.value.code == 108


async def test_channels(server: Running) -> None:
    a = await server.connected("alice")
    b = await server.connected("bob")
    await a.call("subscribe", {"channel": "x"})
    await b.call("subscribe", {"channel": "x"})
    await b.call("subscribe", {"channel": "y"})
    result = await server.api().call("channels")
    assert result["channels"] == {"x": {"num_clients": 2}, "y": {"num_clients": 1}}


async def test_disconnect_user(server: Running) -> None:
    alice1 = await server.connected("alice")
    alice2 = await server.connected("alice")
    bob = await server.connected("bob")
    await server.api().call("disconnect", {"user": "alice"})
    assert (await alice1.closed())[0] == 3503
    assert (await alice2.closed())[0] == 3503
    assert "result" in await bob.call("ping")


async def test_unsubscribe_user(server: Running) -> None:
    alice = await server.connected("alice")
    await alice.call("subscribe", {"channel": "news"})
    await server.api().call("unsubscribe", {"user": "alice", "channel": "news"})
    push = await alice.push("unsubscribe")
    assert push["channel"] == "news"
    await wait_for(lambda: server.node.hub.subscribers("news") == 0)
    assert "result" in await alice.call("ping")


async def test_info(server: Running) -> None:
    await server.connected()
    info = await server.api().info()
    (node,) = info["nodes"]
    assert node["node"] == server.node.node_id
    assert node["connections"] == 1
