"""POST /api/batch: many API commands in one request, one reply each, in
order; per-command failures; stop_on_error; limits; NDJSON; on the embedded
broker and on Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
import tornado.httpclient

from server.client import ApiError, command
from tests.conftest import RawWS, Running, ServerFactory

NDJSON = "application/x-ndjson"


async def post_batch(
    server: Running,
    body: bytes | str,
    *,
    key: str | None = "",
    content_type: str = "application/json",
    query: str = "",
) -> tuple[int, str, bytes]:
    """POST a raw body to /api/batch: (status, content type, body)."""
    headers = {"Content-Type": content_type}
    if key is not None:
        headers["Authorization"] = f"apikey {key or server.settings.auth.api_key}"
    client = tornado.httpclient.AsyncHTTPClient()
    response = await client.fetch(
        f"{server.http_url}/api/batch{query}",
        method="POST",
        body=body,
        headers=headers,
        raise_error=False,
    )
    return response.code, response.headers.get("Content-Type", ""), response.body


async def batch_json(server: Running, commands: list[Any], **extra: Any) -> tuple[int, Any]:
    status, _, body = await post_batch(server, orjson.dumps({"commands": commands, **extra}))
    return status, orjson.loads(body)


def publish(channel: str, data: Any) -> dict[str, Any]:
    return command("publish", channel=channel, data=data)


async def received(raw: RawWS, n: int) -> dict[str, list[tuple[int, Any]]]:
    """The next ``n`` publications ``raw`` gets: per channel, (offset, data)
    in the order they arrived."""
    got: dict[str, list[tuple[int, Any]]] = {}
    for _ in range(n):
        push = await raw.push("pub")
        got.setdefault(push["channel"], []).append((push["pub"]["offset"], push["pub"]["data"]))
    return got


async def history_data(server: Running, channel: str) -> list[Any]:
    result = await server.api().history(channel, limit=1000)
    return [p["data"] for p in result["publications"]]


async def until_present(server: Running, channel: str, n: int) -> None:
    """Presence is written just after a subscribe reply: wait until it shows."""
    deadline = asyncio.get_running_loop().time() + 5
    while len((await server.api().presence(channel))["presence"]) < n:
        assert asyncio.get_running_loop().time() < deadline, "presence never showed"
        await asyncio.sleep(0.01)


# ---- ordering and mixed methods --------------------------------------------


async def check_order_within_channels(server: Running) -> None:
    """Interleaved publications to three channels, and a read in between:
    each channel's publications arrive, and get offsets, in command order."""
    raw = await server.connected()
    channels = ["news", "sport", "log:audit"]
    for name in channels:
        await raw.call("subscribe", {"channel": name})
    commands = [publish(channels[i % 3], i) for i in range(150)]
    # A read in the middle sees every publication before it.
    commands.insert(75, command("history", channel="news", limit=0))
    replies = await server.api().batch(commands)

    assert len(replies) == 151
    assert all("result" in r for r in replies), [r for r in replies if "error" in r]
    assert replies[75]["result"]["offset"] == 25  # news got 0, 3, ..., 72 before it
    offsets: dict[str, list[int]] = {}
    for cmd, reply in zip(commands, replies, strict=True):
        if cmd["method"] == "publish":
            offsets.setdefault(cmd["params"]["channel"], []).append(reply["result"]["offset"])
    assert offsets == {name: list(range(1, 51)) for name in channels}

    got = await received(raw, 150)
    for k, name in enumerate(channels):
        assert got[name] == [(n + 1, i) for n, i in enumerate(range(k, 150, 3))]
        assert await history_data(server, name) == list(range(k, 150, 3))


ORDER_CONFIG = {"namespaces": {"log": {"persist": True, "history_size": 1000}}}


async def test_publications_to_one_channel_keep_their_order(make_server: ServerFactory) -> None:
    await check_order_within_channels(await make_server(ORDER_CONFIG))


