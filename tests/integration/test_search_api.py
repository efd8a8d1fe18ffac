"""Search on a running node (embedded SQLite log and FTS5 index): the HTTP
API, the protocol command and who may see what, then subscribing from a
hit's position; history pages both ways; retention."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
import tornado.httpclient

from server.client import ApiClient, ApiError, ReplyError
from tests.conftest import API_KEY, Running, ServerFactory, wait_for

SEARCH = {
    "namespaces": {
        "chat": {"persist": True, "searchable": True, "allow_publish": True, "history_size": 5},
        "vault": {"persist": True, "searchable": True, "private": True},
        "notes": {"persist": True, "searchable": True, "search_fields": ["title"]},
        "plain": {"persist": True},
    },
    "search": {"interval": 0.05},
}

WORDS = ["apple", "banana", "cherry"]


async def indexed(run: Running, count: int) -> None:
    """Wait until the indexer has caught up with ``count`` publications."""
    indexer = run.node.indexer
    assert indexer is not None
    await wait_for(lambda: indexer.indexed >= count, 10, f"{count} publications indexed")


async def search(api: ApiClient, query: str, **params: Any) -> dict[str, Any]:
    return await api.search(query, **params)


async def test_search_then_continue_live_from_a_hit(make_server: ServerFactory) -> None:
    run = await make_server(SEARCH)
    api = run.api()
    for n in range(1, 31):
        await api.publish("chat:room", {"text": f"message {n} about {WORDS[n % 3]}", "n": n})
    await indexed(run, 30)
    result = await search(api, "banana", limit=4)
    assert [orjson.loads(orjson.dumps(h["data"]))["n"] for h in result["hits"]] == [28, 25, 22, 19]
    assert result["cursor"]
    hit = result["hits"][-1]
    assert (hit["channel"], hit["offset"]) == ("chat:room", 19)
    following = await search(api, "banana", limit=4, cursor=result["cursor"])
    assert [h["offset"] for h in following["hits"]] == [16, 13, 10, 7]

    # Subscribe from the hit: it and everything after it, once and in order,
    # from the durable log (the broker keeps only 5), then live.
    client = await run.client("reader")
    sub = await client.subscribe("chat:room", recover_from=(hit["offset"] - 1, hit["epoch"]))
    assert sub.recovered is True
    got = [(await sub.get()).data["n"] for _ in range(12)]
    assert got == list(range(19, 31))
    await api.publish("chat:room", {"text": "live banana", "n": 31})
    assert (await sub.get()).data["n"] == 31
    assert sub.queue.empty()


async def test_search_api_over_get_and_its_errors(make_server: ServerFactory) -> None:
    run = await make_server(SEARCH)
    api = run.api()
    await api.publish("chat:a", {"text": "Grüße aus Köln", "tags": ["travel"]})
    await api.publish("notes:n", {"title": "Shopping list", "body": "milk and apple"})
    await indexed(run, 2)
    http = tornado.httpclient.AsyncHTTPClient()
    url = f"{run.http_url}/api/search?q=k%C3%B6ln&limit=5"
    response = await http.fetch(url, headers={"Authorization": f"apikey {API_KEY}"})
    body = orjson.loads(response.body)["result"]
    assert [h["channel"] for h in body["hits"]] == ["chat:a"]
    assert body["hits"][0]["data"]["tags"] == ["travel"]
    # search_fields: only the title of a note is searchable.
    assert [h["channel"] for h in (await search(api, "shopping"))["hits"]] == ["notes:n"]
    assert (await search(api, "milk"))["hits"] == []

    for params, code in [
        ({"query": ""}, 107),
        ({"query": "x", "cursor": "garbage"}, 107),
        ({"query": "x", "limit": 0}, 107),
        ({"query": "x", "since": "yesterday"}, 107),
        ({"query": "x", "channel": "plain:x"}, 108),
        ({"query": "x", "channel": "nowhere:x"}, 102),
    ]:
        with pytest.raises(ApiError) as err:
            await api.call("search", params)
        assert err.value.code == code, (params, err.value)
    with pytest.raises(tornado.httpclient.HTTPClientError) as http_err:
        await http.fetch(
            f"{run.http_url}/api/search?q=x&limit=ten",
            headers={"Authorization": f"apikey {API_KEY}"},
        )
    assert http_err.value.code == 400
    with pytest.raises(tornado.httpclient.HTTPClientError) as http_err:
        await http.fetch(f"{run.http_url}/api/search?q=x")
    assert http_err.value.code == 401


async def test_search_is_off_without_a_searchable_namespace(server: Running) -> None:
    with pytest.raises(ApiError) as err:
        await server.api().search("anything")
    assert err.value.code == 108
    assert await server.api().info()  # the node is fine otherwise


async def test_clients_search_only_channels_they_may_subscribe_to(
    make_server: ServerFactory,
) -> None:
    run = await make_server(SEARCH)
    api = run.api()
    await api.publish("chat:lobby", {"text": "secret plans"})
    await api.publish("vault:alice", {"text": "secret diary"})
    await api.publish("vault:bob", {"text": "secret stash"})
    await indexed(run, 3)
    alice = await run.client("alice")
    found = await alice.search("secret")
    assert [h["channel"] for h in found["hits"]] == ["chat:lobby"]
    with pytest.raises(ReplyError) as err:
        await alice.search("secret", channel="vault:alice")
    assert err.value.code == 103
    # Once subscribed (with a subscription token), her private channel is in.
    token = run.token("alice", channel="vault:alice")
    await alice.subscribe("vault:alice", token=token)
    found = await alice.search("secret")
    assert [h["channel"] for h in found["hits"]] == ["vault:alice", "chat:lobby"]
    found = await alice.search("secret", channel="vault:alice")
    assert [h["data"]["text"] for h in found["hits"]] == ["secret diary"]
    with pytest.raises(ReplyError):
        await alice.search("secret", channel="vault:bob")
    # The API key sees everything.
    assert len((await api.search("secret"))["hits"]) == 3


async def test_history_pages_both_ways_past_the_window(make_server: ServerFactory) -> None:
    run = await make_server(SEARCH)
    api = run.api()
    for n in range(1, 21):
        await api.publish("chat:h", {"n": n})
    top = await api.history("chat:h", limit=0)
    epoch = top["epoch"]

    async def page(**params: Any) -> list[int]:
        result = await api.history("chat:h", **params)
        return [p["offset"] for p in result["publications"]]

    # Newest first, going back page by page with 'until'.
    assert await page(limit=5, reverse=True) == [20, 19, 18, 17, 16]
    assert await page(limit=5, reverse=True, until={"offset": 16, "epoch": epoch}) == [
        15, 14, 13, 12, 11,
    ]  # fmt: skip
    assert await page(limit=5, reverse=True, until={"offset": 3, "epoch": epoch}) == [2, 1]
    # Oldest first between two positions.
    assert await page(
        limit=50, since={"offset": 4, "epoch": epoch}, until={"offset": 9, "epoch": epoch}
    ) == [5, 6, 7, 8]
    assert await page(limit=3, until={"offset": 20, "epoch": epoch}) == [1, 2, 3]
    # Within the broker's window, 'until' works the same.
    assert await page(limit=2, reverse=True, until={"offset": 19, "epoch": epoch}) == [18, 17]
    with pytest.raises(ApiError) as err:
        await api.history("chat:h", until={"offset": 5})
    assert err.value.code == 107
    with pytest.raises(ApiError) as err:
        await api.history("chat:h", until={"offset": 5, "epoch": "other"})
    assert err.value.code == 112


async def test_retention_removes_old_publications_from_log_and_index(
    make_server: ServerFactory,
) -> None:
    config = {
        "namespaces": {
            "brief": {"persist": True, "searchable": True, "retention": 0.5, "history_size": 1},
            "chat": {"persist": True, "searchable": True},
        },
        "store": {"expire_interval": 0.1},
        "search": {"interval": 0.05},
    }
    run = await make_server(config)
    api = run.api()
    for n in range(3):
        await api.publish("brief:x", {"text": f"fleeting {n}"})
    await api.publish("chat:x", {"text": "fleeting but kept"})
    await indexed(run, 4)
    assert len((await api.search("fleeting"))["hits"]) == 4
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if await run.node.store.count("brief:x") == 0:
            break
        await asyncio.sleep(0.05)
    assert await run.node.store.count("brief:x") == 0
    assert await run.node.store.count("chat:x") == 1
    hits = (await api.search("fleeting"))["hits"]
    assert [h["channel"] for h in hits] == ["chat:x"]
