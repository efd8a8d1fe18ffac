"""The OpenAPI 3.1 document of Squall's own HTTP API, served at
``GET /api/openapi.json``.

The paths come from the handlers' table (``ApiMethods.table()``), the limits
from the node's settings; what each method takes and answers is written down
here once (``METHODS``), next to the prose of ``docs/api.md``.
``tests/integration/test_openapi.py`` checks that both sides agree and runs
schemathesis against a live server with this document.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import server
from server.node import Node
from server.search import MAX_QUERY_CHARS

Schema = dict[str, Any]

NDJSON = "application/x-ndjson"

_CHANNEL_CHARS = r"^[A-Za-z0-9_.\-=@/#:+,;!~$]+$"


def _object(properties: dict[str, Schema], required: tuple[str, ...] = ()) -> Schema:
    out: Schema = {"type": "object", "properties": properties}
    if required:
        out["required"] = list(required)
    return out


_CHANNEL: Schema = {
    "type": "string",
    "minLength": 1,
    "maxLength": 255,
    "pattern": _CHANNEL_CHARS,
    "description": "`namespace:name`, or a bare name in the default namespace",
    "examples": ["news", "chat:lobby"],
}
_POSITION: Schema = _object(
    {"offset": {"type": "integer", "minimum": 0}, "epoch": {"type": "string"}},
    ("offset", "epoch"),
)
_CLIENT_INFO: Schema = _object(
    {"client": {"type": "string"}, "user": {"type": "string"}, "info": {}},
    ("client", "user"),
)
_PUBLICATION: Schema = _object(
    {
        "offset": {"type": "integer"},
        "epoch": {"type": "string"},
        "data": {},
        "time": {"type": "integer", "description": "ms since the epoch"},
        "info": {"$ref": "#/components/schemas/ClientInfo"},
    },
    ("offset", "epoch", "data", "time"),
)
_SEARCH_HIT: Schema = _object(
    {
        "channel": {"type": "string"},
        "offset": {"type": "integer"},
        "epoch": {"type": "string"},
        "time": {"type": "integer"},
        "data": {},
        "info": {"$ref": "#/components/schemas/ClientInfo"},
    },
    ("channel", "offset", "epoch", "time", "data"),
)
_PUBLISHED: Schema = _object(
    {"offset": {"type": "integer"}, "epoch": {"type": "string"}}, ("offset", "epoch")
)
_EMPTY: Schema = {"type": "object", "maxProperties": 0}
_ERROR: Schema = _object(
    {
        "error": _object(
            {"code": {"type": "integer"}, "message": {"type": "string"}}, ("code", "message")
        )
    },
    ("error",),
)


@dataclass(frozen=True)
class Method:
    """One ``POST /api/<method>``: its params object and its ``result``."""

    summary: str
    params: Schema
    result: Schema
    # Besides 200, 400, 401, 413 (every method) and 503.
    errors: tuple[int, ...] = ()
    body_required: bool = True


def _methods(node: Node) -> dict[str, Method]:
    limits = node.settings.limits
    time_ms: Schema = {
        "type": "integer",
        "minimum": 0,
        "maximum": 2**63 - 1,
        "description": "ms since the epoch",
    }
    search_params = _object(
        {
            "query": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_QUERY_CHARS,
                "description": 'words and "quoted phrases"',
                "examples": ["deploy", 'deploy "rolled back"'],
            },
            "channel": _CHANNEL,
            "user": {"type": "string"},
            "cursor": {"type": ["string", "null"], "description": "from the previous page"},
            "limit": {"type": "integer", "minimum": 1, "default": 20},
            "since": time_ms,
            "until": time_ms,
        },
        ("query",),
    )
    return {
        "publish": Method(
            "Publish to a channel",
            _object({"channel": _CHANNEL, "data": {}}, ("channel", "data")),
            _PUBLISHED,
            (503,),
        ),
        "broadcast": Method(
            "Publish the same data to many channels",
            _object(
                {
                    "channels": {
                        "type": "array",
                        "items": _CHANNEL,
                        "minItems": 1,
                        "maxItems": limits.max_broadcast_channels,
                        "uniqueItems": True,
                    },
                    "data": {},
                },
                ("channels", "data"),
            ),
            _object(
                {
                    "responses": {
                        "type": "array",
                        "items": {
                            "oneOf": [
                                _object(
                                    {"channel": {"type": "string"}, "result": _PUBLISHED},
                                    ("channel", "result"),
                                ),
                                _object(
                                    {
                                        "channel": {"type": "string"},
                                        "error": _ERROR["properties"]["error"],
                                    },
                                    ("channel", "error"),
                                ),
                            ]
                        },
                    }
                },
                ("responses",),
            ),
        ),
        "history": Method(
            "A channel's publications and current position",
            _object(
                {
                    "channel": _CHANNEL,
                    "limit": {
                        "type": "integer",
                        "minimum": 0,
                        "default": 100,
                        "description": f"at most {limits.max_history_limit} are returned",
                    },
                    "since": _POSITION,
                    "until": _POSITION,
                    "reverse": {"type": "boolean", "default": False},
                },
                ("channel",),
            ),
            _object(
                {
                    "publications": {
                        "type": "array",
                        "items": {"$ref": "#/components/schemas/Publication"},
                    },
                    "offset": {"type": "integer"},
                    "epoch": {"type": "string"},
                },
                ("publications", "offset", "epoch"),
            ),
            (503,),
        ),
        "search": Method(
            "Full-text search over searchable namespaces (also a GET)",
            search_params,
            _object(
                {
                    "hits": {"type": "array", "items": {"$ref": "#/components/schemas/SearchHit"}},
                    "cursor": {"type": ["string", "null"]},
                },
                ("hits", "cursor"),
            ),
            (403, 503),
            body_required=False,
        ),
        "presence": Method(
            "Who is subscribed to a channel",
            _object({"channel": _CHANNEL}, ("channel",)),
            _object(
                {
                    "presence": {
                        "type": "object",
                        "additionalProperties": {"$ref": "#/components/schemas/ClientInfo"},
                    }
                },
                ("presence",),
            ),
            (503,),
        ),
        "presence_stats": Method(
            "How many clients and users are subscribed to a channel",
            _object({"channel": _CHANNEL}, ("channel",)),
            _object(
                {
                    "num_clients": {"type": "integer", "minimum": 0},
                    "num_users": {"type": "integer", "minimum": 0},
                },
                ("num_clients", "num_users"),
            ),
            (503,),
        ),
        "channels": Method(
            "Channels with subscribers on this node",
            _object({"prefix": {"type": "string"}}),
            _object(
                {
                    "channels": {
                        "type": "object",
                        "additionalProperties": _object(
                            {"num_clients": {"type": "integer"}}, ("num_clients",)
                        ),
                    }
                },
                ("channels",),
            ),
            body_required=False,
        ),
        "disconnect": Method(
            "Close every connection of a user, on every node",
            _object(
                {"user": {"type": "string"}, "reconnect": {"type": "boolean", "default": False}},
                ("user",),
            ),
            _EMPTY,
            (503,),
        ),
        "unsubscribe": Method(
            "Take a user's connections out of a channel, on every node",
            _object({"user": {"type": "string"}, "channel": _CHANNEL}, ("user", "channel")),
            _EMPTY,
            (503,),
        ),
        "info": Method(
            "Every live node of the cluster",
            {"type": "object"},
            _object(
                {"nodes": {"type": "array", "items": {"type": "object"}}, "totals": {}},
                ("nodes",),
            ),
            (503,),
            body_required=False,
        ),
    }


def _error(description: str) -> Schema:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


_ERRORS: dict[int, Schema] = {
    400: _error("bad params (107), unknown namespace (102), off (108), a limit (106)"),
    401: _error("no or wrong API key (101)"),
    403: _error("permission denied (103)"),
    404: _error("no such API method (104)"),
    405: _error("an HTTP method the path does not take (107); `Allow` lists the ones it does"),
    413: _error(
        "the body (`Content-Length`, answered before the body is read) or `data` over its "
        "limit (115)"
    ),
    503: _error("broker, durable log or search unavailable (114): nothing was done"),
}


def _json(schema: Schema) -> Schema:
    return {"application/json": {"schema": schema}}


def _api_operation(name: str, method: Method) -> Schema:
    codes = sorted({400, 401, 413, *method.errors})
    responses: dict[str, Any] = {
        "200": {
            "description": "done",
            "content": _json(_object({"result": method.result}, ("result",))),
        }
    }
    responses.update({str(code): _ERRORS[code] for code in codes})
    return {
        "operationId": name,
        "summary": method.summary,
        "description": f"See docs/api.md, `{name}`.",
        "requestBody": {"required": method.body_required, "content": _json(method.params)},
        "responses": responses,
    }


def _search_get(params: Schema, result: Schema) -> Schema:
    parameters = []
    for name, schema in params["properties"].items():
        if name == "cursor":
            schema = {"type": "string"}
        # Not required: `q` may stand for `query`.
        parameters.append({"name": name, "in": "query", "required": False, "schema": schema})
    parameters.append({"name": "q", "in": "query", "required": False, "schema": {"type": "string"}})
    return {
        "operationId": "search_get",
        "summary": "Full-text search as a link (`q` for `query`)",
        "parameters": parameters,
        "responses": {
            "200": {"description": "hits", "content": _json(_object({"result": result}))},
            **{str(code): _ERRORS[code] for code in (400, 401, 403, 503)},
        },
    }


def _batch(node: Node) -> Schema:
    limit = node.settings.limits.max_batch_commands
    command = {
        "type": "object",
        "properties": {"method": {"type": "string"}, "params": {"type": "object"}},
        "required": ["method"],
        "additionalProperties": False,
    }
    reply = {
        "oneOf": [
            _object({"result": {}}, ("result",)),
            {"$ref": "#/components/schemas/Error"},
        ]
    }
    return {
        "operationId": "batch",
        "summary": "Many commands in one request, one reply each, in order",
        "parameters": [
            {
                "name": "stop_on_error",
                "in": "query",
                "required": False,
                "schema": {
                    "type": "string",
                    "enum": ["true", "false", "1", "0", "yes", "no", ""],
                },
            }
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "commands": {"type": "array", "items": command, "maxItems": limit},
                            "stop_on_error": {"type": "boolean", "default": False},
                        },
                        "required": ["commands"],
                        "additionalProperties": False,
                    }
                },
                NDJSON: {
                    "schema": {
                        "type": "string",
                        "description": "one command object a line",
                    }
                },
            },
        },
        "responses": {
            "200": {
                "description": "the batch ran: look at each reply",
                "content": {
                    "application/json": {
                        "schema": _object(
                            {"replies": {"type": "array", "items": reply}}, ("replies",)
                        )
                    },
                    NDJSON: {"schema": {"type": "string", "description": "one reply a line"}},
                },
            },
            **{
                str(code): {
                    **_ERRORS[code],
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}},
                        NDJSON: {"schema": {"type": "string"}},
                    },
                }
                for code in (400, 401, 413)
            },
        },
    }


def _plain(description: str, schema: Schema, *, status: tuple[int, ...] = (200,)) -> Schema:
    return {
        "responses": {
            str(code): {"description": description, "content": _json(schema)} for code in status
        },
        "security": [],
    }


def document(node: Node) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``node``'s HTTP API."""
    from handlers.api import ApiMethods  # handlers import server, not the reverse

    specs = _methods(node)
    paths: dict[str, Any] = {}
    for name in ApiMethods(node).table():
        paths[f"/api/{name}"] = {"post": _api_operation(name, specs[name])}
    paths["/api/search"]["get"] = _search_get(specs["search"].params, specs["search"].result)
    paths["/api/batch"] = {"post": _batch(node)}
    paths["/api/openapi.json"] = {
        "get": {
            **_plain("this document", {"type": "object"}),
            "operationId": "openapi",
            "summary": "This document",
        }
    }
    paths["/health"] = {
        "get": {
            **_plain("the process answers", _object({"status": {"const": "ok"}}, ("status",))),
            "operationId": "health",
            "summary": "Alive",
        }
    }
    ready = _object({"ready": {"type": "boolean"}, "reason": {"type": "string"}}, ("ready",))
    paths["/ready"] = {
        "get": {
            **_plain(
                "200 ready, 503 starting, draining or without broker", ready, status=(200, 503)
            ),
            "operationId": "ready",
            "summary": "Ready for traffic (load balancers)",
        }
    }
    paths["/status"] = {
        "get": {
            **_plain(
                "a JSON snapshot (ETag; 304 for a matching If-None-Match)", {"type": "object"}
            ),
            "operationId": "status",
            "summary": "This node's or the cluster's status",
            "parameters": [
                {
                    "name": "scope",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string", "enum": ["node", "cluster"], "default": "node"},
                }
            ],
        }
    }
    paths["/status"]["get"]["responses"]["400"] = _error("scope is neither node nor cluster")
    paths["/metrics"] = {
        "get": {
            "operationId": "metrics",
            "summary": "Prometheus metrics",
            "security": [],
            "responses": {
                "200": {
                    "description": "the Prometheus text format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Squall HTTP API",
            "version": server.__version__,
            "description": "Squall's server API for back ends; docs/api.md is the prose.",
        },
        "paths": paths,
        "security": [{"apikey": []}],
        "components": {
            "securitySchemes": {
                "apikey": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Authorization",
                    "description": "`Authorization: apikey <key>` (auth.api_key)",
                }
            },
            "schemas": {
                "Error": _ERROR,
                "ClientInfo": _CLIENT_INFO,
                "Publication": _PUBLICATION,
                "SearchHit": _SEARCH_HIT,
            },
        },
    }
