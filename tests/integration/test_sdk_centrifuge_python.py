"""The stock Python SDK of the Centrifugo protocol (``centrifuge-python``, JSON)
against Squall, and against Centrifugo itself: the same scenario on both, so
what passes on the reference server and fails on Squall is Squall's bug.

What a user of the SDK notices: the connection token is refreshed before it
expires without the connection dropping; publications, presence and history on
a channel; a subscription that was away recovers exactly what it missed; a
private channel needs a subscription token; a bad connection token stops the
client for good instead of making it reconnect forever.

Each test runs on both servers (``cent_server``, tests/integration/conftest.py).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import jwt
import pytest
from centrifuge import (
    Client,
    ClientDisconnectedError,
    ClientEventHandler,
    ClientState,
    ConnectedContext,
    ConnectingContext,
    DisconnectedContext,
    ErrorContext,
    JoinContext,
    LeaveContext,
    PublicationContext,
    SubscribedContext,
    SubscribingContext,
    Subscription,
    SubscriptionErrorContext,
    SubscriptionEventHandler,
    SubscriptionState,
    SubscriptionUnsubscribedError,
    UnsubscribedContext,
)

from tests.centrifuge_servers import CentServer

# How long any single event may take to arrive.
WAIT = 10.0
# Connection tokens live this long: the SDK must refresh them several times
# within one test.
TOKEN_TTL = 3


class Recorder:
    """Events in the order they came, and a queue of each kind to wait on."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []
        self._queues: defaultdict[str, asyncio.Queue[Any]] = defaultdict(asyncio.Queue)

    def record(self, kind: str, ctx: Any) -> None:
        self.seen.append((kind, ctx))
        self._queues[kind].put_nowait(ctx)

    async def next(self, kind: str, timeout: float = WAIT) -> Any:
        """The next event of ``kind`` not taken yet; fails after ``timeout``."""
        try:
            return await asyncio.wait_for(self._queues[kind].get(), timeout)
        except TimeoutError:
            raise AssertionError(f"no {kind} event in {timeout} s; events: {self.seen}") from None

    def count(self, kind: str) -> int:
        return sum(1 for k, _ in self.seen if k == kind)


class ClientEvents(Recorder, ClientEventHandler):
    async def on_connecting(self, ctx: ConnectingContext) -> None:
        self.record("connecting", ctx)

    async def on_connected(self, ctx: ConnectedContext) -> None:
        self.record("connected", ctx)

    async def on_disconnected(self, ctx: DisconnectedContext) -> None:
        self.record("disconnected", ctx)

    async def on_error(self, ctx: ErrorContext) -> None:
        self.record("error", ctx)


class SubEvents(Recorder, SubscriptionEventHandler):
    async def on_subscribing(self, ctx: SubscribingContext) -> None:
        self.record("subscribing", ctx)

    async def on_subscribed(self, ctx: SubscribedContext) -> None:
        self.record("subscribed", ctx)

    async def on_unsubscribed(self, ctx: UnsubscribedContext) -> None:
        self.record("unsubscribed", ctx)

    async def on_publication(self, ctx: PublicationContext) -> None:
        self.record("publication", ctx)

    async def on_join(self, ctx: JoinContext) -> None:
        self.record("join", ctx)

    async def on_leave(self, ctx: LeaveContext) -> None:
        self.record("leave", ctx)

    async def on_error(self, ctx: SubscriptionErrorContext) -> None:
        self.record("error", ctx)


MakeClient = Callable[..., Awaitable[tuple[Client, ClientEvents]]]


@pytest.fixture
async def make_client(cent_server: CentServer) -> AsyncIterator[MakeClient]:
    """SDK clients for the server (not connected yet), disconnected afterwards."""
    clients: list[Client] = []

    async def factory(**kwargs: Any) -> tuple[Client, ClientEvents]:
        events = ClientEvents()
        # proxy=None: straight to the loopback server, whatever the environment says.
        client = Client(cent_server.ws_url, events=events, proxy=None, **kwargs)
        clients.append(client)
        return client, events

    yield factory
    for client in clients:
        await client.disconnect()
    # disconnect() returns before the WebSocket is closed: the SDK closes it in
    # a task of its own, which must finish before the test's loop is closed, or
    # the socket is left open (a ResourceWarning, an error here).
    others = asyncio.all_tasks() - {asyncio.current_task()}
    if others:
        await asyncio.wait(others, timeout=WAIT)


