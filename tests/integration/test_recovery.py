"""Never miss a publication: recovery from history, and the slow-consumer path."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct

import orjson

from tests.conftest import Running, ServerFactory, wait_for


async def test_recover_exactly_the_missed_publications(server: Running) -> None:
    api = server.api()
    raw = await server.connected()
    sub = (await raw.call("subscribe", {"channel": "news"}))["result"]
    for i in range(3):
        await api.publish("news", {"n": i})
    seen = [(await raw.push("pub"))["pub"]["offset"] for _ in range(3)]
    assert seen == [1, 2, 3]
    raw.close()
    # While the client is away:
    for i in range(3, 10):
        await api.publish("news", {"n": i})
    again = await server.connected()
    reply = await again.call(
        "subscribe",
        {"channel": "news", "recover": True, "offset": 3, "epoch": sub["epoch"]},
    )
    result = reply["result"]
    assert result["recovered"] is True
    assert [p["offset"] for p in result["publications"]] == list(range(4, 11))
    assert [p["data"]["n"] for p in result["publications"]] == list(range(3, 10))
    assert result["offset"] == 10
    await api.publish("news", {"n": 10})
    live = await again.push("pub")
    assert live["pub"]["offset"] == 11


async def test_recovery_past_the_window_says_not_recovered(make_server: ServerFactory) -> None:
    server = await make_server({"namespaces": {"default": {"history_size": 5}}})
    api = server.api()
    first = await api.publish("news", 0)
    for i in range(1, 20):
        await api.publish("news", i)
    raw = await server.connected()
    reply = await raw.call(
        "subscribe", {"channel": "news", "recover": True, "offset": 1, "epoch": first["epoch"]}
    )
    result = reply["result"]
    assert result["recovered"] is False
    assert result["offset"] == 20
    # What is still there is returned, and it is plainly not contiguous.
    assert [p["offset"] for p in result["publications"]] == [16, 17, 18, 19, 20]


async def test_recovery_with_a_changed_epoch_is_not_recovered(server: Running) -> None:
    await server.api().publish("news", 1)
    raw = await server.connected()
    reply = await raw.call(
        "subscribe", {"channel": "news", "recover": True, "offset": 0, "epoch": "gone"}
    )
    assert reply["result"]["recovered"] is False
    assert reply["result"]["publications"] == []


async def test_recovery_after_history_ttl(make_server: ServerFactory) -> None:
    server = await make_server({"namespaces": {"default": {"history_ttl": 0.3}}})
    api = server.api()
    first = await api.publish("news", 1)
    await api.publish("news", 2)
    raw = await server.connected()

    async def recover() -> dict:
        reply = await raw.call(
            "subscribe",
            {"channel": "news", "recover": True, "offset": 1, "epoch": first["epoch"]},
        )
        await raw.call("unsubscribe", {"channel": "news"})
        return reply["result"]

    assert (await recover())["recovered"] is True
    await asyncio.sleep(0.4)  # the TTL itself is what is tested here
    assert (await recover())["recovered"] is False


async def test_no_gap_between_recovery_and_live_under_load(make_server: ServerFactory) -> None:
    """Publications keep flowing while clients subscribe with recovery: each
    client sees every offset after its position exactly once, in order."""
    server = await make_server({"namespaces": {"default": {"history_size": 5000}}})
    api = server.api()
    first = await api.publish("news", 0)
    epoch = first["epoch"]
    stop = asyncio.Event()

    async def publisher() -> None:
        n = 1
        while not stop.is_set() and n < 2000:
            await server.node.publish(server.node.channels.resolve("news"), str(n).encode())
            n += 1
            if n % 10 == 0:
                await asyncio.sleep(0)

    task = asyncio.create_task(publisher())
    raws = []
    for _ in range(5):
        raw = await server.connected()
        reply = await raw.call(
            "subscribe", {"channel": "news", "recover": True, "offset": 1, "epoch": epoch}
        )
        raws.append((raw, reply["result"]))
        await asyncio.sleep(0.01)
    stop.set()
    await task
    top = (await api.history("news", limit=0))["offset"]
    for raw, result in raws:
        assert result["recovered"] is True
        offsets = [p["offset"] for p in result["publications"]]
        while not offsets or offsets[-1] < top:
            offsets.append((await raw.push("pub"))["pub"]["offset"])
        assert offsets == list(range(2, top + 1))


def open_stalled_client(server: Running, channel: str) -> socket.socket:
    """A real WebSocket client that subscribes and then never reads again:
    a blocking socket with a small receive buffer and a hand-made handshake."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", server.port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            "GET /connection/websocket HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{server.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )

    def frame(command: dict) -> bytes:
        payload = orjson.dumps(command)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        if len(payload) < 126:
            return bytes([0x81, 0x80 | len(payload)]) + mask + masked
        return bytes([0x81, 0x80 | 126]) + struct.pack("!H", len(payload)) + mask + masked

    got = b""
    while b"\r\n\r\n" not in got:
        got += sock.recv(4096)
    assert b" 101 " in got.split(b"\r\n", 1)[0]
    token = server.token("stalled")
    sock.sendall(frame({"id": 1, "method": "connect", "params": {"token": token}}))
    sock.sendall(frame({"id": 2, "method": "subscribe", "params": {"channel": channel}}))
    while b'"id":2' not in got:
        got += sock.recv(4096)
    return sock


async def test_slow_consumer_is_disconnected_others_keep_receiving(
    make_server: ServerFactory,
) -> None:
    server = await make_server({"limits": {"send_queue_bytes": 65536}})
    api = server.api()
    fast = await server.connected("fast")
    await fast.call("subscribe", {"channel": "firehose"})
    stalled = await asyncio.to_thread(open_stalled_client, server, "firehose")
    try:
        await wait_for(lambda: server.node.hub.subscribers("firehose") == 2)
        session = next(s for s in server.node.sessions.values() if s.user == "stalled")
        payload = "x" * 4000
        sent = received = 0
        # Bounded: 20 MB of publications is far past any socket buffer.
        while not session.closed and sent < 5000:
            await api.publish("firehose", {"n": sent, "pad": payload})
            sent += 1
            while received < sent:
                push = await fast.push("pub")
                assert push["pub"]["offset"] == received + 1
                received += 1
        assert session.closed, "the stalled client was never disconnected"
        assert server.node.metrics.disconnects.get(3008) == 1
        await wait_for(lambda: session.client_id not in server.node.sessions)
        # The others go on receiving.
        await api.publish("firehose", {"after": True})
        assert (await fast.push("pub"))["pub"]["data"] == {"after": True}
    finally:
        stalled.close()
