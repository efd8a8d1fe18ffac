"""The Python client: subscribe, reconnect on reconnect codes, recover, stop on others."""

from __future__ import annotations

import pytest

from server import errors
from server.client import Client, ConnectionClosed, ReplyError
from tests.conftest import Running, ServerFactory, wait_for


async def test_subscribe_and_receive(server: Running) -> None:
    client = await server.client("alice")
    sub = await client.subscribe("news")
    for i in range(5):
        await server.api().publish("news", {"n": i})
    got = [(await sub.get()).data["n"] for _ in range(5)]
    assert got == [0, 1, 2, 3, 4]


async def test_reconnects_and_recovers_without_gap_or_duplicate(server: Running) -> None:
    client = await server.client("alice", min_backoff=0.05)
    sub = await client.subscribe("news")
    channel = server.node.channels.resolve("news")
    for i in range(3):
        await server.node.publish(channel, b"%d" % i)
    for _ in range(3):
        await sub.get()
    for round_ in range(3):
        # Drop the connection the way a slow or failing client is dropped,
        # then publish before the client can come back.
        for session in list(server.node.sessions.values()):
            session.disconnect(errors.SLOW, flush=False)
        for _ in range(4):
            await server.node.publish(channel, b"0")
        await wait_for(
            lambda n=round_: client.connects == n + 2 and server.node.hub.subscribers("news") == 1
        )
    for _ in range(5):
        await server.node.publish(channel, b"0")
    top = (await server.api().history("news", limit=0))["offset"]
    offsets = [p.offset for p in [await sub.get() for _ in range(top - 3)]]
    assert offsets == list(range(4, top + 1))
    assert client.connects == 4
    assert sub.gaps == 0


async def test_does_not_reconnect_after_forced_disconnect(server: Running) -> None:
    client = await server.client("alice")
    sub = await client.subscribe("news")
    await server.api().call("disconnect", {"user": "alice"})
    with pytest.raises(ConnectionClosed):
        await sub.get()
    assert client.close_code == 3503
    assert client.connects == 1


async def test_bad_token_raises(server: Running) -> None:
    client = Client(server.ws_url, token="nope")
    with pytest.raises(ReplyError) as info:
        await client.connect()
    assert info.value.code == 101


async def test_get_token_is_called_on_every_connect(make_server: ServerFactory) -> None:
    server = await make_server()
    calls = []

    async def get_token() -> str:
        calls.append(1)
        return server.token("alice")

    client = Client(server.ws_url, get_token=get_token, min_backoff=0.01)
    await client.connect()
    await client.subscribe("news")
    await server.api().call("disconnect", {"user": "alice", "reconnect": True})
    await wait_for(lambda: client.connects == 2)
    assert client.close_code == 3011
    assert len(calls) == 2
    await client.close()


async def test_api_client_reports_a_proxy_error_page_as_api_error() -> None:
    """Behind HAProxy with no node up, the answer is HAProxy's HTML 503 page:
    the API client raises ``ApiError`` with that status, not a JSON error."""
    import tornado.httpserver
    import tornado.testing
    import tornado.web

    from server.client import ApiClient, ApiError

    class Page(tornado.web.RequestHandler):
        def post(self, method: str) -> None:
            if method == "list":
                self.write(b"[1, 2]")  # JSON, but not an answer
                return
            self.set_status(503)
            self.write(b"<html><body><h1>503 Service Unavailable</h1></body></html>")

    sock, port = tornado.testing.bind_unused_port()
    http = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/api/(\w+)", Page)]))
    http.add_sockets([sock])
    try:
        api = ApiClient(f"http://127.0.0.1:{port}", "key", timeout=5)
        with pytest.raises(ApiError) as caught:
            await api.call("publish", {"channel": "news", "data": {}})
        assert caught.value.status == 503
        assert "503 Service Unavailable" in caught.value.message
        with pytest.raises(ApiError) as caught:
            await api.call("list")
        assert caught.value.status == 200
        assert "not a JSON object" in caught.value.message
    finally:
        http.stop()
