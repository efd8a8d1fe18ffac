"""Keep-alive API connections off Tornado: the cheap path for back ends that
send many ``POST /api/<method>`` requests over one connection.

Tornado answers a connection's first request as usual up to the handler;
``ApiHandler.post`` then hands the socket here (``KeepAliveApi.adopt``),
and this module reads, answers and pipelines that connection's next API
requests itself: one ``recv`` may carry many requests, their replies go
out in request order, several in one ``send``. A request costs a few
microseconds of parsing here against Tornado's ~120 µs HTTP/1.1 path.

Only the plain case is handled here: ``POST /api/<method>`` (not
``batch``) over HTTP/1.1 with a ``Content-Length`` within the body limit.
Anything else on the connection (a GET, a batch, chunked bodies,
``Expect``, ``Connection: close``, malformed HTTP) goes back to Tornado
with the bytes read so far, after every earlier reply is out, so Tornado
answers it exactly as it would have; it may hand the socket back here
again. Replies are the same bytes of JSON with the same status as
Tornado's, and the access log gets the same line.

Flow control: at most ``MAX_INBOX`` requests are read ahead of the work;
while replies wait for the peer to read them, or the inbox is full, the
socket is not read. A connection idle for the HTTP server's
``idle_connection_timeout`` is closed.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import http
import logging
import re
import socket
import time
from typing import Any

import orjson
import tornado.httpserver
import tornado.iostream
import tornado.web

from handlers.detached import MAX_INBOX
from server import errors
from server.node import Node

log = logging.getLogger("squall.api")
access_log = logging.getLogger("squall.access")

# A request's line and headers past this many bytes go to Tornado, which
# answers them as it answers any oversized head.
MAX_HEAD = 16 * 1024
_RECV = 256 * 1024
_METHOD = re.compile(rb"[a-z_]+")
_IDLE_DEFAULT = 3600.0
_STATUS_CODES: dict[int, int] = {}


def _collect(cls: type[errors.SquallError]) -> None:
    for sub in cls.__subclasses__():
        _STATUS_CODES.setdefault(sub.code, sub.http_status)
        _collect(sub)


_collect(errors.SquallError)


def http_status(reply: dict[str, Any]) -> int:
    """The HTTP status of an API reply, as ``write_squall_error`` gives it."""
    error = reply.get("error")
    if error is None:
        return 200
    return _STATUS_CODES.get(error.get("code", 100), 500)


class _Head:
    """The HTTP date and status lines, made once a second and once a status."""

    def __init__(self) -> None:
        self._second = -1
        self._date = b""
        self._lines: dict[int, bytes] = {}

    def __call__(self, status: int, length: int) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._date = email.utils.formatdate(now, usegmt=True).encode()
        line = self._lines.get(status)
        if line is None:
            try:
                phrase = http.HTTPStatus(status).phrase
            except ValueError:
                phrase = ""
            line = self._lines[status] = f"HTTP/1.1 {status} {phrase}\r\n".encode()
        return b"".join(
            (
                line,
                b"Content-Type: application/json\r\nCache-Control: no-store\r\nDate: ",
                self._date,
                b"\r\nContent-Length: ",
                str(length).encode(),
                b"\r\n\r\n",
            )
        )


_head = _Head()


class _Request:
    __slots__ = ("body", "key", "method", "path", "start")

    def __init__(self, method: str, key: str | None, body: bytes, path: str, start: float) -> None:
        self.method = method
        self.key = key
        self.body = body
        self.path = path
        self.start = start


class KeepAliveApi:
    """This process's keep-alive API connections, and the check that a
    request's connection may come here."""

    def __init__(self, node: Node, max_body: int) -> None:
        # Import here: handlers.api imports this module.
        from handlers.api import ApiMethods

        self.node = node
        self.api = ApiMethods(node)
        self.max_body = max_body
        self.conns: dict[KeepAliveConnection, None] = {}
        self.server: tornado.httpserver.HTTPServer | None = None
        self.idle_timeout = _IDLE_DEFAULT
        self._sweep: asyncio.TimerHandle | None = None
        self._empty = asyncio.Event()
        node.add_closer(self.shutdown)

    def serve_for(self, server: tornado.httpserver.HTTPServer) -> None:
        """Take keep-alive connections from ``server`` (and give them back
        to it); without this the API stays on Tornado."""
        self.server = server
        # Tornado keeps its idle_connection_timeout as the header timeout.
        idle = server.conn_params.header_timeout
        self.idle_timeout = float(idle) if idle else _IDLE_DEFAULT

    def adopt(self, handler: tornado.web.RequestHandler, method: str, key: str | None) -> bool:
        """Take ``handler``'s connection, with its request (answered here),
        when it may stay open; False: Tornado answers as usual."""
        request = handler.request
        conn = request.connection
        if (
            self.server is None
            or self.node.draining
            or request.version != "HTTP/1.1"
            or "close" in request.headers.get("Connection", "").lower()
            or isinstance(getattr(conn, "stream", None), tornado.iostream.SSLIOStream)
        ):
            return False
        address = getattr(getattr(conn, "context", None), "address", None)
        stream = handler.detach()
        sock = stream.socket
        if stream.closed() or sock is None:
            return True  # the peer is gone: nobody to answer
        leftover = bytes(stream._read_buffer)
        stream.io_loop.remove_handler(sock)
        raw = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())
        raw.setblocking(False)
        first = _Request(method, key, request.body, request.path, request._start_time)
        KeepAliveConnection(self, raw, address, leftover, first)
        return True

    def add(self, conn: KeepAliveConnection) -> None:
        self.conns[conn] = None
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(
                self.idle_timeout / 2, self._sweep_idle
            )

    def discard(self, conn: KeepAliveConnection) -> None:
        self.conns.pop(conn, None)
        if not self.conns:
            self._empty.set()
            if self._sweep is not None:
                self._sweep.cancel()
                self._sweep = None

    def _sweep_idle(self) -> None:
        """Close the connections that saw no request for one to two halves
        of the idle timeout (counting requests costs nothing per request)."""
        self._sweep = None
        for conn in list(self.conns):
            if conn.requests == conn.swept and conn.idle:
                conn.close()
            conn.swept = conn.requests
        if self.conns:
            self._sweep = asyncio.get_running_loop().call_later(
                self.idle_timeout / 2, self._sweep_idle
            )

    async def shutdown(self, grace: float = 1.0) -> None:
        """Close idle connections now, the others once their replies are
        out (up to ``grace``), then cut what is left."""
        for conn in list(self.conns):
            conn.close_when_idle()
        if self.conns:
            self._empty.clear()
            try:
                await asyncio.wait_for(self._empty.wait(), grace)
            except TimeoutError:
                for conn in list(self.conns):
                    conn.close()


