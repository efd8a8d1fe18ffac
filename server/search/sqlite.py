"""The embedded search index: SQLite FTS5 in the data directory.

Same query semantics as the Elasticsearch family (``server.search``): the
``unicode61`` tokenizer (diacritics kept) splits and case-folds words the way
the standard analyzer does for ordinary text. All SQLite calls run on one
dedicated thread.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import orjson

from server.models import ClientInfo
from server.search import SearchDoc, SearchHit, SearchPage, SearchQuery, SearchUnavailable, page_of

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS docs (
    rowid INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    channel TEXT NOT NULL,
    namespace TEXT NOT NULL,
    epoch TEXT NOT NULL,
    offset INTEGER NOT NULL,
    time_ms INTEGER NOT NULL,
    user TEXT NOT NULL,
    data BLOB NOT NULL,
    info BLOB
);
CREATE INDEX IF NOT EXISTS docs_time ON docs (time_ms, id);
CREATE INDEX IF NOT EXISTS docs_channel ON docs (channel, time_ms);
CREATE VIRTUAL TABLE IF NOT EXISTS fts USING fts5 (
    text, tokenize = 'unicode61 remove_diacritics 0'
);
"""


def _fts_string(words: list[str]) -> str:
    return '"' + " ".join(words).replace('"', '""') + '"'


class SQLiteSearch:
    name = "sqlite"

    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="squall-fts")
        self._conn: sqlite3.Connection | None = None
        self._ok = False

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            if self._conn is None:
                raise SearchUnavailable("search index is closed")
            return fn(self._conn)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except sqlite3.Error as exc:
            self._ok = False
            raise SearchUnavailable(f"sqlite: {exc}") from exc

    async def start(self) -> None:
        def open_db() -> None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.executescript(_SCHEMA)
            self._conn = conn

        await asyncio.get_running_loop().run_in_executor(self._executor, open_db)
        self._ok = True

    async def close(self) -> None:
        def close_db() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(self._executor, close_db)
        self._executor.shutdown(wait=True)
        self._ok = False

    def healthy(self) -> bool:
        return self._ok

    async def index(self, docs: Sequence[SearchDoc]) -> None:
        rows = [
            (
                d.id,
                d.channel,
                d.namespace,
                d.epoch,
                d.offset,
                d.time_ms,
                d.user,
                d.data,
                orjson.dumps(d.info.to_json()) if d.info is not None else None,
                d.text,
            )
            for d in docs
        ]

        def write(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            try:
                for row in rows:
                    cur = db.execute(
                        "INSERT OR IGNORE INTO docs (id, channel, namespace, epoch, offset,"
                        " time_ms, user, data, info) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        row[:9],
                    )
                    if cur.rowcount == 1:
                        db.execute(
                            "INSERT INTO fts (rowid, text) VALUES (?, ?)", (cur.lastrowid, row[9])
                        )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

        await self._run(write)
        self._ok = True

    async def search(self, query: SearchQuery) -> SearchPage:
        match = " AND ".join(
            [_fts_string([w]) for w in query.words] + [_fts_string(p) for p in query.phrases]
        )
        sql = (
            "SELECT d.channel, d.offset, d.epoch, d.time_ms, d.data, d.info, d.id"
            " FROM fts JOIN docs d ON d.rowid = fts.rowid WHERE fts MATCH ?"
        )
        args: list[Any] = [match]
        scope: list[str] = []
        if query.channels is not None:
            scope.append(f"d.channel IN ({','.join('?' * len(query.channels))})")
            args += query.channels
        if query.namespaces is not None:
            scope.append(f"d.namespace IN ({','.join('?' * len(query.namespaces))})")
            args += query.namespaces
        if scope:
            sql += " AND (" + " OR ".join(scope) + ")"
        if query.user is not None:
            sql += " AND d.user = ?"
            args.append(query.user)
        if query.since_ms is not None:
            sql += " AND d.time_ms >= ?"
            args.append(query.since_ms)
        if query.until_ms is not None:
            sql += " AND d.time_ms < ?"
            args.append(query.until_ms)
        if query.after is not None:
            sql += " AND (d.time_ms < ? OR (d.time_ms = ? AND d.id < ?))"
            args += [query.after[0], query.after[0], query.after[1]]
        sql += " ORDER BY d.time_ms DESC, d.id DESC LIMIT ?"
        args.append(query.limit + 1)
        rows = await self._run(lambda db: db.execute(sql, args).fetchall())
        hits = [
            (
                SearchHit(
                    channel,
                    offset,
                    epoch,
                    time_ms,
                    bytes(data),
                    ClientInfo.from_json(orjson.loads(info)) if info else None,
                ),
                id_,
            )
            for channel, offset, epoch, time_ms, data, info, id_ in rows
        ]
        return page_of(hits, query.limit)

    async def count(self) -> int:
        return int(
            await self._run(lambda db: db.execute("SELECT count(*) FROM docs").fetchone()[0])
        )

    async def expire(self, namespace: str, before_ms: int) -> None:
        def delete(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "DELETE FROM fts WHERE rowid IN"
                    " (SELECT rowid FROM docs WHERE namespace = ? AND time_ms < ?)",
                    (namespace, before_ms),
                )
                db.execute(
                    "DELETE FROM docs WHERE namespace = ? AND time_ms < ?", (namespace, before_ms)
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

        await self._run(delete)

    async def clear(self) -> None:
        def wipe(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM fts")
            db.execute("DELETE FROM docs")

        await self._run(wipe)
