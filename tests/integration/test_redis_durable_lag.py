"""A durable channel whose Redis stream lags its durable log (a Redis server
that had not seen the last publications answered, as a lagging replica or a
not yet demoted old master does around a failover): the log decides, so
nothing a client holds is taken for lost and no offset is handed out twice."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from tests.conftest import ServerFactory


def config(redis_server: Any, prefix: str) -> dict[str, Any]:
    return {
        "broker": {"url": redis_server.url, "prefix": prefix},
        "namespaces": {"logged": {"persist": True, "history_size": 100, "allow_publish": True}},
    }


async def rewind(redis_server: Any, prefix: str, channel: str, offset: int) -> None:
    """Put the channel's stream back at ``offset``, its later history gone."""
    r = aioredis.Redis(port=redis_server.port)
    try:
        await r.hset(f"{prefix}:{{{channel}}}:meta", "o", offset)
        await r.xtrim(f"{prefix}:{{{channel}}}:hist", minid=0)
        await r.delete(f"{prefix}:{{{channel}}}:hist")
    finally:
        await r.aclose()


async def test_a_client_ahead_of_a_lagging_stream_recovers_from_the_log(
    make_server: ServerFactory, redis_server: Any, prefix: str
) -> None:
    server = await make_server(config(redis_server, prefix))
    api = server.api()
    acks = [await api.publish("logged:a", {"n": n}) for n in range(5)]
    epoch = acks[0]["epoch"]
    await rewind(redis_server, prefix, "logged:a", 2)
    raw = await server.connected()
    reply = await raw.call(
        "subscribe", {"channel": "logged:a", "recover": True, "offset": 4, "epoch": epoch}
    )
    result = reply["result"]
    assert result["recovered"] is True
    assert (result["epoch"], result["offset"]) == (epoch, 5)
    assert [p["data"]["n"] for p in result.get("publications", [])] == [4]
    # The stream caught up: the next publication is offset 6, and a client
    # that recovers from further back gets everything from the log.
    after = await api.publish("logged:a", {"n": 5})
    assert (after["epoch"], after["offset"]) == (epoch, 6)
    again = await server.connected()
    reply = await again.call(
        "subscribe", {"channel": "logged:a", "recover": True, "offset": 1, "epoch": epoch}
    )
    assert reply["result"]["recovered"] is True
    assert [p["data"]["n"] for p in reply["result"]["publications"]] == [1, 2, 3, 4, 5]


async def test_a_durable_publish_onto_a_lagging_stream_goes_on_from_the_log(
    make_server: ServerFactory, redis_server: Any, prefix: str
) -> None:
    server = await make_server(config(redis_server, prefix))
    api = server.api()
    acks = [await api.publish("logged:b", {"n": n}) for n in range(3)]
    epoch = acks[0]["epoch"]
    raw = await server.connected()
    await raw.call("subscribe", {"channel": "logged:b"})
    await rewind(redis_server, prefix, "logged:b", 1)
    after = await api.publish("logged:b", {"n": 3})
    assert (after["epoch"], after["offset"]) == (epoch, 4)
    history = await api.history("logged:b", limit=10)
    assert [(p["offset"], p["data"]["n"]) for p in history["publications"]] == [
        (1, 0), (2, 1), (3, 2), (4, 3),
    ]  # fmt: skip
    assert history["epoch"] == epoch


async def test_the_log_answers_even_when_the_stream_stays_behind(
    make_server: ServerFactory, redis_server: Any, prefix: str, monkeypatch: Any
) -> None:
    # Around a failover the repair may land on another server than the one
    # that answers reads (a master the sentinels are demoting): the stream
    # the node reads stays behind. The client is answered from the log.
    server = await make_server(config(redis_server, prefix))
    api = server.api()
    acks = [await api.publish("logged:c", {"n": n}) for n in range(5)]
    epoch = acks[0]["epoch"]
    await rewind(redis_server, prefix, "logged:c", 2)

    async def lost_repair(*args: Any) -> None:
        return None

    monkeypatch.setattr(server.node, "_repair", lost_repair)
    raw = await server.connected()
    reply = await raw.call(
        "subscribe", {"channel": "logged:c", "recover": True, "offset": 3, "epoch": epoch}
    )
    result = reply["result"]
    assert result["recovered"] is True
    assert (result["epoch"], result["offset"]) == (epoch, 5)
    assert [p["data"]["n"] for p in result.get("publications", [])] == [3, 4]


def log_reads_fail(server: Any, monkeypatch: Any) -> None:
    """Reading the log fails from now on (the store is timing out)."""
    from server.store import StoreUnavailable

    async def read(*args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("mongodb: timed out")

    monkeypatch.setattr(server.node.store, "read", read)


async def test_a_recovery_that_cannot_read_the_log_is_a_temporary_error(
    make_server: ServerFactory, redis_server: Any, prefix: str, monkeypatch: Any
) -> None:
    """Found by the chaos campaign: the hand-over's log read timed out and the
    subscribe was answered 'internal server error'. It is 114 (temporary:
    the client tries again), and works once the log answers."""
    server = await make_server(config(redis_server, prefix))
    api = server.api()
    acks = [await api.publish("logged:d", {"n": n}) for n in range(4)]
    epoch = acks[0]["epoch"]
    await rewind(redis_server, prefix, "logged:d", 1)
    with monkeypatch.context() as patch:
        log_reads_fail(server, patch)
        raw = await server.connected()
        reply = await raw.call(
            "subscribe", {"channel": "logged:d", "recover": True, "offset": 3, "epoch": epoch}
        )
        assert reply["error"]["code"] == 114, reply
        assert "store" in reply["error"]["message"]
    reply = await raw.call(
        "subscribe", {"channel": "logged:d", "recover": True, "offset": 3, "epoch": epoch}
    )
    assert reply["result"]["recovered"] is True
    assert [p["data"]["n"] for p in reply["result"]["publications"]] == [3]


async def test_a_durable_publish_is_acknowledged_when_the_hand_over_cannot_read_the_log(
    make_server: ServerFactory, redis_server: Any, prefix: str, monkeypatch: Any
) -> None:
    """The publication is in the log, so it is made: a failed hand-over of
    what the stream lacks must not turn its answer into an error."""
    server = await make_server(config(redis_server, prefix))
    api = server.api()
    acks = [await api.publish("logged:e", {"n": n}) for n in range(3)]
    epoch = acks[0]["epoch"]
    broker = server.node.broker
    real_position = broker.position

    async def position_then_lag(name: str) -> Any:
        # The position is read, then the stream falls behind (a failover to
        # a replica that lagged) before the broker step of the publish.
        at = await real_position(name)
        await rewind(redis_server, prefix, "logged:e", 1)
        return at

    with monkeypatch.context() as patch:
        log_reads_fail(server, patch)
        patch.setattr(broker, "position", position_then_lag)
        after = await api.publish("logged:e", {"n": 3})
    assert (after["epoch"], after["offset"]) == (epoch, 4)
    # The next publish hands over what the stream still lacks.
    await api.publish("logged:e", {"n": 4})
    history = await api.history("logged:e", limit=10)
    assert [p["data"]["n"] for p in history["publications"]] == [0, 1, 2, 3, 4]
