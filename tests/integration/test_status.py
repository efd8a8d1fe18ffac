"""Operations endpoints: /health, /ready, /status (with ETag), /metrics."""

from __future__ import annotations

import asyncio
import time
from typing import Any

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


async def test_loop_lag_tasks_and_queues_are_exposed(server: Running) -> None:
    """What a soak test watches: loop lag (a blocked loop shows), the number
    of asyncio tasks, and what the sessions hold for their clients."""
    raw = await server.connected()
    await raw.call("subscribe", {"channel": "news"})
    time.sleep(0.3)  # noqa: ASYNC251 - the loop blocked on purpose: its lag probe fires late
    status: dict[str, Any] = {}

    async def lag_seen() -> bool:
        status.update(orjson.loads((await fetch(server, "/status")).body))
        # (The probe's timer was due within 100 ms of the block's start.)
        return status["loop_lag"]["max_ms"] >= 190

    for _ in range(50):
        if await lag_seen():
            break
        await asyncio.sleep(0.05)
    assert status["loop_lag"]["max_ms"] >= 190, status["loop_lag"]
    assert status["loop_lag"]["p50_ms"] <= status["loop_lag"]["max_ms"]
    text = (await fetch(server, "/metrics")).body.decode()
    assert 'squall_event_loop_lag_seconds_bucket{le="0.25"}' in text
    assert 'squall_event_loop_lag_seconds_bucket{le="+Inf"}' in text
    values = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    top = values["squall_event_loop_lag_max_seconds"]
    assert top >= 0.19
    assert values["squall_asyncio_tasks"] >= 2  # at least the metrics' own probes
    assert values["squall_send_queue_bytes"] == 0  # nothing waits for an idle client
    assert values["squall_send_queue_messages_max"] == 0
