"""What the connections that leave Tornado share: WebSocket clients
(``handlers/websocket.py``), SSE streams (``handlers/sse.py``) and API
streams (``handlers/api_stream.py``).

Tornado parses the request and answers the upgrade (or checks the stream's
request); then ``hand_over`` moves the socket to a plain asyncio protocol on
the event loop, which keeps no HTTP request, no IOStream and no task of its
own. A ``Registry`` holds one kind of such connection for the process: one
timer pings them all (each ``ping_interval`` after it came and after each
ping since), and at shutdown it closes them, waits a grace period for the
peers, and cuts the rest.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import orjson
import tornado.iostream
import tornado.web

from server import wsframe


class Detached(Protocol):
    def abort(self) -> None: ...


C = TypeVar("C", bound=Detached)


async def hand_over(
    stream: tornado.iostream.IOStream,
    make: Callable[[bytes], asyncio.Protocol],
    *,
    after_reply: bool,
) -> None:
    """Take a request's socket from Tornado and give it to ``make(leftover)``,
    ``leftover`` being the bytes Tornado read past the request (a WebSocket
    client may send its first frame right behind the upgrade).
    ``after_reply``: wait until Tornado's reply (the 101) is with the kernel."""
    if after_reply:
        try:
            await stream.write(b"")
        except tornado.iostream.StreamClosedError:
            return
    sock = stream.socket
    if stream.closed() or sock is None:
        return
    leftover = bytes(stream._read_buffer)
    stream.io_loop.remove_handler(sock)
    fd = sock.detach()
    raw = socket.socket(sock.family, sock.type, sock.proto, fileno=fd)
    protocol = make(leftover)
    try:
        await asyncio.get_running_loop().connect_accepted_socket(lambda: protocol, raw)
    except OSError:
        raw.close()


# Frames read ahead of the work on them before the socket stops being read.
MAX_INBOX = 16


class Inbox:
    """Frames read ahead of the work on them, bounded: past ``MAX_INBOX``
    frames, or twice the frame limit in bytes, the socket is not read until
    the work has taken half of them. A client that floods waits for its own
    frames, and nobody else's."""

    __slots__ = ("_frames", "_max_bytes", "nbytes", "paused")

    def __init__(self, max_message: int) -> None:
        self._frames: collections.deque[bytes] = collections.deque()
        self._max_bytes = 2 * max_message
        self.nbytes = 0
        self.paused = False

    def __len__(self) -> int:
        return len(self._frames)

    def put(self, payload: bytes, transport: asyncio.Transport | None) -> None:
        self._frames.append(payload)
        self.nbytes += len(payload)
        if not self.paused and (len(self._frames) >= MAX_INBOX or self.nbytes > self._max_bytes):
            self.paused = True
            if transport is not None:
                transport.pause_reading()

    def take(self, transport: asyncio.Transport | None) -> bytes:
        """The oldest frame; reading resumes (on ``transport``, if any) once
        the inbox is down to half."""
        payload = self._frames.popleft()
        self.nbytes -= len(payload)
        if (
            self.paused
            and len(self._frames) < MAX_INBOX // 2
            and self.nbytes <= self._max_bytes // 2
        ):
            self.resume(transport)
        return payload

    def resume(self, transport: asyncio.Transport | None) -> None:
        self.paused = False
        if transport is not None:
            transport.resume_reading()

    def clear(self) -> None:
        self._frames.clear()
        self.nbytes = 0


class FlowControlled(asyncio.Protocol):
    """A protocol whose writes wait for the kernel: with the transport's
    write buffer limit at 0, ``pause_writing`` comes as soon as the kernel
    leaves bytes behind, and ``drained()`` resolves when it takes them."""

    __slots__ = ("_drain", "write_paused")

    def __init__(self) -> None:
        self._drain: asyncio.Future[None] | None = None
        self.write_paused = False

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._end_drain()

    def drained(self) -> asyncio.Future[None]:
        if self._drain is None:
            self._drain = asyncio.get_running_loop().create_future()
        return self._drain

    def _end_drain(self, exc: BaseException | None = None) -> None:
        """Resolve the waiter, or fail it with ``exc`` (retrieved: whoever
        waits learns of it in its callback)."""
        drain, self._drain = self._drain, None
        if drain is None or drain.done():
            return
        if exc is None:
            drain.set_result(None)
        else:
            drain.set_exception(exc)
            drain.exception()


