"""Operations endpoints: ``/health``, ``/ready``, ``/status``, ``/metrics``."""

from __future__ import annotations

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from handlers.base import JSONHandler
from server.openapi import document


class HealthHandler(JSONHandler):
    """Alive: the process answers. Load balancers use /ready instead."""

    def get(self) -> None:
        self.write_json({"status": "ok"})


class ReadyHandler(JSONHandler):
    """Ready for traffic: 200, or 503 while starting, draining, or cut off
    from the broker."""

    def get(self) -> None:
        node = self.node
        if node.ready():
            self.write_json({"ready": True})
            return
        reason = "draining" if node.draining else "broker unavailable"
        self.write_json({"ready": False, "reason": reason}, 503)

    head = get


class StatusHandler(JSONHandler):
    """A JSON snapshot for dashboards. Rebuilt at most once a second and sent
    with an ETag, so polling it is cheap; Tornado answers a matching
    ``If-None-Match`` with 304."""

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-cache")

    async def get(self) -> None:
        scope = self.get_query_argument("scope", "node")
        if scope == "cluster":
            self.write(orjson.dumps(await self.node.cluster_info()))
        elif scope == "node":
            self.write(self.node.status_json())
        else:
            self.write_json({"error": {"code": 107, "message": "scope is node or cluster"}}, 400)


class MetricsHandler(JSONHandler):
    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.write(generate_latest(self.node.metrics.registry))


class OpenAPIHandler(JSONHandler):
    """``GET /api/openapi.json``: the OpenAPI 3.1 document of the HTTP API
    (server/openapi.py). No key needed: it is documentation."""

    def get(self) -> None:
        self.write_json(document(self.node))
