"""The broker's own RESP packing sends exactly what redis-py would."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio.connection import Connection

from server.broker.resp import pack, pack_script_calls

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
