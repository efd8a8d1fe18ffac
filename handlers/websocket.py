"""WebSocket transport: ``/connection/websocket``.

Tornado routes the request and answers the upgrade; then the socket moves to
a plain asyncio protocol on the event loop (``WebSocketConnection``), which
only moves bytes: framing rules live in ``server/wsframe.py``, everything
else in the session. After the handshake a connection keeps no HTTP request,
no IOStream and no task of its own, and a push costs one ``transport.write``
of a frame that every subscriber of the channel shares.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, cast
from urllib.parse import urlsplit

import tornado.iostream
import tornado.web

from handlers.detached import FlowControlled, Inbox, Registry, UpgradeHandler, hand_over
from server import wsframe
from server.codec import Codec
from server.errors import NO_PONG, SHUTDOWN, Disconnect, SquallError
from server.node import Node
from server.protocol import SQUALL
from server.proxy import ConnectionMeta
from server.session import Session, State

log = logging.getLogger("squall.websocket")

# How long a closing connection waits for the peer's close frame (and for its
# last bytes to drain) before the TCP connection is cut.
CLOSE_TIMEOUT = 5.0


def origin_allowed(origin: str, host: str | None, allowed: list[str]) -> bool:
    """Same origin only when ``allowed`` is empty; ``*`` allows any."""
    if "*" in allowed:
        return True
    origin = origin.lower().rstrip("/")
    if any(origin == a.lower().rstrip("/") for a in allowed):
        return True
    return bool(host) and urlsplit(origin).netloc == (host or "").lower()


class ConnectionClosing(ConnectionError):
    """A write after the close frame went out."""


class _FrameCache:
    """The last frame built for one codec. The flusher writes the subscribers
    of a channel one after another with the same queued messages, so they
    share one frame (server frames are unmasked: the same bytes for
    everyone). Also the codec's ping frame, when it pings in its own
    protocol rather than with WebSocket pings."""

    __slots__ = ("_join", "_one_each", "_opcode", "frame", "items", "ping")

    def __init__(self, codec: Codec) -> None:
        self.items: list[bytes] = []
        self.frame = b""
        self._opcode = wsframe.OP_BINARY if codec.binary else wsframe.OP_TEXT
        self._join = codec.join_frame
        self._one_each = codec.frame_per_message
        self.ping = None if codec.ping is None else wsframe.build(self._opcode, codec.ping)

    def build(self, items: list[bytes]) -> bytes:
        # List equality tests identity first: for the shared messages of a
        # fan-out this is a few pointer compares.
        if items == self.items:
            return self.frame
        opcode = self._opcode
        if self._one_each and len(items) > 1:
            # A protocol that reads one message a frame (Pusher): still one write.
            self.frame = b"".join(wsframe.header(opcode, len(i)) + i for i in items)
        else:
            payload = self._join(items)
            self.frame = wsframe.header(opcode, len(payload)) + payload
        self.items = items
        return self.frame


class WebSocketConnections(Registry["WebSocketConnection"]):
    """This process's upgraded connections. One timer pings them all (no
    timer per connection); a peer that has not answered by ``ping_timeout``
    is dropped."""

    def __init__(self, node: Node) -> None:
        limits = node.settings.limits
        super().__init__(limits.ping_interval, limits.ping_timeout)
        self.node = node
        self.max_message = limits.max_frame_bytes
        self._frames: dict[Codec, _FrameCache] = {}
        self._ping = wsframe.build(wsframe.OP_PING, b"")
        node.add_closer(self.shutdown)

    def frames(self, codec: Codec) -> _FrameCache:
        """The frame cache of ``codec``: one per codec in use."""
        cache = self._frames.get(codec)
        if cache is None:
            cache = self._frames[codec] = _FrameCache(codec)
        return cache

    def ping(self, conn: WebSocketConnection) -> None:
        conn.ping(self._ping)

    def check(self, conn: WebSocketConnection) -> None:
        conn.check_alive()

    async def shutdown(self, grace: float = 1.0) -> None:
        """Close every connection: a close frame (sessions already sent
        theirs), up to ``grace`` seconds for the peers to answer, then cut."""
        await self.close_all(lambda conn: conn.close(SHUTDOWN), grace)

    async def adopt(
        self,
        stream: tornado.iostream.IOStream,
        codec: Codec = SQUALL,
        meta: ConnectionMeta | None = None,
    ) -> None:
        """Take the socket of an upgraded request from Tornado; the
        connection speaks ``codec``. ``meta`` is for the proxy hooks."""
        await hand_over(
            stream,
            lambda leftover: WebSocketConnection(self, leftover, codec, meta),
            after_reply=True,
        )


class WebSocketConnection(FlowControlled):
    """One upgraded connection: the session's ``Transport``."""

    __slots__ = (
        "_closing",
        "_codec",
        "_frames",
        "_heard",
        "_inbox",
        "_leftover",
        "_meta",
        "_parser",
        "_pinged",
        "_pong",
        "_registry",
        "_session_gone",
        "_timer",
        "_transport",
        "_worker",
        "session",
    )
    kind = "websocket"

    def __init__(
        self,
        registry: WebSocketConnections,
        leftover: bytes,
        codec: Codec = SQUALL,
        meta: ConnectionMeta | None = None,
    ) -> None:
        self._registry = registry
        self._meta = meta
        self._codec = codec
        self._frames = registry.frames(codec)
        self._pong = codec.pong
        self._leftover = leftover
        self._parser = wsframe.FrameParser(registry.max_message)
        self._transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self._inbox: Inbox | None = None
        self._worker: asyncio.Task[None] | None = None
        super().__init__()
        self._closing = False
        self._session_gone = False
        self._timer: asyncio.TimerHandle | None = None
        self._pinged = False
        self._heard = False

    # ---- asyncio protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but they
        # have its methods.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        # Paused as soon as the kernel leaves bytes behind: the session then
        # queues (and coalesces) instead of piling frames up in the transport.
        transport.set_write_buffer_limits(high=0)
        self._registry.add(self)
        meta, self._meta = self._meta, None  # the session keeps it
        try:
            self.session = self._registry.node.new_session(self, self._codec, meta)
        except SquallError as exc:
            self._start_close(wsframe.CLOSE_TRY_AGAIN_LATER, exc.message)
            return
        if self._codec.connect_on_open:
            # The server speaks first (Pusher): an empty frame is the opening.
            self._on_message(b"")
        leftover, self._leftover = self._leftover, b""
        if leftover:
            self.data_received(leftover)

    def data_received(self, data: bytes) -> None:
        self._heard = True
        try:
            items = self._parser.feed(data)
        except wsframe.FrameError as exc:
            log.debug("bad frame: %s", exc)
            self._session_closed()
            self._start_close(exc.code, exc.reason)
            return
        for opcode, payload in items:
            if opcode <= wsframe.OP_BINARY:
                if self._closing:
                    continue
                if self._codec.binary and opcode != wsframe.OP_BINARY:
                    # A text frame on a binary protocol cannot be a command.
                    self._refuse_frame()
                    return
                if payload == self._pong:
                    continue  # an answer to our ping: hearing it is enough
                self._on_message(payload)
            elif opcode == wsframe.OP_PING:
                if not self._closing and self._transport is not None:
                    self._transport.write(wsframe.build(wsframe.OP_PONG, payload))
            elif opcode == wsframe.OP_CLOSE:
                self._on_close_frame(payload)
                return
            # A pong needs nothing more: hearing from the peer is enough.

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._registry.discard(self)
        if self._inbox is not None:
            self._inbox.clear()
        self._end_drain(ConnectionClosing("connection lost"))
        self._session_closed()
        self._transport = None

    # ---- the session's Transport ------------------------------------------

    def send(self, items: list[bytes]) -> Awaitable[None] | None:
        transport = self._transport
        if self._closing or transport is None:
            raise ConnectionClosing("connection is closing")
        frames = self._frames
        # A fan-out hands every subscriber the same list: then it is the
        # frame just built, found by identity.
        transport.write(frames.frame if items is frames.items else frames.build(items))
        if not self.write_paused:
            return None
        return self.drained()

    def close(self, disconnect: Disconnect) -> None:
        self._start_close(*self._codec.close(disconnect))

    def _refuse_frame(self) -> None:
        if self.session is not None:
            self.session.disconnect(self._codec.violation())
        else:
            self._start_close(*self._codec.close(self._codec.violation()))

    # ---- keepalive --------------------------------------------------------

    def ping(self, frame: bytes) -> None:
        """Ping with ``frame`` (a WebSocket ping), or with the codec's own
        ping message once the session is connected: a client that answers
        it (any frame counts) is alive."""
        if self._closing or self._transport is None:
            return
        own = self._frames.ping
        if own is not None and self.session is not None and self.session.state is State.CONNECTED:
            frame = own
        self._pinged = True
        self._heard = False
        self._transport.write(frame)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def check_alive(self) -> None:
        if self._pinged and not self._heard and self._transport is not None:
            session = self.session
            if self._frames.ping is not None and session is not None and not session.closed:
                # A protocol that pings in-band says why it closes.
                session.disconnect(NO_PONG, flush=False)
                return
            log.debug("no answer to a ping: dropping the connection")
            self._transport.abort()

    # ---- inside -----------------------------------------------------------

    def _on_message(self, payload: bytes) -> None:
        if self.session is None:
            return
        if self._inbox is None:
            self._inbox = Inbox(self._registry.max_message)  # (an idle one holds none)
        self._inbox.put(payload, self._transport)
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._work())

    async def _work(self) -> None:
        # Commands of one connection are handled in order, one at a time. The
        # task ends when the inbox is empty: an idle connection holds none.
        session = self.session
        inbox = self._inbox
        assert session is not None and inbox is not None
        try:
            while inbox:
                payload = inbox.take(None if self._closing else self._transport)
                await session.handle_frame(payload)
        finally:
            self._worker = None
            if not inbox:
                self._inbox = None

    def _on_close_frame(self, payload: bytes) -> None:
        code: int | None
        try:
            code, _ = wsframe.parse_close(payload)
        except wsframe.FrameError as exc:
            code = exc.code
        self._session_closed()
        if not self._closing:
            # The peer closes: answer with its code, as the RFC asks.
            self._start_close(wsframe.CLOSE_NORMAL if code is None else code, "")
        if self._transport is not None:
            self._transport.close()

    def _start_close(self, code: int, reason: str) -> None:
        """Send a close frame, then wait (a bounded time) for the peer's."""
        if self._closing:
            return
        self._closing = True
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(wsframe.close_frame(code, reason))
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(CLOSE_TIMEOUT, transport.abort)

    def _session_closed(self) -> None:
        if self._session_gone:
            return
        self._session_gone = True
        if self.session is not None:
            self.session.transport_closed()


