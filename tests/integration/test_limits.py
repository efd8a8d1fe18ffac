"""Safe by default: every limit, and origins."""

from __future__ import annotations

import asyncio

import pytest
import tornado.httpclient
import tornado.websocket

from tests.conftest import ServerFactory, wait_for


async def test_channels_per_connection(make_server: ServerFactory) -> None:
    server = await make_server({"limits": {"max_channels_per_connection": 2}})
    raw = await server.connected()
    assert "result" in await raw.call("subscribe", {"channel": "a"})
    assert "result" in await raw.call("subscribe", {"channel": "b"})
    assert (await raw.call("subscribe", {"channel": "c"}))["error"]["code"] == 106
    assert server.node.hub.subscribers("c") == 0
    await raw.call("unsubscribe", {"channel": "a"})
    assert "result" in await raw.call("subscribe", {"channel": "c"})


async def test_commands_per_second(make_server: ServerFactory) -> None:
    server = await make_server({"limits": {"commands_per_second": 1, "command_burst": 5}})
    raw = await server.connected()  # connect used one token
    frame = "\n".join(f'{{"id": {i}, "method": "ping"}}' for i in range(10, 20))
    raw.send(frame)
    replies = [await raw.reply(i) for i in range(10, 20)]
    ok = [r for r in replies if "result" in r]
    limited = [r for r in replies if r.get("error", {}).get("code") == 111]
    assert len(ok) == 4
    assert len(limited) == 6
    # Another connection is not affected.
    other = await server.connected("bob")
    assert "result" in await other.call("ping")


async def test_connections_per_process(make_server: ServerFactory) -> None:
    server = await make_server({"limits": {"max_connections": 2}})
    await server.connected("a")
    await server.connected("b")
    with pytest.raises(tornado.httpclient.HTTPClientError) as info:
        await tornado.websocket.websocket_connect(server.ws_url)
    assert info.value.code == 503
    assert server.node.metrics.connections_refused == 1


async def test_connect_timeout(make_server: ServerFactory) -> None:
    server = await make_server({"limits": {"connect_timeout": 0.3}})
    raw = await server.raw()
    code, reason = await raw.closed(timeout=3)
    assert (code, reason) == (3502, "connect timeout")
    await wait_for(lambda: not server.node.sessions)


async def test_dead_peer_is_dropped_by_ping(make_server: ServerFactory) -> None:
    server = await make_server({"limits": {"ping_interval": 0.2, "ping_timeout": 0.2}})
    raw = await server.connected()
    assert len(server.node.sessions) == 1
    # A peer that stops answering pings: silence its pong replies.
    raw.conn.protocol._handle_message = lambda opcode, data: None  # type: ignore[method-assign]
    # Missed pong, then the closing handshake the dead peer never answers (5 s).
    await wait_for(lambda: not server.node.sessions, timeout=10, message="dead peer dropped")


async def test_live_peer_is_kept_by_ping(make_server: ServerFactory) -> None:
    server = await make_server({"limits": {"ping_interval": 0.1, "ping_timeout": 0.1}})
    raw = await server.connected()
    await asyncio.sleep(0.6)  # several ping intervals: the property under test is time
    assert len(server.node.sessions) == 1
    assert "result" in await raw.call("ping")


async def test_cross_site_websocket_refused_by_default(make_server: ServerFactory) -> None:
    server = await make_server()
    request = tornado.httpclient.HTTPRequest(
        server.ws_url, headers={"Origin": "https://evil.example"}
    )
    with pytest.raises(tornado.httpclient.HTTPClientError) as info:
        await tornado.websocket.websocket_connect(request)
    assert info.value.code == 403
    # Same origin is fine.
    same = tornado.httpclient.HTTPRequest(
        server.ws_url, headers={"Origin": f"http://127.0.0.1:{server.port}"}
    )
    conn = await tornado.websocket.websocket_connect(same)
    conn.close()


async def test_allowed_origins(make_server: ServerFactory) -> None:
    server = await make_server({"server": {"allowed_origins": ["https://app.example"]}})
    ok = tornado.httpclient.HTTPRequest(server.ws_url, headers={"Origin": "https://app.example"})
    conn = await tornado.websocket.websocket_connect(ok)
    conn.close()
    bad = tornado.httpclient.HTTPRequest(server.ws_url, headers={"Origin": "https://other.example"})
    with pytest.raises(tornado.httpclient.HTTPClientError):
        await tornado.websocket.websocket_connect(bad)


async def test_anonymous_only_where_allowed(make_server: ServerFactory) -> None:
    server = await make_server({"namespaces": {"public": {"allow_anonymous": True}}})
    raw = await server.raw()
    reply = await raw.call("connect", {})
    assert reply["result"]["expires"] is False
    assert "result" in await raw.call("subscribe", {"channel": "public:feed"})
    assert (await raw.call("subscribe", {"channel": "news"}))["error"]["code"] == 103


async def test_private_channel_needs_a_matching_subscription_token(
    make_server: ServerFactory,
) -> None:
    server = await make_server({"namespaces": {"dm": {"private": True}}})
    raw = await server.connected("alice")
    channel = "dm:alice-bob"
    assert (await raw.call("subscribe", {"channel": channel}))["error"]["code"] == 103
    wrong_channel = server.token("alice", channel="dm:other")
    reply = await raw.call("subscribe", {"channel": channel, "token": wrong_channel})
    assert reply["error"]["code"] == 103
    wrong_user = server.token("mallory", channel=channel)
    reply = await raw.call("subscribe", {"channel": channel, "token": wrong_user})
    assert reply["error"]["code"] == 103
    expired = server.token("alice", channel=channel, ttl=-5)
    reply = await raw.call("subscribe", {"channel": channel, "token": expired})
    assert reply["error"]["code"] == 103
    wrong_client = server.token("alice", channel=channel, client="someone-else")
    reply = await raw.call("subscribe", {"channel": channel, "token": wrong_client})
    assert reply["error"]["code"] == 103
    assert server.node.hub.subscribers(channel) == 0
    good = server.token("alice", channel=channel)
    assert "result" in await raw.call("subscribe", {"channel": channel, "token": good})


async def test_subscription_token_cannot_connect(server) -> None:  # type: ignore[no-untyped-def]
    raw = await server.raw()
    reply = await raw.call("connect", {"token": server.token("alice", channel="news")})
    assert reply["error"]["code"] == 101
