"""A node's first subscriber to a channel fails to subscribe upstream (Redis
failing over) while a second subscriber joins: the node must not end up
with a subscriber in its hub and no Redis subscription (deaf to the
channel for as long as anyone stays subscribed there)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from server.broker import BrokerUnavailable
from tests.conftest import ServerFactory


async def test_a_failed_upstream_subscribe_leaves_no_deaf_subscriber(
    make_server: ServerFactory, redis_server: Any, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await make_server({"broker": {"url": redis_server.url, "prefix": prefix}})
    broker: Any = server.node.broker
    real = broker._positions
    failed = asyncio.Event()

    async def failing_once(*args: Any, **kwargs: Any) -> Any:
        if not failed.is_set():
            failed.set()
            await asyncio.sleep(0.2)  # the second subscriber arrives meanwhile
            raise BrokerUnavailable("redis: No master found (test)")
        return await real(*args, **kwargs)

    monkeypatch.setattr(broker, "_positions", failing_once)
    first, second = await server.connected(), await server.connected()
    replies = await asyncio.gather(
        first.call("subscribe", {"channel": "deaf"}),
        second.call("subscribe", {"channel": "deaf"}),
    )
    assert failed.is_set()
    subscribed = [ws for ws, r in zip((first, second), replies, strict=True) if "result" in r]
    failures = [r["error"]["code"] for r in replies if "error" in r]
    assert set(failures) <= {114}
    if not subscribed:
        # Both were told to try again; one does, and is subscribed.
        assert (await first.call("subscribe", {"channel": "deaf"}))["result"] is not None
        subscribed = [first]
    ack = await server.api().publish("deaf", {"n": 1})
    for ws in subscribed:
        push = await ws.push("pub", timeout=5)
        assert push["pub"]["offset"] == ack["offset"]
