"""The ``SearchIndex`` interface: full-text search over the durable log.

Implementations (embedded SQLite FTS5, Elasticsearch, OpenSearch) arrive with
the durable-log work; the core server runs without one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from server.models import Publication


@dataclass(slots=True)
class SearchHit:
    channel: str
    offset: int
    epoch: str
    time_ms: int
    data: bytes


@dataclass(slots=True)
class SearchPage:
    hits: list[SearchHit]
    cursor: str | None


class SearchIndex(Protocol):
    name: str

    async def index(self, pubs: Sequence[Publication]) -> None: ...

    async def search(
        self,
        query: str,
        *,
        channel: str | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> SearchPage: ...
