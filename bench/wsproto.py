"""A minimal, fast WebSocket client for the load generator (asyncio
Protocol on uvloop): enough to subscribe and count what arrives, cheaply, so
the generator is not the bottleneck."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import struct
import time
from collections.abc import Callable

# A Squall publication's offset (not a subscribe reply's, which also has one).
OFFSET = re.compile(rb'"pub":\{"offset":(\d+)')
SEQ = re.compile(rb'"n":(\d+)')
SENT = re.compile(rb'"t":([0-9.]+)')


async def until(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``condition`` (counters that protocol callbacks update) until it
    holds or ``timeout`` seconds pass; whether it held."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)
    return True


def frame(text: bytes, opcode: int = 0x1) -> bytes:
    """A masked client frame (text unless ``opcode`` says otherwise)."""
    mask = os.urandom(4)
    n = len(text)
    first = 0x80 | opcode
    if n < 126:
        head = bytes([first, 0x80 | n])
    elif n < 65536:
        head = bytes([first, 0x80 | 126]) + struct.pack("!H", n)
    else:
        head = bytes([first, 0x80 | 127]) + struct.pack("!Q", n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(text))
    return head + mask + masked


class Subscriber(asyncio.Protocol):
    """Counts messages; checks sequence numbers for losses and duplicates;
    records latency when asked."""

    def __init__(
        self,
        path: str,
        host: str,
        hello: list[bytes],
        seq: re.Pattern[bytes],
        latencies: list[float] | None,
        ready: Callable[[], None],
        stepwise: bool = False,
        protocol: str = "",
    ) -> None:
        self.path, self.host, self.hello, self.seq = path, host, list(hello), seq
        # A WebSocket subprotocol to ask for (Sec-WebSocket-Protocol), if any.
        self.protocol = protocol
        # Stepwise (socket.io): the first hello message waits for the
        # server's first frame (the open packet), the others for its next
        # one (the namespace connect reply).
        self.stepwise = stepwise
        self.latencies = latencies
        self.ready = ready
        self.buf = b""
        self.handshaken = False
        self.count = 0  # publications (lines with a sequence number)
        self.frames = 0  # text frames that carried at least one publication
        self.warm = 0  # warm-up messages seen
        self.texts = 0  # text frames of any kind
        self.last = 0
        self.lost = 0
        self.dup = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16)).decode()
        protocol = f"Sec-WebSocket-Protocol: {self.protocol}\r\n" if self.protocol else ""
        transport.write(
            (
                f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\n{protocol}\r\n"
            ).encode()
        )

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.handshaken:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.buf = self.buf[end + 4 :]
            self.handshaken = True
            assert self.transport is not None
            if not self.stepwise:
                for message in self.hello:
                    self.transport.write(frame(message, self.hello_opcode))
                self.hello = []
                self.ready()
        buf = self.buf
        pos = 0
        while len(buf) - pos >= 2:
            b1 = buf[pos + 1] & 0x7F
            head = 2
            if b1 == 126:
                if len(buf) - pos < 4:
                    break
                b1 = struct.unpack_from("!H", buf, pos + 2)[0]
                head = 4
            elif b1 == 127:
                if len(buf) - pos < 10:
                    break
                b1 = struct.unpack_from("!Q", buf, pos + 2)[0]
                head = 10
            if len(buf) - pos < head + b1:
                break
            opcode = buf[pos] & 0x0F
            if opcode == 0x1 and self.stepwise and buf[pos + head : pos + head + b1] == b"2":
                # An engine.io ping (socket.io): answer it as its client
                # does, or the server drops the connection after 45 s.
                assert self.transport is not None
                self.transport.write(frame(b"3"))
            elif opcode == 0x1:
                self.texts += 1
                if self.hello:
                    # The first hello message answers the first frame; the
                    # rest (socket.io: the subscriptions) go with the next.
                    assert self.transport is not None
                    first = self.texts == 1 and len(self.hello) > 1
                    send, self.hello = (
                        (self.hello[:1], self.hello[1:]) if first else (self.hello, [])
                    )
                    self.transport.write(b"".join(frame(m) for m in send))
                    if not self.hello:
                        self.ready()
                self.on_text(buf[pos + head : pos + head + b1])
            elif opcode == 0x2:
                self.on_binary(buf[pos + head : pos + head + b1])
            elif opcode == 0x9 and self.transport is not None:
                # Answer pings, as a browser does: a run longer than the
                # server's ping interval must not be dropped for silence.
                self.transport.write(frame(buf[pos + head : pos + head + b1], 0xA))
            pos += head + b1
        self.buf = buf[pos:]

    # The opcode of the hello messages (binary for a binary protocol).
    hello_opcode = 0x1
    # Where a publication's send time is (Pusher: inside a JSON string).
    sent = SENT

    def on_text(self, payload: bytes) -> None:
        counted = self.count
        for line in payload.split(b"\n"):
            m = self.seq.search(line)
            if m is None:
                if b'"w":1' in line:
                    self.warm += 1
                continue  # a reply, not a publication
            self.seen(int(m.group(1)), line)
        if self.count > counted:
            self.frames += 1

    def on_binary(self, payload: bytes) -> None:
        """A binary frame: none of the text protocols send one."""

    def seen(self, n: int, line: bytes) -> None:
        """Publication number ``n`` arrived (``line`` holds its send time)."""
        self.count += 1
        if n <= self.last:
            self.dup += 1
            return
        if n > self.last + 1:
            self.lost += n - self.last - 1
        self.last = n
        if self.latencies is not None:
            t = self.sent.search(line)
            if t is not None:
                self.latencies.append(time.time() - float(t.group(1)))


class SSESubscriber(Subscriber):
    """An EventSource on a raw socket (Squall's ``/connection/sse``): one GET
    whose query is the first hello message, then HTTP/1.1 chunks of events
    whose ``data:`` lines are Squall protocol messages. A chunk counts as a
    frame; the stream is ready once its ``subscribe`` event arrived."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.body = b""  # event-stream bytes not yet split into events
        self.subscribed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        query = self.hello[0].decode() if self.hello else ""
        transport.write(
            (
                f"GET {self.path}?{query} HTTP/1.1\r\nHost: {self.host}\r\n"
                "Accept: text/event-stream\r\n\r\n"
            ).encode()
        )

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        pos = 0
        if not self.handshaken:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            pos = end + 4
            self.handshaken = True
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(buf[pos:eol], 16)
            if len(buf) < eol + 2 + size + 2:
                break
            self.body += buf[eol + 2 : eol + 2 + size]
            pos = eol + 2 + size + 2
        self.buf = buf[pos:]
        end = self.body.rfind(b"\n\n")
        if end < 0:
            return
        events, self.body = self.body[: end + 2], self.body[end + 2 :]
        payload = b"\n".join(line[6:] for line in events.split(b"\n") if line.startswith(b"data: "))
        if not self.subscribed and b'"push":"subscribe"' in payload:
            self.subscribed = True
            self.ready()
        self.texts += 1
        self.on_text(payload)


# ---- The Centrifugo client protocol (v2), JSON and Protobuf ----------------
#
# A publication arrives as a push, ``{"push":{"channel":..,"pub":{"data":..,
# "offset":n}}}`` (several a frame, one per line), or in Protobuf as a
# length-prefixed Reply{push: Push{channel, pub: Publication{data, offset}}}.
# Both servers (Squall's Centrifugo endpoint and Centrifugo itself) number a
# channel's publications with offsets when history is on: those are checked.
# The server's ping is an empty reply (``{}``, or a zero length in
# Protobuf), answered with an empty command.

CF_OFFSET = re.compile(rb'"offset":(\d+)')


def uvarint(buf: bytes, pos: int) -> tuple[int, int]:
    """A Protobuf varint at ``pos``: its value and the position after it."""
    b = buf[pos]
    if b < 0x80:
        return b, pos + 1
    n = b & 0x7F
    shift = 7
    while True:
        pos += 1
        b = buf[pos]
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return n, pos + 1
        shift += 7


def delimited(message: bytes) -> bytes:
    """``message`` prefixed with its length (a varint), as Protobuf frames hold it."""
    n = len(message)
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out) + message


