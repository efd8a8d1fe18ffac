"""Several nodes on one Redis: fan-out across nodes, cluster-wide control,
the cluster view, and Redis outages."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
import tornado.httpclient

from server.client import ApiError
from tests.conftest import ServerFactory, wait_for


@pytest.fixture
def redis_config(redis_server: Any, prefix: str) -> dict[str, Any]:
    return {
        "broker": {
            "url": redis_server.url,
            "prefix": prefix,
            "position_check_interval": 0.5,
            "node_report_interval": 0.2,
            "presence_ttl": 3,
        },
        "namespaces": {"room": {"presence": True, "join_leave": True, "allow_publish": True}},
    }


async def test_publication_reaches_subscribers_on_every_node_in_order(
    make_server: ServerFactory, redis_config: dict[str, Any]
) -> None:
    nodes = [await make_server(redis_config) for _ in range(3)]
    subscribers = []
    for node in nodes:
        raw = await node.connected()
        await raw.call("subscribe", {"channel": "news"})
        subscribers.append(raw)
    for i in range(300):
        await nodes[i % 3].api().publish("news", i)
    for raw in subscribers:
        got = [(await raw.push("pub"))["pub"] for _ in range(300)]
        assert [p["offset"] for p in got] == list(range(1, 301))
        assert [p["data"] for p in got] == list(range(300))


async def test_join_leave_and_presence_across_nodes(
    make_server: ServerFactory, redis_config: dict[str, Any]
) -> None:
    a, b = await make_server(redis_config), await make_server(redis_config)
    alice = await a.connected("alice")
    await alice.call("subscribe", {"channel": "room:1"})
    bob = await b.connected("bob")
    await bob.call("subscribe", {"channel": "room:1"})
    assert (await alice.push("join"))["info"]["user"] == "bob"
    for _ in range(200):
        members = (await alice.call("presence", {"channel": "room:1"}))["result"]["presence"]
        if len(members) == 2:
            break
        await asyncio.sleep(0.01)
    assert sorted(m["user"] for m in members.values()) == ["alice", "bob"]
    bob.close()
    assert (await alice.push("leave"))["info"]["user"] == "bob"


async def test_disconnect_and_unsubscribe_act_on_every_node(
    make_server: ServerFactory, redis_config: dict[str, Any]
) -> None:
    a, b = await make_server(redis_config), await make_server(redis_config)
    on_a = await a.connected("alice")
    on_b = await b.connected("alice")
    await on_b.call("subscribe", {"channel": "news"})
    await a.api().call("unsubscribe", {"user": "alice", "channel": "news"})
    assert (await on_b.push("unsubscribe"))["channel"] == "news"
    await a.api().call("disconnect", {"user": "alice"})
    assert (await on_a.closed())[0] == 3503
    assert (await on_b.closed())[0] == 3503


async def test_cluster_view_in_info_and_status(
    make_server: ServerFactory, redis_config: dict[str, Any]
) -> None:
    a, b = await make_server(redis_config), await make_server(redis_config)
    await b.connected("bob")
    await b.connected("carol")

    async def info() -> dict[str, Any]:
        return dict(await a.api().info())

    for _ in range(100):
        result = await info()
        if result["totals"]["connections"] == 2:
            break
        await asyncio.sleep(0.05)
    assert sorted(n["node"] for n in result["nodes"]) == sorted([a.node.node_id, b.node.node_id])
    assert result["totals"]["nodes"] == 2
    client = tornado.httpclient.AsyncHTTPClient()
    response = await client.fetch(f"{a.http_url}/status?scope=cluster")
    status = orjson.loads(response.body)
    assert status["totals"]["connections"] == 2


@pytest.mark.parametrize("persistent", [True, False])
async def test_redis_down_publish_fails_clearly_clients_stay_and_recover(
    make_server: ServerFactory, prefix: str, persistent: bool
) -> None:
    from tests.services import RedisServer

    extra = ("--appendonly", "yes", "--appendfsync", "always") if persistent else ()
    redis = RedisServer(*extra).start()
    try:
        config = {"broker": {"url": redis.url, "prefix": prefix, "timeout": 1.0,
                             "position_check_interval": 0.3}}  # fmt: skip
        a = await make_server(config)
        b = await make_server(config)
        client = await b.client("alice", min_backoff=0.05)
        sub = await client.subscribe("news")
        api = a.api()
        first = await api.publish("news", "before")
        assert (await sub.get()).data == "before"

        port = redis.port
        redis.stop()
        with pytest.raises(ApiError) as info:
            await api.publish("news", "during")
        assert (info.value.status, info.value.code) == (503, 114)
        await wait_for(lambda: not a.node.ready(), message="/ready false without Redis")
        assert len(b.node.sessions) == 1  # clients stay connected

        redis.start(port=port)
        await wait_for(lambda: a.node.ready() and b.node.ready(), timeout=15, message="nodes back")
        if persistent:
            # Same stream: nothing was lost, the failed publish never happened.
            await wait_for(lambda: b.node.hub.subscribers("news") == 1)
            after = await api.publish("news", "after")
            assert (after["offset"], after["epoch"]) == (2, first["epoch"])
            got = await sub.get(timeout=10)
            assert (got.data, got.offset) == ("after", 2)
            assert client.connects == 1
        else:
            # Redis came back empty: the stream restarted under a new epoch.
            # The subscriber is told to recover and learns that it cannot.
            await wait_for(lambda: client.connects == 2 and sub.gaps == 1, timeout=15,
                           message="subscriber told of the lost stream")  # fmt: skip
            await wait_for(lambda: b.node.hub.subscribers("news") == 1)
            await api.publish("news", "after")
            assert (await sub.get(timeout=10)).data == "after"
    finally:
        redis.stop()


@pytest.mark.parametrize("in_flight", [256, 4])
async def test_a_burst_of_publishes_is_answered_in_order_and_delivered_together(
    make_server: ServerFactory,
    redis_config: dict[str, Any],
    in_flight: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With a small in-flight limit the session keeps stopping for the oldest
    # publishes, often when a whole pipeline of them was answered at once.
    monkeypatch.setattr("server.session.MAX_INFLIGHT_PUBLISHES", in_flight)
    # A client that sends many publishes at once does not wait a Redis round
    # trip for each: they go out together, keep their order, and reach the
    # other node's subscriber in a few frames, not one per publication.
    config = {**redis_config, "limits": {"commands_per_second": 1000, "command_burst": 1000}}
    a, b = await make_server(config), await make_server(config)
    watcher = await b.connected("bob")
    await watcher.call("subscribe", {"channel": "room:burst"})
    publisher = await a.connected("alice")
    await publisher.call("subscribe", {"channel": "room:burst"})
    commands = []
    for i in range(1, 301):
        params: dict[str, Any] = {"channel": "room:burst", "data": {"n": i}}
        if i == 150:
            params = {"channel": "no-publish-here", "data": {"n": i}}
        commands.append({"id": 100 + i, "method": "publish", "params": params})
        if i == 200:
            commands.append({"id": 1000, "method": "history", "params": {"channel": "room:burst"}})
        if i == 250:
            commands.append({"id": 1001, "method": ""})  # answered at once, still in order
    for start in range(0, len(commands), 50):
        publisher.send("\n".join(orjson.dumps(c).decode() for c in commands[start : start + 50]))
    replies: list[dict[str, Any]] = []
    while len(replies) < len(commands):
        message = await publisher.recv()
        if "id" in message:
            replies.append(message)
    assert [r["id"] for r in replies] == [c["id"] for c in commands]
    offsets = [r["result"]["offset"] for r in replies if "result" in r and r["id"] != 1000]
    assert replies[251]["error"]["code"] == 107
    assert offsets == list(range(1, 300))
    assert replies[149]["error"]["code"] == 103  # the refused one, in its place
    history = replies[200]["result"]
    assert history["offset"] == 199  # it saw every publish sent before it
    assert history["publications"][-1]["data"] == {"n": 200}
    frames_before = watcher.frames
    got = [(await watcher.push("pub"))["pub"] for _ in range(299)]
    assert [p["offset"] for p in got] == list(range(1, 300))
    assert [p["data"]["n"] for p in got] == [n for n in range(1, 301) if n != 150]
    assert watcher.frames - frames_before < 100


async def test_a_subscriber_never_gets_again_what_its_subscribe_reply_covered(
    make_server: ServerFactory, redis_config: dict[str, Any]
) -> None:
    # Publications can still be on their way to a node (in its pub/sub
    # socket, or being read back from history) when a client there
    # subscribes, and Redis already counts them in the position the reply
    # gives. When they arrive, the node hands them to its earlier
    # subscribers only: the new one was told it is past them.
    config = {**redis_config, "broker": {**redis_config["broker"], "position_check_interval": 60}}
    a, b = await make_server(config), await make_server(config)
    early = await b.connected("early")
    await early.call("subscribe", {"channel": "news"})
    broker = b.node.broker
    deliver = broker.on_message
    delayed: list[tuple[str, bytes]] = []
    broker.on_message = lambda name, message: delayed.append((name, message))  # type: ignore[method-assign]
    api = a.api()
    for i in range(3):
        await api.publish("news", i)
    await wait_for(lambda: sum(m[:1] == b"p" for _, m in delayed) == 3, message="3 delayed")
    late = await b.connected("late")
    reply = (await late.call("subscribe", {"channel": "news"}))["result"]
    assert reply["offset"] == 3
    recovering = await b.connected("recovering")
    recovered = await recovering.call(
        "subscribe", {"channel": "news", "recover": True, "offset": 1, "epoch": reply["epoch"]}
    )
    assert [p["offset"] for p in recovered["result"]["publications"]] == [2, 3]
    broker.on_message = deliver  # type: ignore[method-assign]
    for name, message in delayed:
        deliver(name, message)
    await api.publish("news", 3)
    assert [(await early.push("pub"))["pub"]["offset"] for _ in range(4)] == [1, 2, 3, 4]
    assert (await late.push("pub"))["pub"]["data"] == 3
    assert (await recovering.push("pub"))["pub"]["data"] == 3
    assert not late.pushes and not recovering.pushes
