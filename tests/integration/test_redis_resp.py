"""The broker's own script pipelines (server/broker/resp.py) on a real
Redis: the same replies as redis-py's pipeline, in order, errors in place,
and a script Redis forgot is loaded again without running anything twice."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio
import redis.exceptions

from server.broker.resp import run_script_calls

# Adds ARGV[1] to a counter and answers {counter, ARGV[2]}; fails when
# ARGV[1] is negative.
SCRIPT = """
local n = tonumber(ARGV[1])
if n < 0 then return redis.error_reply('negative ' .. n) end
return {redis.call('INCRBY', KEYS[1], n), ARGV[2]}
"""


@pytest.fixture
async def client(redis_server: Any) -> AsyncIterator[redis.asyncio.Redis]:
    c = redis.asyncio.Redis.from_url(redis_server.url)
    yield c
    await c.aclose()


async def test_replies_match_redis_py_pipelines(client: redis.asyncio.Redis, prefix: str) -> None:
    script = client.register_script(SCRIPT)
    calls = [([f"{prefix}:a"], [i, f"x{i}".encode()]) for i in (1, 2, -3, 4)]
    ours = await run_script_calls(client, script, calls)
    await client.delete(f"{prefix}:a")
    pipe = client.pipeline(transaction=False)
    for keys, args in calls:
        await script(keys=keys, args=args, client=pipe)
    theirs = await pipe.execute(raise_on_error=False)
    assert [r for r in ours if not isinstance(r, Exception)] == [
        r for r in theirs if not isinstance(r, Exception)
    ]
    assert ours[0] == [1, b"x1"] and ours[1] == [3, b"x2"] and ours[3] == [7, b"x4"]
    assert isinstance(ours[2], redis.exceptions.ResponseError)
    assert "negative -3" in str(ours[2])


async def test_a_forgotten_script_is_loaded_and_runs_once(
    client: redis.asyncio.Redis, prefix: str
) -> None:
    script = client.register_script(SCRIPT)
    await run_script_calls(client, script, [([f"{prefix}:b"], [1, b""])])
    await client.script_flush()  # as after a restart or a failover
    replies = await run_script_calls(
        client, script, [([f"{prefix}:b"], [1, b""]) for _ in range(5)]
    )
    assert [r[0] for r in replies] == [2, 3, 4, 5, 6]
    assert int(await client.get(f"{prefix}:b")) == 6


async def test_tail_command_answers_last(client: redis.asyncio.Redis, prefix: str) -> None:
    script = client.register_script(SCRIPT)
    replies = await run_script_calls(
        client, script, [([f"{prefix}:c"], [5, b"y"])], tail=("WAIT", 0, 0)
    )
    assert replies == [[5, b"y"], 0]  # no replica, no wait


async def test_connections_go_back_to_the_pool(client: redis.asyncio.Redis, prefix: str) -> None:
    script = client.register_script(SCRIPT)
    for _ in range(20):
        await run_script_calls(client, script, [([f"{prefix}:d"], [1, b""])] * 3)
    pool = client.connection_pool
    assert not pool._in_use_connections  # type: ignore[attr-defined]
    assert len(pool._available_connections) == 1  # type: ignore[attr-defined]
