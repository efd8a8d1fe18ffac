"""The seam between a client's state and its wire protocol.

A ``Session`` keeps state (auth, subscriptions, positions, queue, limits) and
speaks in ``Command``s and the neutral results below; a ``Codec`` owns the
wire: it turns a frame into commands and results, pushes and disconnects into
bytes. Squall's own JSON protocol is one codec (``server.protocol``), the
Centrifugo client protocol another (``server.codecs``).

Codecs are stateless and shared by every connection that speaks them. The hub
asks each codec in use for a publication's bytes once and hands the same
bytes to all of that codec's subscribers, so a publication costs one encode
per codec, never one per subscriber.

The messages a codec returns are self-delimiting units of its wire: the
transport joins a connection's queued messages with ``codec.join`` into one
frame.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any, Protocol

from server.errors import Disconnect, SquallError
from server.models import ClientInfo, Publication


class ProtocolViolation(Exception):
    """The frame cannot be answered; the connection closes (the codec says
    with which code: ``Codec.violation``)."""


@dataclass(slots=True)
class Command:
    """One command, in the core's terms: ``method`` is the core's name for
    it and ``params`` holds the core's parameter names and JSON-like values
    (``data`` already decoded)."""

    id: int
    method: str
    params: dict[str, Any]


@dataclass(slots=True)
class InvalidCommand:
    """A command with a usable id whose other fields are wrong."""

    id: int
    error: SquallError
    method: str = ""


# ---- neutral results ------------------------------------------------------


@dataclass(slots=True)
class ConnectResult:
    client: str
    version: str
    node: str
    ping: float
    expires: bool
    ttl: int | None
    # Server-side subscriptions, for codecs whose connect reply carries them
    # (``Codec.subs_in_connect``).
    subs: dict[str, SubscribeResult] = field(default_factory=dict)


@dataclass(slots=True)
class SubscribeResult:
    offset: int
    epoch: str
    recoverable: bool
    # None when the client did not ask to recover.
    recovered: bool | None = None
    # The client asked to recover and the namespace keeps what it needs:
    # ``publications`` holds what it missed.
    recovering: bool = False
    # The offset the client recovered from (when ``recovering``).
    recovered_from: int = 0
    publications: list[Publication] = field(default_factory=list)
    # Seconds until the subscription token expires; None: it does not.
    ttl: int | None = None
    # The channel's members, for codecs that answer a presence subscription
    # with them (``Codec.presence_on_subscribe``); None otherwise.
    presence: dict[str, ClientInfo] | None = None


@dataclass(slots=True)
class PublishResult:
    offset: int
    epoch: str


@dataclass(slots=True)
class HistoryPage:
    publications: list[Publication]
    offset: int
    epoch: str


@dataclass(slots=True)
class PresenceResult:
    members: dict[str, ClientInfo]


@dataclass(slots=True)
class PresenceStatsResult:
    clients: int
    users: int


@dataclass(slots=True)
class RefreshResult:
    client: str
    version: str
    expires: bool
    ttl: int


@dataclass(slots=True)
class SubRefreshResult:
    expires: bool
    ttl: int


@dataclass(slots=True)
class Empty:
    """A command that succeeded with nothing to say."""


EMPTY = Empty()

# What a command handler returns; a plain dict is passed through as is (the
# JSON-only methods, such as Squall's ``search``).
Result = (
    ConnectResult
    | SubscribeResult
    | PublishResult
    | HistoryPage
    | PresenceResult
    | PresenceStatsResult
    | RefreshResult
    | SubRefreshResult
    | Empty
    | dict[str, Any]
)


@dataclass(slots=True)
class ChannelGrant:
    """A codec's own authorization of a subscription or a publish (the
    Pusher protocol's signatures): the namespace's token rules do not apply.
    ``info`` is who this connection is on the channel's presence, when not
    the connection's own identity."""

    info: ClientInfo | None = None
    # Server-side subscriptions the grant comes with (a Pusher user's own
    # channel on signin).
    channels: list[str] = field(default_factory=list)


