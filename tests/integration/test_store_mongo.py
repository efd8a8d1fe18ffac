"""The Store contract on MongoDB (a real MongoDB wire-protocol server:
FerretDB on SQLite), and what a durable publish does when the store goes away."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from server.store import StoreUnavailable
from server.store.mongo import MongoStore
from tests.contract_store import *  # noqa: F403 - the shared contract tests
from tests.contract_store import pub
from tests.services import FerretDB


@pytest.fixture(scope="session")
def ferretdb() -> Iterator[FerretDB]:
    server = FerretDB().start()
    yield server
    server.stop()


def mongo_url(server: FerretDB) -> str:
    """A database of its own for each test."""
    return f"{server.url}t{uuid.uuid4().hex[:12]}"


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
