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