class CodecDefaults:
    """What a codec without connection-level extras says: the client
    connects itself, gets every publication, and the namespace's rules
    authorize it. Squall's and the Centrifugo codecs take these."""

    connect_on_open: bool = False
    skip_publisher: bool = False
    presence_on_subscribe: bool = False
    frame_per_message: bool = False
    joins_per_user: bool = False
    max_connections: int = 0

    def client_id(self) -> str:
        return secrets.token_hex(8)

    def authorize(
        self, method: str, client_id: str, channel: str, params: dict[str, Any]
    ) -> ChannelGrant | None:
        return None

    def publication(self, params: dict[str, Any], publisher: ClientInfo) -> bytes | None:
        return None


class Codec(Protocol):
    """One wire protocol. Stateless: one instance serves every connection."""

    name: str
    # WebSocket frames are binary (else text).
    binary: bool
    # The core methods this protocol has; anything else is ``MethodNotFound``.
    methods: frozenset[str]
    # Server-side subscriptions go in the connect reply (else: as pushes after it).
    subs_in_connect: bool
    # A connect refused for a bad or expired token also closes the connection.
    close_on_connect_error: bool
    # A subscriber is told of its own join too (else only the others are).
    join_self: bool
    # Seconds a connection outlives its expired token before it is closed
    # (a refresh may be on its way).
    expiry_grace: float
    # The application-level ping message, or None: the transport's own ping.
    ping: bytes | None
    # The client's usual answer to it, which the transport takes without
    # waking the session (anything else still goes to ``decode``).
    pong: bytes | None
    # The server connects the client when the socket opens (the transport
    # hands the session an empty frame, which ``decode`` makes a connect of).
    connect_on_open: bool
    # A publication is not delivered to the client that made it
    # (``Publication.info.client``).
    skip_publisher: bool
    # A subscription to a presence channel is answered with its members
    # (``SubscribeResult.presence``).
    presence_on_subscribe: bool
    # Each message is a WebSocket frame of its own (else ``join_frame``).
    frame_per_message: bool
    # Joins and leaves are told of per user: a user's first connection in,
    # its last out (else per connection).
    joins_per_user: bool
    # Connections this codec may have open in the process; 0: no own limit
    # (a Pusher app's max_connections).
    max_connections: int

    def client_id(self) -> str:
        """A new connection's id, in the form the protocol's clients expect."""
        ...

    def authorize(
        self, method: str, client_id: str, channel: str, params: dict[str, Any]
    ) -> ChannelGrant | None:
        """The codec's own verdict on a ``subscribe`` or ``publish`` command
        (raises ``SquallError`` to refuse), or None: the namespace decides."""
        ...

    def publication(self, params: dict[str, Any], publisher: ClientInfo) -> bytes | None:
        """The publication data of a ``publish`` command, when the codec makes
        it (None: ``params["data"]`` as JSON)."""
        ...

    def decode(self, frame: bytes) -> list[Command | InvalidCommand]:
        """Split a frame into commands (a pong is no command). Raises
        ``ProtocolViolation`` only."""
        ...

    def reply(self, command: Command, result: Result) -> bytes: ...

    def error(self, command: Command | InvalidCommand, exc: SquallError) -> bytes | Disconnect:
        """The error reply, or a ``Disconnect`` where the protocol closes
        the connection instead."""
        ...

    def pub(self, pub: Publication) -> bytes:
        """The push of one publication: the hot path, once per publication."""
        ...

    def join(self, channel: str, info: ClientInfo) -> bytes: ...

    def leave(self, channel: str, info: ClientInfo) -> bytes: ...

    def unsubscribe(self, channel: str, code: int, reason: str) -> bytes: ...

    def subscribed(self, channel: str, result: SubscribeResult) -> bytes:
        """A server-side subscription's push (``subs_in_connect`` is false)."""
        ...

    def violation(self) -> Disconnect:
        """The close for a frame that cannot be answered."""
        ...

    def close(self, disconnect: Disconnect) -> tuple[int, str]:
        """The WebSocket close code and reason of a disconnect."""
        ...

    def join_frame(self, items: list[bytes]) -> bytes:
        """Several queued messages as one frame's payload."""
        ...
