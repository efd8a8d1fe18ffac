"""Each protocol command and error code over a real WebSocket."""

from __future__ import annotations

import time

import pytest

from tests.conftest import Running, ServerFactory


async def test_connect_returns_client_id_and_expiry(server: Running) -> None:
    raw = await server.raw()
    reply = await raw.call("connect", {"token": server.token("alice", ttl=120)})
    result = reply["result"]
    assert len(result["client"]) == 16
    assert result["expires"] is True
    assert 100 < result["ttl"] <= 120
    assert result["version"] == server.node.version
    assert result["node"] == server.node.node_id


async def test_command_before_connect_is_refused(server: Running) -> None:
    raw = await server.raw()
    reply = await raw.call("subscribe", {"channel": "news"})
    assert reply["error"]["code"] == 113
    # The connection stays usable: connect now works.
    reply = await raw.call("connect", {"token": server.token()})
    assert "result" in reply


async def test_connect_twice_is_a_bad_request(server: Running) -> None:
    raw = await server.connected()
    reply = await raw.call("connect", {"token": server.token()})
    assert reply["error"]["code"] == 107


async def test_connect_without_token_when_no_anonymous_namespace(server: Running) -> None:
    raw = await server.raw()
    reply = await raw.call("connect", {})
    assert reply["error"]["code"] == 101
    code, _ = await raw.closed()
    assert code == 3500


async def test_expired_token_gets_109_and_reconnect_code(server: Running) -> None:
    raw = await server.raw()
    reply = await raw.call("connect", {"token": server.token("alice", ttl=-10)})
    assert reply["error"]["code"] == 109
    code, reason = await raw.closed()
    assert (code, reason) == (3005, "token expired")


async def test_subscribe_publish_delivers_with_offsets(make_server: ServerFactory) -> None:
    server = await make_server({"namespaces": {"chat": {"allow_publish": True}}})
    alice = await server.connected("alice")
    bob = await server.connected("bob")
    sub = await bob.call("subscribe", {"channel": "chat:lobby"})
    assert sub["result"]["offset"] == 0
    epoch = sub["result"]["epoch"]
    for i in range(3):
        reply = await alice.call("publish", {"channel": "chat:lobby", "data": {"n": i}})
        assert reply["result"] == {"offset": i + 1, "epoch": epoch}
    for i in range(3):
        push = await bob.push("pub")
        assert push["channel"] == "chat:lobby"
        assert push["pub"]["offset"] == i + 1
        assert push["pub"]["epoch"] == epoch
        assert push["pub"]["data"] == {"n": i}
        assert push["pub"]["info"]["user"] == "alice"


async def test_clients_may_not_publish_by_default(server: Running) -> None:
    raw = await server.connected()
    reply = await raw.call("publish", {"channel": "news", "data": 1})
    assert reply["error"]["code"] == 103
    history = await server.api().history("news")
    assert history["offset"] == 0


async def test_subscribe_twice_and_unsubscribe(server: Running) -> None:
    raw = await server.connected()
    assert "result" in await raw.call("subscribe", {"channel": "news"})
    assert (await raw.call("subscribe", {"channel": "news"}))["error"]["code"] == 105
    assert (await raw.call("unsubscribe", {"channel": "news"}))["result"] == {}
    await server.api().publish("news", {"after": "unsubscribe"})
    # Unsubscribed: the next thing we read is the ping reply, not a pub.
    reply = await raw.call("ping")
    assert reply["result"] == {}
    assert not [p for p in raw.pushes if p.get("push") == "pub"]


@pytest.mark.parametrize(
    ("channel", "code"),
    [
        ("", 107),
        ("has space", 107),
        ("x" * 300, 107),
        (":nons", 107),
        ("ns:", 107),
        ("nosuchns:room", 102),
        (42, 107),
    ],
)
async def test_malformed_channels_are_rejected(server: Running, channel: object, code: int) -> None:
    raw = await server.connected()
    reply = await raw.call("subscribe", {"channel": channel})
    assert reply["error"]["code"] == code
    assert server.node.hub.channel_count == 0


async def test_unknown_method_and_bad_params(server: Running) -> None:
    raw = await server.connected()
    assert (await raw.call("fly"))["error"]["code"] == 104
    raw.send({"id": 50, "method": "subscribe", "params": [1, 2]})
    assert (await raw.reply(50))["error"]["code"] == 107
    raw.send({"id": 51, "method": 7})
    assert (await raw.reply(51))["error"]["code"] == 107
    assert (await raw.call("subscribe", {"channel": "a", "recover": "yes"}))["error"]["code"] == 107
    assert (await raw.call("subscribe", {"channel": "a", "recover": True}))["error"]["code"] == 107


@pytest.mark.parametrize("frame", ["not json", "[1,2]", '{"method": "ping"}', '{"id": -1}', "{}"])
async def test_unanswerable_frames_close_with_bad_request(server: Running, frame: str) -> None:
    raw = await server.connected()
    raw.send(frame)
    code, _ = await raw.closed()
    assert code == 3501


async def test_several_commands_in_one_frame(server: Running) -> None:
    raw = await server.connected()
    ping = '{"id": 10, "method": "ping"}'
    subscribe = '{"id": 11, "method": "subscribe", "params": {"channel": "x"}}'
    raw.send(ping + "\n" + subscribe)
    assert "result" in await raw.reply(10)
    assert (await raw.reply(11))["result"]["offset"] == 0


