"""This process's map of channel -> local sessions, grouped by codec.

A publication is encoded once per codec in use on its channel, here, and the
same bytes are handed to every local subscriber of that codec; per-subscriber
work is an append.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from server.models import ClientInfo, Publication

if TYPE_CHECKING:
    from server.codec import Codec
    from server.session import Flusher, Session


class Hub:
    __slots__ = ("_channels", "_flusher", "_sessions")

    def __init__(self, flusher: Flusher, sessions: dict[str, Session] | None = None) -> None:
        self._flusher = flusher
        # This process's sessions by client id (the node's own dict).
        self._sessions: dict[str, Session] = {} if sessions is None else sessions
        # channel -> codec -> sessions; dicts as insertion-ordered sets:
        # iteration is cheap and stable.
        self._channels: dict[str, dict[Codec, dict[Session, None]]] = {}

    def add(self, channel: str, session: Session) -> bool:
        """Add a subscriber; True when it is the channel's first on this node."""
        groups = self._channels.get(channel)
        if groups is None:
            self._channels[channel] = {session.codec: {session: None}}
            return True
        subs = groups.get(session.codec)
        if subs is None:
            groups[session.codec] = {session: None}
        else:
            subs[session] = None
        return False

    def remove(self, channel: str, session: Session) -> bool:
        """Remove a subscriber; True when the channel has none left here."""
        groups = self._channels.get(channel)
        if groups is None:
            return False
        subs = groups.get(session.codec)
        if subs is None or session not in subs:
            return False
        del subs[session]
        if not subs:
            del groups[session.codec]
            if not groups:
                del self._channels[channel]
                return True
        return False

    def broadcast_pub(self, pub: Publication) -> int:
        """Push ``pub`` to its channel's local subscribers; returns how many."""
        groups = self._channels.get(pub.channel)
        if not groups:
            return 0
        count = 0
        fan_out = self._flusher.fan_out
        for codec, subs in groups.items():
            sender = None
            if codec.skip_publisher and pub.info is not None:
                sender = self._sessions.get(pub.info.client)
            if sender is not None and sender in subs:
                # (Pusher: a client event is not echoed to its sender.)
                others = [s for s in subs if s is not sender]
                fan_out(others, pub.channel, pub.offset, codec.pub(pub))
            else:
                fan_out(subs, pub.channel, pub.offset, codec.pub(pub))
            count += len(subs)
        return count

    def broadcast_join(self, channel: str, info: ClientInfo, first: bool = True) -> None:
        """Tell the channel's local subscribers; the one who joined only
        where its protocol says so (``Codec.join_self``)."""
        for codec, subs in self._channels.get(channel, {}).items():
            if not first and codec.joins_per_user:
                continue  # the user was there already (Pusher)
            message = codec.join(channel, info)
            if not message:
                continue  # the protocol says nothing of it on this channel
            skip = "" if codec.join_self else info.client
            for session in subs:
                if session.client_id != skip:
                    session.send(message)

    def broadcast_leave(self, channel: str, info: ClientInfo, last: bool = True) -> None:
        for codec, subs in self._channels.get(channel, {}).items():
            if not last and codec.joins_per_user:
                continue  # the user is still there on another connection
            message = codec.leave(channel, info)
            if not message:
                continue
            for session in subs:
                if session.client_id != info.client:
                    session.send(message)

    def sessions(self, channel: str) -> list[Session]:
        return [s for subs in self._channels.get(channel, {}).values() for s in subs]

    def subscribers(self, channel: str) -> int:
        groups = self._channels.get(channel)
        return sum(len(subs) for subs in groups.values()) if groups else 0

    def channel_counts(self) -> dict[str, int]:
        return {
            name: sum(len(subs) for subs in groups.values())
            for name, groups in self._channels.items()
        }

    @property
    def channel_count(self) -> int:
        return len(self._channels)

    @property
    def subscription_count(self) -> int:
        return sum(len(subs) for groups in self._channels.values() for subs in groups.values())
