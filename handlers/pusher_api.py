"""The Pusher Channels HTTP API under ``/apps/<app_id>/``, as Pusher's server
SDKs call it: trigger events (one or many channels, batches), read channel
state and presence, terminate a user's connections. ``docs/pusher.md`` (the
"HTTP API" section) is the contract.

Every request is signed by the app's secret (``server.pusher.verify_request``)
and every input is checked before anything is published, so a refused request
changes nothing. Errors are Pusher's: a status code (400, 401, 403, 404, 413,
503) and a plain-text body; successes are JSON.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import tornado.web

from server import errors
from server.broker import BrokerUnavailable
from server.channels import Channel
from server.config import PusherApp
from server.errors import SquallError
from server.models import ClientInfo
from server.node import Node
from server.pusher import (
    USER_CHANNEL_PREFIX,
    PusherApps,
    RequestRefused,
    envelope,
    pusher_channel,
    request_params,
    squall_channel,
    valid_channel,
    verify_request,
)

log = logging.getLogger("squall.pusher.api")

# Pusher's limits: channels of one trigger, events of one batch, the size of
# an event's data (bytes of UTF-8) and of its name (characters).
MAX_TRIGGER_CHANNELS = 100
MAX_BATCH_EVENTS = 10
MAX_EVENT_NAME = 200

PRESENCE_PREFIX = "presence-"
ENCRYPTED_PREFIX = "private-encrypted-"
# What ``info`` may ask for: of a triggered channel, of one channel, of each
# channel of a list.
EVENT_INFO = frozenset({"user_count", "subscription_count"})
CHANNEL_INFO = EVENT_INFO
CHANNELS_INFO = frozenset({"user_count"})

SOCKET_ID_RE = re.compile(r"\d+\.\d+")
USER_ID_RE = re.compile(r"[A-Za-z0-9_\-=@,.;]{1,200}")

# Tornado path groups: an app id, a channel name, a user id.
_SEGMENT = r"([^/]+)"


@dataclass(slots=True, frozen=True)
class Trigger:
    """One checked event to publish: its Squall channels and what to answer."""

    channels: list[tuple[str, Channel]]  # (Pusher name, Squall channel)
    data: bytes
    info: ClientInfo | None
    attributes: frozenset[str]


def routes(node: Node) -> list[tuple[str, type[tornado.web.RequestHandler], dict[str, Any]]]:
    """The HTTP API's routes; empty when no Pusher app is configured."""
    apps = PusherApps(node.settings)
    if not apps:
        return []
    args: dict[str, Any] = {"node": node, "apps": apps}
    return [
        (rf"/apps/{_SEGMENT}/events", EventsHandler, args),
        (rf"/apps/{_SEGMENT}/batch_events", BatchEventsHandler, args),
        (rf"/apps/{_SEGMENT}/channels", ChannelsHandler, args),
        (rf"/apps/{_SEGMENT}/channels/{_SEGMENT}", ChannelHandler, args),
        (rf"/apps/{_SEGMENT}/channels/{_SEGMENT}/users", UsersHandler, args),
        (rf"/apps/{_SEGMENT}/users/{_SEGMENT}/terminate_connections", TerminateHandler, args),
        # The PyPI SDK (pusher 3.3) sends terminate_user_connections here,
        # without the app id: the app is the one whose key signed it.
        (rf"/users/{_SEGMENT}/terminate_connections", TerminateByKeyHandler, args),
        (r"/apps/.*", NotFoundHandler, args),
    ]


def _attributes(value: str | None, allowed: frozenset[str]) -> frozenset[str]:
    """``info``: a comma-separated list of attributes, each one ``allowed``."""
    if value is None or value == "":
        return frozenset()
    names = frozenset(part.strip() for part in value.split(","))
    unknown = names - allowed
    if unknown:
        raise RequestRefused(
            400, f"Unknown info attribute {min(unknown)!r}; expected some of {sorted(allowed)}"
        )
    return names


def _squall_error(exc: SquallError) -> RequestRefused:
    status = exc.http_status if exc.http_status in (400, 401, 403, 404, 413) else 500
    if isinstance(exc, errors.Unavailable):
        status = 503
    elif isinstance(exc, errors.UnknownChannel):
        status = 400
    return RequestRefused(status, exc.message)


