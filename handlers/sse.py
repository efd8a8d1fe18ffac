"""Server-Sent Events transport: ``GET /connection/sse?channel=a&channel=b``.

For clients that cannot hold a WebSocket. The token comes in the
``Authorization: Bearer`` header or, for ``EventSource`` (which cannot set
headers), the ``token`` query argument; the access log never shows query
strings. Every ``pub`` and ``subscribe`` event carries an ``id`` that encodes
the position of every channel of the stream, so the browser's automatic
reconnect (``Last-Event-ID``) resumes each channel exactly where it stopped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from urllib.parse import parse_qsl, urlencode

import orjson
import tornado.iostream
import tornado.web

from handlers.base import JSONHandler
from handlers.websocket import origin_allowed
from server import errors, protocol
from server.errors import Disconnect, SquallError
from server.models import StreamPosition
from server.session import Session


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


class _Transport:
    __slots__ = ("_handler", "positions")
    kind = "sse"

    def __init__(self, handler: SSEHandler, positions: dict[str, StreamPosition]) -> None:
        self._handler = handler
        self.positions = positions

    def send(self, items: list[bytes]) -> Awaitable[None] | None:
        # The first message means the connection was accepted: the stream's
        # headers must go out before it.
        self._handler.start_stream()
        chunks = []
        for item in items:
            msg = orjson.loads(item)
            kind = msg.get("push")
            event_id = None
            if kind == "pub":
                pub = msg["pub"]
                self.positions[msg["channel"]] = StreamPosition(pub["offset"], pub["epoch"])
                event_id = encode_positions(self.positions)
            elif kind == "subscribe":
                self.positions[msg["channel"]] = StreamPosition(msg["offset"], msg["epoch"])
                event_id = encode_positions(self.positions)
            elif kind == "unsubscribe":
                self.positions.pop(msg["channel"], None)
            if event_id is not None:
                chunks.append(b"id: " + event_id.encode() + b"\n")
            chunks.append(b"data: " + item + b"\n\n")
        self._handler.write(b"".join(chunks))
        return self._handler.flush()

    def close(self, disconnect: Disconnect) -> None:
        self._handler.end_stream(disconnect)


class SSEHandler(JSONHandler):
    session: Session | None = None
    _closed: asyncio.Event
    _streaming = False

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
            session = self.node.new_session(_Transport(self, positions))
        except SquallError as exc:
            self.write_squall_error(exc)
            return
        self._closed = asyncio.Event()
        self.session = session
        try:
            await session.open_stream(token, requests)
        except SquallError as exc:
            session.transport_closed()
            self.session = None
            self.write_squall_error(exc)
            return
        self.start_stream()
        await self._keepalive()

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

    def start_stream(self) -> None:
        if self._streaming:
            return
        self._streaming = True
        self.set_status(200)
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        # The first chunk tells the browser how long to wait before it
        # reconnects on its own.
        self.write(b"retry: 1000\n\n")
        self.flush()

    async def _keepalive(self) -> None:
        interval = self.node.settings.limits.ping_interval
        while not self._closed.is_set():
            try:
                await asyncio.wait_for(self._closed.wait(), timeout=interval)
            except TimeoutError:
                if self.session is None or self._closed.is_set():
                    break
                try:
                    self.write(b": ping\n\n")
                    await self.flush()
                except tornado.iostream.StreamClosedError:
                    break
        self._finish_quietly()

    def end_stream(self, disconnect: Disconnect) -> None:
        """Close the stream with a final ``disconnect`` event."""
        if self._closed.is_set():
            return
        message = protocol.disconnect_push(disconnect.code, disconnect.reason, disconnect.reconnect)
        try:
            self.write(b"data: " + message + b"\n\n")
        except RuntimeError:
            pass
        self._closed.set()

    def _finish_quietly(self) -> None:
        if not self._finished:
            try:
                self.finish()
            except tornado.iostream.StreamClosedError:
                pass
        if self.session is not None:
            self.session.transport_closed()

    def on_connection_close(self) -> None:
        if self.session is not None:
            self.session.transport_closed()
        if hasattr(self, "_closed"):
            self._closed.set()
