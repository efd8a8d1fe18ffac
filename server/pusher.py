"""What the Pusher Channels protocol shares between its WebSocket codec
(``server.codecs.pusher``), its HTTP API and its webhooks: the apps, how a
Pusher channel maps to a Squall channel, how an event is carried in a
publication, and the signatures (``docs/pusher.md``).

A Pusher channel ``private-room`` of an app whose namespace is
``pusher-app1`` is the Squall channel ``pusher-app1:private-room``: the same
channel on every protocol Squall speaks.

An event travels as a publication whose data is the envelope
``{"event": <name>, "data": <the event's data, a string as Pusher carries
it>}``; a publication made otherwise (by Squall's own API or clients) reaches
Pusher clients as the event ``message`` with the publication's data as JSON
text. Client events (``client-*``) carry the sender's socket id, so the
sender does not get its own event back, and on presence channels its
``user_id``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Any

import orjson

from server.config import PusherApp, Settings

# Pusher's own rule for channel names (a subset of Squall's).
CHANNEL_RE = re.compile(r"[A-Za-z0-9_\-=@,.;]{1,200}")
# What a Squall publication that is no Pusher envelope is called for Pusher.
DEFAULT_EVENT = "message"
PROTOCOL_VERSION = 7


class PusherApps:
    """The configured apps, by key (the WebSocket path) and by id (the HTTP
    API path), and by namespace (a publication's channel)."""

    __slots__ = ("by_id", "by_key", "by_namespace")

    def __init__(self, settings: Settings) -> None:
        apps = settings.pusher.apps
        self.by_key: dict[str, PusherApp] = {app.key: app for app in apps}
        self.by_id: dict[str, PusherApp] = {app.id: app for app in apps}
        self.by_namespace: dict[str, PusherApp] = {app.namespace: app for app in apps}

    def __bool__(self) -> bool:
        return bool(self.by_key)


def squall_channel(app: PusherApp, channel: str) -> str:
    """The Squall channel of the app's Pusher ``channel``."""
    return f"{app.namespace}:{channel}"


def pusher_channel(app: PusherApp, channel: str) -> str:
    """The Pusher channel of a Squall channel in the app's namespace."""
    return channel[len(app.namespace) + 1 :]


USER_CHANNEL_PREFIX = "#server-to-user-"


def valid_channel(name: object) -> bool:
    """A Pusher channel name, or a signed-in user's ``#server-to-user-<id>``."""
    if not isinstance(name, str):
        return False
    if name.startswith(USER_CHANNEL_PREFIX):
        return CHANNEL_RE.fullmatch(name[len(USER_CHANNEL_PREFIX) :]) is not None
    return CHANNEL_RE.fullmatch(name) is not None


def user_auth_valid(app: PusherApp, socket_id: str, auth: object, user_data: str) -> bool:
    """Whether ``auth`` signs a ``pusher:signin``:
    ``<key>:<HMAC(secret, socket_id::user::user_data)>``."""
    if not isinstance(auth, str):
        return False
    key, sep, signature = auth.partition(":")
    if not sep or not hmac.compare_digest(key.encode(), app.key.encode()):
        return False
    expected = sign(app.secret, f"{socket_id}::user::{user_data}")
    return hmac.compare_digest(signature.encode(), expected.encode())


def envelope(event: str, data: str, socket_id: str = "", user_id: str = "") -> bytes:
    """The publication data that carries a Pusher event."""
    out: dict[str, Any] = {"event": event, "data": data}
    if socket_id:
        out["socket_id"] = socket_id
    if user_id:
        out["user_id"] = user_id
    return orjson.dumps(out)


@dataclass(slots=True, frozen=True)
class Event:
    name: str
    data: str
    # The client that sent a client event (it does not get it back).
    socket_id: str = ""
    user_id: str = ""


def event_of(data: bytes) -> Event:
    """The Pusher event a publication's data carries: its envelope, or the
    data itself as the ``message`` event."""
    if data[:1] == b"{" and b'"event"' in data:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("event"), str) and "data" in obj:
            inner = obj["data"]
            text = inner if isinstance(inner, str) else orjson.dumps(inner).decode()
            socket_id = obj.get("socket_id")
            user_id = obj.get("user_id")
            return Event(
                obj["event"],
                text,
                socket_id if isinstance(socket_id, str) else "",
                user_id if isinstance(user_id, str) else "",
            )
    return Event(DEFAULT_EVENT, data.decode())


def sign(secret: str, message: str) -> str:
    """HMAC-SHA256 of ``message`` with the app's secret, in hex."""
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


