"""The Centrifugo client protocol v2, in JSON and in Protobuf: what lets the
stock Centrifugo SDKs (centrifuge-js, -java, -swift, -dart, -python, -go)
talk to Squall unchanged. ``docs/protocol.md`` ("Centrifugo-compatible
endpoint") says what is supported and where Squall differs.

The wire, in short:

- A client sends ``Command``s: ``{"id": 1, "subscribe": {"channel": "x"}}``
  (one request field, named for the method); the server answers with a
  ``Reply`` of the same id carrying the result under the same name, or an
  ``error``. Pushes are replies without an id:
  ``{"push": {"channel": "x", "pub": {...}}}``.
- JSON frames hold several commands or replies separated by ``\\n``;
  Protobuf frames hold several, each prefixed with its length as a varint.
- The server pings with an empty reply (``{}``; a zero-length Protobuf
  message) and the client answers with an empty command.
- ``bytes`` fields (publication data, connection info) are raw JSON in the
  JSON protocol, and bytes in Protobuf. Squall keeps every channel's data as
  JSON, whatever protocol published it, so a Protobuf client's ``data`` must
  be JSON text.
- Errors keep Centrifugo's codes and messages (Squall's own codes mostly
  match; the rest are mapped below); disconnects are WebSocket close codes,
  3000-3499 to reconnect, 3500-3999 to stay away.
"""

from __future__ import annotations

from typing import Any

import orjson
from google.protobuf.message import DecodeError

from server import errors
from server.codec import (
    CodecDefaults,
    Command,
    ConnectResult,
    Empty,
    HistoryPage,
    InvalidCommand,
    PresenceResult,
    PresenceStatsResult,
    ProtocolViolation,
    PublishResult,
    RefreshResult,
    Result,
    SubRefreshResult,
    SubscribeResult,
)
from server.codecs import centrifuge_pb2
from server.errors import Disconnect, SquallError
from server.models import ClientInfo, Publication

# The generated module's classes are made at import time: untyped.
pb: Any = centrifuge_pb2

MAX_COMMANDS = 100
MAX_ID = 2**32 - 1  # uint32 on the wire

# The request fields of a command, in the order the reference server checks
# them, and the core method each maps to.
REQUESTS = (
    "connect",
    "subscribe",
    "unsubscribe",
    "publish",
    "presence",
    "presence_stats",
    "history",
    "ping",
    "send",
    "rpc",
    "refresh",
    "sub_refresh",
)
# Each request field is the core method of the same name; ``send`` has no
# reply and no handler here (the decoder drops it).
METHODS = frozenset(REQUESTS) - {"send"}

# Centrifugo's error messages, by code: the SDKs show them as they are.
MESSAGES = {
    100: "internal server error",
    101: "unauthorized",
    102: "unknown channel",
    103: "permission denied",
    104: "method not found",
    105: "already subscribed",
    106: "limit exceeded",
    107: "bad request",
    108: "not available",
    109: "token expired",
    110: "expired",
    111: "too many requests",
    112: "unrecoverable position",
}
TEMPORARY = frozenset({100, 111})
# Squall errors without a Centrifugo code of their own.
ERROR_CODES = {
    errors.NotSubscribed.code: errors.PermissionDenied.code,  # as Centrifugo refuses
    errors.Unavailable.code: errors.InternalError.code,  # temporary: the SDK retries
    errors.MessageTooLarge.code: errors.LimitExceeded.code,
}
# Squall errors that Centrifugo answers by closing the connection.
CLOSING_ERRORS = frozenset({errors.NotConnected.code, errors.MethodNotFound.code})
# Disconnect reasons as Centrifugo words them (the codes are the same).
REASONS = {
    errors.EXPIRED.code: "expired",
    errors.CONNECT_TIMEOUT.code: "stale",
}