class CentrifugeJSON(Subscriber):
    """A subscriber speaking Centrifugo's JSON protocol: counts publication
    pushes by offset and answers the server's pings."""

    def on_text(self, payload: bytes) -> None:
        counted = self.count
        for line in payload.split(b"\n"):
            if line.startswith(b'{"push":'):
                if b'"pub":{' not in line:
                    continue  # join, leave, unsubscribe: not a publication
                # The offset follows the data (the generator's data has none).
                m = CF_OFFSET.search(line, max(0, line.rfind(b'"offset":')))
                self.seen(int(m.group(1)) if m else 0, line)
            elif line == b"{}" and self.transport is not None:
                self.transport.write(frame(b"{}"))  # pong
        if self.count > counted:
            self.frames += 1


class CentrifugeProtobuf(Subscriber):
    """The same in Protobuf (binary frames; the generated module, C-backed,
    parses a push)."""

    hello_opcode = 0x2

    def on_binary(self, payload: bytes) -> None:
        from server.codecs.centrifuge_pb2 import Reply  # type: ignore[attr-defined]

        counted = self.count
        pos, end = 0, len(payload)
        while pos < end:
            size, pos = uvarint(payload, pos)
            if size == 0:
                if self.transport is not None:
                    self.transport.write(frame(b"\x00", 0x2))  # pong
                continue
            start, pos = pos, pos + size
            if payload[start] != 0x22:
                continue  # a reply (field 1, its id, comes first), not a push
            reply = Reply.FromString(payload[start:pos])
            if reply.push.HasField("pub"):
                pub = reply.push.pub
                self.seen(pub.offset, pub.data)
        if self.count > counted:
            self.frames += 1


