"""The Redis broker behind Redis Sentinel, on real servers: a master, a
replica and three sentinels (``tests.services.RedisSentinelSet``).

What a failover must not do: hand a client an offset it already holds with
other data, or leave a gap nobody is told about."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
import tornado.websocket

from server.broker import ReplicasNotAcknowledged
from server.broker.redis import RedisBroker
from server.client import ApiClient, ApiError
from server.models import HistoryOptions, StreamPosition
from tests.conftest import Running, ServerFactory, wait_for
from tests.contract_broker import *  # noqa: F403 - the shared contract tests, on Sentinel
from tests.contract_broker import GapHandler
from tests.services import RedisSentinelSet

KEEP = HistoryOptions(size=1000, ttl=600.0, meta_ttl=3600.0)


@pytest.fixture(scope="module")
def shared_sentinel_set() -> Iterator[RedisSentinelSet]:
    """One set for the contract tests, which never fail it over."""
    sset = RedisSentinelSet().start()
    yield sset
    sset.stop()


Handler = GapHandler


@pytest.fixture
def handler() -> Handler:
    return Handler()


@pytest.fixture
async def broker(
    shared_sentinel_set: RedisSentinelSet, prefix: str, handler: Handler
) -> AsyncIterator[RedisBroker]:
    b = RedisBroker(
        shared_sentinel_set.url, prefix=prefix, position_check_interval=0.2, presence_ttl=1.0
    )
    await b.start(handler)
    yield b
    await b.close()


async def test_a_stale_stream_seeded_in_its_epoch_takes_the_next_publication(
    broker: RedisBroker, shared_sentinel_set: RedisSentinelSet
) -> None:
    """A durable stream found stale (written by another server, as after a
    failover) is seeded at the log's position; in the same epoch it keeps
    its history up to there. It may hold more than that (the old master
    took a write the log then replaced): the next publication at the seeded
    offset must land, not fail against the stream's old top entry."""
    pubs = [await broker.publish("sd", b"%d" % i, info=None, history=KEEP) for i in range(5)]
    epoch = pubs[0].epoch
    master = aioredis.Redis(port=shared_sentinel_set.master.port)
    try:
        await master.hset(broker._keys("sd")[0], "w", "another-server")
    finally:
        await master.aclose()
    await broker.seed("sd", StreamPosition(3, epoch))
    at = StreamPosition(4, epoch)
    again = await broker.publish("sd", b"new", info=None, history=KEEP, at=at)
    assert again.position == at
    result = await broker.history("sd", after=None, limit=10)
    assert [(p.offset, p.data) for p in result.publications] == [
        (1, b"0"), (2, b"1"), (3, b"2"), (4, b"new")
    ]  # fmt: skip


@pytest.fixture
def sentinel_set() -> Iterator[RedisSentinelSet]:
    """A fresh set per test: failovers swap (and kill) its servers."""
    sset = RedisSentinelSet().start()
    yield sset
    sset.stop()


def sentinel_config(sset: RedisSentinelSet, prefix: str, **broker: Any) -> dict[str, Any]:
    return {
        "broker": {
            "url": sset.url,
            "prefix": prefix,
            "timeout": 2.0,
            "position_check_interval": 0.5,
            **broker,
        }
    }


