"""Shared fixtures: a real Squall node on an unused port, clients for it."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.testing
import tornado.websocket

from server.app import http_server, make_app
from server.auth import mint_token
from server.client import ApiClient, Client
from server.config import Settings, load_settings
from server.node import Node

SECRET = "test-secret-0123456789abcdef-0123456789"
API_KEY = "test-api-key-0123456789abcdef"

# Settings for tests: the defaults, with known secrets and no env leaking in.
BASE_CONFIG: dict[str, Any] = {
    "auth": {"token_secret": SECRET, "api_key": API_KEY},
}


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


async def wait_for(
    predicate: Callable[[], bool], timeout: float = 5.0, message: str = "condition"
) -> None:
    """Wait until ``predicate()`` holds, polling the loop; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        await asyncio.sleep(0.01)


class RawWS:
    """A bare protocol connection: JSON in, JSON out, nothing automatic."""

    def __init__(self, conn: tornado.websocket.WebSocketClientConnection) -> None:
        self.conn = conn
        self.inbox: list[dict[str, Any]] = []
        self.pushes: list[dict[str, Any]] = []
        self.next_id = 0
        self.frames = 0

    def send(self, obj: Any) -> None:
        data = obj if isinstance(obj, (str, bytes)) else orjson.dumps(obj).decode()
        self.conn.write_message(data)

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next message, whatever it is."""
        while not self.inbox:
            frame = await asyncio.wait_for(self.conn.read_message(), timeout)
            if frame is None:
                raise ConnectionError(f"closed: {self.conn.close_code} {self.conn.close_reason}")
            self.frames += 1
            if isinstance(frame, str):
                frame = frame.encode()
            self.inbox.extend(orjson.loads(line) for line in frame.split(b"\n") if line)
        return self.inbox.pop(0)

    async def call(
        self, method: str, params: dict[str, Any] | None = None, timeout: float = 5.0
    ) -> dict[str, Any]:
        """Send a command and return its reply (``result`` or ``error``);
        pushes that arrive first are kept in ``pushes``."""
        self.next_id += 1
        cmd_id = self.next_id
        self.send({"id": cmd_id, "method": method, "params": params or {}})
        return await self.reply(cmd_id, timeout)

    async def reply(self, cmd_id: int, timeout: float = 5.0) -> dict[str, Any]:
        while True:
            msg = await self.recv(timeout)
            if msg.get("id") == cmd_id:
                return msg
            self.pushes.append(msg)

    async def push(self, kind: str = "pub", timeout: float = 5.0) -> dict[str, Any]:
        """The next push of ``kind`` (earlier ones of other kinds stay in ``pushes``)."""
        for i, msg in enumerate(self.pushes):
            if msg.get("push") == kind:
                return self.pushes.pop(i)
        while True:
            msg = await self.recv(timeout)
            if msg.get("push") == kind:
                return msg
            self.pushes.append(msg)

    async def closed(self, timeout: float = 5.0) -> tuple[int | None, str | None]:
        """Read until the server closes; return its close code and reason."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("connection did not close")
            frame = await asyncio.wait_for(self.conn.read_message(), remaining)
            if frame is None:
                return self.conn.close_code, self.conn.close_reason
            if isinstance(frame, str):
                frame = frame.encode()
            self.inbox.extend(orjson.loads(line) for line in frame.split(b"\n") if line)

    def close(self) -> None:
        self.conn.close()