def channel_auth_valid(
    app: PusherApp, socket_id: str, channel: str, auth: object, channel_data: str | None
) -> bool:
    """Whether ``auth`` is the app's signature for this socket and channel:
    ``<key>:<HMAC(secret, socket_id:channel[:channel_data])>``, compared in
    constant time."""
    if not isinstance(auth, str):
        return False
    key, sep, signature = auth.partition(":")
    if not sep or not hmac.compare_digest(key.encode(), app.key.encode()):
        return False
    message = f"{socket_id}:{channel}"
    if channel_data is not None:
        message += f":{channel_data}"
    return hmac.compare_digest(signature.encode(), sign(app.secret, message).encode())


# ---- the HTTP API's request signatures -------------------------------------

# How far a request's auth_timestamp may be from the server's clock.
AUTH_TIMESTAMP_WINDOW = 600
AUTH_VERSION = "1.0"


class RequestRefused(Exception):
    """A request to the HTTP API that is refused before it acts: its HTTP
    status and a plain-text explanation (which never holds a secret or a
    signature)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def string_to_sign(method: str, path: str, params: dict[str, str]) -> str:
    """What an HTTP API request's ``auth_signature`` signs: the method, the
    path and every query parameter but the signature, keys lower-cased and
    sorted, values as sent (not URL-escaped), joined ``k=v`` with ``&``."""
    query = "&".join(
        f"{key}={value}" for key, value in sorted(params.items()) if key != "auth_signature"
    )
    return f"{method.upper()}\n{path}\n{query}"


def request_params(arguments: dict[str, list[bytes]]) -> dict[str, str]:
    """A request's query parameters, keys lower-cased; a parameter given twice
    (or twice up to case) or that is not UTF-8 is a bad request."""
    params: dict[str, str] = {}
    for raw_key, values in arguments.items():
        key = raw_key.lower()
        if len(values) != 1 or key in params:
            raise RequestRefused(400, f"Query parameter {key!r} is given more than once")
        try:
            params[key] = values[0].decode()
        except UnicodeDecodeError:
            raise RequestRefused(400, f"Query parameter {key!r} is not UTF-8") from None
    return params


def body_md5(body: bytes) -> str:
    """The hex MD5 of a request body, as ``body_md5`` carries it (a check of
    the body's integrity under the signature, not a secret)."""
    return hashlib.md5(body, usedforsecurity=False).hexdigest()


def verify_request(
    app: PusherApp, method: str, path: str, params: dict[str, str], body: bytes, now: float
) -> None:
    """Raise ``RequestRefused`` (401) unless the request carries the app's
    valid signature: ``auth_key``, an ``auth_timestamp`` within
    ``AUTH_TIMESTAMP_WINDOW`` seconds of ``now``, ``auth_version`` 1.0, the
    body's ``body_md5`` (required with a body) and ``auth_signature``, the
    hex HMAC-SHA256 of ``string_to_sign`` with the app's secret, compared in
    constant time."""
    for name in ("auth_key", "auth_timestamp", "auth_signature"):
        if not params.get(name):
            raise RequestRefused(401, f"Missing {name}")
    if not hmac.compare_digest(params["auth_key"].encode(), app.key.encode()):
        raise RequestRefused(401, "Unknown auth_key")
    version = params.get("auth_version", AUTH_VERSION)
    if version != AUTH_VERSION:
        raise RequestRefused(401, f"Unsupported auth_version {version!r}: expected 1.0")
    stamp = params["auth_timestamp"]
    if not stamp.isascii() or not stamp.isdigit():
        raise RequestRefused(401, "auth_timestamp must be whole seconds since the epoch")
    if abs(now - int(stamp)) > AUTH_TIMESTAMP_WINDOW:
        raise RequestRefused(
            401,
            f"Timestamp expired: given timestamp ({stamp}) not within "
            f"{AUTH_TIMESTAMP_WINDOW}s of server time ({int(now)})",
        )
    md5 = params.get("body_md5")
    if md5 is None:
        if body:
            raise RequestRefused(401, "Missing body_md5: a request with a body must sign it")
    elif not hmac.compare_digest(md5.lower().encode(), body_md5(body).encode()):
        raise RequestRefused(401, "body_md5 does not match the body")
    expected = sign(app.secret, string_to_sign(method, path, params))
    if not hmac.compare_digest(params["auth_signature"].lower().encode(), expected.encode()):
        raise RequestRefused(
            401,
            "Invalid signature: expected HMAC-SHA256 hex of the app secret over "
            + repr(string_to_sign(method, path, params)),
        )