def _uvarint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field (``tag`` already holds the wire type)."""
    return bytes((tag,)) + _uvarint(len(payload)) + payload


class _Centrifuge(CodecDefaults):
    """What the JSON and Protobuf forms share: methods, errors, closes."""

    name = "centrifuge"
    binary = False
    methods: frozenset[str] = METHODS
    subs_in_connect = True
    # A refused connect is answered, and the connection stays open: the SDK
    # decides (a new token, a backoff) and closes it itself.
    close_on_connect_error = False
    # Centrifugo tells a subscriber of its own join (after the reply).
    join_self = True
    pong: bytes | None = None
    # The SDKs refresh a token when its ttl runs out; like Centrifugo, the
    # connection closes (3005) only if no refresh came 25 s after that.
    expiry_grace = 25.0
    ping: bytes | None = None

    def violation(self) -> Disconnect:
        return errors.BAD_REQUEST

    def close(self, disconnect: Disconnect) -> tuple[int, str]:
        return disconnect.code, REASONS.get(disconnect.code, disconnect.reason)

    @staticmethod
    def _error_code(command: Command | InvalidCommand, exc: SquallError) -> int | Disconnect:
        """Centrifugo's code for ``exc``, or the close it answers with."""
        code = exc.code
        if code in CLOSING_ERRORS:
            return errors.BAD_REQUEST
        if isinstance(exc, errors.BadSubscriptionToken):
            # Expired: the SDK asks its app for a new token and tries again.
            return errors.TokenExpired.code if exc.expired else errors.INVALID_TOKEN
        if command.method == "connect":
            if code == errors.Unauthorized.code:
                no_token = isinstance(command, Command) and not command.params.get("token")
                return errors.BAD_REQUEST if no_token else errors.INVALID_TOKEN
            if code == errors.BadRequest.code:
                return errors.BAD_REQUEST
        return ERROR_CODES.get(code, code)


# ---- JSON -----------------------------------------------------------------


def _info_json(info: ClientInfo) -> dict[str, Any]:
    out: dict[str, Any] = {"user": info.user, "client": info.client}
    if info.info is not None:
        out["conn_info"] = info.info
    return out


def _pub_json(pub: Publication) -> dict[str, Any]:
    out: dict[str, Any] = {"data": orjson.Fragment(pub.data)}
    if pub.info is not None:
        out["info"] = _info_json(pub.info)
    if pub.offset:
        out["offset"] = pub.offset
    if pub.offset == 1:
        # A stream's first publication names its epoch: a client that
        # subscribed before the stream existed learns it here.
        out["epoch"] = pub.epoch
    return out


def _subscribe_json(result: SubscribeResult) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if result.ttl is not None:
        out["expires"] = True
        out["ttl"] = result.ttl
    if result.recoverable:
        out["recoverable"] = True
        out["epoch"] = result.epoch
        # Recovered: the position recovered from; the publications move
        # the client on from there.
        offset = result.recovered_from if result.recovered else result.offset
        if offset:
            out["offset"] = offset
        out["positioned"] = True
    if result.recovering:
        out["was_recovering"] = True
        if result.recovered:
            out["recovered"] = True
        if result.publications:
            out["publications"] = [_pub_json(p) for p in result.publications]
    return out


def _result_json(result: Result) -> dict[str, Any]:
    if isinstance(result, Empty):
        return {}
    if isinstance(result, SubscribeResult):
        return _subscribe_json(result)
    if isinstance(result, PublishResult):
        return {}
    if isinstance(result, HistoryPage):
        out: dict[str, Any] = {"publications": [_pub_json(p) for p in result.publications]}
        out["epoch"] = result.epoch
        if result.offset:
            out["offset"] = result.offset
        return out
    if isinstance(result, PresenceResult):
        return {"presence": {k: _info_json(v) for k, v in result.members.items()}}
    if isinstance(result, PresenceStatsResult):
        stats: dict[str, Any] = {}
        if result.clients:
            stats["num_clients"] = result.clients
        if result.users:
            stats["num_users"] = result.users
        return stats
    if isinstance(result, (RefreshResult, SubRefreshResult)):
        return {"expires": result.expires, "ttl": result.ttl}
    if isinstance(result, ConnectResult):
        connect: dict[str, Any] = {"client": result.client, "version": result.version}
        if result.expires:
            connect["expires"] = True
            connect["ttl"] = result.ttl or 0
        if result.subs:
            connect["subs"] = {k: _subscribe_json(v) for k, v in result.subs.items()}
        if result.ping:
            connect["ping"] = int(result.ping)
            connect["pong"] = True
        return connect
    raise TypeError(f"no Centrifugo form for {type(result).__name__}")


def _str(request: dict[str, Any], key: str) -> str:
    value = request.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise errors.BadRequest(f"'{key}' must be a string")
    return value


# Requests that name a channel; without one Centrifugo closes the connection.
CHANNEL_REQUESTS = frozenset(
    {"subscribe", "unsubscribe", "publish", "presence", "presence_stats", "history", "sub_refresh"}
)


