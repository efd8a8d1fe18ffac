"""One client's state machine, independent of the transport.

A ``Session`` takes frames from its transport (``handle_frame``) and pushes
from the hub (``push_pub``, ``push``), and writes everything through one
bounded send queue. It never touches a socket: the transport behind it is a
WebSocket, an SSE stream, or a test double.

Send queue: messages wait in a list until the ``Flusher`` runs (once per event
loop iteration for all sessions with something to send); all messages waiting
for one session go out in one transport write. While a write is still
unflushed (the client reads slowly), new messages wait in the queue; when the
queue passes ``send_queue_bytes`` or ``send_queue_messages``, the session is
closed with ``SLOW`` and the client recovers from history. Memory per
connection is therefore bounded by about twice the byte limit.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import orjson

from server import errors
from server.broker import BrokerUnavailable
from server.channels import Channel
from server.codec import (
    EMPTY,
    Codec,
    Command,
    ConnectResult,
    Empty,
    HistoryPage,
    InvalidCommand,
    PresenceResult,
    PresenceStatsResult,
    ProtocolViolation,
    PublishResult,
    RefreshResult,
    Result,
    SubRefreshResult,
    SubscribeResult,
)
from server.errors import Disconnect, SquallError
from server.models import ClientInfo, StreamPosition
from server.protocol import SQUALL, connect_json
from server.proxy import (
    KEEP,
    TRY_AGAIN_LATER,
    ConnectGrant,
    ConnectionMeta,
    HookDisconnect,
    HookError,
    ProxyUnavailable,
)

if TYPE_CHECKING:
    from server.metrics import Metrics
    from server.node import Node

# Seconds a subscription outlives its expired token, for a refresh on the
# way (as Centrifugo's default grace).
SUB_EXPIRY_GRACE = 25.0

# Publishes of one client in flight at once (pipelined brokers only); past
# it, the client's next command waits, and so does reading its socket.
MAX_INFLIGHT_PUBLISHES = 256

log = logging.getLogger("squall.session")

T = TypeVar("T")

# The empty send queue, shared by every session (never appended to).
_NOTHING: list[bytes] = []


class Transport(Protocol):
    """What a session needs from its connection."""

    kind: str

    def send(self, items: list[bytes]) -> Awaitable[None] | None:
        """Write the messages in one go. Return None when they are flushed to
        the socket, or an awaitable that completes when they are. ``items``
        may be the very list other sessions are given: read it, never change
        it."""
        ...

    def close(self, disconnect: Disconnect) -> None:
        """Close the connection with the disconnect's code and reason, after
        whatever ``send`` was already given."""
        ...


class State(IntEnum):
    CONNECTING = 0
    CONNECTED = 1
    CLOSED = 2


# Module constants for the per-delivery loops (a global load, not an
# attribute lookup on the enum class).
_CONNECTED = State.CONNECTED
_CLOSED = State.CLOSED


class Flusher:
    """The send side of every session of this process.

    Sessions with something queued are written once per loop iteration, so a
    burst of publications to one client costs one write, not one each.
    ``fan_out`` and ``_write`` run once per delivery: they reach into the
    sessions' send queues directly rather than through a method call each.
    """

    __slots__ = ("_loop", "_pending", "_scheduled", "metrics")

    def __init__(self, metrics: Metrics) -> None:
        self._pending: list[Session] = []
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.metrics = metrics

    def mark(self, session: Session) -> None:
        self._pending.append(session)
        if not self._scheduled:
            self._schedule()

    def _schedule(self) -> None:
        self._scheduled = True
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._loop.call_soon(self._run)

    def fan_out(
        self, sessions: Iterable[Session], channel: str, offset: int, message: bytes
    ) -> None:
        """Queue one publication for each of ``sessions``.

        Subscribers whose queues hold the same (shared) list get the same new
        list: ``[message]`` for an idle one, the previous list plus
        ``message`` within a burst. So a publication costs one list, not one
        per subscriber, and the transport's frame cache matches the list by
        identity. A session with messages of its own gets an append, and one
        setting up its subscription goes through ``Session.push_pub``.
        """
        shared = [message]
        size = len(message)
        pending = self._pending
        before: list[bytes] | None = None  # a shared queue seen last ...
        after = shared  # ... and what it becomes
        for session in sessions:
            if session._buffering is not None or session.state is not _CONNECTED:
                session.push_pub(channel, offset, message)
                continue
            queue = session._queue
            if not queue:
                session._queue = shared
                session._shared = True
                session._qbytes = size
            elif session._shared:
                if queue is not before:
                    before = queue
                    after = [*queue, message]
                session._queue = queue = after
                session._qbytes += size
            else:
                queue.append(message)
                session._qbytes += size
            if session._qbytes > session._max_bytes or len(queue) > session._max_messages:
                session.overflow()
                continue
            if not session._pending:
                session._pending = True
                pending.append(session)
        if pending and not self._scheduled:
            self._schedule()

    def _run(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        self.metrics.messages_out += self._write(pending)

    def _write(self, sessions: list[Session]) -> int:
        """Write each session's queue in one transport write; returns how
        many messages went out."""
        written = 0
        for session in sessions:
            session._pending = False
            items = session._queue
            if not items or session._writing or session.state is _CLOSED:
                continue
            session._queue = _NOTHING
            session._shared = True
            session._qbytes = 0
            try:
                waiter = session.transport.send(items)
            except Exception:
                log.debug("write failed for %s", session.client_id, exc_info=True)
                session.disconnect(errors.WRITE_ERROR, flush=False)
                continue
            written += len(items)
            if waiter is not None:
                session._writing = True
                asyncio.ensure_future(waiter).add_done_callback(session._on_written)
        return written


class _RateLimiter:
    """A token bucket: ``rate`` commands per second, bursts up to ``burst``."""

    __slots__ = ("_burst", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._stamp = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


def _ttl(exp: float) -> int:
    """Whole seconds left until ``exp``, counted as the token's own clock
    does (whole seconds since the epoch)."""
    return max(0, int(exp) - int(time.time()))


def _int_param(params: dict[str, Any], name: str, default: int | None = None) -> int | None:
    value = params.get(name, default)
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise errors.BadRequest(f"'{name}' must be a non-negative integer")
    return value


def _str_param(params: dict[str, Any], name: str, *, required: bool = False) -> str | None:
    value = params.get(name)
    if value is None:
        if required:
            raise errors.BadRequest(f"'{name}' is required")
        return None
    if not isinstance(value, str):
        raise errors.BadRequest(f"'{name}' must be a string")
    return value


def _bool_param(params: dict[str, Any], name: str) -> bool:
    value = params.get(name, False)
    if not isinstance(value, bool):
        raise errors.BadRequest(f"'{name}' must be true or false")
    return value


class _Joining:
    """One subscription being set up.

    Until its reply is out, the channel's publications wait in ``held``.
    After it, publications at or below ``floor`` (the offset the reply gave)
    are dropped until the first one past it: they were still on their way
    to this node when the stream reported a position that counts them, and
    the client has them already or was told it is past them.
    """

    __slots__ = ("floor", "held")

    def __init__(self) -> None:
        self.held: list[tuple[int, bytes]] | None = []
        self.floor = 0


class Session:
    __slots__ = (
        "_buffering",
        "_channel_info",
        "_deferred",
        "_hook_expiry",
        "_inflight",
        "_max_bytes",
        "_max_messages",
        "_pending",
        "_qbytes",
        "_queue",
        "_shared",
        "_sub_expiry",
        "_timer",
        "_token_channels",
        "_writing",
        "client_id",
        "codec",
        "created",
        "exp",
        "info",
        "limiter",
        "meta",
        "node",
        "state",
        "subs",
        "transport",
        "user",
    )

    def __init__(
        self,
        node: Node,
        transport: Transport,
        codec: Codec = SQUALL,
        meta: ConnectionMeta | None = None,
    ) -> None:
        self.node = node
        self.transport = transport
        self.codec = codec
        # The connection's request, as the proxy hooks see it (None: no hooks).
        self.meta = meta
        # The expiry came from the connect hook and the refresh hook renews it:
        # the server calls that hook when the session expires.
        self._hook_expiry = False
        self.client_id = codec.client_id()
        self.user = ""
        self.info = ClientInfo(self.client_id, "")
        self.state = State.CONNECTING
        self.exp = 0.0
        self.subs: dict[str, Channel] = {}
        # Who this connection is on a channel's presence where a codec said
        # so (Pusher's channel_data); elsewhere ``info``.
        self._channel_info: dict[str, ClientInfo] | None = None
        self.created = time.monotonic()
        limits = node.settings.limits
        self.limiter = _RateLimiter(limits.commands_per_second, limits.command_burst)
        # The send-queue limits, read once: send() runs per delivery.
        self._max_bytes = limits.send_queue_bytes
        self._max_messages = limits.send_queue_messages
        # An empty queue is the shared _NOTHING; _shared means the list is not
        # this session's own and is copied before an append.
        self._queue: list[bytes] = _NOTHING
        self._shared = True
        self._qbytes = 0
        self._pending = False
        self._writing = False
        # Channels whose subscription is being set up; any entry sends this
        # session's publications through push_pub rather than the fast path.
        self._buffering: dict[str, _Joining] | None = None
        self._timer: asyncio.TimerHandle | None = None
        # Private subscriptions whose token expires, where the protocol can
        # refresh one (sub_refresh): channel -> the check at expiry.
        self._sub_expiry: dict[str, asyncio.TimerHandle] | None = None
        self._token_channels: list[str] = []
        # While set, subscriptions being set up release their held
        # publications only when the caller says (after a connect reply that
        # carries them).
        self._deferred: list[Callable[[], None]] | None = None
        # Publishes in flight, oldest first; their replies go out in order.
        self._inflight: collections.deque[asyncio.Future[bytes | Disconnect]] | None = None
        self._set_timer(limits.connect_timeout, self._on_connect_timeout)

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def queued_bytes(self) -> int:
        """Bytes of messages queued for this client, not yet written."""
        return self._qbytes

    @property
    def queued_messages(self) -> int:
        return len(self._queue)

    def __repr__(self) -> str:
        return f"<Session {self.client_id} user={self.user!r} {self.state.name}>"

    # ---- timers ---------------------------------------------------------

    def _set_timer(self, delay: float, callback: Callable[[], None]) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(max(0.0, delay), callback)

    def _on_connect_timeout(self) -> None:
        if self.state is State.CONNECTING:
            self.disconnect(errors.CONNECT_TIMEOUT)

    def _on_token_expired(self) -> None:
        if self.state is not State.CONNECTED or not self.exp:
            return
        if self._hook_expiry:
            self._hook_expiry = False  # one call at a time; set again on success
            self.node.spawn(self._refresh_by_hook())
            return
        # Past the token's expiry by the protocol's grace: a refresh that is
        # on its way at the moment of expiry still lands.
        left = self.exp + self.codec.expiry_grace - time.time()
        if left <= 0:
            self.disconnect(errors.EXPIRED)
        else:
            self._set_timer(left, self._on_token_expired)

    # ---- sending --------------------------------------------------------

    def send(self, message: bytes) -> None:
        """Queue one encoded message; disconnect with SLOW past the limits."""
        if self.state is State.CLOSED:
            return
        if self._shared:
            # Empty (the shared _NOTHING), or the list a fan-out gave all its
            # subscribers: copy on write. (A list once handed to a transport
            # is never changed: its frame cache matches lists by identity.)
            self._queue = queue = [*self._queue, message]
            self._shared = False
        else:
            queue = self._queue
            queue.append(message)
        self._qbytes += len(message)
        if self._qbytes > self._max_bytes or len(queue) > self._max_messages:
            self.overflow()
            return
        if not self._pending:
            self._pending = True
            self.node.flusher.mark(self)

    def overflow(self) -> None:
        """The send queue passed its limits: the client reads too slowly."""
        self.node.metrics.slow_disconnects += 1
        self.disconnect(errors.SLOW, flush=False)

    def push_pub(self, channel: str, offset: int, message: bytes) -> None:
        """A publication from the hub (``Flusher.fan_out``). While the
        channel's subscription is being set up, it waits in a buffer so
        nothing slips between the recovered history and the live stream;
        just after, what the subscribe reply covered is not sent again."""
        buffering = self._buffering
        if buffering is not None:
            joining = buffering.get(channel)
            if joining is not None:
                held = joining.held
                if held is not None:
                    held.append((offset, message))
                    if len(held) > self._max_messages:
                        self.overflow()
                    return
                if offset <= joining.floor:
                    return
                self._stop_buffering(channel)
        self.send(message)

    def flush(self) -> int:
        """Write what is queued now; returns how many messages went out."""
        return self.node.flusher._write([self])

    def _on_written(self, fut: asyncio.Future[None]) -> None:
        self._writing = False
        if fut.cancelled() or fut.exception() is not None:
            self.disconnect(errors.WRITE_ERROR, flush=False)
            return
        if self._queue and not self._pending:
            self._pending = True
            self.node.flusher.mark(self)

    # ---- closing --------------------------------------------------------

    def disconnect(self, disconnect: Disconnect, *, flush: bool = True) -> None:
        """Close with ``disconnect``; queued messages go first when ``flush``."""
        if self.closed:
            return
        if flush and self._queue and not self._writing:
            self.node.metrics.messages_out += self.flush()
        self.state = State.CLOSED
        self._queue = _NOTHING
        self._shared = True
        self._qbytes = 0
        self.node.metrics.count_disconnect(disconnect)
        try:
            self.transport.close(disconnect)
        except Exception:
            log.debug("close failed for %s", self.client_id, exc_info=True)
        self._teardown()

    def transport_closed(self) -> None:
        """The transport saw the connection go (the peer left, or we closed)."""
        if not self.closed:
            self.state = State.CLOSED
            self._queue = _NOTHING
            self._shared = True
        self._teardown()

    def _teardown(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        expiry, self._sub_expiry = self._sub_expiry, None
        for handle in (expiry or {}).values():
            handle.cancel()
        # Leave the hub on the next loop iteration: the hub may be iterating
        # over this channel's subscribers right now.
        self.node.forget_session_soon(self)

    # ---- commands -------------------------------------------------------

    async def handle_frame(self, frame: bytes | str) -> None:
        """Handle one frame from the client. Never raises."""
        if self.closed:
            return
        if isinstance(frame, str):
            frame = frame.encode("utf-8", "surrogatepass")
        try:
            commands = self.codec.decode(frame)
        except ProtocolViolation as exc:
            log.debug("bad frame from %s: %s", self.client_id, exc)
            self.disconnect(self.codec.violation())
            return
        for command in commands:
            if self.closed:
                return
            if not self.limiter.allow():
                self._reply(self.codec.error(command, errors.TooManyRequests()))
                continue
            if isinstance(command, InvalidCommand):
                self.node.metrics.count_error(command.error.code)
                self._reply(self.codec.error(command, command.error))
                continue
            if self._pipelined and command.method == "publish":
                await self._begin_publish(command)
                continue
            await self._settle()
            await self._dispatch(command)

    # ---- pipelined publishes ----------------------------------------------
    #
    # On a broker that keeps concurrent publishes in call order (Redis: one
    # pipeline per round trip), a client's consecutive publishes do not wait
    # for each other: a burst costs a few round trips instead of one each, and
    # reaches subscribers together. Replies still go out in command order, and
    # any other command waits until the publishes before it are answered.

    @property
    def _pipelined(self) -> bool:
        return (
            self.state is State.CONNECTED
            and self.node.broker.ordered_publish
            and not self.node.hooked_publish
        )

    async def _begin_publish(self, command: Command) -> None:
        if self._inflight is not None and len(self._inflight) >= MAX_INFLIGHT_PUBLISHES:
            await asyncio.wait((self._inflight[0],))
            self._send_answered()  # may empty the queue (and drop it)
        inflight = self._inflight
        if inflight is None:
            inflight = self._inflight = collections.deque()
        task = asyncio.get_running_loop().create_task(self._answer(command))
        task.add_done_callback(self._send_answered)
        inflight.append(task)

    async def _answer(self, command: Command) -> bytes | Disconnect:
        self.node.metrics.count_command(command.method)
        try:
            result = await self._cmd_publish(command.params)
        except SquallError as exc:
            self.node.metrics.count_error(exc.code)
            return self.codec.error(command, exc)
        except Exception:
            log.exception("publish failed for %s", self.client_id)
            self.node.metrics.count_error(errors.InternalError.code)
            return self.codec.error(command, errors.InternalError())
        return self.codec.reply(command, result)

    def _reply(self, reply: bytes | Disconnect) -> None:
        """Send a reply that is ready now, after the replies still in flight
        (or close, where the protocol answers an error that way)."""
        inflight = self._inflight
        if inflight:
            ready: asyncio.Future[bytes | Disconnect] = asyncio.get_running_loop().create_future()
            ready.set_result(reply)
            inflight.append(ready)
        else:
            self._send_or_close(reply)

    def _send_or_close(self, reply: bytes | Disconnect) -> None:
        if isinstance(reply, Disconnect):
            self.disconnect(reply)
        elif reply:  # (a protocol may answer nothing)
            self.send(reply)

    def _send_answered(self, _task: object = None) -> None:
        """Send the replies at the head of the in-flight queue that are ready."""
        inflight = self._inflight
        while inflight and inflight[0].done():
            task = inflight.popleft()
            if not task.cancelled() and not self.closed:
                self._send_or_close(task.result())
        if not inflight:
            self._inflight = None

    async def _settle(self) -> None:
        """Wait until every publish in flight is answered."""
        while self._inflight:
            await asyncio.wait(tuple(self._inflight))
            self._send_answered()

    async def _dispatch(self, command: Command) -> None:
        method = command.method
        self.node.metrics.count_command(method)
        result: Result
        try:
            if method == "connect":
                result = await self._connect(command.params)
                if self.codec.subs_in_connect:
                    assert isinstance(result, ConnectResult)
                    self._deferred = []
                    result.subs = await self._subscribe_token_channels(command.params)
            elif self.state is not State.CONNECTED:
                raise errors.NotConnected("send 'connect' first")
            elif method not in self.codec.methods:
                raise errors.MethodNotFound(f"unknown method {method!r}")
            else:
                handler = getattr(self, "_cmd_" + method)
                result = await handler(command.params)
        except SquallError as exc:
            self._release_deferred()
            self.node.metrics.count_error(exc.code)
            if not self.closed:
                self._send_or_close(self.codec.error(command, exc))
            if (
                method == "connect"
                and self.state is State.CONNECTING
                and self.codec.close_on_connect_error
            ):
                close = errors.EXPIRED if isinstance(exc, errors.TokenExpired) else None
                if isinstance(exc, errors.Unauthorized):
                    close = errors.INVALID_TOKEN
                elif isinstance(exc, ProxyUnavailable):
                    # The back end's check failed: reconnect later (1013).
                    close = TRY_AGAIN_LATER
                if close is not None:
                    self.disconnect(close)
            return
        except Exception:
            self._release_deferred()
            log.exception("command %s failed for %s", method, self.client_id)
            self.node.metrics.count_error(errors.InternalError.code)
            self._send_or_close(self.codec.error(command, errors.InternalError()))
            return
        if not self.closed:
            reply = self.codec.reply(command, result)
            if reply:  # (a protocol may answer nothing)
                self.send(reply)
            deferred, self._deferred = self._deferred, None
            if method == "connect":
                if deferred is not None:
                    for release in deferred:
                        release()
                else:
                    # Server-side subscriptions from the token follow the reply.
                    await self._subscribe_token_channels(command.params)

    def _release_deferred(self) -> None:
        """Subscriptions set up for a reply that will not go out still
        release what they hold (after this iteration, as usual)."""
        deferred, self._deferred = self._deferred, None
        loop = asyncio.get_running_loop()
        for release in deferred or ():
            loop.call_soon(release)

    async def _connect(self, params: dict[str, Any]) -> ConnectResult:
        if self.state is not State.CONNECTING:
            raise errors.BadRequest("already connected")
        quota = self.codec.max_connections
        if quota and self.node.codec_sessions.get(self.codec, 0) > quota:
            raise errors.LimitExceeded("the application is over its connection quota")
        token = params.get("token")
        channels: list[str] = []
        proxy = self.node.proxy
        hook = proxy is not None and bool(proxy.connect_url)
        grant: ConnectGrant | None = None
        if token is None or token == "":
            if hook:
                assert proxy is not None
                grant = await self._hook(proxy.connect(self, params))
            elif not self.node.channels.any_anonymous and not self.codec.connect_on_open:
                # (A protocol whose server connects its clients on open
                # authorizes each channel itself: Pusher's signatures.)
                raise errors.Unauthorized("a token is required")
            self.user = ""
            self.exp = 0.0
        else:
            claims = await self.node.auth.verify_connection_token_async(token)
            if self.closed:  # went away while the key set was refetched
                raise errors.Unauthorized("connection closed")
            if hook and proxy is not None and proxy.connect_with_token:
                grant = await self._hook(proxy.connect(self, params, token_user=claims.user))
            self.user = claims.user
            self.exp = claims.exp
            self.info = ClientInfo(self.client_id, claims.user, claims.info)
            channels = claims.channels
        if grant is not None:
            # The back end's answer decides: user, info, channels and expiry.
            if self.closed:
                raise errors.Unauthorized("connection closed")
            assert proxy is not None
            self.user = grant.user
            self.exp = float(grant.expire_at)
            self.info = ClientInfo(self.client_id, grant.user, grant.info)
            channels = grant.channels
            self._hook_expiry = bool(grant.expire_at and proxy.refresh_url)
        if len(channels) > self.node.settings.limits.max_channels_per_connection:
            raise errors.LimitExceeded("token grants more channels than allowed per connection")
        for name in channels:
            self.node.channels.resolve(name)
        self.state = State.CONNECTED
        self._token_channels = channels
        self.node.register_user(self)
        if self.exp:
            self._set_timer(self.exp - time.time(), self._on_token_expired)
        elif self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return self._connect_result()

    def _connect_result(self) -> ConnectResult:
        return ConnectResult(
            client=self.client_id,
            version=self.node.version,
            node=self.node.node_id,
            ping=self.node.settings.limits.ping_interval,
            # A session the refresh hook renews is not the client's to refresh.
            expires=bool(self.exp) and not self._hook_expiry,
            ttl=_ttl(self.exp) if self.exp and not self._hook_expiry else None,
        )

    async def _hook(self, call: Awaitable[T]) -> T:
        """Await a proxy hook; its ``disconnect`` answer closes the connection."""
        try:
            return await call
        except HookDisconnect as exc:
            self.disconnect(exc.disconnect)
            raise

    async def _subscribe_token_channels(
        self, params: dict[str, Any] | None = None
    ) -> dict[str, SubscribeResult]:
        """Subscribe the channels the connection token names, recovering
        those the connect command asks to (``subs``: channel -> recover,
        offset, epoch). With ``subs_in_connect`` the results are returned for
        the connect reply; otherwise each goes out as a push."""
        channels, self._token_channels = self._token_channels, []
        wanted = (params or {}).get("subs") or {}
        if not isinstance(wanted, dict):
            wanted = {}
        results: dict[str, SubscribeResult] = {}
        for name in channels:
            if self.state is not State.CONNECTED:
                break
            recovery = wanted.get(name)
            try:
                result = await self._subscribe(
                    self.node.channels.resolve(name),
                    recovery if isinstance(recovery, dict) else {},
                    server=True,
                )
            except SquallError as exc:
                self.send(self.codec.unsubscribe(name, exc.code, exc.message))
                continue
            if self.codec.subs_in_connect:
                results[name] = result
            else:
                self.send(self.codec.subscribed(name, result))
        return results

    async def open_stream(self, token: str | None) -> None:
        """Connect a one-way transport (SSE); raises ``SquallError`` if the
        connection is refused. The result goes out as a ``connect`` push;
        ``subscribe_stream`` comes next."""
        self.node.metrics.count_command("connect")
        await self._connect({"token": token} if token else {})
        self.send(orjson.dumps({"push": "connect", **connect_json(self._connect_result())}))

    async def subscribe_stream(self, requests: list[tuple[str, StreamPosition | None]]) -> None:
        """Subscribe a connected one-way transport to the token's channels
        and ``requests``. Results arrive as pushes: per channel ``subscribe``
        (or ``unsubscribe`` with the error) followed by each recovered
        publication as a ``pub``."""
        await self._subscribe_token_channels()
        for name, position in requests:
            if self.state is not State.CONNECTED:
                return
            params: dict[str, Any] = {}
            if position is not None:
                params = {"recover": True, "offset": position.offset, "epoch": position.epoch}
            try:
                result = await self._subscribe(
                    self.node.channels.resolve(name), params, server=False
                )
            except SquallError as exc:
                self.send(self.codec.unsubscribe(name, exc.code, exc.message))
                continue
            # The subscribe push (without publications), then each recovered
            # publication as a push of its own.
            self.send(
                self.codec.subscribed(name, replace(result, publications=[], recovering=False))
            )
            for pub in result.publications:
                self.send(self.codec.pub(pub))

    async def _cmd_subscribe(self, params: dict[str, Any]) -> SubscribeResult:
        name = params.get("channel")
        channel = self.node.channels.resolve(name)
        return await self._subscribe(channel, params, server=False)

    async def _subscribe(
        self, channel: Channel, params: dict[str, Any], *, server: bool
    ) -> SubscribeResult:
        name = channel.name
        ns = channel.options
        if name in self.subs:
            raise errors.AlreadySubscribed()
        if len(self.subs) >= self.node.settings.limits.max_channels_per_connection:
            raise errors.LimitExceeded("too many channels on this connection")
        recover = _bool_param(params, "recover")
        offset = _int_param(params, "offset")
        epoch = _str_param(params, "epoch")
        token_exp = 0.0
        proxy = self.node.proxy
        hook = None if proxy is None or server else proxy.subscribe_urls.get(channel.namespace)
        grant = None if server else self.codec.authorize("subscribe", self.client_id, name, params)
        if grant is not None:
            # The protocol authorized it by its own rules (Pusher's signatures).
            if grant.info is not None:
                if self._channel_info is None:
                    self._channel_info = {}
                self._channel_info[name] = grant.info
        elif hook is not None and not (ns.private and params.get("token")):
            # The back end decides instead of allow_anonymous and subscription
            # tokens (a token, when sent to a private channel, still counts).
            assert proxy is not None
            await self._hook(proxy.subscribe(hook, self, name, params.get("data", KEEP)))
            if self.closed:
                raise errors.PermissionDenied("connection closed")
        elif not server:
            if not self.user and not ns.allow_anonymous:
                raise errors.PermissionDenied("anonymous clients cannot subscribe here")
            if ns.private:
                token = params.get("token")
                if token is None:
                    raise errors.PermissionDenied("a subscription token is required")
                token_exp = await self._verify_subscription_token(token, name)
        if recover and (offset is None or epoch is None):
            raise errors.BadRequest("'recover' needs 'offset' and 'epoch'")
        # Register first and hold live publications, then read the position or
        # the missed history, then release what is newer: no gap, no repeat.
        if self._buffering is None:
            self._buffering = {}
        joining = self._buffering[name] = _Joining()
        self.subs[name] = channel
        try:
            await self.node.subscribe_session(self, channel)
            result: SubscribeResult
            if recover and ns.recover:
                assert offset is not None and epoch is not None
                recovery = await self.node.recover(channel, offset, epoch)
                result = SubscribeResult(
                    offset=recovery.position.offset,
                    epoch=recovery.position.epoch,
                    recoverable=True,
                    recovered=recovery.recovered,
                    recovering=True,
                    recovered_from=offset,
                    publications=recovery.publications,
                )
                self.node.metrics.count_recovery(recovery.recovered)
            else:
                position = await self.node.position(channel)
                result = SubscribeResult(
                    offset=position.offset,
                    epoch=position.epoch,
                    recoverable=ns.recover,
                    recovered=False if recover else None,
                )
            if token_exp:
                result.ttl = _ttl(token_exp)
                self._expire_subscription_at(name, token_exp)
        except BaseException:
            self._stop_buffering(name)
            self.subs.pop(name, None)
            if self._channel_info is not None:
                self._channel_info.pop(name, None)
            self.node.drop_subscription(self, name)
            raise
        if self.closed:
            return result
        # The reply goes first (the caller sends it, with any recovered
        # publications); held publications after. The client is now at the
        # reply's offset, recovered or not.
        release = functools.partial(self._release, name, joining, result.offset, result.epoch)
        if self._deferred is not None:
            self._deferred.append(release)
        else:
            asyncio.get_running_loop().call_soon(release)
        if ns.presence:
            if self.codec.presence_on_subscribe:
                # The reply lists the members, this connection among them.
                await self.node.join(channel, self.presence_info(name))
                try:
                    result.presence = await self.node.broker.presence(name)
                except BrokerUnavailable:
                    result.presence = {self.client_id: self.presence_info(name)}
            else:
                # After the reply, so the client sees its subscription first.
                self.node.spawn(self.node.join(channel, self.presence_info(name)))
        return result

    def presence_info(self, name: str) -> ClientInfo:
        """Who this connection is on channel ``name``'s presence."""
        if self._channel_info is not None:
            info = self._channel_info.get(name)
            if info is not None:
                return info
        return self.info

    def _stop_buffering(self, name: str) -> None:
        if self._buffering is not None:
            self._buffering.pop(name, None)
            if not self._buffering:
                self._buffering = None

    def _release(self, name: str, joining: _Joining, last: int, epoch: str) -> None:
        """Send what arrived while the subscription was set up and is newer
        than the reply's ``last`` offset. If this node has not yet delivered
        up to ``last`` (Redis counted publications still on their way here),
        keep dropping those at or below it until they have passed."""
        if self._buffering is None or self._buffering.get(name) is not joining:
            return  # unsubscribed (or closed) meanwhile
        held, joining.held = joining.held or [], None
        for offset, message in held:
            if offset > last:
                self.send(message)
        delivered = self.node.broker.delivered(name)
        if delivered is not None and delivered.epoch == epoch and delivered.offset < last:
            joining.floor = last
        else:
            self._stop_buffering(name)

    async def _cmd_unsubscribe(self, params: dict[str, Any]) -> Empty:
        name = _str_param(params, "channel", required=True)
        assert name is not None
        if name in self.subs:
            await self.unsubscribe(name)
        return EMPTY

    async def unsubscribe(self, name: str) -> None:
        if self._sub_expiry is not None:
            handle = self._sub_expiry.pop(name, None)
            if handle is not None:
                handle.cancel()
        channel = self.subs.pop(name, None)
        self._stop_buffering(name)
        if channel is None:
            return
        await self.node.unsubscribe_session(self, channel)
        if self._channel_info is not None:
            self._channel_info.pop(name, None)

    async def _cmd_publish(self, params: dict[str, Any]) -> PublishResult:
        channel = self.node.channels.resolve(params.get("channel"))
        ns = channel.options
        grant = self.codec.authorize("publish", self.client_id, channel.name, params)
        if grant is not None:
            # A protocol's own kind of publication (a Pusher client event):
            # its rules, from a subscriber of the channel.
            if channel.name not in self.subs:
                raise errors.PermissionDenied("subscribe to the channel before sending to it")
            info = self.presence_info(channel.name)
            made = self.codec.publication(params, info)
            if made is None:
                raise errors.BadRequest("nothing to publish")
            limit = self.node.settings.limits.max_publication_bytes
            if len(made) > limit:
                raise errors.MessageTooLarge(f"data is {len(made)} bytes; the limit is {limit}")
            pub = await self.node.publish(channel, made, info=info)
            return PublishResult(pub.offset, pub.epoch)
        proxy = self.node.proxy
        hook = None if proxy is None else proxy.publish_urls.get(channel.namespace)
        if hook is None:
            if not ns.allow_publish:
                raise errors.PermissionDenied("clients may not publish in this namespace")
            if not self.user and not ns.allow_anonymous:
                raise errors.PermissionDenied("anonymous clients cannot publish here")
        if ns.private and channel.name not in self.subs:
            raise errors.PermissionDenied("subscribe to a private channel before publishing")
        data = self.node.publication_data(params)
        if hook is not None:
            # The back end decides instead of allow_publish and allow_anonymous,
            # and may replace the data.
            assert proxy is not None
            replaced = await self._hook(proxy.publish(hook, self, channel.name, params["data"]))
            if self.closed:
                raise errors.PermissionDenied("connection closed")
            if replaced is not KEEP:
                data = self.node.publication_data({"data": replaced})
        pub = await self.node.publish(channel, data, info=self.info)
        return PublishResult(pub.offset, pub.epoch)

    def _subscribed_channel(self, params: dict[str, Any]) -> Channel:
        channel = self.node.channels.resolve(params.get("channel"))
        if channel.name not in self.subs:
            raise errors.NotSubscribed("subscribe to the channel first")
        return channel

    async def _cmd_history(self, params: dict[str, Any]) -> HistoryPage:
        channel = self._subscribed_channel(params)
        return await self.node.history_page(channel, params)

    async def _cmd_search(self, params: dict[str, Any]) -> dict[str, Any]:
        # Only over channels this client may subscribe to: any channel of a
        # public namespace it may use, and the private channels it holds.
        private = [n for n, c in self.subs.items() if c.options.private and c.options.searchable]
        return await self.node.search_json(
            params,
            channels=private,
            namespaces=self.node.searchable_namespaces(anonymous=not self.user),
        )

    async def _presence(self, params: dict[str, Any]) -> dict[str, ClientInfo]:
        channel = self._subscribed_channel(params)
        if not channel.options.presence:
            raise errors.NotAvailable("presence is off in this namespace")
        try:
            return await self.node.broker.presence(channel.name)
        except BrokerUnavailable as exc:
            raise errors.Unavailable(f"broker: {exc}") from None

    async def _cmd_presence(self, params: dict[str, Any]) -> PresenceResult:
        return PresenceResult(await self._presence(params))

    async def _cmd_presence_stats(self, params: dict[str, Any]) -> PresenceStatsResult:
        members = await self._presence(params)
        return PresenceStatsResult(len(members), len({m.user for m in members.values()}))

    async def _cmd_refresh(self, params: dict[str, Any]) -> RefreshResult:
        proxy = self.node.proxy
        if not params.get("token") and proxy is not None and proxy.refresh_url:
            # No token: the refresh hook decides (cookie sessions).
            grant = await self._hook(proxy.refresh(self))
            if self.closed:
                raise errors.Unauthorized("connection closed")
            if grant.expired:
                raise errors.TokenExpired("the application ended this session")
            self.exp = float(grant.expire_at)
            self._set_timer(self.exp - time.time(), self._on_token_expired)
            return RefreshResult(self.client_id, self.node.version, True, _ttl(self.exp))
        if not self.user and not self.exp:
            raise errors.BadRequest("anonymous connections have no token to refresh")
        claims = await self.node.auth.verify_connection_token_async(params.get("token"))
        if claims.user != self.user:
            raise errors.Unauthorized("token is for another user")
        self.exp = claims.exp
        self._set_timer(self.exp - time.time(), self._on_token_expired)
        return RefreshResult(self.client_id, self.node.version, True, _ttl(self.exp))

    async def _refresh_by_hook(self) -> None:
        """The session's expiry came from the connect hook: ask the refresh
        hook for a new one, or close (3005 when the back end ends it, 1013
        to reconnect later when the hook failed)."""
        proxy = self.node.proxy
        assert proxy is not None
        try:
            grant = await proxy.refresh(self)
        except HookDisconnect as exc:
            self.disconnect(exc.disconnect)
            return
        except ProxyUnavailable:
            self.disconnect(TRY_AGAIN_LATER)
            return
        except HookError:
            self.disconnect(errors.EXPIRED)
            return
        if self.closed:
            return
        if grant.expired:
            self.disconnect(errors.EXPIRED)
            return
        self.exp = float(grant.expire_at)
        self._hook_expiry = True
        self._set_timer(self.exp - time.time(), self._on_token_expired)

    async def _cmd_sub_refresh(self, params: dict[str, Any]) -> SubRefreshResult:
        """A fresh subscription token for a private channel held now."""
        channel = self._subscribed_channel(params)
        if not channel.options.private:
            raise errors.BadRequest("only a private channel has a token to refresh")
        exp = await self._verify_subscription_token(params.get("token"), channel.name)
        self._expire_subscription_at(channel.name, exp)
        return SubRefreshResult(True, _ttl(exp))

    def _expire_subscription_at(self, name: str, exp: float) -> None:
        """End the subscription ``name`` when its token expires, unless it is
        refreshed first: only where the protocol can refresh it (Squall's
        own has no ``sub_refresh``, and its private subscriptions last)."""
        if "sub_refresh" not in self.codec.methods:
            return
        if self._sub_expiry is None:
            self._sub_expiry = {}
        old = self._sub_expiry.pop(name, None)
        if old is not None:
            old.cancel()
        delay = max(0.0, exp - time.time()) + SUB_EXPIRY_GRACE
        loop = asyncio.get_running_loop()
        self._sub_expiry[name] = loop.call_later(delay, self._subscription_expired, name)

    def _subscription_expired(self, name: str) -> None:
        if self._sub_expiry is not None:
            self._sub_expiry.pop(name, None)
        if self.closed or name not in self.subs:
            return
        # Unsubscribed with a code that asks the client to subscribe again
        # (and so to fetch a new token).
        self.node.spawn(self.unsubscribe(name))
        self.send(self.codec.unsubscribe(name, 2501, "subscription expired"))

    async def _verify_subscription_token(self, token: object, channel: str) -> float:
        try:
            exp = await self.node.auth.verify_subscription_token_async(
                token, user=self.user, client=self.client_id, channel=channel
            )
        except SquallError as exc:
            raise errors.BadSubscriptionToken(
                f"subscription token: {exc.message}",
                expired=isinstance(exc, errors.TokenExpired),
            ) from None
        if self.closed:  # went away while the key set was refetched
            raise errors.BadSubscriptionToken("connection closed")
        return exp

    async def _cmd_signin(self, params: dict[str, Any]) -> dict[str, Any]:
        """A protocol's sign-in on an open connection (Pusher's
        ``pusher:signin``): the codec checks it, the connection becomes its
        user's, and subscribes to what the grant names (the user's channel)."""
        grant = self.codec.authorize("signin", self.client_id, "", params)
        if grant is None or grant.info is None:
            raise errors.MethodNotFound("this protocol has no signin")
        if self.user and self.user != grant.info.user:
            raise errors.BadRequest("already signed in as another user")
        previous, self.user = self.user, grant.info.user
        self.info = grant.info
        self.node.register_user(self, previous)
        for name in grant.channels:
            if name not in self.subs:
                await self._subscribe(self.node.channels.resolve(name), {}, server=True)
        return {}

    async def _cmd_rpc(self, params: dict[str, Any]) -> Empty:
        raise errors.NotAvailable("this server has no RPC handlers")

    async def _cmd_ping(self, params: dict[str, Any]) -> Empty:
        return EMPTY