class Registry(Generic[C]):
    """This process's connections of one kind. ``ping_interval`` 0: no pings;
    ``ping_timeout`` 0: pings expect no answer (``check`` is never called)."""

    def __init__(self, ping_interval: float = 0.0, ping_timeout: float = 0.0) -> None:
        self.conns: dict[C, None] = {}
        self._empty = asyncio.Event()
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self._timer: asyncio.TimerHandle | None = None
        # One timer ticks a few times per interval: (when, connection),
        # oldest first, for the pings due and the answers awaited.
        self._tick = min(1.0, ping_interval / 4) if ping_interval else 0.0
        self._due: collections.deque[tuple[float, C]] = collections.deque()
        self._checks: collections.deque[tuple[float, C]] = collections.deque()

    def add(self, conn: C) -> None:
        self.conns[conn] = None
        if self.ping_interval:
            loop = asyncio.get_running_loop()
            self._due.append((loop.time() + self.ping_interval, conn))
            if self._timer is None:
                self._timer = loop.call_later(self._tick, self._ping_round)

    def discard(self, conn: C) -> None:
        self.conns.pop(conn, None)
        if not self.conns:
            self._empty.set()

    def ping(self, conn: C) -> None:
        """Ping one connection (a subclass says how)."""

    def check(self, conn: C) -> None:
        """Drop ``conn`` if it has not answered its ping (a subclass says how)."""

    def _ping_round(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        conns = self.conns
        checks = self._checks
        while checks and checks[0][0] <= now:
            conn = checks.popleft()[1]
            if conn in conns:
                self.check(conn)
        due = self._due
        next_ping = now + self.ping_interval
        while due and due[0][0] <= now:
            conn = due.popleft()[1]
            if conn not in conns:
                continue  # gone since
            self.ping(conn)
            due.append((next_ping, conn))
            if self.ping_timeout:
                checks.append((now + self.ping_timeout, conn))
        if due or checks:
            self._timer = loop.call_later(self._tick, self._ping_round)
        # else: the next connection starts the timer again

    async def close_all(self, close: Callable[[C], None], grace: float = 1.0) -> None:
        """``close`` every connection, give the peers up to ``grace`` seconds
        to answer, then cut those still open."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for conn in list(self.conns):
            close(conn)
        if not await self.all_closed(grace):
            for conn in list(self.conns):
                conn.abort()
            await self.all_closed(grace)  # connection_lost comes on a later iteration

    async def all_closed(self, timeout: float) -> bool:
        if self.conns:
            self._empty.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._empty.wait(), timeout)
        return not self.conns


class UpgradeHandler(tornado.web.RequestHandler):
    """The checks and answers of a WebSocket upgrade (RFC 6455, section
    4.2), refusals as JSON errors."""

    def refuse(self, status: int, code: int, message: str) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(orjson.dumps({"error": {"code": code, "message": message}}))

    def accept_key(self, origin_ok: Callable[[str], bool] | None = None) -> str:
        """The ``Sec-WebSocket-Accept`` of a valid upgrade, or raises
        ``HandshakeError``; ``origin_ok`` judges an ``Origin`` header."""
        headers = self.request.headers
        if headers.get("Upgrade", "").lower() != "websocket":
            raise wsframe.HandshakeError(400, "a WebSocket upgrade needs 'Upgrade: websocket'")
        tokens = [t.strip().lower() for t in headers.get("Connection", "").split(",")]
        if "upgrade" not in tokens:
            raise wsframe.HandshakeError(400, "a WebSocket upgrade needs 'Connection: Upgrade'")
        origin = headers.get("Origin")
        if origin is not None and origin_ok is not None and not origin_ok(origin):
            raise wsframe.HandshakeError(403, "origin not allowed")
        if headers.get("Sec-WebSocket-Version") != "13":
            self.set_header("Sec-WebSocket-Version", "13")
            raise wsframe.HandshakeError(426, "Sec-WebSocket-Version must be 13")
        return wsframe.accept_key(headers.get("Sec-WebSocket-Key", ""))

    def switch(self, accept: str, headers: dict[str, Any] | None = None) -> None:
        """Answer 101 Switching Protocols."""
        self.clear_header("Content-Type")
        self.set_status(101)
        self.set_header("Upgrade", "websocket")
        self.set_header("Connection", "Upgrade")
        self.set_header("Sec-WebSocket-Accept", accept)
        for name, value in (headers or {}).items():
            self.set_header(name, value)
        self.finish()
