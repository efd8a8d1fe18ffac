"""The client wire protocol, without I/O: frames in, commands out; values in,
encoded replies and pushes out. ``docs/protocol.md`` is the contract.

A frame holds one JSON object, or several separated by ``\\n``. The server
may likewise join several replies and pushes in one frame, so a burst costs
one write per connection instead of one per message.

Parsing never raises anything but ``ProtocolViolation``: a frame the server
cannot answer (not JSON, not an object, no usable ``id``) closes the
connection with ``BAD_REQUEST``; a command with a usable ``id`` but bad fields
gets an error reply and changes nothing.
"""

from __future__ import annotations

from typing import Any

import orjson

from server.codec import (
    EMPTY,
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
from server.errors import BAD_REQUEST, BadRequest, Disconnect, SquallError
from server.models import ClientInfo, Publication

__all__ = ["EMPTY", "SQUALL", "Command", "InvalidCommand", "ProtocolViolation", "SquallCodec"]

METHODS = frozenset(
    {
        "connect",
        "subscribe",
        "unsubscribe",
        "publish",
        "history",
        "presence",
        "refresh",
        "ping",
        "search",
    }
)
MAX_ID = 2**53 - 1  # what a JavaScript number holds exactly


def parse_frame(frame: bytes | str, *, max_commands: int = 100) -> list[Command | InvalidCommand]:
    """Split a frame into commands. Raises ``ProtocolViolation`` only."""
    if isinstance(frame, str):
        frame = frame.encode("utf-8", "surrogatepass")
    lines = [line for line in frame.split(b"\n") if line.strip()]
    if not lines:
        raise ProtocolViolation("empty frame")
    if len(lines) > max_commands:
        raise ProtocolViolation(f"more than {max_commands} commands in one frame")
    out: list[Command | InvalidCommand] = []
    for line in lines:
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise ProtocolViolation("frame is not valid JSON") from None
        if not isinstance(obj, dict):
            raise ProtocolViolation("a command must be a JSON object")
        cmd_id = obj.get("id")
        if type(cmd_id) is not int or not 0 < cmd_id <= MAX_ID:
            raise ProtocolViolation("a command needs an integer 'id' from 1 to 2^53-1")
        method = obj.get("method")
        params = obj.get("params", {})
        if not isinstance(method, str) or not method:
            out.append(InvalidCommand(cmd_id, BadRequest("'method' must be a non-empty string")))
        elif params is None:
            out.append(Command(cmd_id, method, {}))
        elif not isinstance(params, dict):
            out.append(InvalidCommand(cmd_id, BadRequest("'params' must be an object")))
        else:
            out.append(Command(cmd_id, method, params))
    return out


def error_reply(cmd_id: int, error: SquallError) -> bytes:
    return orjson.dumps({"id": cmd_id, "error": error.to_json()})


def pub_json(pub: Publication) -> dict[str, Any]:
    """A publication as the protocol shows it. ``data`` is spliced in, not
    decoded and encoded again."""
    out: dict[str, Any] = {
        "offset": pub.offset,
        "epoch": pub.epoch,
        "data": orjson.Fragment(pub.data),
        "time": pub.time_ms,
    }
    if pub.info is not None:
        out["info"] = pub.info.to_json()
    return out


def pub_push(pub: Publication) -> bytes:
    """The push every subscriber of ``pub.channel`` gets; built once per
    publication and written as the same bytes to all of them."""
    return orjson.dumps({"push": "pub", "channel": pub.channel, "pub": pub_json(pub)})


def join_push(channel: str, info: ClientInfo) -> bytes:
    return orjson.dumps({"push": "join", "channel": channel, "info": info.to_json()})


def leave_push(channel: str, info: ClientInfo) -> bytes:
    return orjson.dumps({"push": "leave", "channel": channel, "info": info.to_json()})


def unsubscribe_push(channel: str, code: int, reason: str) -> bytes:
    return orjson.dumps({"push": "unsubscribe", "channel": channel, "code": code, "reason": reason})


def disconnect_push(code: int, reason: str, reconnect: bool) -> bytes:
    return orjson.dumps(
        {"push": "disconnect", "code": code, "reason": reason, "reconnect": reconnect}
    )


def subscribe_json(result: SubscribeResult) -> dict[str, Any]:
    out: dict[str, Any] = {
        "offset": result.offset,
        "epoch": result.epoch,
        "recoverable": result.recoverable,
    }
    if result.recovered is not None:
        out["recovered"] = result.recovered
        if result.recovering:
            out["publications"] = [pub_json(p) for p in result.publications]
    return out


def connect_json(result: ConnectResult) -> dict[str, Any]:
    out: dict[str, Any] = {
        "client": result.client,
        "version": result.version,
        "node": result.node,
        "ping": result.ping,
        "expires": result.expires,
    }
    if result.ttl is not None:
        out["ttl"] = result.ttl
    return out


def result_json(result: Result) -> Any:
    """A neutral result as Squall's protocol (and HTTP API) shows it."""
    if isinstance(result, dict):
        return result
    if isinstance(result, Empty):
        return {}
    if isinstance(result, SubscribeResult):
        return subscribe_json(result)
    if isinstance(result, PublishResult):
        return {"offset": result.offset, "epoch": result.epoch}
    if isinstance(result, HistoryPage):
        return {
            "publications": [pub_json(p) for p in result.publications],
            "offset": result.offset,
            "epoch": result.epoch,
        }
    if isinstance(result, PresenceResult):
        return {"presence": {k: v.to_json() for k, v in result.members.items()}}
    if isinstance(result, PresenceStatsResult):
        return {"clients": result.clients, "users": result.users}
    if isinstance(result, (RefreshResult, SubRefreshResult)):
        return {"expires": result.expires, "ttl": result.ttl}
    if isinstance(result, ConnectResult):
        return connect_json(result)
    raise TypeError(f"no JSON form for {type(result).__name__}")


class SquallCodec(CodecDefaults):
    """Squall's own JSON protocol (``docs/protocol.md``)."""

    name: str = "squall"
    binary: bool = False
    methods: frozenset[str] = METHODS
    subs_in_connect: bool = False
    close_on_connect_error: bool = True
    join_self: bool = False
    expiry_grace: float = 0.0
    ping: bytes | None = None
    pong: bytes | None = None

    def decode(self, frame: bytes) -> list[Command | InvalidCommand]:
        return parse_frame(frame)

    def reply(self, command: Command, result: Result) -> bytes:
        return orjson.dumps({"id": command.id, "result": result_json(result)})

    def error(self, command: Command | InvalidCommand, exc: SquallError) -> bytes | Disconnect:
        return error_reply(command.id, exc)

    def pub(self, pub: Publication) -> bytes:
        return pub_push(pub)

    def join(self, channel: str, info: ClientInfo) -> bytes:
        return join_push(channel, info)

    def leave(self, channel: str, info: ClientInfo) -> bytes:
        return leave_push(channel, info)

    def unsubscribe(self, channel: str, code: int, reason: str) -> bytes:
        return unsubscribe_push(channel, code, reason)

    def subscribed(self, channel: str, result: SubscribeResult) -> bytes:
        return orjson.dumps({"push": "subscribe", "channel": channel, **subscribe_json(result)})

    def violation(self) -> Disconnect:
        return BAD_REQUEST

    def close(self, disconnect: Disconnect) -> tuple[int, str]:
        return disconnect.code, disconnect.reason

    def join_frame(self, items: list[bytes]) -> bytes:
        return items[0] if len(items) == 1 else b"\n".join(items)


SQUALL = SquallCodec()


class StreamEvent(bytes):
    """A message of the SSE codec that moves a channel's position on the
    stream (``pub``, ``subscribe``, ``unsubscribe``). The event id the SSE
    transport writes before it needs the channel, offset and epoch: they
    travel beside the bytes, set once per publication, so the transport
    never parses a message. ``offset`` is -1 when the channel leaves the
    stream."""

    channel: str
    offset: int
    epoch: str


def stream_event(message: bytes, channel: str, offset: int, epoch: str) -> StreamEvent:
    event = StreamEvent(message)
    event.channel = channel
    event.offset = offset
    event.epoch = epoch
    return event


class SSECodec(SquallCodec):
    """Squall's protocol over Server-Sent Events: the same JSON messages, but
    those that move a channel's position are ``StreamEvent``s, so the SSE
    transport can write each event's id without decoding anything. Its own
    instance, so the hub groups SSE subscribers apart and encodes a
    publication for them once."""

    def pub(self, pub: Publication) -> bytes:
        return stream_event(pub_push(pub), pub.channel, pub.offset, pub.epoch)

    def unsubscribe(self, channel: str, code: int, reason: str) -> bytes:
        return stream_event(unsubscribe_push(channel, code, reason), channel, -1, "")

    def subscribed(self, channel: str, result: SubscribeResult) -> bytes:
        # Recovered publications follow as ``pub`` events of their own, each
        # with its id: the subscribe event carries none.
        pushed = subscribe_json(result)
        pushed.pop("publications", None)
        message = orjson.dumps({"push": "subscribe", "channel": channel, **pushed})
        return stream_event(message, channel, result.offset, result.epoch)


SSE = SSECodec()