class KeepAliveConnection:
    """One back end's keep-alive connection, read with ``add_reader``: the
    socket stays ours, so it can go back to Tornado."""

    __slots__ = (
        "_address",
        "_buf",
        "_closed",
        "_closing",
        "_eof",
        "_fd",
        "_flush_handle",
        "_handback",
        "_inbox",
        "_loop",
        "_out",
        "_pending",
        "_pipeline",
        "_reading",
        "_registry",
        "_sock",
        "_worker",
        "requests",
        "swept",
    )

    def __init__(
        self,
        registry: KeepAliveApi,
        sock: socket.socket,
        address: Any,
        leftover: bytes,
        first: _Request,
    ) -> None:
        from handlers.api import CommandPipeline

        self._registry = registry
        self._sock = sock
        self._fd = sock.fileno()
        self._address = address
        self._loop = asyncio.get_running_loop()
        self._buf = bytearray(leftover)
        self._inbox: collections.deque[_Request] = collections.deque()
        self._out: list[bytes] = []
        self._pending = b""  # what the kernel did not take yet
        self._flush_handle: asyncio.Handle | None = None
        self._worker: asyncio.Task[None] | None = None
        self._reading = False
        self._handback = False  # a request for Tornado waits in _buf
        self._eof = False
        self._closing = False
        self._closed = False
        self.requests = 0
        self.swept = -1
        self._pipeline = CommandPipeline(
            registry.api,
            self._reply,
            name="HTTP API",
            nested="'batch' is its own request: POST /api/batch",
        )
        registry.add(self)
        self._enqueue(first)
        self._parse()
        self._update_reading()

    @property
    def buffered(self) -> int:
        """Bytes held for this connection: requests read and not yet run,
        answers the peer has not taken."""
        inbox = sum(len(r.body) for r in self._inbox)
        return len(self._buf) + inbox + len(self._pending) + sum(len(b) for b in self._out)

    @property
    def idle(self) -> bool:
        return not (self._inbox or self._pipeline.in_flight or self._worker or self._out)

    # ---- reading ------------------------------------------------------------

    def _update_reading(self) -> None:
        want = not (
            self._closed
            or self._closing
            or self._eof
            or self._handback
            or self._pending
            or len(self._inbox) >= MAX_INBOX
        )
        if want and not self._reading:
            self._loop.add_reader(self._fd, self._readable)
            self._reading = True
        elif not want and self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def _readable(self) -> None:
        try:
            data = self._sock.recv(_RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not data:
            # The peer is done sending: answer what it sent, then close.
            self._eof = True
            self._update_reading()
            if self.idle:
                self.close()
            return
        self._buf += data
        self._parse()
        self._update_reading()

    def _parse(self) -> None:
        """Move the complete requests of ``_buf`` to the inbox; stop at one
        for Tornado (``_handback``) or when the inbox is full."""
        buf = self._buf
        registry = self._registry
        while buf and not self._handback and len(self._inbox) < MAX_INBOX:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self._hand_back_soon()
                break
            request = self._head(bytes(buf[:end]))
            if request is None:
                self._hand_back_soon()
                break
            method, key, length, path = request
            if length > registry.max_body:
                self._hand_back_soon()
                break
            total = end + 4 + length
            if len(buf) < total:
                break  # the body is on its way
            body = bytes(buf[end + 4 : total])
            del buf[:total]
            self._enqueue(_Request(method, key, body, path, time.time()))

    @staticmethod
    def _head(head: bytes) -> tuple[str, str | None, int, str] | None:
        """(API method, API key, body length, path) of a request this
        connection answers itself, or None: Tornado's."""
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or parts[0] != b"POST" or parts[2] != b"HTTP/1.1":
            return None
        path = parts[1].partition(b"?")[0]
        if not path.startswith(b"/api/"):
            return None
        name = path[5:]
        if name == b"batch" or _METHOD.fullmatch(name) is None:
            return None
        length = 0
        seen_length = False
        key: str | None = None
        for line in lines[1:]:
            field, colon, value = line.partition(b":")
            if not colon or not field or field[-1:] in b" \t" or line[:1] in b" \t":
                return None  # malformed, or an obsolete folded header
            field = field.lower()
            if field == b"content-length":
                value = value.strip()
                if seen_length or not value.isdigit():
                    return None
                seen_length = True
                length = int(value)
            elif field == b"authorization":
                scheme, _, token = value.strip().partition(b" ")
                if scheme.lower() == b"apikey":
                    key = token.strip().decode("latin-1")
            elif field in (b"transfer-encoding", b"expect", b"upgrade"):
                return None
            elif field == b"connection" and b"close" in value.lower():
                return None
        return name.decode(), key, length, path.decode("latin-1")

    # ---- work ---------------------------------------------------------------

    def _enqueue(self, request: _Request) -> None:
        self.requests += 1
        self._inbox.append(request)
        if self._worker is None:
            self._worker = self._loop.create_task(self._work())

    async def _work(self) -> None:
        """Run the inbox's requests in order; ends when it is empty, so an
        idle connection holds no task."""
        inbox = self._inbox
        pipeline = self._pipeline
        node = self._registry.node
        methods = self._registry.api.table()
        try:
            while inbox and not self._closed:
                request = inbox.popleft()
                if len(inbox) < MAX_INBOX // 2 and not self._reading:
                    # Room again: requests read ahead, then the socket.
                    self._parse()
                    self._update_reading()
                if not node.auth.check_api_key(request.key):
                    error: errors.SquallError = errors.Unauthorized("missing or wrong API key")
                elif request.method not in methods:
                    error = errors.MethodNotFound(f"unknown API method {request.method!r}")
                else:
                    try:
                        params = orjson.loads(request.body or b"{}")
                    except orjson.JSONDecodeError:
                        node.metrics.count_api(request.method)
                        error = errors.BadRequest("body is not valid JSON")
                    else:
                        if isinstance(params, dict):
                            await pipeline.submit(request, request.method, params)
                            continue
                        node.metrics.count_api(request.method)
                        error = errors.BadRequest("body must be a JSON object")
                pipeline.answer(request, {"error": error.to_json()})
        finally:
            self._worker = None
        self._after_work()

    def _after_work(self) -> None:
        if self._closed or not self.idle:
            return
        if self._handback:
            self._flush()
            if not self._pending:
                self._hand_back()
        elif self._eof or self._closing:
            self._flush()
            if not self._pending:
                self.close()

    # ---- replies ------------------------------------------------------------

    def _reply(self, request: _Request, reply: dict[str, Any]) -> None:
        if self._closed:
            return
        status = http_status(reply)
        body = orjson.dumps(reply)
        self._out.append(_head(status, len(body)))
        self._out.append(body)
        if self._flush_handle is None:
            # Replies made in the same turn of the loop share a send.
            self._flush_handle = self._loop.call_soon(self._flush_soon)
        level = (
            logging.DEBUG if status < 400 else (logging.WARNING if status < 500 else logging.ERROR)
        )
        if access_log.isEnabledFor(level):
            # The line Tornado's access log (server.app.log_request) writes,
            # at its levels (successful API calls at debug).
            access_log.log(
                level,
                "%d POST %s %.1fms",
                status,
                request.path,
                1000.0 * (time.time() - request.start),
            )

    def _flush_soon(self) -> None:
        self._flush_handle = None
        self._flush()
        if self._worker is None:
            self._after_work()

    def _flush(self) -> None:
        if self._closed:
            return
        if self._out:
            self._pending += b"".join(self._out)
            self._out = []
        if not self._pending:
            return
        try:
            sent = self._sock.send(self._pending)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close()
            return
        self._pending = self._pending[sent:]
        if self._pending:
            # The peer reads slowly: stop reading its requests until it
            # took its replies.
            self._update_reading()
            self._loop.add_writer(self._fd, self._writable)

    def _writable(self) -> None:
        self._loop.remove_writer(self._fd)
        self._flush()
        if not self._pending and not self._closed:
            self._update_reading()
            self._parse()
            if self._worker is None:
                self._after_work()

    # ---- the end ------------------------------------------------------------

    def _hand_back_soon(self) -> None:
        self._handback = True
        if self._worker is None and not self._pipeline.in_flight:
            self._loop.call_soon(self._after_work)

    def _hand_back(self) -> None:
        """Give the socket and the bytes not yet answered to Tornado."""
        server = self._registry.server
        self._detach()
        if server is None or self._address is None:
            self._sock.close()
            return
        stream = tornado.iostream.IOStream(self._sock)
        if self._buf:
            stream._read_buffer += self._buf
            stream._read_buffer_size += len(self._buf)
        server.handle_stream(stream, self._address)

    def close_when_idle(self) -> None:
        self._closing = True
        self._update_reading()
        self._inbox.clear()
        if self.idle:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._detach()
        self._sock.close()

    def _detach(self) -> None:
        """Stop watching the socket; it is closed or Tornado's now."""
        self._closed = True
        self._inbox.clear()
        self._out = []
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False
        if self._pending:
            self._loop.remove_writer(self._fd)
            self._pending = b""
        self._registry.discard(self)
