"""The Store contract on the embedded SQLite log, and durable channels."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from server.models import Publication
from server.store import StoreConflict, StoreUnavailable
from server.store.sqlite import SQLiteStore
from tests.conftest import ServerFactory
from tests.contract_store import *  # noqa: F403 - the shared contract tests
from tests.contract_store import pub


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "log.sqlite3")
    await s.start()
    yield s
    await s.close()


async def test_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite3"
    first = SQLiteStore(path)
    await first.start()
    await first.append([pub("a", 1), pub("a", 2)])
    await first.close()
    second = SQLiteStore(path)
    await second.start()
    assert [p.offset for p in await second.read("a", "e1", limit=10)] == [1, 2]
    await second.close()


PERSIST = {"namespaces": {"log": {"persist": True, "history_size": 3, "allow_publish": True}}}


async def test_durable_channel_keeps_epoch_and_history_across_restart(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    data_dir = str(tmp_path / "durable")
    config = {**PERSIST, "server": {"data_dir": data_dir}}
    first = await make_server(config)
    api = first.api()
    results = [await api.publish("log:a", {"n": i}) for i in range(10)]
    epoch = results[0]["epoch"]
    # History past the broker's 3-publication window comes from the log.
    history = await api.history("log:a", limit=100)
    assert [p["data"]["n"] for p in history["publications"]] == list(range(10))
    await first.node.close()

    second = await make_server(config)
    raw = await second.connected()
    reply = await raw.call(
        "subscribe", {"channel": "log:a", "recover": True, "offset": 2, "epoch": epoch}
    )
    result = reply["result"]
    assert result["recovered"] is True
    assert result["epoch"] == epoch
    assert [p["offset"] for p in result["publications"]] == list(range(3, 11))
    after = await second.api().publish("log:a", {"n": 10})
    assert (after["offset"], after["epoch"]) == (11, epoch)


class FailingStore(SQLiteStore):
    """The real SQLite log with a switch that makes appends fail."""

    failing = False

    async def append(
        self, pubs: Sequence[Publication], *, retention: float = 0.0, searchable: bool = False
    ) -> None:
        if self.failing:
            raise StoreUnavailable("disk on fire")
        await super().append(pubs, retention=retention, searchable=searchable)


async def test_store_failure_fails_the_publish_and_delivers_nothing(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    store = FailingStore(tmp_path / "failing.sqlite3")
    server = await make_server(PERSIST, store=store)
    raw = await server.connected()
    await raw.call("subscribe", {"channel": "log:x"})
    api = server.api()
    await api.publish("log:x", "ok-1")
    assert (await raw.push("pub"))["pub"]["data"] == "ok-1"
    store.failing = True
    reply = await raw.call("publish", {"channel": "log:x", "data": "lost"})
    assert reply["error"]["code"] == 114
    from server.client import ApiError

    with pytest.raises(ApiError) as info:
        await api.publish("log:x", "lost")
    assert info.value.status == 503
    store.failing = False
    second = await api.publish("log:x", "ok-2")
    assert second["offset"] == 2  # no offset was used up by the failures
    push = await raw.push("pub")
    assert push["pub"]["data"] == "ok-2"
    assert [p["data"] for p in (await api.history("log:x"))["publications"]] == ["ok-1", "ok-2"]


async def test_a_broker_failure_after_the_log_took_it_says_it_was_made(
    make_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the chaos campaign: a durable publish whose broker step
    failed was answered as not made, yet the log had it and subscribers got
    it. The answer now says so, and the next publication hands it over."""
    from server.broker import BrokerUnavailable
    from server.client import ApiError

    server = await make_server(PERSIST)
    raw = await server.connected()
    await raw.call("subscribe", {"channel": "log:x"})
    api = server.api()
    broker = server.node.broker
    real = broker.publish
    failures = [BrokerUnavailable("redis: Connection reset by peer")]

    async def flaky(*args: object, **kwargs: object) -> object:
        if failures:
            raise failures.pop()
        return await real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(broker, "publish", flaky)
    with pytest.raises(ApiError) as info:
        await api.publish("log:x", "in-the-log")
    assert info.value.status == 503
    assert "in the durable log" in info.value.message
    await api.publish("log:x", "next")
    got = [(await raw.push("pub"))["pub"]["data"] for _ in range(2)]
    assert got == ["in-the-log", "next"]
    history = await api.history("log:x")
    assert [p["data"] for p in history["publications"]] == ["in-the-log", "next"]


async def test_concurrent_appends_share_commits(store: SQLiteStore) -> None:
    """Group commit: appends made while a transaction is written go into the
    next one together; every one is acknowledged only once committed."""
    commits = 0
    commit = store._commit

    def counting(group: list[tuple[list[tuple[object, ...]], object]]) -> list[Exception | None]:
        nonlocal commits
        commits += 1
        return commit(group)

    store._commit = counting  # type: ignore[method-assign]
    await asyncio.gather(*(store.append([pub(f"c{i}", 1)]) for i in range(200)))
    assert 1 <= commits < 20
    for i in range(200):
        assert [p.offset for p in await store.read(f"c{i}", "e1", limit=5)] == [1]


async def test_a_conflict_fails_only_its_own_append(store: SQLiteStore) -> None:
    await store.append([pub("taken", 1)])
    other = Publication("taken", 1, "e1", b'"other"', None, 1)
    results = await asyncio.gather(
        store.append([pub("x", 1), pub("x", 2)]),
        store.append([pub("taken", 2), other]),  # 2 is free, 1 is not: all or nothing
        store.append([pub("y", 1)]),
        store.append([pub("taken", 1)]),  # the same data again: idempotent
        return_exceptions=True,
    )
    assert results[0] is None and results[2] is None and results[3] is None
    assert isinstance(results[1], StoreConflict)
    assert [p.offset for p in await store.read("x", "e1", limit=5)] == [1, 2]
    assert [p.offset for p in await store.read("y", "e1", limit=5)] == [1]
    assert [p.offset for p in await store.read("taken", "e1", limit=5)] == [1]


async def test_close_writes_the_appends_already_asked_for(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite3"
    first = SQLiteStore(path)
    await first.start()
    appends = [asyncio.ensure_future(first.append([pub(f"c{i}", 1)])) for i in range(50)]
    await asyncio.sleep(0)
    await first.close()
    await asyncio.gather(*appends)
    second = SQLiteStore(path)
    await second.start()
    for i in range(50):
        assert len(await second.read(f"c{i}", "e1", limit=5)) == 1
    await second.close()
