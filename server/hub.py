"""This process's map of channel -> local sessions.

A publication is encoded once, here, and the same bytes are handed to every
local subscriber's send queue; per-subscriber work is an append.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from server import protocol
from server.models import Publication

if TYPE_CHECKING:
    from server.session import Flusher, Session


class Hub:
    __slots__ = ("_channels", "_flusher")

    def __init__(self, flusher: Flusher) -> None:
        self._flusher = flusher
        # dict as an insertion-ordered set: iteration is cheap and stable.
        self._channels: dict[str, dict[Session, None]] = {}

    def add(self, channel: str, session: Session) -> bool:
        """Add a subscriber; True when it is the channel's first on this node."""
        subs = self._channels.get(channel)
        if subs is None:
            self._channels[channel] = {session: None}
            return True
        subs[session] = None
        return False

    def remove(self, channel: str, session: Session) -> bool:
        """Remove a subscriber; True when the channel has none left here."""
        subs = self._channels.get(channel)
        if subs is None or session not in subs:
            return False
        del subs[session]
        if not subs:
            del self._channels[channel]
            return True
        return False

    def broadcast_pub(self, pub: Publication) -> int:
        """Push ``pub`` to its channel's local subscribers; returns how many."""
        subs = self._channels.get(pub.channel)
        if not subs:
            return 0
        self._flusher.fan_out(subs, pub.channel, pub.offset, protocol.pub_push(pub))
        return len(subs)

    def broadcast(self, channel: str, message: bytes, *, skip_client: str = "") -> int:
        """Push ``message`` to the channel's local subscribers, except the
        session whose client id is ``skip_client``."""
        subs = self._channels.get(channel)
        if not subs:
            return 0
        for session in subs:
            if session.client_id != skip_client:
                session.send(message)
        return len(subs)

    def sessions(self, channel: str) -> list[Session]:
        return list(self._channels.get(channel, ()))

    def subscribers(self, channel: str) -> int:
        subs = self._channels.get(channel)
        return len(subs) if subs else 0

    def channel_counts(self) -> dict[str, int]:
        return {name: len(subs) for name, subs in self._channels.items()}

    @property
    def channel_count(self) -> int:
        return len(self._channels)

    @property
    def subscription_count(self) -> int:
        return sum(len(subs) for subs in self._channels.values())
