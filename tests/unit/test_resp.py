"""The broker's own RESP packing sends exactly what redis-py would."""

from __future__ import annotations

import pytest
import redis.exceptions
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio.connection import Connection

from server.broker.resp import NotSent, pack, pack_script_calls, run_script_calls

args_strategy = st.lists(
    st.one_of(
        st.binary(max_size=300),
        st.text(max_size=100),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
    ),
    min_size=1,
    max_size=20,
)


def redis_py(*args: object) -> bytes:
    return b"".join(Connection().pack_command(*args))


@settings(max_examples=200, derandomize=True, database=None)
@given(st.sampled_from(["SET", "WAIT", "PUBLISH"]), args_strategy)
def test_pack_matches_redis_py(name: str, args: list[bytes | str | int]) -> None:
    # (redis-py splits a first argument with spaces: a command name has none.)
    assert pack([name, *args]) == redis_py(name, *args)


@settings(max_examples=200, derandomize=True, database=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=3),
            args_strategy,
        ),
        min_size=1,
        max_size=5,
    )
)
def test_script_calls_match_redis_py(
    calls: list[tuple[list[str], list[bytes | str | int]]],
) -> None:
    sha = "0123456789abcdef0123456789abcdef01234567"
    want = b"".join(redis_py("EVALSHA", sha, len(keys), *keys, *args) for keys, args in calls)
    assert pack_script_calls(sha, calls) == want


def test_other_types_are_refused() -> None:
    with pytest.raises(TypeError, match="float"):
        pack(["SET", "k", 1.5])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="NoneType"):
        pack_script_calls("sha", [(["k"], [None])])  # type: ignore[list-item]


class _Conn:
    def __init__(self, fail_read: bool) -> None:
        self.fail_read = fail_read
        self.sent: list[bytes] = []
        self.disconnected = False

    async def send_packed_command(self, data: bytes) -> None:
        self.sent.append(data)

    async def read_response(self) -> object:
        if self.fail_read:
            raise redis.exceptions.ConnectionError("Connection closed by server.")
        return 1

    async def disconnect(self) -> None:
        self.disconnected = True


class _Pool:
    def __init__(self, conn: _Conn | None) -> None:
        self.conn = conn
        self.released: list[_Conn] = []

    async def get_connection(self) -> _Conn:
        if self.conn is None:
            raise redis.exceptions.ConnectionError("Error 111 connecting")
        return self.conn

    async def release(self, conn: _Conn) -> None:
        self.released.append(conn)


class _Client:
    def __init__(self, pool: _Pool) -> None:
        self.connection_pool = pool


class _Script:
    sha = "0" * 40
    script = "return 1"


async def test_no_connection_means_nothing_was_sent() -> None:
    with pytest.raises(NotSent, match="111"):
        await run_script_calls(_Client(_Pool(None)), _Script(), [(["k"], [1])])


async def test_a_connection_lost_after_sending_is_not_retried() -> None:
    """The calls may have run: the error says so by its type (not NotSent),
    they are not sent again, and the connection is never reused."""
    conn = _Conn(fail_read=True)
    pool = _Pool(conn)
    with pytest.raises(redis.exceptions.ConnectionError):
        await run_script_calls(_Client(pool), _Script(), [(["k"], [1]), (["k"], [2])])
    assert len(conn.sent) == 1  # one write, never a second
    assert conn.disconnected and pool.released == [conn]
