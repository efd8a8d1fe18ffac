"""Proxy hooks: ask the application's back end over HTTP whether a client may
connect, subscribe, publish, or keep its session (``[proxy]`` settings,
``docs/auth.md#proxy-hooks``).

Each hook is one ``POST`` of a JSON object; the back end answers HTTP 200 with
exactly one of ``{"result": {...}}``, ``{"error": {"code", "message"}}`` (the
client gets that error) or ``{"disconnect": {"code", "reason"}}`` (the client
is disconnected with it). Anything else (a time-out, a connection error,
another status, a body of another shape) is the back end's failure: the
client gets a temporary error (``ProxyUnavailable``, code 114) and should try
again later, and the operator gets a WARNING naming the hook and the reason
(never a header value).

Only the request headers named in ``proxy.forward_headers`` are kept for a
connection (``ConnectionMeta``), and nothing at all when no hook is set.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import orjson
import tornado.httpclient
import tornado.httputil
from tornado.simple_httpclient import HTTPTimeoutError

from server import errors
from server.config import Settings
from server.errors import Disconnect, SquallError
from server.jwks import safe_url

if TYPE_CHECKING:
    from server.session import Session

log = logging.getLogger("squall.proxy")

HOOKS = ("connect", "subscribe", "publish", "refresh")
# Requests to the back end in flight at once (per process); more wait in
# Tornado's queue, within the same time-out.
MAX_CONCURRENT = 256
# Largest answer read from the back end.
MAX_ANSWER_BYTES = 1024 * 1024
# Close codes a back end may disconnect with: 3000-3499 ask the client to
# reconnect, 3500-4999 not to (as Squall's clients read them).
DISCONNECT_CODES = range(3000, 5000)
# Error codes a back end may answer with (Squall's own 100-115 included).
ERROR_CODES = range(100, 2000)
# A WebSocket close reason fits in 123 bytes.
MAX_REASON_BYTES = 123
# The connection is closed with this after a failed connect (Squall's own
# protocol) or a failed server-side refresh: the client reconnects with backoff.
TRY_AGAIN_LATER = Disconnect(1013, "try again later")
# Histogram buckets (seconds) of hook latency.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


# ---- what a transport hands over ---------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectionMeta:
    """What the hooks need to know of a connection's HTTP request: the
    transport, the client's address, and only the allowed headers."""

    transport: str
    remote_addr: str
    headers: dict[str, str] = field(default_factory=dict)


def filter_headers(headers: Mapping[str, str], allowed: Iterable[str]) -> dict[str, str]:
    """The headers named in ``allowed`` (any case), keyed as ``allowed``
    spells them. ``headers`` may be Tornado's ``HTTPHeaders`` (case-insensitive,
    repeated headers joined) or a plain dict (looked up in any case)."""
    if not isinstance(headers, tornado.httputil.HTTPHeaders):
        headers = {k.lower(): v for k, v in headers.items()}
        allowed = list(allowed)
        return {n: headers[n.lower()] for n in allowed if n.lower() in headers}
    out: dict[str, str] = {}
    for name in allowed:
        value = headers.get(name)
        if value is not None:
            out[name] = value
    return out


# ---- answers --------------------------------------------------------------


class BadAnswer(Exception):
    """The back end's body is not one of the documented shapes."""


class HookError(SquallError):
    """The back end refused with ``{"error": {"code", "message"}}``: the
    client gets exactly that code and message."""

    http_status = 403

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        super().__init__(message)


class HookDisconnect(SquallError):
    """The back end answered ``{"disconnect": {"code", "reason"}}``: the
    caller closes the connection with ``disconnect``."""

    code = errors.PermissionDenied.code
    http_status = 403

    def __init__(self, disconnect: Disconnect) -> None:
        self.disconnect = disconnect
        super().__init__(disconnect.reason or "disconnected by the application")


class ProxyUnavailable(errors.Unavailable):
    """The hook failed (time-out, unreachable, bad status or body): a
    temporary error, the client tries again later."""

    def __init__(self, hook: str) -> None:
        super().__init__(f"the application's {hook} check is unavailable; try again later")
        self.hook = hook


@dataclass(frozen=True, slots=True)
class ConnectGrant:
    user: str
    info: Any = None
    channels: list[str] = field(default_factory=list)
    expire_at: int = 0  # unix seconds; 0: the session does not expire


@dataclass(frozen=True, slots=True)
class RefreshGrant:
    expire_at: int = 0  # the new expiry (unix seconds) unless ``expired``
    expired: bool = False


# Sentinel: the publish hook left the data as it was.
KEEP: Any = object()


def _truncate(reason: str) -> str:
    raw = reason.encode("utf-8")
    if len(raw) <= MAX_REASON_BYTES:
        return reason
    return raw[:MAX_REASON_BYTES].decode("utf-8", "ignore")


