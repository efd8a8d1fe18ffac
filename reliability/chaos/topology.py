"""The system under test, all on 127.0.0.1, every process started and stopped
by its PID:

    subscribers, publishers ──► HAProxy ──► Toxiproxy ──► squall serve ×3
                                        (proxy per node)     │
                                   ┌─────────────────────────┤ (asks the sentinels
                                   ▼                         ▼  where the master is)
                 Toxiproxy redis_a / redis_b         3 Redis sentinels
                                   │
                    Redis master ◄─┴─► Redis replica         FerretDB (durable log)

Redis sits behind ``RedisBackend``: ``SentinelRedis`` (the default: a master,
a replica and three sentinels; "kill the Redis master" is a failover, and a
fault on a server's link hits the nodes, the replication and the sentinels
alike) or ``SingleRedis`` (``--redis single``: one server, each node behind
its own proxy ``redis_n<i>``, so a node alone can be cut from Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from server.auth import mint_token
from server.config import AuthSettings
from tests.services import (
    CACHE,
    FerretDB,
    HAProxy,
    OpenSearchNode,
    RedisServer,
    SquallProcess,
    free_port,
    haproxy_binary,
    redis_server_binary,
)

from .toxiproxy import TOXIPROXY_VERSION, Toxiproxy, ToxiproxyServer, toxiproxy_binary

SECRET = "chaos-secret-0123456789abcdef-0123456789abcdef"  # noqa: S105 (loopback test)
API_KEY = "chaos-api-key-0123456789abcdef"
DURABLE_NS = "chaosd"  # persist = true: the log on the shared FerretDB
VOLATILE_NS = "chaosv"  # history in Redis only

# Redis persistence: "aof-always" (every write fsynced before its reply: a
# kill -9 loses nothing), "aof-everysec" (the default of most deployments:
# up to a second of writes may go), "none" (every restart is a new epoch).
REDIS_PERSISTENCE = {
    "aof-always": ("--appendonly", "yes", "--appendfsync", "always"),
    "aof-everysec": ("--appendonly", "yes", "--appendfsync", "everysec"),
    "none": (),
}
# Seconds a healing Redis kill waits for the sentinels to promote the replica.
NO_FAILOVER_AFTER = 30.0


def squall_config(volatile_history: int, search_url: str = "") -> str:
    """The namespaces of the campaign (see reliability/chaos/README.md); with
    ``search_url``, the durable one is searchable on that OpenSearch node."""
    search = (
        f'[search]\nurl = "{search_url}"\nengine = "opensearch"\nindex = "chaos"\n'
        "timeout = 5.0\ninterval = 0.2\n"
        if search_url
        else ""
    )
    return (
        search + f"[namespaces.{DURABLE_NS}]\n"
        "allow_publish = true\n"
        "persist = true\n"
        f"searchable = {'true' if search_url else 'false'}\n"
        "history_size = 100\n"
        "history_ttl = 3600\n"
        f"[namespaces.{VOLATILE_NS}]\n"
        "allow_publish = true\n"
        f"history_size = {volatile_history}\n"
        "history_ttl = 3600\n"
    )


def missing_services() -> list[tuple[str, str]]:
    """(what, how to get it) for every program the campaign needs and lacks."""
    missing = []
    if redis_server_binary() is None:
        missing.append(("redis-server", "apt-get install redis-server"))
    if haproxy_binary() is None:
        missing.append(("haproxy", "apt-get install haproxy"))
    if not (CACHE / "squall-ferretdb").exists():
        missing.append(("FerretDB", "bash scripts/build-test-services.sh"))
    if not (CACHE / "opensearch-classpath.txt").exists():
        missing.append(("OpenSearch 2.19 (Java, Maven)", "bash scripts/build-test-services.sh"))
    if not toxiproxy_binary().exists():
        missing.append((f"Toxiproxy {TOXIPROXY_VERSION}", "bash scripts/build-toxiproxy.sh"))
    return missing


class RedisBackend(Protocol):
    """The broker's Redis, as the campaign sees it."""

    # True: each node reaches Redis through its own proxy (``redis_n<i>``);
    # False: each server has one proxy (``links``) everyone goes through.
    per_node_links: bool

    def links(self) -> dict[str, tuple[int, str]]:
        """Proxies to create before ``start``: name -> (listen port, upstream)."""
        ...

    def link_of(self, role: str) -> str:
        """The proxy in front of the current ``master`` or ``replica``."""
        ...

    def node_env(self) -> dict[str, str]:
        """Broker settings of every node for this Redis."""
        ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def upstream(self) -> str:
        """host:port the per-node Toxiproxy proxies forward to."""
        ...

    def broker_url(self, proxy_port: int) -> str:
        """SQUALL_BROKER_URL of a node whose Redis link goes through ``proxy_port``."""
        ...

    def kill_master(self) -> None:
        """SIGKILL the master (fault start)."""
        ...

    def heal_master(self) -> None:
        """Bring Redis back (fault end): restart on the same port and data, or,
        with Sentinel, let the old master rejoin as a replica."""
        ...


