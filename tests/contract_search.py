"""The ``SearchIndex`` contract: every implementation (SQLite FTS5,
OpenSearch, the elasticsearch client) passes these unchanged. A test module
provides a ``search_index`` fixture and imports these tests. ``count()`` makes
what was indexed visible to search (a refresh, on a cluster)."""

from __future__ import annotations

from typing import Any

import orjson

from server.models import ClientInfo, Publication
from server.search import (
    SearchIndex,
    SearchQuery,
    decode_cursor,
    make_doc,
    parse_text,
)


def doc(channel: str, offset: int, data: Any, *, t: int = 0, user: str = "u", ns: str = "") -> Any:
    pub = Publication(
        channel,
        offset,
        "e1",
        orjson.dumps(data),
        ClientInfo("c1", user, {"k": 1}),
        1_700_000_000_000 + (t or offset) * 1000,
    )
    return make_doc(pub, ns or channel.partition(":")[0], [])


def q(text: str, **kwargs: Any) -> SearchQuery:
    words, phrases = parse_text(text)
    return SearchQuery(words, phrases, **kwargs)


async def put(index: SearchIndex, docs: list[Any]) -> None:
    await index.index(docs)
    await index.count()


async def offsets(index: SearchIndex, text: str, **kwargs: Any) -> list[tuple[str, int]]:
    page = await index.search(q(text, **kwargs))
    return [(h.channel, h.offset) for h in page.hits]


async def test_words_and_phrases(search_index: SearchIndex) -> None:
    await put(
        search_index,
        [
            doc("chat:a", 1, {"text": "The big cat sat"}),
            doc("chat:a", 2, {"text": "a cat that is big"}),
            doc("chat:a", 3, {"text": "Dogs only", "tags": ["cat-lover"]}),
            doc("chat:a", 4, {"nested": {"deep": "BIG news"}}),
        ],
    )
    assert await offsets(search_index, "cat") == [("chat:a", 3), ("chat:a", 2), ("chat:a", 1)]
    assert await offsets(search_index, "BIG cat") == [("chat:a", 2), ("chat:a", 1)]
    assert await offsets(search_index, '"big cat"') == [("chat:a", 1)]
    assert await offsets(search_index, '"big news"') == [("chat:a", 4)]
    assert await offsets(search_index, "elephant") == []
    page = await search_index.search(q("sat"))
    hit = page.hits[0]
    assert orjson.loads(hit.data) == {"text": "The big cat sat"}
    assert (hit.epoch, hit.time_ms) == ("e1", 1_700_000_001_000)
    assert hit.info == ClientInfo("c1", "u", {"k": 1})
    assert page.cursor is None


async def test_filters(search_index: SearchIndex) -> None:
    await put(
        search_index,
        [
            doc("room:1", 1, {"m": "hello"}, t=10, user="ann"),
            doc("room:2", 1, {"m": "hello"}, t=20, user="bob"),
            doc("news:x", 1, {"m": "hello"}, t=30, user="ann"),
        ],
    )
    assert await offsets(search_index, "hello", channels=["room:1"]) == [("room:1", 1)]
    assert await offsets(search_index, "hello", namespaces=["room"]) == [
        ("room:2", 1),
        ("room:1", 1),
    ]
    # Either list admits a hit.
    assert await offsets(search_index, "hello", namespaces=["news"], channels=["room:1"]) == [
        ("news:x", 1),
        ("room:1", 1),
    ]
    assert await offsets(search_index, "hello", channels=[]) == []
    assert await offsets(search_index, "hello", user="ann") == [("news:x", 1), ("room:1", 1)]
    base = 1_700_000_000_000
    assert await offsets(search_index, "hello", since_ms=base + 20_000, until_ms=base + 30_000) == [
        ("room:2", 1)
    ]


async def test_pages_newest_first_by_cursor(search_index: SearchIndex) -> None:
    # Pairs share a time, so the order within one millisecond is checked too.
    await put(search_index, [doc("log:p", i, {"m": f"tick {i}"}, t=1 + i // 2) for i in range(25)])
    seen: list[int] = []
    cursor = None
    for _ in range(10):
        query = q("tick", limit=10)
        if cursor is not None:
            query.after = decode_cursor(cursor)
        page = await search_index.search(query)
        assert len(page.hits) <= 10
        seen += [h.offset for h in page.hits]
        cursor = page.cursor
        if cursor is None:
            break
    assert seen == list(range(24, -1, -1))


async def test_indexing_twice_keeps_one(search_index: SearchIndex) -> None:
    docs = [doc("once:a", i, {"m": "again"}) for i in range(1, 4)]
    await put(search_index, docs)
    await put(search_index, [*docs, doc("once:a", 4, {"m": "again"})])
    assert await search_index.count() == 4
    assert await offsets(search_index, "again") == [("once:a", i) for i in (4, 3, 2, 1)]


async def test_expire_and_clear(search_index: SearchIndex) -> None:
    await put(
        search_index,
        [
            doc("old:a", 1, {"m": "w"}, t=1),
            doc("old:a", 2, {"m": "w"}, t=5),
            doc("new:a", 1, {"m": "w"}, t=1),
        ],
    )
    await search_index.expire("old", 1_700_000_003_000)
    await search_index.count()
    assert await offsets(search_index, "w") == [("old:a", 2), ("new:a", 1)]
    await search_index.clear()
    assert await search_index.count() == 0
    assert await offsets(search_index, "w") == []