async def publish_until_ok(
    api: ApiClient, channel: str, data: Any, timeout: float = 20.0
) -> dict[str, Any]:
    """Publish, trying again while the broker is failing over."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await api.publish(channel, data)
        except ApiError as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"publishing failed for {timeout}s: {exc}") from None
            await asyncio.sleep(0.1)


async def new_master(sset: RedisSentinelSet, old_port: int) -> int:
    # The wait polls the sentinels with redis-cli: off the loop, which keeps
    # serving the node under test meanwhile.
    return await asyncio.to_thread(sset.wait_for_new_master, old_port, 30.0)


# ---- a subscriber that records exactly what it was told ----------------------


@dataclass
class Subscriber:
    """One WebSocket subscriber of one channel that reconnects and recovers
    from its last position when the server drops it, and records in order
    every publication (``("pub", epoch, offset, n)``) and every recovery
    (``("recover", recovered, epoch, offset)``)."""

    server: Running
    channel: str
    events: list[tuple[Any, ...]] = field(default_factory=list)
    position: tuple[str, int] | None = None
    task: asyncio.Task[None] | None = None
    conn: tornado.websocket.WebSocketClientConnection | None = None
    stopping: bool = False
    next_id: int = 0
    inbox: list[dict[str, Any]] = field(default_factory=list)
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        self.stopping = True
        if self.conn is not None:
            self.conn.close()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    def received(self) -> list[tuple[str, int, int]]:
        return [(e[1], e[2], e[3]) for e in self.events if e[0] == "pub"]

    async def _run(self) -> None:
        for _ in range(200):  # connections, at most
            if self.stopping:
                return
            try:
                await self._session()
            except (OSError, tornado.websocket.WebSocketClosedError, TimeoutError):
                pass
            finally:
                if self.conn is not None:
                    self.conn.close()
                    self.conn = None
            await asyncio.sleep(0.1)

    async def _call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        assert self.conn is not None
        self.next_id += 1
        cmd_id = self.next_id
        await self.conn.write_message(
            orjson.dumps({"id": cmd_id, "method": method, "params": params}).decode()
        )
        while True:
            msg = await self._read()
            if msg.get("id") == cmd_id:
                return msg
            self._on_push(msg)

    async def _read(self) -> dict[str, Any]:
        """The next message (a frame may carry several, one a line)."""
        assert self.conn is not None
        while not self.inbox:
            frame = await asyncio.wait_for(self.conn.read_message(), 30)
            if frame is None:
                raise OSError("closed")
            if isinstance(frame, str):
                frame = frame.encode()
            self.inbox.extend(orjson.loads(line) for line in frame.split(b"\n") if line)
        return self.inbox.pop(0)

    def _on_push(self, msg: dict[str, Any]) -> None:
        if msg.get("push") == "pub" and msg.get("channel") == self.channel:
            self._pub(msg["pub"])

    def _pub(self, pub: dict[str, Any]) -> None:
        self.events.append(("pub", pub["epoch"], pub["offset"], pub["data"]["n"]))
        self.position = (pub["epoch"], pub["offset"])

    async def _session(self) -> None:
        self.inbox.clear()
        self.conn = await tornado.websocket.websocket_connect(self.server.ws_url)
        reply = await self._call("connect", {"token": self.server.token("sub")})
        if "result" not in reply:
            return
        params: dict[str, Any] = {"channel": self.channel}
        if self.position is not None:
            params.update(recover=True, epoch=self.position[0], offset=self.position[1])
        reply = await self._call("subscribe", params)
        if "result" not in reply:
            return  # the broker is failing over: try again
        result = reply["result"]
        if self.position is not None:
            self.events.append(("recover", result["recovered"], result["epoch"], result["offset"]))
        for pub in result.get("publications", []):
            self._pub(pub)
        self.position = (result["epoch"], result["offset"])
        self.events.append(("at", result["epoch"], result["offset"]))
        self.subscribed.set()
        while not self.stopping:
            self._on_push(await self._read())


def compact(events: list[tuple[Any, ...]]) -> str:
    """A subscriber's events, runs of consecutive publications folded."""
    out: list[str] = []
    run: list[tuple[str, int]] = []

    def flush() -> None:
        if run:
            out.append(f"pub {run[0][0]} {run[0][1]}..{run[-1][1]}")
            run.clear()

    for event in events:
        if event[0] == "pub":
            if run and (event[1] != run[-1][0] or event[2] != run[-1][1] + 1):
                flush()
            run.append((event[1], event[2]))
        elif event[0] == "recover":
            flush()
            out.append(f"recover {event[1]} at {event[2]} {event[3]}")
        else:
            flush()
            out.append(f"reply at {event[1]} {event[2]}")
    flush()
    return "; ".join(out)


