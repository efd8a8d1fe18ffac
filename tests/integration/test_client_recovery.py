"""The Python client keeps its subscriptions whole through failures: a failed
resubscribe is retried (or ends the subscription, and the application is
told), a subscribe answered after the client gave up on it loses nothing, a
live publication that skips offsets makes the client recover the gap, and
transport errors count as a lost connection. Each failure is forced on a
real in-process node, through its internals."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import tornado.websocket

from server import errors
from server.channels import Channel
from server.client import Client, ConnectionClosed, ReplyError, Subscription, SubscriptionEnded
from server.models import Publication, StreamPosition
from server.node import Recovery
from tests.conftest import Running, ServerFactory, wait_for


class Probe(Client):
    """A client that notes each failed (re)subscribe attempt."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failures: list[Exception] = []

    async def _subscribe(self, sub: Subscription, *, recover: bool) -> None:
        try:
            await super()._subscribe(sub, recover=recover)
        except Exception as exc:
            self.failures.append(exc)
            raise


async def probe(server: Running, **kwargs: Any) -> Probe:
    kwargs.setdefault("min_backoff", 0.01)
    kwargs.setdefault("max_backoff", 0.05)
    client = Probe(server.ws_url, token=server.token("alice"), **kwargs)
    await client.connect()
    server._clients.append(client)
    return client


def drop_connections(server: Running) -> None:
    """End every session the way a slow client is dropped (3008: reconnect)."""
    for session in list(server.node.sessions.values()):
        session.disconnect(errors.SLOW, flush=False)


async def offsets(sub: Subscription, n: int) -> list[int]:
    return [(await sub.get(timeout=5)).offset for _ in range(n)]


async def publish(server: Running, channel: str, n: int) -> None:
    api = server.api()
    for i in range(n):
        await api.publish(channel, {"n": i})


@pytest.mark.parametrize(
    "error", [errors.Unavailable("broker: down"), errors.AlreadySubscribed()], ids=["114", "105"]
)
async def test_failed_resubscribe_is_retried_and_recovers(
    server: Running, monkeypatch: pytest.MonkeyPatch, error: errors.SquallError
) -> None:
    client = await probe(server)
    sub = await client.subscribe("news")
    await publish(server, "news", 1)
    assert await offsets(sub, 1) == [1]
    calls: list[int] = []
    recover = server.node.recover

    async def failing_twice(channel: Channel, offset: int, epoch: str) -> Recovery:
        calls.append(offset)
        if len(calls) <= 2:
            raise error
        return await recover(channel, offset, epoch)

    monkeypatch.setattr(server.node, "recover", failing_twice)
    drop_connections(server)
    await publish(server, "news", 3)
    assert await offsets(sub, 3) == [2, 3, 4]
    assert calls == [1, 1, 1]  # retried, each time from the last offset
    assert [e.code for e in client.failures if isinstance(e, ReplyError)] == [error.code] * 2
    await publish(server, "news", 1)
    assert await offsets(sub, 1) == [5]
    assert sub.gaps == 0 and sub.active