async def connected(make_client: MakeClient, server: CentServer, sub: str = "alice") -> Client:
    client, events = await make_client(token=server.token(sub))
    await client.connect()
    await events.next("connected")
    return client


async def subscribed(
    client: Client, channel: str, **kwargs: Any
) -> tuple[Subscription, SubEvents, SubscribedContext]:
    events = SubEvents()
    sub = client.new_subscription(channel, events=events, **kwargs)
    await sub.subscribe()
    ctx = await events.next("subscribed")
    return sub, events, ctx


async def api_publish(server: CentServer, channel: str, data: Any) -> None:
    await asyncio.to_thread(server.publish, channel, data)


async def test_token_refresh_publish_presence_history(
    cent_server: CentServer, make_client: MakeClient
) -> None:
    tokens: list[float] = []

    async def get_token() -> str:
        tokens.append(time.monotonic())
        return cent_server.token("alice", ttl=TOKEN_TTL)

    client, events = await make_client(get_token=get_token)
    await client.connect()
    connected_ctx: ConnectedContext = await events.next("connected")
    assert connected_ctx.client == client.client_id
    assert len(tokens) == 1

    sub, sub_events, sub_ctx = await subscribed(client, "chat:room")
    assert sub_ctx.recoverable is True
    assert sub_ctx.stream_position is not None

    await sub.publish({"text": "hello"})
    pub: PublicationContext = await sub_events.next("publication")
    assert pub.pub.data == {"text": "hello"}
    assert pub.pub.offset == sub_ctx.stream_position.offset + 1
    # Published by a client: the publication says who.
    assert pub.pub.info is not None
    assert (pub.pub.info.client, pub.pub.info.user) == (client.client_id, "alice")

    presence = await sub.presence()
    assert list(presence.clients) == [client.client_id]
    assert presence.clients[client.client_id].user == "alice"
    stats = await sub.presence_stats()
    assert (stats.num_clients, stats.num_users) == (1, 1)

    history = await sub.history(limit=10)
    assert [p.data for p in history.publications] == [{"text": "hello"}]
    assert [p.offset for p in history.publications] == [pub.pub.offset]
    assert (history.offset, history.epoch) == (pub.pub.offset, sub_ctx.stream_position.epoch)

    # The token lives TOKEN_TTL seconds: the SDK asks for new ones as each is
    # about to expire, and the connection carries on over several of them.
    deadline = time.monotonic() + 4 * TOKEN_TTL + WAIT
    while len(tokens) < 3:
        assert time.monotonic() < deadline, f"tokens asked for: {len(tokens)}; {events.seen}"
        await asyncio.sleep(0.05)
    assert tokens[-1] - tokens[0] >= TOKEN_TTL  # refreshed over time, not all at once
    assert client.state == ClientState.CONNECTED
    assert [kind for kind, _ in events.seen] == ["connecting", "connected"]
    assert sub.state == SubscriptionState.SUBSCRIBED
    await sub.publish({"text": "still here"})
    assert (await sub_events.next("publication")).pub.data == {"text": "still here"}
    assert [kind for kind, _ in events.seen] == ["connecting", "connected"]
    assert sub_events.count("subscribed") == 1
    assert sub_events.count("error") == 0


