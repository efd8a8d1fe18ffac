"""The server API over one WebSocket: ``GET /api/connection/websocket``.

A back end opens one connection with its API key and sends API commands on
it without waiting for replies, one JSON object a line, several lines a
frame: ``{"id": 1, "method": "publish", "params": {...}}``. Each gets one
reply with its ``id``, in command order. ``docs/api.md`` is the contract.

As for client connections (``handlers/websocket.py``), Tornado answers the
upgrade and the socket then moves to a plain asyncio protocol with
``server/wsframe.py`` framing. Commands run through the batch's
``CommandPipeline``: publishes pipelined on Redis, a channel's offsets in
command order.

Backpressure, both ways, without unbounded memory:

- in: frames wait in a small inbox; past ``MAX_INBOX`` frames (or twice the
  frame limit in bytes) the socket is not read until the inbox drains, so a
  flooding back end waits in its own socket buffers;
- out: replies go straight to the transport; once more than
  ``limits.send_queue_bytes`` of them are unread, no further command starts
  (and soon the socket is not read either). A back end that still reads
  nothing for ``STALL_TIMEOUT`` seconds is disconnected with 3008 ``slow``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import orjson
import tornado.iostream
import tornado.web

from handlers.api import ApiMethods, CommandPipeline, Reply, presented_api_key
from handlers.detached import FlowControlled, Inbox, Registry, UpgradeHandler, hand_over
from server import wsframe
from server.codec import InvalidCommand, ProtocolViolation
from server.errors import BAD_REQUEST, SHUTDOWN, SLOW
from server.node import Node
from server.protocol import parse_frame

log = logging.getLogger("squall.api_stream")

# How long replies may go unread (the transport's buffer over the limit)
# before the connection is closed with 3008.
STALL_TIMEOUT = 30.0
# How long a closing connection waits for the peer's close frame.
CLOSE_TIMEOUT = 5.0
# Replies are joined into one frame up to about this many bytes.
_FRAME_TARGET = 64 * 1024


class ApiStreams(Registry["ApiStreamConnection"]):
    """This process's API stream connections (no pings: back ends)."""

    def __init__(self, node: Node) -> None:
        super().__init__()
        self.node = node
        self.api = ApiMethods(node)
        limits = node.settings.limits
        self.max_message = limits.max_frame_bytes
        self.max_commands = limits.max_batch_commands
        self.max_unread = limits.send_queue_bytes
        self.stall_timeout = STALL_TIMEOUT
        node.add_closer(self.shutdown)

    async def adopt(self, stream: tornado.iostream.IOStream) -> None:
        """Take the socket of an upgraded request from Tornado."""
        await hand_over(
            stream, lambda leftover: ApiStreamConnection(self, leftover), after_reply=True
        )

    async def shutdown(self, grace: float = 1.0) -> None:
        """Close every connection (3001 shutdown), wait up to ``grace`` for
        the peers, then cut; then wait for the commands still running."""
        conns = list(self.conns)
        await self.close_all(lambda conn: conn.close(SHUTDOWN.code, SHUTDOWN.reason), grace)
        pending = [task for conn in conns for task in conn.tasks()]
        if pending:
            await asyncio.wait(pending, timeout=grace)