async def test_permanent_resubscribe_error_ends_the_subscription(
    server: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await probe(server)
    news = await client.subscribe("news")
    sports = await client.subscribe("sports")
    await publish(server, "news", 1)
    recover = server.node.recover

    async def refuse_news(channel: Channel, offset: int, epoch: str) -> Recovery:
        if channel.name == "news":
            raise errors.PermissionDenied("revoked")
        return await recover(channel, offset, epoch)

    monkeypatch.setattr(server.node, "recover", refuse_news)
    drop_connections(server)

    async def read_all() -> list[int]:
        return [pub.offset async for pub in news]

    with pytest.raises(SubscriptionEnded) as info:
        await asyncio.wait_for(read_all(), 5)
    assert isinstance(info.value.error, ReplyError) and info.value.error.code == 103
    assert news.error is info.value and not news.active
    assert "news" not in client.subscriptions
    # The connection and the other subscription go on.
    await publish(server, "sports", 1)
    assert await offsets(sports, 1) == [1]
    assert client.connects == 2


async def test_subscribe_answered_after_the_client_gave_up_loses_nothing(
    server: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await probe(server, command_timeout=1.0)
    sub = await client.subscribe("news")
    await publish(server, "news", 1)
    assert await offsets(sub, 1) == [1]
    gate = asyncio.Event()
    calls: list[int] = []
    recover = server.node.recover

    async def slow_first(channel: Channel, offset: int, epoch: str) -> Recovery:
        calls.append(offset)
        if len(calls) == 1:
            await gate.wait()  # the server completes it, but too late
        return await recover(channel, offset, epoch)

    monkeypatch.setattr(server.node, "recover", slow_first)
    drop_connections(server)
    await publish(server, "news", 2)
    await wait_for(lambda: bool(client.failures), message="the resubscribe to time out")
    assert isinstance(client.failures[0], TimeoutError)
    gate.set()
    await publish(server, "news", 2)  # live on the late subscription
    assert await offsets(sub, 4) == [2, 3, 4, 5]
    assert sub.gaps == 0
    await publish(server, "news", 1)
    assert await offsets(sub, 1) == [6]


async def test_first_subscribe_timed_out_can_be_made_again(
    server: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await probe(server, command_timeout=1.0)
    gate = asyncio.Event()
    position = server.node.position

    async def slow_once(channel: Channel) -> StreamPosition:
        if not gate.is_set():
            await gate.wait()
        return await position(channel)

    monkeypatch.setattr(server.node, "position", slow_once)
    with pytest.raises(TimeoutError):
        await client.subscribe("news")
    assert "news" not in client.subscriptions
    gate.set()  # the server completes the subscribe the client gave up on
    sub = await client.subscribe("news")  # not 105: the client undid it there
    await publish(server, "news", 2)
    assert await offsets(sub, 2) == [1, 2]


async def test_live_publication_past_a_gap_recovers_the_gap(
    server: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await probe(server)
    sub = await client.subscribe("news")
    dropped: list[Publication] = []
    on_publication = server.node.on_publication

    def lose_offset_2(pub: Publication) -> None:
        if pub.channel == "news" and pub.offset == 2 and not dropped:
            dropped.append(pub)  # this node never pushes it
            return
        on_publication(pub)

    monkeypatch.setattr(server.node, "on_publication", lose_offset_2)
    await publish(server, "news", 4)
    assert await offsets(sub, 4) == [1, 2, 3, 4]
    assert dropped and sub.gaps == 0
    assert client.connects == 1  # recovered on the same connection


async def test_live_gap_without_recovery_is_reported(
    make_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await make_server({"namespaces": {"default": {"recover": False}}})
    client = await probe(server)
    sub = await client.subscribe("news")
    on_publication = server.node.on_publication

    def lose_offset_2(pub: Publication) -> None:
        if pub.offset != 2:
            on_publication(pub)

    monkeypatch.setattr(server.node, "on_publication", lose_offset_2)
    await publish(server, "news", 4)
    assert await offsets(sub, 3) == [1, 3, 4]
    assert sub.gaps == 1 and sub.recovered is False


async def test_resubscribe_of_an_ended_connection_does_not_run_on_the_next(
    server: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await probe(server)
    news = await client.subscribe("news")
    sports = await client.subscribe("sports")
    await publish(server, "news", 1)
    await publish(server, "sports", 1)
    assert await offsets(news, 1) == [1] and await offsets(sports, 1) == [1]
    stuck, gate = asyncio.Event(), asyncio.Event()
    recover = server.node.recover

    async def hold_news_once(channel: Channel, offset: int, epoch: str) -> Recovery:
        if channel.name == "news" and not stuck.is_set():
            stuck.set()
            await gate.wait()
        return await recover(channel, offset, epoch)

    monkeypatch.setattr(server.node, "recover", hold_news_once)
    drop_connections(server)
    await asyncio.wait_for(stuck.wait(), 5)  # connection 2 resubscribes news...
    drop_connections(server)  # ... and ends meanwhile
    gate.set()
    hub = server.node.hub
    await wait_for(
        lambda: client.connects == 3 and hub.subscribers("news") == hub.subscribers("sports") == 1
    )
    await publish(server, "news", 1)
    await publish(server, "sports", 1)
    assert await offsets(news, 1) == [2] and await offsets(sports, 1) == [2]
    assert [e for e in client.failures if isinstance(e, ReplyError)] == []  # no 105


async def test_call_on_a_closed_socket_raises_connection_closed(
    server: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await probe(server)
    sub = await client.subscribe("news")

    def closed(message: Any, binary: bool = False) -> Any:
        raise tornado.websocket.WebSocketClosedError()

    assert client._ws is not None
    monkeypatch.setattr(client._ws, "write_message", closed)
    with pytest.raises(ConnectionClosed):
        await client.call("ping")
    # ... and the client reconnects, the subscription with it.
    await wait_for(lambda: client.connects == 2 and server.node.hub.subscribers("news") == 1)
    await publish(server, "news", 1)
    assert await offsets(sub, 1) == [1]


async def test_transport_handler_closed_counts_as_a_lost_connection(
    server: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await probe(server)
    sub = await client.subscribe("news")
    await publish(server, "news", 1)
    assert await offsets(sub, 1) == [1]
    write_message = tornado.websocket.WebSocketClientConnection.write_message
    raised: list[str] = []

    def broken_once(
        self: tornado.websocket.WebSocketClientConnection, message: Any, binary: bool = False
    ) -> Any:
        if not raised and '"recover":true' in str(message):
            raised.append(str(message))
            raise RuntimeError(
                "unable to perform operation on <TCPTransport closed=True>; the handler is closed"
            )
        return write_message(self, message, binary)

    monkeypatch.setattr(tornado.websocket.WebSocketClientConnection, "write_message", broken_once)
    drop_connections(server)
    await publish(server, "news", 2)
    await wait_for(lambda: client.connects == 3 and server.node.hub.subscribers("news") == 1)
    assert raised
    assert await offsets(sub, 2) == [2, 3]
    assert sub.active and sub.gaps == 0
