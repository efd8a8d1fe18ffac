"""Many subscribers of a durable channel coming back at once (after a node or
a Redis server failed) from the same position past the broker's window: the
node reads what they missed from the log once, not once each."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import ServerFactory


async def test_identical_recoveries_share_one_log_read(
    make_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await make_server(
        {"namespaces": {"logged": {"persist": True, "history_size": 2, "allow_publish": True}}}
    )
    api = server.api()
    acks = [await api.publish("logged:storm", {"n": n}) for n in range(10)]
    epoch = acks[0]["epoch"]
    store = server.node.store
    reads: list[tuple[Any, ...]] = []
    real_read = store.read

    async def counting_read(*args: Any, **kwargs: Any) -> Any:
        reads.append((args, tuple(sorted(kwargs.items()))))
        await asyncio.sleep(0.05)  # the others arrive while it runs
        return await real_read(*args, **kwargs)

    monkeypatch.setattr(store, "read", counting_read)
    channel = server.node.channels.resolve("logged:storm")
    results = await asyncio.gather(*(server.node.recover(channel, 3, epoch) for _ in range(50)))
    assert all(r.recovered for r in results)
    assert all([p.offset for p in r.publications] == list(range(4, 11)) for r in results)
    assert len(reads) == 1, reads
    # A later recovery reads again (nothing is cached past the read).
    again = await server.node.recover(channel, 5, epoch)
    assert again.recovered and [p.offset for p in again.publications] == list(range(6, 11))
    assert len(reads) == 2


async def test_a_failed_shared_read_fails_every_recovery_that_waited_on_it(
    make_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server import errors
    from server.store import StoreUnavailable

    server = await make_server(
        {"namespaces": {"logged": {"persist": True, "history_size": 2, "allow_publish": True}}}
    )
    api = server.api()
    acks = [await api.publish("logged:down", {"n": n}) for n in range(6)]
    store = server.node.store

    async def failing_read(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.05)
        raise StoreUnavailable("down for the test")

    monkeypatch.setattr(store, "read", failing_read)
    channel = server.node.channels.resolve("logged:down")
    results = await asyncio.gather(
        *(server.node.recover(channel, 1, acks[0]["epoch"]) for _ in range(5)),
        return_exceptions=True,
    )
    assert all(isinstance(r, errors.Unavailable) for r in results), results
