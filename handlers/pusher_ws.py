"""The Pusher Channels WebSocket endpoint: ``/app/<key>``.

The upgrade is WebSocket's own (``handlers/websocket.py``); the key picks the
app, and with it the codec (``server.codecs.pusher``) the connection speaks.
A key that names no app still gets a WebSocket, closed at once with 4001, as
Pusher does: the SDKs then stop reconnecting.
"""

from __future__ import annotations

from typing import Any

from handlers.websocket import WebSocketConnections, WebSocketHandler
from server.codec import Codec
from server.codecs.pusher import PusherCodec
from server.node import Node


class PusherHandler(WebSocketHandler):
    codecs: dict[str, PusherCodec]
    unknown: PusherCodec
    _key = ""

    def initialize(  # type: ignore[override]
        self,
        node: Node,
        connections: WebSocketConnections,
        codecs: dict[str, PusherCodec],
        unknown: PusherCodec,
    ) -> None:
        super().initialize(node, connections)
        self.codecs = codecs
        self.unknown = unknown

    async def get(self, *args: Any, **kwargs: Any) -> None:
        self._key = args[0] if args else ""
        await super().get()

    def _pick_codec(self) -> tuple[Codec, str | None]:
        return self.codecs.get(self._key, self.unknown), None


def routes(node: Node, connections: WebSocketConnections) -> list[Any]:
    """``/app/<key>``, when Pusher apps are configured."""
    apps = node.settings.pusher.apps
    if not apps:
        return []
    timeout = node.settings.pusher.activity_timeout
    codecs = {app.key: PusherCodec(app, timeout) for app in apps}
    args = {
        "node": node,
        "connections": connections,
        "codecs": codecs,
        "unknown": PusherCodec(None, timeout),
    }
    return [(r"/app/([^/]+)", PusherHandler, args)]
