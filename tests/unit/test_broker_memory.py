"""The Broker contract on the embedded memory broker."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from server.broker.memory import MemoryBroker
from server.models import HistoryOptions
from tests.contract_broker import *  # noqa: F403 - the shared contract tests
from tests.contract_broker import RecordingHandler


@pytest.fixture
def handler() -> RecordingHandler:
    return RecordingHandler()


@pytest.fixture
async def broker(handler: RecordingHandler) -> AsyncIterator[MemoryBroker]:
    b = MemoryBroker()
    await b.start(handler)
    yield b
    await b.close()


async def test_sweep_forgets_idle_streams(broker: MemoryBroker) -> None:
    opts = HistoryOptions(size=5, ttl=1, meta_ttl=10)
    first = await broker.publish("idle", b"1", info=None, history=opts)
    assert broker.sweep() == 0
    import time

    assert broker.sweep(now=time.monotonic() + 11) == 1
    again = await broker.publish("idle", b"2", info=None, history=opts)
    assert again.offset == 1
    assert again.epoch != first.epoch
