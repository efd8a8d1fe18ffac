"""The embedded broker: every stream lives in this process.

Delivery is synchronous inside ``publish``, so a channel's publications reach
the handler in offset order by construction.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import deque
from contextlib import suppress
from typing import Any

from server.broker import BrokerHandler, DurableLog, OffsetConflict, PresenceEdge
from server.models import ClientInfo, HistoryOptions, HistoryResult, Publication, StreamPosition


def new_epoch() -> str:
    return secrets.token_urlsafe(6)


class _Stream:
    __slots__ = ("epoch", "expires", "items", "meta_ttl", "offset", "touched")

    def __init__(self, epoch: str, offset: int = 0) -> None:
        self.epoch = epoch
        self.offset = offset
        self.items: deque[Publication] = deque()
        self.expires: deque[float] = deque()
        self.touched = time.monotonic()
        self.meta_ttl = 86400.0

    def trim(self, now: float) -> None:
        expires = self.expires
        while expires and expires[0] <= now:
            expires.popleft()
            self.items.popleft()


class MemoryBroker:
    name = "memory"
    # Publishing never waits here, so a session gains nothing by keeping
    # several publishes in flight.
    ordered_publish = False
    # Streams live in this process: the node seeds durable ones (they vanish
    # only with the process, or when they expire).
    seeds_from_log = False

    def __init__(self, *, sweep_interval: float = 60.0) -> None:
        self._streams: dict[str, _Stream] = {}
        self._presence: dict[str, dict[str, ClientInfo]] = {}
        self._handler: BrokerHandler | None = None
        self._sweep_interval = sweep_interval
        self._sweeper: asyncio.Task[None] | None = None
        self._node_info: dict[str, Any] = {}

    async def start(self, handler: BrokerHandler) -> None:
        self._handler = handler
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    def healthy(self) -> bool:
        return True

    def _stream(self, channel: str) -> _Stream:
        stream = self._streams.get(channel)
        if stream is None:
            stream = self._streams[channel] = _Stream(new_epoch())
        return stream

    async def publish(
        self,
        channel: str,
        data: bytes,
        *,
        info: ClientInfo | None,
        history: HistoryOptions,
        at: StreamPosition | None = None,
        time_ms: int | None = None,
    ) -> Publication:
        stream = self._streams.get(channel)
        if at is not None:
            if stream is None:
                stream = self._streams[channel] = _Stream(at.epoch, at.offset - 1)
            elif stream.epoch != at.epoch or stream.offset + 1 != at.offset:
                raise OffsetConflict(StreamPosition(stream.offset, stream.epoch))
        elif stream is None:
            stream = self._stream(channel)
        stream.offset += 1
        pub = Publication(channel, stream.offset, stream.epoch, data, info)
        if time_ms is not None:
            pub.time_ms = time_ms
        now = time.monotonic()
        stream.touched = now
        stream.meta_ttl = history.meta_ttl
        if history.size > 0:
            stream.trim(now)
            stream.items.append(pub)
            stream.expires.append(now + history.ttl)
            while len(stream.items) > history.size:
                stream.items.popleft()
                stream.expires.popleft()
        if self._handler is not None:
            self._handler.on_publication(pub)
        return pub

    async def subscribe(self, channel: str) -> None:
        return None

    async def unsubscribe(self, channel: str) -> None:
        return None

    async def position(self, channel: str) -> StreamPosition:
        stream = self._stream(channel)
        return StreamPosition(stream.offset, stream.epoch)

    def delivered(self, channel: str) -> StreamPosition | None:
        # Publishing delivers at once: nothing is ever on its way.
        stream = self._streams.get(channel)
        return StreamPosition(stream.offset, stream.epoch) if stream is not None else None

    def use_log(self, log: DurableLog) -> None:
        pass

    async def seed(self, channel: str, position: StreamPosition) -> None:
        if channel not in self._streams:
            self._streams[channel] = _Stream(position.epoch, position.offset)

    async def history(
        self, channel: str, *, after: int | None, limit: int, reverse: bool = False
    ) -> HistoryResult:
        stream = self._stream(channel)
        stream.trim(time.monotonic())
        position = StreamPosition(stream.offset, stream.epoch)
        if limit <= 0 or not stream.items:
            return HistoryResult([], position)
        items = stream.items
        if after is not None:
            first = items[0].offset
            start = max(0, after + 1 - first)
            selected = [items[i] for i in range(start, len(items))]
        else:
            selected = list(items)
        selected = selected[-limit:][::-1] if reverse else selected[:limit]
        return HistoryResult(selected, position)

    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        return dict(self._presence.get(channel, {}))

    async def add_presence(
        self, channel: str, info: ClientInfo, *, by_user: bool = False
    ) -> PresenceEdge:
        members = self._presence.setdefault(channel, {})
        members[info.client] = info
        elsewhere = by_user and any(
            c != info.client and m.user == info.user for c, m in members.items()
        )
        return PresenceEdge(len(members), elsewhere)

    async def remove_presence(self, channel: str, client: str, *, user: str = "") -> PresenceEdge:
        members = self._presence.get(channel)
        if members is None:
            return PresenceEdge(0, False)
        members.pop(client, None)
        if not members:
            del self._presence[channel]
        elsewhere = bool(user) and any(m.user == user for m in members.values())
        return PresenceEdge(len(members), elsewhere)

    async def publish_join(self, channel: str, info: ClientInfo, first: bool = True) -> None:
        if self._handler is not None:
            self._handler.on_join(channel, info, first)

    async def publish_leave(self, channel: str, info: ClientInfo, last: bool = True) -> None:
        if self._handler is not None:
            self._handler.on_leave(channel, info, last)

    async def publish_control(self, message: bytes) -> None:
        if self._handler is not None:
            self._handler.on_control(message)

    async def report_node(self, node_id: str, info: dict[str, Any]) -> None:
        self._node_info = info

    async def nodes(self) -> list[dict[str, Any]]:
        return [self._node_info] if self._node_info else []

    def sweep(self, now: float | None = None) -> int:
        """Drop streams whose history is gone and whose metadata has expired."""
        now = time.monotonic() if now is None else now
        dead = []
        for channel, stream in self._streams.items():
            stream.trim(now)
            if not stream.items and stream.touched + stream.meta_ttl <= now:
                dead.append(channel)
        for channel in dead:
            del self._streams[channel]
        return len(dead)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval)
            self.sweep()
