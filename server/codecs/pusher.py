"""The Pusher Channels protocol (version 7), one codec per app: what lets
pusher-js, Laravel Echo and the Pusher mobile SDKs talk to Squall
unchanged. ``docs/pusher.md`` says what is supported and where Squall
differs; ``server/pusher.py`` holds what the HTTP API shares.

The wire, in short (every message a JSON object, one a frame):

- The server speaks first: ``pusher:connection_established`` with the
  socket id and the activity timeout (the ``data`` of server messages is a
  JSON *string*). Here that is the reply to a connect the codec makes up
  when the connection opens (an empty frame decodes to it).
- ``pusher:subscribe`` with ``channel``, and for ``private-`` and
  ``presence-`` channels ``auth`` (``<key>:<HMAC-SHA256(secret,
  socket_id:channel[:channel_data])>``) and, for presence, ``channel_data``
  (``{"user_id", "user_info"}``); answered by
  ``pusher_internal:subscription_succeeded`` (with the members on presence
  channels) or ``pusher:subscription_error``. ``pusher:unsubscribe`` has no
  answer.
- Events: ``{"event", "channel", "data"}``; ``pusher_internal:member_added``
  / ``member_removed`` on presence channels; client events (``client-*``)
  from subscribers of private and presence channels, never echoed to their
  sender.
- ``pusher:ping`` / ``pusher:pong`` both ways; ``pusher:error`` with codes
  4000-4299 and the same WebSocket close codes: 4000-4099 the client stays
  away, 4100-4199 it reconnects after a while, 4200-4299 at once.
"""

from __future__ import annotations

import secrets
from typing import Any

import orjson

from server import errors
from server.codec import (
    ChannelGrant,
    Command,
    ConnectResult,
    InvalidCommand,
    ProtocolViolation,
    Result,
    SubscribeResult,
)
from server.config import PusherApp
from server.errors import Disconnect, SquallError
from server.models import ClientInfo, Publication
from server.pusher import (
    USER_CHANNEL_PREFIX,
    channel_auth_valid,
    envelope,
    event_of,
    pusher_channel,
    squall_channel,
    user_auth_valid,
    valid_channel,
)

MAX_EVENT_NAME = 200

# Close codes (and pusher:error codes).
APP_NOT_FOUND = Disconnect(4001, "App key not in this cluster")
OVER_QUOTA = Disconnect(4004, "Application is over connection quota")
UNAUTHORIZED = Disconnect(4009, "Connection is unauthorized")
OVER_CAPACITY = Disconnect(4100, "Over capacity")
RECONNECT = Disconnect(4200, "Generic reconnect immediately")
PONG_TIMEOUT = Disconnect(4201, "Pong reply not received")
BAD_MESSAGE = Disconnect(4009, "Message is not a Pusher protocol message")


def _message(event: str, data: Any, channel: str | None = None) -> bytes:
    """A server message: ``data`` is sent as a JSON string, as Pusher does."""
    text = data if isinstance(data, str) else orjson.dumps(data).decode()
    out: dict[str, Any] = {"event": event}
    if channel is not None:
        out["channel"] = channel
    out["data"] = text
    return orjson.dumps(out)


