"""The soak test's load generator: one process holding its share of the
subscribers (WebSocket, and a few on SSE), each checking the offsets of its
channel across every reconnection, and churning 1 % of them a second.

A ``Track`` is one subscriber's view of its channel; it outlives the
connections that carry it. A connection that is churned (or dropped by the
server) is replaced by a new one (a new JWT, ``connect``, ``subscribe`` with
``recover`` from the track's last offset and epoch; on SSE, the position in
``last_event_id``), so every publication of the channel must reach the
track exactly once and in order, or be inside a gap the server announced
(``recovered: false``).

The parent (reliability/soak.py) speaks to a generator over a pipe:
``("start", churn)``, ``("stats",)``, ``("quiesce",)`` (stop churning),
``("final", {channel: (epoch, offset)}, timeout)`` and ``("close",)``.
"""

from __future__ import annotations

import asyncio
import multiprocessing.connection
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import orjson
import uvloop

from bench.idle import rss_kb
from bench.run import PEERS, raise_fd_limit, squall_token
from bench.wsproto import OFFSET, SSESubscriber, Subscriber, frame, until

CLOSE_NORMAL = frame(b"\x03\xe8", 0x8)
CHURN_TICKS = 20  # churn steps a second


@dataclass(eq=False)
class Track:
    """One subscriber's channel position and its error counts, across
    reconnections."""

    index: int
    channel: str
    port: int
    sse: bool = False
    epoch: str = ""
    last: int = -1  # -1: never subscribed
    missing: set[int] = field(default_factory=set)  # skipped offsets not seen (yet)
    gap_until: int = 0  # skipped offsets up to here were announced (recovered: false)
    delivered: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    gaps: int = 0  # publications inside announced gaps
    epoch_changes: int = 0
    connects: int = 0
    drops: int = 0  # connections lost without our asking
    refused: int = 0  # connect or subscribe answered with an error
    last_error: str = ""
    client: Any = None  # the connection now carrying it

    def pub(self, offset: int, epoch: str) -> None:
        """Publication ``offset`` of ``epoch`` arrived."""
        self.delivered += 1
        if epoch != self.epoch:
            if self.epoch:
                self.epoch_changes += 1
            self.epoch, self.last = epoch, offset
            self.missing.clear()
            return
        last = self.last
        if offset == last + 1:
            self.last = offset
        elif offset > last + 1:
            announced = max(0, min(offset - 1, self.gap_until) - last)
            self.gaps += announced
            self.missing.update(range(last + 1 + announced, offset))
            self.last = offset
        elif offset in self.missing:
            self.missing.discard(offset)
            self.out_of_order += 1
        else:
            self.duplicated += 1

    def position(self, offset: int, epoch: str, recovered: bool | None) -> None:
        """A subscribe result: the channel stood at ``offset`` of ``epoch``
        (its recovered publications already counted)."""
        if self.last < 0 or (epoch != self.epoch and recovered is None):
            self.epoch, self.last = epoch, offset
            return
        if epoch != self.epoch:
            self.epoch_changes += 1
            self.epoch, self.last = epoch, offset
            self.missing.clear()
            return
        if offset > self.last:
            if recovered is False:
                self.gaps += offset - self.last
            else:
                self.missing.update(range(self.last + 1, offset + 1))
            self.last = offset