# ---- The Pusher Channels protocol (version 7) --------------------------------
#
# The server speaks first (``pusher:connection_established``); a subscriber
# then sends ``pusher:subscribe`` and is ready on
# ``pusher_internal:subscription_succeeded``. An event arrives alone in its
# frame as ``{"event":..,"channel":..,"data":"<JSON text>"}``: the
# generator's data is a JSON *string* there, so its fields are found in
# their escaped form. Pusher events carry no offset: publications are
# checked by their number in the data. The server's ``pusher:ping`` is
# answered with ``pusher:pong``.

PUSHER_SEQ = re.compile(rb'\\"n\\":(\d+)')
PUSHER_SENT = re.compile(rb'\\"t\\":([0-9.]+)')
PUSHER_PONG = b'{"event":"pusher:pong","data":{}}'


class PusherSubscriber(Subscriber):
    """A pusher-js on a raw socket: subscribes once the connection is
    established, counts events by the number in their data, answers pings."""

    sent = PUSHER_SENT

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # The subscribes wait for connection_established, and the subscriber
        # is ready when they are answered, not when the handshake is done.
        self.subscribe, self.hello = self.hello, []
        self.on_ready, self.ready = self.ready, lambda: None
        self.seq = PUSHER_SEQ
        self.pending = len(self.subscribe)

    def on_text(self, payload: bytes) -> None:
        if payload.startswith(b'{"event":"pusher'):
            assert self.transport is not None
            if payload.startswith(b'{"event":"pusher:connection_established"'):
                self.transport.write(b"".join(frame(m) for m in self.subscribe))
            elif payload.startswith(b'{"event":"pusher_internal:subscription_succeeded"'):
                self.pending -= 1
                if self.pending == 0:
                    self.on_ready()
            elif payload.startswith(b'{"event":"pusher:ping"'):
                self.transport.write(frame(PUSHER_PONG))
            return  # errors and the rest: not publications
        m = PUSHER_SEQ.search(payload)
        if m is None:
            if b'\\"w\\":1' in payload:
                self.warm += 1
            return
        self.seen(int(m.group(1)), payload)
        self.frames += 1


CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")


class HttpPublisher(asyncio.Protocol):
    """Publishes through a server's HTTP API on one keep-alive connection:
    requests go out back to back (pipelined; both servers answer them in
    order), answers are counted and errors kept."""

    def __init__(self, host: str, path: str, header: str, ready: Callable[[], None]) -> None:
        self.head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"{header}\r\n"
        ).encode()
        self.ready = ready
        self.sent = 0
        self.answered = 0
        self.errors: list[bytes] = []
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.ready()

    def publish(self, body: bytes) -> None:
        assert self.transport is not None
        self.transport.write(b"%sContent-Length: %d\r\n\r\n%s" % (self.head, len(body), body))
        self.sent += 1

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            m = CONTENT_LENGTH.search(self.buf, 0, end + 2)
            # (Both servers give the length of their small JSON answers.)
            stop = end + 4 + (int(m.group(1)) if m else 0)
            if len(self.buf) < stop:
                return
            status, body = self.buf[: self.buf.find(b"\r\n")], self.buf[end + 4 : stop]
            self.buf = self.buf[stop:]
            self.answered += 1
            if not status.startswith(b"HTTP/1.1 200") or body.startswith(b'{"error"'):
                if len(self.errors) < 10:
                    self.errors.append(status + b" " + body[:300])


