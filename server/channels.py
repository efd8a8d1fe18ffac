"""Channel names and namespaces.

A channel is ``namespace:name`` or a bare ``name``, which belongs to the
``default`` namespace. Both parts are printable ASCII without spaces, so a
name is safe in URLs, logs, Redis keys and SSE event ids.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from server.config import NamespaceOptions, Settings
from server.errors import BadRequest, UnknownChannel

MAX_CHANNEL_LENGTH = 255
NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
# Allowed in the name part: letters, digits and a few separators. No ':' in the
# namespace, so the first ':' always splits.
_NAME_RE = re.compile(r"[A-Za-z0-9_.\-=@/#:+,;!~$]+")


def namespace_name(channel: str) -> str:
    """The namespace a (valid) channel name belongs to."""
    ns_name, sep, _ = channel.partition(":")
    return ns_name if sep else "default"


@dataclass(slots=True, frozen=True)
class Channel:
    name: str
    namespace: str
    options: NamespaceOptions


class Channels:
    """Resolves channel names to their namespace options, and validates them."""

    __slots__ = ("_cache", "_namespaces")

    def __init__(self, settings: Settings) -> None:
        self._namespaces = settings.namespaces
        self._cache: dict[str, Channel] = {}

    def namespace(self, name: str) -> NamespaceOptions | None:
        return self._namespaces.get(name)

    @property
    def any_anonymous(self) -> bool:
        return any(ns.allow_anonymous for ns in self._namespaces.values())

    def resolve(self, name: object) -> Channel:
        """Return the channel, or raise ``BadRequest`` for a malformed name and
        ``UnknownChannel`` for a namespace that is not configured."""
        if isinstance(name, str):
            cached = self._cache.get(name)
            if cached is not None:
                return cached
        if not isinstance(name, str) or not name:
            raise BadRequest("channel must be a non-empty string")
        if len(name) > MAX_CHANNEL_LENGTH:
            raise BadRequest(f"channel name longer than {MAX_CHANNEL_LENGTH} characters")
        if not _NAME_RE.fullmatch(name):
            raise BadRequest("channel name has characters outside A-Z a-z 0-9 _.-=@/#:+,;!~$")
        ns_name, sep, rest = name.partition(":")
        if not sep:
            ns_name = "default"
        elif not rest or not NAMESPACE_RE.fullmatch(ns_name):
            raise BadRequest("channel must be 'namespace:name' with both parts non-empty")
        options = self._namespaces.get(ns_name)
        if options is None:
            raise UnknownChannel(f"unknown namespace {ns_name!r}")
        channel = Channel(name, ns_name, options)
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[name] = channel
        return channel
