"""GET /api/connection/websocket: API commands pipelined over one WebSocket,
one reply each in command order; refusals, bad frames, backpressure; on the
embedded broker and on Redis; the ApiStream client."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import tornado.httpclient
import tornado.websocket

from handlers.api_stream import ApiStreamConnection, ApiStreamHandler, ApiStreams
from server import wsframe
from server.client import ApiError, ApiStream, ConnectionClosed, ReplyError
from tests.conftest import RawWS, Running, ServerFactory, wait_for

PATH = "/api/connection/websocket"


def line(cmd_id: int, method: str, **params: Any) -> bytes:
    return orjson.dumps({"id": cmd_id, "method": method, "params": params})


def frame(*lines: bytes) -> str:
    return b"\n".join(lines).decode()


async def stream_ws(server: Running, key: str | None = "") -> RawWS:
    """A bare WebSocket on the API stream endpoint (closed with the server's
    other clients)."""
    headers = {}
    if key is not None:
        headers["Authorization"] = f"apikey {key or server.settings.auth.api_key}"
    request = tornado.httpclient.HTTPRequest(f"ws://127.0.0.1:{server.port}{PATH}", headers=headers)
    conn = await tornado.websocket.websocket_connect(request, max_message_size=64 * 1024 * 1024)
    raw = RawWS(conn)
    server._clients.append(raw)
    return raw


async def replies(raw: RawWS, n: int) -> list[dict[str, Any]]:
    return [await raw.recv() for _ in range(n)]


def streams_of(server: Running) -> ApiStreams:
    app = server.http.request_callback
    for rule in app.wildcard_router.rules:  # type: ignore[attr-defined]
        if rule.target is ApiStreamHandler:
            streams: ApiStreams = rule.target_kwargs["streams"]
            return streams
    raise AssertionError("no API stream route")


@pytest.fixture
async def streams() -> AsyncIterator[list[ApiStream]]:
    """ApiStreams a test opens, closed after it."""
    opened: list[ApiStream] = []
    yield opened
    for stream in opened:
        await stream.close()


# ---- a client that speaks raw WebSocket over a socket ------------------------


class SocketClient:
    """A WebSocket client on a bare socket with a tiny receive buffer: it
    writes as much as it likes and reads only when told to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, server: Running) -> SocketClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        client = cls(reader, writer)
        key = server.settings.auth.api_key
        writer.write(
            (
                f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                f"Authorization: apikey {key}\r\n\r\n"
            ).encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101"), head
        return client

    @staticmethod
    def frame(opcode: int, payload: bytes) -> bytes:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = bytes((0x80 | opcode, 0x80 | n))
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        return head + mask + wsframe.unmask(mask, payload)

    def send(self, opcode: int, payload: bytes) -> None:
        self.writer.write(self.frame(opcode, payload))

    async def read_frame(self, timeout: float = 10.0) -> tuple[int, bytes]:
        head = await asyncio.wait_for(self.reader.readexactly(2), timeout)
        n = head[1] & 0x7F
        if n == 126:
            n = struct.unpack("!H", await self.reader.readexactly(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", await self.reader.readexactly(8))[0]
        return head[0] & 0x0F, await asyncio.wait_for(self.reader.readexactly(n), timeout)

    async def read_replies(self, n: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while len(out) < n:
            opcode, payload = await self.read_frame()
            assert opcode == wsframe.OP_TEXT, (opcode, payload[:100])
            out.extend(orjson.loads(x) for x in payload.split(b"\n"))
        assert len(out) == n
        return out

    async def read_close(self) -> tuple[int, str]:
        """Skip replies until the close frame; answer it; its (code, reason)."""
        while True:
            opcode, payload = await self.read_frame()
            if opcode == wsframe.OP_CLOSE:
                self.send(wsframe.OP_CLOSE, payload[:2])
                code, reason = wsframe.parse_close(payload)
                assert code is not None
                return code, reason

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


# ---- the upgrade -------------------------------------------------------------


@pytest.mark.parametrize("key", [None, "wrong-key-0123456789"])
async def test_missing_or_wrong_key_is_refused_before_the_upgrade(
    server: Running, key: str | None
) -> None:
    with pytest.raises(tornado.httpclient.HTTPClientError) as info:
        await stream_ws(server, key=key)
    assert info.value.code == 401
    assert info.value.response is not None
    assert orjson.loads(info.value.response.body)["error"]["code"] == 101
    assert not streams_of(server).conns


async def test_a_plain_get_is_not_an_upgrade(server: Running) -> None:
    response = await tornado.httpclient.AsyncHTTPClient().fetch(
        f"{server.http_url}{PATH}",
        headers={"Authorization": f"apikey {server.settings.auth.api_key}"},
        raise_error=False,
    )
    assert response.code == 400
    assert orjson.loads(response.body)["error"]["code"] == 107


# ---- ordering -----------------------------------------------------------------


async def check_pipelined_order(server: Running) -> None:
    """1,000 publishes in frames of 100, sent without waiting: replies in
    command order with rising offsets, delivered to a subscriber in order."""
    sub = await server.connected()
    await sub.call("subscribe", {"channel": "news"})
    raw = await stream_ws(server)
    for start in range(0, 1000, 100):
        raw.send(
            frame(
                *(line(i + 1, "publish", channel="news", data=i) for i in range(start, start + 100))
            )
        )
    got = await replies(raw, 1000)
    assert [r["id"] for r in got] == list(range(1, 1001))
    assert [r["result"]["offset"] for r in got] == list(range(1, 1001))
    for n in range(1000):
        push = await sub.push("pub")
        assert (push["pub"]["offset"], push["pub"]["data"]) == (n + 1, n)
    assert server.node.metrics.api_calls["publish"] == 1000


async def test_pipelined_publishes_keep_their_order(server: Running) -> None:
    await check_pipelined_order(server)


@pytest.fixture
def redis_config(redis_server: Any, prefix: str) -> dict[str, Any]:
    return {"broker": {"url": redis_server.url, "prefix": prefix}}


async def test_pipelined_publishes_keep_their_order_on_redis(
    make_server: ServerFactory, redis_config: dict[str, Any]
) -> None:
    server = await make_server(redis_config)
    assert server.node.broker.ordered_publish  # publishes are pipelined here
    await check_pipelined_order(server)


async def check_mixed(server: Running) -> None:
    raw = await stream_ws(server)
    raw.send(
        frame(
            line(1, "publish", channel="news", data="a"),
            line(2, "publish", channel="news", data="b"),
            line(3, "nope"),
            line(4, "publish", channel="news"),  # no data
            line(5, "batch", commands=[]),
            line(6, "history", channel="news", limit=10),
            b'{"id": 7, "method": "info", "params": []}',
        )
    )
    raw.send(frame(line(8, "publish", channel="news", data="c"), line(9, "info")))
    got = await replies(raw, 9)
    assert [r["id"] for r in got] == list(range(1, 10))
    assert got[1]["result"]["offset"] == 2
    assert [r["error"]["code"] for r in got[2:5]] == [104, 107, 104]
    assert "'nope'" in got[2]["error"]["message"]
    assert "data" in got[3]["error"]["message"]
    assert "batch" in got[4]["error"]["message"]
    # A read after publishes sees them.
    assert [p["data"] for p in got[5]["result"]["publications"]] == ["a", "b"]
    assert got[6]["error"]["code"] == 107
    assert got[7]["result"]["offset"] == 3
    assert got[8]["result"]["nodes"][0]["node"] == server.node.node_id
    assert server.node.metrics.api_calls["history"] == 1


async def test_mixed_methods_and_errors_keep_the_connection(server: Running) -> None:
    await check_mixed(server)


async def test_mixed_methods_on_redis(
    make_server: ServerFactory, redis_config: dict[str, Any]
) -> None:
    await check_mixed(await make_server(redis_config))


# ---- bad input closes --------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"method": "info"}', "integer 'id'"),
        ('{"id": "1", "method": "info"}', "integer 'id'"),
    ],
)
async def test_a_malformed_frame_closes_after_the_earlier_replies(
    server: Running, bad: str, words: str
) -> None:
    raw = await stream_ws(server)
    raw.send(frame(line(1, "publish", channel="news", data=1)))
    raw.send(bad)
    raw.send(frame(line(2, "publish", channel="news", data=2)))  # never run
    code, reason = await raw.closed()
    assert code == 3501
    assert reason is not None and reason.startswith("bad request") and words in reason
    assert [r["id"] for r in raw.inbox] == [1]
    assert [p["data"] for p in (await server.api().history("news"))["publications"]] == [1]


async def test_an_oversized_frame_closes_with_1009(server: Running) -> None:
    raw = await stream_ws(server)
    raw.send(frame(line(1, "publish", channel="news", data="x" * 70000)))
    code, _ = await raw.closed()
    assert code == 1009
    # A publication of the largest size fits in a frame.
    raw = await stream_ws(server)
    data = "x" * (server.settings.limits.max_publication_bytes - 2)
    raw.send(frame(line(1, "publish", channel="news", data=data)))
    assert (await raw.recv())["result"]["offset"] == 1


async def test_pings_are_answered(server: Running) -> None:
    client = await SocketClient.open(server)
    try:
        client.send(wsframe.OP_PING, b"are you there")
        assert await client.read_frame() == (wsframe.OP_PONG, b"are you there")
        client.send(wsframe.OP_TEXT, line(1, "info"))
        (reply,) = await client.read_replies(1)
        assert reply["id"] == 1 and "result" in reply
        client.send(wsframe.OP_CLOSE, struct.pack("!H", 1000))
        assert (await client.read_frame())[0] == wsframe.OP_CLOSE
    finally:
        await client.close()


# ---- backpressure --------------------------------------------------------------


async def fill_history(server: Running, n: int = 20, size: int = 4000) -> None:
    await server.api().batch(
        [{"method": "publish", "params": {"channel": "big", "data": "x" * size}}] * n
    )


def the_connection(server: Running) -> ApiStreamConnection:
    (conn,) = streams_of(server).conns
    return conn


async def test_a_flood_that_reads_nothing_is_throttled(make_server: ServerFactory) -> None:
    """A back end that writes without reading its replies: the server stops
    running its commands, then stops reading its socket (its writes back up
    on its own side), holds a bounded amount of it meanwhile, and serves
    everyone else. When it reads, every command is answered, in order."""
    server = await make_server({"limits": {"send_queue_bytes": 65536}})
    await fill_history(server)
    watcher = await server.connected("bob")
    await watcher.call("subscribe", {"channel": "news"})
    client = await SocketClient.open(server)
    try:
        # 200 reads answered with ~80 KB each, then 700 publishes of 30 KB.
        big = "y" * 30000
        commands = [line(i, "history", channel="big", limit=20) for i in range(1, 201)]
        commands += [line(i, "publish", channel="flood", data=big) for i in range(201, 901)]
        for cmd in commands:
            client.send(wsframe.OP_TEXT, cmd)
        sent = sum(len(c) for c in commands)
        assert sent > 20_000_000
        conn = the_connection(server)
        await wait_for(lambda: conn.reading_paused and conn.write_paused, message="throttling")
        # The flood waits on the client's side, not in the server.
        await wait_for(
            lambda: client.writer.transport.get_write_buffer_size() > 1_000_000,
            message="the client's writes to back up",
        )
        assert conn.buffered < 2 * 1024 * 1024
        assert server.node.metrics.api_calls.get("publish", 0) < 700
        # Everyone else is served meanwhile.
        assert (await server.api().publish("news", "still here"))["offset"] == 1
        assert (await watcher.push("pub"))["pub"]["data"] == "still here"
        # Reading on: every command answered, in order, nothing lost.
        got = await client.read_replies(900)
        assert [r["id"] for r in got] == list(range(1, 901))
        assert all(len(r["result"]["publications"]) == 20 for r in got[:200])
        assert [r["result"]["offset"] for r in got[200:]] == list(range(1, 701))
        assert not conn.reading_paused and not conn.write_paused
    finally:
        await client.close()


async def test_replies_unread_too_long_disconnect_as_slow(make_server: ServerFactory) -> None:
    server = await make_server({"limits": {"send_queue_bytes": 65536}})
    await fill_history(server)
    streams_of(server).stall_timeout = 0.2
    other = await stream_ws(server)
    client = await SocketClient.open(server)
    try:
        for i in range(1, 101):
            client.send(wsframe.OP_TEXT, line(i, "history", channel="big", limit=20))
        await wait_for(lambda: server.node.metrics.disconnects.get(3008) == 1, message="a close")
        # What it reads now: the replies the server had written, then the close.
        code, reason = await client.read_close()
        assert (code, reason) == (3008, "slow: replies not read")
        await wait_for(lambda: len(streams_of(server).conns) == 1, message="the slow one to go")
        # The other connection is unaffected.
        other.send(frame(line(1, "publish", channel="news", data=1)))
        assert (await other.recv())["result"]["offset"] == 1
    finally:
        await client.close()


# ---- the Python client ---------------------------------------------------------


async def test_api_stream_client(server: Running, streams: list[ApiStream]) -> None:
    sub = await server.connected()
    await sub.call("subscribe", {"channel": "news"})
    stream = await server.api().connect_stream()
    streams.append(stream)
    futures = [stream.publish("news", {"n": n}) for n in range(500)]
    history = stream.call("history", {"channel": "news", "limit": 0})
    assert stream.pending == 501
    results = await asyncio.gather(*futures)
    assert [r["offset"] for r in results] == list(range(1, 501))
    assert (await history)["offset"] == 500
    with pytest.raises(ReplyError) as info:
        await stream.call("nope")
    assert info.value.code == 104
    assert (await stream.publish("news", "after"))["offset"] == 501
    for n in range(500):
        assert (await sub.push("pub"))["pub"]["data"] == {"n": n}
    await stream.close()
    with pytest.raises(ConnectionClosed):
        stream.publish("news", "closed")
    await wait_for(lambda: not streams_of(server).conns, message="the server to let go")


async def test_api_stream_client_close_waits_for_replies(
    server: Running, streams: list[ApiStream]
) -> None:
    async with await server.api().connect_stream() as stream:
        last = [stream.publish("news", n) for n in range(100)][-1]
    assert last.done() and last.result()["offset"] == 100


async def test_api_stream_client_wrong_key(server: Running) -> None:
    stream = ApiStream(server.http_url, "wrong-key-0123456789")
    with pytest.raises(ApiError) as info:
        await stream.connect()
    assert (info.value.status, info.value.code) == (401, 101)


async def test_server_shutdown_closes_streams(
    make_server: ServerFactory, streams: list[ApiStream]
) -> None:
    server = await make_server()
    stream = await server.api().connect_stream()
    streams.append(stream)
    assert (await stream.publish("news", 1))["offset"] == 1
    await streams_of(server).shutdown()
    await wait_for(lambda: stream.close_code is not None, message="the close")
    assert stream.close_code == 3001
    with pytest.raises(ConnectionClosed):
        await stream.call("info")
