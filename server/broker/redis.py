"""The Redis broker: channel streams, fan-out to every node, presence and the
cluster view in Redis (redis-py asyncio, hiredis, RESP2 on pub/sub).

Topologies, chosen by the URL:

- ``redis://host:port/db``: one Redis.
- ``redis://a:6379,redis://b:6379``: channels are spread over several
  independent Redis servers by a consistent hash of the channel name (jump
  hash), so adding a shard moves only about 1/N of the channels. Control
  messages and the node registry live on the first.
- ``redis+cluster://host:port[,host:port]``: a Redis Cluster (7+), with
  sharded pub/sub (SSUBSCRIBE/SPUBLISH) so a publication travels only inside
  its slot's shard.
- ``redis+sentinel://h1:26379,h2:26379/<master-name>``: a master and its
  replicas watched by Redis Sentinel (also as one shard of a list). Commands
  and pub/sub connect to whichever server the sentinels name master; the
  broker also asks them every ``SENTINEL_POLL`` seconds and, when the master
  changed, drops its connections to the old one, so pub/sub reconnects and
  resyncs as after any reconnect. Streams there carry their last writer
  (see ``redis_lua``): after a failover, a stream the new master did not
  write itself starts a new epoch, so no offset is ever given out twice.

With ``min_replicas_ack``, each publish pipeline ends in ``WAIT``; a publish
fewer replicas confirmed in time fails with ``ReplicasNotAcknowledged``.

Every node, the publishing one included, delivers what it receives from
Redis pub/sub, so all nodes see a channel in offset order. Redis drops a
pub/sub connection that passes its output-buffer limit and redis-py
reconnects silently, so the broker checks that each channel's offsets arrive
without gaps and fills a gap from the channel's history before it delivers
what follows. It also re-reads every channel's position after a reconnect and
every ``position_check_interval`` seconds, so a lost *last* publication is
found too. A gap that history can no longer fill is reported to the node
(``on_unrecoverable``), which tells its subscribers to recover.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import orjson
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    MasterNotFoundError,
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
)
from redis.backoff import ExponentialBackoff

from server.broker import (
    SENTINEL_SCHEME,
    BrokerHandler,
    BrokerUnavailable,
    DurableLog,
    OffsetConflict,
    PresenceEdge,
    ReplicasNotAcknowledged,
    SentinelURL,
    safe_broker_url,
    split_broker_urls,
)
from server.broker import redis_lua as lua
from server.broker.resp import NotSent, run_script_calls
from server.models import ClientInfo, HistoryOptions, HistoryResult, Publication, StreamPosition
from server.tasks import BackgroundTasks

# Connections per Redis server for commands (pub/sub has its own).
POOL_SIZE = 64
# On a cluster: connections per node, and commands in flight at once.
CLUSTER_POOL_SIZE = 1024
# Script calls sent in one pipeline at most.
PIPELINE_MAX = 512
# Tries to seed a durable stream that vanishes again at once (failovers).
SEED_ATTEMPTS = 3
# Seconds between warnings while a periodic step keeps failing.
STILL_FAILING_LOG = 30.0
# A publication Redis has had this long and a node has not seen is lost; a
# younger one may still be on its way over pub/sub (seconds).
IN_FLIGHT_GRACE = 1.0
# Seconds between asking the sentinels who the master is.
SENTINEL_POLL = 0.5

log = logging.getLogger("squall.broker.redis")
T = TypeVar("T")

_REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
# A connection lost after a pipeline was sent: its calls may have run
# (a publish answered with this may have been made).
SENT_MAYBE_RAN = "the connection broke after the commands were sent: they may have run"
DEFAULT_META_TTL = 86400


def jump_hash(key: int, buckets: int) -> int:
    """Lamping & Veach's jump consistent hash: bucket in [0, buckets)."""
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & 0xFFFFFFFFFFFFFFFF
        j = int((b + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return b


def _channel_key(channel: str) -> int:
    return int.from_bytes(hashlib.blake2b(channel.encode(), digest_size=8).digest(), "big")


def _new_epoch() -> str:
    return secrets.token_urlsafe(6)


def encode_tail(data: bytes, info: ClientInfo | None) -> bytes:
    """What follows ``p<offset> <epoch> <time> `` in a pub/sub message."""
    info_bytes = orjson.dumps(info.to_json()) if info is not None else b""
    return b"%d %s%s" % (len(info_bytes), info_bytes, data)


def decode_message(channel: str, message: bytes) -> Publication:
    """Parse ``p<offset> <epoch> <time_ms> <info_len> <info><data>``."""
    head, epoch, time_ms, info_len, rest = message[1:].split(b" ", 4)
    n = int(info_len)
    info = ClientInfo.from_json(orjson.loads(rest[:n])) if n else None
    return Publication(channel, int(head), epoch.decode(), rest[n:], info, int(time_ms))


async def _stop_tasks(tasks: Sequence[asyncio.Task[Any]], timeout: float = 5.0) -> None:
    """Cancel ``tasks`` and wait for them, at most ``timeout`` seconds.

    A cancellation that lands as one of redis-py's own timeouts expires can
    come out as a timeout error, which a loop that survives errors survives
    too (seen once: a worker told to stop was still reconnecting to a Redis
    that had gone, half an hour later). So the loops also check a closing
    flag, and nobody waits for them forever."""
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        log.warning("redis broker: %r did not stop within %.0fs", task, timeout)
    for task in tasks:
        if task.done() and not task.cancelled():
            with contextlib.suppress(Exception):
                task.result()


def _presence_event(info: ClientInfo, edge: bool) -> bytes:
    """A join or leave on the wire; ``edge`` (the user's first connection in,
    or last out) only when false, so older nodes read it unchanged."""
    obj = info.to_json()
    if not edge:
        obj["edge"] = False
    return orjson.dumps(obj)


class _PubSub:
    """One pub/sub connection (RESP2) and the task that reads it."""

    def __init__(
        self,
        broker: RedisBroker,
        url: str,
        label: str,
        *,
        sharded: bool,
        factory: Callable[..., Any] | None = None,
    ) -> None:
        self.broker = broker
        self.url = url
        # Makes the client (keyword arguments: its connection options); by
        # default one for ``url``.
        self.factory = factory
        self.label = label
        self.sharded = sharded
        self.pubsub: Any = None
        self.reader: asyncio.Task[None] | None = None
        self.healthy = False
        self.confirmations: dict[str, asyncio.Future[None]] = {}
        self.closing = False

    async def start(self) -> None:
        timeout = self.broker.timeout
        # No socket timeout (it waits for messages), health checks instead;
        # RESP2, which reads messages twice as fast as RESP3 here.
        options: dict[str, Any] = {
            "socket_connect_timeout": timeout,
            "socket_timeout": None,
            "health_check_interval": 10,
            "protocol": 2,
            "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=2),
        }
        if self.factory is not None:
            client = self.factory(**options)
        else:
            client = aioredis.Redis.from_url(self.url, connection_class=_Connection, **options)
        self.pubsub = client.pubsub()
        # A first subscription opens the connection (a plain channel, allowed
        # on any cluster node). On every reconnect after it, redis-py
        # resubscribes and then calls ``_on_connect``.
        await self.pubsub.subscribe(self.broker.shard_channel)
        self.pubsub.connection.register_connect_callback(self._on_connect)
        self.healthy = True
        self.reader = asyncio.get_running_loop().create_task(self._read_forever())

    async def close(self) -> None:
        self.closing = True
        if self.reader is not None:
            await _stop_tasks([self.reader])
        if self.pubsub is not None:
            with contextlib.suppress(Exception):
                await self.pubsub.aclose()

    async def drop_connection(self) -> None:
        """Close the connection under the reader: it reconnects (to wherever
        the client's pool now points), resubscribes and resyncs."""
        connection = getattr(self.pubsub, "connection", None)
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.disconnect()

    async def _on_connect(self, connection: Any) -> None:
        if not self.healthy:
            log.info("redis %s: pub/sub reconnected", self.label)
        self.healthy = True
        self.broker.spawn(self.broker.resync(self))

    async def subscribe(self, names: Sequence[str]) -> None:
        """Subscribe and wait until Redis confirms every name."""
        loop = asyncio.get_running_loop()
        waiters = []
        for name in names:
            fut = self.confirmations.get(name)
            if fut is None or fut.done():
                fut = self.confirmations[name] = loop.create_future()
            waiters.append(fut)
        if self.sharded:
            await self.pubsub.ssubscribe(*names)
        else:
            await self.pubsub.subscribe(*names)
        await asyncio.wait_for(asyncio.gather(*waiters), self.broker.timeout)

    async def unsubscribe(self, names: Sequence[str]) -> None:
        if self.sharded:
            await self.pubsub.sunsubscribe(*names)
        else:
            await self.pubsub.unsubscribe(*names)

    async def _read_forever(self) -> None:
        delay = 0.05
        while not self.closing:
            try:
                message = await self.pubsub.get_message(
                    ignore_subscribe_messages=False, timeout=1.0
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.healthy:
                    log.warning("redis %s: pub/sub connection lost: %s", self.label, exc)
                self.healthy = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.05
            if message is None:
                continue
            kind = message["type"]
            channel = message["channel"]
            if isinstance(channel, bytes):
                channel = channel.decode()
            if kind in ("message", "smessage"):
                try:
                    self.broker.on_message(channel, message["data"])
                except Exception:
                    log.exception("bad pub/sub message on %s", channel)
            elif kind in ("subscribe", "ssubscribe"):
                fut = self.confirmations.pop(channel, None)
                if fut is not None and not fut.done():
                    fut.set_result(None)


async def _execute(pipe: Any, **kwargs: Any) -> list[Any]:
    """``pipe.execute``, and the pipeline's connection back in its pool
    whatever happens: redis-py keeps it on the pipeline (which then warns
    when collected) if a cancellation lands while it loads the scripts."""
    done = False
    try:
        replies = list(await pipe.execute(**kwargs))
        done = True
        return replies
    finally:
        if pipe.connection is not None:
            with contextlib.suppress(Exception):
                if not done:  # it may hold half a reply: never reuse it
                    await pipe.connection.disconnect()
                await pipe.reset()


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


class _GroupCommit:
    """Calls of one script on one Redis server, sent in pipelines: everything
    asked while one pipeline is out goes in the next. One pipeline is in
    flight at a time, and Redis runs one connection's commands in order, so
    calls run in the order they were made; a burst costs a few round trips
    instead of one per call (and a burst of publications comes back on
    pub/sub together, so subscribers get it in one write). With ``share``,
    calls for the same channel in one pipeline share one answer: it is read
    after every one of them was asked for. A call that fails (a Redis error
    for that script call) fails alone."""

    __slots__ = ("_broker", "_running", "_script", "_shard", "_share", "_waiting")

    def __init__(self, shard: _Shard, script: str, *, share: bool) -> None:
        self._shard = shard
        self._broker = shard.broker
        self._script = script
        self._share = share
        self._waiting: dict[Any, tuple[list[str], list[Any], asyncio.Future[Any]]] = {}
        self._running = False

    def call(self, channel: str, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        key: Any = channel if self._share else object()
        waiting = self._waiting.get(key)
        if waiting is not None:
            return asyncio.shield(waiting[2])
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self._share:
            # Its callers wait through shields; if all of them give up, its
            # error is nobody's to read (and must not be logged as lost).
            fut.add_done_callback(_consume)
        self._waiting[key] = (keys, args, fut)
        if not self._running:
            self._running = True
            self._broker.spawn(self._run())
        return asyncio.shield(fut) if self._share else fut

    async def _run(self) -> None:
        batch: list[tuple[list[str], list[Any], asyncio.Future[Any]]] = []
        try:
            while self._waiting:
                waiting = iter(self._waiting.items())
                taken = [next(waiting) for _ in range(min(PIPELINE_MAX, len(self._waiting)))]
                for key, _ in taken:
                    del self._waiting[key]
                batch = [call for _, call in taken]
                try:
                    replies = await self._send(batch)
                except Exception as exc:
                    # Its callers get the error; the calls after it still go.
                    # (Anything but BrokerUnavailable is unexpected: a
                    # transport closed under us, say. It used to end this
                    # loop and fail every waiting call as "closing".)
                    if not isinstance(exc, BrokerUnavailable):
                        log.warning("redis: %s pipeline failed: %r", self._script, exc)
                        exc = BrokerUnavailable(f"redis: {exc!r}")
                    for _, _, fut in batch:
                        if not fut.done():
                            fut.set_exception(BrokerUnavailable(str(exc)))
                    batch = []
                    continue
                for (_, _, fut), reply in zip(batch, replies, strict=True):
                    if fut.done():
                        continue  # the caller gave up waiting
                    if isinstance(reply, BrokerUnavailable):
                        fut.set_exception(reply)
                    elif isinstance(reply, _REDIS_ERRORS):
                        fut.set_exception(BrokerUnavailable(f"redis: {reply}"))
                    elif isinstance(reply, Exception):
                        fut.set_exception(reply)
                    else:
                        fut.set_result(reply)
                batch = []
        finally:
            self._running = False
            # Cancelled (the broker is closing): nobody is left waiting.
            for _, _, fut in [*batch, *self._waiting.values()]:
                if not fut.done():
                    fut.set_exception(BrokerUnavailable("redis: the broker is closing"))
            self._waiting.clear()

    async def _send(
        self, calls: list[tuple[list[str], list[Any], asyncio.Future[Any]]]
    ) -> list[Any]:
        shard = self._shard
        broker = self._broker
        wait = self._script == "publish" and broker.min_replicas_ack > 0
        # One WAIT for the whole pipeline: it is sent on the same connection,
        # after every write of it.
        tail = ("WAIT", broker.min_replicas_ack, broker.replicas_ack_timeout_ms) if wait else ()
        try:
            replies = await run_script_calls(
                shard.client,
                shard.scripts[self._script],
                [(k, a) for k, a, _ in calls],
                tail,
                shard.late_args,
            )
        except NotSent as exc:
            raise BrokerUnavailable(f"redis: {exc}") from None
        except _REDIS_ERRORS as exc:
            raise BrokerUnavailable(f"redis: {exc} ({SENT_MAYBE_RAN})") from None
        if not wait:
            return replies
        acked = replies.pop()
        if isinstance(acked, Exception) or int(acked) < broker.min_replicas_ack:
            count = 0 if isinstance(acked, Exception) else int(acked)
            failed = 0
            for i, reply in enumerate(replies):
                # Only what was written: an offset conflict wrote nothing.
                if not isinstance(reply, Exception) and reply and int(reply[0]) == 1:
                    replies[i] = ReplicasNotAcknowledged(
                        count, broker.min_replicas_ack, broker.replicas_ack_timeout_ms
                    )
                    failed += 1
            broker.replicas_ack_failures += failed
            if failed:
                log.warning("redis %s: %d publication(s) acknowledged by %d of %d replica(s)",
                            shard.label, failed, count, broker.min_replicas_ack)  # fmt: skip
        return replies


class _WaitingCluster(RedisCluster):
    """redis-py's cluster client fails a command with MaxConnectionsError
    when more are in flight to one node than its pool holds (it has no
    blocking pool). This one makes the excess wait for a free slot: a burst
    of publishes to one channel is slower, not lost."""

    def __init__(self, *, max_connections: int, **kwargs: Any) -> None:
        super().__init__(max_connections=max_connections, **kwargs)
        self._in_flight = asyncio.Semaphore(max_connections)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self._in_flight:
            return await super().execute_command(*args, **kwargs)


class _NewestSentinel(Sentinel):
    """redis-py's Sentinel client, but the master is the one named under the
    highest configuration epoch of all the sentinels that answer, not by the
    first that answers. Right after a failover a sentinel that has not heard
    of it yet still names the old master, which, once a network fault on it
    heals, answers as master until the sentinels demote it: a node that
    believed it would write to a server about to be wiped, and read streams
    that lag the new master's."""

    # The highest configuration epoch any sentinel reported (it never goes
    # back): stream scripts get it, so a stream written under an older
    # configuration counts as stale (see ``redis_lua``).
    config_epoch = 0

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        async def ask(sentinel: Any) -> tuple[int, tuple[str, int]] | None:
            masters = await sentinel.sentinel_masters()
            state = masters.get(service_name)
            if not state or not self.check_master_state(state, service_name):
                return None
            return int(state.get("config-epoch", 0)), (state["ip"], int(state["port"]))

        answers = await asyncio.gather(*(ask(s) for s in self.sentinels), return_exceptions=True)
        named = [a for a in answers if isinstance(a, tuple)]
        if not named:
            errors = [repr(a) for a in answers if isinstance(a, BaseException)]
            raise MasterNotFoundError(
                f"No master found for {service_name!r}"
                + (f": {', '.join(errors)}" if errors else "")
            )
        epoch, address = max(named, key=lambda a: a[0])
        self.config_epoch = max(self.config_epoch, epoch)
        return address


def _closed_under_it(exc: BaseException) -> bool:
    """uvloop's error for a write to a transport that was closed under it
    (a connection that died while it was being set up): a lost connection,
    which redis-py does not recognise as one."""
    return isinstance(exc, RuntimeError) and "handler is closed" in str(exc)


class _LostIsConnectionError:
    """Makes that RuntimeError a ``ConnectionError``, so a command on a
    connection lost that way fails as any other lost connection does
    (``BrokerUnavailable``, 114) instead of as an internal error."""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        try:
            await super().send_packed_command(command, check_health)  # type: ignore[misc]
        except RuntimeError as exc:
            if not _closed_under_it(exc):
                raise
            lost = f"connection lost while writing: {exc}"
            raise redis.exceptions.ConnectionError(lost) from None


class _Connection(_LostIsConnectionError, aioredis.Connection):
    pass


class _SentinelConnection(_LostIsConnectionError, SentinelManagedConnection):
    pass


class _SentinelBlockingPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """redis-py's sentinel pool (connections to whichever server the
    sentinels name master) that waits for a free connection when all are in
    use, like the pool of a plain shard, instead of failing the command.
    A connection to a server that is no longer the master is closed when it
    comes back (redis-py closes only idle ones when the master changes)."""

    async def release(self, connection: Any) -> None:
        address = self.master_address
        if address is not None and (connection.host, connection.port) != tuple(address):
            with contextlib.suppress(Exception):
                await connection.disconnect()
        await super().release(connection)


class _Shard:
    """One Redis server, a master behind Sentinel, or a whole Redis Cluster:
    a command client with the scripts, and the pub/sub connections (one, or
    one per cluster master)."""

    def __init__(self, broker: RedisBroker, url: str, index: int) -> None:
        self.broker = broker
        self.url = url
        self.index = index
        self.cluster = url.startswith("redis+cluster://")
        self.sentinel_url = (
            SentinelURL.parse(url) if url.startswith(SENTINEL_SCHEME + "://") else None
        )
        self.sentinel: Sentinel | None = None
        # The master's address as last learnt from the sentinels.
        self.master: tuple[str, int] | None = None
        self.label = f"shard {index}"
        self.client: Any = None
        self.scripts: dict[str, Any] = {}
        self.pubsubs: dict[str, _PubSub] = {}
        # Group commit of the hot scripts (one server, not a cluster).
        self.publishes = _GroupCommit(self, "publish", share=False)
        self.positions = _GroupCommit(self, "position", share=True)

    @property
    def late_args(self) -> Callable[[], Sequence[Any]] | None:
        """What this shard's scripts take after a call's own arguments:
        behind Sentinel, the configuration epoch. A callable, for
        ``run_script_calls`` to ask once it has a connection: a connection
        to a new master learns its configuration epoch as it connects."""
        sentinel = self.sentinel
        if isinstance(sentinel, _NewestSentinel):
            return lambda: (sentinel.config_epoch,)
        return None

    def script_args(self, args: Sequence[Any]) -> list[Any]:
        """A script call's arguments as this shard's scripts take them."""
        extra = self.late_args
        return [*args, *extra()] if extra is not None else list(args)

    async def start(self) -> None:
        timeout = self.broker.timeout
        kwargs: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "protocol": 2,
        }
        if self.cluster:
            nodes = []
            for part in self.url[len("redis+cluster://") :].split(","):
                host, _, port = part.strip().rstrip("/").rpartition(":")
                nodes.append(ClusterNode(host or "127.0.0.1", int(port or 6379)))
            # No blocking pool for a cluster: a larger one per node instead.
            self.client = _WaitingCluster(
                startup_nodes=nodes, max_connections=CLUSTER_POOL_SIZE, **kwargs
            )
            await self.client.initialize()
            for node in self.client.get_primaries():
                url = f"redis://{node.host}:{node.port}/0"
                self.pubsubs[node.name] = _PubSub(self.broker, url, node.name, sharded=True)
        elif self.sentinel_url is not None:
            await self._start_sentinel(kwargs)
        else:
            kwargs["retry"] = Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=2)
            # A burst of subscribes (a reconnect storm) wants more commands in
            # flight than the pool has connections: they wait for one (up to
            # the broker timeout) instead of failing with "Too many
            # connections", which is what redis-py's default pool does.
            pool = aioredis.BlockingConnectionPool.from_url(
                self.url,
                max_connections=POOL_SIZE,
                timeout=timeout,
                connection_class=_Connection,
                **kwargs,
            )
            self.client = aioredis.Redis.from_pool(pool)  # closes the pool with it
            self.pubsubs[self.url] = _PubSub(self.broker, self.url, self.label, sharded=False)
        for name, source in self.broker.script_sources.items():
            if self.sentinel_url is not None:
                source = lua.with_writer_check(source)
            self.scripts[name] = self.client.register_script(source)
        await self.client.ping()
        for pubsub in self.pubsubs.values():
            await pubsub.start()

    async def _start_sentinel(self, kwargs: dict[str, Any]) -> None:
        target = self.sentinel_url
        assert target is not None
        timeout = self.broker.timeout
        sentinel_kwargs: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "protocol": 2,
        }
        if target.sentinel_password is not None:
            sentinel_kwargs["password"] = target.sentinel_password
        if target.sentinel_username is not None:
            sentinel_kwargs["username"] = target.sentinel_username
        server_kwargs: dict[str, Any] = {"db": target.db}
        if target.password is not None:
            server_kwargs["password"] = target.password
        if target.username is not None:
            server_kwargs["username"] = target.username
        self.sentinel = _NewestSentinel(  # type: ignore[no-untyped-call]
            list(target.sentinels), sentinel_kwargs=sentinel_kwargs, **server_kwargs
        )
        self.label = f"shard {self.index} ({target.master})"
        try:
            self.master = await self.sentinel.discover_master(target.master)
        except _REDIS_ERRORS as exc:
            raise redis.exceptions.ConnectionError(
                f"no master {target.master!r} from the sentinels: {exc}"
            ) from None
        kwargs["retry"] = Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=2)
        self.client = self.sentinel.master_for(
            target.master,
            connection_pool_class=_SentinelBlockingPool,
            connection_class=_SentinelConnection,
            max_connections=POOL_SIZE,
            timeout=timeout,
            **kwargs,
        )
        sentinel = self.sentinel

        def pubsub_client(**options: Any) -> Any:
            return sentinel.master_for(
                target.master, connection_class=_SentinelConnection, **options
            )

        self.pubsubs[self.url] = _PubSub(
            self.broker, self.url, self.label, sharded=False, factory=pubsub_client
        )

    async def watch_master(self) -> None:
        """Ask the sentinels who the master is (through the command pool,
        which then closes its idle connections to any other server); when
        it changed, or a connection is on another server (a failover and
        its reversal between two polls), drop every connection to the old
        one: a demoted master still answers reads, refuses writes, and its
        streams lag the new master's."""
        if self.sentinel is None or self.sentinel_url is None:
            return
        pool = self.client.connection_pool
        try:
            # The pool's own idea of the master follows: idle connections to
            # another server close now, busy ones when released.
            master = tuple(await pool.get_master_address())
        except _REDIS_ERRORS as exc:
            log.debug("redis %s: no master from the sentinels: %s", self.label, exc)
            return
        astray = [
            p
            for p in self.pubsubs.values()
            if (conn := getattr(p.pubsub, "connection", None)) is not None
            and getattr(conn, "host", None) is not None
            and (conn.host, conn.port) != master
        ]
        if master == self.master and not astray:
            return
        if master != self.master:
            was = f"{self.master[0]}:{self.master[1]}" if self.master else "unknown"
            log.warning("redis %s: the master is now %s:%s (was %s)", self.label, *master, was)
            self.master = master
            with contextlib.suppress(Exception):
                await pool.disconnect(inuse_connections=False)
            astray = list(self.pubsubs.values())
        for pubsub in astray:
            await pubsub.drop_connection()

    async def close(self) -> None:
        for pubsub in self.pubsubs.values():
            await pubsub.close()
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.aclose()
        if self.sentinel is not None:
            with contextlib.suppress(Exception):
                await self.sentinel.aclose()

    @property
    def healthy(self) -> bool:
        return all(p.healthy for p in self.pubsubs.values())

    def pubsub_for(self, pubsub_name: str) -> _PubSub:
        if not self.cluster:
            return next(iter(self.pubsubs.values()))
        node = self.client.get_node_from_key(pubsub_name)
        return self.pubsubs[node.name]