@dataclass
class Running:
    node: Node
    port: int
    settings: Settings
    http: tornado.httpserver.HTTPServer
    _clients: list[Any] = field(default_factory=list)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/connection/websocket"

    def token(self, sub: str = "alice", **kwargs: Any) -> str:
        return mint_token(self.settings.auth, sub=sub, **kwargs)

    def api(self) -> ApiClient:
        return ApiClient(self.http_url, self.settings.auth.api_key)

    async def raw(self, *, headers: dict[str, str] | None = None) -> RawWS:
        request = tornado.httpclient.HTTPRequest(self.ws_url, headers=headers)
        conn = await tornado.websocket.websocket_connect(request)
        raw = RawWS(conn)
        self._clients.append(raw)
        return raw

    async def connected(self, sub: str = "alice", **token_kwargs: Any) -> RawWS:
        raw = await self.raw()
        reply = await raw.call("connect", {"token": self.token(sub, **token_kwargs)})
        assert "result" in reply, reply
        return raw

    async def client(self, sub: str = "alice", **kwargs: Any) -> Client:
        client = Client(self.ws_url, token=self.token(sub), **kwargs)
        await client.connect()
        self._clients.append(client)
        return client

    async def close_clients(self) -> None:
        for c in self._clients:
            if isinstance(c, Client):
                await c.close()
            else:
                c.close()


ServerFactory = Callable[..., Awaitable[Running]]


@pytest.fixture
async def make_server(tmp_path: Path) -> AsyncIterator[ServerFactory]:
    """Start nodes with extra config tables merged into BASE_CONFIG."""
    running: list[Running] = []

    async def factory(config: dict[str, Any] | None = None, **kwargs: Any) -> Running:
        raw = merge(BASE_CONFIG, config or {})
        raw.setdefault("server", {}).setdefault("data_dir", str(tmp_path / f"data{len(running)}"))
        settings = load_settings(raw=raw, env={})
        node = Node(settings, **kwargs)
        await node.start()
        sock, port = tornado.testing.bind_unused_port()
        http = http_server(node, make_app(node))
        http.add_sockets([sock])
        run = Running(node, port, settings, http)
        running.append(run)
        return run

    yield factory
    for run in running:
        await run.close_clients()
        run.http.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(run.http.close_all_connections(), 5)
        await run.node.close()


@pytest.fixture
async def server(make_server: ServerFactory) -> Running:
    """A node on the default configuration."""
    return await make_server()


def services_required() -> bool:
    return os.environ.get("SQUALL_REQUIRE_SERVICES") == "1"


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Tests run on uvloop, like `squall serve`."""
    import uvloop

    return {"uvloop": uvloop.new_event_loop}


# ---- real services ---------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Any]:
    from tests.services import RedisServer

    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_shards(redis_server: Any) -> Iterator[list[Any]]:
    """Two Redis servers for sharding: the session's one and another."""
    from tests.services import RedisServer

    second = RedisServer().start()
    yield [redis_server, second]
    second.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[Any]:
    from tests.services import RedisCluster

    cluster = RedisCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def ferretdb() -> Iterator[Any]:
    """A MongoDB wire-protocol server (FerretDB on SQLite) for the session;
    each test uses a database of its own (``mongo_url``)."""
    from tests.services import FerretDB

    server = FerretDB().start()
    yield server
    server.stop()


def mongo_url(server: Any) -> str:
    import uuid

    return f"{server.url}t{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def opensearch() -> Iterator[Any]:
    """One OpenSearch 2.19 node for the session; tests use indexes of their own."""
    from tests.services import OpenSearchNode

    node = OpenSearchNode().start()
    yield node
    node.stop()


@pytest.fixture(scope="session")
def elastic_front(opensearch: Any) -> Iterator[Any]:
    """The node behind the HAProxy front the elasticsearch 8 client accepts."""
    from tests.services import ElasticFront

    front = ElasticFront(opensearch.port).start()
    yield front
    front.stop()


@pytest.fixture(scope="session")
def oidc_provider() -> Iterator[Any]:
    """A real OpenID Connect provider (NAV's mock-oauth2-server) for the
    session: tokens from its token endpoint, keys from its JWKS. Tests that
    stop or re-key a provider start one of their own (``tests.services.OIDCProvider``)."""
    from tests.services import OIDCProvider

    provider = OIDCProvider().start()
    yield provider
    provider.stop()


@pytest.fixture
def prefix() -> str:
    """A Redis key prefix of this test's own: tests share Redis servers."""
    import secrets

    return "t" + secrets.token_hex(4)
