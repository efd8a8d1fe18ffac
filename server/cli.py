"""The ``squall`` command: ``serve``, ``token``, ``check-config``, ``reindex``,
``log export``, ``hash-password``.

Exit codes: 0 success, 2 bad configuration or usage, 1 anything else.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from server import __version__
from server.broker import BrokerUnavailable
from server.config import ConfigError, Settings, ensure_secrets, load_settings
from server.store import StoreUnavailable

log = logging.getLogger("squall")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="TOML config file (default: $SQUALL_CONFIG)")
    parser.add_argument("--data-dir", help="data directory (secrets, SQLite log)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="squall", description="Squall real-time event server")
    parser.add_argument("--version", action="version", version=f"squall {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server")
    _add_config_flags(serve)
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8000)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument(
        "--workers",
        default="1",
        help="worker processes: a number or 'auto' (one per core); above 1 needs Redis",
    )
    serve.add_argument(
        "--worker-ports",
        action="store_true",
        help="worker i listens on port+i (for HAProxy) instead of all sharing the port",
    )
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--listen-fds", help=argparse.SUPPRESS)

    token = sub.add_parser("token", help="print a connection or subscription JWT")
    _add_config_flags(token)
    token.add_argument("--sub", required=True, help="user id (the 'sub' claim)")
    token.add_argument("--ttl", type=float, default=3600, help="seconds until expiry")
    token.add_argument("--channel", help="make a subscription token for this channel")
    token.add_argument("--client", help="bind a subscription token to one client id")
    token.add_argument("--channels", help="comma-separated server-side subscriptions")
    token.add_argument("--info", help="JSON for the 'info' claim")
    token.add_argument("--private-key", help="PEM file, for RS256/ES256 deployments")

    sub.add_parser(
        "hash-password", help="hash a dashboard password (read from stdin) for the config"
    )

    reindex = sub.add_parser(
        "reindex", help="rebuild the search index from the durable log (progress on stderr)"
    )
    _add_config_flags(reindex)
    reindex.add_argument("--batch", type=int, default=500, help="publications per bulk request")

    log_cmd = sub.add_parser("log", help="the durable log")
    log_sub = log_cmd.add_subparsers(dest="log_command", required=True)
    export = log_sub.add_parser("export", help="write the log as JSON lines, oldest first")
    _add_config_flags(export)
    export.add_argument("--channel", help="only this channel (default: every channel)")
    export.add_argument("--output", "-o", help="file to write (default: stdout)")

    check = sub.add_parser("check-config", help="validate the configuration and exit")
    _add_config_flags(check)
    check.add_argument("--host")
    check.add_argument("--port", type=int)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    import os

    config = args.config or os.environ.get("SQUALL_CONFIG") or None
    overrides: dict[str, Any] = {
        "server.data_dir": getattr(args, "data_dir", None),
        "server.host": getattr(args, "host", None),
        "server.port": getattr(args, "port", None),
        "server.log_level": getattr(args, "log_level", None),
    }
    return load_settings(config, overrides=overrides)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "hash-password":
        return _hash_password()
    try:
        settings = _settings(args)
        if args.command == "check-config":
            return _check_config(settings)
        if args.command == "reindex":
            return _reindex(settings, args)
        if args.command == "log":
            return _export(settings, args)
        secrets_path = ensure_secrets(settings)
        if args.command == "token":
            return _token(settings, args)
        return _serve_command(settings, secrets_path, args, argv)
    except ConfigError as exc:
        print(f"squall: {exc}", file=sys.stderr)
        return 2


def _worker_argv(argv: list[str]) -> list[str]:
    """The command line minus what only the supervisor uses."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--workers", "--port"):
            skip = True
            continue
        if arg.startswith(("--workers=", "--port=")) or arg == "--worker-ports":
            continue
        out.append(arg)
    return out


def _serve_command(
    settings: Settings, secrets_path: Path | None, args: argparse.Namespace, argv: list[str]
) -> int:
    from server.supervisor import supervise, worker_count

    try:
        workers = worker_count(args.workers)
    except ValueError:
        raise ConfigError(
            "--workers", f"expected a number >= 1 or 'auto', got {args.workers!r}"
        ) from None
    if args.worker_index is not None:
        settings.server.node_name = (
            f"{settings.server.node_name or socket.gethostname()}-w{args.worker_index}"
        )
    if workers == 1:
        fds = [int(fd) for fd in args.listen_fds.split(",")] if args.listen_fds else None
        worker = args.worker_index is not None
        return serve(settings, secrets_path, listen_fds=fds, banner=not worker, worker=worker)
    if not settings.broker.url:
        raise ConfigError(
            "--workers",
            "more than one worker needs a Redis broker (broker.url / SQUALL_BROKER_URL): "
            "with the embedded broker each worker would be an island",
        )
    _setup_logging(settings.server.log_level)

    def on_listening(port: int, pid: int) -> None:
        print(_banner(settings, port, f"{workers} workers, supervisor pid {pid}", secrets_path),
              flush=True)  # fmt: skip

    return supervise(
        settings, _worker_argv(argv), workers, separate_ports=args.worker_ports,
        on_listening=on_listening,
    )  # fmt: skip


