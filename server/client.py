"""A small async Python client for Squall.

``Client`` holds a WebSocket connection: it connects with a token, subscribes,
and when the connection drops with a reconnect code it reconnects with
backoff and recovers every subscription from its last offset, so a
subscriber's iterator yields each publication once and in order. A
resubscribe that fails for a temporary reason (a timeout, 114 unavailable...)
is retried with backoff; one the server refuses for good (103 permission
denied, 102 unknown channel...) ends that subscription with
``SubscriptionEnded``. A live publication that skips offsets makes the
subscription recover the missing range before it hands out anything newer.

``ApiClient`` calls the HTTP server API with an API key; ``batch`` sends many
commands (made with ``command``) in one request; ``connect_stream`` opens an
``ApiStream``, one WebSocket carrying API commands pipelined.

    client = Client("ws://127.0.0.1:8000/connection/websocket", token=token)
    await client.connect()
    sub = await client.subscribe("news")
    async for pub in sub:
        print(pub.offset, pub.data)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import tornado.httpclient
import tornado.websocket
from tornado.iostream import StreamClosedError

log = logging.getLogger("squall.client")


class ReplyError(Exception):
    """The server answered a command with an error."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ConnectionClosed(Exception):
    """The connection closed and will not be reopened."""

    def __init__(self, code: int | None, reason: str | None) -> None:
        super().__init__(f"connection closed: {code} {reason}")
        self.code = code
        self.reason = reason


class SubscriptionEnded(ConnectionClosed):
    """A subscription ended by the server's refusal: after a reconnect (or to
    recover a gap) the server answered its ``subscribe`` with a permanent
    error (``error``, a ``ReplyError``: 103 permission denied, 102 unknown
    channel...), or temporary errors went on past ``max_reconnects``
    attempts. ``Subscription.get`` raises it and iterating the subscription
    raises it; the connection itself stays up. A ``ConnectionClosed``, so
    code that catches that keeps working."""

    def __init__(self, channel: str, error: BaseException) -> None:
        code = error.code if isinstance(error, ReplyError) else None
        super().__init__(code, f"subscription to {channel} ended: {error}")
        self.channel = channel
        self.error = error


# Subscribe errors worth retrying on the same connection (with backoff):
# 100 internal, 105 already subscribed (a subscribe the client gave up on
# that the server completed: it unsubscribes first), 111 too many requests,
# 114 unavailable. Every other error code ends the subscription.
TEMPORARY_SUBSCRIBE_ERRORS = frozenset({100, 105, 111, 114})


def _transport_error(exc: BaseException) -> bool:
    """An exception from the socket layer that means the connection is gone
    (uvloop raises ``RuntimeError("... the handler is closed")`` on a write
    to a transport that was closed under it)."""
    if isinstance(exc, (tornado.websocket.WebSocketClosedError, StreamClosedError)):
        return True
    return isinstance(exc, RuntimeError) and "handler is closed" in str(exc)


@dataclass(slots=True)
class ClientPublication:
    channel: str
    offset: int
    epoch: str
    data: Any
    info: dict[str, Any] | None = None
    time_ms: int = 0


@dataclass(slots=True)
class Subscription:
    channel: str
    token: str | None = None
    offset: int = 0
    epoch: str = ""
    recovered: bool | None = None
    # Bounded: a consumer that stops reading stops the client reading, and
    # the server then disconnects it as slow; it recovers when it reconnects.
    queue: asyncio.Queue[ClientPublication | None] = field(
        default_factory=lambda: asyncio.Queue(maxsize=10000)
    )
    gaps: int = 0  # times recovery reported a position it could not restore
    # Whether the channel's history lets a recovery restore what was missed
    # (the last subscribe reply's ``recoverable``).
    recoverable: bool = False
    # Set when the server refused the subscription for good (see
    # ``SubscriptionEnded``); the subscription is then no longer the client's.
    error: SubscriptionEnded | None = None
    # Live publications are handed out only once the (re)subscribe on the
    # current connection was answered; until then they are left to the
    # recovery that answer carries.
    _live: bool = field(default=False, repr=False)
    _established: bool = field(default=False, repr=False)
    _task: asyncio.Task[None] | None = field(default=None, repr=False)
    _again: bool = field(default=False, repr=False)  # a gap showed while _task ran

    @property
    def active(self) -> bool:
        """False once the subscription ended (``error``, or unsubscribed)."""
        return self.error is None and self._established

    def __aiter__(self) -> AsyncIterator[ClientPublication]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[ClientPublication]:
        while True:
            pub = await self.queue.get()
            if pub is None:
                if self.error is not None:
                    raise self.error
                return
            yield pub

    async def get(self, timeout: float = 10.0) -> ClientPublication:
        pub = await asyncio.wait_for(self.queue.get(), timeout)
        if pub is None:
            if self.error is not None:
                raise self.error
            raise ConnectionClosed(None, "subscription ended")
        return pub


