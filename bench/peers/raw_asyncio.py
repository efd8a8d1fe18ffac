"""The practical floor for Python: uvloop, a bare WebSocket handshake, then
one pre-built frame written to every subscriber's transport. No protocol,
no queues, no offsets. A client's message "sub" (or "sub:<channel>") makes
it a subscriber; anything else is a publication, broadcast as is (or, as
"<channel>\n<payload>", to that channel's subscribers)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
import sys

import uvloop

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
channels: dict[bytes, set[asyncio.Transport]] = {}


def server_frame(payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes([0x81, n]) + payload
    if n < 65536:
        return bytes([0x81, 126]) + struct.pack("!H", n) + payload
    return bytes([0x81, 127]) + struct.pack("!Q", n) + payload


class Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = b""
        self.open = False
        self.subs: list[set[asyncio.Transport]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        for subs in self.subs:
            subs.discard(self.t)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.open:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buf = self.buf[:end], self.buf[end + 4 :]
            key = next(
                line.split(b":", 1)[1].strip()
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key")
            )
            accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
            self.t.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            self.open = True
        while len(self.buf) >= 6:
            n = self.buf[1] & 0x7F
            head = 2
            if n == 126:
                n = struct.unpack_from("!H", self.buf, 2)[0]
                head = 4
            elif n == 127:
                n = struct.unpack_from("!Q", self.buf, 2)[0]
                head = 10
            if len(self.buf) < head + 4 + n:
                return
            mask = self.buf[head : head + 4]
            payload = bytes(
                b ^ mask[i % 4] for i, b in enumerate(self.buf[head + 4 : head + 4 + n])
            )
            self.buf = self.buf[head + 4 + n :]
            if payload[:3] == b"sub":
                subs = channels.setdefault(payload[4:], set())
                subs.add(self.t)
                self.subs.append(subs)
            else:
                channel, _, body = payload.rpartition(b"\n")
                out = server_frame(body)
                for t in channels.get(channel, ()):
                    t.write(out)


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Conn, "127.0.0.1", port)
    print("ready", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
