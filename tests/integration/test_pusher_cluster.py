"""The Pusher protocol across a cluster, with the real libraries (issue 15,
item 6): two Squall nodes on Redis with the same Pusher app, behind a real
HAProxy (``conf/haproxy.cfg``, as operators deploy it), pusher-js clients
connecting through it and Pusher's Python server SDK (PyPI ``pusher``)
calling the HTTP API through it or at one node.

The scenario (``presence_cluster`` in ``tests/js/pusher_sdk.mjs``) checks what
the clients see: presence members and member_added/member_removed from the
other node, a client event from one node's client to the other's, events
triggered at any node reaching everyone. Here: that the clients were spread
over both nodes (each session looked up in the nodes' own session tables),
and that the app's webhook receiver got each event once for the cluster,
not once per node, every request accepted by the SDK's ``validate_webhook``.
"""

from __future__ import annotations

import asyncio
import csv
import io
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pusher
import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.testing
import tornado.web

from tests.conftest import Running, ServerFactory, wait_for
from tests.integration.test_pusher_protocol import open_pusher
from tests.integration.test_pusher_webhooks import Receiver, receiving
from tests.integration.test_sdk_pusher_js import (
    APP_ID,
    APP_KEY,
    APP_SECRET,
    RUN_TIMEOUT,
    SCRIPT,
    PusherSdkRun,
    named,
    node_and_sdk,
    sdk_trigger,
    server_sdk,
)
from tests.services import HAProxy

CHANNEL = "presence-cluster"
USERS = ["alice", "bob", "carol"]


@dataclass
class Cluster:
    nodes: list[Running]
    haproxy: HAProxy
    hooks: Receiver

    def node_of(self, socket_id: str) -> int | None:
        """The index of the node where the Pusher connection lives."""
        found = [i for i, run in enumerate(self.nodes) if socket_id in run.node.sessions]
        assert len(found) <= 1, (socket_id, found)
        return found[0] if found else None


@pytest.fixture
async def hooks() -> AsyncIterator[Receiver]:
    """The app's webhook receiver (it outlives the nodes: set up first)."""
    async with receiving() as receiver:
        yield receiver


@pytest.fixture
async def cluster(
    hooks: Receiver, make_server: ServerFactory, redis_server: Any, prefix: str
) -> AsyncIterator[Cluster]:
    node_and_sdk()  # Node and pusher-js, before anything starts
    config = {
        "broker": {"url": redis_server.url, "prefix": prefix},
        "pusher": {
            "apps": [
                {
                    "id": APP_ID,
                    "key": APP_KEY,
                    "secret": APP_SECRET,
                    "enable_client_messages": True,
                    "webhooks": [{"url": hooks.url()}],
                }
            ],
            "webhook_batch_delay": 0.01,
            "webhook_retry_delay": 0.05,
        },
    }
    nodes = [await make_server(config) for _ in range(2)]
    haproxy = HAProxy([run.port for run in nodes], check_interval_ms=200)
    # Its start waits for its port: off the loop, which serves the health checks.
    await asyncio.to_thread(haproxy.start)
    try:
        await all_up(haproxy, len(nodes))
        yield Cluster(nodes, haproxy, hooks)
    finally:
        await asyncio.to_thread(haproxy.stop)


async def all_up(haproxy: HAProxy, count: int, timeout: float = 10.0) -> None:
    """Wait until HAProxy has every node in rotation (its stats page), so
    that leastconn spreads the clients over all of them."""
    client = tornado.httpclient.AsyncHTTPClient()
    deadline = time.monotonic() + timeout
    while True:
        response = await client.fetch(f"http://127.0.0.1:{haproxy.stats_port}/;csv")
        rows = csv.DictReader(io.StringIO(response.body.decode().lstrip("# ")))
        status = {r["svname"]: r["status"] for r in rows if r["pxname"] == "squall_nodes"}
        up = [name for name, state in status.items() if name.startswith("squall") and state == "UP"]
        if len(up) == count:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"HAProxy does not have every node up: {status}")
        await asyncio.sleep(0.05)


class ClusterRun(PusherSdkRun):
    """The scenario's requests answered for a cluster: where each socket
    lives, and the server SDK through HAProxy or at one node."""

    def __init__(self, cluster: Cluster, name: str, argv: list[str], env: dict[str, str]):
        super().__init__(cluster.nodes[0], name, argv, env)
        self.cluster = cluster

    def port(self, via: object) -> int:
        if via == "balancer":
            return self.cluster.haproxy.port
        assert isinstance(via, int), via
        return self.cluster.nodes[via].port

    async def perform(self, request: dict[str, Any]) -> Any:
        op = request["op"]
        if op == "nodes_of":
            return {
                label: self.cluster.node_of(sid) for label, sid in request["socket_ids"].items()
            }
        if op == "trigger":
            port = self.port(request["via"])
            channel, event, data = request["channel"], request["event"], request["data"]
            return await asyncio.to_thread(sdk_trigger, port, channel, event, data)
        if op == "channel_info":
            return await asyncio.to_thread(self.channel_info, request["channel"])
        return await super().perform(request)

    def channel_info(self, channel: str) -> dict[str, Any]:
        with server_sdk(self.cluster.haproxy.port) as sdk:
            info = sdk.channel_info(channel, ["user_count", "subscription_count"])
            users = sdk.users_info(channel)
        return {"info": info, "users": sorted(u["id"] for u in users["users"])}