class PusherCodec:
    """The protocol for one app: its channels are the Squall channels of the
    app's namespace (``private-x`` is ``<namespace>:private-x``)."""

    name = "pusher"
    binary = False
    methods = frozenset({"connect", "subscribe", "unsubscribe", "publish", "ping", "signin"})
    subs_in_connect = False
    close_on_connect_error = True
    join_self = False
    expiry_grace = 0.0
    # The server connects the client itself when the socket opens.
    connect_on_open = True
    # A client event goes to every subscriber but its sender.
    skip_publisher = True
    # A presence subscription's answer lists the channel's members.
    presence_on_subscribe = True
    # pusher-js reads one JSON message a frame.
    frame_per_message = True
    # member_added for a user's first connection, member_removed for its last.
    joins_per_user = True
    ping: bytes | None = b'{"event":"pusher:ping","data":"{}"}'
    pong: bytes | None = b'{"event":"pusher:pong","data":{}}'

    def __init__(self, app: PusherApp | None, activity_timeout: int = 120) -> None:
        # None: the key named no app; every connection is refused (4001).
        self.app = app
        self.activity_timeout = activity_timeout
        self.max_connections = app.max_connections if app is not None else 0
        self._prefix = f"{app.namespace}:" if app is not None else ""

    def __repr__(self) -> str:
        return f"PusherCodec({self.app.id if self.app else None!r})"

    def client_id(self) -> str:
        """Pusher socket ids are two numbers joined by a dot (the server
        SDKs check the form)."""
        return f"{secrets.randbelow(10**9) + 1}.{secrets.randbelow(10**9) + 1}"

    # ---- in -----------------------------------------------------------------

    def decode(self, frame: bytes) -> list[Command | InvalidCommand]:
        if not frame:
            # The opening of the connection (the transport's, not a client's:
            # an empty frame from a client connects again and is refused).
            if self.app is None:
                refused = errors.Unauthorized("App key not in this cluster")
                return [InvalidCommand(0, refused, "connect")]
            return [Command(0, "connect", {})]
        try:
            msg = orjson.loads(frame)
        except orjson.JSONDecodeError:
            raise ProtocolViolation("a Pusher message must be a JSON object") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("event"), str):
            raise ProtocolViolation("a Pusher message needs an 'event'")
        event: str = msg["event"]
        data = msg.get("data")
        if isinstance(data, str) and event.startswith("pusher:"):
            # Some clients send the data of protocol events as a JSON string.
            try:
                data = orjson.loads(data)
            except orjson.JSONDecodeError:
                pass
        if event == "pusher:ping":
            return [Command(0, "ping", {})]
        if event == "pusher:pong":
            return []
        if event == "pusher:subscribe":
            return [self._subscribe(data)]
        if event == "pusher:signin":
            if not isinstance(data, dict) or not isinstance(data.get("user_data"), str):
                return [InvalidCommand(0, errors.BadRequest("signin needs user_data"), "signin")]
            params = {"pusher_auth": data.get("auth"), "pusher_user_data": data["user_data"]}
            return [Command(0, "signin", params)]
        if event == "pusher:unsubscribe":
            channel = data.get("channel") if isinstance(data, dict) else None
            if not isinstance(channel, str) or not valid_channel(channel):
                return [InvalidCommand(0, errors.BadRequest("bad channel name"), "unsubscribe")]
            return [Command(0, "unsubscribe", {"channel": self._prefix + channel})]
        if event.startswith("client-"):
            return [self._client_event(event, msg.get("channel"), msg.get("data"))]
        return [InvalidCommand(0, errors.MethodNotFound(f"unknown event {event!r}"))]

    def _subscribe(self, data: object) -> Command | InvalidCommand:
        if not isinstance(data, dict):
            return InvalidCommand(0, errors.BadRequest("subscribe needs data"), "subscribe")
        channel = data.get("channel")
        if not valid_channel(channel):
            return InvalidCommand(0, errors.BadRequest("bad channel name"), "subscribe")
        assert isinstance(channel, str)
        params: dict[str, Any] = {"channel": self._prefix + channel, "pusher_channel": channel}
        for name in ("auth", "channel_data"):
            if name in data:
                params["pusher_" + name] = data[name]
        return Command(0, "subscribe", params)

    def _client_event(self, event: str, channel: object, data: object) -> Command | InvalidCommand:
        if not valid_channel(channel) or len(event) > MAX_EVENT_NAME:
            return InvalidCommand(0, errors.BadRequest("bad channel or event name"), "publish")
        assert isinstance(channel, str)
        text = data if isinstance(data, str) else orjson.dumps(data).decode()
        return Command(
            0,
            "publish",
            {
                "channel": self._prefix + channel,
                "pusher_channel": channel,
                "pusher_event": event,
                "pusher_data": text,
            },
        )

    # ---- authorization -------------------------------------------------------

    def authorize(
        self, method: str, client_id: str, channel: str, params: dict[str, Any]
    ) -> ChannelGrant | None:
        """Authorize a subscription or a client event by the app's rules
        (raises ``SquallError`` to refuse), or None where the namespace's own
        rules apply (another protocol's command)."""
        app = self.app
        if app is not None and method == "signin":
            return self._authorize_signin(app, client_id, params)
        name = params.get("pusher_channel")
        if app is None or not isinstance(name, str):
            return None
        if name.startswith(USER_CHANNEL_PREFIX):
            # The server subscribes a signed-in user to its own channel.
            raise errors.PermissionDenied("a user channel comes with signin")
        if method == "subscribe":
            return self._authorize_subscribe(app, client_id, name, params)
        if method == "publish":
            if not app.enable_client_messages:
                raise errors.PermissionDenied("client events are not enabled for this app")
            if not name.startswith(("private-", "presence-")):
                raise errors.PermissionDenied("client events only on private and presence channels")
            if name.startswith("private-encrypted-"):
                # The server could not encrypt them for the others: as Pusher.
                raise errors.PermissionDenied("no client events on encrypted channels")
            size = len(str(params.get("pusher_data", "")).encode())
            if size > app.max_event_bytes:
                raise errors.MessageTooLarge(
                    f"event data is {size} bytes; the limit is {app.max_event_bytes}"
                )
            return ChannelGrant()
        return None

    def _authorize_signin(
        self, app: PusherApp, client_id: str, params: dict[str, Any]
    ) -> ChannelGrant:
        user_data = str(params.get("pusher_user_data", ""))
        if not user_auth_valid(app, client_id, params.get("pusher_auth"), user_data):
            raise errors.Unauthorized("Invalid signature for signin")
        try:
            user = orjson.loads(user_data)
        except orjson.JSONDecodeError:
            raise errors.BadRequest("user_data is not JSON") from None
        user_id = user.get("id") if isinstance(user, dict) else None
        if not isinstance(user_id, str) or not user_id or not valid_channel(user_id):
            raise errors.BadRequest("user_data needs an id (a string of channel-name characters)")
        info = ClientInfo(client_id, user_id, user.get("user_info"))
        return ChannelGrant(info, [self._prefix + USER_CHANNEL_PREFIX + user_id])

    def _authorize_subscribe(
        self, app: PusherApp, client_id: str, name: str, params: dict[str, Any]
    ) -> ChannelGrant:
        if name.startswith("presence-"):
            channel_data = params.get("pusher_channel_data")
            if not isinstance(channel_data, str):
                raise errors.BadSubscriptionToken("presence channels need channel_data")
            if not channel_auth_valid(
                app, client_id, name, params.get("pusher_auth"), channel_data
            ):
                raise errors.BadSubscriptionToken(f"Invalid signature for {name}")
            try:
                member = orjson.loads(channel_data)
            except orjson.JSONDecodeError:
                raise errors.BadRequest("channel_data is not JSON") from None
            user_id = member.get("user_id") if isinstance(member, dict) else None
            if isinstance(user_id, int) and not isinstance(user_id, bool):
                user_id = str(user_id)
            if not isinstance(user_id, str) or not user_id:
                raise errors.BadRequest("channel_data needs a user_id")
            return ChannelGrant(ClientInfo(client_id, user_id, member.get("user_info")))
        if name.startswith("private-"):
            if not channel_auth_valid(app, client_id, name, params.get("pusher_auth"), None):
                raise errors.BadSubscriptionToken(f"Invalid signature for {name}")
        return ChannelGrant()

    def publication(self, params: dict[str, Any], publisher: ClientInfo) -> bytes | None:
        """A client event's publication data: the envelope with the sender
        (and its user on presence channels); None: not a client event."""
        event = params.get("pusher_event")
        if not isinstance(event, str):
            return None
        name = params.get("pusher_channel", "")
        user = publisher.user if str(name).startswith("presence-") else ""
        return envelope(event, str(params.get("pusher_data", "")), publisher.client, user)

    # ---- out ----------------------------------------------------------------

    def reply(self, command: Command, result: Result) -> bytes:
        if isinstance(result, ConnectResult):
            return _message(
                "pusher:connection_established",
                {"socket_id": result.client, "activity_timeout": self.activity_timeout},
            )
        if isinstance(result, SubscribeResult):
            channel = str(command.params.get("pusher_channel", ""))
            data: Any = {}
            if result.presence is not None and channel.startswith("presence-"):
                members: dict[str, Any] = {}
                for info in result.presence.values():
                    members[info.user] = info.info
                data = {"presence": {"ids": list(members), "hash": members, "count": len(members)}}
            return _message("pusher_internal:subscription_succeeded", data, channel)
        if command.method == "ping":
            return b'{"event":"pusher:pong","data":"{}"}'
        if command.method == "signin":
            return _message(
                "pusher:signin_success", {"user_data": command.params["pusher_user_data"]}
            )
        return b""  # unsubscribe and client events have no answer

    def error(self, command: Command | InvalidCommand, exc: SquallError) -> bytes | Disconnect:
        method = command.method
        if method == "connect":
            if self.app is None:
                return APP_NOT_FOUND
            if isinstance(exc, errors.LimitExceeded):
                return OVER_QUOTA
            if isinstance(exc, errors.Unavailable) or exc.code in (100, 114):
                return OVER_CAPACITY  # temporary: the SDKs come back after a while
            # (Refused, by the connect hook say: the SDKs stay away.)
            return Disconnect(UNAUTHORIZED.code, exc.message[:120] or UNAUTHORIZED.reason)
        if method == "subscribe" and isinstance(command, Command):
            channel = str(command.params.get("pusher_channel", ""))
            status = 401 if exc.code in (101, 103, 109) else 400
            if isinstance(exc, errors.AlreadySubscribed):
                if channel.startswith(USER_CHANNEL_PREFIX):
                    # pusher-js subscribes to the user channel signin made.
                    return _message("pusher_internal:subscription_succeeded", {}, channel)
                return b""  # Pusher ignores a repeated subscribe
            return orjson.dumps(
                {
                    "event": "pusher:subscription_error",
                    "channel": channel,
                    "data": {"type": "AuthError", "error": exc.message, "status": status},
                }
            )
        if method == "unsubscribe":
            return b""  # nothing to say: it is not subscribed
        if method == "signin":
            return _message("pusher:signin_error", {"error": exc.message})
        code = 4301 if isinstance(exc, errors.TooManyRequests) else None
        return orjson.dumps(
            {"event": "pusher:error", "data": {"code": code, "message": exc.message}}
        )

    def pub(self, pub: Publication) -> bytes:
        event = event_of(pub.data)
        out: dict[str, Any] = {
            "event": event.name,
            "channel": pub.channel[len(self._prefix) :],
            "data": event.data,
        }
        if event.user_id:
            out["user_id"] = event.user_id
        return orjson.dumps(out)

    def join(self, channel: str, info: ClientInfo) -> bytes:
        if not channel.startswith("presence-", len(self._prefix)):
            return b""  # members are told of on presence channels only
        return _message(
            "pusher_internal:member_added",
            {"user_id": info.user, "user_info": info.info},
            channel[len(self._prefix) :],
        )

    def leave(self, channel: str, info: ClientInfo) -> bytes:
        if not channel.startswith("presence-", len(self._prefix)):
            return b""
        return _message(
            "pusher_internal:member_removed", {"user_id": info.user}, channel[len(self._prefix) :]
        )

    def unsubscribe(self, channel: str, code: int, reason: str) -> bytes:
        # Pusher has no server-side unsubscribe: the client hears why, as an
        # error on the channel, and its subscription is gone.
        return orjson.dumps(
            {
                "event": "pusher:subscription_error",
                "channel": channel[len(self._prefix) :],
                "data": {"type": "Unsubscribed", "error": reason, "status": code},
            }
        )

    def subscribed(self, channel: str, result: SubscribeResult) -> bytes:
        return _message("pusher_internal:subscription_succeeded", {}, channel[len(self._prefix) :])

    def violation(self) -> Disconnect:
        return BAD_MESSAGE

    def close(self, disconnect: Disconnect) -> tuple[int, str]:
        if 4000 <= disconnect.code < 4400:
            return disconnect.code, disconnect.reason
        if disconnect.code == errors.NO_PONG.code:
            return PONG_TIMEOUT.code, PONG_TIMEOUT.reason
        if disconnect.reconnect:
            return RECONNECT.code, disconnect.reason
        return 4009, disconnect.reason

    def join_frame(self, items: list[bytes]) -> bytes:
        # One message a frame: the transport writes a frame per message.
        return items[0] if len(items) == 1 else b"\n".join(items)

    def squall_channel(self, channel: str) -> str:
        assert self.app is not None
        return squall_channel(self.app, channel)

    def pusher_channel(self, channel: str) -> str:
        assert self.app is not None
        return pusher_channel(self.app, channel)
