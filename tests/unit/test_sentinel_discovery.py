"""Which master the Redis broker believes behind Sentinel: the one named
under the newest configuration epoch, not the first sentinel's answer (a
sentinel that has not yet heard of a failover names the old master)."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio.sentinel import MasterNotFoundError

from server.broker.redis import _NewestSentinel


class FakeSentinel:
    def __init__(self, answer: dict[str, Any] | Exception) -> None:
        self.answer = answer

    async def sentinel_masters(self) -> dict[str, Any]:
        if isinstance(self.answer, Exception):
            raise self.answer
        return {"squall": self.answer}


def state(port: int, epoch: int, **flags: Any) -> dict[str, Any]:
    return {"ip": "127.0.0.1", "port": port, "config-epoch": epoch, "is_master": True,
            "is_sdown": False, "is_odown": False, "num-other-sentinels": 2, **flags}  # fmt: skip


def discovery(*answers: dict[str, Any] | Exception) -> _NewestSentinel:
    sentinel = _NewestSentinel([])  # type: ignore[no-untyped-call]
    sentinel.sentinels = [FakeSentinel(a) for a in answers]
    return sentinel


async def test_the_master_of_the_newest_epoch_wins_over_the_first_answer() -> None:
    lagging, informed = state(6379, 1), state(6380, 2)
    assert await discovery(lagging, informed, informed).discover_master("squall") == (
        "127.0.0.1",
        6380,
    )


async def test_sentinels_that_fail_or_see_the_master_down_are_passed_over() -> None:
    found = discovery(ConnectionError("refused"), state(6379, 5, is_sdown=True), state(6380, 3))
    assert await found.discover_master("squall") == ("127.0.0.1", 6380)
    with pytest.raises(MasterNotFoundError, match="refused"):
        await discovery(ConnectionError("refused"), state(1, 1, is_odown=True)).discover_master(
            "squall"
        )