def _reindex(settings: Settings, args: argparse.Namespace) -> int:
    from server.maintenance import reindex
    from server.search import SearchUnavailable
    from server.store import StoreUnavailable

    if args.batch < 1:
        raise ConfigError("--batch", "must be at least 1")
    started = time.monotonic()
    try:
        read, held = asyncio.run(reindex(settings, batch=args.batch))
    except ValueError as exc:
        raise ConfigError("namespaces", str(exc)) from None
    except (StoreUnavailable, SearchUnavailable) as exc:
        print(f"squall: reindex failed: {exc}", file=sys.stderr)
        return 1
    print(
        f"reindexed {read:,} publications from the log in {time.monotonic() - started:.1f}s; "
        f"the index holds {held:,} documents"
    )
    return 0


def _export(settings: Settings, args: argparse.Namespace) -> int:
    from server.maintenance import export_log
    from server.store import StoreUnavailable

    if args.channel is not None:
        from server.channels import Channels
        from server.errors import SquallError

        try:
            Channels(settings).resolve(args.channel)
        except SquallError as exc:
            raise ConfigError("--channel", exc.message) from None
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        count = asyncio.run(export_log(settings, channel=args.channel, out=out))
    except StoreUnavailable as exc:
        print(f"squall: export failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"exported {count:,} publications", file=sys.stderr)
    return 0


def _hash_password() -> int:
    import getpass

    from server.auth import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("Dashboard password: ")
    else:
        password = sys.stdin.readline().rstrip("\n")
    if len(password) < 8:
        print("squall: a dashboard password needs at least 8 characters", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0


def _check_config(settings: Settings) -> int:
    names = ", ".join(sorted(settings.namespaces))
    print(
        f"config OK: listen {settings.server.host}:{settings.server.port}, "
        f"data {settings.data_path}, namespaces: {names}"
    )
    if settings.broker.url:
        from server.broker import safe_broker_url

        # (Never a password: no user info, no query.)
        acks = settings.broker.min_replicas_ack
        waits = (
            f", min_replicas_ack {acks} ({settings.broker.replicas_ack_timeout_ms} ms)"
            if acks
            else ""
        )
        print(f"broker: {safe_broker_url(settings.broker.url)}{waits}")
    for app in settings.pusher.apps:
        # (Never the secret.)
        hooks = f", {len(app.webhooks)} webhook(s)" if app.webhooks else ""
        print(
            f"pusher app {app.id}: key {app.key}, namespace {app.namespace}, client events "
            f"{'on' if app.enable_client_messages else 'off'}{hooks}"
        )
    if settings.auth.jwks_url:
        return _check_jwks(settings)
    return 0


def _check_jwks(settings: Settings) -> int:
    """Fetch the identity provider's key set once and say which keys it has
    (key ids and algorithms only: no key material, no URL credentials)."""
    from server.jwks import JWKSCache, JWKSError, safe_url

    auth = settings.auth
    cache = JWKSCache(
        auth.jwks_url,
        auth.token_algorithms,
        cache_min=auth.jwks_cache_min,
        cache_max=auth.jwks_cache_max,
        timeout=auth.jwks_timeout,
    )
    try:
        keys, lifetime = asyncio.run(cache.fetch_once())
    except JWKSError as exc:
        print(f"squall: auth.jwks_url: {exc}", file=sys.stderr)
        return 1
    shown = safe_url(auth.jwks_url)
    print(f"jwks OK: {shown}: {len(keys.keys)} signing keys, kept {lifetime:.0f}s")
    for key in keys.keys:
        print(f"  kid {key.kid or '(none)'}: {key.kty}, {', '.join(sorted(key.algorithms))}")
    for why in keys.skipped:
        print(f"  left out {why}")
    return 0


def _token(settings: Settings, args: argparse.Namespace) -> int:
    from server.auth import mint_token

    info = None
    if args.info:
        try:
            info = json.loads(args.info)
        except json.JSONDecodeError as exc:
            raise ConfigError("--info", f"not valid JSON: {exc}") from None
    private_key = None
    if args.private_key:
        private_key = Path(args.private_key).read_text(encoding="utf-8")
    channels = [c.strip() for c in args.channels.split(",") if c.strip()] if args.channels else None
    try:
        print(
            mint_token(
                settings.auth,
                sub=args.sub,
                ttl=args.ttl,
                channel=args.channel,
                client=args.client,
                info=info,
                channels=channels,
                private_key=private_key,
            )
        )
    except ValueError as exc:
        raise ConfigError("--private-key", str(exc)) from None
    return 0


def _banner(settings: Settings, port: int, what: str, secrets_path: Path | None) -> str:
    host = settings.server.host
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104 - display only
    base = f"{shown}:{port}"
    lines = [
        f"Squall {__version__} serving on http://{base}/ ({what})",
        f"  WebSocket: ws://{base}/connection/websocket",
        f"  SSE:       http://{base}/connection/sse?channel=<name>",
        f"  Centrifugo SDKs: ws://{base}/connection/centrifuge/websocket",
        f"  HTTP API:  http://{base}/api/<method>  (Authorization: apikey <key>)",
    ]
    if settings.server.demo:
        lines.append(f"  Demo room: http://{base}/demo")
    if secrets_path is not None:
        lines.append(f"  Secrets:   {secrets_path} (token secret and API key)")
    lines.append(f"  Mint a token: squall token --data-dir {settings.data_path} --sub <user>")
    return "\n".join(lines)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def serve(
    settings: Settings,
    secrets_path: Path | None,
    *,
    listen_fds: list[int] | None = None,
    banner: bool = True,
    worker: bool = False,
) -> int:
    _setup_logging(settings.server.log_level)
    _install_uvloop()
    try:
        return asyncio.run(_serve(settings, secrets_path, listen_fds, banner, worker))
    except OSError as exc:
        print(
            f"squall: cannot listen on {settings.server.host}:{settings.server.port}: {exc}",
            file=sys.stderr,
        )
        return 1


def _watch_parent(stop: asyncio.Event, interval: float = 1.0) -> None:
    """A worker whose supervisor is gone (killed, out of memory) drains and
    exits instead of holding its connections and the port forever."""
    parent = os.getppid()
    loop = asyncio.get_running_loop()

    def check() -> None:
        if os.getppid() != parent:
            log.warning("the supervisor (pid %d) is gone: draining", parent)
            stop.set()
        else:
            loop.call_later(interval, check)

    loop.call_later(interval, check)


# Allocations of GC-tracked objects between young collections (CPython's
# default is 700). A server allocates in bursts and keeps long-lived
# connections; collecting every 700 allocations cost ~7 % of the CPU of a
# fan-out at 10,000 deliveries/s here, almost all of it finding nothing.
GC_YOUNG_THRESHOLD = 10_000


def tune_gc() -> None:
    """What the process built to start (modules, settings, the app) lives as
    long as it does: freeze it out of every future collection, and collect
    young objects less often. Cycles among later objects are still found."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


async def _serve(
    settings: Settings,
    secrets_path: Path | None,
    listen_fds: list[int] | None,
    banner: bool,
    worker: bool = False,
) -> int:
    import tornado.netutil

    from server.app import http_server, make_app
    from server.node import Node
    from server.supervisor import LISTEN_BACKLOG

    node = Node(settings)
    try:
        await node.start()
    except BrokerUnavailable as exc:
        print(f"squall: broker unavailable: {exc}", file=sys.stderr)
        return 1
    except StoreUnavailable as exc:
        print(f"squall: store unavailable: {exc}", file=sys.stderr)
        return 1
    app = make_app(node)
    server = http_server(node, app, xheaders=True, idle_connection_timeout=60)
    tune_gc()
    try:
        if listen_fds:
            # A worker: accept on the supervisor's socket.
            sockets = [socket.socket(fileno=fd) for fd in listen_fds]
            for sock in sockets:
                sock.setblocking(False)
        else:
            sockets = tornado.netutil.bind_sockets(
                settings.server.port, settings.server.host, backlog=LISTEN_BACKLOG
            )
    except OSError:
        await node.close()
        raise
    server.add_sockets(sockets)
    port = sockets[0].getsockname()[1]  # the real one when port 0 asked for any
    if banner:
        print(_banner(settings, port, f"node {node.node_id}", secrets_path), flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if worker:
        _watch_parent(stop)
    await stop.wait()
    log.info(
        "draining: up to %.1fs for %d connections", settings.server.drain_grace, len(node.sessions)
    )
    node.draining = True
    await node.drain()
    server.stop()
    await node.close()
    log.info("stopped")
    return 0
