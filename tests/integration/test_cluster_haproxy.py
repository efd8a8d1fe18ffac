"""Three `squall serve` processes on one Redis, behind HAProxy: every
publication reaches every subscriber once and in order, and nothing is lost
when a node is killed or drained."""

from __future__ import annotations

import asyncio
import csv
import io
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import tornado.httpclient

from server.auth import mint_token
from server.client import ApiClient, Client, ClientPublication, Subscription
from server.config import AuthSettings
from tests.services import HAProxy, RedisServer, SquallProcess

SECRET = "cluster-secret-0123456789abcdef-0123456789"
API_KEY = "cluster-api-key-0123456789"


@dataclass
class Cluster:
    redis: RedisServer
    nodes: list[SquallProcess]
    haproxy: HAProxy

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.haproxy.port}/connection/websocket"

    def api(self, node: SquallProcess | None = None) -> ApiClient:
        port = node.port if node is not None else self.haproxy.port
        return ApiClient(f"http://127.0.0.1:{port}", API_KEY)

    def token(self, user: str) -> str:
        return mint_token(AuthSettings(token_secret=SECRET), sub=user, ttl=600)

    async def node_ids(self) -> dict[str, SquallProcess]:
        out = {}
        for node in self.nodes:
            if node.proc is not None:
                info = await self.api(node).info()
                mine = [n for n in info["nodes"] if n["pid"] == node.proc.pid]
                out[mine[0]["node"]] = node
        return out

    async def server_status(self) -> dict[str, str]:
        """HAProxy's view: server name -> UP/DOWN."""
        client = tornado.httpclient.AsyncHTTPClient()
        response = await client.fetch(f"http://127.0.0.1:{self.haproxy.stats_port}/;csv")
        rows = csv.DictReader(io.StringIO(response.body.decode().lstrip("# ")))
        return {r["svname"]: r["status"] for r in rows if r["pxname"] == "squall_nodes"}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    redis = RedisServer().start()
    env = {
        "SQUALL_BROKER_URL": redis.url,
        "SQUALL_API_KEY": API_KEY,
        "SQUALL_TOKEN_SECRET": SECRET,
        "SQUALL_SERVER_DRAIN_DELAY": "1.0",
        "SQUALL_SERVER_DRAIN_GRACE": "5",
        "SQUALL_BROKER_PRESENCE_TTL": "2",
        "SQUALL_BROKER_NODE_REPORT_INTERVAL": "0.3",
        "SQUALL_BROKER_POSITION_CHECK_INTERVAL": "1",
        "SQUALL_LOG_LEVEL": "warning",
    }
    config = tmp_path / "squall.toml"
    config.write_text("[namespaces.room]\npresence = true\n")
    nodes = []
    haproxy = None
    try:
        for i in range(3):
            node_env = {**env, "SQUALL_SERVER_NODE_NAME": f"node{i}"}
            nodes.append(
                SquallProcess(tmp_path / f"n{i}", node_env, "--config", str(config)).start()
            )
        haproxy = HAProxy([n.port for n in nodes], check_interval_ms=200).start()
        yield Cluster(redis, nodes, haproxy)
    finally:
        if haproxy is not None:
            haproxy.stop()
        for node in nodes:
            node.stop()
        redis.stop()


async def connect_clients(
    cluster: Cluster, count: int, channel: str
) -> list[tuple[Client, Subscription]]:
    out = []
    for i in range(count):
        client = Client(cluster.ws_url, token=cluster.token(f"user{i}"), min_backoff=0.05,
                        max_backoff=0.5)  # fmt: skip
        await client.connect()
        out.append((client, await client.subscribe(channel)))
    return out


async def drain_subscription(sub: Subscription, count: int) -> list[ClientPublication]:
    return [await sub.get(timeout=20) for _ in range(count)]


@pytest.fixture
async def clients(cluster: Cluster) -> AsyncIterator[list[tuple[Client, Subscription]]]:
    made = await connect_clients(cluster, 12, "news")
    yield made
    for client, _ in made:
        await client.close()


async def test_clients_spread_and_every_publication_arrives_once_in_order(
    cluster: Cluster, clients: list[tuple[Client, Subscription]]
) -> None:
    assert len({client.node for client, _ in clients}) == 3, "leastconn spreads clients"
    total = 2000
    apis = [cluster.api(node) for node in cluster.nodes]
    for i in range(total):
        await apis[i % 3].publish("news", {"n": i})  # through every node in turn
    for _, sub in clients:
        got = await drain_subscription(sub, total)
        assert [p.offset for p in got] == list(range(1, total + 1))
        assert [p.data["n"] for p in got] == list(range(total))


