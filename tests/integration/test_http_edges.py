"""HTTP API edges: bodies over the limit (a JSON 413 as soon as the headers
arrive), wrong HTTP methods (405 with Allow), and a regression test for each
bug schemathesis found (tests/integration/test_openapi.py)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from typing import Any

import orjson
import pytest
import tornado.httpclient

from tests.conftest import Running, ServerFactory
from tests.rawhttp import read_answer

SEARCH = {"namespaces": {"chat": {"persist": True, "searchable": True}}}


def limit_of(server: Running) -> int:
    return server.settings.limits.max_publication_bytes + 1024 * 1024


async def exchange(
    server: Running, request: bytes, *, timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes, bool]:
    """Send raw ``request`` bytes on a fresh connection, read one response:
    (status, headers, body, whether the server then closed the connection)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(request)
        await writer.drain()
        status, headers, body = await read_answer(reader, timeout)
        # The server closes (EOF) or keeps the connection (nothing comes).
        try:
            rest = await asyncio.wait_for(reader.read(1), 0.5)
            closed = rest == b""
        except TimeoutError:
            closed = False
        return status, headers, body, closed
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def head(server: Running, method: str, path: str, *extra: str) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: 127.0.0.1",
        f"Authorization: apikey {server.settings.auth.api_key}",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def fetch(
    server: Running, method: str, path: str, body: bytes | None = None, *, key: bool = True
) -> tuple[int, tornado.httputil.HTTPHeaders, Any]:
    headers = {"Authorization": f"apikey {server.settings.auth.api_key}"} if key else {}
    client = tornado.httpclient.AsyncHTTPClient()
    response = await client.fetch(
        f"{server.http_url}{path}",
        method=method,
        body=body,
        headers=headers,
        raise_error=False,
        allow_nonstandard_methods=True,
    )
    return response.code, response.headers, orjson.loads(response.body) if response.body else None


# ---- 413 at the headers ------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/publish", "/api/batch", "/api/search"])
async def test_announced_oversized_body_is_413_before_it_is_sent(
    server: Running, path: str
) -> None:
    """Headers alone, no body sent: the answer comes at once (Tornado used
    to answer a bare 400 and close), then the connection closes."""
    limit = limit_of(server)
    status, headers, body, closed = await exchange(
        server, head(server, "POST", path, f"Content-Length: {limit + 1}")
    )
    assert status == 413
    assert headers["content-type"].startswith("application/json")
    error = orjson.loads(body)["error"]
    assert error["code"] == 115
    assert error["message"] == f"body is {limit + 1} bytes; the limit is {limit}"
    assert closed
    assert headers.get("connection") == "close"
    assert server.node.metrics.publications_in == 0


async def test_oversized_request_on_a_kept_alive_connection_is_413(server: Running) -> None:
    """The second request of a keep-alive connection (answered off Tornado
    when it is a plain API call) gets the same 413."""
    limit = limit_of(server)
    body = b'{"channel": "news", "data": 1}'
    first = head(server, "POST", "/api/publish", f"Content-Length: {len(body)}") + body
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(first)
        await writer.drain()
        answer = await asyncio.wait_for(reader.readuntil(b"}}"), 5)
        assert answer.startswith(b"HTTP/1.1 200 ")
        writer.write(head(server, "POST", "/api/publish", f"Content-Length: {limit + 1}"))
        await writer.drain()
        rest = await asyncio.wait_for(reader.read(), 5)  # up to the close
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert rest.startswith(b"HTTP/1.1 413 ")
    assert orjson.loads(rest.partition(b"\r\n\r\n")[2])["error"]["code"] == 115


async def test_expect_100_continue_gets_413_instead_of_continue(server: Running) -> None:
    limit = limit_of(server)
    status, _, body, closed = await exchange(
        server,
        head(
            server, "POST", "/api/publish", f"Content-Length: {limit * 100}", "Expect: 100-continue"
        ),
    )
    assert status == 413  # not "100 Continue"
    assert orjson.loads(body)["error"]["code"] == 115
    assert closed


async def test_client_that_sends_the_body_anyway_gets_the_413(server: Running) -> None:
    status, _, reply = await fetch(server, "POST", "/api/publish", b"x" * (3 * limit_of(server)))
    assert status == 413
    assert reply["error"]["code"] == 115


async def test_body_at_the_limit_is_still_read_and_parsed(make_server: ServerFactory) -> None:
    """A body of exactly the limit, in many TCP reads, reaches the method
    whole (the handler streams it in and joins it)."""
    server = await make_server(
        {"limits": {"max_publication_bytes": 1024 * 1024, "max_frame_bytes": 2 * 1024 * 1024}}
    )
    limit = limit_of(server)
    data = "y" * (1024 * 1024 - 2)
    body = orjson.dumps({"channel": "news", "data": data})
    body += b" " * (limit - len(body))
    assert len(body) == limit
    status, _, reply = await fetch(server, "POST", "/api/publish", body)
    assert status == 200, reply
    history = await server.api().history("news", limit=1)
    assert history["publications"][0]["data"] == data


async def test_chunked_body_within_the_limit_is_parsed(server: Running) -> None:
    body = orjson.dumps({"channel": "news", "data": {"n": 1}})
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 7]), body[i : i + 7]) for i in range(0, len(body), 7)
    )
    status, _, reply, closed = await exchange(
        server,
        head(server, "POST", "/api/publish", "Transfer-Encoding: chunked") + chunks + b"0\r\n\r\n",
    )
    assert status == 200, reply
    assert orjson.loads(reply)["result"]["offset"] == 1
    assert not closed  # keep-alive as usual


