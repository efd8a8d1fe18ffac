"""WebSocket framing (RFC 6455) without I/O: bytes in, messages out; values
in, frames out.

The transport in ``handlers/websocket.py`` only moves bytes. This module
decides what they mean, and turns every rule a client breaks into a
``FrameError`` that carries the close code to answer with, so a hostile peer
costs its own connection and nothing else. No extensions are negotiated, so
the reserved bits must be zero.

A server's frames are never masked, so one built frame is the same bytes
for every subscriber: the hub's "encode once" extends down to the frame.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

# Close codes this module answers with (RFC 6455, section 7.4.1).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_DATA = 1007
CLOSE_TOO_BIG = 1009
CLOSE_TRY_AGAIN_LATER = 1013

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_CONTROL = 125


class FrameError(Exception):
    """The peer broke a framing rule; close with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


class HandshakeError(Exception):
    """The upgrade request cannot be accepted; answer with ``status``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key``.
    Raises ``HandshakeError`` unless the key is 16 bytes in base64."""
    try:
        raw = base64.b64decode(key.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raw = b""
    if len(raw) != 16:
        raise HandshakeError(400, "Sec-WebSocket-Key must be 16 bytes in base64")
    digest = hashlib.sha1(key.encode("ascii") + _GUID).digest()  # noqa: S324 - RFC 6455
    return base64.b64encode(digest).decode("ascii")


def unmask(mask: bytes | bytearray, data: bytes | bytearray) -> bytes:
    """XOR ``data`` with the repeating 4-byte ``mask`` (as one big integer:
    a C loop, not a Python one)."""
    n = len(data)
    if n == 0:
        return b""
    key = (bytes(mask) * ((n + 3) >> 2))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def header(opcode: int, length: int) -> bytes:
    """The header of an unmasked, final frame carrying ``length`` bytes."""
    if length < 126:
        return bytes((0x80 | opcode, length))
    if length < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, length)
    return struct.pack("!BBQ", 0x80 | opcode, 127, length)


def build(opcode: int, payload: bytes) -> bytes:
    """One unmasked, final frame."""
    return header(opcode, len(payload)) + payload


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame; the reason is cut (on a character boundary) to fit the
    125 bytes a control frame may carry."""
    raw = reason.encode("utf-8")[: _MAX_CONTROL - 2].decode("utf-8", "ignore").encode("utf-8")
    return build(OP_CLOSE, struct.pack("!H", code) + raw)


def parse_close(payload: bytes) -> tuple[int | None, str]:
    """The code and reason of a received close frame (no code: None).
    Raises ``FrameError`` for a malformed one."""
    if not payload:
        return None, ""
    if len(payload) == 1:
        raise FrameError(CLOSE_PROTOCOL_ERROR, "close frame with a 1-byte payload")
    code = struct.unpack_from("!H", payload)[0]
    if not (1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999):
        raise FrameError(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError(CLOSE_INVALID_DATA, "close reason is not UTF-8") from None
    return code, reason


class FrameParser:
    """Turns a client's bytes into messages.

    ``feed`` returns complete items as ``(opcode, payload)``: ``OP_TEXT`` or
    ``OP_BINARY`` with a whole (reassembled) message, or a control frame
    (``OP_PING``, ``OP_PONG``, ``OP_CLOSE``) as it arrives, even between the
    fragments of a message. Text is checked to be UTF-8. A message larger
    than ``max_message`` is refused as soon as its length is known, so the
    parser never holds more than one message and one frame header.
    """

    __slots__ = ("_buf", "_frag", "_frag_op", "_frag_size", "_max")

    def __init__(self, max_message: int) -> None:
        self._max = max_message
        self._buf = bytearray()
        self._frag: list[bytes] = []
        self._frag_op = 0  # 0: no fragmented message in progress
        self._frag_size = 0

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame or message."""
        return len(self._buf) + self._frag_size

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Parse what arrived. Raises ``FrameError``; after that the parser
        must not be fed again."""
        buf = self._buf
        buf += data
        out: list[tuple[int, bytes]] = []
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            opcode = b0 & 0x0F
            if b0 & 0x70:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "reserved bits set (no extension agreed)")
            if not b1 & 0x80:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "client frames must be masked")
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if end - pos < 4:
                    break
                length = struct.unpack_from("!H", buf, pos + 2)[0]
                head = 4
            elif length == 127:
                if end - pos < 10:
                    break
                length = struct.unpack_from("!Q", buf, pos + 2)[0]
                if length >> 63:
                    raise FrameError(CLOSE_PROTOCOL_ERROR, "frame length out of range")
                head = 10
            fin = b0 & 0x80
            if opcode >= 0x8:
                if opcode > OP_PONG:
                    raise FrameError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode}")
                if not fin:
                    raise FrameError(CLOSE_PROTOCOL_ERROR, "control frames must not be fragmented")
                if length > _MAX_CONTROL:
                    raise FrameError(CLOSE_PROTOCOL_ERROR, "control frame longer than 125 bytes")
            elif opcode == OP_CONTINUATION:
                if not self._frag_op:
                    raise FrameError(CLOSE_PROTOCOL_ERROR, "continuation frame with no message")
                if self._frag_size + length > self._max:
                    raise FrameError(CLOSE_TOO_BIG, f"message larger than {self._max} bytes")
            elif opcode <= OP_BINARY:
                if self._frag_op:
                    raise FrameError(CLOSE_PROTOCOL_ERROR, "new message before the last one ended")
                if length > self._max:
                    raise FrameError(CLOSE_TOO_BIG, f"message larger than {self._max} bytes")
            else:
                raise FrameError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode}")
            start = pos + head + 4
            if end - start < length:
                break
            payload = unmask(buf[start - 4 : start], buf[start : start + length])
            pos = start + length
            if opcode >= 0x8:
                out.append((opcode, payload))
                continue
            if opcode == OP_CONTINUATION:
                self._frag.append(payload)
                self._frag_size += length
                if not fin:
                    continue
                opcode = self._frag_op
                payload = b"".join(self._frag)
                self._frag = []
                self._frag_op = 0
                self._frag_size = 0
            elif not fin:
                self._frag_op = opcode
                self._frag = [payload]
                self._frag_size = length
                continue
            if opcode == OP_TEXT:
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError:
                    raise FrameError(CLOSE_INVALID_DATA, "text message is not UTF-8") from None
            out.append((opcode, payload))
        if pos:
            del buf[:pos]
        return out
