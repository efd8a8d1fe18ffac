"""The ``Broker`` interface: channel streams (offsets, epochs, bounded
history), fan-out of publications to every node, and presence.

Guarantees every implementation keeps (the contract tests check them):

- ``publish`` assigns the channel's next offset (previous + 1) and appends to
  the channel's history in one atomic step, then delivers the publication to
  every node's handler, this node included. A node delivers a channel's
  publications in offset order.
- ``history`` returns publications in offset order (newest first when
  ``reverse``) together with the stream's current position, read atomically.
- A stream whose history and metadata have expired starts again at offset 0
  under a new epoch; a client holding the old epoch learns its position cannot
  be recovered.
- Failures to reach the backend raise ``BrokerUnavailable``; nothing is
  silently dropped on publish.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from server.models import ClientInfo, HistoryOptions, HistoryResult, Publication, StreamPosition


class BrokerUnavailable(Exception):
    """The broker's backend cannot be reached; the publish did not happen."""


class OffsetConflict(Exception):
    """``publish(at=...)`` found the stream elsewhere than expected."""

    def __init__(self, current: StreamPosition) -> None:
        super().__init__(f"stream is at {current}")
        self.current = current


@dataclass(slots=True, frozen=True)
class PresenceEdge:
    """What a presence change left: the channel's member count, and whether
    another connection of the same user is (still) there."""

    members: int
    user_elsewhere: bool


class BrokerHandler(Protocol):
    """What a broker calls on its node. Called on the event loop; must not block."""

    def on_publication(self, pub: Publication) -> None: ...

    def on_join(self, channel: str, info: ClientInfo, first: bool = True) -> None:
        """``first``: the user's first connection in the channel's presence
        (Pusher tells of users, not of connections)."""
        ...

    def on_leave(self, channel: str, info: ClientInfo, last: bool = True) -> None: ...

    def on_control(self, message: bytes) -> None: ...

    def on_unrecoverable(self, channel: str) -> None:
        """Publications of ``channel`` were lost between the broker and this
        node and cannot be read back: local subscribers must recover."""
        ...


class Broker(Protocol):
    name: str
    # True when concurrent ``publish`` calls land in the order they were
    # made, so a session may have several of one client's publishes in
    # flight at once (see ``Session._begin_publish``).
    ordered_publish: bool

    async def start(self, handler: BrokerHandler) -> None: ...

    async def close(self) -> None: ...

    async def publish(
        self,
        channel: str,
        data: bytes,
        *,
        info: ClientInfo | None,
        history: HistoryOptions,
        at: StreamPosition | None = None,
        time_ms: int | None = None,
    ) -> Publication:
        """Append and fan out. With ``at``, the publication must land exactly
        at that position (a stream that does not exist yet is created there);
        otherwise ``OffsetConflict`` is raised and nothing changes. Durable
        channels use it to publish what the store has already accepted."""
        ...

    async def subscribe(self, channel: str) -> None:
        """This node has local subscribers of ``channel`` now."""
        ...

    async def unsubscribe(self, channel: str) -> None: ...

    async def position(self, channel: str) -> StreamPosition:
        """The stream's current position (creating the stream if needed)."""
        ...

    def delivered(self, channel: str) -> StreamPosition | None:
        """The position of the last publication of ``channel`` this node has
        handed to its handler (None when the node does not follow the
        channel). Every publication past it reaches the handler later. It
        can lag ``position``: publications still on their way here."""
        ...

    async def seed(self, channel: str, position: StreamPosition) -> None:
        """Adopt ``position`` if the stream does not exist yet (a durable
        channel's position after a restart); otherwise do nothing."""
        ...

    async def history(
        self, channel: str, *, after: int | None, limit: int, reverse: bool = False
    ) -> HistoryResult:
        """Publications with offset > ``after`` (all kept ones when None), at
        most ``limit``; with ``reverse``, the newest first."""
        ...

    async def presence(self, channel: str) -> dict[str, ClientInfo]: ...

    async def add_presence(
        self, channel: str, info: ClientInfo, *, by_user: bool = False
    ) -> PresenceEdge:
        """Add a member. Says how many the channel has now (1: it was empty)
        and, with ``by_user``, whether another connection of the member's
        user is there: atomically across nodes, so of concurrent joins one
        sees each edge."""
        ...

    async def remove_presence(self, channel: str, client: str, *, user: str = "") -> PresenceEdge:
        """Remove a member. Says how many are left (0: it is empty now) and,
        given its ``user``, whether another connection of that user is."""
        ...

    async def publish_join(self, channel: str, info: ClientInfo, first: bool = True) -> None: ...

    async def publish_leave(self, channel: str, info: ClientInfo, last: bool = True) -> None: ...

    async def publish_control(self, message: bytes) -> None:
        """Deliver ``message`` to every node's ``on_control``, this one too."""
        ...

    async def report_node(self, node_id: str, info: dict[str, Any]) -> None:
        """Publish this node's stats for the cluster view; they expire unless
        reported again."""
        ...

    async def nodes(self) -> list[dict[str, Any]]:
        """The latest stats of every live node."""
        ...

    def healthy(self) -> bool: ...