class PusherApiHandler(tornado.web.RequestHandler):
    """What every endpoint shares: find the app, check the signature, run,
    answer JSON or Pusher's plain-text error."""

    node: Node
    apps: PusherApps
    # The request's query parameters, keys lower-cased (set by ``serve``).
    params: dict[str, str]

    def initialize(self, node: Node, apps: PusherApps) -> None:
        self.node = node
        self.apps = apps

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")

    def check_xsrf_cookie(self) -> None:
        """Signed requests from back ends: no cookies involved."""

    def refuse(self, status: int, message: str) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(message + "\n")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # Tornado's own errors (wrong method, ...) as plain text too.
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish((self._reason or "error") + "\n")

    async def serve(
        self, app_id: str | None, metric: str, act: Callable[[PusherApp], Awaitable[Any]]
    ) -> None:
        """Authenticate the request for ``app_id`` (or, when None, the app
        whose key it names), then answer ``act(app)``."""
        try:
            params = request_params(self.request.query_arguments)
            if app_id is None:
                app = self.apps.by_key.get(params.get("auth_key", ""))
                if app is None:
                    raise RequestRefused(401, "Unknown auth_key")
            else:
                app = self.apps.by_id.get(app_id)
                if app is None:
                    raise RequestRefused(404, f"Unknown app {app_id!r}")
            verify_request(
                app, self.request.method or "", self.request.path, params, self.request.body,
                time.time(),
            )  # fmt: skip
            self.params = params
            self.node.metrics.count_api(metric)
            try:
                result = await act(app)
            except SquallError as exc:
                self.node.metrics.count_error(exc.code)
                raise _squall_error(exc) from None
            except BrokerUnavailable as exc:
                raise RequestRefused(503, f"broker unavailable: {exc}") from None
        except RequestRefused as exc:
            # The message holds no secret and no signature.
            log.debug("%s %s refused: %d %s", self.request.method, self.request.path,
                      exc.status, exc.message)  # fmt: skip
            self.refuse(exc.status, exc.message)
            return
        self.finish(orjson.dumps(result))

    def json_body(self) -> dict[str, Any]:
        try:
            body = orjson.loads(self.request.body or b"{}")
        except orjson.JSONDecodeError:
            raise RequestRefused(400, "The body is not valid JSON") from None
        if not isinstance(body, dict):
            raise RequestRefused(400, "The body must be a JSON object")
        return body

    def query(self, name: str) -> str | None:
        return self.params.get(name)

    # ---- shared checks --------------------------------------------------

    def channel(self, app: PusherApp, name: object) -> Channel:
        """The Squall channel of the app's Pusher channel ``name``."""
        if not valid_channel(name):
            raise RequestRefused(
                400, f"Invalid channel name {name!r}: 1-200 of A-Z a-z 0-9 _ - = @ , . ;"
            )
        assert isinstance(name, str)
        return self.node.channels.resolve(squall_channel(app, name))

    def trigger(self, app: PusherApp, event: dict[str, Any], names: list[object]) -> Trigger:
        """Check one event (of ``events`` or a batch) without acting."""
        name = event.get("name")
        if not isinstance(name, str) or not name or len(name) > MAX_EVENT_NAME:
            raise RequestRefused(400, f"'name' must be a string of 1-{MAX_EVENT_NAME} characters")
        data = event.get("data")
        if not isinstance(data, str):
            raise RequestRefused(400, "'data' must be a string")
        size = len(data.encode())
        if size > app.max_event_bytes:
            raise RequestRefused(
                413,
                f"Event data is {size} bytes; the limit is {app.max_event_bytes}",
            )
        socket_id = event.get("socket_id")
        if socket_id is not None and (
            not isinstance(socket_id, str) or not SOCKET_ID_RE.fullmatch(socket_id)
        ):
            raise RequestRefused(400, f"Invalid socket_id {socket_id!r}")
        info = event.get("info")
        if info is not None and not isinstance(info, str):
            raise RequestRefused(400, "'info' must be a comma-separated string")
        attributes = _attributes(info, EVENT_INFO)
        channels: list[tuple[str, Channel]] = []
        seen: set[object] = set()
        for channel_name in names:
            channel = self.channel(app, channel_name)  # a 400 for a non-string, before hashing
            if channel_name in seen:
                continue
            seen.add(channel_name)
            channels.append((str(channel_name), channel))
        if len(channels) > 1 and any(n.startswith(ENCRYPTED_PREFIX) for n, _ in channels):
            raise RequestRefused(
                400, "An event to an encrypted channel must go to that one channel only"
            )
        if len(channels) > 1 and any(n.startswith(USER_CHANNEL_PREFIX) for n, _ in channels):
            raise RequestRefused(400, "An event to a user must go to that one user's channel only")
        payload = envelope(name, data)
        limit = self.node.settings.limits.max_publication_bytes
        if len(payload) > limit:
            raise RequestRefused(
                413, f"The event is {len(payload)} bytes; limits.max_publication_bytes is {limit}"
            )
        return Trigger(channels, payload, ClientInfo(socket_id, "") if socket_id else None,
                       attributes)  # fmt: skip

    async def publish(self, trigger: Trigger) -> dict[str, dict[str, int]]:
        """Publish a checked event to each of its channels, in order; the
        attributes asked for, by Pusher channel."""
        for _, channel in trigger.channels:
            await self.node.publish(channel, trigger.data, info=trigger.info)
        out: dict[str, dict[str, int]] = {}
        if trigger.attributes:
            for name, channel in trigger.channels:
                out[name] = await self.attributes(name, channel, trigger.attributes)
        return out

    async def attributes(
        self, name: str, channel: Channel, wanted: frozenset[str]
    ) -> dict[str, int]:
        """``user_count`` (presence channels only) and ``subscription_count``
        of a channel. Every channel of an app's namespace keeps presence, so
        both are counted across the cluster from its presence members (and
        never below this node's own subscribers)."""
        out: dict[str, int] = {}
        if not wanted:
            return out
        members = await self.node.broker.presence(channel.name)
        if "user_count" in wanted and name.startswith(PRESENCE_PREFIX):
            out["user_count"] = len({m.user for m in members.values() if m.user})
        if "subscription_count" in wanted:
            out["subscription_count"] = max(len(members), self.node.hub.subscribers(channel.name))
        return out