def check_honesty(
    acked: dict[tuple[str, int], int], subscribers: list[Subscriber]
) -> dict[str, int]:
    """Every acknowledged publication reached each subscriber or lies in a
    gap it was told of (a recovery with ``recovered: false``); within an
    epoch a subscriber's offsets run without a hole; no position ever
    carries two different publications. Returns counts for the report."""
    owner: dict[tuple[str, int], int] = dict(acked)
    missed_in_gaps = 0
    for sub in subscribers:
        seen: set[tuple[str, int]] = set()
        # Told-of gaps: (epoch, first offset, last offset) that may be missing.
        gaps: list[tuple[str, int, float]] = []
        position: tuple[str, int] | None = None
        # Publications a recovery returns without ``recovered`` may skip.
        lenient = False
        for event in sub.events:
            if event[0] == "recover":
                _, recovered, epoch, offset = event
                if not recovered:
                    lenient = True
                    if position is not None:
                        gaps.append((position[0], position[1] + 1, float("inf")))
                    gaps.append((epoch, 1, offset))
                continue
            if event[0] == "at":  # the subscribe reply's position
                _, epoch, offset = event
                if position is not None and not lenient:
                    assert (epoch, offset) == position, f"reply at {epoch, offset}, not {position}"
                position = (epoch, offset)
                lenient = False
                continue
            _, epoch, offset, n = event
            key = (epoch, offset)
            assert owner.setdefault(key, n) == n, f"{key} carried {owner[key]} and {n}"
            assert key not in seen, f"{key} delivered twice"
            seen.add(key)
            if position is not None and not lenient:
                assert epoch == position[0], (
                    f"epoch changed silently at {key}: {compact(sub.events)}"
                )
                assert offset == position[1] + 1, (
                    f"silent gap before {key} (at {position}): {compact(sub.events)}"
                )
            position = key
        for key in acked:
            if key in seen:
                continue
            covered = any(e == key[0] and lo <= key[1] <= hi for e, lo, hi in gaps)
            assert covered, (
                f"acknowledged {key} never reached a subscriber, and no gap was told: "
                f"{compact(sub.events)}"
            )
            missed_in_gaps += 1
    return {"missed_in_told_gaps": missed_in_gaps}


# ---- tests --------------------------------------------------------------------


async def test_squall_on_sentinel_publish_subscribe_history(
    make_server: ServerFactory, sentinel_set: RedisSentinelSet, prefix: str
) -> None:
    server = await make_server(sentinel_config(sentinel_set, prefix))
    api = server.api()
    raw = await server.connected()
    sub = (await raw.call("subscribe", {"channel": "news"}))["result"]
    acks = [await api.publish("news", {"n": i}) for i in range(3)]
    assert [a["offset"] for a in acks] == [sub["offset"] + 1 + i for i in range(3)]
    pushes = [(await raw.push("pub"))["pub"] for _ in range(3)]
    assert [p["data"]["n"] for p in pushes] == [0, 1, 2]
    history = await api.history("news", limit=10)
    assert [p["data"]["n"] for p in history["publications"]] == [0, 1, 2]
    assert history["epoch"] == acks[0]["epoch"]
    # The data lives on the master the sentinels name, and reaches the replica.
    master = aioredis.Redis(port=sentinel_set.master.port)
    replica = aioredis.Redis(port=sentinel_set.replica.port)
    try:
        meta = f"{prefix}:{{news}}:meta"
        assert await master.hget(meta, "o") == b"3"
        for _ in range(100):
            if await replica.hget(meta, "o") == b"3":
                break
            await asyncio.sleep(0.02)
        assert await replica.hget(meta, "o") == b"3"
    finally:
        await master.aclose()
        await replica.aclose()


