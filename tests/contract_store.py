"""The ``Store`` contract: every implementation passes these unchanged.
A test module provides a ``store`` fixture and imports these tests."""

from __future__ import annotations

import pytest

from server.models import ClientInfo, Publication, StreamPosition
from server.store import Store, StoreConflict


def pub(channel: str, offset: int, data: bytes = b"{}", epoch: str = "e1") -> Publication:
    return Publication(channel, offset, epoch, data, ClientInfo("c", "u", {"k": 1}), 1000 + offset)


async def test_append_and_read_in_order(store: Store) -> None:
    await store.append([pub("a", i, b'{"n":%d}' % i) for i in range(1, 11)])
    got = await store.read("a", "e1", limit=100)
    assert [p.offset for p in got] == list(range(1, 11))
    assert got[0].data == b'{"n":1}'
    assert got[0].info == ClientInfo("c", "u", {"k": 1})
    assert got[0].time_ms == 1001
    assert [p.offset for p in await store.read("a", "e1", after=7, limit=100)] == [8, 9, 10]
    assert [p.offset for p in await store.read("a", "e1", after=2, before=5, limit=100)] == [3, 4]
    assert [p.offset for p in await store.read("a", "e1", limit=3, reverse=True)] == [10, 9, 8]
    assert await store.read("a", "other-epoch", limit=10) == []
    assert await store.read("nobody", "e1", limit=10) == []


async def test_retry_is_a_no_op_and_conflict_is_refused(store: Store) -> None:
    await store.append([pub("b", 1, b"1")])
    await store.append([pub("b", 1, b"1")])
    assert len(await store.read("b", "e1", limit=10)) == 1
    with pytest.raises(StoreConflict):
        await store.append([pub("b", 1, b"different")])
    assert (await store.read("b", "e1", limit=10))[0].data == b"1"


async def test_append_is_all_or_nothing(store: Store) -> None:
    await store.append([pub("c", 2, b"taken")])
    with pytest.raises(StoreConflict):
        await store.append([pub("c", 1, b"new"), pub("c", 2, b"clash"), pub("c", 3, b"new")])
    assert [p.offset for p in await store.read("c", "e1", limit=10)] == [2]


async def test_last_position(store: Store) -> None:
    assert await store.last_position("d") is None
    await store.append([pub("d", 1), pub("d", 2)])
    assert await store.last_position("d") == StreamPosition(2, "e1")
    await store.append([pub("d", 1, epoch="e2")])
    assert await store.last_position("d") == StreamPosition(1, "e2")


async def test_retention_expires_only_what_is_past_it(store: Store) -> None:
    await store.append([pub("r", 1), pub("r", 2)], retention=10)  # kept until ~11 s after 1970
    await store.append([pub("keep", 1)])
    assert await store.expire(now_ms=5_000) == 0
    assert len(await store.read("r", "e1", limit=10)) == 2
    assert await store.expire(now_ms=20_000) == 2
    assert await store.read("r", "e1", limit=10) == []
    assert [p.offset for p in await store.read("keep", "e1", limit=10)] == [1]


async def test_searchable_publications_wait_for_the_indexer(store: Store) -> None:
    await store.append([pub("s", 1), pub("s", 2)], searchable=True)
    await store.append([pub("quiet", 1)])
    await store.append([pub("s", 3)], searchable=True)
    pending = await store.pending_index(10)
    assert [(p.channel, p.offset) for p in pending] == [("s", 1), ("s", 2), ("s", 3)]
    assert pending[0].data == b"{}" and pending[0].info == ClientInfo("c", "u", {"k": 1})
    assert [p.offset for p in await store.pending_index(2)] == [1, 2]
    await store.mark_indexed(pending[:2])
    assert [p.offset for p in await store.pending_index(10)] == [3]
    await store.mark_indexed(pending[2:])
    assert await store.pending_index(10) == []
    # A conflicting append queues nothing.
    with pytest.raises(StoreConflict):
        await store.append([pub("s", 3, b"other")], searchable=True)
    assert await store.pending_index(10) == []


async def test_scan_walks_the_log_in_write_order(store: Store) -> None:
    written = [("x", 1), ("y", 1), ("x", 2), ("z", 1), ("y", 2)]
    for channel, offset in written:
        await store.append([pub(channel, offset)])
    seen: list[tuple[str, int]] = []
    cursor: str | None = None
    while True:
        page, cursor = await store.scan(after=cursor, limit=2)
        if not page:
            break
        assert len(page) <= 2
        seen += [(p.channel, p.offset) for p in page]
    assert seen == written
    assert cursor is None
    only_y, _ = await store.scan(limit=10, channel="y")
    assert [(p.channel, p.offset) for p in only_y] == [("y", 1), ("y", 2)]
    assert await store.count() == 5
    assert await store.count("x") == 2
    assert await store.count("nobody") == 0
