"""The server HTTP API: ``POST /api/<method>`` with ``Authorization: apikey
<key>`` and a JSON object body. ``docs/api.md`` is the contract.

Every method checks its whole input before it acts, so a bad request changes
nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from handlers.base import JSONHandler
from server import errors
from server.channels import Channel
from server.errors import SquallError

# GET /api/search query parameters that are numbers.
_SEARCH_INTS = ("limit", "since", "until")


class ApiHandler(JSONHandler):
    async def get(self, method: str) -> None:
        """``GET /api/search?query=...``: the one read that is also a GET, so
        a search is a link an operator can open."""
        if method != "search":
            self.set_header("Allow", "POST")
            self.write_squall_error(errors.MethodNotFound("use POST for this API method"))
            return
        body: dict[str, Any] = {}
        for name in ("query", "q", "channel", "user", "cursor", *_SEARCH_INTS):
            value = self.get_query_argument(name, None)
            if value is None:
                continue
            if name in _SEARCH_INTS:
                if not value.isdigit():
                    self.write_squall_error(errors.BadRequest(f"'{name}' must be a number"))
                    return
                body[name] = int(value)
            else:
                body["query" if name == "q" else name] = value
        await self._call(method, body)

    async def post(self, method: str) -> None:
        try:
            body = orjson.loads(self.request.body or b"{}")
        except orjson.JSONDecodeError:
            body = None
        await self._call(method, body)

    async def _call(self, method: str, body: Any) -> None:
        if not self.node.auth.check_api_key(self._presented_key()):
            self.write_squall_error(errors.Unauthorized("missing or wrong API key"))
            return
        call = self._methods().get(method)
        if call is None:
            self.write_squall_error(errors.MethodNotFound(f"unknown API method {method!r}"))
            return
        self.node.metrics.count_api(method)
        if body is None:
            self.write_squall_error(errors.BadRequest("body is not valid JSON"))
            return
        if not isinstance(body, dict):
            self.write_squall_error(errors.BadRequest("body must be a JSON object"))
            return
        try:
            result = await call(body)
        except SquallError as exc:
            self.node.metrics.count_error(exc.code)
            self.write_squall_error(exc)
            return
        self.write_json({"result": result})

    def _presented_key(self) -> str | None:
        header = self.request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "apikey":
            return None
        return key.strip()

    def _methods(self) -> dict[str, Callable[[dict[str, Any]], Awaitable[Any]]]:
        return {
            "publish": self.publish,
            "broadcast": self.broadcast,
            "history": self.history,
            "presence": self.presence,
            "presence_stats": self.presence_stats,
            "channels": self.channels,
            "disconnect": self.disconnect,
            "unsubscribe": self.unsubscribe,
            "info": self.info,
            "search": self.search,
        }

    async def search(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self.node.search_json(body)

    async def publish(self, body: dict[str, Any]) -> dict[str, Any]:
        channel = self.node.channels.resolve(body.get("channel"))
        data = self.node.publication_data(body)
        pub = await self.node.publish(channel, data)
        return {"offset": pub.offset, "epoch": pub.epoch}

    async def broadcast(self, body: dict[str, Any]) -> dict[str, Any]:
        names = body.get("channels")
        if not isinstance(names, list) or not names:
            raise errors.BadRequest("'channels' must be a non-empty list")
        if len(names) > self.node.settings.limits.max_broadcast_channels:
            raise errors.LimitExceeded(
                f"at most {self.node.settings.limits.max_broadcast_channels} channels per call"
            )
        if len(set(map(str, names))) != len(names):
            raise errors.BadRequest("'channels' has duplicates")
        channels: list[Channel] = [self.node.channels.resolve(n) for n in names]
        data = self.node.publication_data(body)
        responses: list[dict[str, Any]] = []
        for channel in channels:
            try:
                pub = await self.node.publish(channel, data)
            except SquallError as exc:
                responses.append({"channel": channel.name, "error": exc.to_json()})
            else:
                responses.append(
                    {"channel": channel.name, "result": {"offset": pub.offset, "epoch": pub.epoch}}
                )
        return {"responses": responses}

    async def history(self, body: dict[str, Any]) -> dict[str, Any]:
        channel = self.node.channels.resolve(body.get("channel"))
        return await self.node.history_json(channel, body)

    async def _presence(self, body: dict[str, Any]) -> tuple[Channel, dict[str, Any]]:
        channel = self.node.channels.resolve(body.get("channel"))
        if not channel.options.presence:
            raise errors.NotAvailable("presence is off in this namespace")
        members = await self.node.broker.presence(channel.name)
        return channel, {k: v.to_json() for k, v in members.items()}

    async def presence(self, body: dict[str, Any]) -> dict[str, Any]:
        _, members = await self._presence(body)
        return {"presence": members}

    async def presence_stats(self, body: dict[str, Any]) -> dict[str, Any]:
        _, members = await self._presence(body)
        users = {m["user"] for m in members.values()}
        return {"num_clients": len(members), "num_users": len(users)}

    async def channels(self, body: dict[str, Any]) -> dict[str, Any]:
        pattern = body.get("prefix", "")
        if not isinstance(pattern, str):
            raise errors.BadRequest("'prefix' must be a string")
        counts = self.node.hub.channel_counts()
        return {
            "channels": {
                name: {"num_clients": n}
                for name, n in sorted(counts.items())
                if name.startswith(pattern)
            }
        }

    async def disconnect(self, body: dict[str, Any]) -> dict[str, Any]:
        user = body.get("user")
        if not isinstance(user, str):
            raise errors.BadRequest("'user' must be a string")
        reconnect = body.get("reconnect", False)
        if not isinstance(reconnect, bool):
            raise errors.BadRequest("'reconnect' must be true or false")
        await self.node.disconnect_user(user, reconnect=reconnect)
        return {}

    async def unsubscribe(self, body: dict[str, Any]) -> dict[str, Any]:
        user = body.get("user")
        if not isinstance(user, str):
            raise errors.BadRequest("'user' must be a string")
        channel = self.node.channels.resolve(body.get("channel"))
        await self.node.unsubscribe_user(user, channel.name)
        return {}

    async def info(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self.node.cluster_info()
