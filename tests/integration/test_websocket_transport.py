"""The WebSocket transport on a real socket, spoken byte by byte: what a
client sees when it gets the upgrade or the framing wrong, and that a
misbehaving connection costs only itself."""

from __future__ import annotations

import asyncio
import base64
import os
import struct

import orjson
import pytest

from server import errors, protocol, wsframe
from server.models import ClientInfo, Publication
from tests.conftest import RawWS, Running, ServerFactory, wait_for
from tests.unit.test_wsframe import client_frame


class Raw:
    """A client on a bare socket: we write exactly the bytes we want."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(
        cls, server: Running, *, headers: dict[str, str] | None = None, extra: bytes = b""
    ) -> tuple[Raw, int, dict[str, str], bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        head = {
            "Host": f"127.0.0.1:{server.port}",
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
            "Sec-WebSocket-Version": "13",
            **(headers or {}),
        }
        lines = "".join(f"{k}: {v}\r\n" for k, v in head.items() if v is not None)
        writer.write(f"GET /connection/websocket HTTP/1.1\r\n{lines}\r\n".encode() + extra)
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        status_line, *header_lines = raw.decode().split("\r\n")
        status = int(status_line.split()[1])
        got = {}
        for line in header_lines:
            if ":" in line:
                k, v = line.split(":", 1)
                got[k.strip().lower()] = v.strip()
        body = b""
        if status != 101 and "content-length" in got:
            body = await reader.readexactly(int(got["content-length"]))
        return cls(reader, writer), status, got, body

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def command(self, obj: dict[str, object]) -> None:
        self.send(client_frame(wsframe.OP_TEXT, orjson.dumps(obj)))

    async def frame(self, timeout: float = 5.0) -> tuple[int, bytes]:
        head = await asyncio.wait_for(self.reader.readexactly(2), timeout)
        assert not head[1] & 0x80, "server frames are never masked"
        n = head[1] & 0x7F
        if n == 126:
            n = struct.unpack("!H", await self.reader.readexactly(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", await self.reader.readexactly(8))[0]
        return head[0] & 0x0F, await asyncio.wait_for(self.reader.readexactly(n), timeout)

    async def close_code(self, timeout: float = 5.0) -> int | None:
        """Skip frames until the server's close frame; its code."""
        while True:
            opcode, payload = await self.frame(timeout)
            if opcode == wsframe.OP_CLOSE:
                return wsframe.parse_close(payload)[0]

    async def eof(self, timeout: float = 5.0) -> bool:
        return await asyncio.wait_for(self.reader.read(), timeout) == b""

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
async def raws() -> object:
    opened: list[Raw] = []
    yield opened
    for r in opened:
        r.close()


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Upgrade": None}, 400),
        ({"Connection": "keep-alive"}, 400),
        ({"Sec-WebSocket-Key": "too-short"}, 400),
        ({"Sec-WebSocket-Key": None}, 400),
        ({"Sec-WebSocket-Version": "8"}, 426),
        ({"Origin": "https://evil.example"}, 403),
    ],
)
async def test_a_bad_upgrade_gets_a_json_error_and_no_session(
    server: Running, raws: list[Raw], headers: dict[str, str], status: int
) -> None:
    raw, got, head, body = await Raw.open(server, headers=headers)
    raws.append(raw)
    assert got == status
    assert orjson.loads(body)["error"]["message"]
    if status == 426:
        assert head["sec-websocket-version"] == "13"
    assert not server.node.sessions


async def test_the_accept_key_answers_the_clients_key(server: Running, raws: list[Raw]) -> None:
    key = base64.b64encode(os.urandom(16)).decode()
    raw, status, head, _ = await Raw.open(server, headers={"Sec-WebSocket-Key": key})
    raws.append(raw)
    assert status == 101
    assert head["sec-websocket-accept"] == wsframe.accept_key(key)
    assert head["upgrade"].lower() == "websocket"


async def test_a_command_sent_with_the_handshake_is_answered(
    server: Running, raws: list[Raw]
) -> None:
    # Bytes that arrive together with the upgrade request are not lost when
    # the socket changes hands.
    connect = {"id": 1, "method": "connect", "params": {"token": server.token()}}
    extra = client_frame(wsframe.OP_TEXT, orjson.dumps(connect))
    raw, status, _, _ = await Raw.open(server, extra=extra)
    raws.append(raw)
    assert status == 101
    opcode, payload = await raw.frame()
    assert opcode == wsframe.OP_TEXT
    assert orjson.loads(payload)["result"]["client"]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (client_frame(wsframe.OP_TEXT, b'{"id":1}', mask=False), 1002),
        (client_frame(wsframe.OP_TEXT, b"\xff\xfe"), 1007),
        (client_frame(wsframe.OP_TEXT, b"x", rsv=4), 1002),
        (struct.pack("!BBQ", 0x81, 0x80 | 127, 1 << 30), 1009),
    ],
    ids=["unmasked", "not-utf8", "reserved-bits", "one-gigabyte-header"],
)
async def test_a_framing_error_closes_only_that_connection(
    server: Running, raws: list[Raw], data: bytes, code: int
) -> None:
    bystander = await server.connected("bob")
    raw, _, _, _ = await Raw.open(server)
    raws.append(raw)
    raw.command({"id": 1, "method": "connect", "params": {"token": server.token()}})
    await raw.frame()
    raw.send(data)
    assert await raw.close_code() == code
    await wait_for(lambda: len(server.node.sessions) == 1, message="bad connection gone")
    assert "result" in await bystander.call("ping")


