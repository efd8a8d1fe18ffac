"""Starting a search cluster adapter while the cluster is away (the node
retries ``start`` until it answers) must not leave a client behind per
attempt: each held an open HTTP session, logged as "Unclosed client session"
when collected."""

from __future__ import annotations

import gc
import socket

import aiohttp
import pytest

from server.search import SearchUnavailable
from server.search.cluster import ElasticsearchSearch, OpenSearchSearch


def _open_sessions() -> set[int]:
    gc.collect()
    return {
        id(o) for o in gc.get_objects() if isinstance(o, aiohttp.ClientSession) and not o.closed
    }


@pytest.mark.parametrize("adapter", [OpenSearchSearch, ElasticsearchSearch])
async def test_start_retried_while_the_cluster_is_away_leaks_no_session(
    adapter: type[OpenSearchSearch] | type[ElasticsearchSearch],
) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    before = _open_sessions()
    index = adapter(f"http://127.0.0.1:{port}", index="away", timeout=2)
    for _ in range(3):
        with pytest.raises(SearchUnavailable):
            await index.start()
    await index.close()
    assert _open_sessions() - before == set()
