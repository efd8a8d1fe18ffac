"""The server HTTP API: ``POST /api/<method>`` with ``Authorization: apikey
<key>`` and a JSON object body, and ``POST /api/batch`` with many commands in
one request. ``docs/api.md`` is the contract.

Every method checks its whole input before it acts, so a bad request changes
nothing.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import tornado.web
from tornado.http1connection import HTTP1Connection
from tornado.httputil import HTTPServerRequest
from tornado.iostream import StreamClosedError

from handlers.base import JSONHandler, MethodNotAllowed
from server import errors
from server.channels import Channel
from server.config import LimitSettings
from server.errors import SquallError
from server.node import Node
from server.session import MAX_INFLIGHT_PUBLISHES

log = logging.getLogger("squall.api")

# GET /api/search query parameters that are numbers.
_SEARCH_INTS = ("limit", "since", "until")

# Publications of one batch in flight at once; past it, the batch waits for
# the oldest before it starts another.
MAX_BATCH_INFLIGHT = MAX_INFLIGHT_PUBLISHES

# A chunked batch body over the limit is still read (and dropped) up to this
# many times the limit, then answered 413; past that the 413 comes at once and
# the connection is closed, as for any other oversized request.
_DISCARD_FACTOR = 4

NDJSON = "application/x-ndjson"

# Tornado's own body limit while an API handler streams a body in: the
# handler answers 413 itself (docs/api.md).
_NO_LIMIT = 1 << 62


def max_body_size(limits: LimitSettings) -> int:
    """HTTP request bodies, a batch's too: one publication plus room for a
    broadcast's channel list or a batch's commands (docs/api.md says why a
    batch gets no more)."""
    return limits.max_publication_bytes + 1024 * 1024


ApiCall = Callable[[dict[str, Any]], Awaitable[Any]]
Reply = dict[str, Any]


def presented_api_key(request: HTTPServerRequest) -> str | None:
    """The key of ``Authorization: apikey <key>``, or None."""
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "apikey":
        return None
    return key.strip()


@tornado.web.stream_request_body
class ApiHandler(JSONHandler):
    """``POST /api/<method>`` (and ``GET /api/search``).

    The body is streamed in (and joined into ``self.request.body`` before
    ``post()`` runs) so that one announced or grown over the limit is
    answered with the JSON 413 at once, without reading it."""

    _chunks: list[bytes]
    _received: int
    _limit: int

    def prepare(self) -> None:
        self._chunks = []
        self._received = 0
        self._limit = max_body_size(self.node.settings.limits)
        if self._refuse_announced_body():
            return
        connection = self.request.connection
        if isinstance(connection, HTTP1Connection):
            # data_received answers 413 once a chunked body is past what we
            # read; Tornado's own limit (a bare 400, and before the chunk
            # reaches us) must not come first.
            connection.set_max_body_size(_NO_LIMIT)
        # Registered before Tornado awaits the same future, so it runs first:
        # post() finds the whole body in self.request.body.
        self.request._body_future.add_done_callback(self._body_complete)

    def _read_limit(self) -> int:
        """Bytes of body read before the request is refused with a 413 and
        the connection closed."""
        return self._limit

    def data_received(self, chunk: bytes) -> None:
        self._received += len(chunk)
        if self._received <= self._limit:
            self._chunks.append(chunk)
            return
        self._chunks = []
        if self._received > self._read_limit() and not self._finished:
            self._refuse_body(
                errors.MessageTooLarge(
                    f"body is over {self._read_limit()} bytes; the limit is {self._limit}"
                )
            )

    def _body_complete(self, body: asyncio.Future[None]) -> None:
        if not body.cancelled() and body.exception() is None:
            self.request.body = b"".join(self._chunks)

    def _refuse_announced_body(self) -> bool:
        """Answer 413 now if ``Content-Length`` is over the limit."""
        try:
            announced = int(self.request.headers.get("Content-Length", ""))
        except ValueError:
            return False  # none, or Tornado refuses it as malformed
        if announced <= self._limit:
            return False
        connection = self.request.connection
        if isinstance(connection, HTTP1Connection):
            # After this answer Tornado starts reading the body (and drops
            # it) until the answer is written and the connection closed; its
            # own check of the length would append a bare 400.
            connection.set_max_body_size(announced)
        self._refuse_body(
            errors.MessageTooLarge(f"body is {announced} bytes; the limit is {self._limit}")
        )
        return True

    def _refuse_body(self, error: SquallError) -> None:
        """The JSON 413 before the body is read; the connection closes after
        it (the only way not to read the rest)."""
        self.node.metrics.count_error(error.code)
        self.set_header("Connection", "close")
        self.write_squall_error(error)
        body = self.request._body_future
        if not body.done():
            # The handler is done; Tornado must not wait for a body it will
            # not hand over once the answer is written.
            body.set_exception(StreamClosedError())
            body.exception()

    def _allowed(self, method: str) -> tuple[str, ...] | None:
        """The HTTP methods ``/api/<method>`` answers, None for no such
        method."""
        if method == "search":
            return ("GET", "POST")
        if method == "batch" or method in self._methods():
            return ("POST",)
        return None

    def _wrong_verb(self, method: str) -> None:
        """405 with ``Allow`` for an API method; 404 for no such method."""
        allowed = self._allowed(method)
        if allowed is None:
            self.write_squall_error(errors.MethodNotFound(f"unknown API method {method!r}"))
            return
        self.set_header("Allow", ", ".join(allowed))
        self.write_squall_error(
            MethodNotAllowed(
                f"/api/{method} takes {' or '.join(allowed)}, not {self.request.method}"
            )
        )

    async def put(self, method: str) -> None:
        self._wrong_verb(method)

    async def delete(self, method: str) -> None:
        self._wrong_verb(method)

    async def patch(self, method: str) -> None:
        self._wrong_verb(method)

    async def head(self, method: str) -> None:
        self._wrong_verb(method)

    async def options(self, method: str) -> None:
        self._wrong_verb(method)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        if status_code == 405:
            # A verb Tornado does not take at all (answered before prepare).
            name = self.request.path.rpartition("/")[2]
            self.set_header("Allow", ", ".join(self._allowed(name) or ("POST",)))
        super().write_error(status_code, **kwargs)

    async def get(self, method: str) -> None:
        """``GET /api/search?query=...``: the one read that is also a GET, so
        a search is a link an operator can open."""
        if method != "search":
            self._wrong_verb(method)
            return
        body: dict[str, Any] = {}
        for name in ("query", "q", "channel", "user", "cursor", *_SEARCH_INTS):
            value = self.get_query_argument(name, None)
            if value is None:
                continue
            if name in _SEARCH_INTS:
                # ASCII digits only: "²" is a digit to str.isdigit, not to int().
                if not (value.isascii() and value.isdigit()):
                    self.write_squall_error(errors.BadRequest(f"'{name}' must be a number"))
                    return
                body[name] = int(value)
            else:
                body["query" if name == "q" else name] = value
        await self._call(method, body)

    async def post(self, method: str) -> None:
        keepalive = self.application.settings.get("keepalive_api")
        if keepalive is not None and keepalive.adopt(self, method, self._presented_key()):
            return  # answered off Tornado, with the connection's next requests
        try:
            body = orjson.loads(self.request.body or b"{}")
        except orjson.JSONDecodeError:
            body = None
        await self._call(method, body)

    async def _call(self, method: str, body: Any) -> None:
        if not self.node.auth.check_api_key(self._presented_key()):
            self.write_squall_error(errors.Unauthorized("missing or wrong API key"))
            return
        call = self._methods().get(method)
        if call is None:
            self.write_squall_error(errors.MethodNotFound(f"unknown API method {method!r}"))
            return
        self.node.metrics.count_api(method)
        if body is None:
            self.write_squall_error(errors.BadRequest("body is not valid JSON"))
            return
        if not isinstance(body, dict):
            self.write_squall_error(errors.BadRequest("body must be a JSON object"))
            return
        try:
            result = await call(body)
        except SquallError as exc:
            self.node.metrics.count_error(exc.code)
            self.write_squall_error(exc)
            return
        self.write_json({"result": result})

    def _presented_key(self) -> str | None:
        return presented_api_key(self.request)

    def _methods(self) -> dict[str, ApiCall]:
        return ApiMethods(self.node).table()


class ApiMethods:
    """The API methods on a node, free of HTTP: ``POST /api/<method>``, a
    batch's commands and an API stream's commands all call these. Each takes
    its params object and returns its ``result``, or raises ``SquallError``."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def table(self) -> dict[str, ApiCall]:
        return {
            "publish": self.publish,
            "broadcast": self.broadcast,
            "history": self.history,
            "presence": self.presence,
            "presence_stats": self.presence_stats,
            "channels": self.channels,
            "disconnect": self.disconnect,
            "unsubscribe": self.unsubscribe,
            "info": self.info,
            "search": self.search,
        }

    async def search(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self.node.search_json(body)

    def publish_params(self, body: dict[str, Any]) -> tuple[Channel, bytes]:
        """A publish's channel and encoded data, checked (no await: a pipeline
        relies on it to start its publishes in command order)."""
        channel = self.node.channels.resolve(body.get("channel"))
        return channel, self.node.publication_data(body)

    async def publish(self, body: dict[str, Any]) -> dict[str, Any]:
        channel, data = self.publish_params(body)
        pub = await self.node.publish(channel, data)
        return {"offset": pub.offset, "epoch": pub.epoch}

    async def broadcast(self, body: dict[str, Any]) -> dict[str, Any]:
        names = body.get("channels")
        if not isinstance(names, list) or not names:
            raise errors.BadRequest("'channels' must be a non-empty list")
        if len(names) > self.node.settings.limits.max_broadcast_channels:
            raise errors.LimitExceeded(
                f"at most {self.node.settings.limits.max_broadcast_channels} channels per call"
            )
        if len(set(map(str, names))) != len(names):
            raise errors.BadRequest("'channels' has duplicates")
        channels: list[Channel] = [self.node.channels.resolve(n) for n in names]
        data = self.node.publication_data(body)
        responses: list[dict[str, Any]] = []
        for channel in channels:
            try:
                pub = await self.node.publish(channel, data)
            except SquallError as exc:
                responses.append({"channel": channel.name, "error": exc.to_json()})
            else:
                responses.append(
                    {"channel": channel.name, "result": {"offset": pub.offset, "epoch": pub.epoch}}
                )
        return {"responses": responses}

    async def history(self, body: dict[str, Any]) -> dict[str, Any]:
        channel = self.node.channels.resolve(body.get("channel"))
        return await self.node.history_json(channel, body)

    async def _presence(self, body: dict[str, Any]) -> tuple[Channel, dict[str, Any]]:
        channel = self.node.channels.resolve(body.get("channel"))
        if not channel.options.presence:
            raise errors.NotAvailable("presence is off in this namespace")
        members = await self.node.broker.presence(channel.name)
        return channel, {k: v.to_json() for k, v in members.items()}

    async def presence(self, body: dict[str, Any]) -> dict[str, Any]:
        _, members = await self._presence(body)
        return {"presence": members}

    async def presence_stats(self, body: dict[str, Any]) -> dict[str, Any]:
        _, members = await self._presence(body)
        users = {m["user"] for m in members.values()}
        return {"num_clients": len(members), "num_users": len(users)}

    async def channels(self, body: dict[str, Any]) -> dict[str, Any]:
        pattern = body.get("prefix", "")
        if not isinstance(pattern, str):
            raise errors.BadRequest("'prefix' must be a string")
        counts = self.node.hub.channel_counts()
        return {
            "channels": {
                name: {"num_clients": n}
                for name, n in sorted(counts.items())
                if name.startswith(pattern)
            }
        }

    async def disconnect(self, body: dict[str, Any]) -> dict[str, Any]:
        user = body.get("user")
        if not isinstance(user, str):
            raise errors.BadRequest("'user' must be a string")
        reconnect = body.get("reconnect", False)
        if not isinstance(reconnect, bool):
            raise errors.BadRequest("'reconnect' must be true or false")
        await self.node.disconnect_user(user, reconnect=reconnect)
        return {}

    async def unsubscribe(self, body: dict[str, Any]) -> dict[str, Any]:
        user = body.get("user")
        if not isinstance(user, str):
            raise errors.BadRequest("'user' must be a string")
        channel = self.node.channels.resolve(body.get("channel"))
        await self.node.unsubscribe_user(user, channel.name)
        return {}

    async def info(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self.node.cluster_info()


def _error_reply(error: SquallError) -> dict[str, Any]:
    return {"error": error.to_json()}


def _parse_flag(value: str) -> bool:
    low = value.strip().lower()
    if low in ("1", "true", "yes"):
        return True
    if low in ("0", "false", "no", ""):
        return False
    raise errors.BadRequest("'stop_on_error' must be true or false")


@tornado.web.stream_request_body
class ApiBatchHandler(ApiHandler):
    """``POST /api/batch``: many API commands in one request, one reply each,
    in order; JSON (``{"commands": [...]}``) or NDJSON (one command a line).

    Commands run through a ``CommandPipeline`` (publishes pipelined on
    Redis, a channel's offsets in command order). With ``stop_on_error``
    commands run one after another and the first failure ends the batch.

    A body announced over the limit gets the JSON 413 at once (as every API
    request); a chunked one is read and dropped up to four times the limit.
    """

    def _read_limit(self) -> int:
        # A chunked body (its size unknown until it ends) is read and dropped
        # past the limit, so the 413 is not lost to a reset connection.
        return self._limit * _DISCARD_FACTOR

    def _body_complete(self, body: asyncio.Future[None]) -> None:
        pass  # post() joins the chunks itself

    def _ndjson(self) -> bool:
        kind = self.request.headers.get("Content-Type", "")
        return kind.partition(";")[0].strip().lower() == NDJSON

    def _answer(self, replies: list[dict[str, Any]] | None, error: SquallError | None) -> None:
        if self._ndjson():
            self.set_header("Content-Type", NDJSON)
            items = [_error_reply(error)] if error is not None else replies or []
            self.set_status(error.http_status if error is not None else 200)
            self.finish(b"".join(orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in items))
        elif error is not None:
            self.write_squall_error(error)
        else:
            self.write_json({"replies": replies})

    async def post(self, method: str = "batch") -> None:
        if not self.node.auth.check_api_key(self._presented_key()):
            self._answer(None, errors.Unauthorized("missing or wrong API key"))
            return
        self.node.metrics.count_api("batch")
        try:
            if self._received > self._limit:
                raise errors.MessageTooLarge(
                    f"body is {self._received} bytes; the limit is {self._limit}"
                )
            commands, stop_on_error = self._parse(b"".join(self._chunks))
        except SquallError as exc:
            self.node.metrics.count_error(exc.code)
            self._answer(None, exc)
            return
        if stop_on_error:
            replies = await self._run_in_turn(commands)
        else:
            replies = await self._run(commands)
        self._answer(replies, None)

    # ---- the request ----------------------------------------------------

    def _parse(self, body: bytes) -> tuple[list[tuple[str, dict[str, Any]]], bool]:
        """The commands and ``stop_on_error``; any fault in the envelope is an
        error for the whole request, before anything runs."""
        stop_on_error = _parse_flag(self.get_query_argument("stop_on_error", "false") or "")
        items: list[tuple[str, Any]] = []
        if self._ndjson():
            for number, line in enumerate(body.split(b"\n"), 1):
                if not line.strip():
                    continue
                try:
                    items.append((f"line {number}", orjson.loads(line)))
                except orjson.JSONDecodeError:
                    raise errors.BadRequest(f"line {number} is not valid JSON") from None
        else:
            try:
                envelope = orjson.loads(body or b"{}")
            except orjson.JSONDecodeError:
                raise errors.BadRequest("body is not valid JSON") from None
            if not isinstance(envelope, dict):
                raise errors.BadRequest('body must be a JSON object: {"commands": [...]}')
            unknown = envelope.keys() - {"commands", "stop_on_error"}
            if unknown:
                raise errors.BadRequest(f"unknown key {min(unknown)!r} in the body")
            flag = envelope.get("stop_on_error", False)
            if not isinstance(flag, bool):
                raise errors.BadRequest("'stop_on_error' must be true or false")
            stop_on_error = stop_on_error or flag
            raw = envelope.get("commands")
            if not isinstance(raw, list):
                raise errors.BadRequest("'commands' must be a list")
            items = [(f"commands[{i}]", cmd) for i, cmd in enumerate(raw)]
        limit = self.node.settings.limits.max_batch_commands
        if len(items) > limit:
            raise errors.LimitExceeded(
                f"{len(items)} commands; at most {limit} per batch (limits.max_batch_commands)"
            )
        commands: list[tuple[str, dict[str, Any]]] = []
        for where, cmd in items:
            if not isinstance(cmd, dict):
                raise errors.BadRequest(
                    f'{where} must be an object: {{"method": ..., "params": ...}}'
                )
            method = cmd.get("method")
            if not isinstance(method, str):
                raise errors.BadRequest(f"{where}: 'method' must be a string")
            params = cmd.get("params", {})
            if not isinstance(params, dict):
                raise errors.BadRequest(f"{where}: 'params' must be an object")
            unknown = cmd.keys() - {"method", "params"}
            if unknown:
                raise errors.BadRequest(f"{where}: unknown key {min(unknown)!r}")
            commands.append((method, params))
        return commands, stop_on_error

    # ---- running it -----------------------------------------------------

    def _pipeline(self, replies: list[Reply]) -> CommandPipeline:
        return CommandPipeline(
            ApiMethods(self.node),
            lambda _tag, reply: replies.append(reply),
            name="batch",
            nested="'batch' cannot be used inside a batch",
        )

    async def _run_in_turn(self, commands: list[tuple[str, dict[str, Any]]]) -> list[Reply]:
        """``stop_on_error``: one command at a time; after the first failure
        the rest are answered as not run."""
        pipeline = self._pipeline([])
        replies: list[Reply] = []
        for index, (method, params) in enumerate(commands):
            reply = await pipeline.call(method, params)
            replies.append(reply)
            if "error" in reply:
                skipped = _error_reply(
                    errors.NotAvailable(f"not run: command {index} failed and stop_on_error is set")
                )
                replies.extend(skipped for _ in range(len(commands) - index - 1))
                break
        return replies

    async def _run(self, commands: list[tuple[str, dict[str, Any]]]) -> list[Reply]:
        replies: list[Reply] = []
        pipeline = self._pipeline(replies)
        for method, params in commands:
            await pipeline.submit(None, method, params)
        await pipeline.drain()
        return replies


class CommandPipeline:
    """Runs a sequence of API commands, as a batch or an API stream does, and
    hands each reply (``{"result": ...}`` or ``{"error": ...}``) to ``emit``
    with its ``tag``, in command order.

    How commands run, as a connection's publishes do (``Session``): on a
    broker that keeps concurrent publishes in call order
    (``Broker.ordered_publish``: Redis, one pipeline per round trip) a
    publish starts as soon as it is checked, without waiting for the ones
    before it (at most ``MAX_BATCH_INFLIGHT`` at once: past it ``submit``
    waits for the oldest), so many publishes cost a few round trips; any
    other command waits until every publish before it is answered, so it
    sees their effect. On the other brokers (the embedded one never waits in
    ``publish``) commands run one after another. Either way a channel's
    publications get their offsets in command order.
    """

    def __init__(
        self, api: ApiMethods, emit: Callable[[Any, Reply], None], *, name: str, nested: str
    ) -> None:
        self.api = api
        self._node = api.node
        self._methods = api.table()
        self._emit = emit
        self._name = name
        self._nested = nested
        self._pipelined = api.node.broker.ordered_publish
        # (tag, the reply to come), in command order.
        self._window: collections.deque[tuple[Any, asyncio.Future[Reply]]] = collections.deque()

    @property
    def in_flight(self) -> int:
        return len(self._window)

    def tasks(self) -> list[asyncio.Future[Reply]]:
        return [fut for _, fut in self._window]

    async def call(self, method: str, params: dict[str, Any]) -> Reply:
        """Run one command to its reply now; never raises."""
        try:
            call = self._methods.get(method)
            if call is None:
                if method == "batch":
                    raise errors.MethodNotFound(self._nested)
                raise errors.MethodNotFound(f"unknown API method {method!r}")
            self._node.metrics.count_api(method)
            result = await call(params)
        except SquallError as exc:
            self._node.metrics.count_error(exc.code)
            return _error_reply(exc)
        except Exception:
            log.exception("%s command %r failed", self._name, method)
            self._node.metrics.count_error(errors.InternalError.code)
            return _error_reply(errors.InternalError())
        return {"result": result}

    def answer(self, tag: Any, reply: Reply) -> None:
        """A reply that is ready now: emitted after the ones still in flight."""
        if self._window:
            ready: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
            ready.set_result(reply)
            self._window.append((tag, ready))
        else:
            self._emit(tag, reply)

    async def submit(self, tag: Any, method: str, params: dict[str, Any]) -> None:
        """Run a command, or start it (a pipelined publish). Returns when the
        next command may be submitted."""
        if not self._pipelined or method != "publish":
            if self._window:
                await self.drain()
            self._emit(tag, await self.call(method, params))
            return
        self._node.metrics.count_api(method)
        try:
            channel, data = self.api.publish_params(params)
        except SquallError as exc:
            self._node.metrics.count_error(exc.code)
            self.answer(tag, _error_reply(exc))
            return
        if len(self._window) >= MAX_BATCH_INFLIGHT:
            await asyncio.wait((self._window[0][1],))
            self._flush()
        # Created in command order, so each reaches the broker in command
        # order: ``ordered_publish`` keeps that order.
        task = asyncio.get_running_loop().create_task(self._publish(channel, data))
        task.add_done_callback(self._flush)
        self._window.append((tag, task))

    async def drain(self) -> None:
        """Wait until every command submitted is answered."""
        while self._window:
            await asyncio.wait(self.tasks())
            self._flush()

    def _flush(self, _done: object = None) -> None:
        window = self._window
        while window and window[0][1].done():
            tag, fut = window.popleft()
            if fut.cancelled():
                self._emit(tag, _error_reply(errors.InternalError()))
            else:
                self._emit(tag, fut.result())

    async def _publish(self, channel: Channel, data: bytes) -> Reply:
        try:
            pub = await self._node.publish(channel, data)
        except SquallError as exc:
            self._node.metrics.count_error(exc.code)
            return _error_reply(exc)
        except Exception:
            log.exception("%s publish to %s failed", self._name, channel.name)
            self._node.metrics.count_error(errors.InternalError.code)
            return _error_reply(errors.InternalError())
        return {"result": {"offset": pub.offset, "epoch": pub.epoch}}