def _core_params(method: str, request: dict[str, Any]) -> dict[str, Any]:
    """A request's fields in the core's terms. Zero values mean "not set",
    as in the protocol's Protobuf form."""
    if method in CHANNEL_REQUESTS and request.get("channel") in (None, ""):
        raise ProtocolViolation(f"'{method}' needs a channel")
    if method == "connect":
        params: dict[str, Any] = {"token": _str(request, "token") or None}
        subs = request.get("subs")
        if isinstance(subs, dict):
            params["subs"] = {
                ch: _recovery(sub) for ch, sub in subs.items() if isinstance(sub, dict)
            }
        if request.get("data") is not None:
            params["data"] = request["data"]  # for the connect hook
        return params
    if method == "subscribe":
        params = {"channel": request.get("channel"), "token": _str(request, "token") or None}
        params.update(_recovery(request))
        if request.get("data") is not None:
            params["data"] = request["data"]  # for the subscribe hook
        return params
    if method == "history":
        params = {"channel": request.get("channel")}
        limit = request.get("limit", 0)
        if type(limit) is not int:
            raise errors.BadRequest("'limit' must be an integer")
        # Negative: as many as the server gives.
        params["limit"] = 2**31 - 1 if limit < 0 else limit
        if request.get("reverse"):
            params["reverse"] = True
        since = request.get("since")
        if isinstance(since, dict):
            params["since"] = {"offset": since.get("offset", 0), "epoch": _str(since, "epoch")}
        return params
    if method in ("refresh", "sub_refresh"):
        params = {"token": _str(request, "token") or None}
        if method == "sub_refresh":
            params["channel"] = request.get("channel")
        return params
    return request


def _recovery(request: dict[str, Any]) -> dict[str, Any]:
    if not request.get("recover"):
        return {}
    return {
        "recover": True,
        "offset": request.get("offset", 0),
        "epoch": _str(request, "epoch"),
    }


class CentrifugeJSON(_Centrifuge):
    """The JSON form, on ``/connection/centrifuge/websocket``."""

    name = "centrifuge-json"
    binary = False
    ping = b"{}"
    pong = b"{}"

    def decode(self, frame: bytes) -> list[Command | InvalidCommand]:
        lines = [line for line in frame.split(b"\n") if line.strip()]
        if len(lines) > MAX_COMMANDS:
            raise ProtocolViolation(f"more than {MAX_COMMANDS} commands in one frame")
        out: list[Command | InvalidCommand] = []
        for line in lines:
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                raise ProtocolViolation("frame is not valid JSON") from None
            if not isinstance(obj, dict):
                raise ProtocolViolation("a command must be a JSON object")
            command = self._command(obj)
            if command is not None:
                out.append(command)
        return out

    @staticmethod
    def _command(obj: dict[str, Any]) -> Command | InvalidCommand | None:
        cmd_id = obj.get("id", 0)
        if type(cmd_id) is not int or not 0 <= cmd_id <= MAX_ID:
            raise ProtocolViolation("'id' must be an integer from 0 to 2^32-1")
        method = next((key for key in REQUESTS if obj.get(key) is not None), None)
        if cmd_id == 0:
            # No id: the client's pong, or a ``send``: an asynchronous
            # message this server has no handler for. It is dropped and the
            # connection kept (Centrifugo without a handler closes with 3508).
            return None
        if method is None or method == "send":
            raise ProtocolViolation("a command needs exactly one known request")
        request = obj[method]
        if not isinstance(request, dict):
            raise ProtocolViolation(f"'{method}' must be an object")
        try:
            return Command(cmd_id, method, _core_params(method, request))
        except SquallError as exc:
            return InvalidCommand(cmd_id, exc, method)

    def reply(self, command: Command, result: Result) -> bytes:
        return orjson.dumps({"id": command.id, command.method: _result_json(result)})

    def error(self, command: Command | InvalidCommand, exc: SquallError) -> bytes | Disconnect:
        code = self._error_code(command, exc)
        if isinstance(code, Disconnect):
            return code
        error: dict[str, Any] = {"code": code, "message": MESSAGES.get(code, exc.message)}
        if code in TEMPORARY:
            error["temporary"] = True
        return orjson.dumps({"id": command.id, "error": error})

    def pub(self, pub: Publication) -> bytes:
        return orjson.dumps({"push": {"channel": pub.channel, "pub": _pub_json(pub)}})

    def join(self, channel: str, info: ClientInfo) -> bytes:
        return orjson.dumps({"push": {"channel": channel, "join": {"info": _info_json(info)}}})

    def leave(self, channel: str, info: ClientInfo) -> bytes:
        return orjson.dumps({"push": {"channel": channel, "leave": {"info": _info_json(info)}}})

    def unsubscribe(self, channel: str, code: int, reason: str) -> bytes:
        return orjson.dumps(
            {"push": {"channel": channel, "unsubscribe": {"code": code, "reason": reason}}}
        )

    def subscribed(self, channel: str, result: SubscribeResult) -> bytes:
        push = _subscribe_json(result)
        push.pop("publications", None)
        return orjson.dumps({"push": {"channel": channel, "subscribe": push}})

    def join_frame(self, items: list[bytes]) -> bytes:
        return items[0] if len(items) == 1 else b"\n".join(items)


