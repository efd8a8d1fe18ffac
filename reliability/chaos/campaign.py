"""One chaos campaign: start the topology, connect the subscribers, publish
while the fault schedule runs, let everything recover in a quiet period,
wait for the subscribers to catch up, stop, and check the history."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from server.client import ApiClient, ApiError

from .checker import CheckResult, check
from .clients import Publisher, RecordingClient, start_subscriber
from .faults import ALL_KINDS, FaultRunner, make_schedule
from .history import History, compress, read_history
from .report import write_report
from .topology import API_KEY, DURABLE_NS, VOLATILE_NS, Topology

log = logging.getLogger("squall.chaos")
RESULTS = Path(__file__).resolve().parent.parent / "results"


@dataclass
class Params:
    seed: int = 1
    seconds: float = 300.0  # faults and publishing; the quiet period is its tail
    subscribers: int = 1000
    channels_per_namespace: int = 4
    subscribed_per_namespace: int = 2
    publish_rate: float = 10.0  # publications per second, all publishers together
    http_publishers: int = 2
    ws_publishers: int = 2
    quiet: float = 0.0  # 0: 10% of seconds, at least 10 s
    settle_timeout: float = 60.0  # at most this long to catch up after publishing stops
    max_concurrent: int = 2
    kinds: tuple[str, ...] = ALL_KINDS
    redis_persistence: str = "aof-always"
    redis_kind: str = "sentinel"
    volatile_history: int = 16
    connect_concurrency: int = 50
    out_dir: Path = RESULTS
    workdir: Path | None = None

    @classmethod
    def from_env(cls, **overrides: Any) -> Params:
        env = os.environ
        params = cls(
            seed=int(env.get("CHAOS_SEED") or random.SystemRandom().randrange(1, 2**31)),
            seconds=float(env.get("CHAOS_SECONDS", "300")),
            subscribers=int(env.get("CHAOS_SUBSCRIBERS", "1000")),
            publish_rate=float(env.get("CHAOS_PUBLISH_RATE", "10")),
            max_concurrent=int(env.get("CHAOS_MAX_CONCURRENT", "2")),
            redis_persistence=env.get("CHAOS_REDIS_PERSISTENCE", "aof-always"),
            redis_kind=env.get("CHAOS_REDIS", "sentinel"),
        )
        for key, value in overrides.items():
            if value is not None:
                setattr(params, key, value)
        return params

    @property
    def quiet_seconds(self) -> float:
        return self.quiet or max(10.0, self.seconds * 0.1)

    def channels(self) -> dict[str, list[str]]:
        n = self.channels_per_namespace
        return {ns: [f"{ns}:c{i}" for i in range(n)] for ns in (DURABLE_NS, VOLATILE_NS)}


@dataclass
class Outcome:
    result: CheckResult
    json_path: Path
    md_path: Path
    history_path: Path
    extra: dict[str, Any] = field(default_factory=dict)


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


async def run_campaign(params: Params) -> Outcome:
    stamp = _stamp()
    history_path = params.out_dir / f"chaos-{stamp}.history.jsonl"
    schedule = make_schedule(
        params.seed,
        params.seconds - params.quiet_seconds,
        kinds=params.kinds,
        max_concurrent=params.max_concurrent,
        redis=params.redis_kind,
    )
    channels = params.channels()
    meta = {
        "seed": params.seed,
        "seconds": params.seconds,
        "quiet": params.quiet_seconds,
        "subscribers": params.subscribers,
        "publish_rate": params.publish_rate,
        "channels_per_namespace": params.channels_per_namespace,
        "subscribed_per_namespace": params.subscribed_per_namespace,
        "redis_persistence": params.redis_persistence,
        "redis": params.redis_kind,
        "volatile_history": params.volatile_history,
        "max_concurrent": params.max_concurrent,
        "durable_namespaces": [DURABLE_NS],
        "channels": channels,
        "schedule": [f.as_dict() for f in schedule],
        "stamp": stamp,
    }
    history = History(history_path)
    history.record("meta", **meta)
    topology = Topology(
        redis_persistence=params.redis_persistence,
        redis_kind=params.redis_kind,
        volatile_history=params.volatile_history,
    )
    if params.workdir is not None:
        topology.workdir = params.workdir
    runner = FaultRunner(topology, history)
    timings: dict[str, float] = {}
    extra: dict[str, Any] = {
        "stamp": stamp,
        "history": str(history_path),
        # Each node's log stays here (<workdir>/node<i>/squall.log).
        "workdir": str(topology.workdir),
    }
    started = time.monotonic()
    clients: list[RecordingClient] = []
    publishers: list[Publisher] = []
    try:
        await topology.start()
        timings["topology_start"] = round(time.monotonic() - started, 1)
        clients = await _connect_all(topology, params, channels, history)
        timings["subscribers_in"] = round(time.monotonic() - started, 1)
        rng = random.Random(params.seed ^ 0x5EED)
        every = [c for chans in channels.values() for c in chans]
        per = params.publish_rate / max(1, params.http_publishers + params.ws_publishers)
        for i in range(params.http_publishers + params.ws_publishers):
            via = "http" if i < params.http_publishers else "ws"
            publishers.append(Publisher(
                f"{via}{i}", via, history, every, per, random.Random(rng.random()),
                api_url=topology.api_url, api_key=API_KEY, ws_url=topology.ws_url,
                token=topology.token(f"publisher{i}"),
            ))  # fmt: skip
        stop = asyncio.Event()
        pub_tasks = [asyncio.create_task(p.run(stop)) for p in publishers]
        fault_task = asyncio.create_task(runner.run(schedule))
        try:
            await asyncio.sleep(params.seconds)
        finally:
            stop.set()
            done = await asyncio.gather(*pub_tasks, fault_task, return_exceptions=True)
        problems = [repr(r) for r in done if isinstance(r, BaseException)]
        if problems:
            # Recorded; what was recorded until then is still checked.
            extra["campaign_errors"] = problems
            history.record("campaign_error", errors=problems)
        timings["publishing_done"] = round(time.monotonic() - started, 1)
        history.record("quiet_end")
        caught_up = await _settle(clients, history, params.settle_timeout)
        extra["caught_up"] = caught_up
        timings["settled"] = round(time.monotonic() - started, 1)
        if topology.opensearch is not None:
            extra["search"] = await _read_index(topology, history, channels[DURABLE_NS],
                                                [p.name for p in publishers],
                                                params.settle_timeout)  # fmt: skip
            timings["indexed"] = round(time.monotonic() - started, 1)
    finally:
        for p in publishers:
            await p.close()
        await asyncio.gather(*(c.shutdown() for c in clients), return_exceptions=True)
        history.close()
        extra["processes_alive_at_end"] = topology.alive()
        await topology.stop()
    extra["timings"] = timings
    extra["fault_errors"] = runner.errors
    extra["faults_skipped"] = runner.skipped
    # Redis kills that no failover followed (the killed master started again).
    extra["redis_restarted_in_place"] = getattr(topology.redis, "restarted_in_place", 0)
    extra["faults_applied"] = runner.applied
    outcomes: dict[str, str] = {}
    for r in read_history(history_path):
        if r.get("k") == "fs":
            outcomes[str(r["f"])] = (
                "skipped" if r.get("skipped") else "error" if r.get("err") else "yes"
            )
    extra["fault_outcomes"] = outcomes
    result = check(read_history(history_path), durable_namespaces=[DURABLE_NS])
    history_path = compress(history_path)
    extra["history"] = str(history_path)
    json_path, md_path = write_report(params.out_dir, stamp, meta, result, extra)
    return Outcome(result, json_path, md_path, history_path, extra)


async def _connect_all(
    topology: Topology, params: Params, channels: dict[str, list[str]], history: History
) -> list[RecordingClient]:
    gate = asyncio.Semaphore(params.connect_concurrency)
    rng = random.Random(params.seed)
    plans = []
    for i in range(params.subscribers):
        chosen: list[str] = []
        for chans in channels.values():
            chosen += rng.sample(chans, min(params.subscribed_per_namespace, len(chans)))
        plans.append((f"s{i}", chosen))

    async def one(sid: str, chans: list[str]) -> RecordingClient:
        async with gate:
            return await start_subscriber(topology.ws_url, topology.token(sid), sid, chans, history)

    results = await asyncio.gather(*(one(s, c) for s, c in plans), return_exceptions=True)
    clients = [r for r in results if isinstance(r, RecordingClient)]
    errors = [r for r in results if not isinstance(r, RecordingClient)]
    if errors:
        await asyncio.gather(*(c.shutdown() for c in clients), return_exceptions=True)
        raise RuntimeError(f"{len(errors)} subscribers could not start: {errors[0]!r}")
    return clients


async def _settle(clients: list[RecordingClient], history: History, timeout: float) -> bool:
    """Wait (bounded) until every live subscription holds the newest
    acknowledged position of its channel."""
    newest: dict[str, tuple[str, int]] = {}
    for r in read_history_live(history):
        had = newest.get(r["c"])
        if had is None or had[0] != r["e"]:
            newest[r["c"]] = (r["e"], r["o"])
        else:
            newest[r["c"]] = (had[0], max(had[1], r["o"]))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        behind = 0
        for client in clients:
            if client._failed is not None:
                continue
            for channel, sub in client.subscriptions.items():
                want = newest.get(channel)
                if want is None:
                    continue
                if sub.epoch != want[0] or sub.offset < want[1]:
                    behind += 1
        if behind == 0:
            return True
        if loop.time() > deadline:
            log.warning("%d subscriptions still behind after %.0f s", behind, timeout)
            history.record("settle_timeout", behind=behind)
            return False
        await asyncio.sleep(0.5)


async def _read_index(
    topology: Topology,
    history: History,
    channels: list[str],
    publishers: list[str],
    timeout: float,
) -> dict[str, Any]:
    """Read back, through ``/api/search``, every publication of the durable
    (searchable) channels, until each acknowledged one is there or
    ``timeout`` passes (the indexers catch up after a search outage); record
    what was found (``ix``) for the checker."""
    api = ApiClient(topology.api_url, API_KEY, timeout=10.0)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    found: dict[str, set[str]] = {c: set() for c in channels}
    errors: list[str] = []
    rounds = 0
    while True:
        rounds += 1
        acked = {c: set() for c in channels}
        for r in read_history_live(history):
            if r["c"] in acked:
                acked[r["c"]].add(r["i"])
        for channel in channels:
            for publisher in publishers:  # the ids' first word: "http0-17"
                try:
                    found[channel] |= await _search_all(api, channel, publisher)
                except (ApiError, OSError, TimeoutError) as exc:
                    errors.append(f"{channel} {publisher}: {exc!r}"[:300])
        missing = sum(len(acked[c] - found[c]) for c in channels)
        if missing == 0 or loop.time() > deadline:
            break
        await asyncio.sleep(1.0)
    for channel in channels:
        history.record("ix", c=channel, ids=sorted(found[channel]))
    return {"rounds": rounds, "missing_at_end": missing, "errors": errors[-10:]}


async def _search_all(api: ApiClient, channel: str, word: str) -> set[str]:
    ids: set[str] = set()
    cursor = None
    for _ in range(1000):  # pages of 100: bounded
        body: dict[str, Any] = {"query": word, "channel": channel, "limit": 100}
        if cursor is not None:
            body["cursor"] = cursor
        page = await api.call("search", body)
        for hit in page["hits"]:
            data = hit.get("data")
            if isinstance(data, dict) and isinstance(data.get("id"), str):
                ids.add(data["id"])
        cursor = page.get("cursor")
        if not cursor:
            break
    return ids


def read_history_live(history: History) -> list[dict[str, Any]]:
    """Acknowledgements so far, with their channel (from the attempts)."""
    history.flush()
    channel_of: dict[str, str] = {}
    out = []
    for r in read_history(history.path):
        if r.get("k") == "pa":
            channel_of[r["i"]] = r["c"]
        elif r.get("k") == "pk":
            out.append({**r, "c": channel_of.get(r["i"], "")})
    return out
