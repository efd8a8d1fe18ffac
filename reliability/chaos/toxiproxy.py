"""Toxiproxy: the server process (built by scripts/build-toxiproxy.sh) and a
small async client for its HTTP API, on loopback only.

    server = ToxiproxyServer().start()
    api = Toxiproxy(server.url)
    await api.create_proxy("redis_n0", listen=f"127.0.0.1:{p}", upstream=f"127.0.0.1:{r}")
    await api.add_toxic("redis_n0", "latency", attributes={"latency": 500, "jitter": 100})
    await api.set_enabled("redis_n0", False)  # a partition: connections cut, port closed
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import orjson
import tornado.httpclient

from tests.services import CACHE, _Process, free_port, port_open, require

# Keep in step with scripts/build-toxiproxy.sh.
TOXIPROXY_VERSION = os.environ.get("TOXIPROXY_VERSION", "v2.5.0")
TOXIC_TYPES = (
    "latency",
    "bandwidth",
    "slow_close",
    "timeout",
    "reset_peer",
    "slicer",
    "limit_data",
)


def toxiproxy_binary() -> Path:
    return CACHE / f"toxiproxy-{TOXIPROXY_VERSION}" / "toxiproxy-server"


class ToxiproxyError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"toxiproxy answered HTTP {status}: {body[:300]}")
        self.status = status


class ToxiproxyServer(_Process):
    """``toxiproxy-server`` on a free loopback port, stopped by its PID."""

    def __init__(self) -> None:
        binary = toxiproxy_binary()
        require(
            f"Toxiproxy {TOXIPROXY_VERSION}",
            binary.exists(),
            "build it with Go: bash scripts/build-toxiproxy.sh",
        )
        self.binary = str(binary)
        self.dir = Path(tempfile.mkdtemp(prefix="squall-toxiproxy-"))
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ToxiproxyServer:
        self.port = self.port or free_port()
        self._spawn(
            [self.binary, "-host", "127.0.0.1", "-port", str(self.port)],
            self.dir / "toxiproxy.log",
            lambda: port_open(self.port),
            20,
            "toxiproxy",
        )
        return self

    def stop(self) -> None:
        self._stop()


class Toxiproxy:
    """The Toxiproxy HTTP API (proxies and toxics), async over Tornado."""

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._http = tornado.httpclient.AsyncHTTPClient()

    async def _request(self, method: str, path: str, body: Any = None) -> Any:
        request = tornado.httpclient.HTTPRequest(
            self.url + path,
            method=method,
            body=orjson.dumps(body) if body is not None else (b"" if method == "POST" else None),
            headers={"Content-Type": "application/json"},
            request_timeout=self.timeout,
            # Toxiproxy answers DELETE with 204 and no body.
            allow_nonstandard_methods=True,
        )
        response = await self._http.fetch(request, raise_error=False)
        text = response.body.decode(errors="replace") if response.body else ""
        if response.code >= 300 or response.code == 599:
            raise ToxiproxyError(response.code, text or str(response.error))
        return orjson.loads(text) if text.strip() else None

    async def version(self) -> str:
        request = tornado.httpclient.HTTPRequest(
            self.url + "/version", request_timeout=self.timeout
        )
        response = await self._http.fetch(request)
        return response.body.decode().strip()

    async def proxies(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._request("GET", "/proxies")
        return result

    async def create_proxy(
        self, name: str, *, listen: str, upstream: str, enabled: bool = True
    ) -> dict[str, Any]:
        body = {"name": name, "listen": listen, "upstream": upstream, "enabled": enabled}
        result: dict[str, Any] = await self._request("POST", "/proxies", body)
        return result

    async def set_enabled(self, name: str, enabled: bool) -> None:
        """Disabled: every connection through it is closed and its port stops
        listening, a partition of that link."""
        await self._request("POST", f"/proxies/{name}", {"enabled": enabled})

    async def delete_proxy(self, name: str) -> None:
        await self._request("DELETE", f"/proxies/{name}")

    async def add_toxic(
        self,
        proxy: str,
        kind: str,
        *,
        name: str | None = None,
        stream: str = "downstream",
        toxicity: float = 1.0,
        attributes: dict[str, Any] | None = None,
    ) -> str:
        """Add a toxic of type ``kind`` to ``proxy``; returns its name."""
        if kind not in TOXIC_TYPES:
            raise ValueError(f"unknown toxic type {kind!r}")
        toxic_name = name or f"{kind}_{stream}"
        body = {
            "name": toxic_name,
            "type": kind,
            "stream": stream,
            "toxicity": toxicity,
            "attributes": attributes or {},
        }
        await self._request("POST", f"/proxies/{proxy}/toxics", body)
        return toxic_name

    async def remove_toxic(self, proxy: str, name: str) -> None:
        await self._request("DELETE", f"/proxies/{proxy}/toxics/{name}")

    async def reset(self) -> None:
        """Enable every proxy and remove every toxic."""
        await self._request("POST", "/reset")