class RedisBroker:
    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "squall",
        timeout: float = 5.0,
        presence_ttl: float = 30.0,
        position_check_interval: float = 10.0,
        node_ttl: float = 15.0,
        min_replicas_ack: int = 0,
        replicas_ack_timeout_ms: int = 100,
    ) -> None:
        self.prefix = prefix
        self.timeout = timeout
        self.presence_ttl = presence_ttl
        self.position_check_interval = position_check_interval
        self.node_ttl = node_ttl
        # After each publish pipeline: WAIT for this many replicas (0: do not).
        self.min_replicas_ack = min_replicas_ack
        self.replicas_ack_timeout_ms = max(1, replicas_ack_timeout_ms)
        # Publications that failed because too few replicas acknowledged them.
        self.replicas_ack_failures = 0
        urls = split_broker_urls(url)
        if urls and urls[0].startswith("redis+cluster://"):
            # One client for the whole cluster; its seed nodes are the list.
            urls = ["redis+cluster://" + ",".join(u.split("://", 1)[-1] for u in urls)]
        self.shards = [_Shard(self, u, i) for i, u in enumerate(urls)]
        self.sharded_pubsub = self.shards[0].cluster
        if min_replicas_ack and self.sharded_pubsub:
            raise ValueError("min_replicas_ack is not supported on a Redis Cluster")
        # One pipeline in flight per server keeps publishes in call order; a
        # cluster client spreads calls over connections and does not.
        self.ordered_publish = not self.sharded_pubsub
        self.shard_channel = f"{prefix}:{{shard}}"
        self.control_channel = f"{prefix}:{{control}}"
        self.script_sources = {
            "publish": lua.PUBLISH,
            "history": lua.HISTORY,
            "position": lua.POSITION,
            "seed": lua.SEED,
            "presence_add": lua.PRESENCE_ADD,
            "presence_join": lua.PRESENCE_JOIN,
            "presence_leave": lua.PRESENCE_LEAVE,
            "presence_get": lua.PRESENCE_GET,
            "node_report": lua.NODE_REPORT,
            "node_list": lua.NODE_LIST,
        }
        self._handler: BrokerHandler | None = None
        # The node's durable log: durable streams are seeded from it.
        self._log: DurableLog | None = None
        self.seeds_from_log = False
        self._subscribed: set[str] = set()
        self._last: dict[str, StreamPosition] = {}
        # Per channel: the position Redis reported at a periodic check, and when.
        self._marks: dict[str, tuple[StreamPosition, float]] = {}
        self._held: dict[str, list[Publication]] = {}
        self._local_presence: dict[tuple[str, str], bytes] = {}
        self._tasks = BackgroundTasks(log, "redis broker step")
        self._pending_sub: dict[str, asyncio.Future[None]] = {}
        # Subscriptions asked for and not yet in place (pending or in a batch).
        self._subscribing: dict[str, asyncio.Future[None]] = {}
        # Channels of the subscribe batch in progress: Redis may deliver
        # their publications before the batch has read their positions.
        self._joining: set[str] = set()
        self._pending_unsub: set[str] = set()
        self._batch_scheduled = False
        self._loops: list[asyncio.Task[None]] = []
        self._ok = False

    # ---- life cycle -----------------------------------------------------

    async def start(self, handler: BrokerHandler) -> None:
        self._handler = handler
        try:
            for shard in self.shards:
                await shard.start()
            await self.shards[0].pubsub_for(self.control_channel).subscribe([self.control_channel])
        except _REDIS_ERRORS as exc:
            await self.close()
            raise BrokerUnavailable(f"cannot reach Redis at {self._safe_urls()}: {exc}") from None
        self._ok = True
        loop = asyncio.get_running_loop()
        self._loops = [
            loop.create_task(self._every(self.position_check_interval, self._check_positions)),
            loop.create_task(self._every(self.presence_ttl / 3, self._presence_heartbeat)),
        ]
        if any(shard.sentinel is not None for shard in self.shards):
            self._loops.append(loop.create_task(self._every(SENTINEL_POLL, self._watch_masters)))

    async def close(self) -> None:
        self._ok = False  # ends the loops even if a cancellation is swallowed
        await _stop_tasks(self._loops)
        self._loops = []
        await self._tasks.cancel_all()
        for shard in self.shards:
            await shard.close()

    def _safe_urls(self) -> str:
        """The URLs without passwords, for messages and logs."""
        out = []
        for shard in self.shards:
            if shard.sentinel_url is not None:
                out.append(safe_broker_url(shard.url))
                continue
            parts = urlsplit(shard.url.split(",")[0])
            out.append(f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}")
        return ", ".join(out)

    async def _watch_masters(self) -> None:
        for shard in self.shards:
            await shard.watch_master()

    def healthy(self) -> bool:
        return self._ok and all(s.healthy for s in self.shards)

    def spawn(self, coro: Awaitable[Any]) -> None:
        self._tasks.spawn(coro)

    async def _every(self, interval: float, step: Callable[[], Awaitable[None]]) -> None:
        """Run ``step`` every ``interval`` seconds until the broker closes;
        a failure is logged (a warning when it starts failing) and never
        ends the loop: a node whose position checks stopped would stay deaf
        to a channel whose pub/sub messages were lost."""
        name = getattr(step, "__name__", "step")
        failures = 0
        told = 0.0  # when a failure was last logged as a warning
        loop = asyncio.get_running_loop()
        while self._ok:
            await asyncio.sleep(interval)
            try:
                await step()
            except (BrokerUnavailable, *_REDIS_ERRORS) as exc:
                failures += 1
                # The first failure, then one line every STILL_FAILING_LOG
                # seconds while it goes on (a check that never succeeds is
                # a node that may stay deaf).
                if failures == 1 or loop.time() - told >= STILL_FAILING_LOG:
                    told = loop.time()
                    log.warning("periodic %s failed (%d in a row): %s", name, failures, exc)
            except Exception:
                failures += 1
                log.exception("periodic %s failed", name)
            else:
                if failures > 1:
                    log.info("periodic %s works again after %d failures", name, failures)
                failures = 0

    # ---- keys and routing -----------------------------------------------

    def _shard(self, channel: str) -> _Shard:
        if len(self.shards) == 1:
            return self.shards[0]
        return self.shards[jump_hash(_channel_key(channel), len(self.shards))]

    def _pubsub(self, channel: str) -> _PubSub:
        return self._shard(channel).pubsub_for(self.pubsub_name(channel))

    def _keys(self, channel: str) -> list[str]:
        tag = f"{self.prefix}:{{{channel}}}"
        return [f"{tag}:meta", f"{tag}:hist"]

    def pubsub_name(self, channel: str) -> str:
        return f"{self.prefix}:{{{channel}}}"

    def _channel_of(self, pubsub_name: str) -> str:
        return pubsub_name[len(self.prefix) + 2 : -1]

    async def _call(self, shard: _Shard, script: str, keys: list[str], args: list[Any]) -> Any:
        try:
            return await shard.scripts[script](keys=keys, args=shard.script_args(args))
        except _REDIS_ERRORS as exc:
            raise BrokerUnavailable(f"redis: {exc}") from None

    # ---- streams --------------------------------------------------------

    async def publish(
        self,
        channel: str,
        data: bytes,
        *,
        info: ClientInfo | None,
        history: HistoryOptions,
        at: StreamPosition | None = None,
        time_ms: int | None = None,
    ) -> Publication:
        time_ms = int(time.time() * 1000) if time_ms is None else time_ms
        args = [
            encode_tail(data, info),
            history.size,
            max(1, int(history.ttl * 1000)),
            max(1, int(history.meta_ttl)),
            _new_epoch(),
            self.pubsub_name(channel),
            at.offset if at is not None else 0,
            at.epoch if at is not None else "",
            time_ms,
            "1" if self.sharded_pubsub else "0",
        ]
        shard = self._shard(channel)
        if shard.cluster:
            ok, offset, epoch = await self._call(shard, "publish", self._keys(channel), args)
        else:
            ok, offset, epoch = await shard.publishes.call(channel, self._keys(channel), args)
        epoch = epoch.decode() if isinstance(epoch, bytes) else epoch
        if not ok:
            raise OffsetConflict(StreamPosition(int(offset), epoch))
        return Publication(channel, int(offset), epoch, data, info, time_ms)

    def use_log(self, log: DurableLog) -> None:
        self._log = log
        self.seeds_from_log = True

    def _epoch_for(self, channel: str) -> str:
        """The epoch a missing stream of ``channel`` may start under: none
        ('') for a durable channel, whose stream is seeded from the log."""
        log = self._log
        return "" if log is not None and log.durable(channel) else _new_epoch()

    async def _seed_from_log(self, channel: str) -> None:
        """A durable channel's stream is missing, or stale after a failover:
        start it again at the log's position (fresh, if the log has none)."""
        assert self._log is not None
        last = await self._log.last_position(channel)
        if last is None:
            await self._call(self._shard(channel), "position", self._keys(channel),
                             [_new_epoch(), DEFAULT_META_TTL])  # fmt: skip
        else:
            await self.seed(channel, last)

    async def position(self, channel: str) -> StreamPosition:
        await self._after_subscribing(channel)
        return await self._read_position(channel)

    async def _read_position(self, channel: str) -> StreamPosition:
        shard = self._shard(channel)
        keys = self._keys(channel)
        for _ in range(SEED_ATTEMPTS):
            args = [self._epoch_for(channel), DEFAULT_META_TTL]
            if shard.cluster:
                offset, epoch = await self._call(shard, "position", keys, args)
            else:
                # A storm of subscribers to one channel asks for its position
                # once per round trip, not once each.
                offset, epoch = await shard.positions.call(channel, keys, args)
            if int(offset) >= 0:
                position = StreamPosition(
                    int(offset), epoch.decode() if isinstance(epoch, bytes) else epoch
                )
                self._check_epoch(channel, position)
                return position
            await self._seed_from_log(channel)
        raise BrokerUnavailable(f"the stream of {channel} keeps vanishing from Redis")

    def _check_epoch(self, channel: str, position: StreamPosition) -> None:
        """A position read for a subscriber (which it is handed) in another
        epoch than this node delivers: the node's pub/sub lags a change of
        epoch, or it heard a server that is no longer master (a split brain
        after a failover). Either way what it would deliver next may not
        follow what the subscriber was handed. It moves to the read epoch
        now, and its subscribers recover, instead of filling a gap later in
        an epoch its subscribers left."""
        last = self._last.get(channel)
        if (
            last is not None
            and last.epoch != position.epoch
            and channel in self._subscribed
            and channel not in self._held
        ):
            self._held[channel] = []
            self.spawn(self._fill(channel, target=position))

    def delivered(self, channel: str) -> StreamPosition | None:
        # While a gap is being filled this stays at what was handed over
        # before it; the fill delivers the rest.
        return self._last.get(channel) if channel in self._subscribed else None

    async def seed(self, channel: str, position: StreamPosition) -> None:
        await self._call(
            self._shard(channel),
            "seed",
            self._keys(channel),
            [position.epoch, position.offset, DEFAULT_META_TTL],
        )

    async def history(
        self, channel: str, *, after: int | None, limit: int, reverse: bool = False
    ) -> HistoryResult:
        await self._after_subscribing(channel)
        start = "-" if after is None else str(after + 1)
        for _ in range(SEED_ATTEMPTS):
            offset, epoch, messages = await self._call(
                self._shard(channel),
                "history",
                self._keys(channel),
                [self._epoch_for(channel), DEFAULT_META_TTL, start, max(0, limit),
                 "1" if reverse else "0"],
            )  # fmt: skip
            if int(offset) >= 0:
                epoch = epoch.decode() if isinstance(epoch, bytes) else epoch
                pubs = [decode_message(channel, m) for m in messages]
                position = StreamPosition(int(offset), epoch)
                self._check_epoch(channel, position)
                return HistoryResult(pubs, position)
            await self._seed_from_log(channel)
        raise BrokerUnavailable(f"the stream of {channel} keeps vanishing from Redis")

    # ---- subscriptions (batched) ----------------------------------------

    async def subscribe(self, channel: str) -> None:
        if channel in self._subscribed:
            self._pending_unsub.discard(channel)
            return
        fut = self._pending_sub.get(channel)
        if fut is None:
            fut = self._pending_sub[channel] = asyncio.get_running_loop().create_future()
            self._subscribing[channel] = fut
            fut.add_done_callback(functools.partial(self._subscribed_now, channel))
            self._schedule_batch()
        await asyncio.shield(fut)

    def _subscribed_now(self, channel: str, fut: asyncio.Future[None]) -> None:
        if self._subscribing.get(channel) is fut:
            del self._subscribing[channel]
        _consume(fut)

    async def _after_subscribing(self, channel: str) -> None:
        """Wait while this node's subscription to ``channel`` is being set
        up. A position read before it is in place can be older than the
        baseline the subscription then takes, and what lies between (sent
        before the SUBSCRIBE took effect) would reach nobody who was handed
        that older position: a node's second subscriber, say, whose reply
        is read while the first one's subscription is still on its way."""
        fut = self._subscribing.get(channel)
        if fut is not None and not fut.done():
            with contextlib.suppress(BrokerUnavailable, TimeoutError):
                await asyncio.wait_for(asyncio.shield(fut), self.timeout)

    async def unsubscribe(self, channel: str) -> None:
        if channel in self._subscribed:
            self._pending_unsub.add(channel)
            self._schedule_batch()

    def _schedule_batch(self) -> None:
        if not self._batch_scheduled:
            self._batch_scheduled = True
            asyncio.get_running_loop().call_soon(lambda: self.spawn(self._run_batch()))

    async def _run_batch(self) -> None:
        """One SUBSCRIBE (per shard, 500 names at most) for every channel
        asked for since the last batch, and likewise one UNSUBSCRIBE."""
        self._batch_scheduled = False
        pending, self._pending_sub = self._pending_sub, {}
        # The unsubscribes stay pending (a subscribe meanwhile cancels one)
        # until _unsubscribe_batch decides, after the subscribes' awaits.
        unsub = set(self._pending_unsub)
        self._joining.update(pending)
        try:
            await self._subscribe_batch(pending)
        finally:
            self._joining.difference_update(pending)
        await self._unsubscribe_batch(unsub)

    async def _subscribe_batch(self, pending: dict[str, asyncio.Future[None]]) -> None:
        groups: dict[_PubSub, list[str]] = {}
        for channel in pending:
            groups.setdefault(self._pubsub(channel), []).append(channel)
        for pubsub, channels in groups.items():
            for i in range(0, len(channels), 500):
                chunk = channels[i : i + 500]
                try:
                    await pubsub.subscribe([self.pubsub_name(c) for c in chunk])
                    positions = await self._positions(self._shard(chunk[0]), chunk)
                except (TimeoutError, BrokerUnavailable, *_REDIS_ERRORS) as exc:
                    for c in chunk:
                        if c not in self._subscribed:
                            self._last.pop(c, None)
                        if not pending[c].done():
                            pending[c].set_exception(BrokerUnavailable(f"redis: {exc}"))
                    continue
                for c, position in zip(chunk, positions, strict=True):
                    if position is None:
                        if c not in self._subscribed:
                            self._last.pop(c, None)
                        if not pending[c].done():
                            pending[c].set_exception(
                                BrokerUnavailable(f"the stream of {c} cannot be seeded now")
                            )
                        continue
                    self._subscribed.add(c)
                    # The baseline for gap checks, unless a message came first.
                    self._last.setdefault(c, position)
                    if not pending[c].done():
                        pending[c].set_result(None)

    async def _unsubscribe_batch(self, unsub: set[str]) -> None:
        gone: dict[_PubSub, list[str]] = {}
        for channel in unsub:
            if channel not in self._pending_unsub:
                # A local subscriber came back while this batch was busy
                # (subscribe() took it off the pending set): keep it, or
                # the node stays deaf to the channel for good.
                continue
            self._pending_unsub.discard(channel)
            if channel in self._subscribed and channel not in self._pending_sub:
                self._subscribed.discard(channel)
                self._last.pop(channel, None)
                self._marks.pop(channel, None)
                gone.setdefault(self._pubsub(channel), []).append(self.pubsub_name(channel))
        for pubsub, names in gone.items():
            with contextlib.suppress(*_REDIS_ERRORS):
                for i in range(0, len(names), 500):
                    await pubsub.unsubscribe(names[i : i + 500])

    async def _run_many(
        self, shard: _Shard, script: str, calls: Sequence[tuple[list[str], list[Any]]]
    ) -> list[Any]:
        """Run one script many times in one round trip (a pipeline; on a
        cluster, concurrent calls routed by slot)."""
        try:
            if shard.cluster:
                run = shard.scripts[script]
                return list(await asyncio.gather(*(run(keys=k, args=a) for k, a in calls)))
            pipe = shard.client.pipeline(transaction=False)
            for keys, args in calls:
                await shard.scripts[script](keys=keys, args=shard.script_args(args), client=pipe)
            return await _execute(pipe)
        except _REDIS_ERRORS as exc:
            raise BrokerUnavailable(f"redis: {exc}") from None

    async def _positions(
        self, shard: _Shard, channels: Sequence[str]
    ) -> list[StreamPosition | None]:
        """The positions of ``channels`` (on one shard) in one round trip;
        durable streams found missing are seeded from the log first. None:
        a durable stream that cannot be seeded now (its log is unreachable);
        it fails alone, the others' positions are still read."""
        calls = [(self._keys(c), [self._epoch_for(c), DEFAULT_META_TTL]) for c in channels]
        replies = await self._run_many(shard, "position", calls)
        out: list[StreamPosition | None] = []
        for channel, (offset, epoch) in zip(channels, replies, strict=True):
            if int(offset) < 0:
                try:
                    out.append(await self._read_position(channel))
                except BrokerUnavailable as exc:
                    log.warning("cannot seed the stream of %s: %s", channel, exc)
                    out.append(None)
                continue
            out.append(
                StreamPosition(int(offset), epoch.decode() if isinstance(epoch, bytes) else epoch)
            )
        return out

    # ---- delivery and gap filling ---------------------------------------

    def on_message(self, pubsub_name: str, message: bytes) -> None:
        handler = self._handler
        if handler is None:
            return
        if pubsub_name == self.control_channel:
            handler.on_control(message)
            return
        if pubsub_name == self.shard_channel:
            return
        channel = self._channel_of(pubsub_name)
        kind = message[:1]
        if kind == b"p":
            self._accept(decode_message(channel, message))
        elif kind == b"j":
            obj = orjson.loads(message[1:])
            handler.on_join(channel, ClientInfo.from_json(obj), obj.get("edge", True))
        elif kind == b"l":
            obj = orjson.loads(message[1:])
            handler.on_leave(channel, ClientInfo.from_json(obj), obj.get("edge", True))

    def _accept(self, pub: Publication) -> None:
        channel = pub.channel
        if (
            channel not in self._subscribed
            and channel not in self._joining
            and channel not in self._pending_sub
        ):
            return
        held = self._held.get(channel)
        if held is not None:
            held.append(pub)
            return
        last = self._last.get(channel)
        if last is not None and last.epoch == pub.epoch:
            if pub.offset <= last.offset:
                return  # already delivered (a gap fill got there first)
            if pub.offset > last.offset + 1:
                self._held[channel] = [pub]
                self.spawn(self._fill(channel))
                return
        elif last is not None:
            # The stream restarted under a new epoch: positions held by
            # subscribers mean nothing now.
            assert self._handler is not None
            self._handler.on_unrecoverable(channel)
        self._last[channel] = pub.position
        assert self._handler is not None
        self._handler.on_publication(pub)

    async def _fill(self, channel: str, target: StreamPosition | None = None) -> None:
        """Deliver, in order, what is missing before the held publications
        (or up to ``target``), reading it from history."""
        handler = self._handler
        assert handler is not None
        try:
            while True:
                held = sorted(self._held.get(channel, []), key=lambda p: p.offset)
                self._held[channel] = []
                last = self._last.get(channel)
                if last is None:
                    break
                if held and held[0].epoch != last.epoch:
                    handler.on_unrecoverable(channel)
                    last = StreamPosition(held[0].offset - 1, held[0].epoch)
                if target is not None and target.epoch != last.epoch:
                    # The stream restarted (Redis lost it): nothing to fill.
                    handler.on_unrecoverable(channel)
                    last = target
                upto = held[0].offset - 1 if held else (target.offset if target else last.offset)
                fetched: list[Publication] = []
                if upto > last.offset:
                    result = await self.history(
                        channel, after=last.offset, limit=upto - last.offset
                    )
                    if result.position.epoch != last.epoch:
                        handler.on_unrecoverable(channel)
                        last = StreamPosition(upto, last.epoch)
                    else:
                        fetched = [p for p in result.publications if p.offset <= upto]
                for pub in [*fetched, *held]:
                    if pub.offset <= last.offset:
                        continue
                    if pub.offset != last.offset + 1:
                        log.warning("gap on %s: %d..%d is gone from history", channel,
                                    last.offset + 1, pub.offset - 1)  # fmt: skip
                        handler.on_unrecoverable(channel)
                    last = pub.position
                    handler.on_publication(pub)
                if target is not None and last.offset < target.offset and not held:
                    handler.on_unrecoverable(channel)
                    last = target
                self._last[channel] = last
                target = None
                if not self._held.get(channel):
                    break
        except BrokerUnavailable as exc:
            log.warning("cannot fill a gap on %s: %s", channel, exc)
            handler.on_unrecoverable(channel)
            rest = self._held.get(channel) or []
            if rest:
                self._last[channel] = max(rest, key=lambda p: p.offset).position
        finally:
            self._held.pop(channel, None)

    async def resync(self, pubsub: _PubSub, *, periodic: bool = False) -> None:
        """Compare the position in Redis of every channel that ``pubsub``
        carries with what was delivered, and fill what is missing.

        After a reconnect, whatever Redis has and this node has not seen is
        filled at once. The periodic check must not take publications still
        on their way for lost ones (a burst of hundreds is committed in one
        pipeline and arrives a moment later; filling it would also find it
        past a short history and tell every subscriber to recover). So it
        judges the position it read at least ``IN_FLIGHT_GRACE`` seconds
        earlier: what Redis had then and this node still lacks is lost."""
        channels = [c for c in self._subscribed if self._pubsub(c) is pubsub]
        now = asyncio.get_running_loop().time()
        for i in range(0, len(channels), 500):
            chunk = channels[i : i + 500]
            positions = await self._positions(self._shard(chunk[0]), chunk)
            for channel, top in zip(chunk, positions, strict=True):
                last = self._last.get(channel)
                if top is None or last is None or channel in self._held:
                    continue
                target = top
                if periodic:
                    mark = self._marks.get(channel)
                    if mark is not None and now - mark[1] < IN_FLIGHT_GRACE:
                        continue  # too recent to judge yet
                    self._marks[channel] = (top, now)
                    if mark is None:
                        continue
                    target = mark[0]
                    if target.epoch != last.epoch and top.epoch == last.epoch:
                        continue  # an older stream's mark; this one is current
                if target.epoch != last.epoch or target.offset > last.offset:
                    self._held[channel] = []
                    self.spawn(self._fill(channel, target=target))

    async def _check_positions(self) -> None:
        failed: Exception | None = None
        for shard in self.shards:
            for pubsub in shard.pubsubs.values():
                try:
                    await self.resync(pubsub, periodic=True)
                except (BrokerUnavailable, *_REDIS_ERRORS) as exc:
                    failed = exc  # the other shards are still checked
        if failed is not None:
            raise failed

    # ---- presence -------------------------------------------------------

    def _presence_keys(self, channel: str) -> list[str]:
        tag = f"{self.prefix}:{{{channel}}}"
        return [f"{tag}:presence", f"{tag}:presence_exp"]

    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        flat = await self._call(
            self._shard(channel), "presence_get", self._presence_keys(channel), []
        )
        out = {}
        for i in range(0, len(flat), 2):
            client = flat[i].decode() if isinstance(flat[i], bytes) else flat[i]
            out[client] = ClientInfo.from_json(orjson.loads(flat[i + 1]))
        return out

    async def add_presence(
        self, channel: str, info: ClientInfo, *, by_user: bool = False
    ) -> PresenceEdge:
        encoded = orjson.dumps(info.to_json())
        self._local_presence[(channel, info.client)] = encoded
        count, elsewhere = await self._call(
            self._shard(channel),
            "presence_join",
            self._presence_keys(channel),
            [info.client, encoded, int(self.presence_ttl * 1000), info.user if by_user else ""],
        )
        return PresenceEdge(int(count), bool(elsewhere))

    async def remove_presence(self, channel: str, client: str, *, user: str = "") -> PresenceEdge:
        self._local_presence.pop((channel, client), None)
        left, elsewhere = await self._call(
            self._shard(channel), "presence_leave", self._presence_keys(channel), [client, user]
        )
        return PresenceEdge(int(left), bool(elsewhere))

    async def _presence_heartbeat(self) -> None:
        """Refresh this node's presence entries; a crashed node's expire."""
        by_shard: dict[int, list[tuple[str, str, bytes]]] = {}
        for (channel, client), encoded in list(self._local_presence.items()):
            by_shard.setdefault(self._shard(channel).index, []).append((channel, client, encoded))
        ttl = int(self.presence_ttl * 1000)
        for index, entries in by_shard.items():
            shard = self.shards[index]
            for i in range(0, len(entries), 1000):
                calls = [
                    (self._presence_keys(channel), [client, encoded, ttl])
                    for channel, client, encoded in entries[i : i + 1000]
                ]
                await self._run_many(shard, "presence_add", calls)

    async def _publish_raw(self, channel_name: str, shard: _Shard, message: bytes) -> None:
        try:
            if self.sharded_pubsub:
                await shard.client.spublish(channel_name, message)
            else:
                await shard.client.publish(channel_name, message)
        except _REDIS_ERRORS as exc:
            raise BrokerUnavailable(f"redis: {exc}") from None

    async def publish_join(self, channel: str, info: ClientInfo, first: bool = True) -> None:
        message = b"j" + _presence_event(info, first)
        await self._publish_raw(self.pubsub_name(channel), self._shard(channel), message)

    async def publish_leave(self, channel: str, info: ClientInfo, last: bool = True) -> None:
        message = b"l" + _presence_event(info, last)
        await self._publish_raw(self.pubsub_name(channel), self._shard(channel), message)

    async def publish_control(self, message: bytes) -> None:
        await self._publish_raw(self.control_channel, self.shards[0], message)

    # ---- cluster view ---------------------------------------------------

    def _node_keys(self) -> list[str]:
        return [f"{self.prefix}:{{nodes}}:alive", f"{self.prefix}:{{nodes}}:info"]

    async def report_node(self, node_id: str, info: dict[str, Any]) -> None:
        await self._call(
            self.shards[0],
            "node_report",
            self._node_keys(),
            [node_id, orjson.dumps(info), int(self.node_ttl * 1000)],
        )

    async def nodes(self) -> list[dict[str, Any]]:
        flat = await self._call(self.shards[0], "node_list", self._node_keys(), [])
        return [orjson.loads(flat[i + 1]) for i in range(0, len(flat), 2)]
