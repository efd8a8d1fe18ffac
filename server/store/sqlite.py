"""The embedded durable log: SQLite in WAL mode, in the data directory.

All SQLite calls run on one dedicated thread, so the event loop never blocks
on disk and the connection is never shared between threads.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import orjson

from server.models import ClientInfo, Publication, StreamPosition
from server.store import StoreConflict, StoreUnavailable

T = TypeVar("T")

# Appends written in one transaction at most.
MAX_GROUP = 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS publications (
    id INTEGER PRIMARY KEY,
    channel TEXT NOT NULL,
    epoch TEXT NOT NULL,
    offset INTEGER NOT NULL,
    data BLOB NOT NULL,
    info BLOB,
    time_ms INTEGER NOT NULL,
    expire_at INTEGER,
    indexed INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS publications_position
    ON publications (channel, epoch, offset);
"""
# Logs written before retention and search existed gain the columns.
_ADDED_COLUMNS = {"expire_at": "INTEGER", "indexed": "INTEGER"}
_INDEXES = """
CREATE INDEX IF NOT EXISTS publications_expire ON publications (expire_at)
    WHERE expire_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS publications_pending ON publications (id) WHERE indexed = 0;
"""
_SELECT = "SELECT channel, epoch, offset, data, info, time_ms FROM publications"


def _row_to_pub(row: tuple[Any, ...]) -> Publication:
    channel, epoch, offset, data, info, time_ms = row
    client_info = ClientInfo.from_json(orjson.loads(info)) if info else None
    return Publication(channel, offset, epoch, bytes(data), client_info, time_ms)