class ApiStreamConnection(FlowControlled):
    """One upgraded API connection."""

    def __init__(self, registry: ApiStreams, leftover: bytes) -> None:
        self._registry = registry
        self._metrics = registry.node.metrics
        self._leftover = leftover
        self._parser = wsframe.FrameParser(registry.max_message)
        self._transport: asyncio.Transport | None = None
        self._inbox = Inbox(registry.max_message)
        self._worker: asyncio.Task[None] | None = None
        super().__init__()
        self._stall: asyncio.TimerHandle | None = None
        self._closing = False
        self._close_timer: asyncio.TimerHandle | None = None
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flush_handle: asyncio.Handle | None = None
        self._pipeline = CommandPipeline(
            registry.api,
            self._reply,
            name="API stream",
            nested="'batch' cannot be used on an API stream: send the commands themselves",
        )

    def tasks(self) -> list[asyncio.Future[Any]]:
        out: list[asyncio.Future[Any]] = self._pipeline.tasks()
        if self._worker is not None:
            out.append(self._worker)
        return out

    @property
    def reading_paused(self) -> bool:
        return self._inbox.paused

    @property
    def buffered(self) -> int:
        """Bytes this connection holds: commands read but not started, an
        incomplete frame, replies not yet taken by the peer."""
        out = self._transport.get_write_buffer_size() if self._transport is not None else 0
        return self._inbox.nbytes + self._parser.buffered + self._out_bytes + out

    # ---- asyncio protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's quack alike
        self._transport = transport
        transport.set_write_buffer_limits(high=self._registry.max_unread)
        self._registry.add(self)
        leftover, self._leftover = self._leftover, b""
        if leftover:
            self.data_received(leftover)

    def data_received(self, data: bytes) -> None:
        try:
            items = self._parser.feed(data)
        except wsframe.FrameError as exc:
            log.debug("bad frame on an API stream: %s", exc)
            self.close(exc.code, exc.reason)
            return
        for opcode, payload in items:
            if opcode <= wsframe.OP_BINARY:
                if not self._closing:
                    self._on_message(payload)
            elif opcode == wsframe.OP_PING:
                if not self._closing and self._transport is not None:
                    self._transport.write(wsframe.build(wsframe.OP_PONG, payload))
            elif opcode == wsframe.OP_CLOSE:
                self._on_close_frame(payload)
                return

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall is None and not self._closing:
            loop = asyncio.get_running_loop()
            self._stall = loop.call_later(self._registry.stall_timeout, self._stalled)

    def resume_writing(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        super().resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        for timer in (self._stall, self._close_timer, self._flush_handle):
            if timer is not None:
                timer.cancel()
        self._stall = self._close_timer = self._flush_handle = None
        self._registry.discard(self)
        self._inbox.clear()
        self._out = []
        self._out_bytes = 0
        self._end_drain()  # the worker sees ``_closing`` and stops
        self._transport = None

    # ---- closing ----------------------------------------------------------

    def close(self, code: int, reason: str) -> None:
        """Send the replies ready so far and a close frame, then wait (a
        bounded time) for the peer's."""
        if self._closing:
            return
        self._flush_out()
        self._closing = True
        self._inbox.clear()  # commands not started are not run
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(wsframe.close_frame(code, reason))
        if self._inbox.paused:
            # Read on (dropping data) so the peer's close frame is seen.
            self._inbox.resume(transport)
        loop = asyncio.get_running_loop()
        self._close_timer = loop.call_later(CLOSE_TIMEOUT, transport.abort)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _on_close_frame(self, payload: bytes) -> None:
        code: int | None
        try:
            code, _ = wsframe.parse_close(payload)
        except wsframe.FrameError as exc:
            code = exc.code
        if not self._closing:
            # The peer closes: answer with its code, as the RFC asks.
            self.close(wsframe.CLOSE_NORMAL if code is None else code, "")
        if self._transport is not None:
            self._transport.close()

    def _stalled(self) -> None:
        self._stall = None
        log.info(
            "API stream closed: its replies went unread for %.0f s", self._registry.stall_timeout
        )
        self._metrics.count_disconnect(SLOW)
        self.close(SLOW.code, f"{SLOW.reason}: replies not read")

    # ---- commands in ------------------------------------------------------

    def _on_message(self, payload: bytes) -> None:
        self._inbox.put(payload, self._transport)
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._work())

    async def _work(self) -> None:
        """Run the inbox's commands in order; ends when the inbox is empty,
        so an idle connection holds no task."""
        inbox = self._inbox
        pipeline = self._pipeline
        try:
            while inbox and not self._closing:
                payload = inbox.take(self._transport)
                try:
                    commands = parse_frame(payload, max_commands=self._registry.max_commands)
                except ProtocolViolation as exc:
                    # The commands before it are answered first.
                    await pipeline.drain()
                    self._metrics.count_error(BAD_REQUEST.code)
                    self.close(BAD_REQUEST.code, f"{BAD_REQUEST.reason}: {exc}")
                    return
                for command in commands:
                    if self.write_paused:
                        await self._writable()
                    if self._closing:
                        return
                    if isinstance(command, InvalidCommand):
                        self._metrics.count_error(command.error.code)
                        pipeline.answer(command.id, {"error": command.error.to_json()})
                    else:
                        await pipeline.submit(command.id, command.method, command.params)
        finally:
            self._worker = None

    async def _writable(self) -> None:
        """Until the peer reads its replies (or the connection ends: the
        stall timer closes it)."""
        await self.drained()

    # ---- replies out ------------------------------------------------------

    def _reply(self, cmd_id: Any, reply: Reply) -> None:
        if self._closing or self._transport is None:
            return
        line = orjson.dumps({"id": cmd_id, **reply})
        self._out.append(line)
        self._out_bytes += len(line)
        if self._out_bytes >= _FRAME_TARGET:
            self._flush_out()
        elif self._flush_handle is None:
            # Replies made in the same turn of the loop share a frame.
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush_out)

    def _flush_out(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._out or self._transport is None or self._closing:
            return
        payload = b"\n".join(self._out)
        self._out = []
        self._out_bytes = 0
        self._transport.write(wsframe.build(wsframe.OP_TEXT, payload))


class ApiStreamHandler(UpgradeHandler):
    """The upgrade: the API key, then the checks of RFC 6455, section 4.2.
    No Origin check: a browser cannot send an ``Authorization`` header on a
    WebSocket, so the key already keeps pages out."""

    node: Node
    streams: ApiStreams

    def initialize(self, node: Node, streams: ApiStreams) -> None:
        self.node = node
        self.streams = streams

    async def get(self) -> None:
        if not self.node.auth.check_api_key(presented_api_key(self.request)):
            self.refuse(401, 101, "missing or wrong API key")
            return
        try:
            accept = self.accept_key()
        except wsframe.HandshakeError as exc:
            self.refuse(exc.status, 107, exc.reason)
            return
        if self.node.draining:
            self.refuse(503, 114, "service unavailable: shutting down")
            return
        self.switch(accept)
        await self.streams.adopt(self.detach())
