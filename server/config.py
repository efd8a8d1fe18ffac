"""Settings: a TOML file, overridden by ``SQUALL_*`` environment variables,
overridden by command-line flags. Validated once, at start; a bad value stops
the start with one message that names the key (``ConfigError``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from server.models import HistoryOptions


class ConfigError(Exception):
    """A setting is missing or wrong. ``key`` is the dotted TOML name."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"config error: {key}: {problem}")


@dataclass(slots=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000  # 0 picks a free port, printed at start
    data_dir: str = "./data"
    # Origins allowed to open a WebSocket or SSE stream from a browser. Empty:
    # same origin only (the Origin's host must equal the Host header). "*": any.
    allowed_origins: list[str] = field(default_factory=list)
    # Seconds SIGTERM waits for connections to go before the process exits.
    drain_grace: float = 10.0
    # Seconds /ready is false before clients are told to leave, so a load
    # balancer's health check can take the node out of rotation first.
    drain_delay: float = 0.0
    log_level: str = "info"
    node_name: str = ""
    # Serve the demo room at /demo, with a token endpoint for it. For trying
    # Squall out; never on a public server (anyone may get a token).
    demo: bool = False


@dataclass(slots=True)
class AuthSettings:
    token_secret: str = ""
    # PEM text or a path to a PEM file, for RS256/ES256 tokens.
    token_public_key: str = ""
    token_algorithms: list[str] = field(default_factory=lambda: ["HS256"])
    token_audience: str = ""
    token_issuer: str = ""
    api_key: str = ""
    # Seconds of clock skew tolerated on exp/nbf.
    leeway: float = 0.0
    # An identity provider's JSON Web Key Set (OIDC `jwks_uri`): tokens are
    # verified with the key their `kid` names (public-key algorithms only; not
    # with token_public_key or token_secret).
    jwks_url: str = ""
    # Seconds the key set is kept: the provider's Cache-Control max-age or
    # Expires, clamped to [jwks_cache_min, jwks_cache_max]; the floor without.
    jwks_cache_min: float = 60.0
    jwks_cache_max: float = 86400.0
    # At most one refetch per this many seconds for tokens naming an unknown kid.
    jwks_refetch_interval: float = 30.0
    # Seconds one fetch of the key set may take (connect, and the whole request).
    jwks_timeout: float = 10.0


@dataclass(slots=True)
class LimitSettings:
    # Largest WebSocket frame a client may send (close code 1009 past it).
    max_frame_bytes: int = 65536
    # Largest publication data (encoded JSON), from clients and the API.
    max_publication_bytes: int = 32768
    max_channels_per_connection: int = 128
    commands_per_second: float = 50.0
    command_burst: int = 100
    max_connections: int = 10000
    connect_timeout: float = 10.0
    ping_interval: float = 25.0
    ping_timeout: float = 10.0
    send_queue_bytes: int = 1048576
    send_queue_messages: int = 10000
    max_history_limit: int = 1000
    max_broadcast_channels: int = 1000
    # Commands in one POST /api/batch (its bytes: the HTTP body limit).
    max_batch_commands: int = 1000
    max_recovery_publications: int = 10000
    max_sse_channels: int = 16


@dataclass(slots=True)
class BrokerSettings:
    # Empty: the embedded broker. redis://host:port/db; several comma-separated
    # redis:// URLs shard channels; redis+cluster://host:port uses Redis Cluster;
    # redis+sentinel://h1:26379,h2:26379/<master-name> follows the master that
    # Redis Sentinel names (also as one shard of a list).
    url: str = ""
    prefix: str = "squall"
    timeout: float = 5.0
    # Seconds a crashed node's clients stay in presence at most.
    presence_ttl: float = 30.0
    # Seconds between checks that no publication was lost on the way.
    position_check_interval: float = 10.0
    # Seconds between reports of this node's stats to the cluster view.
    node_report_interval: float = 5.0
    # After a publish's write, WAIT until this many replicas have it (0: off);
    # fewer within replicas_ack_timeout_ms fail the publish (503; it may
    # still have been delivered). Not on redis+cluster://.
    min_replicas_ack: int = 0
    replicas_ack_timeout_ms: int = 100


@dataclass(slots=True)
class StoreSettings:
    # Empty: the embedded SQLite log in the data directory. mongodb://... or
    # mongodb+srv://...: MongoDB (the database name in the URL's path, else
    # `database`).
    url: str = ""
    database: str = "squall"
    # MongoDB write concern of an append: "majority" or a number of members.
    write_concern: str = "majority"
    journal: bool = True
    # Seconds one store call may take (each try), and how often a failed call
    # is tried again (with backoff doubling from retry_backoff) before the
    # publish fails with 503.
    timeout: float = 5.0
    retries: int = 2
    retry_backoff: float = 0.05
    max_pool_size: int = 50
    min_pool_size: int = 0
    # Seconds between sweeps that delete publications past their namespace's
    # `retention`.
    expire_interval: float = 60.0
    # SQLite "FULL" survives power loss; "NORMAL" only process crashes.
    sqlite_synchronous: str = "FULL"


@dataclass(slots=True)
class SearchSettings:
    # Empty: embedded SQLite FTS5 in the data directory. http(s)://host:port
    # of a cluster, with `engine` elasticsearch or opensearch.
    url: str = ""
    engine: str = ""
    # Name of the index (Elasticsearch/OpenSearch); also the prefix of the
    # index template.
    index: str = "squall-publications"
    # Publications sent to the index per bulk request, and seconds the
    # indexer waits when it has caught up with the log.
    batch_size: int = 500
    interval: float = 0.5
    # Seconds one call to the search cluster may take.
    timeout: float = 10.0
    # Run the background indexer on this node. With several nodes on one
    # store, any number may run it (indexing is idempotent); one is enough.
    indexer: bool = True
    max_limit: int = 100


@dataclass(slots=True)
class DashboardSettings:
    # `squall hash-password` prints one; empty: the dashboard is off.
    password_hash: str = ""
    # Signs the login cookie; empty: generated into <data_dir>/secrets.toml.
    cookie_secret: str = ""
    session_hours: float = 12.0


@dataclass(slots=True)
class ProxySettings:
    # HTTP hooks to the application's back end (docs/auth.md#proxy-hooks).
    # Empty: that hook is off.
    connect_url: str = ""
    # For every namespace, unless it sets proxy_subscribe_url / proxy_publish_url.
    subscribe_url: str = ""
    publish_url: str = ""
    refresh_url: str = ""
    # Seconds one hook call may take (connecting and answering); then the
    # client gets a temporary error. With connect_url, less than
    # limits.connect_timeout.
    timeout: float = 3.0
    # Request headers of the connection passed to the hooks (any case); no
    # others are kept.
    forward_headers: list[str] = field(default_factory=lambda: ["Cookie", "Authorization"])
    # Call the connect hook also when the client sends a (valid) token.
    connect_with_token: bool = False


@dataclass(slots=True)
class PusherWebhook:
    url: str = ""
    # Which events go to this URL (channel_occupied, channel_vacated,
    # member_added, member_removed, client_event); empty: all of them.
    events: list[str] = field(default_factory=list)


@dataclass(slots=True)
class PusherApp:
    """One application of the Pusher Channels protocol (docs/pusher.md)."""

    id: str = ""
    key: str = ""
    secret: str = field(default="", repr=False)
    # The Squall namespace its channels live in; empty: "pusher-<id>", made
    # with presence and join/leave on.
    namespace: str = ""
    # Client events (client-*) on private and presence channels.
    enable_client_messages: bool = False
    # Connections of this app per process; 0: only limits.max_connections.
    max_connections: int = 0
    # Largest event data (bytes), from the HTTP API and client events (Pusher's
    # default: 10 KB); at most limits.max_publication_bytes with the envelope.
    max_event_bytes: int = 10240
    webhooks: list[PusherWebhook] = field(default_factory=list)


@dataclass(slots=True)
class PusherSettings:
    apps: list[PusherApp] = field(default_factory=list)
    # Seconds of silence after which a Pusher client pings (told to it in
    # pusher:connection_established).
    activity_timeout: int = 120
    # Webhooks: events gathered this many seconds into one request; a failed
    # request is tried again this many times, first after webhook_retry_delay
    # seconds, then doubling.
    webhook_batch_delay: float = 0.05
    webhook_retries: int = 5
    webhook_retry_delay: float = 1.0


@dataclass(slots=True)
class NamespaceOptions:
    history_size: int = 100
    history_ttl: float = 600.0
    # Seconds a stream's offset and epoch are kept after its last publication.
    history_meta_ttl: float = 86400.0
    presence: bool = False
    join_leave: bool = False
    allow_publish: bool = False
    allow_anonymous: bool = False
    private: bool = False
    recover: bool = True
    persist: bool = False
    # Seconds a publication stays in the durable log; 0 keeps it forever.
    retention: float = 0.0
    # Index publications for full-text search (needs persist = true).
    searchable: bool = False
    # Dotted paths into the data whose text is indexed, e.g. ["text",
    # "author.name"]; empty indexes every string in the data.
    search_fields: list[str] = field(default_factory=list)
    # This namespace's subscribe / publish hooks (empty: proxy.subscribe_url /
    # proxy.publish_url, if set).
    proxy_subscribe_url: str = ""
    proxy_publish_url: str = ""

    def history_options(self) -> HistoryOptions:
        return HistoryOptions(self.history_size, self.history_ttl, self.history_meta_ttl)


@dataclass(slots=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    search: SearchSettings = field(default_factory=SearchSettings)
    dashboard: DashboardSettings = field(default_factory=DashboardSettings)
    proxy: ProxySettings = field(default_factory=ProxySettings)
    pusher: PusherSettings = field(default_factory=PusherSettings)
    namespaces: dict[str, NamespaceOptions] = field(
        default_factory=lambda: {"default": NamespaceOptions()}
    )

    @property
    def data_path(self) -> Path:
        return Path(self.server.data_dir).expanduser()


SECTIONS: dict[str, type[Any]] = {
    "server": ServerSettings,
    "auth": AuthSettings,
    "limits": LimitSettings,
    "broker": BrokerSettings,
    "store": StoreSettings,
    "search": SearchSettings,
    "dashboard": DashboardSettings,
    "proxy": ProxySettings,
}

# Short names operators script; each maps to a dotted key.
ENV_ALIASES = {
    "SQUALL_BROKER_URL": "broker.url",
    "SQUALL_STORE_URL": "store.url",
    "SQUALL_SEARCH_URL": "search.url",
    "SQUALL_SEARCH_ENGINE": "search.engine",
    "SQUALL_API_KEY": "auth.api_key",
    "SQUALL_TOKEN_SECRET": "auth.token_secret",
    "SQUALL_TOKEN_PUBLIC_KEY": "auth.token_public_key",
    "SQUALL_HOST": "server.host",
    "SQUALL_PORT": "server.port",
    "SQUALL_DATA_DIR": "server.data_dir",
    "SQUALL_LOG_LEVEL": "server.log_level",
    "SQUALL_ALLOWED_ORIGINS": "server.allowed_origins",
}
# Variables that belong to the tooling, not to the server's settings.
ENV_IGNORED = {"SQUALL_CONFIG", "SQUALL_REQUIRE_SERVICES"}

# Positive numbers that must be > 0; everything else numeric must be >= 0.
_POSITIVE = {
    "max_frame_bytes",
    "max_publication_bytes",
    "max_channels_per_connection",
    "commands_per_second",
    "command_burst",
    "max_connections",
    "connect_timeout",
    "send_queue_bytes",
    "send_queue_messages",
    "max_history_limit",
    "max_broadcast_channels",
    "max_batch_commands",
    "max_recovery_publications",
    "max_sse_channels",
    "timeout",
    "presence_ttl",
    "position_check_interval",
    "node_report_interval",
    "replicas_ack_timeout_ms",
    "session_hours",
    "max_pool_size",
    "expire_interval",
    "batch_size",
    "interval",
    "max_limit",
    "jwks_cache_min",
    "jwks_cache_max",
    "jwks_refetch_interval",
    "jwks_timeout",
}
_CHOICES = {
    "server.log_level": {"debug", "info", "warning", "error"},
    "store.sqlite_synchronous": {"FULL", "NORMAL", "EXTRA"},
    "search.engine": {"", "sqlite", "elasticsearch", "opensearch"},
}
_ALGORITHMS = {
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "EdDSA",
}  # fmt: skip


def _field_types(cls: type[Any]) -> dict[str, Any]:
    defaults = cls()
    return {f.name: type(getattr(defaults, f.name)) for f in dataclasses.fields(cls)}


def _coerce(key: str, value: Any, kind: type[Any], *, from_text: bool) -> Any:
    """Check (or, for environment text, parse) one value against its type."""
    name = key.rsplit(".", 1)[-1]
    if kind is bool:
        if from_text and isinstance(value, str):
            low = value.strip().lower()
            if low in {"1", "true", "yes", "on"}:
                return True
            if low in {"0", "false", "no", "off"}:
                return False
            raise ConfigError(key, f"expected true or false, got {value!r}")
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if kind in (int, float):
        if from_text and isinstance(value, str):
            try:
                value = int(value) if kind is int else float(value)
            except ValueError:
                raise ConfigError(key, f"expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        if kind is int and not isinstance(value, int):
            raise ConfigError(key, f"expected a whole number, got {value!r}")
        if name in _POSITIVE and value <= 0:
            raise ConfigError(key, f"must be greater than 0, got {value!r}")
        if value < 0:
            raise ConfigError(key, f"must not be negative, got {value!r}")
        if name == "port" and value > 65535:
            raise ConfigError(key, f"must be a TCP port (0-65535; 0 picks one), got {value!r}")
        return kind(value)
    if kind is list:
        if from_text and isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, f"expected a list of strings, got {value!r}")
        return list(value)
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a string, got {value!r}")
    return value


def _apply_section(section: str, obj: Any, values: Mapping[str, Any], *, from_text: bool) -> None:
    types = _field_types(type(obj))
    for name, value in values.items():
        key = f"{section}.{name}"
        if name not in types:
            known = ", ".join(sorted(types))
            raise ConfigError(key, f"unknown setting (known: {known})")
        setattr(obj, name, _coerce(key, value, types[name], from_text=from_text))


def _apply_namespaces(settings: Settings, tables: Any) -> None:
    if not isinstance(tables, dict):
        raise ConfigError("namespaces", "expected tables [namespaces.<name>]")
    from server.channels import NAMESPACE_RE  # a cycle at import time otherwise

    for name, values in tables.items():
        key = f"namespaces.{name}"
        if not NAMESPACE_RE.fullmatch(name):
            raise ConfigError(key, "a namespace name is 1-64 of a-z, A-Z, 0-9, '_', '-', '.'")
        if not isinstance(values, dict):
            raise ConfigError(key, "expected a table of options")
        ns = dataclasses.replace(settings.namespaces.get(name, NamespaceOptions()))
        _apply_section(key, ns, values, from_text=False)
        settings.namespaces[name] = ns


PUSHER_EVENTS = frozenset(
    {"channel_occupied", "channel_vacated", "member_added", "member_removed", "client_event"}
)


def _apply_pusher(settings: Settings, values: Any) -> None:
    """``[pusher]`` with ``[[pusher.apps]]`` tables, each with
    ``[[pusher.apps.webhooks]]``."""
    if not isinstance(values, dict):
        raise ConfigError("pusher", "expected a table")
    values = dict(values)
    apps = values.pop("apps", [])
    _apply_section("pusher", settings.pusher, values, from_text=False)
    if not isinstance(apps, list):
        raise ConfigError("pusher.apps", "expected [[pusher.apps]] tables")
    for i, table in enumerate(apps):
        key = f"pusher.apps[{i}]"
        if not isinstance(table, dict):
            raise ConfigError(key, "expected a table")
        table = dict(table)
        hooks = table.pop("webhooks", [])
        app = PusherApp()
        _apply_section(key, app, table, from_text=False)
        if not isinstance(hooks, list):
            raise ConfigError(f"{key}.webhooks", "expected [[pusher.apps.webhooks]] tables")
        for j, hook_table in enumerate(hooks):
            hook_key = f"{key}.webhooks[{j}]"
            if not isinstance(hook_table, dict):
                raise ConfigError(hook_key, "expected a table")
            hook = PusherWebhook()
            _apply_section(hook_key, hook, hook_table, from_text=False)
            app.webhooks.append(hook)
        settings.pusher.apps.append(app)


def _validate_pusher(settings: Settings) -> None:
    """Each app: an id, a key and a secret, all distinct between apps; its
    namespace, made with presence on when the configuration has none."""
    from server.channels import NAMESPACE_RE  # a cycle at import time otherwise

    pusher = settings.pusher
    if pusher.activity_timeout < 1:
        raise ConfigError("pusher.activity_timeout", "must be at least 1 second")
    for name in ("webhook_batch_delay", "webhook_retries", "webhook_retry_delay"):
        if getattr(pusher, name) < 0:
            raise ConfigError(f"pusher.{name}", "must be >= 0")
    ids: set[str] = set()
    keys: set[str] = set()
    for i, app in enumerate(pusher.apps):
        key = f"pusher.apps[{i}]"
        if not re.fullmatch(r"[A-Za-z0-9_\-]{1,64}", app.id):
            raise ConfigError(f"{key}.id", "1-64 of A-Z a-z 0-9 _ -")
        if not re.fullmatch(r"[A-Za-z0-9_\-]{1,64}", app.key):
            raise ConfigError(f"{key}.key", "1-64 of A-Z a-z 0-9 _ -")
        if len(app.secret) < 16:
            raise ConfigError(f"{key}.secret", "must be at least 16 characters")
        if app.id in ids:
            raise ConfigError(f"{key}.id", f"app id {app.id!r} is used twice")
        if app.key in keys:
            raise ConfigError(f"{key}.key", "the same key is used by two apps")
        ids.add(app.id)
        keys.add(app.key)
        if app.max_connections < 0:
            raise ConfigError(f"{key}.max_connections", "must be >= 0")
        if app.max_event_bytes < 1:
            raise ConfigError(f"{key}.max_event_bytes", "must be >= 1")
        if not app.namespace:
            app.namespace = f"pusher-{app.id}"
        if not NAMESPACE_RE.fullmatch(app.namespace):
            raise ConfigError(f"{key}.namespace", "1-64 of a-z, A-Z, 0-9, '_', '-', '.'")
        # Squall's own clients need subscription tokens on it (Pusher clients
        # are authorized by the app's signatures): private by default.
        settings.namespaces.setdefault(
            app.namespace,
            NamespaceOptions(presence=True, join_leave=True, private=True, allow_publish=False),
        )
        if not settings.namespaces[app.namespace].presence:
            raise ConfigError(
                f"namespaces.{app.namespace}.presence", "a Pusher app's namespace needs presence"
            )
        for j, hook in enumerate(app.webhooks):
            hook_key = f"{key}.webhooks[{j}]"
            parts = urlsplit(hook.url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(f"{hook_key}.url", "expected an http:// or https:// URL")
            unknown = set(hook.events) - PUSHER_EVENTS
            if unknown:
                raise ConfigError(
                    f"{hook_key}.events",
                    f"unknown events {sorted(unknown)} (known: {sorted(PUSHER_EVENTS)})",
                )
    namespaces = [app.namespace for app in pusher.apps]
    if len(set(namespaces)) != len(namespaces):
        raise ConfigError("pusher.apps", "two apps share a namespace")


def _set_dotted(settings: Settings, dotted: str, text: str) -> None:
    section, _, name = dotted.partition(".")
    _apply_section(section, getattr(settings, section), {name: text}, from_text=True)


def _apply_env(settings: Settings, env: Mapping[str, str]) -> None:
    for var, text in sorted(env.items()):
        if not var.startswith("SQUALL_") or var in ENV_IGNORED:
            continue
        if var in ENV_ALIASES:
            _set_dotted(settings, ENV_ALIASES[var], text)
            continue
        rest = var[len("SQUALL_") :].lower()
        section, _, name = rest.partition("_")
        if section in SECTIONS and name:
            try:
                _set_dotted(settings, f"{section}.{name}", text)
            except ConfigError as exc:
                raise ConfigError(f"{exc.key} (from ${var})", exc.problem) from None
        # Other SQUALL_* variables belong to tools (tests, scripts): not ours.


def _validate(settings: Settings) -> None:
    _validate_pusher(settings)
    for dotted, choices in _CHOICES.items():
        section, _, name = dotted.partition(".")
        value = getattr(getattr(settings, section), name)
        if value not in choices:
            raise ConfigError(dotted, f"must be one of {sorted(choices)}, got {value!r}")
    bad = [a for a in settings.auth.token_algorithms if a not in _ALGORITHMS]
    if bad or not settings.auth.token_algorithms:
        raise ConfigError(
            "auth.token_algorithms", f"must be a non-empty list of {sorted(_ALGORITHMS)}"
        )
    uses_hs = any(a.startswith("HS") for a in settings.auth.token_algorithms)
    uses_pk = any(not a.startswith("HS") for a in settings.auth.token_algorithms)
    if uses_hs and uses_pk:
        # One key family per deployment: mixing them is how HS/RS confusion starts.
        raise ConfigError(
            "auth.token_algorithms", "do not mix HMAC (HS*) and public-key algorithms"
        )
    if settings.auth.jwks_url:
        _validate_jwks(settings.auth, uses_hs)
    elif uses_pk and not settings.auth.token_public_key:
        raise ConfigError(
            "auth.token_public_key", "required for RS*/ES*/PS*/EdDSA algorithms (or auth.jwks_url)"
        )
    if settings.auth.token_secret and len(settings.auth.token_secret.encode()) < 32:
        # RFC 7518 3.2: an HS256 key must be at least as long as the hash.
        raise ConfigError("auth.token_secret", "must be at least 32 bytes long")
    if settings.auth.api_key and len(settings.auth.api_key) < 16:
        raise ConfigError("auth.api_key", "must be at least 16 characters")
    _validate_broker(settings.broker)
    _validate_store_and_search(settings)
    _validate_proxy(settings)
    limits = settings.limits
    if limits.max_frame_bytes < limits.max_publication_bytes + 1024:
        raise ConfigError(
            "limits.max_frame_bytes", "must be at least max_publication_bytes + 1024 (envelope)"
        )
    if limits.ping_interval and limits.ping_timeout > limits.ping_interval:
        raise ConfigError("limits.ping_timeout", "must not be longer than limits.ping_interval")
    if "default" not in settings.namespaces:
        settings.namespaces["default"] = NamespaceOptions()
    if settings.server.demo:
        # The demo room keeps its messages (durably) so a page that was away,
        # or a server restart, loses nothing; typing notices are ephemeral.
        settings.namespaces.setdefault(
            "demo",
            NamespaceOptions(allow_publish=True, presence=True, join_leave=True, persist=True,
                             history_size=1000, history_ttl=86400.0),
        )  # fmt: skip
        settings.namespaces.setdefault(
            "demo_live", NamespaceOptions(allow_publish=True, history_size=0, recover=False)
        )
    if settings.dashboard.password_hash and not settings.dashboard.password_hash.startswith(
        "pbkdf2_sha256$"
    ):
        raise ConfigError("dashboard.password_hash", "make one with `squall hash-password`")
    for name, ns in settings.namespaces.items():
        if ns.history_size > 0 and ns.history_ttl <= 0:
            raise ConfigError(f"namespaces.{name}.history_ttl", "must be > 0 when history_size > 0")
        if ns.join_leave and not ns.presence:
            raise ConfigError(f"namespaces.{name}.join_leave", "needs presence = true")
        if ns.recover and ns.history_size == 0 and not ns.persist:
            raise ConfigError(
                f"namespaces.{name}.recover", "needs history_size > 0 or persist = true"
            )
        if ns.searchable and not ns.persist:
            # The index is fed from the durable log.
            raise ConfigError(f"namespaces.{name}.searchable", "needs persist = true")
        if ns.retention and not ns.persist:
            raise ConfigError(f"namespaces.{name}.retention", "needs persist = true")
        for path in ns.search_fields:
            if not path or any(not part for part in path.split(".")):
                raise ConfigError(
                    f"namespaces.{name}.search_fields", f"bad field path {path!r} (a.b.c)"
                )


def _validate_broker(broker: BrokerSettings) -> None:
    from server.broker import SENTINEL_SCHEME, SentinelURL, safe_broker_url, split_broker_urls

    urls = split_broker_urls(broker.url)
    for url in urls:
        scheme = urlsplit(url).scheme
        if scheme not in ("redis", "rediss", "redis+cluster", SENTINEL_SCHEME):
            raise ConfigError(
                "broker.url",
                "expected redis://, rediss://, redis+cluster:// or redis+sentinel:// URLs, "
                f"got {safe_broker_url(url)!r}",
            )
        if scheme == SENTINEL_SCHEME:
            try:
                target = SentinelURL.parse(url)
            except ValueError as exc:
                raise ConfigError("broker.url", f"{safe_broker_url(url)}: {exc}") from None
            if target.options:
                raise ConfigError(
                    "broker.url",
                    f"{safe_broker_url(url)}: unknown option(s) {sorted(target.options)}; "
                    "known: db, password, username, sentinel_password, sentinel_username",
                )
    if broker.url.count("redis+cluster://") not in (0, broker.url.count("://")):
        raise ConfigError("broker.url", "do not mix redis+cluster:// with other URLs")
    if broker.min_replicas_ack:
        if not urls:
            raise ConfigError("broker.min_replicas_ack", "needs a Redis broker (broker.url)")
        if "redis+cluster://" in broker.url:
            raise ConfigError("broker.min_replicas_ack", "is not supported with redis+cluster://")
        if broker.replicas_ack_timeout_ms >= broker.timeout * 1000:
            # The WAIT would outlast the command's socket timeout.
            raise ConfigError(
                "broker.replicas_ack_timeout_ms", "must be shorter than broker.timeout"
            )


def _validate_jwks(auth: AuthSettings, uses_hs: bool) -> None:
    """One source of keys: the provider's key set, never beside a static key."""
    parts = urlsplit(auth.jwks_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("auth.jwks_url", "expected an http:// or https:// URL")
    if uses_hs:
        raise ConfigError(
            "auth.token_algorithms",
            "a key set (auth.jwks_url) verifies public-key algorithms only "
            "(RS256, ES256, EdDSA, ...), not HS*",
        )
    if auth.token_public_key:
        raise ConfigError(
            "auth.token_public_key",
            "set either token_public_key or jwks_url, not both: with jwks_url the keys "
            "come from the provider",
        )
    if auth.token_secret:
        raise ConfigError(
            "auth.token_secret",
            "not used with auth.jwks_url (tokens are signed by the provider's keys): remove it",
        )
    if auth.jwks_cache_max < auth.jwks_cache_min:
        raise ConfigError("auth.jwks_cache_max", "must not be less than auth.jwks_cache_min")


def _check_hook_url(key: str, url: str) -> None:
    if not url:
        return
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(key, f"expected an http:// or https:// URL, got {url!r}")


_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _validate_proxy(settings: Settings) -> None:
    proxy = settings.proxy
    for name in ("connect_url", "subscribe_url", "publish_url", "refresh_url"):
        _check_hook_url(f"proxy.{name}", getattr(proxy, name))
    for ns_name, ns in settings.namespaces.items():
        _check_hook_url(f"namespaces.{ns_name}.proxy_subscribe_url", ns.proxy_subscribe_url)
        _check_hook_url(f"namespaces.{ns_name}.proxy_publish_url", ns.proxy_publish_url)
    if proxy.connect_url and proxy.timeout >= settings.limits.connect_timeout:
        raise ConfigError(
            "proxy.timeout",
            f"must be less than limits.connect_timeout ({settings.limits.connect_timeout:g} s), "
            "or slow connect hooks would close connections as timed out",
        )
    seen: set[str] = set()
    for header in proxy.forward_headers:
        if not _HEADER_NAME.fullmatch(header):
            raise ConfigError("proxy.forward_headers", f"{header!r} is not an HTTP header name")
        if header.lower() in seen:
            raise ConfigError("proxy.forward_headers", f"{header!r} is listed twice")
        seen.add(header.lower())
    if proxy.connect_with_token and not proxy.connect_url:
        raise ConfigError("proxy.connect_with_token", "needs proxy.connect_url")


def _validate_store_and_search(settings: Settings) -> None:
    store = settings.store
    if store.url and urlsplit(store.url).scheme not in ("mongodb", "mongodb+srv"):
        raise ConfigError(
            "store.url", f"expected mongodb:// or mongodb+srv:// (empty: SQLite), got {store.url!r}"
        )
    wc = store.write_concern
    if wc != "majority" and not (wc.isdigit() and int(wc) >= 1):
        raise ConfigError("store.write_concern", f"must be 'majority' or a number >= 1, got {wc!r}")
    if store.min_pool_size > store.max_pool_size:
        raise ConfigError("store.min_pool_size", "must not be more than store.max_pool_size")
    search = settings.search
    if search.url:
        if urlsplit(search.url).scheme not in ("http", "https"):
            raise ConfigError("search.url", f"expected http:// or https://, got {search.url!r}")
        if search.engine not in ("elasticsearch", "opensearch"):
            raise ConfigError(
                "search.engine",
                "set elasticsearch or opensearch for a search cluster at search.url",
            )
    elif search.engine not in ("", "sqlite"):
        raise ConfigError("search.url", f"required with search.engine = {search.engine!r}")
    if not search.index or search.index != search.index.lower() or " " in search.index:
        raise ConfigError("search.index", "must be a lowercase name without spaces")


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    *,
    raw: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build validated settings from a TOML file (or the same tables as
    ``raw``), then the environment, then ``overrides`` (dotted keys, from flags)."""
    if config_file is not None:
        path = Path(config_file)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError("--config", f"file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None
    settings = Settings()
    for section, values in (raw or {}).items():
        if section == "namespaces":
            _apply_namespaces(settings, values)
        elif section == "pusher":
            _apply_pusher(settings, values)
        elif section in SECTIONS:
            if not isinstance(values, dict):
                raise ConfigError(section, "expected a table")
            _apply_section(section, getattr(settings, section), values, from_text=False)
        else:
            known = ", ".join([*sorted(SECTIONS), "namespaces", "pusher"])
            raise ConfigError(section, f"unknown section (known: {known})")
    _apply_env(settings, os.environ if env is None else env)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, name = dotted.partition(".")
        _apply_section(section, getattr(settings, section), {name: value}, from_text=False)
    _validate(settings)
    return settings


SECRETS_FILE = "secrets.toml"


def ensure_secrets(settings: Settings) -> Path | None:
    """Fill a missing token secret or API key from ``<data_dir>/secrets.toml``,
    generating that file (mode 0600) on first run. Returns its path when it was
    used, or None when configuration supplied both secrets."""
    uses_hs = any(a.startswith("HS") for a in settings.auth.token_algorithms)
    need_secret = uses_hs and not settings.auth.token_secret
    need_key = not settings.auth.api_key
    need_cookie = not settings.dashboard.cookie_secret
    if not (need_secret or need_key or need_cookie):
        return None
    path = settings.data_path / SECRETS_FILE
    stored: dict[str, Any] = {}
    if path.exists():
        try:
            stored = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(str(path), f"not valid TOML: {exc}") from None
    changed = False
    for name in ("token_secret", "api_key", "cookie_secret"):
        if not isinstance(stored.get(name), str) or len(stored[name]) < 16:
            stored[name] = secrets.token_urlsafe(32)
            changed = True
    if changed:
        path.parent.mkdir(parents=True, exist_ok=True)
        body = "".join(f'{k} = "{v}"\n' for k, v in sorted(stored.items()))
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("# Generated by squall on first run. Keep private.\n" + body)
        os.replace(tmp, path)
    if need_secret:
        settings.auth.token_secret = stored["token_secret"]
    if need_key:
        settings.auth.api_key = stored["api_key"]
    if need_cookie:
        settings.dashboard.cookie_secret = stored["cookie_secret"]
    return path if (need_secret or need_key) else None
