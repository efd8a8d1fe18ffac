"""The HTTP target under atheris (libFuzzer): one input is one request to the
real server in this process (``http.InProcessServer``, production's wiring),
sent over a persistent keep-alive connection, a fresh ``Connection: close``
one, or as raw bytes.

An input is five choice bytes, a text part and the body::

    byte 0   kind (bits 0-2): 0 and 6 POST /api/<method>, 1 batch (JSON),
             2 batch (NDJSON), 3 a GET, 4 and 7 the Pusher HTTP API, 5 raw
             bytes; bits 6 and 7 both set: Connection: close on a fresh
             connection
    byte 1   what: the API method, the GET's path, the Pusher endpoint (bits
             0-2) and app id (bits 3-4)
    byte 2   the verb; for Pusher, bits 0-3 break the signature on purpose
             (7-15: an old timestamp, a timestamp of non-ASCII digits, an
             unknown key, no key, version 2.0, a wrong or (bit 4) no
             body_md5, a wrong signature, a parameter after signing, no
             signature) and bits 4-7 the verb
    byte 3   auth header (bits 0-2), content type (bits 3-5), one more header
             or a chunked body (bits 6-7)
    byte 4   n, the length of the text part
    n bytes  the text part: the query string (API, GET), the method name
             (``/api/<text>``), or a Pusher channel or user name, then after
             a ``?`` query parameters that the harness signs with the rest
    rest     the body

A raw input (kind 5) is everything after byte 0, sent as it is on a fresh
connection, then half-closed. Short inputs are padded with zero bytes, so
every input means something.

Connections: a well-formed request that ``handlers/api_keepalive.py`` takes
(``POST /api/<method>`` over HTTP/1.1, no ``Expect``, ``Transfer-Encoding``
or ``Connection: close``) goes on the "api" connection, which was handed to
the keep-alive path by a first ``POST /api/info`` when it was opened; any
other well-formed request goes on the "tornado" connection, which never
carries a request Tornado would hand over (one that would is sent on it, and
the connection dropped after it), so each input takes the same path whatever
came before it, and a crash replays alike. A connection the server closes is
opened again for the next input; a request that finds its reused connection
closed by the server before any answer is sent again once on a new one.

The properties are ``HttpTarget.check``'s (``http.verdict``).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import socket
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from reliability.fuzz import http
from reliability.fuzz.http import API_KEY, APP_ID, APP_KEY, HANG_SECONDS, ServerFault

# Byte 0, bits 0-2 (the cheap keep-alive API requests and the Pusher API,
# which has the most endpoints, twice).
KINDS = ("api", "batch", "ndjson", "get", "pusher", "raw", "api", "pusher")
API_METHODS = http.API_METHODS  # the ten methods of ApiMethods.table()
# Byte 1 of an "api" input: a method, or (10) the text part as the method, or
# (11) ``batch`` with a method's body.
API_TARGETS = len(API_METHODS) + 2
VERBS = ("POST",) * 11 + ("GET", "PUT", "DELETE", "OPTIONS", "PATCH")
GET_PATHS = (
    "/api/search",
    "/api/search",
    "/api/search",
    "/api/search",
    "/api/openapi.json",
    "/api/publish",
    "/health",
    "/ready",
    "/status",
    "/metrics",
    "/api/{text}",
    "/{text}",
)
GET_VERBS = ("GET",) * 13 + ("HEAD", "OPTIONS", "DELETE")
PUSHER_ENDPOINTS = http.PUSHER_KINDS  # byte 1, bits 0-2
PUSHER_VERBS = (None,) * 13 + ("GET", "POST", "DELETE")
APP_IDS = (APP_ID, APP_ID, APP_ID, "9")
AUTH = (
    f"apikey {API_KEY}",
    f"apikey {API_KEY}",
    f"apikey {API_KEY}",
    f"apikey {API_KEY}",
    f"APIKEY   {API_KEY}  ",
    "apikey wrong",
    f"Bearer {API_KEY}",
    None,
)
CONTENT_TYPES = (
    None,
    "application/json",
    "application/x-ndjson",
    "application/x-ndjson; charset=utf-8",
    "text/plain",
    "multipart/form-data; boundary=x",
    "application/json",
    None,
)
# Byte 3, bits 6-7: nothing more, a header, ``Expect: 100-continue``, or the
# body sent chunked.
EXTRA = (None, ("Accept-Encoding", "gzip"), ("Expect", "100-continue"), "chunked")
# What a query string or path keeps unescaped from the text part (the rest
# is percent-encoded, so the request line stays one line).
_QUERY_SAFE = "=&;,/:@+%!$'()*"
_METHOD = re.compile(r"[a-z_]+")


@dataclass(slots=True)
class Request:
    raw: bytes
    label: str
    # Sent as-is on a fresh connection, then half-closed (malformed HTTP).
    is_raw: bool = False
    # Connection: close, on a fresh connection.
    close: bool = False
    # The keep-alive path takes it (the "api" connection).
    keepalive: bool = False
    # Tornado would hand its connection to the keep-alive path.
    adopted: bool = False
    head_only: bool = False


def encode(kind: int, what: int, verb: int, headers: int, text: bytes, body: bytes) -> bytes:
    """An input from its parts (the inverse of ``decode``; for seeds)."""
    return bytes((kind, what, verb, headers, len(text))) + text + body


def _signature(verb: str, path: str, params: dict[str, str]) -> str:
    """The Pusher HTTP API's signature (docs/pusher.md), computed here rather
    than with server/pusher.py's own functions: an independent oracle, and
    none of the server's lines run on the client's side."""
    query = "&".join(f"{k}={v}" for k, v in sorted(params.items()) if k != "auth_signature")
    message = f"{verb}\n{path}\n{query}"
    return hmac.new(http.APP_SECRET.encode(), message.encode(), hashlib.sha256).hexdigest()


def _utf8(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _quote(text: str, safe: str = "") -> str:
    return urllib.parse.quote(text.encode("utf-8", "surrogateescape"), safe=safe)


def build(
    verb: str,
    target: str,
    headers: list[tuple[str, str]],
    body: bytes,
    *,
    close: bool = False,
    chunked: bool = False,
) -> bytes:
    head = [f"{verb} {target} HTTP/1.1", "Host: 127.0.0.1"]
    head += [f"{k}: {v}" for k, v in headers]
    if chunked:
        head.append("Transfer-Encoding: chunked")
        half = len(body) // 2
        parts = [p for p in (body[:half], body[half:]) if p]
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    elif body or verb in ("POST", "PUT", "PATCH"):
        head.append(f"Content-Length: {len(body)}")
    if close:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def decode(data: bytes) -> Request:
    """The request an input stands for."""
    if len(data) < 5:
        data = data + bytes(5 - len(data))
    kind = KINDS[data[0] & 7]
    close = data[0] & 0xC0 == 0xC0
    if kind == "raw":
        return Request(data[1:], "raw bytes", is_raw=True)
    what, choice, bits = data[1], data[2], data[3]
    n = data[4]
    text_bytes, body = data[5 : 5 + n], data[5 + n :]
    text = text_bytes.decode("utf-8", "surrogateescape")
    headers: list[tuple[str, str]] = []
    auth = AUTH[bits & 7]
    content_type = CONTENT_TYPES[(bits >> 3) & 7]
    extra = EXTRA[bits >> 6]
    chunked = extra == "chunked"
    if isinstance(extra, tuple):
        headers.append(extra)
    if kind == "pusher":
        return _pusher(what, choice, text, body, headers, close, chunked)
    if auth is not None:
        headers.append(("Authorization", auth))
    if kind == "get":
        verb = GET_VERBS[choice & 15]
        path = GET_PATHS[what % len(GET_PATHS)]
        if "{text}" in path:
            path, _, query = text.partition("?")
            path = GET_PATHS[what % len(GET_PATHS)].format(text=_quote(path, "/"))
            target = path + ("?" + _quote(query, _QUERY_SAFE) if query else "")
        else:
            target = path + ("?" + _quote(text, _QUERY_SAFE) if text else "")
        body = b""
    else:
        verb = VERBS[choice & 15]
        if kind == "api":
            index = what % API_TARGETS
            if index < len(API_METHODS):
                method, query = API_METHODS[index], text
            elif index == len(API_METHODS):
                method, query = _quote(text), ""
            else:
                method, query = "batch", text
        else:
            method, query = "batch", text
            if content_type is None:
                content_type = "application/x-ndjson" if kind == "ndjson" else "application/json"
        target = f"/api/{method}" + ("?" + _quote(query, _QUERY_SAFE) if query else "")
        if verb in ("GET", "OPTIONS"):
            body = b""
    if content_type is not None:
        headers.append(("Content-Type", content_type))
    path = target.partition("?")[0]
    api_post = (
        verb == "POST" and path.startswith("/api/") and path[5:] != "batch"
        and _METHOD.fullmatch(path[5:]) is not None
    )  # fmt: skip
    keepalive = api_post and not close and not chunked and extra != ("Expect", "100-continue")
    raw = build(verb, target, headers, body, close=close, chunked=chunked)
    return Request(
        raw,
        f"{verb} {target[:80]}",
        close=close,
        keepalive=keepalive,
        adopted=api_post and not close,
        head_only=verb == "HEAD",
    )


def _pusher(
    what: int,
    choice: int,
    text: str,
    body: bytes,
    headers: list[tuple[str, str]],
    close: bool,
    chunked: bool,
) -> Request:
    endpoint = PUSHER_ENDPOINTS[what & 7]
    app_id = APP_IDS[(what >> 3) & 3]
    name_text, _, extra_query = text.partition("?")
    name = _quote(name_text)
    known = http.pusher_endpoint(endpoint, app_id, name)
    if known is None:
        verb, path = ("GET", "POST")[what >> 7], f"/apps/{app_id}/{name}"
    else:
        verb, path = known
    verb = PUSHER_VERBS[choice >> 4] or verb
    if verb == "GET":
        body = b""
    broken = choice & 15
    # The harness's parameters, then the input's own (as it gives them,
    # percent-encoded here); signed as the server reads them: keys
    # lower-cased, values decoded. A key the input repeats is its own 400.
    given = urllib.parse.parse_qsl(extra_query, keep_blank_values=True, errors="surrogateescape")
    overridden = {k.lower() for k, _ in given}
    own: dict[str, str] = {
        "auth_key": APP_KEY,
        "auth_timestamp": str(int(time.time())),
        "auth_version": "1.0",
    }
    if body:
        own["body_md5"] = hashlib.md5(body, usedforsecurity=False).hexdigest()
    if broken == 7:
        own["auth_timestamp"] = "1"
    elif broken == 8:
        own["auth_timestamp"] = "\u0661\u0662"  # digits, not ASCII ones
    elif broken == 9:
        own["auth_key"] = "fuzz-app-key-unknown"
    elif broken == 10:
        del own["auth_key"]
    elif broken == 11:
        own["auth_version"] = "2.0"
    elif broken == 12 and body:
        if choice & 16:
            del own["body_md5"]
        else:
            own["body_md5"] = "0" * 32
    pairs = [(k, v) for k, v in own.items() if k not in overridden] + given
    params: dict[str, str] = {}
    for key, value in pairs:
        # What is not UTF-8 the server refuses before the signature: signed
        # here as anything.
        params.setdefault(_utf8(key.lower()), _utf8(value))
    signature = _signature(verb, path, params)
    if broken == 13:
        signature = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    if broken != 15 and "auth_signature" not in overridden:
        pairs.append(("auth_signature", signature))
    query = "&".join(f"{_quote(k)}={_quote(v)}" for k, v in pairs)
    if broken == 14:
        query += "&info=user_count"
    headers = [("Content-Type", "application/json"), *headers]
    raw = build(verb, f"{path}?{query}", headers, body, close=close, chunked=chunked)
    return Request(raw, f"{verb} {path[:80]} ({endpoint})", close=close)


# ---- transport -----------------------------------------------------------------


class _Closed(Exception):
    """The server closed the connection before any byte of an answer."""


@dataclass(slots=True)
class Answer:
    status: int
    head: bytes
    # The server closes the connection after it.
    closing: bool


class Connection:
    """One client connection, reading answers exactly (status line, headers,
    ``Content-Length`` or chunked body; ``1xx`` answers skipped)."""

    def __init__(self, port: int, deadline: float) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=HANG_SECONDS)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.answers = 0
        self.deadline = deadline

    def close(self) -> None:
        self.sock.close()

    def _recv(self) -> bytes:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self.sock.settimeout(left)
        try:
            return self.sock.recv(65536)
        except ConnectionResetError:
            return b""

    def _fill(self, size: int) -> bool:
        while len(self.buf) < size:
            chunk = self._recv()
            if not chunk:
                return False
            self.buf += chunk
        return True

    def _line(self) -> bytes | None:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[: end + 2]
                return line
            chunk = self._recv()
            if not chunk:
                return None
            self.buf += chunk

    def exchange(self, raw: bytes, head_only: bool) -> Answer | None:
        """Send one request and read its answer; None: the connection ended
        inside an answer. Raises ``_Closed`` when it ended before one."""
        try:
            self.sock.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass  # an answer, or the end, is there to read
        while True:
            while (end := self.buf.find(b"\r\n\r\n")) < 0:
                chunk = self._recv()
                if not chunk:
                    if not self.buf:
                        raise _Closed
                    return None
                self.buf += chunk
            head = bytes(self.buf[:end])
            del self.buf[: end + 4]
            status = http.status_of(head)
            if status is None:
                return None
            if status >= 200:
                break
        length = 0
        chunked = False
        closing = head.startswith(b"HTTP/1.0")
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                closing = b"close" in value.lower()
        self.answers += 1
        if head_only or status in (204, 304):
            pass
        elif chunked:
            while True:
                size_line = self._line()
                if size_line is None:
                    return None
                size = int(size_line.split(b";")[0], 16)
                if not self._fill(size + 2):
                    return None
                del self.buf[: size + 2]
                if size == 0:
                    break
        elif length:
            if not self._fill(length):
                return None
            del self.buf[:length]
        return Answer(status, head, closing)


class HttpFuzzer:
    """The server (started on first use) and the check of one input: the
    atheris child's ``TestOneInput``, and the engine's replay of a corpus or
    a crash in the parent."""

    def __init__(self, data_dir: Path | None = None) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._data_dir = data_dir
        self.server: http.InProcessServer | None = None
        self.conns: dict[str, Connection] = {}
        self.statuses: dict[int, int] = {}

    def start(self) -> http.InProcessServer:
        if self.server is None:
            data_dir = self._data_dir
            if data_dir is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="fuzz-http-")
                data_dir = Path(self._tmp.name)
            data_dir.mkdir(parents=True, exist_ok=True)
            self.server = http.InProcessServer(data_dir).start()
        return self.server

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()
        self.conns.clear()
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __call__(self, data: bytes) -> None:
        server = self.start()
        request = decode(data)
        errors_before = len(server.errors.records)
        deadline = time.monotonic() + HANG_SECONDS
        answer: bytes | Answer | None
        try:
            if request.is_raw:
                answer = http.exchange(server.port, request.raw, False)
            else:
                answer = self._send(server.port, request, deadline)
        except TimeoutError:
            raise ServerFault(
                f"{request.label}: no end of the answer within {HANG_SECONDS} s", "hang"
            ) from None
        if isinstance(answer, Answer):
            status: int | None = answer.status
            text = answer.head
        else:
            status, text = _final_status(answer), answer or b""
        if status is not None:
            self.statuses[status] = self.statuses.get(status, 0) + 1
        logged = server.errors.records[errors_before:]
        http.verdict(request.label, not request.is_raw, status, text, logged)

    def _send(self, port: int, request: Request, deadline: float) -> Answer | None:
        if request.close:
            conn = Connection(port, deadline)
            try:
                return conn.exchange(request.raw, request.head_only)
            except _Closed:
                return None
            finally:
                conn.close()
        name = "api" if request.keepalive else "tornado"
        for attempt in range(2):
            conn = self._conn(name, port, deadline)
            conn.deadline = deadline
            try:
                answer = conn.exchange(request.raw, request.head_only)
            except _Closed:
                self._drop(name)
                if conn.answers and attempt == 0:
                    continue  # a stale connection: once more on a new one
                return None
            except BaseException:
                self._drop(name)
                raise
            if answer is None or answer.closing or (request.adopted and name == "tornado"):
                self._drop(name)
            return answer
        return None

    def _conn(self, name: str, port: int, deadline: float) -> Connection:
        conn = self.conns.get(name)
        if conn is None:
            conn = Connection(port, deadline)
            if name == "api":
                # Tornado answers a connection's first API request, then
                # hands the connection to the keep-alive path.
                raw = build("POST", "/api/info", [("Authorization", f"apikey {API_KEY}")], b"{}")
                try:
                    first = conn.exchange(raw, False)
                except _Closed:
                    first = None
                if first is None or first.closing:
                    conn.close()
                    raise ServerFault("POST /api/info on a new connection: no answer", "no answer")
            self.conns[name] = conn
        return conn

    def _drop(self, name: str) -> None:
        conn = self.conns.pop(name, None)
        if conn is not None:
            conn.close()


def _final_status(answer: bytes | None) -> int | None:
    """The status of the last answer in ``answer`` past any ``1xx``."""
    while answer:
        status = http.status_of(answer)
        if status is None or status >= 200:
            return status
        end = answer.find(b"\r\n\r\n")
        if end < 0:
            return status
        answer = answer[end + 4 :]
    return None


# ---- seeds -----------------------------------------------------------------------

# A valid body for each API method (ApiMethods.table(), docs/api.md).
API_BODIES: dict[str, bytes] = {
    "publish": b'{"channel":"news","data":{"text":"hi"}}',
    "broadcast": b'{"channels":["news","chat:room"],"data":{"n":1}}',
    "history": b'{"channel":"chat:room","limit":5,"reverse":true}',
    "presence": b'{"channel":"chat:room"}',
    "presence_stats": b'{"channel":"chat:room"}',
    "channels": b'{"prefix":"chat:"}',
    "disconnect": b'{"user":"u1","reconnect":false}',
    "unsubscribe": b'{"user":"u1","channel":"news"}',
    "info": b"{}",
    "search": b'{"query":"hello","channel":"logged:a","limit":10}',
}


def seeds() -> list[bytes]:
    """Valid requests of every kind: every API method, batches, GETs, every
    Pusher endpoint signed right (and a few wrong), raw bytes."""
    out: list[bytes] = []
    for i, method in enumerate(API_METHODS):
        out.append(encode(0, i, 0, 0, b"", API_BODIES[method]))
        out.append(encode(0xC0, i, 0, 8, b"", API_BODIES[method]))  # Connection: close
    out.append(encode(0, 2, 0, 0, b"", b'{"channel":"news","since":{"offset":0,"epoch":"x"}}'))
    out.append(encode(0, API_TARGETS - 1, 0, 8, b"", b'{"channel":"news","data":1}'))
    out.append(encode(0, 0, 0, 0xC0, b"", API_BODIES["publish"]))  # chunked
    out.append(encode(0, 0, 0, 0x80, b"", API_BODIES["publish"]))  # Expect
    out.append(encode(0, 0, 0, 5, b"", API_BODIES["publish"]))  # a wrong key
    commands = b",".join(
        b'{"method":"%s","params":%s}' % (m.encode(), API_BODIES[m]) for m in API_METHODS
    )
    out.append(encode(1, 0, 0, 0, b"", b'{"commands":[' + commands + b'],"stop_on_error":false}'))
    out.append(encode(1, 0, 0, 0, b"stop_on_error=1", b'{"commands":[' + commands + b"]}"))
    ndjson = b"\n".join(
        b'{"method":"%s","params":%s}' % (m.encode(), API_BODIES[m]) for m in API_METHODS
    )
    out.append(encode(2, 0, 0, 0, b"", ndjson))
    out.append(encode(0xC2, 0, 0, 0xC0, b"", ndjson))  # chunked, Connection: close
    for i, path in enumerate(GET_PATHS):
        if path != "/api/search" or i == 0:
            out.append(encode(3, i, 0, 0, b"", b""))
    out.append(encode(3, 0, 0, 0, b"query=hello&channel=logged:a&limit=10&since=0", b""))
    out.append(encode(3, 0, 0, 0, b"q=x&user=u&until=99", b""))
    out.append(encode(3, 0, 0, 0, b"q=x&cursor=c", b""))
    out.append(encode(3, 8, 0, 0, b"scope=cluster", b""))
    event = (
        b'{"name":"ev","data":"{\\"a\\":1}","channels":["public","private-a"],"socket_id":"1.2"}'
    )
    events = {
        "events": event,
        "batch": b'{"batch":[{"name":"ev","channel":"presence-a","data":"x","info":"user_count"},'
        b'{"name":"ev2","channel":"public","data":"{}"}]}',
    }
    params = {
        "channels": b"?filter_by_prefix=presence-&info=user_count",
        "channel": b"presence-a?info=user_count,subscription_count",
        "users": b"presence-a",
        "terminate": b"u1",
        "terminate-key": b"u1",
        "other": b"nope",
    }
    for i, endpoint in enumerate(PUSHER_ENDPOINTS):
        text = params.get(endpoint, b"")
        out.append(encode(4, i, 0, 0, text, events.get(endpoint, b"")))
    for broken in range(7, 16):
        out.append(encode(4, 0, broken, 0, b"", event))
    out.append(encode(4, 0, 12 | 16, 0, b"", event))  # no body_md5
    for odd in (
        b'{"name":"ev","data":"x","channel":"public"}',
        b'{"name":"ev","data":"x","channel":"#server-to-user-u1"}',
        b'{"name":"ev","data":"x","channels":[]}',
        b'{"name":"client-ev","data":"x","channels":["private-encrypted-a"],"socket_id":"x"}',
    ):
        out.append(encode(4, 0, 0, 0, b"", odd))
    out.append(encode(4, 1, 0, 0, b"", b'{"batch":[1]}'))
    out.append(encode(4, 0, 0, 0, b"?info=subscription_count", event))
    out.append(encode(0xC4, 2, 0, 0, b"", b""))
    out.append(encode(5, 0, 0, 0, b"", b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"))
    out.append(encode(5, 0, 0, 0, b"", b"POST /api/info HTTP/1.1\r\nContent-Length: 9\r\n\r\n{}"))
    return out