async def test_unreplicated_publications_get_a_new_epoch_after_failover(
    make_server: ServerFactory, sentinel_set: RedisSentinelSet, prefix: str
) -> None:
    server = await make_server(sentinel_config(sentinel_set, prefix))
    api = server.api()
    replicated = [await api.publish("ch", {"n": i}) for i in range(3)]
    epoch = replicated[0]["epoch"]
    replica = aioredis.Redis(port=sentinel_set.replica.port)
    try:
        for _ in range(250):
            if await replica.hget(f"{prefix}:{{ch}}:meta", "o") == b"3":
                break
            await asyncio.sleep(0.02)
        sentinel_set.cut_replication()
        # Acknowledged, on the master only.
        lost = [await api.publish("ch", {"n": i}) for i in range(3, 5)]
        assert [(p["epoch"], p["offset"]) for p in lost] == [(epoch, 4), (epoch, 5)]
        assert await replica.hget(f"{prefix}:{{ch}}:meta", "o") == b"3"
    finally:
        await replica.aclose()
    raw = await server.connected()
    await raw.call("subscribe", {"channel": "ch"})
    old = sentinel_set.kill_master()
    await new_master(sentinel_set, old)
    after = await publish_until_ok(api, "ch", {"n": 5})
    # Offset 4 of the old epoch went to {"n": 3}; the new master must not give
    # it (or any offset) out again under that epoch.
    assert after["epoch"] != epoch
    assert after["offset"] == 1
    # The subscriber is told to recover, and learns that it cannot.
    await raw.closed(timeout=15)
    again = await server.connected()
    reply = await again.call(
        "subscribe", {"channel": "ch", "recover": True, "offset": 5, "epoch": epoch}
    )
    assert reply["result"]["recovered"] is False
    assert reply["result"]["epoch"] == after["epoch"]
    # A client that had seen only the replicated part is not fooled either.
    reply = await again.call("unsubscribe", {"channel": "ch"})
    reply = await again.call(
        "subscribe", {"channel": "ch", "recover": True, "offset": 3, "epoch": epoch}
    )
    assert reply["result"]["recovered"] is False
    history = await api.history("ch", limit=10)
    assert [(p["offset"], p["data"]["n"]) for p in history["publications"]] == [(1, 5)]


@dataclass
class FailoverRun:
    """What ``publish_through_failover`` saw: acknowledged positions (epoch,
    offset) -> publication number, failed publishes, the killed port, and how
    long publishing took to come back."""

    acked: dict[tuple[str, int], int]
    failed: int
    old_port: int
    back_after: float


async def publish_through_failover(
    api: ApiClient, sset: RedisSentinelSet, channel: str, *, kill_at: int = 40,
    acked_after_kill: int = 60,
) -> FailoverRun:  # fmt: skip
    """Publish to ``channel`` every 20 ms (bounded: 400 publishes, 40 s) and
    kill the master at the ``kill_at``-th, until ``acked_after_kill``
    publishes were acknowledged after the kill. A publish may fail only with
    503 (or the client's 599), and no position is ever acknowledged twice."""
    acked: dict[tuple[str, int], int] = {}
    failed = after_kill = old_port = 0
    killed_at = back_at = 0.0
    deadline = time.monotonic() + 40
    for n in range(400):
        if time.monotonic() > deadline or after_kill >= acked_after_kill:
            break
        if n == kill_at:
            old_port = sset.kill_master()
            killed_at = time.monotonic()
        try:
            ack = await api.publish(channel, {"n": n})
        except ApiError as exc:
            assert exc.status in (503, 599), exc
            failed += 1
        else:
            key = (ack["epoch"], ack["offset"])
            assert key not in acked, f"offset {key} handed out twice"
            acked[key] = n
            if old_port:
                after_kill += 1
                back_at = back_at or time.monotonic()
        await asyncio.sleep(0.02)
    assert after_kill >= acked_after_kill, "publishing did not come back after the failover"
    await new_master(sset, old_port)
    return FailoverRun(acked, failed, old_port, back_at - killed_at)


async def test_failover_while_publishing_loses_nothing_silently(
    make_server: ServerFactory, sentinel_set: RedisSentinelSet, prefix: str
) -> None:
    server = await make_server(sentinel_config(sentinel_set, prefix))
    subscribers = [Subscriber(server, "live") for _ in range(3)]
    for sub in subscribers:
        sub.start()
    try:
        await asyncio.wait_for(asyncio.gather(*(s.subscribed.wait() for s in subscribers)), 10)
        run = await publish_through_failover(server.api(), sentinel_set, "live",
                                             acked_after_kill=80)  # fmt: skip
        acked = run.acked
        assert run.back_after < 20, "publishing did not come back"
        epochs = sorted({e for e, _ in acked}, key=lambda e: min(o for x, o in acked if x == e))
        assert len(epochs) >= 2, "the failover did not start a new epoch"
        # Subscribers keep receiving: the last acknowledged one reaches all.
        last = max(acked, key=lambda k: acked[k])
        await wait_for(
            lambda: all(last in {(e, o) for e, o, _ in s.received()} for s in subscribers),
            timeout=20,
            message="the subscribers to get the last publication",
        )
        counts = check_honesty(acked, subscribers)
        assert all(any(e[0] == "recover" and e[1] is False for e in s.events)
                   for s in subscribers), "nobody was told of the failover"  # fmt: skip
        print(f"acked {len(acked)}, failed {run.failed}, {counts}, "
              f"back after {run.back_after:.1f}s")  # fmt: skip
    finally:
        for sub in subscribers:
            await sub.stop()


