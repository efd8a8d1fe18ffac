"""The Tornado application: routes and transport settings for a node."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any

import tornado.httpserver
import tornado.web

from handlers.api import ApiBatchHandler, ApiHandler
from handlers.api import max_body_size as api_body_size
from handlers.api_keepalive import KeepAliveApi
from handlers.api_stream import ApiStreamHandler, ApiStreams
from handlers.pages import (
    DashboardDataHandler,
    DashboardHandler,
    DemoHandler,
    DemoTokenHandler,
    IndexHandler,
    LoginHandler,
    LogoutHandler,
)
from handlers.pusher_api import routes as pusher_api_routes
from handlers.pusher_ws import routes as pusher_ws_routes
from handlers.sse import SSEConnections, SSEHandler
from handlers.status import (
    HealthHandler,
    MetricsHandler,
    OpenAPIHandler,
    ReadyHandler,
    StatusHandler,
)
from handlers.websocket import WebSocketConnections, WebSocketHandler
from server.codecs.centrifuge import CENTRIFUGE_JSON, SUBPROTOCOLS
from server.node import Node

ROOT = Path(__file__).resolve().parent.parent
access_log = logging.getLogger("squall.access")


def quiet_path(path: str) -> bool:
    """Paths whose successful requests are logged at debug only: probes,
    and the API, which a back end may call thousands of times a second
    (its errors are still logged; /metrics counts every call)."""
    return path in ("/health", "/ready") or path.startswith("/api/")


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Access log without query strings: SSE tokens travel there."""
    status = handler.get_status()
    if status < 400:
        level = logging.DEBUG if quiet_path(handler.request.path) else logging.INFO
    elif status < 500:
        level = logging.WARNING
    else:
        level = logging.ERROR
    access_log.log(
        level,
        "%d %s %s %.1fms",
        status,
        handler.request.method,
        handler.request.path,
        1000.0 * handler.request.request_time(),
    )


def make_app(node: Node) -> tornado.web.Application:
    args = {"node": node}
    connections = WebSocketConnections(node)
    ws_args = {"node": node, "connections": connections}
    sse_args = {"node": node, "connections": SSEConnections(node)}
    # The Centrifugo client protocol: JSON, or Protobuf when the client asks
    # for the "centrifuge-protobuf" subprotocol (as its SDKs do).
    centrifuge_args = {
        "node": node,
        "connections": connections,
        "codec": CENTRIFUGE_JSON,
        "subprotocols": SUBPROTOCOLS,
    }
    return tornado.web.Application(
        [
            (r"/connection/websocket", WebSocketHandler, ws_args),
            (r"/connection/centrifuge/websocket", WebSocketHandler, centrifuge_args),
            (r"/connection/sse", SSEHandler, sse_args),
            (
                r"/api/connection/websocket",
                ApiStreamHandler,
                {"node": node, "streams": ApiStreams(node)},
            ),
            (r"/api/openapi\.json", OpenAPIHandler, args),
            (r"/api/(batch)", ApiBatchHandler, args),
            (r"/api/([a-z_]+)", ApiHandler, args),
            (r"/health", HealthHandler, args),
            (r"/ready", ReadyHandler, args),
            (r"/status", StatusHandler, args),
            (r"/metrics", MetricsHandler, args),
            (r"/demo", DemoHandler, args),
            (r"/demo/token", DemoTokenHandler, args),
            (r"/dashboard", DashboardHandler, args),
            (r"/dashboard/login", LoginHandler, args),
            (r"/dashboard/logout", LogoutHandler, args),
            (r"/dashboard/data", DashboardDataHandler, args),
            (r"/", IndexHandler, args),
            # The Pusher Channels HTTP API (/apps/<app_id>/...), when apps
            # are configured (docs/pusher.md).
            *pusher_api_routes(node),
            # ... and its WebSocket endpoint, /app/<key>.
            *pusher_ws_routes(node, connections),
        ],
        # Signs the dashboard login cookie; a random one (sessions end with
        # the process) when none is configured or generated.
        cookie_secret=node.settings.dashboard.cookie_secret or secrets.token_urlsafe(32),
        login_url="/dashboard/login",
        template_path=str(ROOT / "templates"),
        static_path=str(ROOT / "static"),
        log_function=log_request,
        compress_response=False,
        # Back ends' keep-alive API connections leave Tornado after their
        # first request (handlers/api_keepalive.py), once ``http_server``
        # gave it the server.
        keepalive_api=KeepAliveApi(node, max_body_size(node)),
    )


def http_server(
    node: Node, app: tornado.web.Application, **kwargs: Any
) -> tornado.httpserver.HTTPServer:
    """The HTTP server of ``app``: Tornado's, with the body limit, and the
    keep-alive API path told about it."""
    server = tornado.httpserver.HTTPServer(app, max_body_size=max_body_size(node), **kwargs)
    keepalive = app.settings.get("keepalive_api")
    if isinstance(keepalive, KeepAliveApi):
        keepalive.serve_for(server)
    return server


def max_body_size(node: Node) -> int:
    """HTTP bodies: one publication plus room for a broadcast's channel list
    or a batch's commands."""
    return api_body_size(node.settings.limits)
