"""The background indexer: its checkpoint (the pending marks in the log)
survives a crash between indexing and marking without doubling anything,
and a failing index leaves everything pending."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from server.config import NamespaceOptions
from server.models import Publication
from server.search import SearchDoc, SearchQuery, SearchUnavailable, parse_text
from server.search.indexer import Indexer
from server.search.sqlite import SQLiteSearch
from server.store.sqlite import SQLiteStore
from tests.contract_store import pub

NAMESPACES = {"log": NamespaceOptions(persist=True, searchable=True)}


class Crash(Exception):
    pass


class CrashingStore(SQLiteStore):
    crash_on_mark = False

    async def mark_indexed(self, pubs: Sequence[Publication]) -> None:
        if self.crash_on_mark:
            raise Crash("the process died here")
        await super().mark_indexed(pubs)


class FlakyIndex(SQLiteSearch):
    down = False

    async def index(self, docs: Sequence[SearchDoc]) -> None:
        if self.down:
            raise SearchUnavailable("node stopped")
        await super().index(docs)


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[tuple[CrashingStore, FlakyIndex]]:
    store = CrashingStore(tmp_path / "log.sqlite3")
    index = FlakyIndex(tmp_path / "search.sqlite3")
    await store.start()
    await index.start()
    yield store, index
    await index.close()
    await store.close()


async def hits(index: SQLiteSearch) -> list[int]:
    words, phrases = parse_text("hello")
    page = await index.search(SearchQuery(words, phrases, limit=100))
    return sorted(h.offset for h in page.hits)


async def test_crash_between_index_and_mark_indexes_again_without_doubles(
    parts: tuple[CrashingStore, FlakyIndex],
) -> None:
    store, index = parts
    await store.append([pub("log:a", i, b'{"m": "hello"}') for i in range(1, 6)], searchable=True)
    indexer = Indexer(store, index, NAMESPACES, batch_size=3, interval=0.01)
    store.crash_on_mark = True
    with pytest.raises(Crash):
        await indexer.step()
    assert await index.count() == 3  # indexed, but not marked
    # After the restart: the same batch comes again, then the rest.
    store.crash_on_mark = False
    restarted = Indexer(store, index, NAMESPACES, batch_size=3, interval=0.01)
    assert await restarted.drain(10) == 5
    assert await index.count() == 5
    assert await hits(index) == [1, 2, 3, 4, 5]
    assert await store.pending_index(10) == []


async def test_an_index_outage_leaves_everything_pending(
    parts: tuple[CrashingStore, FlakyIndex],
) -> None:
    store, index = parts
    await store.append([pub("log:a", i, b'{"m": "hello"}') for i in range(1, 4)], searchable=True)
    indexer = Indexer(store, index, NAMESPACES, batch_size=10, interval=0.01)
    index.down = True
    with pytest.raises(SearchUnavailable):
        await indexer.step()
    assert len(await store.pending_index(10)) == 3
    index.down = False
    assert await indexer.drain(10) == 3
    assert await hits(index) == [1, 2, 3]
