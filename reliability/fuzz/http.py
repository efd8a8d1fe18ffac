"""Target (c): the HTTP APIs (``handlers/api.py``, ``handlers/pusher_api.py``)
on a real server in this process (its own thread and event loop, a loopback
port), spoken to over raw sockets so that malformed HTTP is possible too.

Requests: every ``/api`` method with valid-shaped bodies whose fields may be
hostile, batches as JSON and NDJSON, ``GET /api/search`` query strings, the
Pusher HTTP API (every endpoint) signed with the app's secret or not, with
generated headers and query strings; and mutants of all of them as raw bytes.

Properties (``HttpTarget.check``): the server answers a well-formed request
(and anything it answers is below 500); a malformed one gets a 4xx or a
closed connection; no answer takes longer than ``HANG_SECONDS``; the server
logs no error (an uncaught exception in a handler is logged before its 500).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from reliability.fuzz.gen import (
    dumps,
    hostile,
    ints,
    maybe,
    mutate,
    mutations,
    texts,
    values,
    with_extra,
)

API_KEY = "fuzz-api-key-0123456789abcdef"
TOKEN_SECRET = "fuzz-token-secret-0123456789abcdef"  # noqa: S105 - a test server's
APP_ID, APP_KEY, APP_SECRET = "4242", "fuzz-app-key", "fuzz-app-secret-0123456789"
HANG_SECONDS = 1.0

CONFIG: dict[str, Any] = {
    "auth": {"token_secret": TOKEN_SECRET, "api_key": API_KEY},
    "namespaces": {
        "chat": {"presence": True, "join_leave": True, "history_size": 10},
        "logged": {"persist": True, "searchable": True, "history_size": 10},
    },
    "pusher": {
        "apps": [
            {"id": APP_ID, "key": APP_KEY, "secret": APP_SECRET, "enable_client_messages": True}
        ]
    },
}


class ServerFault(AssertionError):
    """The server broke a property; ``signature`` names the fault (the
    exception and where the server raised it, or the status), so that the
    same bug found again is one crash, not many."""

    def __init__(self, message: str, signature: str) -> None:
        super().__init__(message)
        self.signature = signature


class _Errors(logging.Handler):
    """Every ERROR the server logs (tornado's "Uncaught exception", the API's
    "command failed") while the fuzzer runs, with where it was raised."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.endswith(".access"):
            # The access log's line for a 500 may come after the client has
            # its answer (it would land on the next input); the status says it.
            return
        text = record.getMessage()
        exc = record.exc_info[1] if record.exc_info else None
        where = record.name
        if exc is not None:
            text += f": {type(exc).__name__} {exc}"
            where = f"{type(exc).__name__} at {_raised_at(exc)}"
        self.records.append((where, f"{record.name}: {text}"[:2000]))


def _raised_at(exc: BaseException) -> str:
    """The innermost frame in Squall's code (server/, handlers/)."""
    import traceback

    for fr in reversed(traceback.extract_tb(exc.__traceback__)):
        for top in ("/server/", "/handlers/"):
            if top in fr.filename:
                return f"{top[1:]}{fr.filename.rsplit(top, 1)[1]}:{fr.lineno} ({fr.name})"
    return "?"