class NotFoundHandler(PusherApiHandler):
    def prepare(self) -> None:
        self.refuse(404, "Not found")


class EventsHandler(PusherApiHandler):
    """``POST /apps/<app_id>/events``: one event to one or many channels."""

    async def post(self, app_id: str) -> None:
        await self.serve(app_id, "pusher.events", self._act)

    async def _act(self, app: PusherApp) -> dict[str, Any]:
        body = self.json_body()
        if ("channel" in body) == ("channels" in body):
            raise RequestRefused(400, "Give either 'channel' or 'channels'")
        if "channel" in body:
            names: list[object] = [body["channel"]]
        else:
            names = body["channels"]
            if not isinstance(names, list) or not names:
                raise RequestRefused(400, "'channels' must be a non-empty list")
            if len(names) > MAX_TRIGGER_CHANNELS:
                raise RequestRefused(
                    400,
                    f"{len(names)} channels; at most {MAX_TRIGGER_CHANNELS} per event",
                )
        trigger = self.trigger(app, body, names)
        attributes = await self.publish(trigger)
        return {"channels": attributes} if trigger.attributes else {}


class BatchEventsHandler(PusherApiHandler):
    """``POST /apps/<app_id>/batch_events``: up to ``MAX_BATCH_EVENTS``
    events, each to one channel, published in order."""

    async def post(self, app_id: str) -> None:
        await self.serve(app_id, "pusher.batch_events", self._act)

    async def _act(self, app: PusherApp) -> dict[str, Any]:
        batch = self.json_body().get("batch")
        if not isinstance(batch, list) or not batch:
            raise RequestRefused(400, "'batch' must be a non-empty list of events")
        if len(batch) > MAX_BATCH_EVENTS:
            raise RequestRefused(
                400, f"Batch too large: {len(batch)} events; at most {MAX_BATCH_EVENTS}"
            )
        triggers: list[Trigger] = []
        for index, event in enumerate(batch):
            if not isinstance(event, dict):
                raise RequestRefused(400, f"batch[{index}] must be an object")
            if "channel" not in event:
                raise RequestRefused(400, f"batch[{index}] has no 'channel'")
            try:
                triggers.append(self.trigger(app, event, [event["channel"]]))
            except RequestRefused as exc:
                raise RequestRefused(exc.status, f"batch[{index}]: {exc.message}") from None
        results = [await self.publish(trigger) for trigger in triggers]
        if not any(trigger.attributes for trigger in triggers):
            return {}
        return {"batch": [next(iter(r.values()), {}) for r in results]}


