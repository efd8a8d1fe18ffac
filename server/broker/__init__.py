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

from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from server.models import ClientInfo, HistoryOptions, HistoryResult, Publication, StreamPosition


class BrokerUnavailable(Exception):
    """The broker's backend cannot be reached; the publish did not happen."""


class ReplicasNotAcknowledged(BrokerUnavailable):
    """``broker.min_replicas_ack``: fewer replicas than required confirmed a
    publish within ``broker.replicas_ack_timeout_ms``. Unlike a plain
    ``BrokerUnavailable``, the publication was written on the master and may
    still be delivered and kept (or lost in a failover)."""

    def __init__(self, acked: int, required: int, timeout_ms: int) -> None:
        super().__init__(
            f"redis: {acked} of {required} required replica(s) acknowledged the publication "
            f"within {timeout_ms} ms; it was written on the master and may still be "
            "delivered, or lost in a failover"
        )
        self.acked = acked
        self.required = required


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


class DurableLog(Protocol):
    """What a broker may ask of the node's durable log (``Broker.use_log``)."""

    def durable(self, channel: str) -> bool:
        """``channel``'s publications are in the log: its stream must go on
        from the log's position, never start afresh."""
        ...

    async def last_position(self, channel: str) -> StreamPosition | None:
        """The log's newest position of ``channel`` (None: it holds none).
        Raises ``BrokerUnavailable`` when the log cannot say."""
        ...


class Broker(Protocol):
    name: str
    # True once ``use_log`` made the broker seed durable streams itself from
    # the log whenever they are missing (the node then need not).
    seeds_from_log: bool
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

    def use_log(self, log: DurableLog) -> None:
        """Let the broker read durable channels' positions from ``log`` (a
        broker whose streams can vanish behind the node's back, as after a
        Redis failover, must; one that keeps them in the process need not)."""
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


# ---- broker URLs ------------------------------------------------------------

SENTINEL_SCHEME = "redis+sentinel"


def split_broker_urls(url: str) -> list[str]:
    """A comma-separated list of broker URLs. A piece without ``://`` belongs
    to the URL before it: one more host of ``redis+sentinel://h1,h2/name``
    or ``redis+cluster://h1,h2``."""
    out: list[str] = []
    for piece in (p.strip() for p in url.split(",")):
        if not piece:
            continue
        if "://" not in piece and out:
            out[-1] += "," + piece
        else:
            out.append(piece)
    return out


@dataclass(slots=True, frozen=True)
class SentinelURL:
    """``redis+sentinel://[[user]:password@]h1:26379,h2:26379/<master>[/<db>]``
    with optional ``?db=``, ``password=``, ``username=`` (the data servers')
    and ``sentinel_password=``, ``sentinel_username=`` (the sentinels')."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    options: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, url: str) -> SentinelURL:
        parts = urlsplit(url)
        if parts.scheme != SENTINEL_SCHEME:
            raise ValueError(f"not a {SENTINEL_SCHEME}:// URL")
        userinfo, _, hosts = parts.netloc.rpartition("@")
        username = password = None
        if userinfo:
            user, sep, pw = userinfo.partition(":")
            username = unquote(user) or None
            password = unquote(pw) if sep else None
            if not sep:  # redis+sentinel://secret@h1/name: a password alone
                username, password = None, unquote(user)
        sentinels = []
        for host_port in hosts.split(","):
            host_port = host_port.strip()
            if not host_port:
                continue
            if host_port.startswith("["):  # [::1]:26379
                host, _, rest = host_port[1:].partition("]")
                port_text = rest.lstrip(":")
            else:
                host, _, port_text = host_port.rpartition(":")
                if not host:
                    host, port_text = port_text, ""
            try:
                port = int(port_text) if port_text else 26379
            except ValueError:
                raise ValueError(f"bad sentinel port in {host_port!r}") from None
            if not host or not 0 < port < 65536:
                raise ValueError(f"bad sentinel address {host_port!r}")
            sentinels.append((host, port))
        if not sentinels:
            raise ValueError("no sentinel address")
        path = [unquote(p) for p in parts.path.split("/") if p]
        if not path:
            raise ValueError("the master's name is missing (redis+sentinel://h:26379/<name>)")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        db_text = query.pop("db", path[1] if len(path) > 1 else "0")
        try:
            db = int(db_text)
        except ValueError:
            raise ValueError(f"bad db {db_text!r}") from None
        if len(path) > 2 or db < 0:
            raise ValueError("expected /<master-name>[/<db>] as the path")
        return cls(
            sentinels=tuple(sentinels),
            master=path[0],
            db=db,
            username=query.pop("username", username),
            password=query.pop("password", password),
            sentinel_username=query.pop("sentinel_username", None),
            sentinel_password=query.pop("sentinel_password", None),
            options=query,
        )

    def safe(self) -> str:
        """The URL without passwords, for logs and ``squall check-config``."""
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.sentinels)
        db = f"/{self.db}" if self.db else ""
        return f"{SENTINEL_SCHEME}://{hosts}/{self.master}{db}"


def safe_broker_url(url: str) -> str:
    """A broker URL (list) without user info, passwords or query: fit for a
    log line or ``squall check-config``."""
    out = []
    for one in split_broker_urls(url):
        if one.startswith(SENTINEL_SCHEME + "://"):
            try:
                out.append(SentinelURL.parse(one).safe())
            except ValueError:
                out.append(f"{SENTINEL_SCHEME}://(invalid)")
            continue
        scheme, _, rest = one.partition("://")
        hosts = rest.split("/", 1)[0].split("?", 1)[0].rpartition("@")[2]
        path = rest[len(rest.split("/", 1)[0]) :].split("?", 1)[0]
        out.append(f"{scheme}://{hosts}{path}")
    return ",".join(out)
