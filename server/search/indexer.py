"""Feeds the search index from the durable log, in the background.

Each step takes the oldest publications still marked pending in the store,
indexes them in one bulk request, then clears their marks. The marks are the
checkpoint, persisted with the log: a crash between the two steps indexes the
batch again (documents are keyed by publication, so they are replaced, never
doubled); an outage of the search backend leaves the marks, and indexing
resumes from them when it returns. Nothing is lost and nothing is counted
twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from server.channels import namespace_name
from server.config import NamespaceOptions
from server.models import Publication
from server.search import SearchDoc, SearchIndex, SearchUnavailable, make_doc
from server.store import Store, StoreUnavailable

log = logging.getLogger("squall.search")

# Seconds to wait after a failure, doubling up to the last.
_BACKOFF = (0.2, 0.5, 1.0, 2.0, 5.0)


def docs_for(
    pubs: list[Publication], namespaces: Mapping[str, NamespaceOptions]
) -> list[SearchDoc]:
    """Search documents for the publications of searchable namespaces."""
    docs = []
    for pub in pubs:
        name = namespace_name(pub.channel)
        ns = namespaces.get(name)
        if ns is not None and ns.searchable:
            docs.append(make_doc(pub, name, ns.search_fields))
    return docs


class Indexer:
    def __init__(
        self,
        store: Store,
        index: SearchIndex,
        namespaces: Mapping[str, NamespaceOptions],
        *,
        batch_size: int,
        interval: float,
    ) -> None:
        self.store = store
        self.index = index
        self._namespaces = namespaces
        self._batch = batch_size
        self._interval = interval
        self._wake = asyncio.Event()
        self.indexed = 0
        self.failures = 0
        self.last_error = ""
        self.last_success = 0.0

    def wake(self) -> None:
        """New publications are pending: index them without waiting."""
        self._wake.set()

    async def step(self) -> int:
        """Index one batch; return how many publications it took from the log."""
        pubs = await self.store.pending_index(self._batch)
        if not pubs:
            return 0
        await self.index.index(docs_for(pubs, self._namespaces))
        await self.store.mark_indexed(pubs)
        self.indexed += len(pubs)
        self.last_success = time.time()
        return len(pubs)

    async def run_forever(self) -> None:
        failures = 0
        while True:
            self._wake.clear()
            try:
                taken = await self.step()
            except (SearchUnavailable, StoreUnavailable) as exc:
                self.failures += 1
                self.last_error = str(exc)
                delay = _BACKOFF[min(failures, len(_BACKOFF) - 1)]
                if failures == 0:
                    log.warning("indexing paused (%s); retrying", exc)
                failures += 1
                await asyncio.sleep(delay)
                continue
            if failures:
                log.info("indexing resumed after %d failed tries", failures)
                failures = 0
            if taken < self._batch:
                # A timer rather than wait_for, whose cancellation is not
                # reliable on Python 3.11: close() must stop this loop.
                timer = asyncio.get_running_loop().call_later(self._interval, self._wake.set)
                try:
                    await self._wake.wait()
                finally:
                    timer.cancel()

    async def drain(self, timeout: float) -> int:
        """Index everything pending now; return how many."""
        deadline = time.monotonic() + timeout
        total = 0
        while time.monotonic() < deadline:
            taken = await self.step()
            total += taken
            if taken == 0:
                return total
        raise TimeoutError("the log still has pending publications")