async def test_the_server_answers_a_clients_close_and_hangs_up(
    server: Running, raws: list[Raw]
) -> None:
    raw, _, _, _ = await Raw.open(server)
    raws.append(raw)
    await wait_for(lambda: len(server.node.sessions) == 1)
    raw.send(client_frame(wsframe.OP_CLOSE, struct.pack("!H", 4000) + b"bye"))
    assert await raw.close_code() == 4000  # the RFC: echo the code
    assert await raw.eof()
    await wait_for(lambda: not server.node.sessions, message="session gone")


async def test_fragments_with_a_ping_in_between(server: Running, raws: list[Raw]) -> None:
    raw, _, _, _ = await Raw.open(server)
    raws.append(raw)
    text = orjson.dumps({"id": 1, "method": "connect", "params": {"token": server.token()}})
    raw.send(client_frame(wsframe.OP_TEXT, text[:10], fin=False))
    raw.send(client_frame(wsframe.OP_PING, b"are you there"))
    raw.send(client_frame(wsframe.OP_CONTINUATION, text[10:]))
    assert await raw.frame() == (wsframe.OP_PONG, b"are you there")
    _, payload = await raw.frame()
    assert orjson.loads(payload)["result"]["client"]


async def test_server_close_waits_for_the_peer_then_hangs_up(
    make_server: ServerFactory, raws: list[Raw]
) -> None:
    server = await make_server({"limits": {"connect_timeout": 0.2}})
    raw, _, _, _ = await Raw.open(server)
    raws.append(raw)
    # No connect within the timeout: the server closes with its code ...
    assert await raw.close_code() == errors.CONNECT_TIMEOUT.code
    # ... and the TCP connection ends once we answer.
    raw.send(client_frame(wsframe.OP_CLOSE, struct.pack("!H", 1000)))
    assert await raw.eof()
    await wait_for(lambda: not server.node.sessions)


async def test_a_flood_of_commands_is_read_as_fast_as_it_is_handled(
    server: Running, raws: list[Raw]
) -> None:
    # 2,000 pings in one burst from a client that reads nothing until the
    # end: every one is answered, in order, and the server holds no more
    # than a bounded backlog of them (it stops reading the socket).
    raw, _, _, _ = await Raw.open(server)
    raws.append(raw)
    raw.command({"id": 1, "method": "connect", "params": {"token": server.token()}})
    await raw.frame()
    burst = b"".join(
        client_frame(wsframe.OP_TEXT, b'{"id":%d,"method":"ping"}' % i) for i in range(2, 2002)
    )
    raw.send(burst)
    ids: list[int] = []
    while len(ids) < 2000:
        _, payload = await raw.frame()
        ids += [orjson.loads(line)["id"] for line in payload.split(b"\n")]
    assert ids == list(range(2, 2002))


async def test_a_fan_out_shares_one_frame_but_never_another_sessions_messages(
    server: Running,
) -> None:
    # The subscribers of a publication are handed one shared queue and one
    # frame; a message for one of them alone, queued in the same loop
    # iteration, must reach only that one, and in order.
    alice = await server.connected("alice")
    bob = await server.connected("bob")
    carol = await server.connected("carol")
    for client in (alice, bob, carol):
        assert "result" in await client.call("subscribe", {"channel": "news"})
    assert "result" in await bob.call("subscribe", {"channel": "sports"})
    node = server.node
    only_alice = next(s for s in node.sessions.values() if s.user == "alice")
    note = protocol.join_push("news", ClientInfo("x", "only-for-alice"))
    out_before = node.metrics.messages_out

    def pub(offset: int, channel: str = "news") -> Publication:
        return Publication(channel, offset, "e1", orjson.dumps({"n": offset}))

    async def offsets(client: RawWS, count: int) -> list[int]:
        return [(await client.recv())["pub"]["offset"] for _ in range(count)]

    # One loop iteration: a publication, a message to alice, one to a
    # channel only bob takes, a burst of two.
    node.on_publication(pub(1))
    only_alice.send(note)
    node.on_publication(pub(7, "sports"))
    node.on_publication(pub(2))
    node.on_publication(pub(3))
    frames_before = [c.frames for c in (alice, bob, carol)]
    assert (await alice.recv())["pub"]["offset"] == 1
    assert (await alice.recv())["info"]["user"] == "only-for-alice"
    assert await offsets(alice, 2) == [2, 3]
    assert await offsets(bob, 4) == [1, 7, 2, 3]
    assert await offsets(carol, 3) == [1, 2, 3]
    frames = [c.frames - n for c, n in zip((alice, bob, carol), frames_before, strict=True)]
    assert frames == [1, 1, 1], "one frame each"
    assert node.metrics.messages_out - out_before == 11

    # The next publication goes out alone (no stale shared frame), and a
    # message to alice alone reaches nobody else.
    node.on_publication(pub(4))
    for client in (alice, bob, carol):
        assert await offsets(client, 1) == [4]
    only_alice.send(note)
    await asyncio.sleep(0)
    node.on_publication(pub(5))
    assert (await alice.recv())["info"]["user"] == "only-for-alice"
    for client in (alice, bob, carol):
        assert await offsets(client, 1) == [5]
        assert not client.inbox