class SQLiteStore:
    name = "sqlite"

    def __init__(self, path: str | Path, *, synchronous: str = "FULL") -> None:
        self._path = Path(path)
        self._synchronous = synchronous
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="squall-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._ok = False
        # Appends waiting for the next transaction, and the task writing them.
        self._appends: list[tuple[list[tuple[Any, ...]], asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def _run(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn)

    async def start(self) -> None:
        def open_db() -> None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.executescript(_SCHEMA)
            have = {row[1] for row in conn.execute("PRAGMA table_info(publications)")}
            for column, kind in _ADDED_COLUMNS.items():
                if column not in have:
                    conn.execute(f"ALTER TABLE publications ADD COLUMN {column} {kind}")
            conn.executescript(_INDEXES)
            self._conn = conn

        await self._run(open_db)
        self._ok = True

    async def close(self) -> None:
        if self._conn is None:
            return
        if self._writer is not None:
            # Appends already asked for are written before the log closes.
            await asyncio.wait((self._writer,))

        def close_db() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await self._run(close_db)
        self._executor.shutdown(wait=True)
        self._ok = False

    def healthy(self) -> bool:
        return self._ok

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreUnavailable("store is closed")
        return self._conn

    async def append(
        self, pubs: Sequence[Publication], *, retention: float = 0.0, searchable: bool = False
    ) -> None:
        """Write ``pubs`` in one go; returns once they are committed.

        Group commit: appends that arrive while a transaction is being
        written go into the next one together (each in a savepoint of its
        own, so a conflict fails only its own append), so concurrent
        durable publishes to many channels share one commit and one fsync
        instead of paying one each."""
        rows = [
            (
                p.channel,
                p.epoch,
                p.offset,
                p.data,
                orjson.dumps(p.info.to_json()) if p.info is not None else None,
                p.time_ms,
                p.time_ms + int(retention * 1000) if retention else None,
                0 if searchable else None,
            )
            for p in pubs
        ]
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._appends.append((rows, done))
        if self._writer is None:
            self._writer = loop.create_task(self._write_appends())
        await done

    async def _write_appends(self) -> None:
        try:
            while self._appends:
                group = self._appends[:MAX_GROUP]
                del self._appends[:MAX_GROUP]
                try:
                    results = await self._run(functools.partial(self._commit, group))
                except sqlite3.Error as exc:
                    self._ok = False
                    failure = StoreUnavailable(f"sqlite: {exc}")
                    results = [failure] * len(group)
                except StoreUnavailable as exc:
                    results = [exc] * len(group)
                else:
                    self._ok = True
                for (_, done), result in zip(group, results, strict=True):
                    if done.done():
                        continue  # its caller gave up; the rows are written
                    if result is None:
                        done.set_result(None)
                    else:
                        done.set_exception(result)
        finally:
            self._writer = None

    def _commit(self, group: list[tuple[list[tuple[Any, ...]], Any]]) -> list[Exception | None]:
        """One transaction for every append of ``group`` (on the store's
        thread): each append's rows in a savepoint, rolled back alone on a
        conflict. Raises ``sqlite3.Error`` when the transaction fails."""
        db = self._db()
        results: list[Exception | None] = []
        try:
            db.execute("BEGIN IMMEDIATE")
            for rows, _ in group:
                db.execute("SAVEPOINT one_append")
                conflict = self._insert(db, rows)
                if conflict is not None:
                    db.execute("ROLLBACK TO one_append")
                db.execute("RELEASE one_append")
                results.append(conflict)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return results

    @staticmethod
    def _insert(db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> StoreConflict | None:
        """Insert one append's rows; a position taken by other data is a
        conflict (the same data again is not: the append is idempotent)."""
        for row in rows:
            try:
                db.execute(
                    "INSERT INTO publications (channel, epoch, offset, data, info,"
                    " time_ms, expire_at, indexed) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
            except sqlite3.IntegrityError:
                existing = db.execute(
                    "SELECT data FROM publications WHERE channel = ? AND epoch = ? AND offset = ?",
                    row[:3],
                ).fetchone()
                if existing is None or bytes(existing[0]) != row[3]:
                    return StoreConflict(f"{row[0]}@{row[1]}:{row[2]} is taken")
        return None

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
        sql = _SELECT + " WHERE channel = ? AND epoch = ?"
        args: list[Any] = [channel, epoch]
        if after is not None:
            sql += " AND offset > ?"
            args.append(after)
        if before is not None:
            sql += " AND offset < ?"
            args.append(before)
        sql += " ORDER BY offset DESC" if reverse else " ORDER BY offset"
        sql += " LIMIT ?"
        args.append(limit)

        def query() -> list[Publication]:
            return [_row_to_pub(r) for r in self._db().execute(sql, args).fetchall()]

        try:
            return await self._run(query)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"sqlite: {exc}") from exc

    async def last_position(self, channel: str) -> StreamPosition | None:
        def query() -> StreamPosition | None:
            row = (
                self._db()
                .execute(
                    "SELECT offset, epoch FROM publications WHERE channel = ?"
                    " ORDER BY id DESC LIMIT 1",
                    (channel,),
                )
                .fetchone()
            )
            return StreamPosition(row[0], row[1]) if row else None

        try:
            return await self._run(query)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"sqlite: {exc}") from exc

    async def _query(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return await self._run(lambda: fn(self._db()))
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"sqlite: {exc}") from exc

    async def expire(self, now_ms: int | None = None) -> int:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        return await self._query(
            lambda db: (
                db.execute(
                    "DELETE FROM publications WHERE expire_at IS NOT NULL AND expire_at <= ?",
                    (now,),
                ).rowcount
            )
        )

    async def pending_index(self, limit: int) -> list[Publication]:
        return await self._query(
            lambda db: [
                _row_to_pub(r)
                for r in db.execute(
                    _SELECT + " WHERE indexed = 0 ORDER BY id LIMIT ?",
                    (limit,),
                )
            ]
        )

    async def mark_indexed(self, pubs: Sequence[Publication]) -> None:
        keys = [(p.channel, p.epoch, p.offset) for p in pubs]

        def mark(db: sqlite3.Connection) -> None:
            db.executemany(
                "UPDATE publications SET indexed = 1"
                " WHERE channel = ? AND epoch = ? AND offset = ? AND indexed = 0",
                keys,
            )

        await self._query(mark)

    async def scan(
        self, *, after: str | None = None, limit: int, channel: str | None = None
    ) -> tuple[list[Publication], str | None]:
        sql = (
            "SELECT id, channel, epoch, offset, data, info, time_ms FROM publications WHERE id > ?"
        )
        args: list[Any] = [int(after) if after else 0]
        if channel is not None:
            sql += " AND channel = ?"
            args.append(channel)
        sql += " ORDER BY id LIMIT ?"
        args.append(limit)
        rows = await self._query(lambda db: db.execute(sql, args).fetchall())
        if not rows:
            return [], None
        return [_row_to_pub(r[1:]) for r in rows], str(rows[-1][0])

    async def count(self, channel: str | None = None) -> int:
        sql = "SELECT count(*) FROM publications"
        args: tuple[str, ...] = ()
        if channel is not None:
            sql, args = sql + " WHERE channel = ?", (channel,)
        return int(await self._query(lambda db: db.execute(sql, args).fetchone()[0]))
