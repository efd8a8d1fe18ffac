"""Values shared by the broker, the store, the search index and the hub."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True, frozen=True)
class StreamPosition:
    """Where a channel's stream stands: the offset of its last publication and
    the epoch that offset belongs to. A new epoch means the stream was lost
    and restarted, so offsets from an older epoch cannot be recovered."""

    offset: int
    epoch: str


@dataclass(slots=True, frozen=True)
class ClientInfo:
    """What others may see of a connection: in presence, join/leave pushes and
    as the publisher of a publication."""

    client: str
    user: str
    info: Any = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"client": self.client, "user": self.user}
        if self.info is not None:
            out["info"] = self.info
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ClientInfo:
        return cls(client=str(obj["client"]), user=str(obj["user"]), info=obj.get("info"))


@dataclass(slots=True)
class Publication:
    """One publication to one channel. ``data`` is already-encoded JSON so it is
    serialised once, by the publisher, and spliced into every push as is."""

    channel: str
    offset: int
    epoch: str
    data: bytes
    info: ClientInfo | None = None
    time_ms: int = field(default_factory=lambda: int(time.time() * 1000))

    @property
    def position(self) -> StreamPosition:
        return StreamPosition(self.offset, self.epoch)


@dataclass(slots=True)
class HistoryResult:
    """Publications in offset order, and the stream position at read time."""

    publications: list[Publication]
    position: StreamPosition


@dataclass(slots=True, frozen=True)
class HistoryOptions:
    """How a namespace keeps history; given to the broker on every publish."""

    size: int
    ttl: float  # seconds
    meta_ttl: float  # seconds a stream's epoch and offset outlive its last publication