async def test_recovery_after_being_away(cent_server: CentServer, make_client: MakeClient) -> None:
    client = await connected(make_client, cent_server)
    sub, sub_events, first_ctx = await subscribed(client, "durable:log")
    assert first_ctx.recoverable is True
    assert first_ctx.stream_position is not None
    assert (first_ctx.was_recovering, first_ctx.recovered) == (False, False)

    await api_publish(cent_server, "durable:log", {"n": 0})
    first: PublicationContext = await sub_events.next("publication")
    assert first.pub.data == {"n": 0}

    await client.disconnect()
    assert client.state == ClientState.DISCONNECTED
    # The subscription waits for the next connect, to resubscribe then.
    assert sub.state == SubscriptionState.SUBSCRIBING
    for n in range(1, 6):
        await api_publish(cent_server, "durable:log", {"n": n})
    if cent_server.durable:
        # Squall's durable log survives a restart. (Centrifugo's memory engine
        # loses history on restart, so there the client is only away.)
        await asyncio.to_thread(cent_server.restart)

    await client.connect()
    ctx: SubscribedContext = await sub_events.next("subscribed")
    assert (ctx.was_recovering, ctx.recovered) == (True, True)
    assert ctx.stream_position is not None
    assert ctx.stream_position.epoch == first_ctx.stream_position.epoch
    missed = [await sub_events.next("publication") for _ in range(5)]
    assert [p.pub.data for p in missed] == [{"n": n} for n in range(1, 6)]
    assert [p.pub.offset for p in missed] == [first.pub.offset + n for n in range(1, 6)]
    # Exactly once: the next publication after them is a new one.
    await api_publish(cent_server, "durable:log", {"n": 6})
    live: PublicationContext = await sub_events.next("publication")
    assert (live.pub.data, live.pub.offset) == ({"n": 6}, first.pub.offset + 6)
    assert sub_events.count("publication") == 7


async def test_private_channel_needs_a_subscription_token(
    cent_server: CentServer, make_client: MakeClient
) -> None:
    client, client_events = await make_client(token=cent_server.token("alice"))
    await client.connect()
    await client_events.next("connected")

    asked: list[str] = []

    async def get_token(channel: str) -> str:
        asked.append(channel)
        return cent_server.sub_token("alice", channel)

    sub, sub_events, _ = await subscribed(client, "secret:x", get_token=get_token)
    assert asked == ["secret:x"]
    await api_publish(cent_server, "secret:x", {"secret": 1})
    assert (await sub_events.next("publication")).pub.data == {"secret": 1}

    # Without a token: refused for good, the subscription doesn't retry, and
    # the connection is not affected.
    refused_events = SubEvents()
    refused = client.new_subscription("secret:y", events=refused_events)
    await refused.subscribe()
    ctx: UnsubscribedContext = await refused_events.next("unsubscribed")
    assert (ctx.code, ctx.reason) == (103, "permission denied")
    assert refused.state == SubscriptionState.UNSUBSCRIBED
    with pytest.raises(SubscriptionUnsubscribedError):
        await refused.ready()
    assert refused_events.count("subscribed") == 0
    assert client.state == ClientState.CONNECTED
    assert [kind for kind, _ in client_events.seen] == ["connecting", "connected"]
    await api_publish(cent_server, "secret:x", {"secret": 2})
    assert (await sub_events.next("publication")).pub.data == {"secret": 2}
    assert sub.state == SubscriptionState.SUBSCRIBED


async def test_bad_token_disconnects_for_good(
    cent_server: CentServer, make_client: MakeClient
) -> None:
    now = int(time.time())
    claims = {"sub": "alice", "iat": now, "exp": now + 3600}
    forged = jwt.encode(claims, "not-the-server-secret-0123456789abcdef", "HS256")
    client, events = await make_client(token=forged)
    await client.connect()
    ctx: DisconnectedContext = await events.next("disconnected")
    assert (ctx.code, ctx.reason) == (3500, "invalid token")
    assert client.state == ClientState.DISCONNECTED
    with pytest.raises(ClientDisconnectedError):
        await client.ready()
    # It stays disconnected: no reconnect attempt (a retry would make it
    # connecting again) over several reconnect delays.
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert client.state == ClientState.DISCONNECTED
        await asyncio.sleep(0.02)
    assert [kind for kind, _ in events.seen] == ["connecting", "disconnected"]
