"""The Store contract on MongoDB (a real MongoDB wire-protocol server:
FerretDB on SQLite), and what a durable publish does when the store goes away."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from server.models import StreamPosition
from server.store import StoreUnavailable
from server.store.mongo import MongoStore
from tests.conftest import mongo_url
from tests.contract_store import *  # noqa: F403 - the shared contract tests
from tests.contract_store import pub
from tests.services import FerretDB


@pytest.fixture
async def store(ferretdb: FerretDB) -> AsyncIterator[MongoStore]:
    s = MongoStore(mongo_url(ferretdb), timeout=5)
    await s.start()
    yield s
    await s.close()


async def test_a_retried_append_of_a_batch_completes_it(store: MongoStore) -> None:
    await store.append([pub("b", 2)])
    await store.append([pub("b", 1), pub("b", 2), pub("b", 3)])
    assert [p.offset for p in await store.read("b", "e1", limit=10)] == [1, 2, 3]


async def test_unreachable_store_fails_within_its_timeout() -> None:
    from tests.services import free_port

    s = MongoStore(f"mongodb://127.0.0.1:{free_port()}/x", timeout=0.3, retries=1)
    with pytest.raises(StoreUnavailable):
        await s.start()
    assert not s.healthy()
    await s.close()


async def test_queued_by_another_node_is_checked_against_the_log(
    store: MongoStore, ferretdb: Any
) -> None:
    # A second process on the same database: it did not append, so it looks
    # each queued publication up in the log before handing it out.
    other = MongoStore(store._url, timeout=5)
    await other.start()
    try:
        await store.append([pub("q", 1), pub("q", 2)], searchable=True)
        pending = await other.pending_index(10)
        assert [p.offset for p in pending] == [1, 2]
        await other.mark_indexed(pending)
        assert await store.pending_index(10) == []
    finally:
        await other.close()


async def test_an_entry_whose_append_never_landed_is_dropped(store: MongoStore) -> None:
    # What a crash between the queue write and the log write leaves behind.
    queue = store._index_queue()
    await queue.insert_one(
        {"channel": "ghost", "epoch": "e1", "offset": 1, "data": b"{}", "time_ms": 1}
    )
    await store.append([pub("real", 1)], searchable=True)
    assert [p.channel for p in await store.pending_index(10)] == ["real"]
    assert await queue.count_documents({}) == 2  # young: kept, maybe still landing
    store.orphan_after = 0
    assert [p.channel for p in await store.pending_index(10)] == ["real"]
    assert await queue.count_documents({"channel": "ghost"}) == 0


async def test_last_position_is_the_highest_offset_whatever_the_insert_ids(
    store: MongoStore,
) -> None:
    # Two nodes append to one log within one second: an ObjectId orders
    # by second, then by a per-process random part, so the later append (offset
    # 2, by another process) may carry the smaller _id. Recovery and seeding
    # read last_position: offset 1 there would hand offset 2 out twice.
    from bson import ObjectId

    await store.append([pub("lp", 1)])
    first = await store._collection().find_one({"channel": "lp", "offset": 1})
    assert first is not None
    earlier = ObjectId(bytes(first["_id"].binary[:4]) + b"\x00" * 8)
    assert earlier < first["_id"]
    doc = {k: v for k, v in first.items() if k != "_id"}
    await store._collection().insert_one({**doc, "_id": earlier, "offset": 2})
    assert await store.last_position("lp") == StreamPosition(2, "e1")


async def test_the_indexer_gets_the_logs_publication_not_a_stale_queue_entry(
    store: MongoStore,
) -> None:
    # A node lost a race for offset 1 (another took it) and the store went
    # down before it could remove its queue entry: the entry names offset 1
    # with the loser's data. The search index must get the winner's.
    queue = store._index_queue()
    await queue.insert_one(
        {"channel": "race", "epoch": "e1", "offset": 1, "data": b'{"loser":1}', "time_ms": 1}
    )
    winner = pub("race", 1)
    await store.append([winner], searchable=True)
    pending = await store.pending_index(10)
    assert [(p.offset, p.data) for p in pending] == [(1, winner.data)]
    await store.mark_indexed(pending)
    assert await queue.count_documents({"channel": "race"}) == 0


async def test_an_append_whose_queue_write_reply_was_lost_completes(
    store: MongoStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index-queue write lands but its reply is lost (a timeout): the
    retry meets its own entries. Found by the chaos campaign, where the
    publish was answered 'internal server error' although it was made."""
    from pymongo.errors import NetworkTimeout

    queue = store._index_queue()
    real = queue.insert_many
    lost = []

    async def lands_then_times_out(docs: Any, **kwargs: Any) -> Any:
        result = await real(docs, **kwargs)
        if not lost:
            lost.append(True)
            raise NetworkTimeout("timed out (the reply was lost)")
        return result

    monkeypatch.setattr(queue, "insert_many", lands_then_times_out)
    await store.append([pub("lost-reply", 1), pub("lost-reply", 2)], searchable=True)
    assert lost
    assert [p.offset for p in await store.read("lost-reply", "e1", limit=10)] == [1, 2]
    assert [p.offset for p in await store.pending_index(10)] == [1, 2]
    assert await queue.count_documents({"channel": "lost-reply"}) == 2