async def test_chunked_body_past_the_limit_is_413_and_closed(server: Running) -> None:
    limit = limit_of(server)
    piece = b"x" * 65536
    count = limit // len(piece) + 2
    chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(head(server, "POST", "/api/publish", "Transfer-Encoding: chunked"))
        for _ in range(count):
            writer.write(chunk)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        data = await asyncio.wait_for(reader.read(4096), 5)
        # After the answer: end of stream (or a reset, as the body kept coming).
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert data.startswith(b"HTTP/1.1 413 ")
    error = orjson.loads(data.partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == 115
    assert str(limit) in error["message"]
    assert server.node.metrics.publications_in == 0


async def test_batch_over_the_limit_still_answers_its_json_413(server: Running) -> None:
    limit = limit_of(server)
    status, _, reply = await fetch(server, "POST", "/api/batch", b" " * (limit + 10))
    assert status == 413
    assert reply["error"]["message"] == f"body is {limit + 10} bytes; the limit is {limit}"


# ---- 405 with Allow -------------------------------------------------------------


@pytest.mark.parametrize("verb", ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"])
async def test_wrong_verb_on_a_post_method_is_405_with_allow(server: Running, verb: str) -> None:
    body = b"{}" if verb in ("PUT", "PATCH") else None
    status, headers, reply = await fetch(server, verb, "/api/publish", body)
    assert status == 405
    assert headers["Allow"] == "POST"
    assert reply["error"]["code"] == 107
    assert verb in reply["error"]["message"]


async def test_head_is_405_with_allow(server: Running) -> None:
    status, headers, _ = await fetch(server, "HEAD", "/api/batch")
    assert status == 405
    assert headers["Allow"] == "POST"


async def test_search_allows_get_and_post(server: Running) -> None:
    status, headers, reply = await fetch(server, "DELETE", "/api/search")
    assert status == 405
    assert headers["Allow"] == "GET, POST"
    # GET is still a search (here: search is off, a 400 of its own).
    status, _, reply = await fetch(server, "GET", "/api/search?query=x")
    assert status == 400
    assert reply["error"]["code"] == 108


async def test_verb_tornado_does_not_know_is_405_with_allow(server: Running) -> None:
    status, headers, body, _ = await exchange(server, head(server, "BREW", "/api/publish"))
    assert status == 405
    assert headers["allow"] == "POST"
    assert orjson.loads(body)["error"]["code"] == 107


async def test_405_keeps_the_connection(server: Running) -> None:
    _, _, _, closed = await exchange(server, head(server, "GET", "/api/publish"))
    assert not closed


@pytest.mark.parametrize("verb", ["GET", "POST", "PUT"])
async def test_unknown_api_method_stays_404(server: Running, verb: str) -> None:
    status, headers, reply = await fetch(
        server, verb, "/api/nosuch", b"{}" if verb != "GET" else None
    )
    assert status == 404
    assert reply["error"]["code"] == 104
    assert "Allow" not in headers


@pytest.mark.parametrize(
    ("path", "allow"),
    [
        ("/health", "GET"),
        ("/ready", "GET, HEAD"),
        ("/status", "GET"),
        ("/metrics", "GET"),
        ("/api/openapi.json", "GET"),
    ],
)
async def test_status_endpoints_answer_405_with_allow(
    server: Running, path: str, allow: str
) -> None:
    status, headers, reply = await fetch(server, "POST", path, b"")
    assert status == 405
    assert headers["Allow"] == allow
    assert reply["error"]["code"] == 107


# ---- what schemathesis found ------------------------------------------------------


async def test_get_search_with_a_non_ascii_digit_is_400(make_server: ServerFactory) -> None:
    """``"²".isdigit()`` holds but ``int("²")`` fails: was a 500."""
    server = await make_server(SEARCH)
    status, _, reply = await fetch(server, "GET", "/api/search?query=x&limit=%C2%B2")
    assert status == 400
    assert reply["error"] == {"code": 107, "message": "'limit' must be a number"}


@pytest.mark.parametrize("how", ["GET", "POST", "batch"])
async def test_search_time_past_64_bits_is_400(make_server: ServerFactory, how: str) -> None:
    """A ``since`` the index cannot store was an OverflowError in SQLite: a
    500 (and an internal error in a batch)."""
    server = await make_server(SEARCH)
    huge = 2**64 - 1
    if how == "GET":
        status, _, reply = await fetch(server, "GET", f"/api/search?query=x&since={huge}")
        error = reply["error"]
    elif how == "POST":
        body = orjson.dumps({"query": "x", "until": huge})
        status, _, reply = await fetch(server, "POST", "/api/search", body)
        error = reply["error"]
    else:
        body = orjson.dumps(
            {"commands": [{"method": "search", "params": {"query": "x", "since": huge}}]}
        )
        status, _, reply = await fetch(server, "POST", "/api/batch", body)
        assert status == 200
        status, error = 400, reply["replies"][0]["error"]
    assert status == 400
    assert error["code"] == 107
    assert "milliseconds" in error["message"]


async def test_search_cursor_with_a_huge_time_is_400(make_server: ServerFactory) -> None:
    server = await make_server(SEARCH)
    cursor = base64.urlsafe_b64encode(orjson.dumps([2**64 - 1, "x"])).decode()
    body = orjson.dumps({"query": "x", "cursor": cursor})
    status, _, reply = await fetch(server, "POST", "/api/search", body)
    assert status == 400
    assert reply["error"] == {"code": 107, "message": "'cursor' is not one this server gave out"}
