"""Hypothesis strategies shared by the targets: hostile JSON values, a JSON
writer that can say what orjson will not (lone surrogates, huge numbers,
NaN, raw bytes), and byte-level mutation of valid inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import orjson
from hypothesis import strategies as st


@dataclass(frozen=True, slots=True)
class Raw:
    """Bytes spliced into the JSON text as they are (deep nesting, invalid
    UTF-8, broken tokens)."""

    data: bytes


def _text(value: str) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # lone surrogates: escaped by hand
        pass
    out = ['"']
    for ch in value:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif code < 0x20 or 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")  # lone surrogates too, escaped
        else:
            out.append(ch)
    out.append('"')
    return "".join(out).encode("utf-8")


def dumps(value: Any) -> bytes:
    """JSON text of ``value``; unlike orjson it writes any int, NaN and
    infinities (as out-of-range literals), lone surrogates (escaped) and
    ``Raw`` fragments."""
    if value is None:
        return b"null"
    if value is True:
        return b"true"
    if value is False:
        return b"false"
    if isinstance(value, Raw):
        return value.data
    if isinstance(value, int):
        return str(value).encode()
    if isinstance(value, float):
        if math.isnan(value):
            return b"NaN"
        if math.isinf(value):
            return b"1e999" if value > 0 else b"-1e999"
        return repr(value).encode()
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, dict):
        return b"{" + b",".join(_text(str(k)) + b":" + dumps(v) for k, v in value.items()) + b"}"
    if isinstance(value, (list, tuple)):
        return b"[" + b",".join(dumps(v) for v in value) + b"]"
    raise TypeError(type(value).__name__)


EDGE_INTS = [
    0,
    1,
    -1,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    2**53 - 1,
    2**53,
    2**63 - 1,
    2**63,
    2**64 - 1,
    2**64,
    -(2**63),
    -(2**63) - 1,
    10**30,
    -(10**30),
]
EDGE_TEXT = [
    "",
    " ",
    "\x00",
    "\n",
    "\r\n",
    "\u202e",
    "\ufeff",
    "\ud800",
    "\udfff",
    "💥",
    "é",
    "a" * 201,
    "x" * 300,
    "default:x",
    ":",
    "a:",
    ":b",
    "#server-to-user-",
    "private-",
    "presence-",
    "private-encrypted-x",
    "../../etc/passwd",
    "%00",
    "null",
    "1",
]

ints = st.one_of(st.integers(-(2**70), 2**70), st.sampled_from(EDGE_INTS))
floats = st.floats(allow_nan=True, allow_infinity=True)
texts = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(codec=None), max_size=20),  # surrogates included
    st.sampled_from(EDGE_TEXT),
)
deep = st.integers(1, 1100).flatmap(
    lambda d: st.sampled_from(
        [Raw(b"[" * d + b"]" * d), Raw(b'{"a":' * d + b"1" + b"}" * d), Raw(b"[" * d)]
    )
)
raw_tokens = st.sampled_from(
    [Raw(b"\xff"), Raw(b'"\xc3"'), Raw(b"1e999"), Raw(b"-"), Raw(b'"\\u12"'), Raw(b"tru")]
)
scalars = st.one_of(st.none(), st.booleans(), ints, floats, texts)
values: st.SearchStrategy[Any] = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(texts, children, max_size=4)
    ),
    max_leaves=6,
)
hostile = st.one_of(values, deep, raw_tokens)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the well-typed value, sometimes anything."""
    return st.one_of(strategy, hostile)


def with_extra(
    required: dict[str, st.SearchStrategy[Any]], optional: dict[str, st.SearchStrategy[Any]]
) -> st.SearchStrategy[dict[str, Any]]:
    """An object of known fields (each maybe hostile) and some unknown ones."""
    return st.tuples(
        st.fixed_dictionaries(
            {k: maybe(v) for k, v in required.items()},
            optional={k: maybe(v) for k, v in optional.items()},
        ),
        st.one_of(st.just({}), st.dictionaries(texts, values, max_size=2)),
    ).map(lambda pair: {**pair[1], **pair[0]})


# ---- mutation ----------------------------------------------------------------

TOKENS = [
    b'"',
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"\\",
    b"\\u",
    b"\n",
    b"\x00",
    b"\xff",
    b"1e999",
]

mutation = st.tuples(st.integers(0, 6), st.floats(0, 1), st.integers(0, 255))


def mutate(data: bytes, ops: list[tuple[int, float, int]]) -> bytes:
    """``data`` with each (kind, where, byte) applied: flip, insert, delete,
    truncate, duplicate a span, insert a token, overwrite."""
    buf = bytearray(data)
    for kind, where, byte in ops:
        pos = min(int(where * len(buf)), max(len(buf) - 1, 0))
        if kind == 0 and buf:
            buf[pos] ^= 1 << (byte % 8)
        elif kind == 1:
            buf.insert(pos, byte)
        elif kind == 2 and buf:
            del buf[pos]
        elif kind == 3:
            del buf[pos:]
        elif kind == 4 and buf:
            span = buf[pos : pos + 1 + byte % 16]
            buf[pos:pos] = span
        elif kind == 5:
            buf[pos:pos] = TOKENS[byte % len(TOKENS)]
        elif buf:
            buf[pos] = byte
    return bytes(buf)


mutations = st.lists(mutation, max_size=4)
