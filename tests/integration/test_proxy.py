"""Proxy hooks against a real HTTP back end started in the test: a small
Tornado app that records each hook request and answers as the test says.

What an application with cookie sessions sees: its connect hook gets the
cookie and names the user; the subscribe and publish hooks allow, refuse or
rewrite; the refresh hook keeps a session going. What a client sees when the
back end is slow or broken: a temporary error and a close that asks it to
come back later, never a hang and never an accepted connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.testing
import tornado.web
import tornado.websocket

from tests.conftest import RawWS, Running, ServerFactory, wait_for
from tests.integration.test_sse import open_sse, stop

# What the back end does for one request: a JSON-able answer, or an Answer.
Reply = Callable[[dict[str, Any]], Any]


@dataclass
class Answer:
    """A raw answer: a status and a body, or (``hang``) none until the test ends."""

    status: int = 200
    body: bytes = b""
    hang: bool = False


@dataclass
class Backend:
    port: int
    # hook -> how to answer; hook -> the requests seen (body, headers).
    answers: dict[str, Reply] = field(default_factory=dict)
    seen: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    request_headers: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, hook: str) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/{hook}"

    def calls(self, hook: str) -> list[dict[str, Any]]:
        return self.seen.get(hook, [])


class HookHandler(tornado.web.RequestHandler):
    def initialize(self, backend: Backend) -> None:
        self.backend = backend

    async def post(self, hook: str) -> None:
        backend = self.backend
        body = orjson.loads(self.request.body)
        backend.seen.setdefault(hook, []).append(body)
        backend.request_headers.setdefault(hook, []).append(dict(self.request.headers))
        reply = backend.answers.get(hook, allow)(body)
        if isinstance(reply, Answer):
            if reply.hang:
                await backend.released.wait()
                return
            self.set_status(reply.status)
            self.finish(reply.body)
            return
        self.set_header("Content-Type", "application/json")
        self.finish(orjson.dumps(reply))


def allow(_: dict[str, Any]) -> Any:
    return {"result": {}}


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    sock, port = tornado.testing.bind_unused_port()
    backend = Backend(port)
    app = tornado.web.Application([(r"/hooks/(\w+)", HookHandler, {"backend": backend})])
    http = tornado.httpserver.HTTPServer(app)
    http.add_sockets([sock])
    yield backend
    backend.released.set()
    http.stop()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(http.close_all_connections(), 5)


def hooked(backend: Backend, **proxy: Any) -> dict[str, Any]:
    """Config: the connect hook on, namespaces for the other hooks."""
    return {
        "proxy": {"connect_url": backend.url("connect"), "forward_headers": ["Cookie"], **proxy},
        "namespaces": {
            "news": {},
            "room": {"proxy_subscribe_url": backend.url("subscribe")},
            "chat": {"proxy_publish_url": backend.url("publish")},
        },
    }


def user(name: str, **extra: Any) -> Reply:
    return lambda _: {"result": {"user": name, **extra}}


async def connect(server: Running, cookie: str = "sid=s3cret", **params: Any) -> RawWS:
    raw = await server.raw(headers={"Cookie": cookie, "X-Other": "not forwarded"})
    reply = await raw.call("connect", params)
    assert "result" in reply, reply
    return raw


async def metrics(server: Running) -> str:
    client = tornado.httpclient.AsyncHTTPClient()
    return (await client.fetch(f"{server.http_url}/metrics")).body.decode()


# ---- connect ------------------------------------------------------------------


async def test_connect_forwards_the_cookie_and_the_answer_names_the_user(
    make_server: ServerFactory, backend: Backend
) -> None:
    server = await make_server(hooked(backend))
    expire_at = int(time.time()) + 3600
    backend.answers["connect"] = user(
        "u42", info={"name": "Ann"}, channels=["news:u42"], expire_at=expire_at
    )
    raw = await server.raw(headers={"Cookie": "sid=s3cret", "X-Other": "not forwarded"})
    reply = await raw.call("connect", {"data": {"app": "web"}})
    result = reply["result"]
    assert result["expires"] is True and 3000 < result["ttl"] <= 3600
    # The server-side subscription from the answer's channels.
    sub = await raw.push("subscribe")
    assert sub["channel"] == "news:u42"
    [request] = backend.calls("connect")
    assert request == {
        "client": result["client"],
        "transport": "websocket",
        "protocol": "squall",
        "encoding": "json",
        "remote_addr": "127.0.0.1",
        "data": {"app": "web"},
        "headers": {"Cookie": "sid=s3cret"},
    }
    assert backend.request_headers["connect"][0]["Content-Type"] == "application/json"
    session = server.node.sessions[result["client"]]
    assert (session.user, session.info.info, session.exp) == ("u42", {"name": "Ann"}, expire_at)
    # Only the allowed header is kept for the connection.
    assert session.meta is not None and session.meta.headers == {"Cookie": "sid=s3cret"}
    # The subscription is live.
    await server.api().publish("news:u42", {"n": 1})
    assert (await raw.push("pub"))["pub"]["data"] == {"n": 1}


async def test_a_token_skips_the_connect_hook_unless_configured(
    make_server: ServerFactory, backend: Backend
) -> None:
    server = await make_server(hooked(backend))
    await server.connected("alice")
    assert backend.calls("connect") == []

    both = await make_server(hooked(backend, connect_with_token=True))
    backend.answers["connect"] = user("alice-from-app")
    raw = await both.raw()
    reply = await raw.call("connect", {"token": both.token("alice")})
    assert backend.calls("connect")[0]["user"] == "alice"  # the token's user, for the app
    assert both.node.sessions[reply["result"]["client"]].user == "alice-from-app"
    # A bad token is refused before the hook is asked.
    bad = await both.raw()
    refused = await bad.call("connect", {"token": "not-a-token"})
    assert refused["error"]["code"] == 101
    assert len(backend.calls("connect")) == 1


async def test_connect_refused_with_the_back_ends_error(
    make_server: ServerFactory, backend: Backend
) -> None:
    server = await make_server(hooked(backend))
    backend.answers["connect"] = lambda _: {"error": {"code": 1001, "message": "log in first"}}
    raw = await server.raw(headers={"Cookie": "sid=expired"})
    reply = await raw.call("connect")
    assert reply["error"] == {"code": 1001, "message": "log in first"}
    # Not connected: commands still need a connect.
    assert (await raw.call("subscribe", {"channel": "news:1"}))["error"]["code"] == 113


async def test_connect_answered_with_a_disconnect_closes_with_its_code(
    make_server: ServerFactory, backend: Backend
) -> None:
    server = await make_server(hooked(backend))
    backend.answers["connect"] = lambda _: {"disconnect": {"code": 4501, "reason": "banned"}}
    raw = await server.raw()
    raw.send({"id": 1, "method": "connect", "params": {}})
    assert await raw.closed() == (4501, "banned")
    await wait_for(lambda: not server.node.sessions, message="the session to go")


async def test_a_slow_back_end_is_a_temporary_error_not_a_hang(
    make_server: ServerFactory, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    server = await make_server(hooked(backend, timeout=0.3))
    backend.answers["connect"] = lambda _: Answer(hang=True)
    raw = await server.raw(headers={"Cookie": "sid=s3cret"})
    with caplog.at_level(logging.WARNING, logger="squall.proxy"):
        reply = await raw.call("connect")
        assert reply["error"]["code"] == 114
        assert "try again later" in reply["error"]["message"]
        # ... and the connection closes with "try again later": reconnect.
        assert await raw.closed() == (1013, "try again later")
    [line] = [r.getMessage() for r in caplog.records if r.name == "squall.proxy"]
    assert "connect hook" in line and "proxy.timeout" in line
    assert "s3cret" not in line
    assert not any(s.user or s.state.name == "CONNECTED" for s in server.node.sessions.values())
    text = await metrics(server)
    assert 'squall_proxy_requests_total{hook="connect",result="failed"} 1.0' in text
    assert 'squall_proxy_failures_total{hook="connect",reason="timeout"} 1.0' in text


@pytest.mark.parametrize(
    ("answer", "reason", "logged"),
    [
        (Answer(status=500, body=b"boom"), "status", "HTTP 500"),
        (Answer(body=b"<html>not json</html>"), "response", "not JSON"),
        ({"result": {"user": 42}}, "response", "'result.user' must be a string"),
        ({"allow": True}, "response", "exactly one of"),
    ],
)
async def test_a_broken_back_end_refuses_with_a_clear_temporary_error(
    make_server: ServerFactory,
    backend: Backend,
    caplog: pytest.LogCaptureFixture,
    answer: Any,
    reason: str,
    logged: str,
) -> None:
    server = await make_server(hooked(backend))
    backend.answers["connect"] = lambda _: answer
    raw = await server.raw(headers={"Cookie": "sid=s3cret"})
    with caplog.at_level(logging.WARNING, logger="squall.proxy"):
        reply = await raw.call("connect")
        assert reply["error"] == {
            "code": 114,
            "message": "the application's connect check is unavailable; try again later",
        }
        assert (await raw.closed())[0] == 1013
    [line] = [r.getMessage() for r in caplog.records if r.name == "squall.proxy"]
    assert logged in line and "s3cret" not in line
    text = await metrics(server)
    assert f'squall_proxy_failures_total{{hook="connect",reason="{reason}"}} 1.0' in text


async def test_an_unreachable_back_end_is_a_temporary_error(
    make_server: ServerFactory, backend: Backend
) -> None:
    sock, port = tornado.testing.bind_unused_port()
    sock.close()  # nothing listens there now
    server = await make_server(
        {"proxy": {"connect_url": f"http://127.0.0.1:{port}/connect"}},
    )
    raw = await server.raw()
    assert (await raw.call("connect"))["error"]["code"] == 114
    assert (await raw.closed())[0] == 1013
    text = await metrics(server)
    assert 'squall_proxy_failures_total{hook="connect",reason="connection"} 1.0' in text


# ---- subscribe ------------------------------------------------------------------


async def test_the_subscribe_hook_allows_refuses_or_disconnects(
    make_server: ServerFactory, backend: Backend
) -> None:
    server = await make_server(hooked(backend))
    backend.answers["connect"] = user("u1")
    raw = await connect(server)
    backend.answers["subscribe"] = lambda body: (
        {"result": {}}
        if body["channel"] == "room:open"
        else {"error": {"code": 103, "message": "not a member"}}
    )
    reply = await raw.call("subscribe", {"channel": "room:open", "data": {"invite": "x"}})
    assert "epoch" in reply["result"]
    request = backend.calls("subscribe")[0]
    assert request["channel"] == "room:open" and request["user"] == "u1"
    assert request["data"] == {"invite": "x"}
    assert request["headers"] == {"Cookie": "sid=s3cret"}
    refused = await raw.call("subscribe", {"channel": "room:closed"})
    assert refused["error"] == {"code": 103, "message": "not a member"}
    # Namespaces without the hook are not asked.
    assert "result" in await raw.call("subscribe", {"channel": "news:1"})
    assert len(backend.calls("subscribe")) == 2
    # Publications reach the allowed subscription only.
    await server.api().publish("room:open", {"n": 1})
    assert (await raw.push("pub"))["channel"] == "room:open"

    backend.answers["subscribe"] = lambda _: {"disconnect": {"code": 4000, "reason": "go away"}}
    raw.send({"id": 99, "method": "subscribe", "params": {"channel": "room:other"}})
    assert await raw.closed() == (4000, "go away")


async def test_a_failing_subscribe_hook_is_a_temporary_error(
    make_server: ServerFactory, backend: Backend
) -> None:
    server = await make_server(hooked(backend))
    backend.answers["connect"] = user("u1")
    raw = await connect(server)
    backend.answers["subscribe"] = lambda _: Answer(status=502)
    reply = await raw.call("subscribe", {"channel": "room:a"})
    assert reply["error"]["code"] == 114
    # The connection stays; nothing was subscribed.
    assert "room:a" not in next(iter(server.node.sessions.values())).subs
    assert (await raw.call("ping"))["result"] == {}


# ---- publish --------------------------------------------------------------------


async def test_the_publish_hook_allows_refuses_or_replaces_the_data(
    make_server: ServerFactory, backend: Backend
) -> None:
    server = await make_server(hooked(backend))
    backend.answers["connect"] = user("u1")
    subscriber = await server.connected("bob")
    assert "result" in await subscriber.call("subscribe", {"channel": "chat:1"})
    publisher = await connect(server)

    def moderate(body: dict[str, Any]) -> dict[str, Any]:
        text = body["data"]["text"]
        if text == "spam":
            return {"error": {"code": 1002, "message": "no spam"}}
        if text == "shout":
            return {"result": {"data": {"text": "SHOUT", "by": body["user"]}}}
        return {"result": {}}

    backend.answers["publish"] = moderate
    # chat has allow_publish = false: the hook decides instead.
    assert "result" in await publisher.call(
        "publish", {"channel": "chat:1", "data": {"text": "hi"}}
    )
    assert (await subscriber.push("pub"))["pub"]["data"] == {"text": "hi"}
    refused = await publisher.call("publish", {"channel": "chat:1", "data": {"text": "spam"}})
    assert refused["error"] == {"code": 1002, "message": "no spam"}
    assert "result" in await publisher.call(
        "publish", {"channel": "chat:1", "data": {"text": "shout"}}
    )
    assert (await subscriber.push("pub"))["pub"]["data"] == {"text": "SHOUT", "by": "u1"}
    request = backend.calls("publish")[0]
    assert (request["channel"], request["user"], request["data"]) == (
        "chat:1",
        "u1",
        {"text": "hi"},
    )
    # Namespaces without the hook keep their own rule (news: no client publishing).
    no = await publisher.call("publish", {"channel": "news:1", "data": {}})
    assert no["error"]["code"] == 103
    assert len(backend.calls("publish")) == 3


# ---- refresh --------------------------------------------------------------------


async def test_the_refresh_hook_extends_a_session_the_client_refreshes(
    make_server: ServerFactory, backend: Backend
) -> None:
    server = await make_server(hooked(backend, refresh_url=backend.url("refresh")))
    backend.answers["connect"] = user("u1", expire_at=int(time.time()) + 600)
    raw = await connect(server)
    # The server renews this session itself: the client is not asked to.
    session = next(iter(server.node.sessions.values()))
    assert session.exp > time.time()
    later = int(time.time()) + 7200
    backend.answers["refresh"] = lambda _: {"result": {"expire_at": later}}
    reply = await raw.call("refresh", {})
    assert reply["result"]["expires"] is True and reply["result"]["ttl"] > 3600
    assert session.exp == later
    request = backend.calls("refresh")[0]
    assert request["user"] == "u1" and request["headers"] == {"Cookie": "sid=s3cret"}


async def test_the_server_calls_the_refresh_hook_when_the_session_expires(
    make_server: ServerFactory, backend: Backend
) -> None:
    server = await make_server(hooked(backend, refresh_url=backend.url("refresh")))
    # Expires in a moment; the client never sends refresh.
    backend.answers["connect"] = user("u1", expire_at=int(time.time()) + 2)
    raw = await server.raw(headers={"Cookie": "sid=s3cret"})
    result = (await raw.call("connect"))["result"]
    assert result["expires"] is False and "ttl" not in result
    later = int(time.time()) + 3600
    backend.answers["refresh"] = lambda _: {"result": {"expire_at": later}}
    session = server.node.sessions[result["client"]]
    await wait_for(lambda: session.exp == later, message="the refresh hook to extend the session")
    assert (await raw.call("ping"))["result"] == {}
    assert len(backend.calls("refresh")) == 1


async def test_a_session_the_back_end_ends_closes_as_expired(
    make_server: ServerFactory, backend: Backend
) -> None:
    server = await make_server(hooked(backend, refresh_url=backend.url("refresh")))
    backend.answers["connect"] = user("u1", expire_at=int(time.time()) + 2)
    backend.answers["refresh"] = lambda _: {"result": {"expired": True}}
    raw = await connect(server)
    assert await raw.closed(timeout=10) == (3005, "token expired")


# ---- the Centrifugo protocol ----------------------------------------------------


async def test_connect_through_the_hook_on_the_centrifugo_endpoint(
    make_server: ServerFactory, backend: Backend
) -> None:
    server = await make_server(hooked(backend))
    backend.answers["connect"] = user("u7", info={"name": "Cy"}, channels=["news:7"])
    request = tornado.httpclient.HTTPRequest(
        f"ws://127.0.0.1:{server.port}/connection/centrifuge/websocket",
        headers={"Cookie": "sid=c3ntr1fuge"},
    )
    ws = await tornado.websocket.websocket_connect(request)
    try:
        ws.write_message(orjson.dumps({"id": 1, "connect": {"data": {"v": 2}}}).decode())
        frame = await asyncio.wait_for(ws.read_message(), 5)
        assert isinstance(frame, str)
        reply = orjson.loads(frame.split("\n")[0])
        connect_result = reply["connect"]
        assert "news:7" in connect_result["subs"]
        [call] = backend.calls("connect")
        assert call["client"] == connect_result["client"]
        assert (call["protocol"], call["encoding"], call["transport"]) == (
            "centrifuge",
            "json",
            "websocket",
        )
        assert call["data"] == {"v": 2}
        assert call["headers"] == {"Cookie": "sid=c3ntr1fuge"}
        assert server.node.sessions[connect_result["client"]].user == "u7"
    finally:
        ws.close()

    # A failing hook: Centrifugo's temporary error, which its SDKs retry.
    backend.answers["connect"] = lambda _: Answer(status=503)
    ws = await tornado.websocket.websocket_connect(request)
    try:
        ws.write_message(orjson.dumps({"id": 1, "connect": {}}).decode())
        frame = await asyncio.wait_for(ws.read_message(), 5)
        assert isinstance(frame, str)
        error = orjson.loads(frame)["error"]
        assert error["code"] == 100 and error["temporary"] is True
    finally:
        ws.close()


# ---- metrics ----------------------------------------------------------------------


async def test_metrics_count_calls_outcomes_and_durations(
    make_server: ServerFactory, backend: Backend
) -> None:
    server = await make_server(hooked(backend))
    backend.answers["connect"] = user("u1")
    await connect(server)
    await connect(server)
    backend.answers["connect"] = lambda _: {"error": {"code": 1001, "message": "no"}}
    raw = await server.raw()
    assert "error" in await raw.call("connect")
    text = await metrics(server)
    assert 'squall_proxy_requests_total{hook="connect",result="ok"} 2.0' in text
    assert 'squall_proxy_requests_total{hook="connect",result="error"} 1.0' in text
    assert 'squall_proxy_request_duration_seconds_count{hook="connect"} 3.0' in text
    assert 'squall_proxy_request_duration_seconds_bucket{hook="connect",le="+Inf"} 3.0' in text


async def test_no_hooks_no_headers_kept(make_server: ServerFactory) -> None:
    server = await make_server()
    raw = await server.raw(headers={"Cookie": "sid=1"})
    assert "result" in await raw.call("connect", {"token": server.token("alice")})
    assert server.node.proxy is None
    assert all(s.meta is None for s in server.node.sessions.values())
    assert "squall_proxy" not in await metrics(server)


async def test_sse_connects_through_the_hook_with_its_cookie(
    make_server: ServerFactory, backend: Backend
) -> None:
    """An EventSource has no token: its cookie goes to the connect hook, and
    a refusal is the stream's HTTP error."""
    server = await make_server(hooked(backend))
    backend.answers["connect"] = user("u42")
    stream = open_sse(server, "channel=news:x", {"Cookie": "sid=s3cret"})
    connect = await stream.next("connect")
    assert connect["client"]
    await stream.next("subscribe")
    (request,) = backend.calls("connect")
    assert request["transport"] == "sse" and request["headers"] == {"Cookie": "sid=s3cret"}
    session = next(iter(server.node.sessions.values()))
    assert session.user == "u42"
    await stop(stream)
    backend.answers["connect"] = lambda _: {"error": {"code": 101, "message": "log in first"}}
    refused = open_sse(server, "channel=news:x", {"Cookie": "sid=expired"})
    assert refused.task is not None
    await asyncio.wait_for(refused.task, 5)
    assert refused.status == 403
    assert orjson.loads(refused.body)["error"]["message"] == "log in first"
    await wait_for(lambda: not server.node.sessions)


