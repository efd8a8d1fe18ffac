"""What the JSON handlers share: JSON bodies, JSON errors, no caching."""

from __future__ import annotations

from typing import Any

import orjson
import tornado.web

from server.errors import SquallError
from server.node import Node


class MethodNotAllowed(SquallError):
    """An HTTP method the resource does not take: 405, with ``Allow``."""

    code = 107
    message = "method not allowed"
    http_status = 405


class JSONHandler(tornado.web.RequestHandler):
    node: Node

    def initialize(self, node: Node) -> None:
        self.node = node

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")

    def write_json(self, obj: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(orjson.dumps(obj))

    def write_squall_error(self, error: SquallError) -> None:
        self.write_json({"error": error.to_json()}, error.http_status)

    def allowed_methods(self) -> list[str]:
        """The HTTP methods this handler implements (for ``Allow``)."""
        base = tornado.web.RequestHandler
        return [
            verb
            for verb in self.SUPPORTED_METHODS
            if getattr(type(self), verb.lower(), None) is not getattr(base, verb.lower(), None)
        ]

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # Tornado's own errors (bad method, body too large, ...) as JSON too.
        if status_code == 405 and not self._headers.get("Allow"):
            self.set_header("Allow", ", ".join(self.allowed_methods()))
        message = self._reason or "error"
        self.finish(
            orjson.dumps(
                {"error": {"code": 100 if status_code >= 500 else 107, "message": message}}
            )
        )
