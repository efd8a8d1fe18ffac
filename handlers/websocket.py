"""WebSocket transport: ``/connection/websocket``. Frames go to the session;
the session's batches come back as one text frame each."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any
from urllib.parse import urlsplit

import tornado.iostream
import tornado.web
import tornado.websocket

from server.errors import Disconnect, SquallError
from server.node import Node
from server.session import Session


def origin_allowed(origin: str, host: str | None, allowed: list[str]) -> bool:
    """Same origin only when ``allowed`` is empty; ``*`` allows any."""
    if "*" in allowed:
        return True
    origin = origin.lower().rstrip("/")
    if any(origin == a.lower().rstrip("/") for a in allowed):
        return True
    return bool(host) and urlsplit(origin).netloc == (host or "").lower()


class _Transport:
    __slots__ = ("_handler",)
    kind = "websocket"

    def __init__(self, handler: WebSocketHandler) -> None:
        self._handler = handler

    def send(self, items: list[bytes]) -> Awaitable[None] | None:
        frame = items[0] if len(items) == 1 else b"\n".join(items)
        conn = self._handler.ws_connection
        if conn is None or conn.is_closing():
            raise tornado.websocket.WebSocketClosedError()
        # The text frame straight to the stream: write_message would wrap
        # every write in a new Task. The stream's future is already done when
        # the kernel took all the bytes, so a client that keeps up costs no
        # callback at all; one that does not is waited for (and bounded by
        # the session's send queue).
        try:
            written = conn._write_frame(True, 0x1, frame)  # type: ignore[attr-defined]
        except tornado.iostream.StreamClosedError:
            raise tornado.websocket.WebSocketClosedError() from None
        if written.done() and written.exception() is None:
            return None
        return written  # type: ignore[no-any-return]

    def close(self, disconnect: Disconnect) -> None:
        self._handler.close(disconnect.code, disconnect.reason)


class WebSocketHandler(tornado.websocket.WebSocketHandler):
    node: Node
    session: Session | None

    def initialize(self, node: Node) -> None:
        self.node = node
        self.session = None

    def check_origin(self, origin: str) -> bool:
        return origin_allowed(
            origin, self.request.headers.get("Host"), self.node.settings.server.allowed_origins
        )

    def get_compression_options(self) -> dict[str, Any] | None:
        return None

    async def get(self, *args: Any, **kwargs: Any) -> None:
        if (
            self.node.draining
            or len(self.node.sessions) >= self.node.settings.limits.max_connections
        ):
            self.node.metrics.connections_refused += 1
            self.set_status(503)
            self.set_header("Content-Type", "application/json")
            reason = "shutting down" if self.node.draining else "connection limit reached"
            self.finish({"error": {"code": 114, "message": f"service unavailable: {reason}"}})
            return
        await super().get(*args, **kwargs)

    def open(self, *args: str, **kwargs: str) -> None:
        try:
            self.session = self.node.new_session(_Transport(self))
        except SquallError as exc:
            self.close(1013, exc.message)

    def on_message(self, message: str | bytes) -> Awaitable[None] | None:
        if self.session is None:
            return None
        # Tornado waits for this before reading the next frame: commands of
        # one connection are handled in order, and a flood waits its turn.
        return self.session.handle_frame(message)

    def on_close(self) -> None:
        if self.session is not None:
            self.session.transport_closed()