async def test_pusher_clients_connect_through_the_hook(
    make_server: ServerFactory, backend: Backend
) -> None:
    """The Pusher endpoint: the connect hook sees the page's cookie and names
    the user; a refusal closes the socket with a code the SDKs do not retry."""
    app = {"id": "1234", "key": "app-key", "secret": "app-secret-0123456789"}
    server = await make_server({**hooked(backend), "pusher": {"apps": [app]}})
    backend.answers["connect"] = user("u42")
    url = f"ws://127.0.0.1:{server.port}/app/app-key?protocol=7"
    request = tornado.httpclient.HTTPRequest(url, headers={"Cookie": "sid=s3cret"})
    conn = await tornado.websocket.websocket_connect(request)
    try:
        established = orjson.loads(await asyncio.wait_for(conn.read_message(), 5))
        assert established["event"] == "pusher:connection_established"
        (call,) = backend.calls("connect")
        assert call["protocol"] == "pusher" and call["headers"] == {"Cookie": "sid=s3cret"}
        await wait_for(lambda: [s.user for s in server.node.sessions.values()] == ["u42"])
    finally:
        conn.close()
    backend.answers["connect"] = lambda _: {"error": {"code": 101, "message": "log in first"}}
    refused = await tornado.websocket.websocket_connect(url)
    try:
        while await asyncio.wait_for(refused.read_message(), 5) is not None:
            pass
        assert refused.close_code is not None and 4000 <= refused.close_code < 4100
    finally:
        refused.close()
