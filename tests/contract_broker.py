"""The ``Broker`` contract: every implementation passes these unchanged.

A test module provides a ``broker`` fixture (started with a
``RecordingHandler``) and imports these tests.
"""

from __future__ import annotations

import asyncio

import pytest

from server.broker import Broker, OffsetConflict
from server.models import ClientInfo, HistoryOptions, Publication, StreamPosition

KEEP = HistoryOptions(size=10, ttl=60, meta_ttl=3600)


class RecordingHandler:
    def __init__(self) -> None:
        self.pubs: list[Publication] = []
        self.joins: list[tuple[str, ClientInfo]] = []
        self.leaves: list[tuple[str, ClientInfo]] = []
        self.edges: list[bool] = []
        self.control: list[bytes] = []

    def on_publication(self, pub: Publication) -> None:
        self.pubs.append(pub)

    def on_join(self, channel: str, info: ClientInfo, first: bool = True) -> None:
        self.joins.append((channel, info))
        self.edges.append(first)

    def on_leave(self, channel: str, info: ClientInfo, last: bool = True) -> None:
        self.leaves.append((channel, info))
        self.edges.append(last)

    def on_control(self, message: bytes) -> None:
        self.control.append(message)


class GapHandler(RecordingHandler):
    """Also records the channels the broker reports as unrecoverable."""

    def __init__(self) -> None:
        super().__init__()
        self.unrecoverable: list[str] = []

    def on_unrecoverable(self, channel: str) -> None:
        self.unrecoverable.append(channel)


async def eventually(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_offsets_are_consecutive_and_delivered_in_order(
    broker: Broker, handler: RecordingHandler
) -> None:
    await broker.subscribe("c1")
    pubs = [await broker.publish("c1", b'{"n":%d}' % i, info=None, history=KEEP) for i in range(20)]
    assert [p.offset for p in pubs] == list(range(1, 21))
    assert len({p.epoch for p in pubs}) == 1
    await eventually(lambda: len([p for p in handler.pubs if p.channel == "c1"]) == 20)
    assert [p.offset for p in handler.pubs if p.channel == "c1"] == list(range(1, 21))
    assert handler.pubs[0].data == b'{"n":0}'
    # How far the node has delivered: what a new subscriber's reply is checked against.
    assert broker.delivered("c1") == pubs[-1].position


async def test_history_is_bounded_and_ordered(broker: Broker) -> None:
    for i in range(15):
        await broker.publish("c2", b"%d" % i, info=ClientInfo("cl", "u"), history=KEEP)
    result = await broker.history("c2", after=None, limit=100)
    assert [p.offset for p in result.publications] == list(range(6, 16))
    assert result.position.offset == 15
    assert result.publications[0].info == ClientInfo("cl", "u")
    newest = await broker.history("c2", after=None, limit=3, reverse=True)
    assert [p.offset for p in newest.publications] == [15, 14, 13]
    after = await broker.history("c2", after=12, limit=100)
    assert [p.offset for p in after.publications] == [13, 14, 15]
    nothing = await broker.history("c2", after=15, limit=100)
    assert nothing.publications == []
    position_only = await broker.history("c2", after=None, limit=0)
    assert position_only.publications == [] and position_only.position.offset == 15


async def test_history_ttl(broker: Broker) -> None:
    short = HistoryOptions(size=10, ttl=0.2, meta_ttl=3600)
    await broker.publish("c3", b"1", info=None, history=short)
    assert len((await broker.history("c3", after=None, limit=10)).publications) == 1
    await asyncio.sleep(0.3)  # the TTL itself is under test
    result = await broker.history("c3", after=None, limit=10)
    assert result.publications == []
    assert result.position.offset == 1  # the stream's position outlives its history


async def test_no_history_still_counts_offsets(broker: Broker) -> None:
    none = HistoryOptions(size=0, ttl=0, meta_ttl=3600)
    p1 = await broker.publish("c4", b"1", info=None, history=none)
    p2 = await broker.publish("c4", b"2", info=None, history=none)
    assert (p1.offset, p2.offset) == (1, 2)
    assert (await broker.history("c4", after=None, limit=10)).publications == []


async def test_publish_at_a_position(broker: Broker) -> None:
    pub = await broker.publish("c5", b"1", info=None, history=KEEP, at=StreamPosition(8, "ep1"))
    assert (pub.offset, pub.epoch) == (8, "ep1")
    assert await broker.position("c5") == StreamPosition(8, "ep1")
    with pytest.raises(OffsetConflict) as info:
        await broker.publish("c5", b"x", info=None, history=KEEP, at=StreamPosition(8, "ep1"))
    assert info.value.current == StreamPosition(8, "ep1")
    with pytest.raises(OffsetConflict):
        await broker.publish("c5", b"x", info=None, history=KEEP, at=StreamPosition(9, "other"))
    assert (await broker.position("c5")).offset == 8
    nxt = await broker.publish("c5", b"2", info=None, history=KEEP, at=StreamPosition(9, "ep1"))
    assert nxt.offset == 9


async def test_seed_only_when_absent(broker: Broker) -> None:
    await broker.seed("c6", StreamPosition(41, "old"))
    assert await broker.position("c6") == StreamPosition(41, "old")
    await broker.seed("c6", StreamPosition(99, "newer"))
    assert await broker.position("c6") == StreamPosition(41, "old")
    pub = await broker.publish("c6", b"x", info=None, history=KEEP)
    assert (pub.offset, pub.epoch) == (42, "old")


async def test_presence_and_join_leave(broker: Broker, handler: RecordingHandler) -> None:
    await broker.subscribe("room")
    alice = ClientInfo("c-a", "alice", {"n": 1})
    assert (await broker.add_presence("room", alice)).members == 1  # the room was empty
    edge = await broker.add_presence("room", ClientInfo("c-b", "bob"), by_user=True)
    assert (edge.members, edge.user_elsewhere) == (2, False)
    members = await broker.presence("room")
    assert set(members) == {"c-a", "c-b"}
    assert members["c-a"] == alice
    # alice's second connection: her user was there already.
    edge = await broker.add_presence("room", ClientInfo("c-a2", "alice"), by_user=True)
    assert (edge.members, edge.user_elsewhere) == (3, True)
    edge = await broker.remove_presence("room", "c-a2", user="alice")
    assert (edge.members, edge.user_elsewhere) == (2, True)
    edge = await broker.remove_presence("room", "c-b", user="bob")
    assert (edge.members, edge.user_elsewhere) == (1, False)
    assert set(await broker.presence("room")) == {"c-a"}
    await broker.publish_join("room", alice)
    await broker.publish_leave("room", alice)
    await eventually(lambda: handler.joins == [("room", alice)] and len(handler.leaves) == 1)
    # Whether it was the user's first connection in (last out) travels too.
    await broker.publish_join("room", alice, False)
    await broker.publish_leave("room", alice, False)
    await eventually(lambda: len(handler.leaves) == 2)
    assert handler.edges == [True, True, False, False]


async def test_control_reaches_every_node(broker: Broker, handler: RecordingHandler) -> None:
    await broker.publish_control(b'{"op":"disconnect","user":"u"}')
    await eventually(lambda: handler.control == [b'{"op":"disconnect","user":"u"}'])
