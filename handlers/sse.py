"""Server-Sent Events transport: ``GET /connection/sse?channel=a&channel=b``.

For clients that cannot hold a WebSocket. The token comes in the
``Authorization: Bearer`` header or, for ``EventSource`` (which cannot set
headers), the ``token`` query argument; the access log never shows query
strings. Every ``pub`` and ``subscribe`` event carries an ``id`` that encodes
the position of every channel of the stream, so the browser's automatic
reconnect (``Last-Event-ID``) resumes each channel exactly where it stopped.

Tornado checks the request and connects the session; then, as for
WebSocket, the socket moves to a plain asyncio protocol (``SSEConnection``)
that writes the response itself: the headers, then one chunk per flush.
Fan-out stays encode-once: the SSE codec (``server.protocol.SSE``) hands
every SSE subscriber of a channel the same messages, with each message's
channel, offset and epoch beside its bytes; the transport turns them into
events without parsing anything. A stream's positions are an interned,
immutable value (``_Positions``), so streams on the same channels at the same
offsets share it, and with it the chunk built for a publication: a delivery
to such a stream is a dictionary lookup and one ``transport.write``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import weakref
from collections.abc import Awaitable
from http import HTTPStatus
from typing import cast
from urllib.parse import parse_qsl, urlencode

import orjson
from tornado.httputil import format_timestamp

from handlers.base import JSONHandler
from handlers.detached import FlowControlled, Registry, hand_over
from handlers.websocket import origin_allowed
from server import errors, protocol
from server.errors import SHUTDOWN, Disconnect, SquallError
from server.models import StreamPosition
from server.node import Node
from server.protocol import SSE, StreamEvent
from server.proxy import ConnectionMeta
from server.session import Session

log = logging.getLogger("squall.sse")
access_log = logging.getLogger("squall.access")

# How long a closed stream's last bytes may take to drain before the TCP
# connection is cut.
CLOSE_TIMEOUT = 5.0
# The first event tells the browser how long to wait before it reconnects on
# its own.
RETRY = b"retry: 1000\n\n"
PING = b": ping\n\n"
_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"X-Accel-Buffering: no\r\n"
)
HEAD_CHUNKED = _HEAD + b"Transfer-Encoding: chunked\r\n"
HEAD_PLAIN = _HEAD + b"Connection: close\r\n"


def encode_positions(positions: dict[str, StreamPosition]) -> str:
    return urlencode({ch: f"{p.offset}.{p.epoch}" for ch, p in positions.items()})


def decode_positions(text: str) -> dict[str, StreamPosition]:
    """Parse a ``Last-Event-ID``; a malformed one raises ``BadRequest``."""
    out: dict[str, StreamPosition] = {}
    try:
        pairs = parse_qsl(text, strict_parsing=True, max_num_fields=1000)
    except ValueError:
        raise errors.BadRequest("Last-Event-ID is malformed") from None
    for channel, value in pairs:
        offset, _, epoch = value.partition(".")
        if not offset.isdigit() or not epoch:
            raise errors.BadRequest("Last-Event-ID is malformed")
        out[channel] = StreamPosition(int(offset), epoch)
    return out


def _chunk(body: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%b\r\n" % (len(body), body)


_Entries = tuple[tuple[str, int, str], ...]


class _Positions:
    """Where each channel of a stream stands, and the ``id:`` line that says
    so. Immutable and interned (``SSEConnections.positions``): streams at the
    same place share one, and each publication moves all of them to the same
    next one, found in ``_next``."""

    __slots__ = ("__weakref__", "_next", "entries", "id_line")

    def __init__(self, entries: _Entries) -> None:
        self.entries = entries  # sorted by channel
        self.id_line = (
            b"id: "
            + urlencode([(ch, f"{offset}.{epoch}") for ch, offset, epoch in entries]).encode()
            + b"\n"
        )
        self._next: dict[tuple[str, int, str], _Positions] = {}

    def after(
        self, event: StreamEvent, table: weakref.WeakValueDictionary[_Entries, _Positions]
    ) -> _Positions:
        key = (event.channel, event.offset, event.epoch)
        found = self._next.get(key)
        if found is not None:
            return found
        kept = [e for e in self.entries if e[0] != event.channel]
        if event.offset >= 0:
            kept.append(key)
            kept.sort()
        entries = tuple(kept)
        found = table.get(entries)
        if found is None:
            found = _Positions(entries)
            table[entries] = found
        if len(self._next) >= 16:
            self._next.clear()  # a stream at this place sees few distinct next events
        self._next[key] = found
        return found


class SSEConnections(Registry["SSEConnection"]):
    """This process's SSE streams: one timer writes their keepalive comments
    (``ping_interval`` after each one came and after each ping), the interned
    positions, and the chunks built for the list of messages being written."""

    def __init__(self, node: Node) -> None:
        super().__init__(node.settings.limits.ping_interval)
        self.node = node
        self.positions: weakref.WeakValueDictionary[_Entries, _Positions] = (
            weakref.WeakValueDictionary()
        )
        self.empty = self.intern(())
        # The flusher hands the subscribers of a channel the same list, one
        # after another: the chunks built for it, by the positions they
        # started from.
        self._items: list[bytes] | None = None
        self._chunks: dict[_Positions, tuple[bytes, bytes, _Positions]] = {}
        node.add_closer(self.shutdown)

    def intern(self, entries: _Entries) -> _Positions:
        found = self.positions.get(entries)
        if found is None:
            found = self.positions[entries] = _Positions(entries)
        return found

    def events(self, items: list[bytes], start: _Positions) -> tuple[bytes, bytes, _Positions]:
        """The chunk (and the bare events, for HTTP/1.0) that write ``items``
        to a stream at ``start``, and where the stream is after them."""
        if items is self._items:
            built = self._chunks.get(start)
            if built is not None:
                return built
        else:
            self._items = items
            self._chunks = {}
        positions = start
        table = self.positions
        parts: list[bytes] = []
        for item in items:
            if type(item) is StreamEvent:
                positions = positions.after(item, table)
                if item.offset >= 0:
                    parts.append(positions.id_line)
            parts.append(b"data: ")
            parts.append(item)
            parts.append(b"\n\n")
        body = b"".join(parts)
        built = self._chunks[start] = (_chunk(body), body, positions)
        return built

    def ping(self, conn: SSEConnection) -> None:
        conn.ping()

    async def shutdown(self, grace: float = 1.0) -> None:
        """End every stream (sessions already wrote their disconnect event),
        give the peers ``grace`` seconds to take the last bytes, then cut."""
        await self.close_all(lambda conn: conn.close(SHUTDOWN), grace)


class SSEConnection(FlowControlled):
    """One event stream: the session's ``Transport``.

    Tornado hands the socket over as soon as the request is checked; the
    session is made here, as for WebSocket, and connects. Refused, the
    client gets an HTTP error with a JSON body; connected, the response head
    goes out with what the session sent meanwhile (held in ``_early``, the
    session waiting for it as for a slow socket), then the subscriptions
    are made."""

    __slots__ = (
        "_chunked",
        "_closing",
        "_early",
        "_meta",
        "_registry",
        "_requests",
        "_session_gone",
        "_started",
        "_status",
        "_timer",
        "_token",
        "_transport",
        "path",
        "positions",
        "session",
    )
    kind = "sse"

    def __init__(
        self,
        registry: SSEConnections,
        positions: _Positions,
        *,
        chunked: bool,
        token: str | None,
        requests: list[tuple[str, StreamPosition | None]],
        path: str,
        meta: ConnectionMeta | None = None,
    ) -> None:
        self._registry = registry
        # The request as the proxy hooks see it (None without hooks).
        self._meta = meta
        self.positions = positions
        self._chunked = chunked
        self._token = token
        self._requests: list[tuple[str, StreamPosition | None]] | None = requests
        self.path = path
        self.session: Session | None = None
        self._transport: asyncio.Transport | None = None
        # What the session sends before the response head is out.
        self._early: list[bytes] | None = []
        super().__init__()
        self._closing: Disconnect | None = None
        self._session_gone = False
        self._timer: asyncio.TimerHandle | None = None
        self._started = time.monotonic()
        self._status = 200

    # ---- asyncio protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        transport.set_write_buffer_limits(high=0)
        try:
            meta, self._meta = self._meta, None  # the session keeps it
            self.session = self._registry.node.new_session(self, SSE, meta)
        except SquallError as exc:
            self._refuse(exc)
            return
        self._registry.node.spawn(self._open(self.session))

    async def _open(self, session: Session) -> None:
        token, self._token = self._token, None
        try:
            await session.open_stream(token)
        except SquallError as exc:
            self._session_closed()
            refusal = exc
            if self._closing is not None:
                # Closed meanwhile (the server is shutting down, say).
                refusal = errors.Unavailable(self._closing.reason)
            self._refuse(refusal)
            return
        except asyncio.CancelledError:
            self.abort()  # the node is closing
            raise
        if self._transport is None:
            return  # the client left meanwhile
        self._start()
        requests, self._requests = self._requests or [], None
        if not session.closed:
            await session.subscribe_stream(requests)

    def _start(self) -> None:
        """The response head, the retry event and what waited."""
        transport = self._transport
        assert transport is not None
        early, self._early = self._early or [], None
        head = HEAD_CHUNKED if self._chunked else HEAD_PLAIN
        date = b"Date: " + format_timestamp(time.time()).encode() + b"\r\n\r\n"
        transport.write(b"".join([head, date, self._frame(RETRY), *early]))
        self._registry.add(self)
        if not self.write_paused:
            self._end_drain()  # (else when the kernel takes the rest)
        if self._closing is not None:
            self._end(self._closing)

    def _refuse(self, exc: SquallError) -> None:
        """Answer the request with an HTTP error instead of a stream."""
        transport = self._transport
        self._early = None
        self._status = exc.http_status
        if transport is None:
            return
        body = orjson.dumps({"error": exc.to_json()})
        reason = HTTPStatus(exc.http_status).phrase
        transport.write(
            (
                f"HTTP/1.1 {exc.http_status} {reason}\r\nContent-Type: application/json\r\n"
                f"Cache-Control: no-store\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            + body
        )
        transport.close()
        self._timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, transport.abort)

    def data_received(self, data: bytes) -> None:
        pass  # an event stream is one-way: anything the client sends is ignored

    def eof_received(self) -> bool | None:
        return None  # the client went away: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._registry.discard(self)
        self._end_drain(ConnectionResetError("stream closed"))
        self._transport = None
        self._early = None
        self._session_closed()
        status = self._status
        access_log.log(
            logging.INFO if status < 400 else logging.WARNING,
            "%d GET %s %.1fms",
            status,
            self.path,
            1000.0 * (time.monotonic() - self._started),
        )

    # ---- the session's Transport ------------------------------------------

    def send(self, items: list[bytes]) -> Awaitable[None] | None:
        if self._closing is not None:
            raise ConnectionResetError("stream is closing")
        chunk, body, self.positions = self._registry.events(items, self.positions)
        data = chunk if self._chunked else body
        early = self._early
        if early is not None:
            early.append(data)  # before the head: written with it
        else:
            transport = self._transport
            if transport is None:
                raise ConnectionResetError("stream closed")
            transport.write(data)
            if not self.write_paused:
                return None
        return self.drained()

    def close(self, disconnect: Disconnect) -> None:
        """End the stream with a last ``disconnect`` event."""
        if self._closing is not None:
            return
        self._closing = disconnect
        if self._transport is not None and self._early is None:
            self._end(disconnect)

    def _end(self, disconnect: Disconnect) -> None:
        transport = self._transport
        assert transport is not None
        message = protocol.disconnect_push(disconnect.code, disconnect.reason, disconnect.reconnect)
        last = self._frame(b"data: " + message + b"\n\n")
        transport.write(last + b"0\r\n\r\n" if self._chunked else last)
        transport.close()  # once the buffer is out
        self._timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, transport.abort)

    def _frame(self, body: bytes) -> bytes:
        return _chunk(body) if self._chunked else body

    def ping(self) -> None:
        if self._closing is None and self._transport is not None and not self.write_paused:
            self._transport.write(self._frame(PING))

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _session_closed(self) -> None:
        if self._session_gone:
            return
        self._session_gone = True
        if self.session is not None:
            self.session.transport_closed()


class SSEHandler(JSONHandler):
    connections: SSEConnections

    def initialize(self, node: Node, connections: SSEConnections) -> None:  # type: ignore[override]
        self.node = node
        self.connections = connections

    async def get(self) -> None:
        origin = self.request.headers.get("Origin")
        if origin is not None and not origin_allowed(
            origin, self.request.headers.get("Host"), self.node.settings.server.allowed_origins
        ):
            self.write_squall_error(errors.PermissionDenied("origin not allowed"))
            return
        try:
            requests, positions = self._requests()
            token = self._token()
        except SquallError as exc:
            self.write_squall_error(exc)
            return
        node = self.node
        if node.draining or len(node.sessions) >= node.settings.limits.max_connections:
            node.metrics.connections_refused += 1
            reason = "server is shutting down" if node.draining else "connection limit reached"
            self.write_squall_error(errors.Unavailable(reason))
            return
        entries = tuple(sorted((ch, p.offset, p.epoch) for ch, p in positions.items()))
        stream = SSEConnection(
            self.connections,
            self.connections.intern(entries),
            chunked=self.request.version == "HTTP/1.1",
            token=token,
            requests=requests,
            path=sys.intern(self.request.path),
            meta=node.connection_meta("sse", self.request.remote_ip or "", self.request.headers),
        )
        # The socket leaves Tornado now, before anything is awaited (as for
        # WebSocket): the connection does the rest.
        detached = self.detach()
        # finish() would break the handler's reference cycle (through its
        # UI-module namespace); detach() does not, and the handler, its
        # request and Tornado's connection would wait for the cyclic garbage
        # collector, which runs rarely here (server.cli.tune_gc).
        self.ui = None  # type: ignore[assignment]
        await hand_over(detached, lambda _leftover: stream, after_reply=False)

    def _token(self) -> str | None:
        header = self.request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return self.get_query_argument("token", None)

    def _requests(
        self,
    ) -> tuple[list[tuple[str, StreamPosition | None]], dict[str, StreamPosition]]:
        channels = self.get_query_arguments("channel")
        limit = self.node.settings.limits.max_sse_channels
        if len(channels) > limit:
            raise errors.LimitExceeded(f"at most {limit} channels per SSE stream")
        if len(set(channels)) != len(channels):
            raise errors.BadRequest("a channel is named twice")
        last_id = self.request.headers.get("Last-Event-ID") or self.get_query_argument(
            "last_event_id", None
        )
        positions = decode_positions(last_id) if last_id else {}
        requests = [(ch, positions.get(ch)) for ch in channels]
        kept = {ch: p for ch, p in positions.items() if ch in channels}
        return requests, kept