DURABLE = {"namespaces": {"logged": {"persist": True, "history_size": 1000}}}


async def test_a_durable_channel_keeps_its_epoch_and_offsets_across_a_failover(
    make_server: ServerFactory, sentinel_set: RedisSentinelSet, prefix: str
) -> None:
    """Acknowledged publications of a durable channel are in the log, so a
    failover to a replica that missed some loses nothing: the stream goes on
    from the log's position, under the same epoch, and a client recovers
    what the replica never had from the log."""
    server = await make_server({**sentinel_config(sentinel_set, prefix), **DURABLE})
    api = server.api()
    channel = "logged:ch"
    replicated = [await api.publish(channel, {"n": i}) for i in range(3)]
    epoch = replicated[0]["epoch"]
    replica = aioredis.Redis(port=sentinel_set.replica.port)
    try:
        meta = f"{prefix}:{{{channel}}}:meta"
        for _ in range(250):
            if await replica.hget(meta, "o") == b"3":
                break
            await asyncio.sleep(0.02)
        sentinel_set.cut_replication()
        lost_on_replica = [await api.publish(channel, {"n": i}) for i in range(3, 5)]
        assert [(p["epoch"], p["offset"]) for p in lost_on_replica] == [(epoch, 4), (epoch, 5)]
    finally:
        await replica.aclose()
    raw = await server.connected()
    sub = (await raw.call("subscribe", {"channel": channel}))["result"]
    assert (sub["epoch"], sub["offset"]) == (epoch, 5)
    old = sentinel_set.kill_master()
    await new_master(sentinel_set, old)
    # The node subscribed to the channel reads its position on the new master
    # (resync after the reconnect, or the periodic check) before anyone
    # publishes: that read must not start the stream afresh.
    master = aioredis.Redis(port=sentinel_set.master.port)
    try:
        meta = f"{prefix}:{{{channel}}}:meta"
        for _ in range(500):
            if await master.exists(meta):
                break
            await asyncio.sleep(0.02)
        assert await master.hget(meta, "e") == epoch.encode()
        # What the replica had of the log (offsets 1-3) stays in its history:
        # recoveries after the failover are answered from Redis.
        hist = f"{prefix}:{{{channel}}}:hist"
        assert [e[0] for e in await master.xrange(hist)] == [b"1-1", b"2-1", b"3-1"]
    finally:
        await master.aclose()
    after = await publish_until_ok(api, channel, {"n": 5})
    # Not a new epoch, and not offset 4 again: the log's next position.
    assert (after["epoch"], after["offset"]) == (epoch, 6)
    # A client that held offset 5 has nothing to miss but offset 6.
    again = await server.connected()
    reply = await again.call(
        "subscribe", {"channel": channel, "recover": True, "offset": 5, "epoch": epoch}
    )
    assert reply["result"]["recovered"] is True
    assert [p["offset"] for p in reply["result"]["publications"]] == [6]
    # A client that saw only what the replica had recovers the rest from the log.
    again = await server.connected()
    reply = await again.call(
        "subscribe", {"channel": channel, "recover": True, "offset": 3, "epoch": epoch}
    )
    assert reply["result"]["recovered"] is True
    assert [(p["offset"], p["data"]["n"]) for p in reply["result"]["publications"]] == [
        (4, 3),
        (5, 4),
        (6, 5),
    ]


