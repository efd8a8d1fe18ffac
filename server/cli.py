"""The ``squall`` command: ``serve``, ``token``, ``check-config``.

Exit codes: 0 success, 2 bad configuration or usage, 1 anything else.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from server import __version__
from server.config import ConfigError, Settings, ensure_secrets, load_settings

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

    token = sub.add_parser("token", help="print a connection or subscription JWT")
    _add_config_flags(token)
    token.add_argument("--sub", required=True, help="user id (the 'sub' claim)")
    token.add_argument("--ttl", type=float, default=3600, help="seconds until expiry")
    token.add_argument("--channel", help="make a subscription token for this channel")
    token.add_argument("--client", help="bind a subscription token to one client id")
    token.add_argument("--channels", help="comma-separated server-side subscriptions")
    token.add_argument("--info", help="JSON for the 'info' claim")
    token.add_argument("--private-key", help="PEM file, for RS256/ES256 deployments")

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
    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args)
        if args.command == "check-config":
            return _check_config(settings)
        secrets_path = ensure_secrets(settings)
        if args.command == "token":
            return _token(settings, args)
        return serve(settings, secrets_path)
    except ConfigError as exc:
        print(f"squall: {exc}", file=sys.stderr)
        return 2


def _check_config(settings: Settings) -> int:
    names = ", ".join(sorted(settings.namespaces))
    print(
        f"config OK: listen {settings.server.host}:{settings.server.port}, "
        f"data {settings.data_path}, namespaces: {names}"
    )
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


def serve(settings: Settings, secrets_path: Path | None) -> int:
    _setup_logging(settings.server.log_level)
    _install_uvloop()
    try:
        return asyncio.run(_serve(settings, secrets_path))
    except OSError as exc:
        print(
            f"squall: cannot listen on {settings.server.host}:{settings.server.port}: {exc}",
            file=sys.stderr,
        )
        return 1


async def _serve(settings: Settings, secrets_path: Path | None) -> int:
    import tornado.httpserver
    import tornado.netutil

    from server.app import make_app, max_body_size
    from server.node import Node

    node = Node(settings)
    await node.start()
    app = make_app(node)
    server = tornado.httpserver.HTTPServer(
        app, max_body_size=max_body_size(node), xheaders=True, idle_connection_timeout=60
    )
    try:
        sockets = tornado.netutil.bind_sockets(settings.server.port, settings.server.host)
    except OSError:
        await node.close()
        raise
    server.add_sockets(sockets)
    port = sockets[0].getsockname()[1]  # the real one when port 0 asked for any
    host = settings.server.host
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104 - display only
    base = f"{shown}:{port}"
    lines = [
        f"Squall {__version__} serving on http://{base}/ (node {node.node_id})",
        f"  WebSocket: ws://{base}/connection/websocket",
        f"  SSE:       http://{base}/connection/sse?channel=<name>",
        f"  HTTP API:  http://{base}/api/<method>  (Authorization: apikey <key>)",
    ]
    if secrets_path is not None:
        lines.append(f"  Secrets:   {secrets_path} (token secret and API key)")
    lines.append(f"  Mint a token: squall token --data-dir {settings.data_path} --sub <user>")
    print("\n".join(lines), flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
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
