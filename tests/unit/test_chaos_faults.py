"""The chaos campaign's fault runner (reliability/chaos/faults.py): a fault
never starts on a component whose last fault is still healing (a Redis kill
whose failover is slow must not be followed by a second kill, which would take
both servers down); it waits, or is skipped when its whole window passes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

from reliability.chaos.faults import Fault, FaultRunner
from reliability.chaos.history import History, read_history


class SlowToHealRedis:
    """Stands in for the topology: heal_redis takes ``heal_s``; counts how many
    kills are in force at once."""

    toxiproxy = object()

    def __init__(self, heal_s: float) -> None:
        self.heal_s = heal_s
        self.down = 0
        self.most_down = 0

    async def kill_redis(self) -> None:
        self.down += 1
        self.most_down = max(self.most_down, self.down)

    async def heal_redis(self) -> None:
        await asyncio.sleep(self.heal_s)
        self.down -= 1


async def test_a_fault_waits_for_its_component_to_heal_or_is_skipped(tmp_path: Path) -> None:
    topo = SlowToHealRedis(heal_s=0.3)
    history = History(tmp_path / "h.jsonl")
    runner = FaultRunner(cast(Any, topo), history)
    schedule = [
        Fault(0, "redis_kill", "redis", start=0.0, duration=0.05),  # healed at 0.35
        Fault(1, "redis_kill", "redis", start=0.1, duration=1.0),  # waits, then runs
        Fault(2, "redis_kill", "redis", start=0.15, duration=0.1),  # window over by 0.25
    ]
    await asyncio.wait_for(runner.run(schedule), 10)
    history.close()

    assert topo.most_down == 1
    assert topo.down == 0
    assert runner.applied == {"redis_kill": 2}
    assert runner.skipped == [2]
    starts = {r["f"]: r for r in read_history(tmp_path / "h.jsonl") if r["k"] == "fs"}
    assert starts[2].get("skipped")
    assert starts[1]["t"] >= 0.3  # after fault 0 healed, not at its planned 0.1
