"""The SearchIndex contract on a real OpenSearch 2.19 node: through
opensearch-py directly, and through the elasticsearch 8 client behind the
HAProxy front that makes the node answer it."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from server.search.cluster import ElasticsearchSearch, OpenSearchSearch
from tests.contract_search import *  # noqa: F403 - the shared contract tests
from tests.services import OpenSearchNode


@pytest.fixture(params=["opensearch", "elasticsearch"])
async def search_index(
    request: pytest.FixtureRequest, opensearch: OpenSearchNode
) -> AsyncIterator[Any]:
    name = f"t-{uuid.uuid4().hex[:12]}"
    if request.param == "opensearch":
        index: Any = OpenSearchSearch(opensearch.url, index=name, timeout=30)
    else:
        front = request.getfixturevalue("elastic_front")
        index = ElasticsearchSearch(front.url, index=name, timeout=30)
    await index.start()
    yield index
    await index.clear()
    await index.close()
