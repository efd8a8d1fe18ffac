"""Operations endpoints: /health, /ready, /status (with ETag), /metrics."""

from __future__ import annotations

import orjson
import tornado.httpclient

from tests.conftest import Running, ServerFactory


async def fetch(server: Running, path: str, **kwargs: object) -> tornado.httpclient.HTTPResponse:
    client = tornado.httpclient.AsyncHTTPClient()
    return await client.fetch(f"{server.http_url}{path}", raise_error=False, **kwargs)


async def test_health_and_ready(server: Running) -> None:
    assert orjson.loads((await fetch(server, "/health")).body) == {"status": "ok"}
    ready = await fetch(server, "/ready")
    assert ready.code == 200
    server.node.draining = True
    ready = await fetch(server, "/ready")
    assert ready.code == 503
    assert orjson.loads(ready.body) == {"ready": False, "reason": "draining"}
    assert (await fetch(server, "/health")).code == 200


async def test_status_snapshot_and_etag(server: Running) -> None:
    raw = await server.connected()
    await raw.call("subscribe", {"channel": "news"})
    await server.api().publish("news", 1)
    await raw.push("pub")
    first = await fetch(server, "/status")
    assert first.code == 200
    body = orjson.loads(first.body)
    assert body["node"] == server.node.node_id
    assert body["connections"] == 1
    assert body["subscriptions"] == 1
    assert body["channels"] == 1
    assert body["totals"]["publications_in"] == 1
    assert body["totals"]["deliveries"] == 1
    assert body["broker"] == {"name": "memory", "healthy": True}
    assert body["store"] == {"name": "sqlite", "healthy": True}
    assert "publications_in" in body["rates"]
    etag = first.headers["Etag"]
    again = await fetch(server, "/status", headers={"If-None-Match": etag})
    assert again.code == 304
    assert again.body == b""


async def test_metrics(server: Running) -> None:
    raw = await server.connected()
    await raw.call("subscribe", {"channel": "news"})
    await raw.call("fly")
    text = (await fetch(server, "/metrics")).body.decode()
    assert "squall_connections 1.0" in text
    assert "squall_subscriptions 1.0" in text
    assert 'squall_commands_total{method="subscribe"} 1.0' in text
    assert 'squall_commands_total{method="other"} 1.0' in text
    assert 'squall_command_errors_total{code="104"} 1.0' in text


async def test_recover_off_in_namespace(make_server: ServerFactory) -> None:
    server = await make_server({"namespaces": {"live": {"recover": False}}})
    first = await server.api().publish("live:x", 1)
    await server.api().publish("live:x", 2)
    raw = await server.connected()
    reply = await raw.call(
        "subscribe", {"channel": "live:x", "recover": True, "offset": 1, "epoch": first["epoch"]}
    )
    result = reply["result"]
    assert result["recoverable"] is False
    assert result["recovered"] is False
    assert "publications" not in result


async def test_index_page(server: Running) -> None:
    page = await fetch(server, "/")
    assert page.code == 200
    assert server.node.version in page.body.decode()
    assert "/connection/websocket" in page.body.decode()