# ---- Protobuf -------------------------------------------------------------


def _info_pb(info: ClientInfo, out: Any) -> None:
    out.user = info.user
    out.client = info.client
    if info.info is not None:
        out.conn_info = orjson.dumps(info.info)


def _info_bytes(info: ClientInfo) -> bytes:
    body = _field(0x0A, info.user.encode()) + _field(0x12, info.client.encode())
    if info.info is not None:
        body += _field(0x1A, orjson.dumps(info.info))
    return body


def _pub_pb(pub: Publication, out: Any) -> None:
    out.data = pub.data
    out.offset = pub.offset
    if pub.info is not None:
        _info_pb(pub.info, out.info)
    if pub.offset == 1:
        out.epoch = pub.epoch


def _subscribe_pb(result: SubscribeResult, out: Any) -> None:
    if result.ttl is not None:
        out.expires = True
        out.ttl = result.ttl
    if result.recoverable:
        out.recoverable = True
        out.epoch = result.epoch
        out.offset = result.recovered_from if result.recovered else result.offset
        out.positioned = True
    if result.recovering:
        out.was_recovering = True
        out.recovered = bool(result.recovered)
        for pub in result.publications:
            _pub_pb(pub, out.publications.add())


def _delimited(message: Any) -> bytes:
    body: bytes = message.SerializeToString()
    return _uvarint(len(body)) + body