async def test_mixed_methods_reply_in_order(make_server: ServerFactory) -> None:
    server = await make_server({"namespaces": {"room": {"presence": True}}})
    alice = await server.connected("alice")
    await alice.call("subscribe", {"channel": "room:1"})
    await until_present(server, "room:1", 1)
    replies = await server.api().batch(
        [
            publish("news", {"title": "one"}),
            command("broadcast", channels=["a", "b"], data=2),
            command("history", channel="news", limit=10),
            command("presence_stats", channel="room:1"),
            command("channels", prefix="room:"),
            command("info"),
            publish("news", {"title": "two"}),
        ]
    )
    assert [list(r) for r in replies] == [["result"]] * 7
    assert replies[0]["result"]["offset"] == 1
    assert [r["channel"] for r in replies[1]["result"]["responses"]] == ["a", "b"]
    assert [p["data"] for p in replies[2]["result"]["publications"]] == [{"title": "one"}]
    assert replies[3]["result"] == {"num_clients": 1, "num_users": 1}
    assert replies[4]["result"] == {"channels": {"room:1": {"num_clients": 1}}}
    assert replies[5]["result"]["nodes"][0]["node"] == server.node.node_id
    assert replies[6]["result"]["offset"] == 2


async def test_control_commands_reach_connections(server: Running) -> None:
    alice = await server.connected("alice")
    bob = await server.connected("bob")
    await bob.call("subscribe", {"channel": "news"})
    replies = await server.api().batch(
        [
            command("unsubscribe", user="bob", channel="news"),
            command("disconnect", user="alice"),
        ]
    )
    assert replies == [{"result": {}}, {"result": {}}]
    assert (await alice.closed())[0] == 3503
    assert (await bob.push("unsubscribe"))["channel"] == "news"


async def test_empty_batch(server: Running) -> None:
    assert await server.api().batch([]) == []


# ---- failures, one command at a time ---------------------------------------


async def test_each_command_fails_or_succeeds_on_its_own(make_server: ServerFactory) -> None:
    server = await make_server({"limits": {"max_publication_bytes": 100}})
    raw = await server.connected()
    await raw.call("subscribe", {"channel": "news"})
    replies = await server.api().batch(
        [
            publish("news", 1),
            command("nope"),  # unknown method
            command("batch", commands=[]),  # no batch in a batch
            command("publish", channel="news"),  # bad params: no data
            publish("bad name", 1),  # malformed channel
            publish("nons:x", 1),  # a namespace that is not configured refuses it
            publish("news", "x" * 200),  # too large for the channel
            command("history", channel="news", since={"offset": "x"}),
            publish("news", 2),
        ]
    )
    codes = [r["error"]["code"] if "error" in r else None for r in replies]
    assert codes == [None, 104, 104, 107, 107, 102, 115, 107, None]
    assert "'nope'" in replies[1]["error"]["message"]
    assert "batch" in replies[2]["error"]["message"]
    assert "data" in replies[3]["error"]["message"]
    assert "nons" in replies[5]["error"]["message"]
    # The commands after the failures ran; the failed ones published nothing.
    assert replies[8]["result"]["offset"] == 2
    assert await received(raw, 2) == {"news": [(1, 1), (2, 2)]}
    assert await history_data(server, "news") == [1, 2]


async def test_stop_on_error_answers_the_rest_as_not_run(server: Running) -> None:
    replies = await server.api().batch(
        [publish("news", 1), publish("sport", 2), command("publish", channel="news"),
         publish("news", 3), command("info")],
        stop_on_error=True,
    )  # fmt: skip
    assert "result" in replies[0] and "result" in replies[1]
    assert replies[2]["error"]["code"] == 107
    assert len(replies) == 5
    for reply in replies[3:]:
        assert reply["error"]["code"] == 108
        assert reply["error"]["message"].startswith("not run: command 2 failed")
    assert await history_data(server, "news") == [1]
    assert await history_data(server, "sport") == [2]


async def test_without_stop_on_error_the_rest_still_runs(server: Running) -> None:
    status, body = await batch_json(
        server,
        [publish("news", 1), command("publish", channel="news"), publish("news", 3)],
        stop_on_error=False,
    )
    assert status == 200
    assert [list(r) for r in body["replies"]] == [["result"], ["error"], ["result"]]
    assert await history_data(server, "news") == [1, 3]


