"""The ``Store`` interface: the durable log of publications to ``persist``
channels.

Guarantees every implementation keeps (the contract tests check them):

- ``append`` is durable when it returns (per the store's configured
  durability) and atomic: all the given publications are written, or none.
- At most one publication exists per ``(channel, epoch, offset)``. Appending
  one that is already there with the same data is a no-op (a retry);
  appending a different one at a taken position raises ``StoreConflict``.
- ``read`` returns publications of one epoch in offset order (newest first
  with ``reverse``).
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

    async def append(self, pubs: Sequence[Publication]) -> None: ...

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

    def healthy(self) -> bool: ...
