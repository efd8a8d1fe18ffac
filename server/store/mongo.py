"""The durable log on MongoDB, through PyMongo's native async API.

One collection, ``publications``: a document per publication, with a unique
index on ``(channel, epoch, offset)`` so a retried append can never duplicate.
Only plain MongoDB features are used, so any server that speaks the MongoDB
wire protocol and implements them works (tests run on FerretDB).

- Durability: every write uses the configured write concern (default
  ``majority``, journaled). ``append`` returns once the server has
  acknowledged it at that level.
- Atomicity without transactions: an append that collides with a *different*
  publication deletes what it inserted before raising ``StoreConflict``; a
  collision with the *same* publication (a retry) is a no-op.
- Search indexing: a searchable publication is also queued, whole, in a small
  ``index_queue`` collection, written *before* the publication itself. The
  indexer reads the queue (never scans the log), reads each queued
  publication back from the log and indexes the log's copy (the entry of a
  failed append may name a position another publication took), and deletes
  queue entries once indexed:
  the queue is the indexer's persisted checkpoint. A crash between the two
  writes leaves an entry whose publication never came; it is dropped after
  ``orphan_after`` seconds.
- Retention: each publication carries ``expire_at`` (a date) when its
  namespace has a ``retention``. A TTL index deletes it on MongoDB; where the
  server has no TTL indexes, the node's periodic ``expire`` sweep does.
- Every call has a timeout (``store.timeout``) and is retried with backoff
  (``store.retries``) on network errors; then it raises ``StoreUnavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pymongo
from bson import ObjectId
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    DuplicateKeyError,
    ExecutionTimeout,
    OperationFailure,
    PyMongoError,
    ServerSelectionTimeoutError,
    WTimeoutError,
)
from pymongo.write_concern import WriteConcern

from server.models import ClientInfo, Publication, StreamPosition
from server.store import StoreConflict, StoreUnavailable

log = logging.getLogger("squall.store")

T = TypeVar("T")

COLLECTION = "publications"
QUEUE = "index_queue"
_POSITION = ("channel", "epoch", "offset")
_DUPLICATE_KEY = 11000
# Errors worth another try: the server or the network, not the request.
_TRANSIENT = (ConnectionFailure, ServerSelectionTimeoutError, ExecutionTimeout, WTimeoutError)


def _doc(p: Publication, retention: float) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "channel": p.channel,
        "epoch": p.epoch,
        "offset": p.offset,
        "data": p.data,
        "time_ms": p.time_ms,
    }
    if p.info is not None:
        doc["info"] = p.info.to_json()
    if retention:
        doc["expire_at"] = datetime.datetime.fromtimestamp(
            (p.time_ms + retention * 1000) / 1000, tz=datetime.UTC
        )
    return doc


def _pub(doc: dict[str, Any]) -> Publication:
    info = doc.get("info")
    return Publication(
        doc["channel"],
        int(doc["offset"]),
        doc["epoch"],
        bytes(doc["data"]),
        ClientInfo.from_json(info) if info else None,
        int(doc["time_ms"]),
    )


class MongoStore:
    name = "mongodb"

    def __init__(
        self,
        url: str,
        *,
        database: str = "squall",
        write_concern: str = "majority",
        journal: bool = True,
        timeout: float = 5.0,
        retries: int = 2,
        retry_backoff: float = 0.05,
        max_pool_size: int = 50,
        min_pool_size: int = 0,
    ) -> None:
        self._url = url
        self._database = database
        w: str | int = write_concern if write_concern == "majority" else int(write_concern)
        self._write_concern = WriteConcern(w=w, j=journal)
        self._timeout = timeout
        self._retries = retries
        self._backoff = retry_backoff
        self._pool = (max_pool_size, min_pool_size)
        self._client: AsyncMongoClient[dict[str, Any]] | None = None
        self._col: AsyncCollection[dict[str, Any]] | None = None
        self._ok = False
        self.ttl_index = False
        self._queue: AsyncCollection[dict[str, Any]] | None = None
        # The queue entry of each searchable publication this process
        # appended (so known to be in the log with that entry's data), and
        # the queue entries of each publication pending_index handed out.
        self._appended: dict[tuple[str, str, int], ObjectId] = {}
        self._handed: dict[tuple[str, str, int], set[ObjectId]] = {}
        # Seconds after which a queue entry whose publication is not in the
        # log is taken for a failed append and dropped.
        self.orphan_after = max(60.0, 4 * timeout * (retries + 1))

    async def start(self) -> None:
        ms = int(self._timeout * 1000)
        self._client = AsyncMongoClient(
            self._url,
            serverSelectionTimeoutMS=ms,
            connectTimeoutMS=ms,
            socketTimeoutMS=ms,
            maxPoolSize=self._pool[0],
            minPoolSize=self._pool[1],
            appname="squall",
        )
        db = self._client.get_default_database(self._database)
        self._col = db.get_collection(COLLECTION, write_concern=self._write_concern)
        self._queue = db.get_collection(QUEUE, write_concern=self._write_concern)
        col = self._col
        await self._call(
            lambda: col.create_index(
                [("channel", ASCENDING), ("epoch", ASCENDING), ("offset", ASCENDING)],
                unique=True,
                name="position",
            )
        )
        await self._call(
            lambda: col.create_index([("channel", ASCENDING), ("_id", ASCENDING)], name="scan")
        )
        try:
            await self._call(
                lambda: col.create_index("expire_at", expireAfterSeconds=0, name="retention")
            )
            self.ttl_index = True
        except StoreUnavailable as exc:
            if not isinstance(exc.__cause__, OperationFailure):
                raise
            # No TTL indexes on this server: a plain index, and the sweep.
            log.info("store: no TTL index support (%s); expiry by periodic sweep", exc)
            await self._call(lambda: col.create_index("expire_at", name="expire_at"))
        self._ok = True

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
            self._col = None
            self._queue = None
        self._ok = False

    def healthy(self) -> bool:
        return self._ok

    def _collection(self) -> AsyncCollection[dict[str, Any]]:
        if self._col is None:
            raise StoreUnavailable("store is closed")
        return self._col

    def _index_queue(self) -> AsyncCollection[dict[str, Any]]:
        if self._queue is None:
            raise StoreUnavailable("store is closed")
        return self._queue

    async def _call(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run ``op`` with a timeout, retrying transient failures with backoff."""
        delay = self._backoff
        for attempt in range(self._retries + 1):
            try:
                with pymongo.timeout(self._timeout):
                    result = await op()
            except (DuplicateKeyError, BulkWriteError):
                self._ok = True
                raise
            except _TRANSIENT as exc:
                self._ok = False
                if attempt == self._retries:
                    raise StoreUnavailable(f"mongodb: {exc}") from exc
                await asyncio.sleep(delay)
                delay *= 2
                continue
            except PyMongoError as exc:
                raise StoreUnavailable(f"mongodb: {exc}") from exc
            self._ok = True
            return result
        raise AssertionError("unreachable")

    # ---- the log --------------------------------------------------------

    async def append(
        self, pubs: Sequence[Publication], *, retention: float = 0.0, searchable: bool = False
    ) -> None:
        if not pubs:
            return
        col = self._collection()
        docs = [_doc(p, retention) for p in pubs]
        queued: list[ObjectId] = []
        if searchable:
            entries = [{**d, "_id": ObjectId()} for d in docs]
            queued = [e["_id"] for e in entries]
            await self._enqueue(entries)
        try:
            await self._insert(col, docs)
        except BaseException:
            if queued:
                # Best effort: an entry left behind is dropped as an orphan.
                with contextlib.suppress(StoreUnavailable):
                    await self._call(
                        lambda: self._index_queue().delete_many({"_id": {"$in": queued}})
                    )
            raise
        if len(self._appended) > 100_000:
            self._appended.clear()
        for d, queue_id in zip(docs, queued, strict=False):
            self._appended[(d["channel"], d["epoch"], d["offset"])] = queue_id

    async def _enqueue(self, entries: list[dict[str, Any]]) -> None:
        """Queue ``entries`` for the indexer. Their ids are made here, so a
        duplicate id is this append's own earlier try, whose reply was lost
        on the way (a timeout, a dropped connection): that entry is in."""
        queue = self._index_queue()
        try:
            await self._call(lambda: queue.insert_many(entries, ordered=False))
        except BulkWriteError as exc:
            failed = exc.details.get("writeErrors", [])
            if any(e.get("code") != _DUPLICATE_KEY for e in failed):
                raise StoreUnavailable(f"mongodb: index queue write errors {failed}") from None

    async def _insert(
        self, col: AsyncCollection[dict[str, Any]], docs: list[dict[str, Any]]
    ) -> None:
        try:
            # Fresh documents on every try: insert_many adds _id to them.
            await self._call(lambda: col.insert_many([dict(d) for d in docs], ordered=False))
            return
        except BulkWriteError as exc:
            failed = exc.details.get("writeErrors", [])
        if any(e.get("code") != _DUPLICATE_KEY for e in failed):
            await self._undo(docs, {e["index"] for e in failed})
            raise StoreUnavailable(f"mongodb: write errors {failed}")
        dup = [docs[e["index"]] for e in failed]
        taken = await self._call(
            lambda: col.find(
                {"$or": [{k: d[k] for k in _POSITION} for d in dup]},
                {"channel": 1, "epoch": 1, "offset": 1, "data": 1},
            ).to_list()
        )
        held = {(t["channel"], t["epoch"], t["offset"]): bytes(t["data"]) for t in taken}
        clashes = [d for d in dup if held.get((d["channel"], d["epoch"], d["offset"])) != d["data"]]
        if clashes:
            await self._undo(docs, {e["index"] for e in failed})
            c = clashes[0]
            raise StoreConflict(f"{c['channel']}@{c['epoch']}:{c['offset']} is taken")

    async def _undo(self, docs: list[dict[str, Any]], failed: set[int]) -> None:
        """Delete what an append inserted before it failed (all or nothing)."""
        keys = [
            {k: d[k] for k in (*_POSITION, "data")} for i, d in enumerate(docs) if i not in failed
        ]
        if keys:
            col = self._collection()
            await self._call(lambda: col.delete_many({"$or": keys}))

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
        if limit <= 0:
            return []
        query: dict[str, Any] = {"channel": channel, "epoch": epoch}
        bounds: dict[str, int] = {}
        if after is not None:
            bounds["$gt"] = after
        if before is not None:
            bounds["$lt"] = before
        if bounds:
            query["offset"] = bounds
        col = self._collection()
        docs = await self._call(
            lambda: (
                col.find(query)
                .sort("offset", DESCENDING if reverse else ASCENDING)
                .limit(limit)
                .to_list()
            )
        )
        return [_pub(d) for d in docs]

    async def last_position(self, channel: str) -> StreamPosition | None:
        """The newest epoch's highest offset. ``_id`` orders one process's
        inserts only (an ObjectId is its second, a per-process random part,
        then a counter): of two nodes' appends in one second, the later may
        sort first. So ``_id`` only names the newest epoch (epochs change
        far apart), and the offset is the highest of that epoch."""
        col = self._collection()
        newest = await self._call(
            lambda: col.find_one({"channel": channel}, {"epoch": 1}, sort=[("_id", DESCENDING)])
        )
        if newest is None:
            return None
        epoch = newest["epoch"]
        doc = await self._call(
            lambda: col.find_one(
                {"channel": channel, "epoch": epoch},
                {"offset": 1, "epoch": 1},
                sort=[("offset", DESCENDING)],
            )
        )
        return StreamPosition(int(doc["offset"]), doc["epoch"]) if doc else None

    async def expire(self, now_ms: int | None = None) -> int:
        now = time.time() if now_ms is None else now_ms / 1000
        cutoff = datetime.datetime.fromtimestamp(now, tz=datetime.UTC)
        col = self._collection()
        result = await self._call(lambda: col.delete_many({"expire_at": {"$lte": cutoff}}))
        return int(result.deleted_count)

    async def pending_index(self, limit: int) -> list[Publication]:
        queue = self._index_queue()
        entries = await self._call(
            lambda: queue.find({}).sort("_id", ASCENDING).limit(limit).to_list()
        )
        if not entries:
            return []
        # What is indexed is the log's publication. A queue entry this
        # process wrote for an append that landed has the same data; any
        # other is read back from the log: the entry of a failed append (a
        # conflict: another node took that offset) whose removal failed (the
        # store went down meanwhile) names a position another publication took.
        mine = {
            (e["channel"], e["epoch"], e["offset"]): e
            for e in entries
            if self._appended.get((e["channel"], e["epoch"], e["offset"])) == e["_id"]
        }
        others = {(e["channel"], e["epoch"], e["offset"]) for e in entries} - mine.keys()
        in_log: dict[tuple[str, str, int], dict[str, Any]] = dict(mine)
        if others:
            col = self._collection()
            found = await self._call(
                lambda: col.find(
                    {"$or": [dict(zip(_POSITION, k, strict=True)) for k in others]}
                ).to_list()
            )
            in_log.update({(d["channel"], d["epoch"], d["offset"]): d for d in found})
        out: list[Publication] = []
        out_keys: set[tuple[str, str, int]] = set()
        orphans: list[ObjectId] = []
        now = time.time()
        if len(self._handed) > 100_000:
            self._handed.clear()
        for entry in entries:
            key = (entry["channel"], entry["epoch"], entry["offset"])
            doc = in_log.get(key)
            if doc is None:
                if now - entry["_id"].generation_time.timestamp() > self.orphan_after:
                    orphans.append(entry["_id"])
                continue
            if key not in out_keys:
                out_keys.add(key)
                out.append(_pub(doc))
            self._handed.setdefault(key, set()).add(entry["_id"])
        if orphans:
            log.warning("store: dropping %d index-queue entries of failed appends", len(orphans))
            await self._call(lambda: queue.delete_many({"_id": {"$in": orphans}}))
        return out

    async def mark_indexed(self, pubs: Sequence[Publication]) -> None:
        ids = [i for p in pubs for i in self._handed.pop((p.channel, p.epoch, p.offset), set())]
        if ids:
            queue = self._index_queue()
            await self._call(lambda: queue.delete_many({"_id": {"$in": ids}}))

    async def scan(
        self, *, after: str | None = None, limit: int, channel: str | None = None
    ) -> tuple[list[Publication], str | None]:
        query: dict[str, Any] = {}
        if after:
            query["_id"] = {"$gt": ObjectId(after)}
        if channel is not None:
            query["channel"] = channel
        col = self._collection()
        docs = await self._call(
            lambda: col.find(query).sort("_id", ASCENDING).limit(limit).to_list()
        )
        if not docs:
            return [], None
        return [_pub(d) for d in docs], str(docs[-1]["_id"])

    async def count(self, channel: str | None = None) -> int:
        col = self._collection()
        query = {} if channel is None else {"channel": channel}
        return int(await self._call(lambda: col.count_documents(query)))