class _Checked:
    """What the WebSocket and SSE subscribers share: every line of what
    arrives goes through the track's offset checks."""

    track: Track
    generator: Generator
    transport: asyncio.Transport | None
    joined: bool  # subscribed on this connection
    closing: bool

    def on_text(self, payload: bytes) -> None:
        track = self.track
        for line in payload.split(b"\n"):
            if line.startswith(b'{"push":"pub"'):
                pub = orjson.loads(line)["pub"]
                track.pub(pub["offset"], pub["epoch"])
            elif line.startswith(b'{"id":2,'):
                self.subscribe_result(orjson.loads(line))
            elif line.startswith(b'{"push":"subscribe"'):  # SSE
                msg = orjson.loads(line)
                # The recovered publications follow as pushes of their own:
                # the offsets they skip up to here were announced.
                if msg.get("recovered") is False:
                    track.gap_until = msg["offset"]
                if track.last < 0 or msg["epoch"] != track.epoch:
                    track.position(msg["offset"], msg["epoch"], msg.get("recovered"))
                self.became_subscribed()
            elif line.startswith((b'{"id":1,"error"', b'{"push":"unsubscribe"')):
                self.refused(line[:200].decode(errors="replace"))
            elif line.startswith(b'{"push":"disconnect"'):
                track.last_error = line[:200].decode(errors="replace")

    def subscribe_result(self, msg: dict[str, Any]) -> None:
        track = self.track
        if "error" in msg:
            self.refused(str(msg["error"])[:200])
            return
        result = msg["result"]
        recovered = result.get("recovered")
        if recovered is False:
            track.gap_until = result["offset"]
        for pub in result.get("publications", ()):
            track.pub(pub["offset"], pub["epoch"])
        track.position(result["offset"], result["epoch"], recovered)
        self.became_subscribed()

    def refused(self, error: str) -> None:
        """Connect or subscribe answered with an error (114, broker
        unavailable, say): as a client should, close, back off and
        reconnect with recovery; the track keeps its position."""
        self.track.last_error = error
        if not self.closing:
            self.track.refused += 1
            self.leave()
            self.generator.lost(self.track)

    def became_subscribed(self) -> None:
        if not self.joined:
            self.joined = True
            self.generator.subscribed(self.track)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing:
            self.track.drops += 1
            self.generator.lost(self.track)

    def leave(self) -> None:
        """Close this connection (a WebSocket close frame first)."""
        self.closing = True
        if self.transport is not None:
            if not self.track.sse:
                self.transport.write(CLOSE_NORMAL)
            self.transport.close()


class WSClient(_Checked, Subscriber):
    def __init__(self, track: Track, generator: Generator, host: str) -> None:
        params: dict[str, Any] = {"channel": track.channel}
        if track.last >= 0:
            params.update(recover=True, offset=track.last, epoch=track.epoch)
        hello = [
            orjson.dumps(
                {"id": 1, "method": "connect", "params": {"token": squall_token(f"u{track.index}")}}
            ),
            orjson.dumps({"id": 2, "method": "subscribe", "params": params}),
        ]
        Subscriber.__init__(self, PEERS["squall"].path, host, hello, OFFSET, None, _nothing)
        self.track, self.generator = track, generator
        self.joined = self.closing = False


class SSEClient(_Checked, SSESubscriber):
    def __init__(self, track: Track, generator: Generator, host: str) -> None:
        query = {"channel": track.channel, "token": squall_token(f"u{track.index}")}
        if track.last >= 0:
            query["last_event_id"] = urlencode({track.channel: f"{track.last}.{track.epoch}"})
        SSESubscriber.__init__(
            self, "/connection/sse", host, [urlencode(query).encode()], OFFSET, None, _nothing
        )
        self.track, self.generator = track, generator
        self.joined = self.closing = False


def _nothing() -> None:
    pass