def _json_data(raw: bytes) -> Any:
    """A Protobuf ``bytes`` payload, which must be JSON text here."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise errors.BadRequest("data must be JSON (UTF-8) on this server") from None


class CentrifugeProtobuf(_Centrifuge):
    """The Protobuf form: the same path, WebSocket subprotocol
    ``centrifuge-protobuf``."""

    name = "centrifuge-protobuf"
    binary = True
    ping = b"\x00"  # an empty Reply, length-prefixed
    pong = b"\x00"  # an empty Command

    def decode(self, frame: bytes) -> list[Command | InvalidCommand]:
        out: list[Command | InvalidCommand] = []
        view = memoryview(frame)
        pos = 0
        end = len(frame)
        while pos < end:
            if len(out) >= MAX_COMMANDS:
                raise ProtocolViolation(f"more than {MAX_COMMANDS} commands in one frame")
            size, pos = self._read_uvarint(frame, pos)
            if size > end - pos:
                raise ProtocolViolation("a command is cut short")
            message = pb.Command()
            try:
                message.ParseFromString(view[pos : pos + size])
            except DecodeError:
                raise ProtocolViolation("not a Protobuf Command") from None
            pos += size
            command = self._command(message)
            if command is not None:
                out.append(command)
        if not out and not end:
            raise ProtocolViolation("empty frame")
        return out

    @staticmethod
    def _read_uvarint(data: bytes, pos: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            if pos >= len(data) or shift > 63:
                raise ProtocolViolation("bad length prefix")
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value, pos
            shift += 7

    @staticmethod
    def _command(message: Any) -> Command | InvalidCommand | None:
        method = next((key for key in REQUESTS if message.HasField(key)), None)
        cmd_id = message.id
        if cmd_id == 0:
            return None  # a pong, or a ``send``
        if method is None or method == "send":
            raise ProtocolViolation("a command needs exactly one known request")
        request = getattr(message, method)
        try:
            return Command(cmd_id, method, _core_params(method, _request_dict(method, request)))
        except SquallError as exc:
            return InvalidCommand(cmd_id, exc, method)

    def reply(self, command: Command, result: Result) -> bytes:
        message = pb.Reply(id=command.id)
        field = getattr(message, command.method)
        field.SetInParent()
        if isinstance(result, SubscribeResult):
            _subscribe_pb(result, field)
        elif isinstance(result, ConnectResult):
            field.client = result.client
            field.version = result.version
            if result.expires:
                field.expires = True
                field.ttl = result.ttl or 0
            for name, sub in result.subs.items():
                _subscribe_pb(sub, field.subs[name])
            if result.ping:
                field.ping = int(result.ping)
                field.pong = True
        elif isinstance(result, HistoryPage):
            for pub in result.publications:
                _pub_pb(pub, field.publications.add())
            field.epoch = result.epoch
            field.offset = result.offset
        elif isinstance(result, PresenceResult):
            for key, info in result.members.items():
                _info_pb(info, field.presence[key])
        elif isinstance(result, PresenceStatsResult):
            field.num_clients = result.clients
            field.num_users = result.users
        elif isinstance(result, (RefreshResult, SubRefreshResult)):
            field.expires = result.expires
            field.ttl = result.ttl
        return _delimited(message)

    def error(self, command: Command | InvalidCommand, exc: SquallError) -> bytes | Disconnect:
        code = self._error_code(command, exc)
        if isinstance(code, Disconnect):
            return code
        message = pb.Reply(id=command.id)
        message.error.code = code
        message.error.message = MESSAGES.get(code, exc.message)
        message.error.temporary = code in TEMPORARY
        return _delimited(message)

    def pub(self, pub: Publication) -> bytes:
        # The hot path, written field by field: Reply{push: Push{channel,
        # pub: Publication{data, info, offset}}}.
        body = _field(0x22, pub.data)
        if pub.info is not None:
            body += _field(0x2A, _info_bytes(pub.info))
        if pub.offset:
            body += b"\x30" + _uvarint(pub.offset)
            if pub.offset == 1:
                body += _field(0x72, pub.epoch.encode())  # epoch, field 14
        push = _field(0x12, pub.channel.encode()) + _field(0x22, body)
        reply = _field(0x22, push)
        return _uvarint(len(reply)) + reply

    def _push(self, channel: str) -> tuple[Any, Any]:
        message = pb.Reply()
        message.push.channel = channel
        return message, message.push

    def join(self, channel: str, info: ClientInfo) -> bytes:
        message, push = self._push(channel)
        _info_pb(info, push.join.info)
        return _delimited(message)

    def leave(self, channel: str, info: ClientInfo) -> bytes:
        message, push = self._push(channel)
        _info_pb(info, push.leave.info)
        return _delimited(message)

    def unsubscribe(self, channel: str, code: int, reason: str) -> bytes:
        message, push = self._push(channel)
        push.unsubscribe.code = code
        push.unsubscribe.reason = reason
        return _delimited(message)

    def subscribed(self, channel: str, result: SubscribeResult) -> bytes:
        message, push = self._push(channel)
        push.subscribe.SetInParent()
        if result.recoverable:
            push.subscribe.recoverable = True
            push.subscribe.epoch = result.epoch
            push.subscribe.offset = result.offset
            push.subscribe.positioned = True
        return _delimited(message)

    def join_frame(self, items: list[bytes]) -> bytes:
        return items[0] if len(items) == 1 else b"".join(items)


def _request_dict(method: str, request: Any) -> dict[str, Any]:
    """A Protobuf request as the JSON form's fields (zero values included)."""
    if method == "connect":
        return {
            "token": request.token,
            "subs": {
                ch: {"recover": s.recover, "offset": s.offset, "epoch": s.epoch}
                for ch, s in request.subs.items()
            },
            "data": _json_data(request.data) if request.data else None,
        }
    if method == "subscribe":
        return {
            "channel": request.channel,
            "token": request.token,
            "recover": request.recover,
            "offset": request.offset,
            "epoch": request.epoch,
            "data": _json_data(request.data) if request.data else None,
        }
    if method == "publish":
        return {"channel": request.channel, "data": _json_data(request.data)}
    if method == "history":
        out: dict[str, Any] = {
            "channel": request.channel,
            "limit": request.limit,
            "reverse": request.reverse,
        }
        if request.HasField("since"):
            out["since"] = {"offset": request.since.offset, "epoch": request.since.epoch}
        return out
    if method in ("refresh", "sub_refresh"):
        out = {"token": request.token}
        if method == "sub_refresh":
            out["channel"] = request.channel
        return out
    if method in ("unsubscribe", "presence", "presence_stats"):
        return {"channel": request.channel}
    return {}


CENTRIFUGE_JSON = CentrifugeJSON()
CENTRIFUGE_PROTOBUF = CentrifugeProtobuf()
SUBPROTOCOLS = {"centrifuge-protobuf": CENTRIFUGE_PROTOBUF, "centrifuge-json": CENTRIFUGE_JSON}
