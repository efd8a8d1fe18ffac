"""The fault schedule, drawn from a seed, and its execution.

A schedule is a list of ``Fault``s, each with a start, a bounded duration, a
kind and a target; at most ``max_concurrent`` (1 or 2) are active at once,
never two on the same component (a node and its two links are one
component). The same seed and parameters give the same schedule.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .history import History
from .topology import Topology

# kind -> (min seconds, max seconds) it lasts
DURATIONS: dict[str, tuple[float, float]] = {
    "node_kill": (3.0, 10.0),
    "node_pause": (2.0, 8.0),
    "redis_kill": (1.0, 5.0),
    "store_outage": (2.0, 8.0),
    "latency": (4.0, 12.0),
    "bandwidth": (4.0, 12.0),
    "timeout": (3.0, 8.0),
    "reset_peer": (1.0, 4.0),
    "partition": (2.0, 10.0),
    "search_outage": (3.0, 10.0),
}
RESTART_ATTEMPTS = 10
RESTART_DELAY = 2.0  # seconds between tries to start a process again
LINK_FAULTS = ("latency", "bandwidth", "timeout", "reset_peer", "partition")
ALL_KINDS = tuple(DURATIONS)


@dataclass
class Fault:
    id: int
    kind: str
    # node<i>, redis, store, or a link: a Toxiproxy proxy, redis_n<i> (one
    # node's link to a single Redis) / front_n<i>, or redis_master /
    # redis_replica (the proxy in front of that server at the time).
    target: str
    start: float  # seconds after the clients are in
    duration: float
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def component(self) -> str:
        if self.target.startswith(("redis_n", "front_n")):
            return "node" + self.target.rsplit("_n", 1)[1]
        if self.target in ("redis_master", "redis_replica"):
            return "redis"  # one Redis fault at a time: never both servers down
        return self.target

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _params(kind: str, rng: random.Random) -> dict[str, Any]:
    if kind == "latency":
        return {"latency": rng.randint(100, 800), "jitter": rng.randint(0, 100)}
    if kind == "bandwidth":
        return {"rate": rng.randint(8, 64)}  # KB/s
    if kind == "timeout":
        return {"timeout": rng.randint(500, 3000)}  # ms until the stalled link closes
    if kind == "reset_peer":
        return {"timeout": rng.randint(0, 300)}
    if kind == "search_outage":
        # The node hangs (SIGSTOP), or cannot be reached at all.
        return {"mode": rng.choice(("pause", "partition"))}
    return {}


def _target(kind: str, rng: random.Random, nodes: int, redis: str) -> str:
    if kind in ("node_kill", "node_pause"):
        return f"node{rng.randrange(nodes)}"
    if kind == "redis_kill":
        return "redis"
    if kind == "store_outage":
        return "store"
    if kind == "search_outage":
        return "search"
    side, node = rng.choice(("redis", "front")), rng.randrange(nodes)
    if side == "redis" and redis == "sentinel":
        # Mostly the master's link: that is where a fault hurts.
        return rng.choice(("redis_master", "redis_master", "redis_replica"))
    return f"{side}_n{node}"


def make_schedule(
    seed: int,
    seconds: float,
    *,
    nodes: int = 3,
    kinds: tuple[str, ...] = ALL_KINDS,
    max_concurrent: int = 2,
    warmup: float = 3.0,
    gap: tuple[float, float] = (1.0, 6.0),
    redis: str = "sentinel",
) -> list[Fault]:
    """Faults within ``[warmup, seconds]`` (the caller keeps a quiet period
    after ``seconds``); each slot runs one fault after another."""
    rng = random.Random(seed)
    faults: list[Fault] = []
    free_at = [warmup + i * rng.uniform(*gap) for i in range(max(1, max_concurrent))]
    for _ in range(10_000):  # bounded
        slot = min(range(len(free_at)), key=lambda i: free_at[i])
        start = free_at[slot] + rng.uniform(*gap)
        kind = rng.choice(kinds)
        duration = round(rng.uniform(*DURATIONS[kind]), 2)
        if start + duration > seconds:
            break
        target = _target(kind, rng, nodes, redis)
        fault = Fault(len(faults), kind, target, round(start, 2), duration)
        busy = {f.component for f in faults if f.start < start + duration and
                start < f.start + f.duration}  # fmt: skip
        if fault.component in busy:
            free_at[slot] = start  # try another draw from here
            continue
        fault.params = _params(kind, rng)
        faults.append(fault)
        free_at[slot] = start + duration
    faults.sort(key=lambda f: f.start)
    for i, f in enumerate(faults):
        f.id = i
    return faults


class FaultRunner:
    """Applies each fault at its time and heals it after its duration."""

    def __init__(self, topology: Topology, history: History) -> None:
        self.topology = topology
        self.history = history
        self.applied: dict[str, int] = {}
        self.errors: list[str] = []
        # Fault id -> the proxy a redis_master / redis_replica fault went to.
        self._links: dict[int, str] = {}
        self._locks: dict[str, asyncio.Lock] = {}  # component -> held while faulted
        self.skipped: list[int] = []  # faults whose window passed while waiting

    def _link(self, f: Fault) -> str:
        """The Toxiproxy proxy of a link fault (resolved once, at its start)."""
        if f.id not in self._links:
            target = f.target
            if target in ("redis_master", "redis_replica"):
                redis = self.topology.redis
                assert redis is not None
                target = redis.link_of(target.removeprefix("redis_"))
            self._links[f.id] = target
        return self._links[f.id]

    def _node(self, target: str) -> Any:
        index = int(target.removeprefix("node"))
        return self.topology.nodes[index]

    async def apply(self, f: Fault) -> None:
        topo = self.topology
        tox = topo.toxiproxy
        assert tox is not None
        if f.kind == "node_kill":
            await topo.kill_node(self._node(f.target))
        elif f.kind == "node_pause":
            topo.pause_node(self._node(f.target))
        elif f.kind == "redis_kill":
            await topo.kill_redis()
        elif f.kind == "store_outage":
            await topo.kill_store()
        elif f.kind == "search_outage":
            if f.params.get("mode") == "pause":
                topo.pause_search()
            else:
                await tox.set_enabled("search", False)
        elif f.kind == "partition":
            await tox.set_enabled(self._link(f), False)
        else:
            # Both directions of the link.
            for stream in ("downstream", "upstream"):
                await tox.add_toxic(
                    self._link(f), f.kind, name=f"f{f.id}_{stream}", stream=stream,
                    attributes=f.params,
                )  # fmt: skip

    async def heal(self, f: Fault) -> None:
        topo = self.topology
        tox = topo.toxiproxy
        assert tox is not None
        if f.kind == "node_kill":
            await self._retry(f, lambda: topo.restart_node(self._node(f.target)))
        elif f.kind == "node_pause":
            topo.resume_node(self._node(f.target))
        elif f.kind == "redis_kill":
            await self._retry(f, topo.heal_redis)
        elif f.kind == "store_outage":
            await self._retry(f, topo.heal_store)
        elif f.kind == "search_outage":
            if f.params.get("mode") == "pause":
                topo.resume_search()
            else:
                await tox.set_enabled("search", True)
        elif f.kind == "partition":
            await tox.set_enabled(self._link(f), True)
        else:
            for stream in ("downstream", "upstream"):
                with contextlib.suppress(Exception):
                    await tox.remove_toxic(self._link(f), f"f{f.id}_{stream}")

    async def _retry(self, f: Fault, start: Callable[[], Awaitable[None]]) -> None:
        """Start a process again until it stays up: a node exits at startup
        when it cannot reach Redis (as when another fault is on its Redis
        link), as it would under systemd, which starts it again."""
        last: Exception | None = None
        for attempt in range(RESTART_ATTEMPTS):
            try:
                await start()
                return
            except Exception as exc:
                last = exc
                self.history.record("fr", f=f.id, kind=f.kind, target=f.target,
                                    attempt=attempt + 1, err=repr(exc)[-300:])  # fmt: skip
                await asyncio.sleep(RESTART_DELAY)
        assert last is not None
        raise last

    async def run_one(self, f: Fault, t0: float) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, t0 + f.start - loop.time()))
        # The schedule keeps faults of one component apart by their planned
        # durations, but healing can take longer (a failover that does not
        # come, a process that will not start): a fault waits until the
        # component's last one is healed, and is skipped if its whole window
        # passes meanwhile (never two Redis kills at once, say).
        lock = self._locks.setdefault(f.component, asyncio.Lock())
        if lock.locked():
            try:
                await asyncio.wait_for(lock.acquire(), t0 + f.start + f.duration - loop.time())
            except TimeoutError:
                self.skipped.append(f.id)
                self.history.record("fs", f=f.id, kind=f.kind, target=f.target,
                                    skipped="its component was still healing")  # fmt: skip
                return
        else:
            await lock.acquire()
        try:
            await self._run_locked(f)
        finally:
            lock.release()

    async def _run_locked(self, f: Fault) -> None:
        try:
            await self.apply(f)
        except Exception as exc:  # recorded, and the run goes on
            self.errors.append(f"fault {f.id} {f.kind} {f.target}: {exc!r}")
            self.history.record("fs", f=f.id, kind=f.kind, target=f.target, err=repr(exc)[:300])
        else:
            self.applied[f.kind] = self.applied.get(f.kind, 0) + 1
            link = {"link": self._links[f.id]} if f.id in self._links else {}
            self.history.record("fs", f=f.id, kind=f.kind, target=f.target, params=f.params,
                                **link)  # fmt: skip
        try:
            await asyncio.sleep(f.duration)
        finally:
            # Healed even when the campaign is cancelled.
            try:
                await asyncio.shield(self.heal(f))
            except Exception as exc:
                self.errors.append(f"heal {f.id} {f.kind} {f.target}: {exc!r}")
                self.history.record("fe", f=f.id, kind=f.kind, target=f.target,
                                    err=repr(exc)[:300])  # fmt: skip
            else:
                self.history.record("fe", f=f.id, kind=f.kind, target=f.target)

    async def run(self, schedule: list[Fault]) -> None:
        t0 = asyncio.get_running_loop().time()
        tasks = [asyncio.create_task(self.run_one(f, t0)) for f in schedule]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