class Generator:
    """This process's subscribers, their churn and their counts."""

    def __init__(self, tracks: list[Track]) -> None:
        self.tracks = tracks
        self.ready: set[Track] = set()  # subscribed on their current connection
        self.pending = 0  # connections opening
        self.churned = 0
        self.connect_failures = 0
        self.churning = False
        self.loop = asyncio.get_running_loop()
        self.tasks: set[asyncio.Task[None]] = set()

    def subscribed(self, track: Track) -> None:
        self.ready.add(track)

    def lost(self, track: Track) -> None:
        """The server (or the network) closed it: reconnect with backoff."""
        self.ready.discard(track)
        self.spawn(self.connect(track, delay=0.2 + random.random() * 0.8))

    def spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def connect(self, track: Track, delay: float = 0.0) -> None:
        if delay:
            await asyncio.sleep(delay)
        client: Callable[[], Any] = (
            (lambda: SSEClient(track, self, f"127.0.0.1:{track.port}"))
            if track.sse
            else (lambda: WSClient(track, self, f"127.0.0.1:{track.port}"))
        )
        self.pending += 1
        try:
            for attempt in range(10):
                try:
                    _, track.client = await self.loop.create_connection(
                        client, "127.0.0.1", track.port
                    )
                    track.connects += 1
                    return
                except OSError as exc:
                    self.connect_failures += 1
                    track.last_error = repr(exc)[:200]
                    await asyncio.sleep(min(5.0, 0.2 * 2**attempt) * (0.5 + random.random()))
        finally:
            self.pending -= 1

    def churn(self, count: int) -> None:
        """Close ``count`` subscribed connections and open their successors."""
        for track in random.sample(list(self.ready), min(count, len(self.ready))):
            self.ready.discard(track)
            track.client.leave()
            self.churned += 1
            self.spawn(self.connect(track))

    async def churn_forever(self, fraction: float) -> None:
        """Churn ``fraction`` of the tracks a second, spread over the second
        in ``CHURN_TICKS`` steps: clients that come and go on their own do
        not do so in step (a reconnection storm is bench/storm.py's job)."""
        per_tick = len(self.tracks) * fraction / CHURN_TICKS
        owed = 0.0
        t0 = time.monotonic()
        tick = 0
        while self.churning:
            tick += 1
            owed += per_tick
            n = int(owed)
            owed -= n
            self.churn(n)
            await asyncio.sleep(max(0.0, t0 + tick / CHURN_TICKS - time.monotonic()))

    def stats(self) -> dict[str, Any]:
        ts = self.tracks
        return {
            "tracks": len(ts),
            "subscribed": len(self.ready),
            "pending": self.pending,
            "churned": self.churned,
            "drops": sum(t.drops for t in ts),
            "refused": sum(t.refused for t in ts),
            "connect_failures": self.connect_failures,
            "delivered": sum(t.delivered for t in ts),
            "missing_now": sum(len(t.missing) for t in ts),
            "duplicated": sum(t.duplicated for t in ts),
            "out_of_order": sum(t.out_of_order for t in ts),
            "gaps": sum(t.gaps for t in ts),
            "epoch_changes": sum(t.epoch_changes for t in ts),
            "rss_kb": rss_kb(os.getpid()),
        }

    async def final(self, positions: dict[str, list[Any]], timeout: float) -> dict[str, Any]:
        """Wait until every track reached its channel's final position, then
        count: what is still missing, or never arrived, is lost."""

        def behind(t: Track) -> int:
            """How many of its channel's publications ``t`` has yet to see."""
            epoch, offset = positions.get(t.channel, ("", 0))
            if t.epoch != epoch:
                return int(offset)
            return max(0, int(offset) - t.last)

        await until(lambda: not any(behind(t) for t in self.tracks), timeout, 0.1)
        out = self.stats()
        incomplete = [t for t in self.tracks if behind(t)]
        tail = sum(behind(t) for t in incomplete)
        out["lost"] = sum(len(t.missing) for t in self.tracks) + tail
        out["incomplete"] = len(incomplete)
        out["errors"] = sorted({t.last_error for t in self.tracks if t.last_error})[:10]
        out["sse"] = sum(1 for t in self.tracks if t.sse)
        return out

    def close(self) -> None:
        self.churning = False
        for task in list(self.tasks):
            task.cancel()
        for t in self.tracks:
            if t.client is not None:
                t.client.leave()


async def _main(plan: list[dict[str, Any]], pipe: multiprocessing.connection.Connection) -> None:
    loop = asyncio.get_running_loop()
    tracks = [Track(**p) for p in plan]
    gen = Generator(tracks)
    inbox: asyncio.Queue[Any] = asyncio.Queue(maxsize=100)

    def readable() -> None:
        try:
            inbox.put_nowait(pipe.recv())
        except EOFError:
            loop.remove_reader(pipe.fileno())
            inbox.put_nowait(("close",))

    loop.add_reader(pipe.fileno(), readable)
    t0 = time.perf_counter()
    for i, track in enumerate(tracks):
        gen.spawn(gen.connect(track))
        if i % 100 == 99:
            # Let handshakes progress: at most 500 connections opening at once.
            await until(lambda: gen.pending < 500, 60, 0.01)
    await until(lambda: len(gen.ready) == len(tracks), 60 + len(tracks) / 100, 0.1)
    pipe.send(("subscribed", len(gen.ready), round(time.perf_counter() - t0, 1)))
    churner: asyncio.Task[None] | None = None
    try:
        while True:
            msg = await inbox.get()
            if msg[0] == "start":
                gen.churning = True
                churner = loop.create_task(gen.churn_forever(msg[1]))
            elif msg[0] == "stats":
                pipe.send(("stats", gen.stats()))
            elif msg[0] == "quiesce":
                gen.churning = False
                if churner is not None:
                    await churner
                # Reconnections under way finish (bounded by connect's retries).
                await until(lambda: gen.pending == 0, 60, 0.05)
                pipe.send(("quiet", gen.stats()))
            elif msg[0] == "final":
                pipe.send(("final", await gen.final(msg[1], msg[2])))
            elif msg[0] == "close":
                break
    finally:
        loop.remove_reader(pipe.fileno())
        gen.close()
        await asyncio.sleep(0.2)  # let the close frames go out


def generator(plan: list[dict[str, Any]], pipe: multiprocessing.connection.Connection) -> None:
    """The generator process's entry point (multiprocessing, spawn)."""
    raise_fd_limit(len(plan) + 2000)
    uvloop.run(_main(plan, pipe))
