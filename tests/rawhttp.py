"""Reading HTTP/1.1 answers off a raw socket, for tests that need to send
what an HTTP client library would not (pipelined, malformed, oversized)."""

from __future__ import annotations

import asyncio


async def read_answer(
    reader: asyncio.StreamReader, timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    """The next answer on ``reader``: (status, headers with lower-case
    names, body), the body by Content-Length or chunked."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int(await asyncio.wait_for(reader.readline(), timeout), 16)
            chunk = await asyncio.wait_for(reader.readexactly(size + 2), timeout)
            if size == 0:
                return status, headers, body
            body += chunk[:-2]
    length = int(headers.get("content-length", "0"))
    return status, headers, await asyncio.wait_for(reader.readexactly(length), timeout)