# ---- the whole request refused ---------------------------------------------


async def test_too_many_commands_runs_nothing(make_server: ServerFactory) -> None:
    server = await make_server({"limits": {"max_batch_commands": 3}})
    status, body = await batch_json(server, [publish("news", i) for i in range(4)])
    assert status == 400
    assert body["error"]["code"] == 106
    assert "max_batch_commands" in body["error"]["message"]
    assert await history_data(server, "news") == []
    assert server.node.metrics.publications_in == 0
    # The limit itself is fine.
    replies = await server.api().batch([publish("news", i) for i in range(3)])
    assert [r["result"]["offset"] for r in replies] == [1, 2, 3]


async def test_too_large_body_is_a_clear_413(server: Running) -> None:
    limit = server.settings.limits.max_publication_bytes + 1024 * 1024
    commands = [publish("news", "x" * 1000) for _ in range(limit // 1000 + 10)]
    body = orjson.dumps({"commands": commands})
    assert len(body) > limit
    status, kind, reply = await post_batch(server, body)
    assert status == 413
    assert kind.startswith("application/json")
    error = orjson.loads(reply)["error"]
    assert error["code"] == 115
    assert str(limit) in error["message"]
    assert await history_data(server, "news") == []
    # The same connection pool still works afterwards.
    assert (await server.api().batch([publish("news", 1)]))[0]["result"]["offset"] == 1


GOOD = '{"method": "publish", "params": {"channel": "news", "data": 1}}'


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ("not json", "not valid JSON"),
        ("[" + GOOD + "]", "JSON object"),
        ('"commands"', "JSON object"),
        ("{}", "'commands' must be a list"),
        ('{"commands": {"0": ' + GOOD + "}}", "'commands' must be a list"),
        ('{"commands": [' + GOOD + ", 1]}", "commands[1] must be an object"),
        ('{"commands": [' + GOOD + ', ["publish"]]}', "commands[1] must be an object"),
        ('{"commands": [' + GOOD + ', {"params": {}}]}', "commands[1]: 'method'"),
        ('{"commands": [' + GOOD + ', {"method": 7}]}', "commands[1]: 'method'"),
        ('{"commands": [' + GOOD + ', {"method": "info", "params": []}]}', "'params'"),
        ('{"commands": [' + GOOD + ', {"method": "info", "parms": {}}]}', "'parms'"),
        ('{"commands": [' + GOOD + '], "stop_on_error": "yes"}', "stop_on_error"),
        ('{"commands": [' + GOOD + '], "stop": true}', "'stop'"),
    ],
)
async def test_malformed_batch_runs_nothing(server: Running, body: str, words: str) -> None:
    status, _, reply = await post_batch(server, body)
    assert status == 400
    error = orjson.loads(reply)["error"]
    assert error["code"] == 107
    assert words in error["message"]
    assert server.node.metrics.publications_in == 0
    assert await history_data(server, "news") == []


async def test_api_key_required(server: Running) -> None:
    body = orjson.dumps({"commands": [publish("news", 1)]})
    for key in (None, "wrong-key-0123456789"):
        status, _, reply = await post_batch(server, body, key=key)
        assert status == 401
        assert orjson.loads(reply)["error"]["code"] == 101
    status, kind, reply = await post_batch(server, GOOD + "\n", key=None, content_type=NDJSON)
    assert (status, kind) == (401, NDJSON)
    assert orjson.loads(reply)["error"]["code"] == 101
    assert await history_data(server, "news") == []


async def test_get_is_refused(server: Running) -> None:
    client = tornado.httpclient.AsyncHTTPClient()
    response = await client.fetch(f"{server.http_url}/api/batch", raise_error=False)
    assert response.code == 405
    assert response.headers["Allow"] == "POST"
    assert "POST" in orjson.loads(response.body)["error"]["message"]


async def test_client_raises_on_a_refused_request(make_server: ServerFactory) -> None:
    server = await make_server({"limits": {"max_batch_commands": 1}})
    with pytest.raises(ApiError) as info:
        await server.api().batch([publish("news", 1), publish("news", 2)])
    assert (info.value.status, info.value.code) == (400, 106)