async def test_durable_subscribers_lose_nothing_and_see_no_gap_across_a_failover(
    make_server: ServerFactory, sentinel_set: RedisSentinelSet, prefix: str
) -> None:
    server = await make_server({**sentinel_config(sentinel_set, prefix), **DURABLE})
    subscribers = [Subscriber(server, "logged:live") for _ in range(3)]
    for sub in subscribers:
        sub.start()
    try:
        await asyncio.wait_for(asyncio.gather(*(s.subscribed.wait() for s in subscribers)), 10)
        acked = (await publish_through_failover(server.api(), sentinel_set, "logged:live")).acked
        # One epoch, offsets without a hole: the log's sequence went on.
        assert len({e for e, _ in acked}) == 1, sorted(acked)
        offsets = sorted(o for _, o in acked)
        assert offsets == list(range(offsets[0], offsets[0] + len(offsets))), offsets
        last = max(acked, key=lambda k: acked[k])
        await wait_for(
            lambda: all(last in {(e, o) for e, o, _ in s.received()} for s in subscribers),
            timeout=20,
            message="the subscribers to get the last publication",
        )
        counts = check_honesty(acked, subscribers)
        assert counts["missed_in_told_gaps"] == 0
        for sub in subscribers:
            assert not any(e[0] == "recover" and e[1] is False for e in sub.events), compact(
                sub.events
            )
    finally:
        for sub in subscribers:
            await sub.stop()


async def test_a_demoted_master_is_left_for_the_new_one(
    make_server: ServerFactory, sentinel_set: RedisSentinelSet, prefix: str
) -> None:
    """A switch where the old master lives on as a replica (SENTINEL
    FAILOVER): commands and pub/sub move to the new master."""
    server = await make_server(sentinel_config(sentinel_set, prefix))
    api = server.api()
    raw = await server.connected()
    await raw.call("subscribe", {"channel": "sw"})
    first = await api.publish("sw", {"n": 0})
    await raw.push("pub")
    old = sentinel_set.master.port
    assert "OK" in sentinel_set.sentinel_cli(0, "sentinel", "failover", sentinel_set.name)
    port = await new_master(sentinel_set, old)
    # The node follows (it asks the sentinels twice a second)...
    shard = server.node.broker.shards[0]  # type: ignore[attr-defined]
    await wait_for(lambda: shard.master == ("127.0.0.1", port), 5, "the node to follow")
    # ... but until the old master is told it is a replica it may still take
    # a write (which the switch then loses: offsets past it are not reused).
    acks = [first]
    for i in range(1, 100):
        acks.append(await publish_until_ok(api, "sw", {"n": i}))
        if acks[-1]["epoch"] != first["epoch"]:
            break
        await asyncio.sleep(0.1)
    after = acks[-1]
    assert after["epoch"] != first["epoch"], "still publishing to the old master"
    assert len({(a["epoch"], a["offset"]) for a in acks}) == len(acks)
    # A subscriber that arrives while the node is still learning of the new
    # epoch may be told to recover (close 3010) at once: it comes back.
    for attempt in range(5):
        again = await server.connected()
        try:
            reply = await again.call("subscribe", {"channel": "sw"})
            assert reply["result"]["epoch"] == after["epoch"]
            later = await api.publish("sw", {"n": "later"})
            push = await again.push("pub", timeout=10)
            break
        except ConnectionError as exc:
            assert "3010" in str(exc) and attempt < 4, exc
    assert (push["pub"]["offset"], push["pub"]["data"]) == (later["offset"], {"n": "later"})


async def test_a_master_promoted_again_without_being_demoted_starts_a_new_epoch(
    make_server: ServerFactory, sentinel_set: RedisSentinelSet, prefix: str
) -> None:
    """A split brain: the sentinels fail over from a master they cannot
    reach (here, paused), the new master dies before they could tell the
    old one it is a replica, and they promote the old one again. It never
    stopped being a master, so its run id and replication id are the same
    as before: by the last-writer rule alone its streams would go on, and
    what the other master acknowledged meanwhile would vanish from between
    offsets clients already hold."""
    server = await make_server(sentinel_config(sentinel_set, prefix))
    api = server.api()
    first = [await api.publish("sb", {"n": i}) for i in range(3)]
    old = sentinel_set.master
    old.pause()
    try:
        await new_master(sentinel_set, old.port)
        middle = await publish_until_ok(api, "sb", {"n": 3})
        assert middle["epoch"] != first[0]["epoch"]
        gone = sentinel_set.kill_master()
    finally:
        old.resume()
    assert await new_master(sentinel_set, gone) == old.port
    assert "role:master" in old.cli("info", "replication")
    last = await publish_until_ok(api, "sb", {"n": 4})
    assert last["epoch"] not in (first[0]["epoch"], middle["epoch"])
    # Whichever epoch a client holds, it learns that it missed something.
    raw = await server.connected()
    for held in (first[-1], middle):
        reply = await raw.call(
            "subscribe",
            {"channel": "sb", "recover": True, "offset": held["offset"], "epoch": held["epoch"]},
        )
        assert reply["result"]["recovered"] is False, held
        assert reply["result"]["epoch"] == last["epoch"]
        await raw.call("unsubscribe", {"channel": "sb"})