async def barrier(cluster: Cluster) -> None:
    """Wait until every webhook event each node raised so far has reached
    the receiver: a node sends its events in order, one request at a time,
    so once the channel_occupied of a channel opened on that node (straight,
    not through HAProxy) has arrived, everything it raised before has."""
    clients = []
    for i, run in enumerate(cluster.nodes):
        ws = await open_pusher(run)
        clients.append(ws)
        await ws.subscribe(f"barrier-{i}")
    expected = {f"barrier-{i}" for i in range(len(cluster.nodes))}

    def arrived() -> bool:
        occupied = {e["channel"] for e in cluster.hooks.events() if e["name"] == "channel_occupied"}
        return expected <= occupied

    await wait_for(arrived, 10, "the barrier channels' channel_occupied from every node")
    for ws in clients:
        ws.close()


async def test_presence_client_events_and_webhooks_across_two_nodes_behind_haproxy(
    cluster: Cluster,
) -> None:
    node = node_and_sdk()
    env = {
        "HOST": "127.0.0.1",
        "PORT": str(cluster.haproxy.port),
        "KEY": APP_KEY,
        "SECRET": APP_SECRET,
        "SCENARIO": "presence_cluster",
    }
    run = ClusterRun(cluster, "pusher-js scenario 'presence_cluster'", [node, str(SCRIPT)], env)
    events = await run.run(RUN_TIMEOUT)

    # The clients were spread over both nodes (each looked up in the nodes'
    # session tables while it was connected).
    [spread] = named(events, "nodes")
    nodes = spread["nodes"]
    assert nodes["alice"] != nodes["bob"], nodes
    assert set(nodes.values()) == {0, 1}, nodes
    socket_ids: dict[str, str] = spread["socket_ids"]

    # What the clients saw, at the level a user would notice.
    ch = CHANNEL
    [bob_view] = [e["data"] for e in named(events, f"bob.{ch}.pusher:subscription_succeeded")]
    assert sorted(bob_view["members"]) == ["alice", "bob"]
    added = [e["data"]["id"] for e in named(events, f"alice.{ch}.pusher:member_added")]
    removed = [e["data"]["id"] for e in named(events, f"alice.{ch}.pusher:member_removed")]
    assert (added, removed) == (["bob", "carol"], ["carol", "bob"])
    assert [e["data"] for e in named(events, f"bob.{ch}.client-wave")] == [{"from": "alice"}]
    assert named(events, f"alice.{ch}.client-wave") == []
    for user in USERS:
        announces = [e["data"]["via"] for e in named(events, f"{user}.{ch}.announce")]
        assert announces[0] == "balancer" and sorted(announces[1:]) == sorted(set(nodes.values()))

    # Every connection is gone from both nodes; then every webhook event
    # the nodes raised has arrived (the barrier), and each came once.
    for i, running in enumerate(cluster.nodes):
        await wait_for(lambda r=running: not r.node.sessions, 10, f"node {i}'s sessions to end")
    await wait_for(
        lambda: any(
            e == {"name": "channel_vacated", "channel": ch} for e in cluster.hooks.events()
        ),
        10,
        f"channel_vacated for {ch}",
    )
    await barrier(cluster)
    got = [e for e in cluster.hooks.events() if e.get("channel") == ch]
    occupied = [e for e in got if e["name"] == "channel_occupied"]
    vacated = [e for e in got if e["name"] == "channel_vacated"]
    assert len(occupied) == 1 and len(vacated) == 1, got
    assert got[0] == occupied[0] and got[-1] == vacated[0], got
    members_added = sorted(e["user_id"] for e in got if e["name"] == "member_added")
    members_removed = sorted(e["user_id"] for e in got if e["name"] == "member_removed")
    assert members_added == USERS, got
    assert members_removed == USERS, got
    client_events = [e for e in got if e["name"] == "client_event"]
    assert client_events == [
        {
            "name": "client_event",
            "channel": ch,
            "event": "client-wave",
            "data": '{"from":"alice"}',
            "socket_id": socket_ids["alice"],
            "user_id": "alice",
        }
    ], got
    assert len(got) == 1 + 3 + 1 + 3 + 1, got

    # Every request is signed as Pusher signs them.
    sdk = pusher.Pusher(app_id=APP_ID, key=APP_KEY, secret=APP_SECRET)
    assert cluster.hooks.bodies
    for body, headers in zip(cluster.hooks.bodies, cluster.hooks.headers, strict=True):
        assert headers["X-Pusher-Key"] == APP_KEY
        assert sdk.validate_webhook(headers["X-Pusher-Key"], headers["X-Pusher-Signature"], body)
