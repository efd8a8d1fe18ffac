"""Server-Sent Events: subscribe by query, token auth, resume with Last-Event-ID."""

from __future__ import annotations

import asyncio
import socket
from typing import Any
from urllib.parse import parse_qsl

import orjson
import pytest

from tests.conftest import Running, ServerFactory, wait_for


class SSEStream:
    """A minimal EventSource over a raw socket: we must be able to drop the
    connection the way a browser tab does, which Tornado's client cannot."""

    def __init__(self) -> None:
        self.buffer = b""
        self.events: list[dict[str, Any]] = []
        self.last_id: str | None = None
        self.status = 0
        self.headers: bytes | None = None
        self.body = b""
        self.task: asyncio.Task[Any] | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def run(self, port: int, target: str, headers: dict[str, str]) -> None:
        reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            await self._read(reader, port, target, headers)
        finally:
            self.writer.close()

    async def _read(
        self, reader: asyncio.StreamReader, port: int, target: str, headers: dict[str, str]
    ) -> None:
        assert self.writer is not None
        lines = [f"GET {target} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await reader.readuntil(b"\r\n\r\n")
        self.headers = head
        self.status = int(head.split(b" ", 2)[1])
        chunked = b"chunked" in head.lower()
        if not chunked:
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            self.body = await reader.readexactly(length)
            return
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                return
            chunk = await reader.readexactly(size + 2)
            self.body += chunk[:-2]
            self.on_chunk(chunk[:-2])

    def on_chunk(self, chunk: bytes) -> None:
        self.buffer += chunk
        while b"\n\n" in self.buffer:
            raw, self.buffer = self.buffer.split(b"\n\n", 1)
            event: dict[str, Any] = {}
            for line in raw.decode().split("\n"):
                if line.startswith("id: "):
                    event["id"] = line[4:]
                    self.last_id = event["id"]
                elif line.startswith("data: "):
                    event.setdefault("data", []).append(orjson.loads(line[6:]))
            for msg in event.get("data", []):
                self.events.append({"id": event.get("id"), **msg})

    async def next(self, kind: str, timeout: float = 5.0) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("push") == kind:
                    return self.events.pop(i)
            if loop.time() > deadline:
                raise AssertionError(f"no {kind} event; have {self.events}")
            await asyncio.sleep(0.01)


def open_sse(server: Running, query: str, headers: dict[str, str] | None = None) -> SSEStream:
    stream = SSEStream()
    target = f"/connection/sse?{query}"
    stream.task = asyncio.ensure_future(stream.run(server.port, target, headers or {}))
    return stream


async def stop(stream: SSEStream) -> None:
    assert stream.task is not None
    stream.task.cancel()
    await asyncio.gather(stream.task, return_exceptions=True)


async def test_sse_receives_publications(server: Running) -> None:
    token = server.token("alice")
    stream = open_sse(server, "channel=news&channel=alerts", {"Authorization": f"Bearer {token}"})
    connect = await stream.next("connect")
    assert connect["client"]
    subs = {(await stream.next("subscribe"))["channel"] for _ in range(2)}
    assert subs == {"news", "alerts"}
    await server.api().publish("news", {"n": 1})
    pub = await stream.next("pub")
    assert pub["pub"]["data"] == {"n": 1}
    assert "news=1." in pub["id"]
    await stop(stream)
    await wait_for(lambda: not server.node.sessions)


async def test_sse_resumes_with_last_event_id(server: Running) -> None:
    api = server.api()
    token = server.token("alice")
    stream = open_sse(server, f"channel=a&channel=b&token={token}")
    await stream.next("subscribe")
    await stream.next("subscribe")
    await api.publish("a", "a1")
    await api.publish("b", "b1")
    await stream.next("pub")
    await stream.next("pub")
    last_id = stream.last_id
    assert last_id is not None
    await stop(stream)
    await wait_for(lambda: not server.node.sessions)
    # Missed while away:
    await api.publish("a", "a2")
    await api.publish("b", "b2")
    await api.publish("a", "a3")
    resumed = open_sse(server, f"channel=a&channel=b&token={token}", {"Last-Event-ID": last_id})
    got = []
    for _ in range(3):
        pub = await resumed.next("pub")
        got.append((pub["channel"], pub["pub"]["data"]))
    assert sorted(got) == [("a", "a2"), ("a", "a3"), ("b", "b2")]
    subs = [ev for ev in resumed.events if ev.get("push") == "subscribe"]
    assert all(s["recovered"] is True for s in subs)
    await api.publish("b", "b3")
    assert (await resumed.next("pub"))["pub"]["data"] == "b3"
    await stop(resumed)


@pytest.mark.parametrize(
    ("query", "headers", "status"),
    [
        ("channel=news", None, 401),  # no token
        ("channel=news&token=garbage", None, 401),
        ("channel=news&channel=news&token={t}", None, 400),
        ("channel=bad%20name&token={t}", None, 200),  # per-channel error as an event
        ("channel=news&token={t}", {"Last-Event-ID": "%%%"}, 400),
        ("channel=news&token={t}", {"Origin": "https://evil.example"}, 403),
    ],
)
async def test_sse_errors(
    server: Running, query: str, headers: dict[str, str] | None, status: int
) -> None:
    query = query.replace("{t}", server.token("alice"))
    if status != 200:
        stream = open_sse(server, query, headers)
        assert stream.task is not None
        await asyncio.wait_for(stream.task, 5)
        assert stream.status == status
        assert "error" in orjson.loads(stream.body)
        await wait_for(lambda: not server.node.sessions)
        return
    stream = open_sse(server, query, headers)
    unsub = await stream.next("unsubscribe")
    assert unsub["code"] == 107
    await stop(stream)


async def test_sse_token_not_in_access_log(
    server: Running, caplog: pytest.LogCaptureFixture
) -> None:
    token = server.token("alice")
    caplog.set_level("DEBUG", logger="squall.access")
    stream = open_sse(server, f"channel=news&token={token}")
    await stream.next("subscribe")
    await stop(stream)
    await wait_for(lambda: any("/connection/sse" in r.getMessage() for r in caplog.records))
    assert token not in caplog.text


async def test_sse_client_told_to_leave_on_drain(make_server: ServerFactory) -> None:
    server = await make_server()
    stream = open_sse(server, f"channel=news&token={server.token('alice')}")
    await stream.next("subscribe")
    await server.node.drain(grace=2)
    push = await stream.next("disconnect")
    assert push["code"] == 3001
    assert push["reconnect"] is True


async def test_sse_stream_is_an_event_stream_from_the_first_byte(
    make_server: ServerFactory,
) -> None:
    """EventSource refuses anything but text/event-stream, so the headers
    must be right even when events are written before the handler returns
    (a durable channel's subscribe waits on the log, and the connect event
    goes out meanwhile)."""
    server = await make_server({"namespaces": {"log": {"persist": True}}})
    stream = open_sse(server, f"channel=log:a&channel=log:b&token={server.token('alice')}")
    await stream.next("subscribe")
    assert stream.headers is not None
    assert b"content-type: text/event-stream" in stream.headers.lower()
    await stop(stream)


def positions_of(event_id: str) -> dict[str, int]:
    return {ch: int(v.split(".")[0]) for ch, v in parse_qsl(event_id)}


async def test_sse_event_ids_carry_each_streams_own_channels(server: Running) -> None:
    """Streams on different channel sets, and one resumed from an older
    position, get the same publication with ids of their own."""
    api = server.api()
    token = server.token("alice")
    both = open_sse(server, f"channel=a&channel=b&token={token}")
    only_a = open_sse(server, f"channel=a&token={token}")
    twin = open_sse(server, f"channel=b&channel=a&token={token}")
    for stream in (both, twin):
        await stream.next("subscribe")
        await stream.next("subscribe")
    await only_a.next("subscribe")
    await api.publish("b", "b1")
    await api.publish("a", "a1")
    await api.publish("a", "a2")
    for stream in (both, twin):
        ids = [(await stream.next("pub"))["id"] for _ in range(3)]
        assert [positions_of(i) for i in ids] == [
            {"a": 0, "b": 1},
            {"a": 1, "b": 1},
            {"a": 2, "b": 1},
        ]
    ids = [(await only_a.next("pub"))["id"] for _ in range(2)]
    assert [positions_of(i) for i in ids] == [{"a": 1}, {"a": 2}]
    # Resumed from a=1 while the others are at a=2: its recovered a2 and the
    # next publication carry its own position.
    late = open_sse(server, f"channel=a&token={token}", {"Last-Event-ID": ids[0]})
    recovered = await late.next("pub")
    assert recovered["pub"]["data"] == "a2" and positions_of(recovered["id"]) == {"a": 2}
    await api.publish("a", "a3")
    for stream, expected in ((late, {"a": 3}), (only_a, {"a": 3}), (both, {"a": 3, "b": 1})):
        pub = await stream.next("pub")
        assert pub["pub"]["data"] == "a3"
        assert positions_of(pub["id"]) == expected
    for stream in (both, only_a, twin, late):
        await stop(stream)


def open_stalled_sse(server: Running, channel: str) -> socket.socket:
    """An SSE client that reads the first event and then never again."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", server.port))
    token = server.token("stalled")
    sock.sendall(
        (
            f"GET /connection/sse?channel={channel}&token={token} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{server.port}\r\n\r\n"
        ).encode()
    )
    got = b""
    while b'"push":"subscribe"' not in got:
        got += sock.recv(4096)
    return sock


async def test_sse_slow_reader_is_disconnected_others_keep_receiving(
    make_server: ServerFactory,
) -> None:
    server = await make_server({"limits": {"send_queue_bytes": 65536}})
    api = server.api()
    fast = open_sse(server, f"channel=firehose&token={server.token('fast')}")
    await fast.next("subscribe")
    stalled = await asyncio.to_thread(open_stalled_sse, server, "firehose")
    try:
        await wait_for(lambda: server.node.hub.subscribers("firehose") == 2)
        session = next(s for s in server.node.sessions.values() if s.user == "stalled")
        payload = "x" * 4000
        sent = 0
        # Bounded: 20 MB of publications is far past any socket buffer.
        while not session.closed and sent < 5000:
            await api.publish("firehose", {"n": sent, "pad": payload})
            sent += 1
            pub = await fast.next("pub")
            assert pub["pub"]["offset"] == sent
        assert session.closed, "the stalled client was never disconnected"
        assert server.node.metrics.disconnects.get(3008) == 1
        await wait_for(lambda: session.client_id not in server.node.sessions)
        await api.publish("firehose", {"after": True})
        assert (await fast.next("pub"))["pub"]["data"] == {"after": True}
    finally:
        stalled.close()
        await stop(fast)


async def test_sse_keepalive_comments(make_server: ServerFactory) -> None:
    server = await make_server({"limits": {"ping_interval": 0.2, "ping_timeout": 0.2}})
    stream = open_sse(server, f"channel=news&token={server.token('alice')}")
    await stream.next("subscribe")
    await wait_for(lambda: stream.body.count(b": ping\n\n") >= 2, timeout=5)
    await stop(stream)


async def test_sse_over_http_1_0_is_not_chunked(server: Running) -> None:
    token = server.token("alice")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(f"GET /connection/sse?channel=news&token={token} HTTP/1.0\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert b" 200 " in head.split(b"\r\n", 1)[0]
        assert b"chunked" not in head.lower()
        body = b""
        while b'"push":"subscribe"' not in body:
            body += await asyncio.wait_for(reader.read(4096), 5)
        await server.api().publish("news", {"n": 1})
        while b'"push":"pub"' not in body:
            body += await asyncio.wait_for(reader.read(4096), 5)
        assert body.startswith(b"retry: 1000\n\n")
        event = body[body.rindex(b"id: ") :]
        assert event.split(b"\n", 1)[1].startswith(b'data: {"push":"pub"')
    finally:
        writer.close()
        await writer.wait_closed()
    await wait_for(lambda: not server.node.sessions)