def _should_reconnect(code: int | None) -> bool:
    # Abnormal closes (no code, 1006, 1001, 1011, 1013) and 3000-3499 reconnect.
    if code is None or code in (1001, 1006, 1011, 1012, 1013):
        return True
    return 3000 <= code < 3500


class Client:
    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        get_token: Callable[[], Awaitable[str]] | None = None,
        reconnect: bool = True,
        min_backoff: float = 0.05,
        max_backoff: float = 5.0,
        command_timeout: float = 10.0,
        max_reconnects: int = 100,
    ) -> None:
        self.url = url
        self.token = token
        self.get_token = get_token
        self.reconnect = reconnect
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.command_timeout = command_timeout
        self.max_reconnects = max_reconnects
        self.client_id: str | None = None
        self.node: str | None = None  # the server node of the current connection
        self.subscriptions: dict[str, Subscription] = {}
        self.pushes: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=10000)
        self.connects = 0
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self._ws: tornado.websocket.WebSocketClientConnection | None = None
        self._next_id = 0
        self._waiters: dict[int, asyncio.Future[Any]] = {}
        self._hooks: dict[int, Callable[[Any], Awaitable[None]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._closing = False
        self._connected = asyncio.Event()
        self._failed: BaseException | None = None
        # Tasks that belong to the current connection ((re)subscribes, gap
        # recoveries): cancelled when it ends, so none acts on the next one.
        self._tasks: set[asyncio.Task[None]] = set()
        self._generation = 0  # counts connections opened

    # ---- connection -----------------------------------------------------

    async def connect(self) -> dict[str, Any]:
        """Open the connection and send ``connect``; raises ``ReplyError`` if
        the server refuses the token."""
        result = await self._open()
        self._reader = asyncio.get_running_loop().create_task(self._read_forever())
        return result

    async def _open(self) -> dict[str, Any]:
        if self.get_token is not None:
            self.token = await self.get_token()
        self._ws = await tornado.websocket.websocket_connect(
            self.url, max_message_size=64 * 1024 * 1024
        )
        params = {"token": self.token} if self.token else {}
        try:
            self._send({"id": self._new_id(), "method": "connect", "params": params})
            reply = await self._read_reply()
        except BaseException:
            self._ws.close()
            raise
        if "error" in reply:
            self._ws.close()
            raise ReplyError(reply["error"]["code"], reply["error"]["message"])
        result: dict[str, Any] = reply["result"]
        self.client_id = result["client"]
        self.node = result.get("node")
        self.connects += 1
        self._generation += 1
        self._connected.set()
        return result

    async def _read_reply(self) -> dict[str, Any]:
        """Read messages until the first reply (only during connect)."""
        assert self._ws is not None
        while True:
            frame = await self._read_frame(self.command_timeout)
            if frame is None:
                raise ConnectionClosed(self._ws.close_code, self._ws.close_reason)
            for line in _lines(frame):
                msg = orjson.loads(line)
                if "id" in msg:
                    return dict(msg)
                await self._on_push(msg)

    async def _read_frame(self, timeout: float | None = None) -> str | bytes | None:
        """The next frame, or None when the connection has ended (closed, or
        its transport failed)."""
        assert self._ws is not None
        try:
            if timeout is None:
                return await self._ws.read_message()
            return await asyncio.wait_for(self._ws.read_message(), timeout)
        except (tornado.websocket.WebSocketClosedError, StreamClosedError, RuntimeError) as exc:
            if not _transport_error(exc):
                raise
            log.debug("read failed: %r", exc)
            return None

    async def close(self) -> None:
        self._closing = True
        self._cancel_tasks()
        if self._ws is not None:
            self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._fail_waiters(ConnectionClosed(None, "client closed"))
        for sub in self.subscriptions.values():
            with contextlib.suppress(asyncio.QueueFull):
                sub.queue.put_nowait(None)

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- commands -------------------------------------------------------

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _send(self, obj: dict[str, Any]) -> None:
        """Write one command; raises ``ConnectionClosed`` (never a transport
        exception) when the connection is gone, and then makes sure the
        reader sees it end (so the client reconnects)."""
        ws = self._ws
        if ws is None:
            raise ConnectionClosed(None, "not connected")
        try:
            ws.write_message(orjson.dumps(obj).decode()).add_done_callback(_write_done)
        except (tornado.websocket.WebSocketClosedError, StreamClosedError, RuntimeError) as exc:
            if not _transport_error(exc):
                raise
            log.debug("write failed: %r", exc)
            if ws is self._ws:
                # Close our side: the reader then ends this connection and
                # reconnects (3009, write error, is a reconnect code).
                with contextlib.suppress(Exception):
                    ws.close(3009, "write error")
            raise ConnectionClosed(ws.close_code, ws.close_reason or "write failed") from None

    async def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        on_result: Callable[[Any], Awaitable[None]] | None = None,
    ) -> Any:
        """Send one command and wait for its reply. ``on_result`` runs in the
        reader before it reads the next message. Raises ``ReplyError`` (an
        error reply), ``ConnectionClosed`` (the connection ended first, or
        could not send) or ``TimeoutError`` (no reply within
        ``command_timeout``: the server may still have run it)."""
        if self._failed is not None:
            raise self._failed
        if not self._connected.is_set():
            await asyncio.wait_for(self._connected.wait(), self.command_timeout)
        cmd_id = self._new_id()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters[cmd_id] = fut
        if on_result is not None:
            self._hooks[cmd_id] = on_result
        try:
            self._send({"id": cmd_id, "method": method, "params": params or {}})
            return await asyncio.wait_for(fut, self.command_timeout)
        finally:
            # A late reply finds no waiter (and no hook): it is dropped.
            self._waiters.pop(cmd_id, None)
            self._hooks.pop(cmd_id, None)

    def _send_unsubscribe(self, channel: str) -> None:
        """Unsubscribe without waiting for the answer. The server runs a
        connection's commands in order, so a ``subscribe`` sent after it
        finds the channel free even if a subscribe the client gave up on
        (timeout) completed meanwhile."""
        self._send({"id": self._new_id(), "method": "unsubscribe", "params": {"channel": channel}})

    async def subscribe(
        self, channel: str, *, token: str | None = None, recover_from: tuple[int, str] | None = None
    ) -> Subscription:
        """Subscribe; ``recover_from=(offset, epoch)`` first replays what came
        after that position. Raises ``ReplyError``, ``ConnectionClosed`` or
        ``TimeoutError`` when this first subscribe fails (the subscription is
        then not kept); after that, the client keeps it across reconnects."""
        if channel in self.subscriptions:
            raise ReplyError(105, "already subscribed")
        sub = Subscription(channel, token)
        if recover_from is not None:
            sub.offset, sub.epoch = recover_from
        self.subscriptions[channel] = sub
        try:
            await self._subscribe(sub, recover=recover_from is not None)
        except BaseException as exc:
            if self.subscriptions.get(channel) is sub:
                del self.subscriptions[channel]
            if isinstance(exc, TimeoutError | asyncio.CancelledError):
                # The server may complete it later: undo it there too.
                with contextlib.suppress(ConnectionClosed):
                    self._send_unsubscribe(channel)
            raise
        return sub

    async def _subscribe(self, sub: Subscription, *, recover: bool) -> None:
        params: dict[str, Any] = {"channel": sub.channel}
        if sub.token:
            params["token"] = sub.token
        if recover:
            params.update(recover=True, offset=sub.offset, epoch=sub.epoch)

        async def on_result(result: dict[str, Any]) -> None:
            # Runs in the reader, before it reads on: recovered publications
            # are handed out before any live one that follows the reply.
            if recover:
                sub.recovered = result.get("recovered", False)
                if not sub.recovered:
                    sub.gaps += 1
            for pub in result.get("publications", []):
                await self._deliver(sub, pub)
            if sub.epoch == result["epoch"]:
                sub.offset = max(sub.offset, result["offset"])
            else:
                sub.offset = result["offset"]
            sub.epoch = result["epoch"]
            sub.recoverable = bool(result.get("recoverable", False))
            sub._established = True
            sub._live = True

        await self.call("subscribe", params, on_result=on_result)

    async def unsubscribe(self, channel: str) -> None:
        sub = self.subscriptions.pop(channel, None)
        if sub is not None:
            sub._established = False
            sub._live = False
            if sub._task is not None:
                sub._task.cancel()
        await self.call("unsubscribe", {"channel": channel})
        if sub is not None:
            with contextlib.suppress(asyncio.QueueFull):
                sub.queue.put_nowait(None)

    async def publish(self, channel: str, data: Any) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("publish", {"channel": channel, "data": data})
        return result

    async def history(self, channel: str, **params: Any) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("history", {"channel": channel, **params})
        return result

    async def presence(self, channel: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("presence", {"channel": channel})
        return result["presence"]  # type: ignore[no-any-return]

    async def search(self, query: str, **params: Any) -> dict[str, Any]:
        """Full-text search over the channels this client may subscribe to:
        ``{"hits": [...], "cursor": ...}``."""
        result: dict[str, Any] = await self.call("search", {"query": query, **params})
        return result

    async def refresh(self, token: str) -> dict[str, Any]:
        self.token = token
        result: dict[str, Any] = await self.call("refresh", {"token": token})
        return result

    # ---- resubscribing ----------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` as a task of the current connection."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _cancel_tasks(self) -> None:
        """The connection ended: stop its tasks (they may take a moment to
        finish; the next connection starts its own regardless)."""
        tasks, self._tasks = self._tasks, set()
        for task in tasks:
            task.cancel()
        for sub in self.subscriptions.values():
            sub._task = None
            sub._again = False

    def _resubscribe_later(self, sub: Subscription, *, reset: bool) -> None:
        """Start (unless it runs already) the task that subscribes ``sub``
        again on this connection and recovers from its position."""
        sub._live = False
        if sub._task is not None and not sub._task.done():
            # Its subscribe was answered, yet it has not finished: go again.
            sub._again = True
            return
        sub._again = False
        sub._task = self._spawn(self._resubscribe(sub, self._generation, reset=reset))

    async def _resubscribe(self, sub: Subscription, generation: int, *, reset: bool) -> None:
        """Subscribe ``sub`` on connection ``generation`` with recovery from
        its last position, retrying temporary failures with backoff; a
        permanent failure ends the subscription (``SubscriptionEnded``).
        ``reset``: unsubscribe first (the server may hold the channel already:
        a subscribe that timed out here but completed there, or a gap)."""
        attempts = 0
        while True:
            if (
                generation != self._generation
                or not self._connected.is_set()
                or self.subscriptions.get(sub.channel) is not sub
            ):
                return  # another connection (or nobody) owns it now
            attempts += 1
            try:
                if reset:
                    self._send_unsubscribe(sub.channel)
                await self._subscribe(sub, recover=bool(sub.epoch))
                if not sub._again:
                    return
                sub._again = False  # a gap already: recover it
                reset, attempts = True, 0
                continue
            except ConnectionClosed:
                return  # the next connection resubscribes
            except TimeoutError as exc:
                # The server may yet complete it: start from a clean slate.
                reset = True
                error: BaseException = exc
            except ReplyError as exc:
                if exc.code not in TEMPORARY_SUBSCRIBE_ERRORS:
                    self._end_subscription(sub, exc)
                    return
                reset = exc.code == 105
                error = exc
            log.info("resubscribe to %s failed (attempt %d): %s", sub.channel, attempts, error)
            if attempts >= self.max_reconnects:
                self._end_subscription(sub, error)
                return
            delay = min(self.max_backoff, self.min_backoff * 2 ** min(attempts, 16))
            await asyncio.sleep(delay * (0.5 + random.random() / 2))

    def _end_subscription(self, sub: Subscription, error: BaseException) -> None:
        """The server will not take ``sub``: drop it and tell the application
        (``get`` and iteration raise ``SubscriptionEnded``)."""
        log.warning("subscription to %s ended: %s", sub.channel, error)
        if self.subscriptions.get(sub.channel) is sub:
            del self.subscriptions[sub.channel]
        sub.error = SubscriptionEnded(sub.channel, error)
        sub._live = False
        sub._established = False
        with contextlib.suppress(asyncio.QueueFull):
            sub.queue.put_nowait(None)

    # ---- reading --------------------------------------------------------

    async def _read_forever(self) -> None:
        attempts = 0
        while True:
            assert self._ws is not None
            frame = await self._read_frame()
            if frame is not None:
                attempts = 0
                for line in _lines(frame):
                    await self._on_message(orjson.loads(line))
                continue
            self.close_code = self._ws.close_code
            self.close_reason = self._ws.close_reason
            self._ws.close()  # release it on our side too
            self._connected.clear()
            self._cancel_tasks()
            for sub in self.subscriptions.values():
                sub._live = False
            self._fail_waiters(ConnectionClosed(self.close_code, self.close_reason))
            if self._closing or not self.reconnect or not _should_reconnect(self.close_code):
                self._finish(ConnectionClosed(self.close_code, self.close_reason))
                return
            while True:
                attempts += 1
                if attempts > self.max_reconnects:
                    self._finish(ConnectionClosed(self.close_code, "gave up reconnecting"))
                    return
                delay = min(self.max_backoff, self.min_backoff * 2 ** min(attempts, 16))
                await asyncio.sleep(delay * (0.5 + random.random() / 2))
                try:
                    await self._open()
                except ReplyError as exc:
                    self._finish(exc)
                    return
                except (
                    OSError,
                    ConnectionClosed,
                    TimeoutError,
                    tornado.httpclient.HTTPClientError,
                    tornado.websocket.WebSocketClosedError,
                    StreamClosedError,
                ) as exc:
                    log.debug("reconnect failed: %s", exc)
                    continue
                except RuntimeError as exc:
                    if not _transport_error(exc):
                        raise
                    log.debug("reconnect failed: %s", exc)
                    continue
                break
            # Resubscribe and recover in the background (replies need this
            # task to keep reading), one task per subscription, all of them
            # cancelled if this connection ends too.
            for sub in list(self.subscriptions.values()):
                if sub._established:
                    self._resubscribe_later(sub, reset=False)

    def _finish(self, error: BaseException) -> None:
        self._failed = error
        self._cancel_tasks()
        for sub in self.subscriptions.values():
            with contextlib.suppress(asyncio.QueueFull):
                sub.queue.put_nowait(None)

    def _fail_waiters(self, error: BaseException) -> None:
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(error)

    async def _on_message(self, msg: dict[str, Any]) -> None:
        if "id" in msg:
            fut = self._waiters.get(msg["id"])
            if fut is None or fut.done():
                # A reply to a command the client gave up on (timeout), or
                # to an unsubscribe it did not wait for.
                return
            if "error" in msg:
                fut.set_exception(ReplyError(msg["error"]["code"], msg["error"]["message"]))
                return
            hook = self._hooks.pop(msg["id"], None)
            if hook is not None:
                await hook(msg.get("result"))
            if not fut.done():
                fut.set_result(msg.get("result"))
            return
        await self._on_push(msg)

    async def _on_push(self, msg: dict[str, Any]) -> None:
        if msg.get("push") == "pub":
            sub = self.subscriptions.get(msg["channel"])
            if sub is not None:
                await self._on_live(sub, msg["pub"])
            return
        if self.pushes.full():
            self.pushes.get_nowait()
        self.pushes.put_nowait(msg)

    async def _on_live(self, sub: Subscription, pub: dict[str, Any]) -> None:
        """A live publication: handed out only if it follows on from the
        subscription's position. One that skips offsets (same epoch) makes
        the subscription recover the missing range first (a resubscribe with
        ``recover``: what it could not restore is reported as a gap, through
        ``recovered``/``gaps``); where the channel is not recoverable the gap
        is reported at once and the publication handed out."""
        if not sub._live:
            # Its (re)subscribe is not answered yet: the answer's recovery
            # covers this publication.
            return
        if sub.epoch and sub.epoch == pub["epoch"] and pub["offset"] > sub.offset + 1:
            if sub.recoverable:
                log.info(
                    "%s: offset %d after %d, recovering the gap",
                    sub.channel,
                    pub["offset"],
                    sub.offset,
                )
                self._resubscribe_later(sub, reset=True)
                return
            sub.recovered = False
            sub.gaps += 1
        await self._deliver(sub, pub)

    async def _deliver(self, sub: Subscription, pub: dict[str, Any]) -> None:
        # The de-duplication guard: never hand out an offset twice.
        if sub.epoch == pub["epoch"] and pub["offset"] <= sub.offset:
            return
        sub.offset = pub["offset"]
        sub.epoch = pub["epoch"]
        await sub.queue.put(
            ClientPublication(
                sub.channel,
                pub["offset"],
                pub["epoch"],
                pub["data"],
                pub.get("info"),
                pub.get("time", 0),
            )
        )


def _lines(frame: str | bytes) -> list[bytes]:
    if isinstance(frame, str):
        frame = frame.encode()
    return [line for line in frame.split(b"\n") if line]


def command(method: str, /, **params: Any) -> dict[str, Any]:
    """One command for ``ApiClient.batch``:
    ``command("publish", channel="news", data={"title": "hello"})``."""
    return {"method": method, "params": params}


class ApiError(Exception):
    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(f"HTTP {status}, error {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def _write_done(fut: asyncio.Future[None]) -> None:
    """A write that fails once under way (the connection closed while it was
    flushed) is seen by the reader as the connection's end; its error is
    taken here so that asyncio does not report it as never retrieved."""
    if not fut.cancelled():
        fut.exception()


class ApiClient:
    """The HTTP server API. Every method raises ``ApiError`` on an error reply."""

    def __init__(self, base_url: str, api_key: str, *, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self._http = tornado.httpclient.AsyncHTTPClient()

    async def _post(self, method: str, body: dict[str, Any], answer: str) -> Any:
        """POST ``body`` to ``/api/<method>``; the ``answer`` field of the
        reply, or ``ApiError`` (an error reply, an HTTP error, no answer)."""
        request = tornado.httpclient.HTTPRequest(
            f"{self.base_url}/api/{method}",
            method="POST",
            body=orjson.dumps(body),
            headers={"Authorization": f"apikey {self.api_key}", "Content-Type": "application/json"},
            request_timeout=self.timeout,
        )
        response = await self._http.fetch(request, raise_error=False)
        if response.code == 599:
            raise ApiError(599, 0, str(response.error))
        try:
            payload = orjson.loads(response.body) if response.body else {}
        except orjson.JSONDecodeError:
            payload = None
        if not isinstance(payload, dict):
            # Not our server's answer: a proxy's error page (HAProxy's 503
            # when no node is up), or something else on that address.
            excerpt = response.body[:80].decode("utf-8", "replace").strip()
            raise ApiError(response.code, 0, f"not a JSON object from the server: {excerpt!r}")
        if response.code >= 400 or "error" in payload or answer not in payload:
            err = payload.get("error", {})
            raise ApiError(response.code, err.get("code", 0), err.get("message", "error"))
        return payload[answer]

    async def call(self, method: str, body: dict[str, Any] | None = None) -> Any:
        return await self._post(method, body or {}, "result")

    async def batch(
        self, commands: Iterable[Mapping[str, Any]], *, stop_on_error: bool = False
    ) -> list[dict[str, Any]]:
        """Run many commands in one request (``POST /api/batch``; build them
        with ``command``). Returns one reply per command, in order: each is
        ``{"result": ...}`` or ``{"error": {"code", "message"}}`` (a failed
        command does not raise). Raises ``ApiError`` when the server refuses
        the whole request (too many commands, too large, a malformed command,
        a wrong key); then nothing was run."""
        body: dict[str, Any] = {"commands": list(commands)}
        if stop_on_error:
            body["stop_on_error"] = True
        replies: list[dict[str, Any]] = await self._post("batch", body, "replies")
        return replies

    async def publish(self, channel: str, data: Any) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("publish", {"channel": channel, "data": data})
        return result

    async def connect_stream(self) -> ApiStream:
        """Open an ``ApiStream`` (``GET /api/connection/websocket``) with this
        client's URL and key. Raises ``ApiError`` when the server refuses it."""
        stream = ApiStream(self.base_url, self.api_key, timeout=self.timeout)
        await stream.connect()
        return stream

    async def broadcast(self, channels: list[str], data: Any) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("broadcast", {"channels": channels, "data": data})
        return result

    async def history(self, channel: str, **params: Any) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("history", {"channel": channel, **params})
        return result

    async def presence(self, channel: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("presence", {"channel": channel})
        return result

    async def info(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("info")
        return result

    async def search(self, query: str, **params: Any) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("search", {"query": query, **params})
        return result


class ApiStream:
    """The server API over one WebSocket (``docs/api.md``, "API stream").

    ``call`` and ``publish`` send the command at once and return a future of
    its result, so many are in flight together; ``ReplyError`` is raised
    from an error reply, ``ConnectionClosed`` when the connection ends
    first::

        stream = await api.connect_stream()
        replies = [stream.publish("news", n) for n in range(1000)]
        results = await asyncio.gather(*replies)
        await stream.close()

    The server reads no faster than it answers, so a sender that awaits its
    replies now and then (in chunks of a few thousand) keeps this side's
    buffers small too.
    """

    def __init__(self, base_url: str, api_key: str, *, timeout: float = 10.0) -> None:
        url = base_url.rstrip("/")
        if url.startswith("http"):
            url = "ws" + url[len("http") :]
        self.url = f"{url}/api/connection/websocket"
        self.api_key = api_key
        self.timeout = timeout
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self._ws: tornado.websocket.WebSocketClientConnection | None = None
        self._next_id = 0
        self._waiters: dict[int, asyncio.Future[Any]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._closed: ConnectionClosed | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    async def connect(self) -> None:
        request = tornado.httpclient.HTTPRequest(
            self.url,
            headers={"Authorization": f"apikey {self.api_key}"},
            connect_timeout=self.timeout,
            request_timeout=self.timeout,
        )
        try:
            self._ws = await tornado.websocket.websocket_connect(
                request, max_message_size=64 * 1024 * 1024
            )
        except tornado.httpclient.HTTPClientError as exc:
            body = exc.response.body if exc.response is not None else b""
            try:
                err = orjson.loads(body).get("error", {}) if body else {}
            except orjson.JSONDecodeError:
                err = {}
            raise ApiError(exc.code, err.get("code", 0), err.get("message", str(exc))) from None
        self._reader = asyncio.get_running_loop().create_task(self._read_forever())

    @property
    def pending(self) -> int:
        """Commands sent and not yet answered."""
        return len(self._waiters)

    def call(self, method: str, params: dict[str, Any] | None = None) -> asyncio.Future[Any]:
        """Send one command; the future resolves to its ``result``."""
        if self._closed is not None:
            raise self._closed
        if self._ws is None:
            raise ConnectionClosed(None, "not connected")
        self._next_id += 1
        cmd_id = self._next_id
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters[cmd_id] = fut
        self._idle.clear()
        try:
            self._ws.write_message(
                orjson.dumps({"id": cmd_id, "method": method, "params": params or {}}).decode()
            ).add_done_callback(_write_done)
        except tornado.websocket.WebSocketClosedError:
            self._waiters.pop(cmd_id, None)
            raise ConnectionClosed(self._ws.close_code, self._ws.close_reason) from None
        return fut

    def publish(self, channel: str, data: Any) -> asyncio.Future[Any]:
        """The future resolves to ``{"offset": ..., "epoch": ...}``."""
        return self.call("publish", {"channel": channel, "data": data})

    async def drain(self) -> None:
        """Wait until every command sent is answered (or the connection ends)."""
        await asyncio.wait_for(self._idle.wait(), self.timeout)

    async def close(self) -> None:
        """Wait (up to ``timeout``) for the replies still due, then close.
        Commands still unanswered fail with ``ConnectionClosed``."""
        if self._ws is None:
            return
        if self._closed is None:
            with contextlib.suppress(TimeoutError):
                await self.drain()
        self._ws.close()
        if self._reader is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._reader), self.timeout)
            if not self._reader.done():
                self._reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._reader
        self._end(ConnectionClosed(None, "client closed"))

    async def __aenter__(self) -> ApiStream:
        if self._ws is None:
            await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _read_forever(self) -> None:
        ws = self._ws
        assert ws is not None
        while True:
            frame = await ws.read_message()
            if frame is None:
                self.close_code = ws.close_code
                self.close_reason = ws.close_reason
                self._end(ConnectionClosed(self.close_code, self.close_reason))
                return
            for line in _lines(frame):
                msg = orjson.loads(line)
                fut = self._waiters.pop(msg.get("id"), None)
                if fut is None or fut.done():
                    continue
                if "error" in msg:
                    fut.set_exception(ReplyError(msg["error"]["code"], msg["error"]["message"]))
                else:
                    fut.set_result(msg.get("result"))
            if not self._waiters:
                self._idle.set()

    def _end(self, error: ConnectionClosed) -> None:
        if self._closed is None:
            self._closed = error
        waiters, self._waiters = self._waiters, {}
        for fut in waiters.values():
            if not fut.done():
                fut.set_exception(error)
                fut.exception()  # retrieved: nobody may be waiting for it
        self._idle.set()
