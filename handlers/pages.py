"""HTML pages. The demo and dashboard arrive with the browser client."""

from __future__ import annotations

import tornado.web

from server.node import Node


class IndexHandler(tornado.web.RequestHandler):
    def initialize(self, node: Node) -> None:
        self.node = node

    def get(self) -> None:
        self.render("index.html", version=self.node.version, node_id=self.node.node_id)
