"""The durable log on MongoDB (FerretDB) and search on OpenSearch, chosen by
configuration alone, with the real servers stopped mid-stream; and the whole
path end to end: 10,000 publications, a search, a subscription from a hit."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest

from server.client import ApiClient, ApiError
from tests.conftest import ServerFactory, mongo_url, wait_for
from tests.services import FerretDB, OpenSearchNode

LOG = {"persist": True, "searchable": True, "allow_publish": True, "history_size": 50}


@pytest.fixture
def own_ferretdb() -> Iterator[FerretDB]:
    """A FerretDB of this test's own: the test stops and restarts it."""
    server = FerretDB().start()
    yield server
    server.stop()


@pytest.fixture
def own_opensearch() -> Iterator[OpenSearchNode]:
    node = OpenSearchNode().start()
    yield node
    node.stop()


async def all_hits(api: ApiClient, query: str, **params: Any) -> list[tuple[str, int]]:
    """Every hit of a query, page by page by cursor."""
    out: list[tuple[str, int]] = []
    cursor = None
    for _ in range(1000):
        page = await api.search(
            query, limit=100, **({"cursor": cursor} if cursor else {}), **params
        )
        out += [(h["channel"], h["offset"]) for h in page["hits"]]
        cursor = page["cursor"]
        if cursor is None:
            return out
    raise AssertionError("too many pages")


async def test_store_outage_fails_publishes_cleanly_and_loses_nothing(
    make_server: ServerFactory, own_ferretdb: FerretDB
) -> None:
    config = {
        "store": {"url": mongo_url(own_ferretdb), "timeout": 1.0, "retries": 1},
        "namespaces": {"log": {**LOG, "searchable": False}},
    }
    run = await make_server(config)
    api = run.api()
    client = await run.client("watcher")
    sub = await client.subscribe("log:a")
    for n in range(1, 11):
        assert (await api.publish("log:a", {"n": n}))["offset"] == n
    assert [(await sub.get()).data["n"] for _ in range(10)] == list(range(1, 11))

    own_ferretdb.stop()
    for n in range(11, 14):
        with pytest.raises(ApiError) as err:
            await api.publish("log:a", {"n": -n})
        assert (err.value.status, err.value.code) == (503, 114)
        assert "store" in err.value.message
    status = await api.info()
    assert status is not None
    assert sub.queue.empty()  # a failed publish reached nobody

    own_ferretdb.start()
    for n in range(11, 16):
        assert (await api.publish("log:a", {"n": n}))["offset"] == n
    assert [(await sub.get()).data["n"] for _ in range(5)] == list(range(11, 16))
    assert run.node.store.healthy()
    history = await api.history("log:a", limit=100)
    assert [p["data"]["n"] for p in history["publications"]] == list(range(1, 16))
    assert await run.node.store.count("log:a") == 15


async def test_search_outage_publications_flow_and_indexing_resumes_exactly_once(
    make_server: ServerFactory, ferretdb: FerretDB, own_opensearch: OpenSearchNode
) -> None:
    index = f"squall-fault-{int(time.time() * 1000)}"
    config = {
        "store": {"url": mongo_url(ferretdb)},
        "search": {
            "url": own_opensearch.url,
            "engine": "opensearch",
            "index": index,
            "interval": 0.05,
            "batch_size": 50,
            "timeout": 2.0,
        },
        "namespaces": {"log": LOG},
    }
    run = await make_server(config)
    api = run.api()
    indexer = run.node.indexer
    assert indexer is not None
    published: set[tuple[str, int]] = set()

    async def publish(n: int) -> None:
        channel = f"log:c{n % 3}"
        result = await api.publish(channel, {"text": f"event number {n} marker"})
        published.add((channel, result["offset"]))

    for n in range(150):
        await publish(n)
    await wait_for(lambda: indexer.indexed >= 150, 30, "first 150 indexed")

    own_opensearch.stop()
    for n in range(150, 300):  # publishing goes on while search is down
        await publish(n)
    await wait_for(lambda: indexer.failures > 0, 30, "the indexer to notice the outage")
    assert indexer.indexed < 300
    assert not run.node.search.healthy()  # type: ignore[union-attr]

    own_opensearch.start()
    for n in range(300, 350):
        await publish(n)
    await wait_for(lambda: indexer.indexed >= 350, 90, "indexing to catch up")
    assert await run.node.store.pending_index(10) == []
    assert await run.node.search.count() == 350  # type: ignore[union-attr]
    hits = await all_hits(api, "marker")
    assert len(hits) == 350
    assert set(hits) == published


@pytest.mark.timeout(600)  # ~80 s alone; FerretDB on SQLite writes slowly, coverage doubles it
async def test_ten_thousand_publications_search_then_continue_live(
    make_server: ServerFactory, ferretdb: FerretDB, elastic_front: Any
) -> None:
    """MongoDB log + the elasticsearch client (through the front): publish
    10,000, search, subscribe from a hit, get everything after it once and in
    order, then live ones."""
    channels = [f"log:room{i}" for i in range(4)]
    config = {
        "store": {"url": mongo_url(ferretdb)},
        "search": {
            "url": elastic_front.url,
            "engine": "elasticsearch",
            "index": f"squall-e2e-{int(time.time() * 1000)}",
            "batch_size": 1000,
            "interval": 0.05,
        },
        "namespaces": {"log": LOG},
        "limits": {"max_recovery_publications": 10000},
    }
    run = await make_server(config)
    api = run.api()
    started = time.monotonic()

    async def publisher(channel: str) -> None:
        for n in range(1, 2501):
            word = "zephyr" if n % 250 == 0 else "plain"
            await api.publish(channel, {"text": f"{word} message {n}", "n": n})

    await asyncio.gather(*(publisher(c) for c in channels))
    publish_s = time.monotonic() - started
    indexer = run.node.indexer
    assert indexer is not None
    await wait_for(lambda: indexer.indexed >= 10000, 120, "10,000 publications indexed")
    assert await run.node.search.count() == 10000  # type: ignore[union-attr]

    hits = (await api.search("zephyr", channel="log:room2", limit=100))["hits"]
    assert [h["data"]["n"] for h in hits] == list(range(2500, 0, -250))
    hit = hits[-2]  # n = 500: 2,001 publications from there to the top
    assert hit["offset"] == 500
    client = await run.client("reader")
    sub = await client.subscribe("log:room2", recover_from=(hit["offset"] - 1, hit["epoch"]))
    assert sub.recovered is True
    got = [(await sub.get()).offset for _ in range(2001)]
    assert got == list(range(500, 2501))
    for n in range(2501, 2506):
        await api.publish("log:room2", {"text": "live", "n": n})
    assert [(await sub.get()).data["n"] for _ in range(5)] == list(range(2501, 2506))
    assert sub.queue.empty()
    logging.getLogger("tests").info("10,000 durable publications in %.1fs", publish_s)
