"""The Broker contract on real Redis: one server, two shards, and a cluster;
plus what only the Redis broker does: gap detection and filling."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from server.broker import redis as redis_broker
from server.broker.redis import RedisBroker, jump_hash
from server.models import HistoryOptions
from tests.contract_broker import *  # noqa: F403 - the shared contract tests
from tests.contract_broker import KEEP, GapHandler, eventually


@pytest.fixture
def handler() -> GapHandler:
    return GapHandler()


@pytest.fixture(params=["single", "sharded", "cluster"])
def redis_url(request: pytest.FixtureRequest) -> str:
    if request.param == "single":
        return str(request.getfixturevalue("redis_server").url)
    if request.param == "sharded":
        return ",".join(s.url for s in request.getfixturevalue("redis_shards"))
    return str(request.getfixturevalue("redis_cluster").url)


@pytest.fixture
async def broker(redis_url: str, prefix: str, handler: GapHandler) -> AsyncIterator[RedisBroker]:
    b = RedisBroker(redis_url, prefix=prefix, position_check_interval=0.2, presence_ttl=1.0)
    await b.start(handler)
    yield b
    await b.close()


def test_jump_hash_is_consistent() -> None:
    keys = range(10_000)
    three = [jump_hash(k * 7919, 3) for k in keys]
    four = [jump_hash(k * 7919, 4) for k in keys]
    assert set(three) == {0, 1, 2}
    moved = sum(1 for a, b in zip(three, four, strict=True) if a != b)
    # Going from 3 to 4 shards moves about a quarter of the channels, all to the new one.
    assert 0.2 < moved / len(keys) < 0.3
    assert all(b == 3 for a, b in zip(three, four, strict=True) if a != b)


async def lose(broker: RedisBroker, channel: str, data: bytes) -> None:
    """Publish through the broker's own script but to a pub/sub name nobody
    listens on: the publication is in the stream and its history, and no
    node hears of it (as when Redis drops a subscriber's connection)."""
    real = broker.pubsub_name
    broker.pubsub_name = lambda c: real(c) + ":lost"  # type: ignore[method-assign]
    try:
        await broker.publish(channel, data, info=None, history=KEEP)
    finally:
        broker.pubsub_name = real  # type: ignore[method-assign]


async def test_gap_is_filled_before_the_next_publication(
    broker: RedisBroker, handler: GapHandler
) -> None:
    await broker.subscribe("g1")
    await broker.publish("g1", b"1", info=None, history=KEEP)
    await lose(broker, "g1", b"2")
    await lose(broker, "g1", b"3")
    await broker.publish("g1", b"4", info=None, history=KEEP)
    await eventually(lambda: len([p for p in handler.pubs if p.channel == "g1"]) == 4)
    assert [p.data for p in handler.pubs if p.channel == "g1"] == [b"1", b"2", b"3", b"4"]
    assert handler.unrecoverable == []


async def test_lost_last_publication_is_found_by_the_position_check(
    broker: RedisBroker, handler: GapHandler
) -> None:
    await broker.subscribe("g2")
    await broker.publish("g2", b"1", info=None, history=KEEP)
    await lose(broker, "g2", b"2")
    await eventually(lambda: [p.data for p in handler.pubs if p.channel == "g2"] == [b"1", b"2"])


async def test_gap_past_history_is_reported(broker: RedisBroker, handler: GapHandler) -> None:
    tiny = HistoryOptions(size=1, ttl=60, meta_ttl=3600)
    await broker.subscribe("g3")
    await broker.publish("g3", b"1", info=None, history=tiny)
    await lose(broker, "g3", b"2")
    await lose(broker, "g3", b"3")
    await broker.publish("g3", b"4", info=None, history=tiny)
    await eventually(lambda: handler.unrecoverable == ["g3"])
    assert [p.data for p in handler.pubs if p.channel == "g3"][-1] == b"4"


async def test_pubsub_connection_killed_by_redis(
    redis_server: Any, prefix: str, handler: GapHandler
) -> None:
    """Redis drops the subscriber connection (as past its output-buffer
    limit); redis-py reconnects silently; nothing is lost."""
    broker = RedisBroker(redis_server.url, prefix=prefix, position_check_interval=60)
    await broker.start(handler)
    try:
        await broker.subscribe("k1")
        await broker.publish("k1", b"0", info=None, history=KEEP)
        client = aioredis.Redis.from_url(redis_server.url)
        for i in range(1, 30):
            if i % 10 == 0:
                await client.client_kill_filter(_type="pubsub")
            await broker.publish("k1", b"%d" % i, info=None, history=KEEP)
            await asyncio.sleep(0.01)
        await client.aclose()
        await eventually(lambda: len([p for p in handler.pubs if p.channel == "k1"]) == 30, 10)
        offsets = [p.offset for p in handler.pubs if p.channel == "k1"]
        assert offsets == list(range(1, 31))
    finally:
        await broker.close()


async def test_a_position_in_another_epoch_moves_the_node_to_it(
    redis_server: Any, prefix: str, handler: GapHandler
) -> None:
    """A subscriber is handed a position read from Redis. When the node still
    delivers another epoch (its pub/sub lags a change of epoch, or it heard
    a master that is gone), what it delivers next must not pass for what
    follows the handed position: it moves to the read epoch at once, and its
    subscribers recover."""
    broker = RedisBroker(redis_server.url, prefix=prefix, position_check_interval=60)
    await broker.start(handler)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await broker.subscribe("ep")
        first = await broker.publish("ep", b"1", info=None, history=KEEP)
        await eventually(lambda: broker.delivered("ep") == first.position)
        meta, hist = broker._keys("ep")
        saved = [await client.dump(meta), await client.dump(hist)]
        await client.delete(meta, hist)
        # Redis lost the stream: a new subscriber is handed a new epoch.
        handed = await broker.position("ep")
        assert handed.epoch != first.epoch
        await eventually(lambda: handler.unrecoverable == ["ep"])
        assert broker.delivered("ep") == handed
        # The old stream comes back (a server that is master again): its
        # next publication is no continuation of the handed position.
        await client.restore(meta, 0, saved[0], replace=True)
        await client.restore(hist, 0, saved[1], replace=True)
        await broker.publish("ep", b"2", info=None, history=KEEP)
        await eventually(lambda: handler.unrecoverable == ["ep", "ep"])
    finally:
        await client.aclose()
        await broker.close()


async def test_presence_expires_when_a_node_stops_heartbeating(redis_url: str, prefix: str) -> None:
    from server.models import ClientInfo

    crashed = RedisBroker(redis_url, prefix=prefix, presence_ttl=0.5)
    await crashed.start(GapHandler())
    alive = RedisBroker(redis_url, prefix=prefix, presence_ttl=0.5)
    await alive.start(GapHandler())
    try:
        await crashed.add_presence("p", ClientInfo("c1", "u1"))
        await alive.add_presence("p", ClientInfo("c2", "u2"))
        await crashed.close()  # stops heartbeating, like a killed process
        await asyncio.sleep(1.2)  # past the TTL: expiry in Redis is what is tested
        assert set(await alive.presence("p")) == {"c2"}
    finally:
        await alive.close()


async def test_unreachable_redis_fails_clearly(prefix: str) -> None:
    from server.broker import BrokerUnavailable
    from tests.services import free_port

    broker = RedisBroker(f"redis://127.0.0.1:{free_port()}/0", prefix=prefix, timeout=0.5)
    with pytest.raises(BrokerUnavailable, match="cannot reach Redis"):
        await broker.start(GapHandler())


async def test_cluster_view(redis_url: str, prefix: str) -> None:
    a = RedisBroker(redis_url, prefix=prefix, node_ttl=0.5)
    b = RedisBroker(redis_url, prefix=prefix, node_ttl=0.5)
    await a.start(GapHandler())
    await b.start(GapHandler())
    try:
        await a.report_node("a", {"node": "a", "connections": 1})
        await b.report_node("b", {"node": "b", "connections": 2})
        assert sorted(n["node"] for n in await a.nodes()) == ["a", "b"]
        await asyncio.sleep(0.7)  # b stops reporting: it drops out after its TTL
        await a.report_node("a", {"node": "a", "connections": 1})
        assert [n["node"] for n in await b.nodes()] == ["a"]
    finally:
        await a.close()
        await b.close()


async def test_a_burst_of_commands_waits_for_connections_instead_of_failing(
    broker: RedisBroker,
) -> None:
    # A reconnect storm: hundreds of subscribes ask Redis for a position at
    # the same moment, far more than the connection pool holds. redis-py's
    # default pool failed the extra ones at once ("Too many connections",
    # seen by clients as error 114); they must wait for a connection.
    await broker.publish("storm", b'"x"', info=None, history=KEEP)
    results = await asyncio.gather(
        *(broker.history("storm", after=0, limit=10) for _ in range(600))
    )
    assert {r.position.offset for r in results} == {1}


async def test_a_cluster_burst_past_its_pool_waits_instead_of_failing(
    redis_cluster: Any, prefix: str, handler: GapHandler, monkeypatch: pytest.MonkeyPatch
) -> None:
    # redis-py's cluster client has no blocking pool: a command past
    # max_connections in flight to one node failed at once with
    # MaxConnectionsError (1,500 publishes to one channel lost a third).
    # A small pool shows the same with 200.
    monkeypatch.setattr(redis_broker, "CLUSTER_POOL_SIZE", 8)
    b = RedisBroker(redis_cluster.url, prefix=prefix)
    await b.start(handler)
    try:
        pubs = await asyncio.gather(
            *(b.publish("hot", b"%d" % i, info=None, history=KEEP) for i in range(200))
        )
        assert sorted(p.offset for p in pubs) == list(range(1, 201))
    finally:
        await b.close()


@pytest.mark.parametrize("redis_url", ["single", "sharded"], indirect=True)
async def test_a_storm_of_subscribers_asks_redis_for_a_position_once_per_round_trip(
    broker: RedisBroker,
) -> None:
    # 600 clients subscribing to one channel at once each need its position:
    # one script call per pipeline answers all who asked for it meanwhile
    # (asked one by one, the calls queued past the pool's timeout).
    await broker.publish("storm", b'"x"', info=None, history=KEEP)
    shard = broker._shard("storm")

    async def script_calls() -> int:
        stats = await shard.client.info("commandstats")
        return sum(int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_eval"))

    before = await script_calls()
    positions = await asyncio.gather(*(broker.position("storm") for _ in range(600)))
    assert {(p.offset, p.epoch) for p in positions} == {(1, positions[0].epoch)}
    assert await script_calls() - before < 20
    # A position asked for after a publication was answered includes it.
    await broker.publish("storm", b'"y"', info=None, history=KEEP)
    assert (await broker.position("storm")).offset == 2


@pytest.mark.parametrize("redis_url", ["single", "sharded"], indirect=True)
async def test_concurrent_publishes_land_in_call_order(
    broker: RedisBroker, handler: GapHandler
) -> None:
    # One client's pipelined publishes are concurrent calls: their offsets
    # must follow the order of the calls, and so must delivery.
    assert broker.ordered_publish
    await broker.subscribe("order")
    pubs = await asyncio.gather(
        *(broker.publish("order", b"%d" % i, info=None, history=KEEP) for i in range(300))
    )
    assert [p.offset for p in pubs] == list(range(1, 301))
    assert [p.data for p in pubs] == [b"%d" % i for i in range(300)]
    await eventually(lambda: len(handler.pubs) == 300)
    assert [p.offset for p in handler.pubs] == list(range(1, 301))


async def test_one_failing_publish_in_a_batch_fails_alone(broker: RedisBroker) -> None:
    # A key of the wrong type makes Redis refuse that one script call; the
    # publications sent in the same round trip still land.
    await broker._shard("broken").client.set(broker._keys("broken")[0], "not a hash")
    results = await asyncio.gather(
        broker.publish("fine", b"1", info=None, history=KEEP),
        broker.publish("broken", b"2", info=None, history=KEEP),
        broker.publish("fine", b"3", info=None, history=KEEP),
        return_exceptions=True,
    )
    first, bad, last = results
    assert isinstance(bad, redis.exceptions.ResponseError)
    assert not isinstance(first, BaseException) and not isinstance(last, BaseException)
    landed = [
        (p.offset, p.data) for p in (await broker.history("fine", after=0, limit=10)).publications
    ]
    if broker.ordered_publish:
        assert (first.offset, last.offset) == (1, 2)
        assert landed == [(1, b"1"), (2, b"3")]
    else:  # a cluster client runs concurrent calls in any order
        assert sorted(d for _, d in landed) == [b"1", b"3"]


async def test_close_ends_a_reader_that_swallows_its_cancellation(
    redis_server: Any, prefix: str, handler: GapHandler
) -> None:
    # What redis-py can do when a cancellation meets its own read timeout:
    # the read ends quietly instead of raising CancelledError.
    b = RedisBroker(redis_server.url, prefix=prefix)
    await b.start(handler)
    pubsub = b.shards[0].pubsubs[redis_server.url]

    calls = []

    async def swallowing(**_: Any) -> None:
        calls.append(1)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.05)

    pubsub.pubsub.get_message = swallowing
    await eventually(lambda: len(calls) > 1)  # the reader is in it now
    await asyncio.wait_for(b.close(), 10)
    assert pubsub.reader is not None and pubsub.reader.done()


async def test_publications_on_their_way_are_not_taken_for_a_gap(
    redis_url: str, prefix: str, handler: GapHandler
) -> None:
    # A burst is committed in Redis at once and reaches a busy node's pub/sub
    # reader a moment later. Position checks in that moment must not take it
    # for lost: filled from a 10-entry history, it would be reported
    # unrecoverable and every subscriber told to recover.
    publisher = RedisBroker(redis_url, prefix=prefix)
    receiver = RedisBroker(redis_url, prefix=prefix, position_check_interval=0.01)
    await publisher.start(handler)
    receiver_handler = GapHandler()
    await receiver.start(receiver_handler)
    in_transit: list[tuple[str, bytes]] = []
    checks = []
    real_on_message, real_positions = receiver.on_message, receiver._positions

    async def counting_positions(*args: Any) -> Any:
        checks.append(1)
        return await real_positions(*args)

    try:
        await receiver.subscribe("wave")
        receiver.on_message = lambda name, message: in_transit.append((name, message))  # type: ignore[method-assign]
        receiver._positions = counting_positions  # type: ignore[method-assign]
        for i in range(100):
            await publisher.publish("wave", b"%d" % i, info=None, history=KEEP)
        await eventually(lambda: len(in_transit) == 100 and len(checks) >= 10)
        receiver.on_message = real_on_message  # type: ignore[method-assign]
        for name, message in in_transit:
            receiver.on_message(name, message)
        await eventually(
            lambda: len(receiver_handler.pubs) >= 100 or bool(receiver_handler.unrecoverable)
        )
        assert receiver_handler.unrecoverable == []
        assert [p.offset for p in receiver_handler.pubs] == list(range(1, 101))
    finally:
        await receiver.close()
        await publisher.close()


async def test_a_publication_arriving_while_a_subscription_is_set_up_is_delivered(
    redis_url: str, prefix: str, handler: GapHandler
) -> None:
    # Redis confirms a SUBSCRIBE, the broker reads the channel's position,
    # and a publication made just after that read can reach the pub/sub
    # reader before the read's reply reaches the broker. It is delivered as
    # it comes: not dropped and then taken for a gap (which, on a channel
    # without history, would tell every subscriber to recover).
    none = HistoryOptions(size=0, ttl=0, meta_ttl=3600)
    publisher = RedisBroker(redis_url, prefix=prefix)
    receiver = RedisBroker(redis_url, prefix=prefix, position_check_interval=60)
    await publisher.start(GapHandler())
    await receiver.start(handler)
    arrived: list[bytes] = []
    real_on_message, real_positions = receiver.on_message, receiver._positions

    def on_message(name: str, message: bytes) -> None:
        arrived.append(message)
        real_on_message(name, message)

    async def positions_then_a_publication(shard: Any, channels: Any) -> Any:
        result = await real_positions(shard, channels)
        if "setup" in channels:
            await publisher.publish("setup", b"1", info=None, history=none)
            await eventually(lambda: any(m.startswith(b"p") for m in arrived))
        return result

    receiver.on_message = on_message  # type: ignore[method-assign]
    receiver._positions = positions_then_a_publication  # type: ignore[method-assign]
    try:
        await receiver.subscribe("setup")
        await publisher.publish("setup", b"2", info=None, history=none)
        await eventually(lambda: len(handler.pubs) == 2 or bool(handler.unrecoverable))
        assert handler.unrecoverable == []
        assert [p.data for p in handler.pubs] == [b"1", b"2"]
        assert receiver.delivered("setup") == handler.pubs[-1].position
    finally:
        await receiver.close()
        await publisher.close()


class _Log:
    """A node's durable log as the broker sees it (``DurableLog``), that
    can be made unreachable."""

    def __init__(self, durable: set[str]) -> None:
        self.durable_channels = durable
        self.down = False

    def durable(self, channel: str) -> bool:
        return channel in self.durable_channels

    async def last_position(self, channel: str) -> Any:
        if self.down:
            raise redis_broker.BrokerUnavailable("the log is down (test)")
        return None


async def test_a_durable_stream_that_cannot_be_seeded_does_not_stop_the_position_check(
    redis_server: Any, prefix: str, handler: GapHandler
) -> None:
    # After a failover every stream is stale at once; while the durable log
    # is unreachable the durable ones cannot be seeded. The periodic check
    # must still find what the other channels lost.
    b = RedisBroker(redis_server.url, prefix=prefix, position_check_interval=0.2)
    log = _Log({"logged:d"})
    b.use_log(log)
    await b.start(handler)
    try:
        await b.subscribe("logged:d")
        await b.subscribe("live")
        await b.publish("live", b"1", info=None, history=KEEP)
        await eventually(lambda: [p.data for p in handler.pubs if p.channel == "live"] == [b"1"])
        # The durable stream vanishes (a stale stream after a failover reads
        # the same) while its log is down.
        r = aioredis.Redis(port=redis_server.port)
        try:
            await r.delete(*b._keys("logged:d"))
        finally:
            await r.aclose()
        log.down = True
        await lose(b, "live", b"2")
        await eventually(
            lambda: [p.data for p in handler.pubs if p.channel == "live"] == [b"1", b"2"]
        )
        with pytest.raises(redis_broker.BrokerUnavailable):
            await b.position("logged:d")
    finally:
        await b.close()


CLOSED_UNDER_IT = (
    "unable to perform operation on <TCPTransport closed=True reading=False 0x0>; "
    "the handler is closed"
)


async def closed_under_a_write(
    broker: RedisBroker, monkeypatch: pytest.MonkeyPatch, connection: type = aioredis.Connection
) -> None:
    """Every write meets uvloop's RuntimeError for a transport closed under it
    (seen in the chaos campaign while a connection died during its setup):
    the broker answers BrokerUnavailable (114, which clients retry), not an
    internal error; then, the connection healthy again, it works."""
    from server.broker import BrokerUnavailable

    async def closed(self: Any, command: Any) -> None:
        raise RuntimeError(CLOSED_UNDER_IT)

    await broker.publish("lost", b"{}", info=None, history=KEEP)
    with monkeypatch.context() as patch:
        # Writes on ``connection``s, the broker's connections to the server.
        patch.setattr(connection, "_send_packed_command", closed)
        # Every pooled connection has to write again: drop them.
        for shard in broker.shards:
            await shard.client.connection_pool.disconnect()
        with pytest.raises(BrokerUnavailable):
            await broker.history("lost", after=None, limit=10)
    result = await broker.history("lost", after=None, limit=10)
    assert [p.offset for p in result.publications] == [1]


async def test_a_connection_closed_under_a_write_is_broker_unavailable(
    redis_server: Any, prefix: str, handler: GapHandler, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = RedisBroker(redis_server.url, prefix=prefix)
    await b.start(handler)
    try:
        await closed_under_a_write(b, monkeypatch)
    finally:
        await b.close()
