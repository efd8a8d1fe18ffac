"""The history of a run: one JSON object per line, in the order things
happened in the campaign's process (one asyncio loop, so file order is
causal order for every client).

Every record has ``k`` (its kind) and ``t`` (seconds since the run started):

| k | what | fields |
| --- | --- | --- |
| meta | the run's parameters (first line) | seed, seconds, durable_namespaces, schedule, ... |
| pa | a publish attempted | p (publisher), i (publication id), c (channel), via (http/ws) |
| pk | ... acknowledged | i, o (offset), e (epoch) |
| pf | ... failed (the server said so) | i, err |
| pu | ... outcome unknown (timeout, connection lost) | i, err |
| sr | a (re)subscribe answered | s (subscriber), c, rc (recover?), fo/fe, rd, o/e, n, tq |
| sf | a (re)subscribe failed | s, c, rc, err |
| dl | a publication delivered to a subscriber | s, c, o, e, i, a |
| cn | a client connected | s, node, n (connects so far) |
| dc | a client's connection lost | s, code, reason |
| cl | a client gave up (reported to the application) | s, err |
| fs / fe | a fault started / healed | f (fault id), kind, target, err, skipped |
| fr | a process failed to start again (retried) | f, kind, target, attempt, err |
| ix | what the search index returned at the end, per durable channel | c, ids |

``sr``: fo/fe is the position the client recovers from, rd the answer's
``recovered``, o/e its position, n how many publications it replayed, tq
when it was asked. ``dl``: a is 1 when the client handed the publication to
the application, 0 when its duplicate guard dropped it. ``fs``: err is set
when the fault could not be applied, skipped when it was not (its
component was still healing from an earlier fault for its whole window).
"""

from __future__ import annotations

import gzip
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson


class History:
    """Appends records to a JSONL file (buffered; ``close`` flushes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[bytes] = path.open("wb", buffering=1 << 20)
        self._t0 = time.monotonic()
        self.counts: dict[str, int] = {}

    def now(self) -> float:
        return round(time.monotonic() - self._t0, 4)

    def record(self, k: str, /, **fields: Any) -> None:
        if self._file.closed:
            # The run is over (a client task that ends after its client was
            # shut down): not written.
            return
        fields["k"] = k
        fields["t"] = self.now()
        self.counts[k] = self.counts.get(k, 0) + 1
        self._file.write(orjson.dumps(fields) + b"\n")

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def compress(path: Path) -> Path:
    """Gzip a finished history next to itself (``.jsonl.gz``); returns its path."""
    target = path.with_name(path.name + ".gz")
    with path.open("rb") as src, gzip.open(target, "wb", compresslevel=6) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    path.unlink()
    return target


def read_history(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a history, plain or gzipped (``.gz``)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for line in f:
            if line.strip():
                record: dict[str, Any] = orjson.loads(line)
                yield record