class ChannelsHandler(PusherApiHandler):
    """``GET /apps/<app_id>/channels``: the app's occupied channels, as this
    node sees them."""

    async def get(self, app_id: str) -> None:
        await self.serve(app_id, "pusher.channels", self._act)

    async def _act(self, app: PusherApp) -> dict[str, Any]:
        prefix = self.query("filter_by_prefix") or ""
        wanted = _attributes(self.query("info"), CHANNELS_INFO)
        if "user_count" in wanted and not prefix.startswith(PRESENCE_PREFIX):
            raise RequestRefused(
                400, "info=user_count needs filter_by_prefix=presence- (presence channels only)"
            )
        start = app.namespace + ":"
        channels: dict[str, dict[str, int]] = {}
        for squall_name, count in sorted(self.node.hub.channel_counts().items()):
            if count <= 0 or not squall_name.startswith(start):
                continue
            name = pusher_channel(app, squall_name)
            if not name.startswith(prefix) or not valid_channel(name) or name[0] == "#":
                continue
            channels[name] = await self.attributes(
                name, self.node.channels.resolve(squall_name), wanted
            )
        return {"channels": channels}


class ChannelHandler(PusherApiHandler):
    """``GET /apps/<app_id>/channels/<name>``: whether it is occupied, and
    the attributes asked for."""

    async def get(self, app_id: str, name: str) -> None:
        await self.serve(app_id, "pusher.channel", lambda app: self._act(app, name))

    async def _act(self, app: PusherApp, name: str) -> dict[str, Any]:
        channel = self.channel(app, name)
        wanted = _attributes(self.query("info"), CHANNEL_INFO)
        if "user_count" in wanted and not name.startswith(PRESENCE_PREFIX):
            raise RequestRefused(400, "info=user_count is for presence channels only")
        counted = await self.attributes(name, channel, wanted | {"subscription_count"})
        out: dict[str, Any] = {"occupied": counted["subscription_count"] > 0}
        out.update({k: v for k, v in counted.items() if k in wanted})
        return out


class UsersHandler(PusherApiHandler):
    """``GET /apps/<app_id>/channels/<name>/users``: a presence channel's
    users, each once."""

    async def get(self, app_id: str, name: str) -> None:
        await self.serve(app_id, "pusher.users", lambda app: self._act(app, name))

    async def _act(self, app: PusherApp, name: str) -> dict[str, Any]:
        channel = self.channel(app, name)
        if not name.startswith(PRESENCE_PREFIX):
            raise RequestRefused(400, "Users are listed for presence channels only")
        members = await self.node.broker.presence(channel.name)
        users = dict.fromkeys(m.user for m in members.values() if m.user)
        return {"users": [{"id": user} for user in users]}


class TerminateHandler(PusherApiHandler):
    """``POST /apps/<app_id>/users/<user_id>/terminate_connections``: close
    every connection of the user, on every node."""

    async def post(self, app_id: str, user_id: str) -> None:
        await self.serve(app_id, "pusher.terminate", lambda app: self._act(app, user_id))

    async def _act(self, app: PusherApp, user_id: str) -> dict[str, Any]:
        if not USER_ID_RE.fullmatch(user_id):
            raise RequestRefused(400, f"Invalid user id {user_id!r}")
        await self.node.disconnect_user(user_id)
        return {}


class TerminateByKeyHandler(TerminateHandler):
    async def post(self, user_id: str) -> None:  # type: ignore[override]
        await self.serve(None, "pusher.terminate", lambda app: self._act(app, user_id))
