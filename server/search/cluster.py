"""Search on an Elasticsearch-family cluster: one shared module of mappings
and query building, and two thin adapters over the official async clients —
``elasticsearch`` 8 for Elasticsearch, ``opensearch-py`` for OpenSearch 2/3
(the elasticsearch client refuses any server that is not Elasticsearch).

One index (``search.index``) created from an index template of the same name,
documents keyed by publication (``channel|epoch|offset``), so indexing the
same publication again replaces it instead of adding a second one.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson

from server.models import ClientInfo
from server.search import SearchDoc, SearchHit, SearchPage, SearchQuery, SearchUnavailable, page_of

log = logging.getLogger("squall.search")

# The clients log every failed request with a traceback; the indexer already
# reports an outage once, so theirs stay quiet unless configured otherwise.
for _name in ("opensearch", "elastic_transport.transport", "elastic_transport.node_pool"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.ERROR)

MAPPINGS: dict[str, Any] = {
    "dynamic": False,
    "properties": {
        "id": {"type": "keyword"},
        "channel": {"type": "keyword"},
        "namespace": {"type": "keyword"},
        "epoch": {"type": "keyword"},
        "offset": {"type": "long"},
        "time": {"type": "date", "format": "epoch_millis"},
        "user": {"type": "keyword"},
        "client": {"type": "keyword"},
        "text": {"type": "text", "analyzer": "standard"},
        # Returned with hits, never searched.
        "data": {"type": "keyword", "index": False, "doc_values": False},
        "info": {"type": "object", "enabled": False},
    },
}


def template_body(index: str) -> dict[str, Any]:
    return {
        "index_patterns": [index],
        "priority": 200,
        "template": {
            "settings": {"number_of_shards": 1, "number_of_replicas": 0},
            "mappings": MAPPINGS,
        },
    }


def query_body(q: SearchQuery) -> dict[str, Any]:
    must: list[dict[str, Any]] = []
    if q.words:
        must.append({"match": {"text": {"query": " ".join(q.words), "operator": "and"}}})
    must += [{"match_phrase": {"text": " ".join(p)}} for p in q.phrases]
    flt: list[dict[str, Any]] = []
    scope: list[dict[str, Any]] = []
    if q.channels is not None:
        scope.append({"terms": {"channel": q.channels}})
    if q.namespaces is not None:
        scope.append({"terms": {"namespace": q.namespaces}})
    if scope:
        flt.append({"bool": {"should": scope, "minimum_should_match": 1}})
    if q.user is not None:
        flt.append({"term": {"user": q.user}})
    span: dict[str, int] = {}
    if q.since_ms is not None:
        span["gte"] = q.since_ms
    if q.until_ms is not None:
        span["lt"] = q.until_ms
    if span:
        flt.append({"range": {"time": span}})
    body: dict[str, Any] = {
        "query": {"bool": {"must": must, "filter": flt}},
        "sort": [{"time": {"order": "desc"}}, {"id": {"order": "desc"}}],
        "size": q.limit + 1,
        "track_total_hits": False,
        "_source": ["id", "channel", "epoch", "offset", "time", "data", "info"],
    }
    if q.after is not None:
        body["search_after"] = [q.after[0], q.after[1]]
    return body


def hits_of(response: dict[str, Any]) -> list[tuple[SearchHit, str]]:
    out = []
    for hit in response["hits"]["hits"]:
        src = hit["_source"]
        info = src.get("info")
        out.append(
            (
                SearchHit(
                    src["channel"],
                    int(src["offset"]),
                    src["epoch"],
                    int(src["time"]),
                    src["data"].encode(),
                    ClientInfo.from_json(info) if info else None,
                ),
                src["id"],
            )
        )
    return out


def bulk_lines(index: str, docs: Sequence[SearchDoc]) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    for d in docs:
        lines.append({"index": {"_index": index, "_id": d.id}})
        lines.append(d.source())
    return lines


def check_bulk(response: dict[str, Any]) -> None:
    """Raise when an item failed for a reason worth retrying; log and skip an
    item the cluster refuses outright (retrying it would block the log)."""
    if not response.get("errors"):
        return
    retry = []
    for item in response.get("items", []):
        result = next(iter(item.values()))
        status = int(result.get("status", 200))
        if status < 300:
            continue
        if status == 429 or status >= 500:
            retry.append(result)
        else:
            log.error("search: document %s refused: %s", result.get("_id"), result.get("error"))
    if retry:
        raise SearchUnavailable(f"{len(retry)} documents not indexed: {retry[0].get('error')}")


class _ClusterSearch:
    """What both adapters share; subclasses make the client calls."""

    name = "cluster"

    _client: Any  # the adapter's client, made in start()

    def __init__(self, url: str, *, index: str, timeout: float) -> None:
        self._url = url
        self._index = index
        self._timeout = timeout
        self._ok = False

    def healthy(self) -> bool:
        return self._ok

    def _failed(self, exc: Exception) -> SearchUnavailable:
        self._ok = False
        return SearchUnavailable(f"{self.name}: {exc}")

    async def index(self, docs: Sequence[SearchDoc]) -> None:
        if not docs:
            return
        response = await self._call("bulk", bulk_lines(self._index, docs))
        check_bulk(response)

    async def search(self, query: SearchQuery) -> SearchPage:
        response = await self._call("search", query_body(query))
        return page_of(hits_of(response), query.limit)

    async def count(self) -> int:
        await self._call("refresh", None)
        return int((await self._call("count", None))["count"])

    async def expire(self, namespace: str, before_ms: int) -> None:
        await self._call(
            "delete_by_query",
            {
                "query": {
                    "bool": {
                        "filter": [
                            {"term": {"namespace": namespace}},
                            {"range": {"time": {"lt": before_ms}}},
                        ]
                    }
                }
            },
        )

    async def clear(self) -> None:
        await self._call("delete_index", None)
        await self._ensure_index()

    async def start(self) -> None:
        await self._call("info", None)
        await self._ensure_index()
        self._ok = True

    async def close(self) -> None:
        if hasattr(self, "_client"):
            client = self._client
            del self._client  # a later start makes a new one
            await client.close()
        self._ok = False

    async def _ensure_index(self) -> None:
        await self._call("put_template", template_body(self._index))
        if not await self._call("exists", None):
            try:
                await self._call("create", None)
            except SearchUnavailable as exc:
                # Another node created it meanwhile.
                if "resource_already_exists" not in str(exc):
                    raise
                self._ok = True

    async def _call(self, what: str, body: Any) -> Any:
        """One client call by name, its failures as ``SearchUnavailable``."""
        try:
            response = await self._operations()[what](body)
        except self._client_errors() as exc:
            raise self._failed(exc) from exc
        if what == "bulk":
            self._ok = True
        # The elasticsearch client wraps bodies; opensearch-py returns them.
        return getattr(response, "body", response)

    def _operations(self) -> dict[str, Callable[[Any], Awaitable[Any]]]:
        raise NotImplementedError  # pragma: no cover - each adapter has its own

    def _client_errors(self) -> tuple[type[Exception], ...]:
        raise NotImplementedError  # pragma: no cover


class ElasticsearchSearch(_ClusterSearch):
    name = "elasticsearch"

    async def start(self) -> None:
        from elasticsearch import AsyncElasticsearch

        # One client for every attempt: the node calls start again while the
        # cluster is away, and each client holds an HTTP session.
        if not hasattr(self, "_client"):
            self._client = AsyncElasticsearch(
                self._url, request_timeout=self._timeout, max_retries=1, retry_on_timeout=False
            )
        await super().start()

    def _client_errors(self) -> tuple[type[Exception], ...]:
        from elastic_transport import TransportError
        from elasticsearch import ApiError

        return (ApiError, TransportError)

    def _operations(self) -> dict[str, Callable[[Any], Awaitable[Any]]]:
        es, idx = self._client, self._index
        return {
            "info": lambda _: es.info(),
            "put_template": lambda body: es.indices.put_index_template(name=idx, **body),
            "exists": lambda _: es.indices.exists(index=idx),
            "create": lambda _: es.indices.create(index=idx),
            "bulk": lambda lines: es.bulk(operations=lines),
            "search": lambda body: es.search(index=idx, **body),
            "refresh": lambda _: es.indices.refresh(index=idx),
            "count": lambda _: es.count(index=idx),
            "delete_by_query": lambda body: es.delete_by_query(
                index=idx, query=body["query"], refresh=True
            ),
            "delete_index": lambda _: es.indices.delete(index=idx, ignore_unavailable=True),
        }


class OpenSearchSearch(_ClusterSearch):
    name = "opensearch"

    async def start(self) -> None:
        from opensearchpy import AsyncOpenSearch

        if not hasattr(self, "_client"):  # one for every attempt, as above
            self._client = AsyncOpenSearch(
                self._url, timeout=self._timeout, max_retries=1, retry_on_timeout=False
            )
        await super().start()

    def _client_errors(self) -> tuple[type[Exception], ...]:
        from opensearchpy.exceptions import OpenSearchException

        return (OpenSearchException,)

    def _operations(self) -> dict[str, Callable[[Any], Awaitable[Any]]]:
        os_, idx = self._client, self._index
        return {
            "info": lambda _: os_.info(),
            "put_template": lambda body: os_.indices.put_index_template(name=idx, body=body),
            "exists": lambda _: os_.indices.exists(index=idx),
            "create": lambda _: os_.indices.create(index=idx),
            "bulk": lambda lines: os_.bulk(
                body=b"".join(orjson.dumps(line) + b"\n" for line in lines)
            ),
            "search": lambda body: os_.search(index=idx, body=body),
            "refresh": lambda _: os_.indices.refresh(index=idx),
            "count": lambda _: os_.count(index=idx),
            "delete_by_query": lambda body: os_.delete_by_query(index=idx, body=body, refresh=True),
            "delete_index": lambda _: os_.indices.delete(index=idx, ignore_unavailable=True),
        }
