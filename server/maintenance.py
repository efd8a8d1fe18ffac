"""Offline jobs on the durable log: ``squall reindex`` and ``squall log export``.

Both read the log through the ``Store`` interface, so they work the same on
SQLite and MongoDB, and can run while nodes serve (see docs/operations.md).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

import orjson

from server.config import Settings
from server.node import build_search, build_store
from server.protocol import pub_json
from server.search.indexer import docs_for


class Progress:
    """One line on a terminal, redrawn at most a few times a second:
    ``[#####.....] 4,200/10,000  42%  3,100/s``. Plain lines when not a tty."""

    def __init__(self, total: int, out: TextIO, what: str) -> None:
        self.total = max(total, 1)
        self.out = out
        self.what = what
        self.done = 0
        self.started = time.monotonic()
        self._shown = 0.0
        self._tty = out.isatty()

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._shown >= (0.2 if self._tty else 5.0) or self.done >= self.total:
            self._shown = now
            self._draw()

    def _draw(self) -> None:
        share = min(self.done / self.total, 1.0)
        bar = "#" * int(share * 30)
        rate = self.done / max(time.monotonic() - self.started, 1e-6)
        line = (
            f"{self.what}: [{bar:<30}] {self.done:,}/{self.total:,} "
            f"{share * 100:3.0f}%  {rate:,.0f}/s"
        )
        self.out.write(("\r" + line) if self._tty else (line + "\n"))
        self.out.flush()

    def finish(self) -> None:
        if self._tty:
            self.out.write("\n")
            self.out.flush()


async def reindex(settings: Settings, *, batch: int, out: TextIO = sys.stderr) -> tuple[int, int]:
    """Rebuild the search index from the log: clear it, then index every
    publication of a searchable namespace. Returns (publications read,
    documents in the index at the end)."""
    index = build_search(settings)
    if index is None:
        raise ValueError("no namespace is searchable (set searchable = true on one)")
    store = build_store(settings)
    await store.start()
    try:
        await index.start()
        try:
            total = await store.count()
            progress = Progress(total, out, "reindex")
            await index.clear()
            cursor: str | None = None

            while True:
                pubs, cursor = await store.scan(after=cursor, limit=batch)
                if not pubs:
                    break
                await index.index(docs_for(pubs, settings.namespaces))
                await store.mark_indexed(pubs)
                progress.advance(len(pubs))
            progress.finish()
            return progress.done, await index.count()
        finally:
            await index.close()
    finally:
        await store.close()


async def export_log(
    settings: Settings, *, channel: str | None, out: TextIO, batch: int = 1000
) -> int:
    """Write the log (or one channel's) as JSON lines, in the order it was
    written; return how many."""
    store = build_store(settings)
    await store.start()
    written = 0
    try:
        cursor: str | None = None
        while True:
            pubs, cursor = await store.scan(after=cursor, limit=batch, channel=channel)
            if not pubs:
                return written
            for pub in pubs:
                line = {"channel": pub.channel, **pub_json(pub)}
                out.write(orjson.dumps(line).decode() + "\n")
            written += len(pubs)
    finally:
        await store.close()
