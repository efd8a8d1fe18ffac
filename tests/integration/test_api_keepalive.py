"""Keep-alive API connections (handlers/api_keepalive.py): after its first
request, a back end's keep-alive connection is answered off Tornado. What a
back end sees must not change: the same replies and statuses, in request
order, pipelined or not, whatever else it sends on the connection."""

from __future__ import annotations

import asyncio
import http.client
import logging
import socket
from typing import Any

import orjson
import pytest

from handlers.api_keepalive import KeepAliveApi
from tests.conftest import Running, ServerFactory
from tests.rawhttp import read_answer


class KeepAlive:
    """One HTTP/1.1 connection that may pipeline: requests are written as
    given, answers read one at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, server: Running, *, rcvbuf: int = 0) -> KeepAlive:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
        except OSError:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock)
        return cls(reader, writer)

    @staticmethod
    def post(
        server: Running,
        method: str,
        params: Any,
        *,
        key: str | None = None,
        body: bytes | None = None,
        extra: str = "",
    ) -> bytes:
        payload = orjson.dumps(params) if body is None else body
        api_key = server.settings.auth.api_key if key is None else key
        return (
            f"POST /api/{method} HTTP/1.1\r\nHost: squall\r\n"
            f"Authorization: apikey {api_key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n{extra}\r\n"
        ).encode() + payload

    def send(self, *requests: bytes) -> None:
        self.writer.write(b"".join(requests))

    async def answer(self, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
        """The next answer: (status, headers with lower-case names, body)."""
        return await read_answer(self.reader, timeout)

    async def json(self, timeout: float = 5.0) -> tuple[int, Any]:
        status, _, body = await self.answer(timeout)
        return status, orjson.loads(body)

    async def closed_by_server(self, timeout: float) -> bool:
        try:
            return await asyncio.wait_for(self.reader.read(), timeout) == b""
        except (TimeoutError, ConnectionError):
            return False

    def close(self) -> None:
        self.writer.close()


def keepalive_of(server: Running) -> KeepAliveApi:
    keepalive = server.http.request_callback.settings["keepalive_api"]  # type: ignore[attr-defined]
    assert isinstance(keepalive, KeepAliveApi)
    return keepalive


async def history_data(server: Running, channel: str) -> list[Any]:
    result = await server.api().call("history", {"channel": channel, "limit": 1000})
    return [pub["data"] for pub in result["publications"]]


@pytest.fixture
async def conn(server: Running) -> Any:
    c = await KeepAlive.open(server)
    yield c
    c.close()


async def test_pipelined_publishes_are_answered_in_order(server: Running, conn: KeepAlive) -> None:
    sub = await server.connected("bob")
    await sub.call("subscribe", {"channel": "news"})
    # The first request goes through Tornado, the rest are answered off it;
    # all 200 are written before any answer is read.
    conn.send(
        *(KeepAlive.post(server, "publish", {"channel": "news", "data": i}) for i in range(200))
    )
    offsets = []
    for _ in range(200):
        status, reply = await conn.json()
        assert status == 200
        offsets.append(reply["result"]["offset"])
    assert offsets == list(range(1, 201))
    assert len(keepalive_of(server).conns) == 1  # the connection is off Tornado
    got = [(await sub.push("pub"))["pub"]["data"] for _ in range(200)]
    assert got == list(range(200))
    assert await history_data(server, "news") == list(range(100, 200))  # history keeps 100


async def test_same_answers_as_tornado(server: Running) -> None:
    """Each bad request on a kept-alive connection gets the status and body
    a fresh connection gets from Tornado."""
    key = server.settings.auth.api_key
    cases = [
        KeepAlive.post(server, "publish", {"channel": "news", "data": 1}),
        KeepAlive.post(server, "publish", {"channel": "nons:x", "data": 1}),
        KeepAlive.post(server, "publish", {"channel": "news"}),
        KeepAlive.post(server, "nosuch", {}),
        KeepAlive.post(server, "publish", {"channel": "news", "data": 1}, key="wrong" * 5),
        KeepAlive.post(server, "publish", None, body=b"{not json"),
        KeepAlive.post(server, "publish", None, body=b"[1, 2]"),
        KeepAlive.post(server, "info", None, body=b""),
        KeepAlive.post(server, "history", {"channel": "news", "limit": "x"}),
    ]
    fresh = []
    for request in cases:
        # Tornado alone: a new connection that asks to be closed.
        c = await KeepAlive.open(server)
        c.send(request.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nConnection: close\r\n", 1))
        status, reply = await c.json()
        fresh.append((status, reply))
        c.close()
    kept = await KeepAlive.open(server)
    try:
        kept.send(KeepAlive.post(server, "info", {}))  # taken off Tornado here
        assert (await kept.json())[0] == 200
        kept.send(*cases)
        answers = [await kept.json() for _ in cases]
    finally:
        kept.close()
    assert key  # the cases above used it
    for (status, reply), (want_status, want) in zip(answers, fresh, strict=True):
        assert status == want_status
        if "result" in want and "offset" in want["result"]:
            assert reply["result"]["offset"] == want["result"]["offset"] + 1
        elif "result" in want:
            assert set(reply["result"]) == set(want["result"])
        else:
            assert reply == want
    assert [s for s, _ in answers] == [200, 400, 400, 404, 401, 400, 400, 200, 400]


async def test_other_requests_on_the_connection_go_to_tornado(
    server: Running, conn: KeepAlive
) -> None:
    """A GET, a batch and a chunked body between API requests: answered by
    Tornado, in order, and the connection goes on."""
    batch = orjson.dumps(
        {"commands": [{"method": "publish", "params": {"channel": "news", "data": 2}}]}
    )
    chunked_body = orjson.dumps({"channel": "news", "data": 3})
    conn.send(
        KeepAlive.post(server, "publish", {"channel": "news", "data": 0}),
        KeepAlive.post(server, "publish", {"channel": "news", "data": 1}),
        b"GET /health HTTP/1.1\r\nHost: squall\r\n\r\n",
        KeepAlive.post(server, "batch", None, body=batch),
        (
            f"POST /api/publish HTTP/1.1\r\nHost: squall\r\n"
            f"Authorization: apikey {server.settings.auth.api_key}\r\n"
            f"Transfer-Encoding: chunked\r\n\r\n{len(chunked_body):x}\r\n"
        ).encode()
        + chunked_body
        + b"\r\n0\r\n\r\n",
        KeepAlive.post(server, "publish", {"channel": "news", "data": 4}),
    )
    status, reply = await conn.json()
    assert (status, reply["result"]["offset"]) == (200, 1)
    assert (await conn.json())[1]["result"]["offset"] == 2
    status, headers, body = await conn.answer()
    assert (status, orjson.loads(body)) == (200, {"status": "ok"})
    assert "etag" in headers  # Tornado's answer
    status, reply = await conn.json()
    assert (status, reply["replies"][0]["result"]["offset"]) == (200, 3)
    assert (await conn.json())[1]["result"]["offset"] == 4
    assert (await conn.json())[1]["result"]["offset"] == 5
    assert await history_data(server, "news") == [0, 1, 2, 3, 4]


async def test_requests_split_anywhere(server: Running, conn: KeepAlive) -> None:
    """Requests arriving a few bytes at a time, and several in one read."""
    requests = b"".join(
        KeepAlive.post(server, "publish", {"channel": "news", "data": "x" * i}) for i in range(6)
    )
    for size in (1, 7, 50):
        for start in range(0, len(requests), size):
            conn.send(requests[start : start + size])
            await conn.writer.drain()
            if size == 1 and start % 97 == 0:
                await asyncio.sleep(0)  # some reads see one byte
        for _ in range(6):
            assert (await conn.json())[0] == 200
    data = await history_data(server, "news")
    assert data == ["x" * i for i in range(6)] * 3


async def test_an_oversized_body_is_refused_as_tornado_refuses_it(
    make_server: ServerFactory,
) -> None:
    server = await make_server({"limits": {"max_publication_bytes": 1024}})
    limit = keepalive_of(server).max_body
    # The head announces a body over the limit; the body is never sent.
    big = KeepAlive.post(server, "publish", None, body=b"x" * (limit + 1))
    big = big[: big.index(b"\r\n\r\n") + 4]
    fresh = await KeepAlive.open(server)
    fresh.send(big)
    want, _, _ = await fresh.answer()
    fresh.close()
    conn = await KeepAlive.open(server)
    try:
        conn.send(KeepAlive.post(server, "publish", {"channel": "news", "data": 1}))
        assert (await conn.json())[0] == 200
        conn.send(KeepAlive.post(server, "publish", {"channel": "news", "data": 2}), big)
        assert (await conn.json())[0] == 200  # the one before it first
        status, _, _ = await conn.answer()
        assert status == want
        assert status in (400, 413)
    finally:
        conn.close()
    assert await history_data(server, "news") == [1, 2]


async def test_a_client_that_reads_no_answers_is_not_read(server: Running) -> None:
    """Backpressure: a back end that writes requests and never reads the
    answers stops being read (the server holds a bounded number of them);
    once it reads, everything is answered in order."""
    conn = await KeepAlive.open(server, rcvbuf=4096)  # the kernel holds little for it
    n = 30_000
    request = [KeepAlive.post(server, "publish", {"channel": "flood", "data": i}) for i in range(n)]
    sender = asyncio.create_task(_write_all(conn, request))
    try:
        # Wait until the server stops making progress: the kernel's buffers
        # are full both ways, and the server no longer reads.
        last, still = -1, 0
        for _ in range(200):
            await asyncio.sleep(0.05)
            offset = (await server.api().call("history", {"channel": "flood", "limit": 0}))[
                "offset"
            ]
            still = still + 1 if offset == last else 0
            last = offset
            if still >= 6:
                break
        assert still >= 6, "the server kept reading a client that reads nothing"
        assert 0 < last < n
        # What the server holds for it is bounded (the rest is in the kernel).
        held = [c.buffered for c in keepalive_of(server).conns]
        assert len(held) == 1 and held[0] < 1024 * 1024
        offsets = []
        for _ in range(n):
            _, reply = await conn.json(10)
            offsets.append(reply["result"]["offset"])
        assert offsets == list(range(1, n + 1))
        await asyncio.wait_for(sender, 10)
    finally:
        sender.cancel()
        conn.close()


async def _write_all(conn: KeepAlive, requests: list[bytes]) -> None:
    for start in range(0, len(requests), 500):
        conn.send(*requests[start : start + 500])
        await conn.writer.drain()


async def test_idle_connections_are_closed(server: Running, conn: KeepAlive) -> None:
    keepalive_of(server).idle_timeout = 0.2
    conn.send(KeepAlive.post(server, "info", {}))
    assert (await conn.json())[0] == 200
    assert await conn.closed_by_server(5.0)
    assert not keepalive_of(server).conns


async def test_shutdown_closes_kept_connections(make_server: ServerFactory) -> None:
    server = await make_server()
    conn = await KeepAlive.open(server)
    try:
        conn.send(KeepAlive.post(server, "info", {}))
        assert (await conn.json())[0] == 200
        assert keepalive_of(server).conns
        await keepalive_of(server).shutdown(grace=1.0)
        assert await conn.closed_by_server(5.0)
    finally:
        conn.close()


async def test_a_client_gone_mid_pipeline_leaves_the_server_well(
    server: Running, caplog: pytest.LogCaptureFixture
) -> None:
    conn = await KeepAlive.open(server)
    conn.send(
        *(KeepAlive.post(server, "publish", {"channel": "gone", "data": i}) for i in range(50))
    )
    await conn.answer()
    conn.writer.transport.abort()  # reset, with answers unread
    keepalive = keepalive_of(server)
    for _ in range(100):
        if not keepalive.conns:
            break
        await asyncio.sleep(0.02)
    assert not keepalive.conns
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    # The server goes on for everyone else.
    assert (await server.api().call("info", {}))["nodes"]


async def test_a_stock_keep_alive_client(server: Running) -> None:
    """The standard library's http.client keeps its connection and reads
    each answer with its own parser."""

    def run() -> list[tuple[int, str | None, Any]]:
        c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        headers = {"Authorization": f"apikey {server.settings.auth.api_key}"}
        out = []
        try:
            for i in range(5):
                c.request(
                    "POST", "/api/publish", orjson.dumps({"channel": "std", "data": i}), headers
                )
                r = c.getresponse()
                out.append((r.status, r.getheader("Content-Type"), orjson.loads(r.read())))
            c.request("GET", "/status")
            r = c.getresponse()
            out.append((r.status, r.getheader("Content-Type"), orjson.loads(r.read())))
            c.request("POST", "/api/publish", b"{}", headers)
            r = c.getresponse()
            out.append((r.status, r.getheader("Content-Type"), orjson.loads(r.read())))
            sock = c.sock
            assert sock is not None
            out.append((0, None, sock.getsockname()))
        finally:
            c.close()
        return out

    answers = await asyncio.to_thread(run)
    assert [a[0] for a in answers[:7]] == [200, 200, 200, 200, 200, 200, 400]
    assert [a[2]["result"]["offset"] for a in answers[:5]] == [1, 2, 3, 4, 5]
    assert all(a[1] == "application/json" for a in answers[:7])
    assert answers[6][2]["error"]["code"] == 107


async def test_access_log_lines(
    server: Running, conn: KeepAlive, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="squall.access")
    conn.send(
        KeepAlive.post(server, "publish", {"channel": "news", "data": 1}),
        KeepAlive.post(server, "publish", {"channel": "news", "data": 2}),
        KeepAlive.post(server, "nosuch", {}),
    )
    for _ in range(3):
        await conn.answer()
    records = [r for r in caplog.records if r.name == "squall.access"]
    lines = [r.getMessage().rsplit(" ", 1)[0] for r in records]
    assert lines == ["200 POST /api/publish", "200 POST /api/publish", "404 POST /api/nosuch"]
    # Successful API calls only at debug (a back end makes thousands).
    assert [r.levelno for r in records] == [logging.DEBUG, logging.DEBUG, logging.WARNING]


async def test_pipelined_publishes_on_redis(
    make_server: ServerFactory, redis_server: Any, prefix: str
) -> None:
    server = await make_server({"broker": {"url": redis_server.url, "prefix": prefix}})
    assert server.node.broker.ordered_publish
    conn = await KeepAlive.open(server)
    try:
        requests = []
        for i in range(300):
            channel = f"r{i % 3}"
            requests.append(KeepAlive.post(server, "publish", {"channel": channel, "data": i}))
        requests[150] = KeepAlive.post(server, "publish", {"channel": "nons:x", "data": 150})
        conn.send(*requests)
        answers = [await conn.json() for _ in range(300)]
    finally:
        conn.close()
    assert answers[150][0] == 400
    per_channel: dict[str, list[int]] = {}
    for i, (status, reply) in enumerate(answers):
        if i == 150:
            continue
        assert status == 200
        per_channel.setdefault(f"r{i % 3}", []).append(reply["result"]["offset"])
    for offsets in per_channel.values():
        assert offsets == list(range(1, len(offsets) + 1))
    assert await history_data(server, "r0") == [i for i in range(0, 300, 3) if i != 150]