class InProcessServer:
    """A Squall node and its HTTP server on 127.0.0.1, in a thread with its
    own event loop, wired as production wires them (``server.app.http_server``)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = 0
        self.errors = _Errors()
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="fuzz-server", daemon=True)
        self._levels: dict[str, int] = {}

    def start(self) -> InProcessServer:
        # Quiet access logs and warnings (every 4xx is one); errors are caught.
        for name in ("tornado.access", "tornado.general", "tornado.application", "squall"):
            logger = logging.getLogger(name)
            self._levels[name] = logger.level
            logger.setLevel(logging.ERROR)
        logging.getLogger().addHandler(self.errors)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the fuzz server did not start in 30 s")
        if self._failed is not None:
            raise RuntimeError("the fuzz server failed to start") from self._failed
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        logging.getLogger().removeHandler(self.errors)
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)

    def _main(self) -> None:
        from reliability.fuzz import engine

        if engine.ACTIVE is not None:
            engine.ACTIVE.install()  # this thread's lines count too
        try:
            import uvloop

            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        except ImportError:
            loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.close()

    async def _serve(self) -> None:
        import tornado.netutil

        from server.app import http_server, make_app
        from server.config import load_settings
        from server.node import Node

        self._stop = asyncio.Event()
        try:
            raw = {**CONFIG, "server": {"data_dir": str(self.data_dir)}}
            node = Node(load_settings(raw=raw, env={}))
            await node.start()
            # Production's wiring: the body limit, and keep-alive API
            # connections handed to handlers/api_keepalive.py.
            http = http_server(node, make_app(node))
            (sock,) = tornado.netutil.bind_sockets(0, "127.0.0.1")
            self.port = sock.getsockname()[1]
            http.add_sockets([sock])
        except BaseException as exc:
            self._failed = exc
            self._ready.set()
            raise
        self._ready.set()
        await self._stop.wait()
        http.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(http.close_all_connections(), 5)
        await node.close()


@dataclass(slots=True)
class HttpCase:
    raw: bytes
    # A well-formed request: it must be answered.
    complete: bool
    label: str


def request(verb: str, target: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    head = [f"{verb} {target} HTTP/1.1", "Host: 127.0.0.1"]
    head += [f"{k}: {v}" for k, v in headers]
    if body or verb in ("POST", "PUT"):
        head.append(f"Content-Length: {len(body)}")
    head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


def exchange(port: int, raw: bytes, complete: bool, timeout: float = HANG_SECONDS) -> bytes:
    """Send ``raw``, read until the server closes; a malformed request is
    followed by our half-close. Raises ``TimeoutError`` past ``timeout``."""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(raw)
            if not complete:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered early and closed: read what it said
        chunks: list[bytes] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no end of the answer within {timeout} s")
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError:
                raise TimeoutError(f"no end of the answer within {timeout} s") from None
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(answer: bytes) -> int | None:
    if not answer.startswith(b"HTTP/1."):
        return None
    try:
        return int(answer[9:12])
    except ValueError:
        return None


class HttpTarget:
    """The server and the property check, for the engines."""

    def __init__(self, data_dir: Path | None = None) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fuzz-http-")
            data_dir = Path(self._tmp.name)
        self.server = InProcessServer(data_dir)
        self.statuses: dict[int, int] = {}

    def __enter__(self) -> Callable[[HttpCase], None]:
        self.server.start()
        return self.check

    def __exit__(self, *exc: object) -> None:
        self.server.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def check(self, case: HttpCase) -> None:
        errors_before = len(self.server.errors.records)
        try:
            answer = exchange(self.server.port, case.raw, case.complete)
        except TimeoutError as exc:
            raise ServerFault(f"{case.label}: {exc}", "hang") from None
        status = status_of(answer)
        if status is not None:
            self.statuses[status] = self.statuses.get(status, 0) + 1
        verdict(
            case.label, case.complete, status, answer, self.server.errors.records[errors_before:]
        )


def verdict(
    label: str, complete: bool, status: int | None, answer: bytes, logged: list[tuple[str, str]]
) -> None:
    """The properties of one exchange (both engines): no ERROR logged by the
    server while it ran, a well-formed request answered, no answer >= 500.
    Raises ``ServerFault``."""
    if logged:
        where, text = logged[0]
        raise ServerFault(f"{label}: answered {status}; the server logged {text}", where)
    if complete and status is None:
        raise ServerFault(f"{label}: no answer to a well-formed request", "no answer")
    if status is not None and status >= 500:
        raise ServerFault(f"{label}: answered {status}: {answer[:600]!r}", str(status))


# ---- strategies ----------------------------------------------------------------

CHANNELS = ["news", "chat:room", "chat:lobby", "logged:a", "nope:x", "bad name", ""]
channels = st.one_of(st.sampled_from(CHANNELS), st.sampled_from(CHANNELS), texts)
API_METHODS = [
    "publish",
    "broadcast",
    "history",
    "presence",
    "presence_stats",
    "channels",
    "disconnect",
    "unsubscribe",
    "info",
    "search",
]
API_PARAMS = {
    "channel": channels,
    "data": values,
    "channels": st.lists(maybe(channels), max_size=4),
    "user": texts,
    "reconnect": st.booleans(),
    "prefix": texts,
    "limit": ints,
    "since": st.one_of(ints, st.fixed_dictionaries({"offset": ints, "epoch": texts})),
    "until": ints,
    "reverse": st.booleans(),
    "query": texts,
    "cursor": texts,
}
api_params = with_extra({}, API_PARAMS)
HEADER_VALUES = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30
) | st.sampled_from(["", " ", "\t", "é", "a" * 300])

auth_headers = st.sampled_from(
    [
        [("Authorization", f"apikey {API_KEY}")],
        [("Authorization", f"apikey {API_KEY}")],
        [("Authorization", f"APIKEY   {API_KEY}  ")],
        [("Authorization", "apikey wrong")],
        [("Authorization", f"Bearer {API_KEY}")],
        [],
    ]
)
content_types = st.sampled_from(
    [
        [],
        [("Content-Type", "application/json")],
        [("Content-Type", "application/x-ndjson")],
        [("Content-Type", "application/x-ndjson; charset=utf-8")],
        [("Content-Type", "text/plain")],
        [("Content-Type", "multipart/form-data; boundary=x")],
    ]
)
extra_headers = st.lists(
    st.tuples(
        st.sampled_from(["X-Fuzz", "Accept", "Accept-Encoding", "Origin", "Expect", "Cookie"]),
        HEADER_VALUES,
    ),
    max_size=2,
)


def _quote(value: str) -> str:
    return urllib.parse.quote(value.encode("utf-8", "surrogatepass"), safe="")


@st.composite
def squall_api(draw: st.DrawFn) -> HttpCase:
    known = st.sampled_from([*API_METHODS, "batch"])
    method = draw(st.one_of(known, known, known, known, known, known, texts))
    path = "/api/" + _quote(method)
    headers = [*draw(auth_headers), *draw(content_types), *draw(extra_headers)]
    verb = draw(st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "DELETE", "OPTIONS"]))
    query = ""
    body = b""
    if verb == "GET":
        names = ["query", "q", "channel", "user", "cursor", "limit", "since", "until", "x"]
        pairs = draw(
            st.lists(
                st.tuples(
                    st.sampled_from(names),
                    st.one_of(texts, st.sampled_from(["10", "0", "²", "١٢", "-1", "1e3"])),
                ),
                max_size=4,
            )
        )
        query = "&".join(f"{k}={_quote(v)}" for k, v in pairs)
    elif method == "batch":
        command = with_extra(
            {}, {"method": st.sampled_from(API_METHODS) | texts, "params": api_params}
        )
        commands = draw(st.lists(maybe(command), max_size=4))
        if ("Content-Type", "application/x-ndjson") in headers or draw(st.booleans()):
            body = b"\n".join(dumps(c) for c in commands)
        else:
            envelope = with_extra(
                {}, {"commands": st.just(commands), "stop_on_error": st.booleans()}
            )
            body = dumps(draw(envelope))
        if draw(st.booleans()):
            query = "stop_on_error=" + _quote(
                draw(st.sampled_from(["1", "true", "no", "maybe", ""]))
            )
    else:
        body = dumps(draw(st.one_of(api_params, api_params, hostile)))
    target = path + ("?" + query if query else "")
    return HttpCase(request(verb, target, headers, body), True, f"{verb} {target[:80]}")


# The Pusher HTTP API's endpoints (``pusher_endpoint``), and "other": a path
# under the app that is none of them.
PUSHER_KINDS = (
    "events",
    "batch",
    "channels",
    "channel",
    "users",
    "terminate",
    "terminate-key",
    "other",
)


def pusher_endpoint(kind: str, app_id: str, name: str) -> tuple[str, str] | None:
    """The verb and path of a Pusher HTTP API endpoint (``name``: a quoted
    channel or user name); None for a kind that is none of them."""
    return {
        "events": ("POST", f"/apps/{app_id}/events"),
        "batch": ("POST", f"/apps/{app_id}/batch_events"),
        "channels": ("GET", f"/apps/{app_id}/channels"),
        "channel": ("GET", f"/apps/{app_id}/channels/{name}"),
        "users": ("GET", f"/apps/{app_id}/channels/{name}/users"),
        "terminate": ("POST", f"/apps/{app_id}/users/{name}/terminate_connections"),
        "terminate-key": ("POST", f"/users/{name}/terminate_connections"),
    }.get(kind)


def _sign(method: str, path: str, params: dict[str, str]) -> str:
    from server.pusher import sign, string_to_sign

    return sign(APP_SECRET, string_to_sign(method, path, params))


@st.composite
def pusher_api(draw: st.DrawFn) -> HttpCase:
    pusher_channels = st.one_of(
        st.sampled_from(
            ["public", "private-a", "presence-a", "private-encrypted-a", "#server-to-user-u", "b c"]
        ),
        texts,
    )
    event = with_extra(
        {},
        {
            "name": st.one_of(st.sampled_from(["ev", "client-x", "x" * 201]), texts),
            "data": st.one_of(texts, values.map(lambda v: dumps(v).decode("utf-8", "replace"))),
            "channel": pusher_channels,
            "channels": st.lists(maybe(pusher_channels), max_size=3),
            "socket_id": st.one_of(st.just("1.2"), st.just("1.2"), texts),
            "info": st.sampled_from(["user_count", "subscription_count", "user_count,x", ""]),
        },
    )
    app_id = draw(st.sampled_from([APP_ID, APP_ID, APP_ID, "9", "a%2Fb"]))
    kind = draw(st.sampled_from(PUSHER_KINDS))
    name = _quote(draw(pusher_channels))
    body = b""
    known = pusher_endpoint(kind, app_id, name)
    if known is None:
        verb, path = draw(st.sampled_from(["GET", "POST", "PUT"])), f"/apps/{app_id}/{name}"
    else:
        verb, path = known
    if kind == "events":
        body = dumps(draw(st.one_of(event, hostile)))
    elif kind == "batch":
        body = dumps(draw(with_extra({}, {"batch": st.lists(maybe(event), max_size=11)})))
    if draw(st.integers(0, 5)) == 0:
        verb = draw(st.sampled_from(["GET", "POST", "DELETE", "PATCH"]))
    import hashlib

    params: dict[str, str] = {
        "auth_key": APP_KEY,
        "auth_timestamp": str(int(time.time())),
        "auth_version": "1.0",
    }
    if body:
        params["body_md5"] = hashlib.md5(body, usedforsecurity=False).hexdigest()
    extra = draw(
        st.dictionaries(
            st.sampled_from(["info", "filter_by_prefix", "x"]),
            st.one_of(
                st.sampled_from(["user_count", "subscription_count", "presence-", "a,b"]), texts
            ),
            max_size=2,
        )
    )
    params.update({k: v.encode("utf-8", "replace").decode("utf-8") for k, v in extra.items()})
    broken = draw(st.integers(0, 9))
    if broken == 1:
        params["auth_timestamp"] = draw(st.sampled_from(["1", "", "x", "١٢٣", str(2**70)]))
    elif broken == 2:
        del params["auth_key"]
    elif broken == 3:
        params["auth_version"] = draw(texts).encode("utf-8", "replace").decode("utf-8")
    elif broken == 4 and body:
        params["body_md5"] = draw(st.sampled_from(["", "0" * 32, "é"]))
    signature = _sign(verb, path, params)
    if broken == 5:
        signature = draw(st.sampled_from(["", "0" * 64, signature.upper(), "é"]))
    params["auth_signature"] = signature
    query = "&".join(f"{k}={_quote(v)}" for k, v in params.items())
    if broken == 6:
        query += draw(st.sampled_from(["&auth_key=x", "&AUTH_KEY=x", "&x=%ff", "&&=", "&info"]))
    headers = [("Content-Type", "application/json"), *draw(extra_headers)]
    target = f"{path}?{query}"
    return HttpCase(request(verb, target, headers, body), True, f"{verb} {path[:80]} ({kind})")


def _raw(case: HttpCase, ops: list[tuple[int, float, int]]) -> HttpCase:
    return HttpCase(mutate(case.raw, ops), False, "mutant of " + case.label)


well_formed = st.one_of(squall_api(), pusher_api())
cases = st.one_of(
    well_formed,
    well_formed,
    st.tuples(well_formed, mutations.filter(bool)).map(lambda p: _raw(*p)),
    st.binary(max_size=300).map(lambda b: HttpCase(b, False, "random bytes")),
)