def parse_answer(body: bytes) -> dict[str, Any]:
    """The ``result`` object of an answer. Raises ``HookError`` or
    ``HookDisconnect`` for the other two shapes, ``BadAnswer`` for anything
    else."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadAnswer("the body is not JSON") from None
    if not isinstance(answer, dict):
        raise BadAnswer("the body is not a JSON object")
    present = [key for key in ("result", "error", "disconnect") if key in answer]
    if len(present) != 1:
        raise BadAnswer("expected exactly one of 'result', 'error', 'disconnect'")
    value = answer[present[0]]
    if not isinstance(value, dict):
        raise BadAnswer(f"'{present[0]}' must be an object")
    if present[0] == "error":
        code, message = value.get("code"), value.get("message", "")
        if type(code) is not int or code not in ERROR_CODES:
            raise BadAnswer("'error.code' must be an integer from 100 to 1999")
        if not isinstance(message, str):
            raise BadAnswer("'error.message' must be a string")
        raise HookError(code, message)
    if present[0] == "disconnect":
        code, reason = value.get("code"), value.get("reason", "")
        if type(code) is not int or code not in DISCONNECT_CODES:
            raise BadAnswer("'disconnect.code' must be an integer from 3000 to 4999")
        if not isinstance(reason, str):
            raise BadAnswer("'disconnect.reason' must be a string")
        raise HookDisconnect(Disconnect(code, _truncate(reason)))
    return value


def _expire_at(result: dict[str, Any], now: float) -> int:
    value = result.get("expire_at", 0)
    if value is None:
        return 0
    if type(value) is not int or value < 0:
        raise BadAnswer("'result.expire_at' must be unix seconds (an integer)")
    if value and value <= now:
        raise BadAnswer("'result.expire_at' is in the past")
    return value


def parse_connect(result: dict[str, Any], now: float | None = None) -> ConnectGrant:
    user = result.get("user")
    if not isinstance(user, str):
        raise BadAnswer("'result.user' must be a string")
    channels = result.get("channels")
    if channels is None:
        channels = []
    elif not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
        raise BadAnswer("'result.channels' must be a list of strings")
    expire_at = _expire_at(result, time.time() if now is None else now)
    return ConnectGrant(user, result.get("info"), channels, expire_at)


def parse_refresh(result: dict[str, Any], now: float | None = None) -> RefreshGrant:
    expired = result.get("expired", False)
    if not isinstance(expired, bool):
        raise BadAnswer("'result.expired' must be true or false")
    if expired:
        return RefreshGrant(expired=True)
    expire_at = _expire_at(result, time.time() if now is None else now)
    if not expire_at:
        raise BadAnswer("'result.expire_at' is required (or 'expired': true)")
    return RefreshGrant(expire_at)


def parse_subscribe(result: dict[str, Any]) -> None:
    """Any ``result`` object allows the subscription."""
    return None


def parse_publish(result: dict[str, Any]) -> Any:
    """The data to publish instead, or ``KEEP``."""
    return result["data"] if "data" in result else KEEP


# ---- counting ---------------------------------------------------------------


class ProxyStats:
    """Calls, outcomes and latency per hook, read by ``/metrics``."""

    def __init__(self) -> None:
        # (hook, result): result is ok | error | disconnect | failed
        self.requests: dict[tuple[str, str], int] = {}
        # (hook, reason): reason is timeout | connection | status | response
        self.failures: dict[tuple[str, str], int] = {}
        self.buckets: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def count(self, hook: str, result: str) -> None:
        self.requests[(hook, result)] = self.requests.get((hook, result), 0) + 1

    def fail(self, hook: str, reason: str) -> None:
        self.failures[(hook, reason)] = self.failures.get((hook, reason), 0) + 1

    def observe(self, hook: str, seconds: float) -> None:
        buckets = self.buckets.get(hook)
        if buckets is None:
            buckets = self.buckets[hook] = [0] * (len(BUCKETS) + 1)
        buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sums[hook] = self.sums.get(hook, 0.0) + seconds
        self.counts[hook] = self.counts.get(hook, 0) + 1

    def histogram(self, hook: str) -> list[tuple[str, float]]:
        """Cumulative ``(le, count)`` pairs, ``+Inf`` last."""
        out: list[tuple[str, float]] = []
        total = 0
        for le, n in zip((*map(str, BUCKETS), "+Inf"), self.buckets.get(hook, ()), strict=False):
            total += n
            out.append((le, float(total)))
        return out


# ---- the client -------------------------------------------------------------

T = TypeVar("T")

_FAILURE_HINTS = {
    "timeout": "no answer within proxy.timeout",
    "connection": "cannot reach the back end",
    "status": "the back end answered an HTTP status other than 200",
    "response": "the back end's answer is not a documented shape",
}


class Proxy:
    """The hooks of one node: one shared HTTP client, the hooks' URLs by
    namespace, the counters."""

    def __init__(self, settings: Settings) -> None:
        p = settings.proxy
        self.connect_url = p.connect_url
        self.refresh_url = p.refresh_url
        self.connect_with_token = p.connect_with_token
        self.timeout = p.timeout
        self.forward_headers = list(p.forward_headers)
        # Namespace -> URL, only for namespaces that have the hook (a namespace's
        # own URL, else the [proxy] one).
        self.subscribe_urls = {
            name: url
            for name, ns in settings.namespaces.items()
            if (url := ns.proxy_subscribe_url or p.subscribe_url)
        }
        self.publish_urls = {
            name: url
            for name, ns in settings.namespaces.items()
            if (url := ns.proxy_publish_url or p.publish_url)
        }
        self.stats = ProxyStats()
        self._http: tornado.httpclient.AsyncHTTPClient | None = None

    @staticmethod
    def configured(settings: Settings) -> bool:
        p = settings.proxy
        return bool(
            p.connect_url
            or p.subscribe_url
            or p.publish_url
            or p.refresh_url
            or any(
                ns.proxy_subscribe_url or ns.proxy_publish_url
                for ns in settings.namespaces.values()
            )
        )

    def meta(self, transport: str, remote_addr: str, headers: Mapping[str, str]) -> ConnectionMeta:
        return ConnectionMeta(transport, remote_addr, filter_headers(headers, self.forward_headers))

    async def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    # ---- hooks --------------------------------------------------------

    @staticmethod
    def _base(session: Session) -> dict[str, Any]:
        meta = session.meta
        codec = session.codec
        body: dict[str, Any] = {
            "client": session.client_id,
            "transport": meta.transport if meta is not None else session.transport.kind,
            "protocol": codec.name.partition("-")[0],
            "encoding": "protobuf" if codec.binary else "json",
            "remote_addr": meta.remote_addr if meta is not None else "",
            "headers": meta.headers if meta is not None else {},
        }
        return body

    async def connect(
        self, session: Session, params: dict[str, Any], token_user: str | None = None
    ) -> ConnectGrant:
        body = self._base(session)
        if "data" in params:
            body["data"] = params["data"]
        if token_user is not None:
            body["user"] = token_user
        return await self._call("connect", self.connect_url, body, parse_connect)

    async def subscribe(self, url: str, session: Session, channel: str, data: Any) -> None:
        body = self._base(session)
        body["user"] = session.user
        body["channel"] = channel
        if data is not KEEP:
            body["data"] = data
        await self._call("subscribe", url, body, parse_subscribe)

    async def publish(self, url: str, session: Session, channel: str, data: Any) -> Any:
        body = self._base(session)
        body["user"] = session.user
        body["channel"] = channel
        body["data"] = data
        return await self._call("publish", url, body, parse_publish)

    async def refresh(self, session: Session) -> RefreshGrant:
        body = self._base(session)
        body["user"] = session.user
        return await self._call("refresh", self.refresh_url, body, parse_refresh)

    async def _call(
        self, hook: str, url: str, body: dict[str, Any], parse: Callable[[dict[str, Any]], T]
    ) -> T:
        stats = self.stats
        started = time.monotonic()
        try:
            result = await self._post(hook, url, body)
            try:
                value = parse(result)
            except BadAnswer as exc:
                self._failed(hook, url, "response", str(exc))
        except HookError:
            stats.count(hook, "error")
            raise
        except HookDisconnect:
            stats.count(hook, "disconnect")
            raise
        except ProxyUnavailable:
            stats.count(hook, "failed")
            raise
        finally:
            stats.observe(hook, time.monotonic() - started)
        stats.count(hook, "ok")
        return value

    async def _post(self, hook: str, url: str, body: dict[str, Any]) -> dict[str, Any]:
        if self._http is None:
            self._http = tornado.httpclient.AsyncHTTPClient(
                force_instance=True, max_clients=MAX_CONCURRENT, max_body_size=MAX_ANSWER_BYTES
            )
        request = tornado.httpclient.HTTPRequest(
            url,
            method="POST",
            body=orjson.dumps(body),
            headers={"Content-Type": "application/json", "Accept": "application/json"},
            connect_timeout=self.timeout,
            request_timeout=self.timeout,
            follow_redirects=False,
        )
        try:
            # Tornado's own time-outs bound the call; this one is a backstop.
            response = await asyncio.wait_for(
                self._http.fetch(request, raise_error=False), self.timeout + 1.0
            )
        except asyncio.CancelledError:
            raise
        except (TimeoutError, HTTPTimeoutError):
            self._failed(hook, url, "timeout", f"no answer in {self.timeout:g} s")
        except Exception as exc:  # refused, reset, DNS, TLS, too large: unreachable
            self._failed(hook, url, "connection", type(exc).__name__ + ": " + str(exc))
        if response.code != 200:
            self._failed(hook, url, "status", f"HTTP {response.code}")
        try:
            return parse_answer(response.body or b"")
        except BadAnswer as exc:
            self._failed(hook, url, "response", str(exc))

    def _failed(self, hook: str, url: str, reason: str, detail: str) -> NoReturn:
        """Count and log a failure, and raise the client's temporary error."""
        self.stats.fail(hook, reason)
        log.warning(
            "proxy %s hook failed (%s): %s: %s",
            hook,
            safe_url(url),
            _FAILURE_HINTS[reason],
            detail,
        )
        raise ProxyUnavailable(hook)
