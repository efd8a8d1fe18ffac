"""The ``SearchIndex`` interface: full-text search over the durable log.

Implementations: ``sqlite`` (embedded FTS5, the default), ``elasticsearch``
and ``opensearch`` (``server.search.cluster``). All answer the same queries the
same way (the contract tests check it):

- the text is words and "quoted phrases"; a hit has every word and every
  phrase (case-insensitive, words split at anything but letters and digits);
- filters: channels, namespaces (a hit matches either list when both are
  given), publisher user, time range (``since_ms <= time < until_ms``);
- hits come newest first (by time, then by position), ``limit`` at a time,
  with an opaque cursor for the next page;
- ``index`` is idempotent by publication: a document indexed twice is there
  once.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from server.models import ClientInfo, Publication


class SearchUnavailable(Exception):
    """The search backend cannot be reached or refused the request."""


class BadSearch(ValueError):
    """The query, a filter or the cursor is malformed (a client error)."""


MAX_QUERY_CHARS = 512
MAX_TERMS = 32
MAX_TEXT_CHARS = 32_768

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_TOKEN = re.compile(r'"([^"]*)"|([^\s"]+)')


@dataclass(slots=True)
class SearchDoc:
    """What is indexed of one publication."""

    id: str
    channel: str
    namespace: str
    epoch: str
    offset: int
    time_ms: int
    user: str
    client: str
    text: str
    data: bytes
    info: ClientInfo | None = None

    def source(self) -> dict[str, Any]:
        """The document as the Elasticsearch family stores it."""
        out: dict[str, Any] = {
            "id": self.id,
            "channel": self.channel,
            "namespace": self.namespace,
            "epoch": self.epoch,
            "offset": self.offset,
            "time": self.time_ms,
            "user": self.user,
            "client": self.client,
            "text": self.text,
            "data": self.data.decode(),
        }
        if self.info is not None:
            out["info"] = self.info.to_json()
        return out


@dataclass(slots=True)
class SearchHit:
    channel: str
    offset: int
    epoch: str
    time_ms: int
    data: bytes
    info: ClientInfo | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "channel": self.channel,
            "offset": self.offset,
            "epoch": self.epoch,
            "time": self.time_ms,
            "data": orjson.Fragment(self.data),
        }
        if self.info is not None:
            out["info"] = self.info.to_json()
        return out


@dataclass(slots=True)
class SearchPage:
    hits: list[SearchHit]
    cursor: str | None


@dataclass(slots=True)
class SearchQuery:
    words: list[str]
    phrases: list[list[str]]
    channels: list[str] | None = None
    namespaces: list[str] | None = None
    user: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    limit: int = 20
    after: tuple[int, str] | None = field(default=None)


class SearchIndex(Protocol):
    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def index(self, docs: Sequence[SearchDoc]) -> None:
        """Add or replace documents by id; raise ``SearchUnavailable`` if any
        could not be indexed for a reason worth retrying."""
        ...

    async def search(self, query: SearchQuery) -> SearchPage: ...

    async def count(self) -> int:
        """How many documents the index holds (visible to search)."""
        ...

    async def expire(self, namespace: str, before_ms: int) -> None:
        """Delete a namespace's documents older than ``before_ms``."""
        ...

    async def clear(self) -> None:
        """Drop every document (``squall reindex`` starts from here)."""
        ...

    def healthy(self) -> bool: ...


# ---- shared by every implementation -------------------------------------


def words_of(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def parse_text(text: object) -> tuple[list[str], list[list[str]]]:
    """Words and "quoted phrases" of a query, lowercased."""
    if not isinstance(text, str) or not text.strip():
        raise BadSearch("'query' must be a non-empty string")
    if len(text) > MAX_QUERY_CHARS:
        raise BadSearch(f"'query' is longer than {MAX_QUERY_CHARS} characters")
    words: list[str] = []
    phrases: list[list[str]] = []
    for quoted, bare in _TOKEN.findall(text):
        if quoted:
            phrase = words_of(quoted)
            if len(phrase) == 1:
                words += phrase
            elif phrase:
                phrases.append(phrase)
        else:
            words += words_of(bare)
    words = list(dict.fromkeys(words))
    if not words and not phrases:
        raise BadSearch("'query' has no words to search for")
    if len(words) + sum(len(p) for p in phrases) > MAX_TERMS:
        raise BadSearch(f"'query' has more than {MAX_TERMS} words")
    return words, phrases


def encode_cursor(time_ms: int, doc_id: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([time_ms, doc_id])).decode().rstrip("=")


def decode_cursor(cursor: object) -> tuple[int, str]:
    if not isinstance(cursor, str):
        raise BadSearch("'cursor' must be a string from a previous page")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        time_ms, doc_id = orjson.loads(raw)
        if type(time_ms) is not int or not isinstance(doc_id, str):
            raise ValueError
    except (ValueError, TypeError, orjson.JSONDecodeError):
        raise BadSearch("'cursor' is not one this server gave out") from None
    return time_ms, doc_id


def doc_id(channel: str, epoch: str, offset: int) -> str:
    # '|' never appears in a channel name or an epoch.
    return f"{channel}|{epoch}|{offset:012d}"


def _strings(value: Any, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, dict):
        for v in value.values():
            _strings(v, out)
    elif isinstance(value, list):
        for v in value:
            _strings(v, out)


def extract_text(data: bytes, fields: Sequence[str]) -> str:
    """The searchable text of a publication: the strings at ``fields``
    (dotted paths), or every string in the data when ``fields`` is empty."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return ""
    parts: list[str] = []
    if not fields:
        _strings(value, parts)
    else:
        for path in fields:
            node: Any = value
            for key in path.split("."):
                node = node.get(key) if isinstance(node, dict) else None
            _strings(node, parts)
    return "\n".join(parts)[:MAX_TEXT_CHARS]


def make_doc(pub: Publication, namespace: str, fields: Sequence[str]) -> SearchDoc:
    info = pub.info
    return SearchDoc(
        id=doc_id(pub.channel, pub.epoch, pub.offset),
        channel=pub.channel,
        namespace=namespace,
        epoch=pub.epoch,
        offset=pub.offset,
        time_ms=pub.time_ms,
        user=info.user if info else "",
        client=info.client if info else "",
        text=extract_text(pub.data, fields),
        data=pub.data,
        info=info,
    )


def page_of(hits: list[tuple[SearchHit, str]], limit: int) -> SearchPage:
    """``limit + 1`` fetched hits (with their ids) -> a page and its cursor."""
    more = len(hits) > limit
    hits = hits[:limit]
    cursor = encode_cursor(hits[-1][0].time_ms, hits[-1][1]) if more and hits else None
    return SearchPage([h for h, _ in hits], cursor)