class WebSocketHandler(UpgradeHandler):
    """The upgrade: the checks and answers of RFC 6455, section 4.2, then
    the socket goes to ``WebSocketConnections``."""

    node: Node
    connections: WebSocketConnections
    codec: Codec
    subprotocols: dict[str, Codec]

    def initialize(
        self,
        node: Node,
        connections: WebSocketConnections,
        codec: Codec = SQUALL,
        subprotocols: dict[str, Codec] | None = None,
    ) -> None:
        """``codec`` is the path's protocol; a client that asks for one of
        ``subprotocols`` (``Sec-WebSocket-Protocol``) gets that one."""
        self.node = node
        self.connections = connections
        self.codec = codec
        self.subprotocols = subprotocols or {}

    def _pick_codec(self) -> tuple[Codec, str | None]:
        asked = self.request.headers.get("Sec-WebSocket-Protocol", "")
        for name in (p.strip() for p in asked.split(",")):
            codec = self.subprotocols.get(name)
            if codec is not None:
                return codec, name
        return self.codec, None

    def _origin_ok(self, origin: str) -> bool:
        allowed = self.node.settings.server.allowed_origins
        return origin_allowed(origin, self.request.headers.get("Host"), allowed)

    async def get(self, *args: Any, **kwargs: Any) -> None:
        try:
            accept = self.accept_key(self._origin_ok)
        except wsframe.HandshakeError as exc:
            self.refuse(exc.status, 107, exc.reason)
            return
        if (
            self.node.draining
            or len(self.node.sessions) >= self.node.settings.limits.max_connections
        ):
            self.node.metrics.connections_refused += 1
            reason = "shutting down" if self.node.draining else "connection limit reached"
            self.refuse(503, 114, f"service unavailable: {reason}")
            return
        codec, subprotocol = self._pick_codec()
        self.switch(accept, {"Sec-WebSocket-Protocol": subprotocol} if subprotocol else None)
        # Only the headers the proxy hooks forward (nothing without hooks).
        meta = self.node.connection_meta(
            "websocket", self.request.remote_ip or "", self.request.headers
        )
        await self.connections.adopt(self.detach(), codec, meta)
