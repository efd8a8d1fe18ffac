"""One running Squall process: builds the broker, store and hub from settings,
and carries out what handlers and sessions ask (publish, subscribe, history,
presence, control), start to drain to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from server import __version__, errors, protocol
from server.auth import Authenticator
from server.broker import Broker, BrokerUnavailable, OffsetConflict
from server.broker.memory import MemoryBroker
from server.channels import Channel, Channels
from server.codec import Codec, HistoryPage
from server.config import Settings
from server.hub import Hub
from server.metrics import Metrics
from server.models import ClientInfo, Publication, StreamPosition
from server.proxy import ConnectionMeta, Proxy
from server.pusher import event_of
from server.pusher_webhooks import WebhookSender
from server.search import (
    BadSearch,
    SearchIndex,
    SearchQuery,
    SearchUnavailable,
    decode_cursor,
    parse_text,
)
from server.search.indexer import Indexer
from server.session import Flusher, Session, Transport
from server.store import Store, StoreConflict, StoreUnavailable
from server.store.sqlite import SQLiteStore
from server.tasks import BackgroundTasks

# The largest integer a search index stores.
_MAX_INT64 = 2**63 - 1
log = logging.getLogger("squall.node")


@dataclass(slots=True)
class Recovery:
    publications: list[Publication]
    position: StreamPosition
    recovered: bool


def build_broker(settings: Settings) -> Broker:
    b = settings.broker
    if not b.url:
        return MemoryBroker()
    from server.broker.redis import RedisBroker

    return RedisBroker(
        b.url,
        prefix=b.prefix,
        timeout=b.timeout,
        presence_ttl=b.presence_ttl,
        position_check_interval=b.position_check_interval,
        node_ttl=b.node_report_interval * 3,
        min_replicas_ack=b.min_replicas_ack,
        replicas_ack_timeout_ms=b.replicas_ack_timeout_ms,
    )


def build_store(settings: Settings) -> Store:
    st = settings.store
    if st.url:
        from server.store.mongo import MongoStore

        return MongoStore(
            st.url,
            database=st.database,
            write_concern=st.write_concern,
            journal=st.journal,
            timeout=st.timeout,
            retries=st.retries,
            retry_backoff=st.retry_backoff,
            max_pool_size=st.max_pool_size,
            min_pool_size=st.min_pool_size,
        )
    return SQLiteStore(settings.data_path / "log.sqlite3", synchronous=st.sqlite_synchronous)


def build_search(settings: Settings) -> SearchIndex | None:
    """The configured search index, or None when no namespace is searchable."""
    se = settings.search
    if not any(ns.searchable for ns in settings.namespaces.values()):
        return None
    if se.url:
        from server.search.cluster import ElasticsearchSearch, OpenSearchSearch

        kind = ElasticsearchSearch if se.engine == "elasticsearch" else OpenSearchSearch
        return kind(se.url, index=se.index, timeout=se.timeout)
    from server.search.sqlite import SQLiteSearch

    return SQLiteSearch(settings.data_path / "search.sqlite3")


class Node:
    def __init__(
        self,
        settings: Settings,
        *,
        broker: Broker | None = None,
        store: Store | None = None,
        search: SearchIndex | None = None,
    ) -> None:
        self.settings = settings
        self.version = __version__
        self.node_id = settings.server.node_name or (
            f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        )
        self.channels = Channels(settings)
        self.auth = Authenticator(settings.auth)
        self.broker = broker if broker is not None else build_broker(settings)
        self.store = store if store is not None else build_store(settings)
        self.search = search if search is not None else build_search(settings)
        self.indexer: Indexer | None = None
        if self.search is not None:
            self.indexer = Indexer(
                self.store,
                self.search,
                settings.namespaces,
                batch_size=settings.search.batch_size,
                interval=settings.search.interval,
            )
        # The hooks to the application's back end; None when none is set, so
        # sessions check one attribute and keep no request headers.
        self.proxy = Proxy(settings) if Proxy.configured(settings) else None
        # Publishes that wait for a hook first cannot keep their order in a
        # pipeline: a session pipelines them only when no namespace has one.
        self.hooked_publish = self.proxy is not None and bool(self.proxy.publish_urls)
        # Namespaces whose joins and leaves are told of per user (Pusher apps').
        self._per_user_presence = frozenset(app.namespace for app in settings.pusher.apps)
        # Pusher apps' webhooks (None: no app has one).
        self.webhooks: WebhookSender | None = None
        if any(app.webhooks for app in settings.pusher.apps):
            self.webhooks = WebhookSender(settings.pusher)
        self.metrics = Metrics(self)
        self.flusher = Flusher(self.metrics)
        self.sessions: dict[str, Session] = {}
        self.hub = Hub(self.flusher, self.sessions)
        # Open sessions per codec (a Pusher app's quota counts its own).
        self.codec_sessions: dict[Codec, int] = {}
        self.users: dict[str, dict[Session, None]] = {}
        self.draining = False
        self.started_at = time.time()
        self._tasks = BackgroundTasks(log, "background step")
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._durable: dict[str, StreamPosition] = {}
        # Log reads of recoveries in flight, shared by identical ones.
        self._log_reads: dict[
            tuple[str, str, int, int, int], asyncio.Future[list[Publication]]
        ] = {}
        self._running = False
        self._closed = False
        # Transports that own sockets outside Tornado close them here.
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self._status: tuple[float, bytes] | None = None
        self._all_gone = asyncio.Event()

    # ---- life cycle -----------------------------------------------------

    async def start(self) -> None:
        await self.store.start()
        self.broker.use_log(self)
        try:
            await self.broker.start(self)
        except BrokerUnavailable:
            await self.store.close()
            raise
        # The identity provider's key set (auth.jwks_url): fetched now, never
        # fatal (tokens are refused until it arrives), refreshed in the background.
        await self.auth.start()
        self.metrics.start()
        self._running = True
        self.spawn(self._report_forever())
        self.spawn(self._expire_forever())
        if self.search is not None:
            self.spawn(self._search_forever())
        log.info(
            "node %s started (broker=%s, store=%s, search=%s)",
            self.node_id,
            self.broker.name,
            self.store.name,
            self.search.name if self.search is not None else "off",
        )

    async def drain(self, grace: float | None = None) -> None:
        """Stop taking connections, tell clients to reconnect elsewhere, and
        wait (up to ``grace`` seconds) for them to go."""
        self.draining = True
        grace = self.settings.server.drain_grace if grace is None else grace
        deadline = time.monotonic() + grace
        if self.settings.server.drain_delay:
            await asyncio.sleep(min(self.settings.server.drain_delay, grace))
        for session in list(self.sessions.values()):
            session.disconnect(errors.SHUTDOWN)
        if self.sessions:
            self._all_gone.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_gone.wait(), max(0.0, deadline - time.monotonic()))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._running = False
        for session in list(self.sessions.values()):
            session.disconnect(errors.SHUTDOWN)
        for closer in self._closers:
            await closer()
        await self.metrics.stop()
        await self.auth.close()
        if self.proxy is not None:
            await self.proxy.close()
        if self.webhooks is not None:
            await self.webhooks.close()
        await self._tasks.cancel_all()
        await self.broker.close()
        if self.search is not None:
            await self.search.close()
        await self.store.close()

    def add_closer(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Run ``closer`` in ``close``, after every session was told to go."""
        self._closers.append(closer)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a background step; its failure is logged, never lost."""
        self._tasks.spawn(coro)

    def ready(self) -> bool:
        return self._running and not self.draining and self.broker.healthy()

    # ---- sessions -------------------------------------------------------

    def connection_meta(
        self, transport: str, remote_addr: str, headers: Mapping[str, str]
    ) -> ConnectionMeta | None:
        """What a transport hands ``new_session`` for the proxy hooks: the
        transport's name, the client's address and only the headers in
        ``proxy.forward_headers``; None (nothing kept) when no hook is set."""
        if self.proxy is None:
            return None
        return self.proxy.meta(transport, remote_addr, headers)

    def new_session(
        self,
        transport: Transport,
        codec: Codec = protocol.SQUALL,
        meta: ConnectionMeta | None = None,
    ) -> Session:
        """Accept a connection, or raise ``Unavailable`` when draining or full.
        ``meta`` (from ``connection_meta``) is what the proxy hooks are told
        of the connection's HTTP request."""
        if self.draining or not self._running:
            self.metrics.connections_refused += 1
            raise errors.Unavailable("server is shutting down")
        if len(self.sessions) >= self.settings.limits.max_connections:
            self.metrics.connections_refused += 1
            raise errors.Unavailable("connection limit reached")
        session = Session(self, transport, codec, meta)
        self.sessions[session.client_id] = session
        self.codec_sessions[codec] = self.codec_sessions.get(codec, 0) + 1
        self.metrics.connections_accepted += 1
        return session

    def register_user(self, session: Session, previous: str | None = None) -> None:
        """Index ``session`` by its user (``previous``: the user it was
        indexed by until now, when it signs in as another)."""
        if previous is not None:
            same_user = self.users.get(previous)
            if same_user is not None:
                same_user.pop(session, None)
                if not same_user:
                    del self.users[previous]
        self.users.setdefault(session.user, {})[session] = None

    def forget_session_soon(self, session: Session) -> None:
        asyncio.get_running_loop().call_soon(self._forget, session)

    def _forget(self, session: Session) -> None:
        if self.sessions.pop(session.client_id, None) is None:
            return
        left = self.codec_sessions.get(session.codec, 1) - 1
        if left:
            self.codec_sessions[session.codec] = left
        else:
            self.codec_sessions.pop(session.codec, None)
        if not self.sessions:
            self._all_gone.set()
        same_user = self.users.get(session.user)
        if same_user is not None:
            same_user.pop(session, None)
            if not same_user:
                del self.users[session.user]
        subs, session.subs = session.subs, {}
        for name, channel in subs.items():
            self.drop_subscription(session, name)
            if channel.options.presence:
                self.spawn(self.leave(channel, session.presence_info(channel.name)))

    # ---- subscriptions --------------------------------------------------

    async def subscribe_session(self, session: Session, channel: Channel) -> None:
        # Every subscriber makes sure of the broker's subscription, not only
        # the node's first: when the first one's fails (Redis failing over)
        # while a second joined meanwhile, the second would otherwise stay
        # subscribed in the hub with no upstream, the node deaf to the
        # channel for as long as anyone is subscribed here. (Subscribing
        # the broker again costs a set lookup, or waits for the batch on
        # its way and fails with it.)
        self.hub.add(channel.name, session)
        try:
            await self.broker.subscribe(channel.name)
        except BrokerUnavailable as exc:
            raise errors.Unavailable(f"broker: {exc}") from None

    async def unsubscribe_session(self, session: Session, channel: Channel) -> None:
        self.drop_subscription(session, channel.name)
        if channel.options.presence:
            await self.leave(channel, session.presence_info(channel.name))

    def drop_subscription(self, session: Session, name: str) -> None:
        if self.hub.remove(name, session):
            self.spawn(self._broker_unsubscribe(name))

    async def _broker_unsubscribe(self, name: str) -> None:
        # A subscriber may have arrived meanwhile; the upstream stays then.
        if self.hub.subscribers(name) == 0:
            await self.broker.unsubscribe(name)

    # ---- streams --------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _channel_lock(self, name: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(name, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[name] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[name]
            if users <= 1:
                del self._locks[name]
            else:
                self._locks[name] = (lock, users - 1)

    # ---- the durable log, as the broker sees it (``DurableLog``) ----------

    def durable(self, channel: str) -> bool:
        try:
            return self.channels.resolve(channel).options.persist
        except errors.SquallError:
            return False

    async def last_position(self, channel: str) -> StreamPosition | None:
        try:
            return await self.store.last_position(channel)
        except StoreUnavailable as exc:
            raise BrokerUnavailable(
                f"the durable log cannot say where {channel} stands: {exc}"
            ) from None

    async def _seed_durable(self, channel: Channel) -> None:
        """Make the broker's stream of a durable channel continue the log's
        epoch and offset (after a restart, or after the stream expired). A
        broker that seeds from the log itself (Redis) is left to it: it
        reads the log whenever the stream is missing, not a cached position
        that other nodes' publications may have passed."""
        if self.broker.seeds_from_log:
            return
        last = self._durable.get(channel.name)
        if last is None:
            try:
                last = await self.store.last_position(channel.name)
            except StoreUnavailable as exc:
                raise errors.Unavailable(f"store: {exc}") from None
            if last is None:
                return
            if len(self._durable) > 100_000:
                self._durable.clear()
            self._durable[channel.name] = last
        await self.broker.seed(channel.name, last)

    async def position(self, channel: Channel) -> StreamPosition:
        try:
            if channel.options.persist:
                await self._seed_durable(channel)
            return await self.broker.position(channel.name)
        except BrokerUnavailable as exc:
            raise errors.Unavailable(f"broker: {exc}") from None

    def publication_data(self, params: dict[str, Any]) -> bytes:
        """``params["data"]`` encoded once, within the size limit."""
        if "data" not in params:
            raise errors.BadRequest("'data' is required")
        data = orjson.dumps(params["data"])
        limit = self.settings.limits.max_publication_bytes
        if len(data) > limit:
            raise errors.MessageTooLarge(f"data is {len(data)} bytes; the limit is {limit}")
        return data

    async def publish(
        self, channel: Channel, data: bytes, *, info: ClientInfo | None = None
    ) -> Publication:
        """Publish ``data`` (encoded JSON). Durable channels are written to
        the store before the broker sees them: an acknowledged publication is
        on disk, and a failed one was delivered to nobody."""
        history = channel.options.history_options()
        try:
            if not channel.options.persist:
                pub = await self.broker.publish(channel.name, data, info=info, history=history)
            else:
                pub = await self._publish_durable(channel, data, info)
        except BrokerUnavailable as exc:
            raise errors.Unavailable(f"broker: {exc}") from None
        except StoreUnavailable as exc:
            raise errors.Unavailable(f"store: {exc}") from None
        self.metrics.publications_in += 1
        webhooks = self.webhooks
        if webhooks is not None and info is not None and webhooks.wants(channel.namespace):
            # A Pusher client event (its sender in the envelope): raised here,
            # on the node that took it, once.
            event = event_of(data)
            if event.name.startswith("client-") and event.socket_id:
                out = {
                    "name": "client_event",
                    "channel": channel.name[len(channel.namespace) + 1 :],
                    "event": event.name,
                    "data": event.data,
                    "socket_id": event.socket_id,
                }
                if event.user_id:
                    out["user_id"] = event.user_id
                webhooks.raise_event(channel.namespace, out)
        return pub

    async def _publish_durable(
        self, channel: Channel, data: bytes, info: ClientInfo | None
    ) -> Publication:
        name = channel.name
        async with self._channel_lock(name):
            for _ in range(3):
                await self._seed_durable(channel)
                current = await self.broker.position(name)
                at = StreamPosition(current.offset + 1, current.epoch)
                pub = Publication(name, at.offset, at.epoch, data, info)
                try:
                    await self.store.append(
                        [pub],
                        retention=channel.options.retention,
                        searchable=channel.options.searchable,
                    )
                except StoreConflict:
                    # The log is ahead of the broker (a crash between the two
                    # steps): forget the cached position and read it again.
                    self._durable.pop(name, None)
                    await self._repair(channel, current)
                    continue
                self._durable[name] = at
                if channel.options.searchable and self.indexer is not None:
                    self.indexer.wake()
                try:
                    return await self.broker.publish(
                        name,
                        data,
                        info=info,
                        history=channel.options.history_options(),
                        at=at,
                        time_ms=pub.time_ms,
                    )
                except OffsetConflict as exc:
                    # The log has it (acknowledged): the broker's stream is
                    # elsewhere. Behind it (a lagging Redis server
                    # answered): hand over what the log holds past it, this
                    # publication included.
                    current = exc.current
                    if current.epoch == at.epoch and current.offset < at.offset:
                        log.warning("%s: the broker's stream is at %d, the log at %d: "
                                    "handing it over", name, current.offset, at.offset)  # fmt: skip
                        # Best effort: the log has it, so it is made; the
                        # next publish or a recovery hands it over.
                        with contextlib.suppress(BrokerUnavailable, StoreUnavailable):
                            await self._repair(channel, current)
                    elif current.epoch == at.epoch:
                        # Already there: another node handed it over from
                        # the log (a recovery that found its stream behind).
                        log.info("%s: the broker's stream is at %d already, past %d",
                                 name, current.offset, at.offset)  # fmt: skip
                    else:
                        log.error(
                            "%s: the broker's stream moved to epoch %s during a durable "
                            "publish at %s:%d", name, current.epoch, at.epoch, at.offset,
                        )  # fmt: skip
                    return pub
                except BrokerUnavailable as exc:
                    # The log has it: it is made, whatever the broker did.
                    # The next publish (or a recovery) hands it over.
                    raise BrokerUnavailable(
                        f"{exc}; the publication is in the durable log: it was made, "
                        "and may have been delivered"
                    ) from None
            raise errors.Unavailable("could not agree on the channel's next offset")

    async def _repair(self, channel: Channel, current: StreamPosition) -> None:
        """Publish to the broker what the log holds past the broker's position."""
        missing = await self.store.read(
            channel.name, current.epoch, after=current.offset, limit=1000
        )
        for pub in missing:
            with contextlib.suppress(OffsetConflict):
                await self.broker.publish(
                    channel.name,
                    pub.data,
                    info=pub.info,
                    history=channel.options.history_options(),
                    at=pub.position,
                    time_ms=pub.time_ms,
                )

    async def _catch_up_with_log(
        self, channel: Channel, position: StreamPosition, wanted: int
    ) -> StreamPosition:
        """A durable channel's broker stream is at ``position``, behind an
        offset a client holds (``wanted``): if the log has it, publish what
        the log holds past ``position`` to the broker."""
        try:
            last = await self.store.last_position(channel.name)
        except StoreUnavailable as exc:
            raise errors.Unavailable(f"store: {exc}") from None
        if last is None or last.epoch != position.epoch or last.offset < wanted:
            return position
        log.warning("%s: the broker's stream is at %d, the log at %d: handing it over",
                    channel.name, position.offset, last.offset)  # fmt: skip
        try:
            await self._repair(channel, position)
        except BrokerUnavailable as exc:
            raise errors.Unavailable(f"broker: {exc}") from None
        except StoreUnavailable as exc:
            raise errors.Unavailable(f"store: {exc}") from None
        return last

    async def _read_log_shared(
        self, name: str, epoch: str, after: int, before: int, limit: int
    ) -> list[Publication]:
        """``store.read``, once for all the recoveries that ask the same at the
        same time: after a node or a Redis server fails, every subscriber of
        a durable channel comes back at once from about the same position."""
        key = (name, epoch, after, before, limit)
        fut = self._log_reads.get(key)
        if fut is None:
            fut = asyncio.ensure_future(
                self.store.read(name, epoch, after=after, before=before, limit=limit)
            )
            self._log_reads[key] = fut

            def done(f: asyncio.Future[list[Publication]]) -> None:
                self._log_reads.pop(key, None)
                if not f.cancelled():
                    f.exception()  # taken: each waiter gets it from its await

            fut.add_done_callback(done)
        return await asyncio.shield(fut)

    async def _from_log(
        self, channel: Channel, epoch: str, after: int, upto: int
    ) -> tuple[list[Publication], bool]:
        """The log's publications of ``epoch`` past ``after`` up to ``upto``,
        and whether they are all there, in order."""
        missed = upto - after
        try:
            pubs = await self._read_log_shared(channel.name, epoch, after, upto + 1, missed)
        except StoreUnavailable as exc:
            raise errors.Unavailable(f"store: {exc}") from None
        return pubs, len(pubs) == missed and (not pubs or pubs[0].offset == after + 1)

    async def recover(self, channel: Channel, offset: int, epoch: str) -> Recovery:
        """What a client that saw ``offset`` of ``epoch`` missed. ``recovered``
        is True only when every missed publication is returned, in order."""
        limit = self.settings.limits.max_recovery_publications
        try:
            if channel.options.persist:
                await self._seed_durable(channel)
            result = await self.broker.history(channel.name, after=offset, limit=limit + 1)
        except BrokerUnavailable as exc:
            raise errors.Unavailable(f"broker: {exc}") from None
        position = result.position
        if channel.options.persist and epoch == position.epoch and offset > position.offset:
            # The client holds more than the broker's stream: the stream
            # lags the log (a Redis server that had not seen the last
            # publications answered). The log decides: the broker is handed
            # what it lacks, and the client is answered from the log.
            logged = await self._catch_up_with_log(channel, position, offset)
            if logged.epoch == epoch and logged.offset >= offset:
                if logged.offset - offset > limit:
                    return Recovery([], logged, False)
                pubs, complete = await self._from_log(channel, epoch, offset, logged.offset)
                return Recovery(pubs, logged, complete)
        if epoch != position.epoch or offset > position.offset:
            return Recovery([], position, False)
        missed = position.offset - offset
        if missed == 0:
            return Recovery([], position, True)
        pubs = [p for p in result.publications if p.offset <= position.offset]
        complete = len(pubs) == missed and pubs[0].offset == offset + 1
        if not complete and channel.options.persist and missed <= limit:
            pubs, complete = await self._from_log(channel, epoch, offset, position.offset)
        if missed > limit:
            return Recovery([], position, False)
        return Recovery(pubs, position, complete)

    async def history(
        self,
        channel: Channel,
        *,
        since: StreamPosition | None,
        limit: int,
        reverse: bool,
        until: StreamPosition | None = None,
    ) -> tuple[list[Publication], StreamPosition]:
        """Publications after ``since`` and before ``until`` (both exclusive,
        both optional), oldest first or newest first with ``reverse``: from
        the broker's window when it holds them, else from the durable log."""
        ns = channel.options
        if ns.history_size == 0 and not ns.persist:
            raise errors.NotAvailable("history is off in this namespace")
        after = since.offset if since is not None else None
        before = until.offset if until is not None else None
        try:
            if ns.persist:
                await self._seed_durable(channel)
            if before is None:
                result = await self.broker.history(
                    channel.name, after=after, limit=limit, reverse=reverse
                )
            else:
                # The window is small (history_size): read it whole, then cut.
                result = await self.broker.history(
                    channel.name, after=after, limit=max(ns.history_size, 1), reverse=False
                )
                kept = [p for p in result.publications if p.offset < before]
                result.publications = (kept[::-1] if reverse else kept)[:limit]
        except BrokerUnavailable as exc:
            raise errors.Unavailable(f"broker: {exc}") from None
        position = result.position
        for bound in (since, until):
            if bound is not None and bound.epoch != position.epoch:
                raise errors.Unrecoverable("the stream's epoch has changed")
        pubs = result.publications
        top = position.offset if before is None else min(position.offset, before - 1)
        if (
            ns.persist
            and limit > 0
            and not self._window_covers(
                pubs, after, limit, StreamPosition(top, position.epoch), reverse
            )
        ):
            try:
                pubs = await self.store.read(
                    channel.name,
                    position.epoch,
                    after=after,
                    before=top + 1,
                    limit=limit,
                    reverse=reverse,
                )
            except StoreUnavailable as exc:
                raise errors.Unavailable(f"store: {exc}") from None
        return pubs, position

    @staticmethod
    def _window_covers(
        pubs: list[Publication],
        after: int | None,
        limit: int,
        position: StreamPosition,
        reverse: bool,
    ) -> bool:
        """Whether the broker's window already answers the request in full."""
        wanted = min(limit, position.offset - (after or 0))
        if wanted <= 0:
            return True
        if len(pubs) < wanted:
            return False
        # Oldest first must start right after ``after``; newest first always
        # ends at the top of the stream.
        return reverse or pubs[0].offset == (after or 0) + 1

    async def history_page(self, channel: Channel, params: dict[str, Any]) -> HistoryPage:
        """History as the protocols and the HTTP API ask for it."""
        limit = params.get("limit", 100)
        max_limit = self.settings.limits.max_history_limit
        if type(limit) is not int or limit < 0:
            raise errors.BadRequest("'limit' must be a non-negative integer")
        reverse = params.get("reverse", False)
        if not isinstance(reverse, bool):
            raise errors.BadRequest("'reverse' must be true or false")
        since = self._position_param(params, "since")
        until = self._position_param(params, "until")
        pubs, position = await self.history(
            channel, since=since, until=until, limit=min(limit, max_limit), reverse=reverse
        )
        return HistoryPage(pubs, position.offset, position.epoch)

    async def history_json(self, channel: Channel, params: dict[str, Any]) -> dict[str, Any]:
        """History as Squall's HTTP API answers it."""
        page: dict[str, Any] = protocol.result_json(await self.history_page(channel, params))
        return page

    @staticmethod
    def _position_param(params: dict[str, Any], name: str) -> StreamPosition | None:
        raw = params.get(name)
        if raw is None:
            return None
        if (
            not isinstance(raw, dict)
            or type(raw.get("offset")) is not int
            or raw["offset"] < 0
            or not isinstance(raw.get("epoch"), str)
        ):
            raise errors.BadRequest(f'\'{name}\' must be {{"offset": int >= 0, "epoch": str}}')
        return StreamPosition(raw["offset"], raw["epoch"])

    # ---- search ---------------------------------------------------------

    async def search_json(
        self,
        params: dict[str, Any],
        *,
        channels: list[str] | None = None,
        namespaces: list[str] | None = None,
    ) -> dict[str, Any]:
        """Full-text search over the durable log, as the protocol and the
        API answer it. ``channels``/``namespaces`` bound what the caller may
        see (None: no bound); a ``channel`` parameter narrows it further."""
        if self.search is None:
            raise errors.NotAvailable("search is off: no namespace is searchable")
        try:
            words, phrases = parse_text(params.get("query"))
            after = decode_cursor(params["cursor"]) if params.get("cursor") is not None else None
        except BadSearch as exc:
            raise errors.BadRequest(str(exc)) from None
        if after is not None and not -_MAX_INT64 <= after[0] <= _MAX_INT64:
            raise errors.BadRequest("'cursor' is not one this server gave out")
        limit = params.get("limit", 20)
        max_limit = self.settings.search.max_limit
        if type(limit) is not int or not 1 <= limit:
            raise errors.BadRequest("'limit' must be a positive integer")
        times = {}
        for key in ("since", "until"):
            value = params.get(key)
            # (A search index stores 64-bit integers.)
            if value is not None and (type(value) is not int or not 0 <= value <= _MAX_INT64):
                raise errors.BadRequest(f"'{key}' must be a time in milliseconds since the epoch")
            times[key] = value
        user = params.get("user")
        if user is not None and not isinstance(user, str):
            raise errors.BadRequest("'user' must be a string")
        channel = params.get("channel")
        if channel is not None:
            resolved = self.channels.resolve(channel)
            if not resolved.options.searchable:
                raise errors.NotAvailable(f"namespace {resolved.namespace!r} is not searchable")
            allowed = (channels is None and namespaces is None) or (
                channel in (channels or []) or resolved.namespace in (namespaces or [])
            )
            if not allowed:
                raise errors.PermissionDenied("search only channels you may subscribe to")
            channels, namespaces = [channel], None
        query = SearchQuery(
            words,
            phrases,
            channels=channels,
            namespaces=namespaces,
            user=user,
            since_ms=times["since"],
            until_ms=times["until"],
            limit=min(limit, max_limit),
            after=after,
        )
        if query.channels == [] and not query.namespaces:
            return {"hits": [], "cursor": None}
        try:
            page = await self.search.search(query)
        except SearchUnavailable as exc:
            raise errors.Unavailable(f"search: {exc}") from None
        self.metrics.searches += 1
        return {"hits": [h.to_json() for h in page.hits], "cursor": page.cursor}

    def searchable_namespaces(self, *, anonymous: bool) -> list[str]:
        """Namespaces whose channels any (or any anonymous) client may
        subscribe to without a token, and so search."""
        return [
            name
            for name, ns in self.settings.namespaces.items()
            if ns.searchable and not ns.private and (ns.allow_anonymous or not anonymous)
        ]

    async def _search_forever(self) -> None:
        """Start the search index (retrying while it is away), then index."""
        assert self.search is not None and self.indexer is not None
        delay = 0.2
        while True:
            try:
                await self.search.start()
                break
            except SearchUnavailable as exc:
                log.warning("search %s not reachable yet: %s", self.search.name, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        if self.settings.search.indexer:
            await self.indexer.run_forever()

    async def _expire_forever(self) -> None:
        """Delete publications past their namespace's retention, from the
        log and from the search index."""
        with_retention = {n: ns for n, ns in self.settings.namespaces.items() if ns.retention}
        if not with_retention:
            return
        while self._running:
            await asyncio.sleep(self.settings.store.expire_interval)
            try:
                removed = await self.store.expire()
                if removed:
                    log.info("expired %d publications from the log", removed)
                if self.search is not None and self.search.healthy():
                    now_ms = int(time.time() * 1000)
                    for name, ns in with_retention.items():
                        if ns.searchable:
                            await self.search.expire(name, now_ms - int(ns.retention * 1000))
            except (StoreUnavailable, SearchUnavailable) as exc:
                log.warning("retention sweep failed: %s", exc)

    # ---- presence -------------------------------------------------------

    def _by_user(self, channel: Channel) -> bool:
        """Whether joins and leaves on ``channel`` are told of per user:
        Pusher apps' presence channels."""
        return channel.namespace in self._per_user_presence and channel.name.startswith(
            "presence-", len(channel.namespace) + 1
        )

    async def join(self, channel: Channel, info: ClientInfo) -> None:
        try:
            by_user = self._by_user(channel)
            edge = await self.broker.add_presence(channel.name, info, by_user=by_user)
            first = not edge.user_elsewhere
            if channel.options.join_leave:
                await self.broker.publish_join(channel.name, info, first)
            if self.webhooks is not None and self.webhooks.wants(channel.namespace):
                self._presence_webhooks(channel, info, edge.members == 1, first, joined=True)
        except BrokerUnavailable:
            log.warning("presence join for %s lost: broker unavailable", channel.name)

    async def leave(self, channel: Channel, info: ClientInfo) -> None:
        try:
            user = info.user if self._by_user(channel) else ""
            edge = await self.broker.remove_presence(channel.name, info.client, user=user)
            last = not edge.user_elsewhere
            if channel.options.join_leave:
                await self.broker.publish_leave(channel.name, info, last)
            if self.webhooks is not None and self.webhooks.wants(channel.namespace):
                self._presence_webhooks(channel, info, edge.members == 0, last, joined=False)
        except BrokerUnavailable:
            log.warning("presence leave for %s lost: broker unavailable", channel.name)

    def _presence_webhooks(
        self, channel: Channel, info: ClientInfo, edge: bool, user_edge: bool, *, joined: bool
    ) -> None:
        """A Pusher app's webhooks for a join (``edge``: the channel was
        empty; ``user_edge``: the user's first connection) or a leave (the
        channel is empty now; the user's last connection)."""
        assert self.webhooks is not None
        name = channel.name[len(channel.namespace) + 1 :]
        if name.startswith("#"):
            return  # a user's own channel: no webhooks, as Pusher
        raise_event = self.webhooks.raise_event
        if joined and edge:
            raise_event(channel.namespace, {"name": "channel_occupied", "channel": name})
        if user_edge and name.startswith("presence-"):
            kind = "member_added" if joined else "member_removed"
            raise_event(channel.namespace, {"name": kind, "channel": name, "user_id": info.user})
        if not joined and edge:
            raise_event(channel.namespace, {"name": "channel_vacated", "channel": name})

    # ---- broker callbacks -----------------------------------------------

    def on_publication(self, pub: Publication) -> None:
        self.metrics.deliveries += self.hub.broadcast_pub(pub)

    def on_join(self, channel: str, info: ClientInfo, first: bool = True) -> None:
        # Others learn of the join; the client itself has its subscribe reply.
        self.hub.broadcast_join(channel, info, first)

    def on_leave(self, channel: str, info: ClientInfo, last: bool = True) -> None:
        self.hub.broadcast_leave(channel, info, last)

    def on_unrecoverable(self, channel: str) -> None:
        """Publications were lost on the way here: this node's subscribers of
        ``channel`` reconnect and recover (and learn of any real gap)."""
        sessions = self.hub.sessions(channel)
        if sessions:
            log.warning("%s: lost publications; %d subscribers will recover", channel,
                        len(sessions))  # fmt: skip
        for session in sessions:
            session.disconnect(errors.INSUFFICIENT_STATE)

    def on_control(self, message: bytes) -> None:
        try:
            command = orjson.loads(message)
            op = command["op"]
            user = command["user"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("ignoring a malformed control message")
            return
        sessions = list(self.users.get(user, {}))
        if op == "disconnect":
            how = errors.FORCE_RECONNECT if command.get("reconnect") else errors.FORCE_DISCONNECT
            for session in sessions:
                session.disconnect(how)
        elif op == "unsubscribe":
            channel = command.get("channel")
            for session in sessions:
                if channel in session.subs:
                    self.spawn(self._server_unsubscribe(session, channel))

    async def _server_unsubscribe(self, session: Session, channel: str) -> None:
        await session.unsubscribe(channel)
        session.send(session.codec.unsubscribe(channel, 2000, "server unsubscribe"))

    # ---- cluster-wide control (the API's disconnect and unsubscribe) ----

    async def disconnect_user(self, user: str, *, reconnect: bool = False) -> None:
        """Close every connection of ``user`` on every node: with 3503 (stay
        away), or with 3011 when ``reconnect`` (come back, e.g. elsewhere)."""
        await self._control({"op": "disconnect", "user": user, "reconnect": reconnect})

    async def unsubscribe_user(self, user: str, channel: str) -> None:
        await self._control({"op": "unsubscribe", "user": user, "channel": channel})

    async def _control(self, command: dict[str, Any]) -> None:
        try:
            await self.broker.publish_control(orjson.dumps(command))
        except BrokerUnavailable as exc:
            raise errors.Unavailable(f"broker: {exc}") from None

    # ---- snapshot -------------------------------------------------------

    async def _report_forever(self) -> None:
        interval = self.settings.broker.node_report_interval
        # Not ``while True``: a cancellation that lands inside a client
        # library's own timeout comes out as a timeout error, which this
        # loop would survive; ``close`` clears ``_running`` first.
        while self._running:
            try:
                await self.broker.report_node(self.node_id, self.info())
            except BrokerUnavailable as exc:
                log.debug("node report failed: %s", exc)
            await asyncio.sleep(interval)

    async def cluster_info(self) -> dict[str, Any]:
        """Every live node's stats (this one fresh) and their totals."""
        try:
            nodes = {n["node"]: n for n in await self.broker.nodes() if "node" in n}
        except BrokerUnavailable:
            nodes = {}
        nodes[self.node_id] = self.info()
        listed = sorted(nodes.values(), key=lambda n: str(n["node"]))
        totals = {
            key: sum(int(n.get(key, 0)) for n in listed) for key in ("connections", "subscriptions")
        }
        rates = {
            key: round(sum(float(n.get("rates", {}).get(key, 0)) for n in listed), 2)
            for key in ("publications_in", "deliveries", "messages_out")
        }
        return {"nodes": listed, "totals": {**totals, "nodes": len(listed), "rates": rates}}

    def status_json(self) -> bytes:
        """The /status body, rebuilt at most once a second: dashboards may
        poll it as often as they like."""
        now = time.monotonic()
        if self._status is None or now - self._status[0] >= 1.0:
            body = orjson.dumps({**self.info(), "series": self.metrics.history()})
            self._status = (now, body)
        return self._status[1]

    def info(self) -> dict[str, Any]:
        return {
            "node": self.node_id,
            "pid": os.getpid(),
            "version": self.version,
            "uptime": round(time.time() - self.started_at, 1),
            "connections": len(self.sessions),
            "users": len(self.users),
            "subscriptions": self.hub.subscription_count,
            "channels": self.hub.channel_count,
            "draining": self.draining,
            "rates": self.metrics.rates(),
            "loop_lag": self.metrics.lag_summary(),
            "totals": {
                "publications_in": self.metrics.publications_in,
                "deliveries": self.metrics.deliveries,
                "messages_out": self.metrics.messages_out,
                "slow_disconnects": self.metrics.slow_disconnects,
            },
            "broker": {"name": self.broker.name, "healthy": self.broker.healthy()},
            "store": {"name": self.store.name, "healthy": self.store.healthy()},
            "search": self._search_info(),
        }

    def _search_info(self) -> dict[str, Any]:
        if self.search is None or self.indexer is None:
            return {"name": "off", "healthy": True}
        return {
            "name": self.search.name,
            "healthy": self.search.healthy(),
            "indexed": self.indexer.indexed,
            "failures": self.indexer.failures,
            "last_error": self.indexer.last_error,
        }
