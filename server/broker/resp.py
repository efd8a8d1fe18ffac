"""Redis commands packed for the wire (RESP2 arrays of bulk strings), for the
broker's pipelines of script calls.

redis-py packs every argument through its encoder (type checks, memoryview
handling, chunking for large values): for a publish's 15 arguments that
costs more than the rest of the publish on the Python side. A pipeline of
script calls only ever carries bytes, str and int, so this packs exactly
those, the same bytes redis-py would send, and ``run_script_calls`` sends
them on a connection of redis-py's pool without its pipeline machinery.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import redis.exceptions

Arg = bytes | str | int


def _bulk(arg: Arg) -> bytes:
    if type(arg) is bytes:
        return arg
    if type(arg) is str:
        return arg.encode()
    if type(arg) is int:
        return b"%d" % arg
    raise TypeError(f"a Redis argument must be bytes, str or int, not {type(arg).__name__}")


def pack(args: Sequence[Arg]) -> bytes:
    """One command: ``*<n>`` then each argument as a bulk string."""
    parts = [b"*%d\r\n" % len(args)]
    append = parts.append
    for arg in args:
        data = _bulk(arg)
        append(b"$%d\r\n" % len(data))
        append(data)
        append(b"\r\n")
    return b"".join(parts)


def pack_script_calls(sha: str, calls: Iterable[tuple[Sequence[Arg], Sequence[Arg]]]) -> bytes:
    """``EVALSHA sha len(keys) *keys *args`` for each (keys, args), joined."""
    head = b"*%d\r\n$7\r\nEVALSHA\r\n$%d\r\n%b\r\n"
    sha_bytes = sha.encode()
    out = []
    for keys, args in calls:
        out.append(head % (3 + len(keys) + len(args), len(sha_bytes), sha_bytes))
        count = b"%d" % len(keys)
        out.append(b"$%d\r\n%b\r\n" % (len(count), count))
        for arg in (*keys, *args):
            data = _bulk(arg)
            out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


class Script(Protocol):
    """What is needed of a registered Lua script (redis-py's ``AsyncScript``)."""

    sha: str
    script: str | bytes


async def run_script_calls(
    client: Any,
    script: Script,
    calls: Sequence[tuple[Sequence[Arg], Sequence[Arg]]],
    tail: Sequence[Arg] = (),
    late_args: Callable[[], Sequence[Arg]] | None = None,
) -> list[Any]:
    """``EVALSHA`` each (keys, args) of ``calls`` on one connection of
    ``client``'s pool, all in one write, and read the replies in order; with
    ``tail``, one more command after them (a ``WAIT``), its reply last. With
    ``late_args``, what it returns is appended to every call's arguments,
    asked once the connection is had (connecting may learn what it says:
    behind Sentinel, the configuration the master was found under). An
    error reply comes back as its exception, in its place. ``NotSent``:
    no connection, nothing ran. A connection lost after the write began
    raises redis-py's ``ConnectionError`` or ``TimeoutError`` (or
    ``OSError``): then any of the calls may or may not have run. Nothing is
    retried here: a publish sent twice would be made twice.

    Redis runs one connection's commands in order, so the calls run in
    ``calls``' order. A server that does not know the script (a restart, a
    failover to a replica that never loaded it) answers NOSCRIPT to every
    call, having run none: the script is loaded and everything sent again.
    """

    def packed() -> bytes:
        extra = tuple(late_args()) if late_args is not None else ()
        each = ((k, (*a, *extra)) for k, a in calls) if extra else calls
        out = pack_script_calls(script.sha, each)
        return out + pack(tail) if tail else out

    count = len(calls) + (1 if tail else 0)
    replies = await _round_trip(client, packed, count)
    if calls and isinstance(replies[0], redis.exceptions.NoScriptError):
        await client.script_load(script.script)
        replies = await _round_trip(client, packed, count)
    return replies


class NotSent(Exception):
    """The commands never left: no connection could be had. Nothing ran."""


async def _round_trip(client: Any, packed: Callable[[], bytes], count: int) -> list[Any]:
    pool = client.connection_pool
    try:
        conn = await pool.get_connection()
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
        raise NotSent(str(exc) or type(exc).__name__) from exc
    try:
        await conn.send_packed_command(packed())
        replies: list[Any] = []
        for _ in range(count):
            try:
                replies.append(await conn.read_response())
            except redis.exceptions.ResponseError as exc:
                replies.append(exc)
        return replies
    except BaseException:
        # It may hold half a reply (a cancellation, a timeout): never reuse it.
        with contextlib.suppress(Exception):
            await conn.disconnect()
        raise
    finally:
        await pool.release(conn)
