"""The SearchIndex contract on the embedded SQLite FTS5 index."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from server.search.sqlite import SQLiteSearch
from tests.contract_search import *  # noqa: F403 - the shared contract tests


@pytest.fixture
async def search_index(tmp_path: Path) -> AsyncIterator[SQLiteSearch]:
    index = SQLiteSearch(tmp_path / "search.sqlite3")
    await index.start()
    yield index
    await index.close()