async def test_history_command(server: Running) -> None:
    api = server.api()
    for i in range(5):
        await api.publish("news", i)
    raw = await server.connected()
    assert (await raw.call("history", {"channel": "news"}))["error"]["code"] == 110
    await raw.call("subscribe", {"channel": "news"})
    reply = await raw.call("history", {"channel": "news", "limit": 2})
    assert [p["data"] for p in reply["result"]["publications"]] == [0, 1]
    reply = await raw.call("history", {"channel": "news", "limit": 2, "reverse": True})
    assert [p["data"] for p in reply["result"]["publications"]] == [4, 3]
    epoch = reply["result"]["epoch"]
    reply = await raw.call("history", {"channel": "news", "since": {"offset": 3, "epoch": epoch}})
    assert [p["offset"] for p in reply["result"]["publications"]] == [4, 5]
    reply = await raw.call("history", {"channel": "news", "since": {"offset": 3, "epoch": "old"}})
    assert reply["error"]["code"] == 112
    reply = await raw.call("history", {"channel": "news", "limit": -1})
    assert reply["error"]["code"] == 107


async def test_history_off_is_not_available(make_server: ServerFactory) -> None:
    server = await make_server({"namespaces": {"live": {"history_size": 0, "recover": False}}})
    raw = await server.connected()
    await raw.call("subscribe", {"channel": "live:x"})
    assert (await raw.call("history", {"channel": "live:x"}))["error"]["code"] == 108
    assert (await raw.call("presence", {"channel": "live:x"}))["error"]["code"] == 108


async def test_presence_and_join_leave(make_server: ServerFactory) -> None:
    server = await make_server({"namespaces": {"room": {"presence": True, "join_leave": True}}})
    alice = await server.connected("alice", info={"name": "Alice"})
    await alice.call("subscribe", {"channel": "room:1"})
    bob = await server.connected("bob")
    await bob.call("subscribe", {"channel": "room:1"})
    join = await alice.push("join")
    assert join["info"]["user"] == "bob"
    reply = await bob.call("presence", {"channel": "room:1"})
    users = sorted(m["user"] for m in reply["result"]["presence"].values())
    assert users == ["alice", "bob"]
    assert any(m.get("info") == {"name": "Alice"} for m in reply["result"]["presence"].values())
    bob.close()
    leave = await alice.push("leave")
    assert leave["info"]["user"] == "bob"
    reply = await alice.call("presence", {"channel": "room:1"})
    assert [m["user"] for m in reply["result"]["presence"].values()] == ["alice"]


async def test_refresh_extends_and_expiry_disconnects(server: Running) -> None:
    raw = await server.raw()
    await raw.call("connect", {"token": server.token("alice", ttl=2)})
    reply = await raw.call("refresh", {"token": server.token("bob", ttl=60)})
    assert reply["error"]["code"] == 101
    reply = await raw.call("refresh", {"token": server.token("alice", ttl=60)})
    assert reply["result"]["ttl"] > 50
    # A second connection that does not refresh is dropped at expiry.
    other = await server.raw()
    await other.call("connect", {"token": server.token("carol", ttl=1)})
    started = time.monotonic()
    code, _ = await other.closed(timeout=5)
    assert code == 3005
    assert time.monotonic() - started < 4
    assert "result" in await raw.call("ping")


async def test_server_side_subscriptions_from_token(server: Running) -> None:
    raw = await server.raw()
    token = server.token("alice", channels=["news", "alerts"])
    await raw.call("connect", {"token": token})
    first = await raw.push("subscribe")
    second = await raw.push("subscribe")
    assert {first["channel"], second["channel"]} == {"news", "alerts"}
    await server.api().publish("alerts", "fire")
    push = await raw.push("pub")
    assert push["channel"] == "alerts"


async def test_publication_size_limit(make_server: ServerFactory) -> None:
    server = await make_server(
        {
            "limits": {"max_frame_bytes": 4000, "max_publication_bytes": 1000},
            "namespaces": {"chat": {"allow_publish": True}},
        }
    )
    raw = await server.connected()
    reply = await raw.call("publish", {"channel": "chat:a", "data": "x" * 1000})
    assert reply["error"]["code"] == 115
    raw.send({"id": 99, "method": "publish", "params": {"channel": "chat:a", "data": "x" * 5000}})
    code, _ = await raw.closed()
    assert code == 1009  # frame over the WebSocket message size limit
    assert (await server.api().history("chat:a"))["offset"] == 0


async def test_internal_error_is_code_100_and_the_connection_survives(
    server: Running, caplog: pytest.LogCaptureFixture
) -> None:
    raw = await server.connected()
    await raw.call("subscribe", {"channel": "news"})

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("bug")

    server.node.broker.history = broken  # type: ignore[method-assign]
    reply = await raw.call("history", {"channel": "news"})
    assert reply["error"] == {"code": 100, "message": "internal server error"}
    assert "bug" not in str(reply)  # details go to the log, not to the client
    assert "RuntimeError" in caplog.text
    assert "result" in await raw.call("ping")
