"""Races of the Redis broker found by the chaos campaign (reliability/chaos),
each reproduced on its own against a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from server.broker.redis import RedisBroker
from server.models import HistoryOptions
from tests.contract_broker import RecordingHandler

KEEP = HistoryOptions(10, 60, 600)


@pytest.fixture
async def broker(
    redis_server: Any, prefix: str
) -> AsyncIterator[tuple[RedisBroker, RecordingHandler]]:
    b = RedisBroker(redis_server.url, prefix=prefix, position_check_interval=0.5)
    handler = RecordingHandler()
    await b.start(handler)
    yield b, handler
    await b.close()


async def test_subscribe_during_a_batch_that_unsubscribes_the_channel(
    broker: tuple[RedisBroker, RecordingHandler], redis_server: Any
) -> None:
    """A channel's last local subscriber leaves (its UNSUBSCRIBE is queued
    in a batch) and a new one arrives while that batch is still busy
    subscribing another channel: the node must stay subscribed in Redis
    and deliver the channel's publications (chaos seed 20261202: one
    channel went silent on one node for good)."""
    b, handler = broker
    await b.subscribe("x")
    await b.unsubscribe("x")  # the last local subscriber left: a batch is due
    other = asyncio.create_task(b.subscribe("y"))  # in the same batch
    await asyncio.sleep(0)  # the batch starts: it takes {y} and the unsubscribe of x
    await asyncio.sleep(0)
    await b.subscribe("x")  # a new local subscriber: the unsubscribe must not happen
    await other
    name = b.pubsub_name("x")
    for _ in range(100):  # the batch's remaining steps run
        await asyncio.sleep(0.02)
        if "y" in b._subscribed and not b._pending_unsub:
            break
    assert name in redis_server.cli("pubsub", "channels", "*").split()
    pub = await b.publish("x", b'"hello"', info=None, history=KEEP)
    for _ in range(100):
        if any(p.channel == "x" and p.offset == pub.offset for p in handler.pubs):
            break
        await asyncio.sleep(0.02)
    assert [p.offset for p in handler.pubs if p.channel == "x"] == [pub.offset]
