"""Server-Sent Events: subscribe by query, token auth, resume with Last-Event-ID."""

from __future__ import annotations

import asyncio
from typing import Any

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