class ApiStreamPublisher(Subscriber):
    """Squall's API stream (``GET /api/connection/websocket`` with
    ``Authorization: apikey``): sends pre-built, pre-masked frames of
    commands (one JSON object a line) back to back, keeps at most ``window``
    frames unanswered, and counts the replies (one a command, in order)."""

    def __init__(
        self,
        host: str,
        key: str,
        frames: list[bytes],
        per_frame: int,
        window: int,
        ready: Callable[[], None],
    ) -> None:
        super().__init__("/api/connection/websocket", host, [], SEQ, None, ready)
        self.key = key
        self.frames = frames  # masked WebSocket frames, cycled through
        self.per_frame = per_frame
        self.window = window
        self.next = 0
        self.sending = False
        self.commands = 0  # sent
        self.answered = 0
        self.failed = 0
        self.errors: list[bytes] = []
        self.gone = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            (
                f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\nAuthorization: apikey {self.key}\r\n\r\n"
            ).encode()
        )

    def data_received(self, data: bytes) -> None:
        if not self.handshaken and not (self.buf + data).startswith(b"HTTP/1.1 101"):
            if b"\r\n\r\n" in self.buf + data:
                self.errors.append((self.buf + data)[:300])  # refused: 401, 400, ...
                self.gone = True
                if self.transport is not None:
                    self.transport.close()
                return
        super().data_received(data)

    def start(self) -> None:
        self.sending = True
        self.fill()

    def stop(self) -> None:
        self.sending = False

    def fill(self) -> None:
        """Send frames until ``window`` of them are unanswered."""
        out = []
        limit = self.window * self.per_frame
        while self.sending and self.commands - self.answered < limit:
            out.append(self.frames[self.next])
            self.next = (self.next + 1) % len(self.frames)
            self.commands += self.per_frame
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def on_text(self, payload: bytes) -> None:
        ok = payload.count(b'"result"')
        bad = payload.count(b'"error"')
        self.answered += ok + bad
        if bad:
            self.failed += bad
            if len(self.errors) < 10:
                self.errors.append(payload[:300])
        self.fill()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True


class BatchPublisher(HttpPublisher):
    """``HttpPublisher`` for answers that may come chunked (Centrifugo sends a
    large batch's replies with ``Transfer-Encoding: chunked``): an answer
    counts once its last chunk is in; errors are kept as there."""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[: end + 2]
            if b"chunked" not in head.lower():
                before = self.answered
                rest, self.buf = self.buf, b""
                HttpPublisher.data_received(self, rest)  # one answer, or wait for more
                if self.answered == before:
                    return
                continue
            pos, body = end + 4, b""
            while True:
                eol = self.buf.find(b"\r\n", pos)
                if eol < 0:
                    return
                size = int(self.buf[pos:eol].split(b";")[0], 16)
                if len(self.buf) < eol + 2 + size + 2:
                    return
                body += self.buf[eol + 2 : eol + 2 + size]
                pos = eol + 2 + size + 2
                if size == 0:
                    break
            status = head[: head.find(b"\r\n")]
            self.buf = self.buf[pos:]
            self.answered += 1
            if not status.startswith(b"HTTP/1.1 200") or b'"error"' in body:
                if len(self.errors) < 10:
                    self.errors.append(status + b" " + body[:300])


class ClientPublisher(ApiStreamPublisher):
    """A client connection publishing (Squall's protocol or Centrifugo's):
    connects with a token (``hello``), then sends pre-built, pre-masked
    frames of one publish command each, at most ``window`` unanswered, and
    counts the replies (every reply but the connect's, id 1)."""

    def __init__(
        self,
        path: str,
        host: str,
        hello: list[bytes],
        frames: list[bytes],
        window: int,
        ready: Callable[[], None],
    ) -> None:
        super().__init__(host, "", frames, 1, window, ready)
        self.path = path
        self.hello = list(hello)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        Subscriber.connection_made(self, transport)

    def on_text(self, payload: bytes) -> None:
        for line in payload.split(b"\n"):
            if not line.startswith(b'{"id":') or line.startswith(b'{"id":1,'):
                continue  # the connect reply, or a push
            self.answered += 1
            if b'"error"' in line:
                self.failed += 1
                if len(self.errors) < 10:
                    self.errors.append(line[:300])
        self.fill()