class SingleRedis:
    """One redis-server; ``kill_master`` is kill -9, ``heal_master`` starts it
    again on the same port and directory (its AOF, if any, is replayed).
    Each node reaches it through its own proxy (``redis_n<i>``)."""

    per_node_links = True

    def links(self) -> dict[str, tuple[int, str]]:
        return {}

    def link_of(self, role: str) -> str:
        raise LookupError("one Redis: its links are the nodes' (redis_n<i>)")

    def node_env(self) -> dict[str, str]:
        return {}

    def __init__(self, persistence: str = "aof-always") -> None:
        if persistence not in REDIS_PERSISTENCE:
            raise ValueError(f"redis persistence: one of {sorted(REDIS_PERSISTENCE)}")
        self.persistence = persistence
        self.server = RedisServer(*REDIS_PERSISTENCE[persistence])

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def upstream(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def broker_url(self, proxy_port: int) -> str:
        return f"redis://127.0.0.1:{proxy_port}/0"

    def kill_master(self) -> None:
        proc = self.server.proc
        if proc is not None:
            proc.kill()
            proc.wait(timeout=10)
            self.server.proc = None

    def heal_master(self) -> None:
        if self.server.proc is None:
            self.server.start(port=self.server.port)


class SentinelRedis:
    """A Sentinel-managed master and replica (``RedisSentinelSet`` of
    tests/services.py) with three sentinels, each server behind its own
    Toxiproxy proxy (``redis_a``, ``redis_b``) that it announces: the
    sentinels, replication and every node reach it through the proxy, so a
    fault on a server's link is seen by all of them, as a real network fault
    on that server would be (a partition of the master's link ends in a
    failover). Nodes ask the sentinels (reached directly) where the master
    is. ``kill_master`` is kill -9 of the current master; ``heal_master``
    waits for the sentinels to promote the replica, then starts the old
    master again as a replica of the new one. When no failover comes (the
    sentinels found no replica fit to promote), it starts the killed master
    again where it was, with its data, as an operator would. Both servers
    persist as ``persistence`` says; their logs and the sentinels' stay in
    ``log_dir``."""

    per_node_links = False

    def __init__(self, persistence: str = "aof-always", log_dir: Path | None = None) -> None:
        from tests.services import RedisSentinelSet

        if persistence not in REDIS_PERSISTENCE:
            raise ValueError(f"redis persistence: one of {sorted(REDIS_PERSISTENCE)}")
        self._ports = {name: (free_port(), free_port()) for name in ("redis_a", "redis_b")}
        self.set = RedisSentinelSet(fronts=dict(self._ports.values()))
        self.log_dir = log_dir
        for name, server in zip(("redis_a", "redis_b"), (self.set.master, self.set.replica),
                                strict=True):  # fmt: skip
            server.extra = (*server.extra, *REDIS_PERSISTENCE[persistence])
            if log_dir is not None:
                log_dir.mkdir(parents=True, exist_ok=True)
                server.extra = (*server.extra, "--logfile", str(log_dir / f"{name}.log"))
        self._killed_port: int | None = None
        self.restarted_in_place = 0  # kills no failover followed

    def links(self) -> dict[str, tuple[int, str]]:
        """Proxies to create before ``start``: name -> (listen port, upstream)."""
        return {name: (front, f"127.0.0.1:{real}") for name, (real, front) in self._ports.items()}

    def link_of(self, role: str) -> str:
        """The proxy in front of the current ``master`` or ``replica``."""
        self.set.sync_roles()
        server = self.set.master if role == "master" else self.set.replica
        for name, (real, _) in self._ports.items():
            if real == server.port:
                return name
        raise LookupError(f"no proxy in front of the {role}")

    def node_env(self) -> dict[str, str]:
        # Replication is asynchronous: a publish the master acknowledged and
        # did not yet pass on is lost when the replica takes over, and an old
        # master cut off from the sentinels takes writes until it is demoted
        # (docs/operations.md, Redis Sentinel). An operator who promises
        # that nothing is lost silently waits for the replica: a publish it
        # did not confirm answers 503 "may still be delivered, or lost".
        return {"SQUALL_BROKER_MIN_REPLICAS_ACK": "1",
                "SQUALL_BROKER_REPLICAS_ACK_TIMEOUT_MS": "250"}  # fmt: skip

    def start(self) -> None:
        self.set.start()

    def stop(self) -> None:
        if self.log_dir is not None:
            for log in self.set.dir.glob("sentinel-*.log"):
                with contextlib.suppress(OSError):
                    shutil.copy(log, self.log_dir / log.name)
        self.set.stop()

    def upstream(self) -> str:
        return f"127.0.0.1:{self.set.sentinel_ports[0]}"

    def broker_url(self, proxy_port: int) -> str:
        return self.set.url

    def kill_master(self) -> None:
        self.set.sync_roles()
        self._killed_port = self.set.kill_master()

    def heal_master(self) -> None:
        if self._killed_port is None:
            return
        port = self._killed_port
        killed = self.set.master if self.set.master.port == port else self.set.replica
        try:
            new_port = self.set.wait_for_new_master(port, NO_FAILOVER_AFTER)
        except TimeoutError:
            # The master is down and the sentinels promote nobody: Redis is
            # unavailable until it is back. Start it again as it was; should
            # the sentinels have promoted the replica after all, they demote
            # it on its return.
            self.set.as_master(killed)
            killed.start(port=port)
            self.restarted_in_place += 1
            self._killed_port = None
            return
        old = self.set.replica  # the killed one, after the swap
        self.set.replica_of(old, new_port)
        old.start(port=self._killed_port)
        self._killed_port = None


REDIS_BACKENDS = ("single", "sentinel")


@dataclass
class Node:
    index: int
    process: SquallProcess
    port: int  # its own port (fixed across restarts)
    redis_proxy: str  # Toxiproxy proxy names of its two links
    front_proxy: str
    redis_proxy_port: int = 0
    front_proxy_port: int = 0
    paused: bool = False

    @property
    def name(self) -> str:
        return f"node{self.index}"

    @property
    def pid(self) -> int | None:
        return self.process.proc.pid if self.process.proc is not None else None


@dataclass
class Topology:
    """Start with ``await topology.start()``, stop with ``await topology.stop()``."""

    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="squall-chaos-")))
    node_count: int = 3
    redis_persistence: str = "aof-always"
    redis_kind: str = "sentinel"  # or "single"
    volatile_history: int = 16
    redis: RedisBackend | None = None
    ferret: FerretDB | None = None
    # An OpenSearch node behind the Toxiproxy proxy "search" (None: no search).
    search: bool = True
    opensearch: OpenSearchNode | None = None
    search_paused: bool = False
    toxiproxy_server: ToxiproxyServer | None = None
    toxiproxy: Toxiproxy | None = None
    nodes: list[Node] = field(default_factory=list)
    haproxy: HAProxy | None = None

    @property
    def ws_url(self) -> str:
        assert self.haproxy is not None
        return f"ws://127.0.0.1:{self.haproxy.port}/connection/websocket"

    @property
    def api_url(self) -> str:
        assert self.haproxy is not None
        return f"http://127.0.0.1:{self.haproxy.port}"

    def token(self, user: str, ttl: int = 24 * 3600) -> str:
        return mint_token(AuthSettings(token_secret=SECRET), sub=user, ttl=ttl)

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.redis is None:
            if self.redis_kind == "sentinel":
                self.redis = SentinelRedis(self.redis_persistence, self.workdir / "redis")
            else:
                self.redis = SingleRedis(self.redis_persistence)
        self.toxiproxy_server = ToxiproxyServer()
        await asyncio.to_thread(self.toxiproxy_server.start)
        self.toxiproxy = Toxiproxy(self.toxiproxy_server.url)
        for link, (listen, upstream) in self.redis.links().items():
            await self.toxiproxy.create_proxy(link, listen=f"127.0.0.1:{listen}",
                                              upstream=upstream)  # fmt: skip
        search_url = ""
        opensearch_started = None
        if self.search:
            # A JVM takes a while: it starts while the rest does.
            self.opensearch = OpenSearchNode()
            opensearch_started = asyncio.ensure_future(asyncio.to_thread(self.opensearch.start))
        try:
            await asyncio.to_thread(self.redis.start)
            self.ferret = FerretDB()
            await asyncio.to_thread(self.ferret.start)
        finally:
            if opensearch_started is not None:
                await opensearch_started
        if self.opensearch is not None:
            search_port = free_port()
            await self.toxiproxy.create_proxy(
                "search",
                listen=f"127.0.0.1:{search_port}",
                upstream=f"127.0.0.1:{self.opensearch.port}",
            )
            search_url = f"http://127.0.0.1:{search_port}"
        config = self.workdir / "squall.toml"
        config.write_text(squall_config(self.volatile_history, search_url))
        for i in range(self.node_count):
            name = f"node{i}"
            node_port, redis_proxy_port, front_proxy_port = free_port(), free_port(), free_port()
            if self.redis.per_node_links:
                await self.toxiproxy.create_proxy(
                    f"redis_n{i}",
                    listen=f"127.0.0.1:{redis_proxy_port}",
                    upstream=self.redis.upstream(),
                )
            await self.toxiproxy.create_proxy(
                f"front_n{i}",
                listen=f"127.0.0.1:{front_proxy_port}",
                upstream=f"127.0.0.1:{node_port}",
            )
            env = {
                "SQUALL_BROKER_URL": self.redis.broker_url(redis_proxy_port),
                **self.redis.node_env(),
                "SQUALL_STORE_URL": self.ferret.url + "squall_chaos",
                "SQUALL_API_KEY": API_KEY,
                "SQUALL_TOKEN_SECRET": SECRET,
                "SQUALL_SERVER_NODE_NAME": name,
                "SQUALL_SERVER_DRAIN_DELAY": "0.5",
                "SQUALL_SERVER_DRAIN_GRACE": "3",
                "SQUALL_BROKER_PRESENCE_TTL": "5",
                "SQUALL_BROKER_NODE_REPORT_INTERVAL": "1",
                "SQUALL_BROKER_POSITION_CHECK_INTERVAL": "2",
                "SQUALL_LOG_LEVEL": os.environ.get("CHAOS_SQUALL_LOG_LEVEL", "warning"),
            }
            process = SquallProcess(self.workdir / name, env, "--config", str(config))
            node = Node(i, process, node_port, f"redis_n{i}", f"front_n{i}",
                        redis_proxy_port, front_proxy_port)  # fmt: skip
            self.nodes.append(node)
            await asyncio.to_thread(process.start, node_port)
        self.haproxy = HAProxy([n.front_proxy_port for n in self.nodes], check_interval_ms=500)
        await asyncio.to_thread(self.haproxy.start)

    async def stop(self) -> None:
        """Stop everything we started, by PID; a paused node is continued first."""
        if self.haproxy is not None:
            await asyncio.to_thread(self.haproxy.stop)
        for node in self.nodes:
            self.resume_node(node)
            await asyncio.to_thread(node.process.stop)
        if self.toxiproxy_server is not None:
            await asyncio.to_thread(self.toxiproxy_server.stop)
        if self.ferret is not None:
            await asyncio.to_thread(self.ferret.stop)
        if self.opensearch is not None:
            self.resume_search()
            await asyncio.to_thread(self.opensearch.stop)
        if self.redis is not None:
            await asyncio.to_thread(self.redis.stop)

    # ---- process faults -------------------------------------------------

    async def kill_node(self, node: Node) -> None:
        self.resume_node(node)
        await asyncio.to_thread(node.process.kill)

    async def restart_node(self, node: Node) -> None:
        proc = node.process.proc
        if proc is not None and proc.poll() is not None:
            node.process.proc = None  # it exited by itself (at startup)
        if node.process.proc is None:
            await asyncio.to_thread(node.process.start, node.port)

    def pause_node(self, node: Node) -> None:
        pid = node.pid
        if pid is not None and not node.paused:
            os.kill(pid, signal.SIGSTOP)
            node.paused = True

    def resume_node(self, node: Node) -> None:
        pid = node.pid
        if pid is not None and node.paused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        node.paused = False

    async def kill_redis(self) -> None:
        assert self.redis is not None
        await asyncio.to_thread(self.redis.kill_master)

    async def heal_redis(self) -> None:
        assert self.redis is not None
        await asyncio.to_thread(self.redis.heal_master)

    async def kill_store(self) -> None:
        assert self.ferret is not None
        await asyncio.to_thread(self.ferret.kill)

    async def heal_store(self) -> None:
        assert self.ferret is not None
        if self.ferret.proc is None:
            await asyncio.to_thread(self.ferret.start)

    def pause_search(self) -> None:
        """SIGSTOP the OpenSearch JVM: it hangs, as an overloaded node does."""
        proc = self.opensearch.proc if self.opensearch is not None else None
        if proc is not None and not self.search_paused:
            os.kill(proc.pid, signal.SIGSTOP)
            self.search_paused = True

    def resume_search(self) -> None:
        proc = self.opensearch.proc if self.opensearch is not None else None
        if proc is not None and self.search_paused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
        self.search_paused = False

    def alive(self) -> dict[str, bool]:
        """Which of our processes are running (for the report)."""
        out = {n.name: n.process.proc is not None and n.process.proc.poll() is None
               for n in self.nodes}  # fmt: skip
        return out