async def publish_steadily(api: ApiClient, stop: asyncio.Event, limit: int) -> int:
    sent = 0
    while not stop.is_set() and sent < limit:
        await api.publish("news", {"n": sent})
        sent += 1
        await asyncio.sleep(0.002)
    return sent


async def pick_victim(
    cluster: Cluster, clients: list[tuple[Client, Subscription]]
) -> tuple[str, SquallProcess, SquallProcess]:
    """The node of the first client, its process, and another live node."""
    ids = await cluster.node_ids()
    victim_id = clients[0][0].node
    assert victim_id is not None
    victim = ids[victim_id]
    survivor = next(n for n in cluster.nodes if n is not victim)
    return victim_id, victim, survivor


async def test_killed_node_clients_reconnect_and_recover_without_gap(
    cluster: Cluster, clients: list[tuple[Client, Subscription]]
) -> None:
    victim_id, victim, survivor = await pick_victim(cluster, clients)
    on_victim = [c for c, _ in clients if c.node == victim_id]
    assert on_victim
    # Someone in a presence channel on the victim, as seen from elsewhere.
    present = Client(f"ws://127.0.0.1:{victim.port}/connection/websocket",
                     token=cluster.token("present"), reconnect=False)  # fmt: skip
    await present.connect()
    await present.subscribe("room:1")

    async def members() -> set[str]:
        result = await cluster.api(survivor).presence("room:1")
        return {m["user"] for m in result["presence"].values()}

    for _ in range(100):
        if await members() == {"present"}:
            break
        await asyncio.sleep(0.02)
    assert await members() == {"present"}
    stop = asyncio.Event()
    publisher = asyncio.create_task(publish_steadily(cluster.api(survivor), stop, 3000))
    await asyncio.sleep(0.3)
    victim.kill()  # SIGKILL: no drain, no goodbye
    for _ in range(200):
        if all(c.connects >= 2 and c.node != victim_id for c in on_victim):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    stop.set()
    sent = await publisher
    for client, sub in clients:
        got = await drain_subscription(sub, sent)
        assert [p.offset for p in got] == list(range(1, sent + 1)), client.node
        assert sub.gaps == 0
    assert all(c.node != victim_id for c in on_victim)
    # Its presence entries expire (presence_ttl is 2 s here) ...
    for _ in range(100):
        if not await members():
            break
        await asyncio.sleep(0.1)
    assert await members() == set()
    await present.close()
    # ... and it drops out of the cluster view.
    for _ in range(100):
        nodes = {n["node"] for n in (await cluster.api(survivor).info())["nodes"]}
        if victim_id not in nodes:
            break
        await asyncio.sleep(0.1)
    assert victim_id not in nodes


async def test_drained_node_leaves_rotation_first_and_its_clients_lose_nothing(
    cluster: Cluster, clients: list[tuple[Client, Subscription]]
) -> None:
    victim_id, victim, survivor = await pick_victim(cluster, clients)
    stop = asyncio.Event()
    publisher = asyncio.create_task(publish_steadily(cluster.api(survivor), stop, 3000))
    await asyncio.sleep(0.2)
    assert victim.proc is not None
    victim.proc.send_signal(signal.SIGTERM)
    # HAProxy takes it out of rotation (its /ready is 503) before it closes
    # its clients (drain_delay 1 s): new clients land elsewhere meanwhile.
    name = f"squall{cluster.nodes.index(victim) + 1}"
    for _ in range(100):
        if (await cluster.server_status()).get(name, "").startswith("DOWN"):
            break
        await asyncio.sleep(0.02)
    assert (await cluster.server_status())[name].startswith("DOWN")
    on_victim = [c for c, _ in clients if c.node == victim_id]
    assert all(c.connects == 1 for c in on_victim), "clients moved before rotation changed"
    late = await connect_clients(cluster, 6, "other")
    assert all(c.node != victim_id for c, _ in late)
    assert victim.proc.wait(timeout=15) == 0
    for _ in range(200):
        if all(c.connects == 2 for c in on_victim):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # keep publishing after the move
    stop.set()
    sent = await publisher
    for _client, sub in clients:
        got = await drain_subscription(sub, sent)
        assert [p.offset for p in got] == list(range(1, sent + 1))
        assert sub.gaps == 0
    moved = [(c.node != victim_id, c.close_code, c.connects) for c in on_victim]
    assert moved == [(True, 3001, 2)] * len(on_victim)
    for client, _ in late:
        await client.close()
