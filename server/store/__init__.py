"""The ``Store`` interface: the durable log of publications to ``persist``
channels. Implementations: ``sqlite`` (embedded, the default) and ``mongodb``.

Guarantees every implementation keeps (the contract tests check them):

- ``append`` is durable when it returns (per the store's configured
  durability) and atomic: all the given publications are written, or none.
- At most one publication exists per ``(channel, epoch, offset)``. Appending
  one that is already there with the same data is a no-op (a retry);
  appending a different one at a taken position raises ``StoreConflict``.
- ``read`` returns publications of one epoch in offset order (newest first
  with ``reverse``).
- ``retention`` (seconds, 0 = forever) is how long an appended publication
  is kept; ``expire`` deletes what is past it.
- Publications appended with ``searchable=True`` are pending for the search
  index until ``mark_indexed``: that mark is the indexer's checkpoint, kept in
  the log itself, so a crash or a search outage loses nothing.
- ``scan`` walks the whole log (or one channel's) in the order it was
  written, by an opaque cursor.
- An unreachable backend raises ``StoreUnavailable``; nothing is half-written.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from server.models import Publication, StreamPosition


class StoreUnavailable(Exception):
    """The store cannot be reached or failed; the append did not happen."""


class StoreConflict(Exception):
    """Another publication already holds that (channel, epoch, offset)."""


class Store(Protocol):
    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def append(
        self, pubs: Sequence[Publication], *, retention: float = 0.0, searchable: bool = False
    ) -> None: ...

    async def read(
        self,
        channel: str,
        epoch: str,
        *,
        after: int | None = None,
        before: int | None = None,
        limit: int,
        reverse: bool = False,
    ) -> list[Publication]:
        """Publications with ``after < offset < before`` (either bound optional)."""
        ...

    async def last_position(self, channel: str) -> StreamPosition | None:
        """The newest stored position of ``channel``, or None if none is stored."""
        ...

    async def expire(self, now_ms: int | None = None) -> int:
        """Delete publications past their retention; return how many."""
        ...

    async def pending_index(self, limit: int) -> list[Publication]:
        """Searchable publications not yet marked indexed, oldest first."""
        ...

    async def mark_indexed(self, pubs: Sequence[Publication]) -> None: ...

    async def scan(
        self, *, after: str | None = None, limit: int, channel: str | None = None
    ) -> tuple[list[Publication], str | None]:
        """Up to ``limit`` publications written after cursor ``after``, and
        the cursor to go on from (None when there is nothing more)."""
        ...

    async def count(self, channel: str | None = None) -> int: ...

    def healthy(self) -> bool: ...
