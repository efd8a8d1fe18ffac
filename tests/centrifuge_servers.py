"""Two servers that speak the Centrifugo client protocol, on one setup, so
one SDK scenario runs on either: Squall (``/connection/centrifuge/websocket``)
and the reference server, Centrifugo v6 (built once into the cache by
``scripts/build-test-services.sh``).

Both run as processes on a fixed free loopback port (a restart keeps it),
with the same secret, API key and namespaces:

- ``chat``: history, recovery, presence, join/leave, client publish;
- ``secret``: private (a subscription token is needed), history, recovery;
- ``durable``: history, recovery, client publish; on Squall written to the
  durable log, so it survives a restart (Centrifugo's memory engine does not:
  ``durable`` is False there);
- the default namespace: history and recovery, no client publish.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import jwt

from tests.services import CACHE, ROOT, free_port, port_open, require, stop_process, wait_until

SECRET = "cent-test-secret-0123456789abcdef0123"
API_KEY = "cent-test-api-key-0123456789"
CENTRIFUGO_VERSION = "v6.9.1"
# Short enough that an SDK sees several server pings within a test.
PING_INTERVAL = 5


def centrifugo_binary() -> Path:
    return CACHE / f"centrifugo-{CENTRIFUGO_VERSION}" / "centrifugo"


class CentServer:
    """What an SDK scenario needs of a server."""

    name = ""
    durable = False
    ws_path = ""
    api_header: tuple[str, str] = ("", "")

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"squall-{self.name}-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{self.ws_path}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith("SQUALL_")}

    def start(self) -> CentServer:
        log = self.dir / "server.log"
        with log.open("ab") as out:
            self.proc = proc = subprocess.Popen(
                self._command(), stdout=out, stderr=out, env=self._env(), cwd=ROOT
            )
        wait_until(lambda: port_open(self.port) or proc.poll() is not None, 30, self.name)
        if proc.poll() is not None:
            self.proc = None
            raise RuntimeError(f"{self.name} exited: {log.read_text()[-4000:]}")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        wait_until(lambda: not port_open(self.port), 10, f"{self.name} port to close")
        self.start()

    def log(self) -> str:
        path = self.dir / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # ---- tokens and the HTTP API -------------------------------------------

    @staticmethod
    def token(sub: str, ttl: float = 3600, **claims: Any) -> str:
        now = int(time.time())
        return jwt.encode({"sub": sub, "iat": now, "exp": now + ttl, **claims}, SECRET, "HS256")

    @staticmethod
    def sub_token(sub: str, channel: str, ttl: float = 3600) -> str:
        now = int(time.time())
        claims = {"sub": sub, "channel": channel, "iat": now, "exp": now + ttl}
        return jwt.encode(claims, SECRET, "HS256")

    def publish(self, channel: str, data: Any) -> dict[str, Any]:
        """Publish over the server's HTTP API; returns its answer."""
        body = json.dumps({"channel": channel, "data": data}).encode()
        request = urllib.request.Request(
            f"{self.http_url}/api/publish",
            data=body,
            headers={"Content-Type": "application/json", self.api_header[0]: self.api_header[1]},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            answer: dict[str, Any] = json.loads(response.read())
        if "error" in answer:
            raise RuntimeError(f"{self.name} publish failed: {answer}")
        return answer


class SquallServer(CentServer):
    name = "squall"
    durable = True
    ws_path = "/connection/centrifuge/websocket"
    api_header = ("Authorization", f"apikey {API_KEY}")

    def _command(self) -> list[str]:
        config = self.dir / "squall.toml"
        config.write_text(
            f"""
[auth]
token_secret = "{SECRET}"
api_key = "{API_KEY}"

[limits]
ping_interval = {PING_INTERVAL}.0
ping_timeout = {PING_INTERVAL}.0

[namespaces.default]
history_size = 100
history_ttl = 600.0
recover = true

[namespaces.chat]
history_size = 100
history_ttl = 600.0
recover = true
presence = true
join_leave = true
allow_publish = true

[namespaces.secret]
history_size = 100
history_ttl = 600.0
recover = true
private = true

[namespaces.durable]
history_size = 100
history_ttl = 600.0
recover = true
persist = true
allow_publish = true
"""
        )
        return [
            sys.executable, "-m", "server", "serve", "--config", str(config),
            "--port", str(self.port), "--data-dir", str(self.dir / "data"),
            "--log-level", "warning",
        ]  # fmt: skip


class CentrifugoServer(CentServer):
    name = "centrifugo"
    durable = False
    ws_path = "/connection/websocket"
    api_header = ("X-API-Key", API_KEY)

    def __init__(self) -> None:
        binary = centrifugo_binary()
        require(
            f"Centrifugo {CENTRIFUGO_VERSION} (the reference server)",
            binary.exists(),
            "make test builds it with Go: scripts/build-centrifugo.sh",
        )
        self.binary = str(binary)
        super().__init__()

    def _command(self) -> list[str]:
        common = {
            "history_size": 100,
            "history_ttl": "600s",
            "force_recovery": True,
            "force_positioning": False,
        }
        config = {
            "client": {
                "token": {"hmac_secret_key": SECRET},
                "allowed_origins": ["*"],
                "ping_interval": f"{PING_INTERVAL}s",
                "pong_timeout": f"{max(1, PING_INTERVAL - 1)}s",
            },
            "http_api": {"key": API_KEY},
            "http_server": {"address": "127.0.0.1", "port": self.port},
            "log": {"level": "info"},
            # No anonymous usage statistics sent out of a test run.
            "usage_stats": {"disabled": True},
            "channel": {
                "without_namespace": {**common, "allow_subscribe_for_client": True},
                "namespaces": [
                    {
                        "name": "chat",
                        **common,
                        "allow_subscribe_for_client": True,
                        "allow_publish_for_subscriber": True,
                        "allow_presence_for_subscriber": True,
                        "allow_history_for_subscriber": True,
                        "presence": True,
                        "join_leave": True,
                        "force_push_join_leave": True,
                    },
                    {
                        "name": "secret",
                        **common,
                        "allow_history_for_subscriber": True,
                    },
                    {
                        "name": "durable",
                        **common,
                        "allow_subscribe_for_client": True,
                        "allow_publish_for_subscriber": True,
                        "allow_history_for_subscriber": True,
                    },
                ],
            },
        }
        path = self.dir / "config.json"
        path.write_text(json.dumps(config, indent=2))
        return [self.binary, "--config", str(path)]


SERVERS: dict[str, type[CentServer]] = {"squall": SquallServer, "centrifugo": CentrifugoServer}