# ---- NDJSON ----------------------------------------------------------------


def ndjson(*commands: dict[str, Any]) -> bytes:
    return b"".join(orjson.dumps(c) + b"\n" for c in commands)


async def test_ndjson_in_and_out(server: Running) -> None:
    raw = await server.connected()
    await raw.call("subscribe", {"channel": "news"})
    body = ndjson(publish("news", {"n": 1}), command("nope"), publish("news", {"n": 2}))
    body += b"\n" + ndjson(command("history", channel="news", limit=0))  # a blank line
    status, kind, reply = await post_batch(server, body, content_type=f"{NDJSON}; charset=utf-8")
    assert (status, kind) == (200, NDJSON)
    assert reply.endswith(b"\n")
    lines = [orjson.loads(line) for line in reply.splitlines()]
    assert len(lines) == 4
    assert lines[0]["result"]["offset"] == 1
    assert lines[1]["error"]["code"] == 104
    assert lines[2]["result"]["offset"] == 2
    assert lines[3]["result"]["offset"] == 2
    assert await received(raw, 2) == {"news": [(1, {"n": 1}), (2, {"n": 2})]}


async def test_ndjson_stop_on_error_in_the_query(server: Running) -> None:
    body = ndjson(publish("news", 1), command("publish", channel="news"), publish("news", 3))
    status, _, reply = await post_batch(
        server, body, content_type=NDJSON, query="?stop_on_error=true"
    )
    assert status == 200
    lines = [orjson.loads(line) for line in reply.splitlines()]
    assert [r["error"]["code"] if "error" in r else None for r in lines] == [None, 107, 108]
    assert await history_data(server, "news") == [1]
    status, _, reply = await post_batch(
        server, body, content_type=NDJSON, query="?stop_on_error=maybe"
    )
    assert status == 400
    assert await history_data(server, "news") == [1]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (GOOD + "\n{not json\n", "line 2 is not valid JSON"),
        (GOOD + "\n\n[1]\n", "line 3 must be an object"),
        (GOOD + '\n{"commands": []}\n', "line 2: 'method'"),
    ],
)
async def test_malformed_ndjson_runs_nothing(server: Running, body: str, words: str) -> None:
    status, kind, reply = await post_batch(server, body, content_type=NDJSON)
    assert (status, kind) == (400, NDJSON)
    (line,) = reply.splitlines()
    assert words in orjson.loads(line)["error"]["message"]
    assert await history_data(server, "news") == []


async def test_ndjson_counts_against_the_command_limit(make_server: ServerFactory) -> None:
    server = await make_server({"limits": {"max_batch_commands": 2}})
    body = ndjson(*(publish("news", i) for i in range(3)))
    status, _, reply = await post_batch(server, body, content_type=NDJSON)
    assert status == 400
    assert orjson.loads(reply)["error"]["code"] == 106
    assert await history_data(server, "news") == []


# ---- on Redis --------------------------------------------------------------


@pytest.fixture
def redis_config(redis_server: Any, prefix: str) -> dict[str, Any]:
    return {"broker": {"url": redis_server.url, "prefix": prefix}, **ORDER_CONFIG}


async def test_order_within_channels_on_redis(
    make_server: ServerFactory, redis_config: dict[str, Any]
) -> None:
    server = await make_server(redis_config)
    assert server.node.broker.ordered_publish  # publishes are pipelined here
    await check_order_within_channels(server)


async def test_failures_among_pipelined_publishes_on_redis(
    make_server: ServerFactory, redis_config: dict[str, Any]
) -> None:
    server = await make_server(redis_config)
    commands = [publish("news", i) for i in range(10)]
    commands[4] = publish("nons:x", 4)
    commands[7] = command("publish", channel="news")
    replies = await server.api().batch(commands)
    assert [r["error"]["code"] if "error" in r else r["result"]["offset"] for r in replies] == [
        1, 2, 3, 4, 102, 5, 6, 107, 7, 8,
    ]  # fmt: skip
    assert await history_data(server, "news") == [0, 1, 2, 3, 5, 6, 8, 9]