@pytest.fixture
async def ack_broker(
    sentinel_set: RedisSentinelSet, prefix: str
) -> AsyncIterator[tuple[RedisBroker, Handler]]:
    handler = Handler()
    broker = RedisBroker(
        sentinel_set.url,
        prefix=prefix,
        timeout=2.0,
        min_replicas_ack=1,
        replicas_ack_timeout_ms=100,
    )
    await broker.start(handler)
    yield broker, handler
    await broker.close()


async def test_min_replicas_ack(
    ack_broker: tuple[RedisBroker, Handler], sentinel_set: RedisSentinelSet
) -> None:
    broker, _ = ack_broker
    master = aioredis.Redis(port=sentinel_set.master.port)
    try:
        pub = await broker.publish("acks", b'"a"', info=None, history=KEEP)
        assert pub.offset == 1
        # A burst shares one WAIT per pipeline, not one per publication.
        await master.config_resetstat()
        pubs = await asyncio.gather(
            *(broker.publish("acks", b'"b"', info=None, history=KEEP) for _ in range(50))
        )
        assert sorted(p.offset for p in pubs) == list(range(2, 52))
        waits = int((await master.info("commandstats"))["cmdstat_wait"]["calls"])
        assert 1 <= waits < 10
        sentinel_set.replica.stop()
        started = time.monotonic()
        with pytest.raises(ReplicasNotAcknowledged) as caught:
            await broker.publish("acks", b'"c"', info=None, history=KEEP)
        assert time.monotonic() - started < 1.0
        assert "0 of 1 required replica" in str(caught.value)
        assert "may still be" in str(caught.value)
        assert broker.replicas_ack_failures == 1
        # As the error says: the publication was written on the master.
        history = await broker.history("acks", after=51, limit=10)
        assert [p.data for p in history.publications] == [b'"c"']
    finally:
        await master.aclose()


async def test_min_replicas_ack_from_the_configuration(
    make_server: ServerFactory, redis_server: Any, prefix: str
) -> None:
    """Set in [broker], it reaches the broker of a running node: with no
    replica to confirm, an API publish answers 503 saying it may exist."""
    server = await make_server(
        {
            "broker": {
                "url": redis_server.url,
                "prefix": prefix,
                "min_replicas_ack": 1,
                "replicas_ack_timeout_ms": 50,
            }
        }
    )
    with pytest.raises(ApiError) as caught:
        await server.api().publish("news", {"n": 1})
    assert (caught.value.status, caught.value.code) == (503, 114)
    assert "may still be" in caught.value.message


async def test_a_position_read_while_subscribing_waits_for_the_subscription(
    broker: RedisBroker,
) -> None:
    """A node's second subscriber must not get a position older than the
    baseline the node's subscription then takes: what lies between would
    reach it from nowhere (seen as a silent gap in the failover test)."""
    for i in range(3):
        await broker.publish("joining", b"%d" % i, info=None, history=KEEP)
    first = asyncio.ensure_future(broker.subscribe("joining"))
    await asyncio.sleep(0)  # the first subscriber's subscription is on its way
    assert broker.delivered("joining") is None
    second = await broker.position("joining")
    delivered = broker.delivered("joining")
    assert delivered is not None, "the position was read before the subscription was in place"
    assert delivered.offset <= second.offset == 3
    await first


async def test_a_connection_closed_under_a_write_is_broker_unavailable(
    broker: RedisBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from redis.asyncio.sentinel import SentinelManagedConnection

    from tests.integration.test_broker_redis import closed_under_a_write

    # Only the master's connections: the sentinels still answer.
    await closed_under_a_write(broker, monkeypatch, SentinelManagedConnection)
