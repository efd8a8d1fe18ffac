"""The system under test, all on 127.0.0.1, every process started and stopped
by its PID:

    subscribers, publishers ──► HAProxy ──► Toxiproxy ──► squall serve ×3
                                        (proxy per node)     │
                                                   Toxiproxy (proxy per node)
                                                             │
                                                           Redis        FerretDB
                                                       (the broker)  (durable log)

Redis sits behind ``RedisBackend``: ``SingleRedis`` today; a Sentinel-managed
set (``RedisSentinelSet`` in tests/services.py, being written) can replace it
by implementing the same small interface (``start``, ``stop``, ``upstream``,
``broker_url``, ``kill_master``, ``heal_master``), and the "kill Redis master"
fault then becomes a failover instead of a restart on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
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


def squall_config(volatile_history: int) -> str:
    """The namespaces of the campaign (see reliability/chaos/README.md)."""
    return (
        f"[namespaces.{DURABLE_NS}]\n"
        "allow_publish = true\n"
        "persist = true\n"
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
    if not toxiproxy_binary().exists():
        missing.append((f"Toxiproxy {TOXIPROXY_VERSION}", "bash scripts/build-toxiproxy.sh"))
    return missing


class RedisBackend(Protocol):
    """The broker's Redis, as the campaign sees it."""

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
    again on the same port and directory (its AOF, if any, is replayed)."""

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
    tests/services.py). ``kill_master`` is kill -9 of the current master;
    ``heal_master`` waits for the sentinels to promote the replica, then
    starts the old master again as a replica of the new one.

    Nodes reach Redis through the sentinels, which hand out the servers' real
    addresses: the node→Redis Toxiproxy proxies then carry nothing (link
    faults on them only reach the sentinel connections' upstream, the first
    sentinel, which the nodes do not use through the proxy). Experimental:
    not yet run by the tests."""

    def __init__(self) -> None:
        from tests.services import RedisSentinelSet

        self.set = RedisSentinelSet()
        self._killed_port: int | None = None

    def start(self) -> None:
        self.set.start()

    def stop(self) -> None:
        self.set.stop()
        self.set.master.stop()
        self.set.replica.stop()

    def upstream(self) -> str:
        return f"127.0.0.1:{self.set.sentinel_ports[0]}"

    def broker_url(self, proxy_port: int) -> str:
        return self.set.url

    def kill_master(self) -> None:
        self._killed_port = self.set.kill_master()

    def heal_master(self) -> None:
        if self._killed_port is None:
            return
        new_port = self.set.wait_for_new_master(self._killed_port)
        old = self.set.replica  # the killed one, after the swap
        old.extra = (*old.extra, "--replicaof", "127.0.0.1", str(new_port))
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
    redis_kind: str = "single"  # or "sentinel" (experimental)
    volatile_history: int = 16
    redis: RedisBackend | None = None
    ferret: FerretDB | None = None
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
                self.redis = SentinelRedis()
            else:
                self.redis = SingleRedis(self.redis_persistence)
        await asyncio.to_thread(self.redis.start)
        self.ferret = FerretDB()
        await asyncio.to_thread(self.ferret.start)
        self.toxiproxy_server = ToxiproxyServer()
        await asyncio.to_thread(self.toxiproxy_server.start)
        self.toxiproxy = Toxiproxy(self.toxiproxy_server.url)
        config = self.workdir / "squall.toml"
        config.write_text(squall_config(self.volatile_history))
        for i in range(self.node_count):
            name = f"node{i}"
            node_port, redis_proxy_port, front_proxy_port = free_port(), free_port(), free_port()
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

    def alive(self) -> dict[str, bool]:
        """Which of our processes are running (for the report)."""
        out = {n.name: n.process.proc is not None and n.process.proc.poll() is None
               for n in self.nodes}  # fmt: skip
        return out
