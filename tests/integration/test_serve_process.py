"""A real ``squall serve`` process: start-up output, secrets, and SIGTERM drain."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import tornado.httpclient
import tornado.websocket

from server.client import ApiClient, Client, ConnectionClosed


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SQUALL_")}
    env.update(extra)
    return env


@contextmanager
def serve(
    tmp_path: Path, *args: str, **env: str
) -> Iterator[tuple[subprocess.Popen[str], int, list[str]]]:
    """Start ``python -m server serve`` on a free port; stop it (by PID) after.
    Yields the process, its port, and the start-up banner's lines."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server",
            "serve",
            "--port",
            "0",
            "--data-dir",
            str(tmp_path / "data"),
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(**env),
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 20
        port = 0
        banner: list[str] = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            banner.append(line)
            match = re.search(r"serving on http://127\.0\.0\.1:(\d+)/", line)
            if match:
                port = int(match.group(1))
            if "Mint a token" in line:
                break
        assert port, (
            f"server did not start: {proc.stderr.read() if proc.poll() is not None else ''}"
        )
        yield proc, port, banner
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None and not pipe.closed:
                pipe.close()


async def get(port: int, path: str) -> tornado.httpclient.HTTPResponse:
    client = tornado.httpclient.AsyncHTTPClient()
    return await client.fetch(f"http://127.0.0.1:{port}{path}", raise_error=False)


def read_secrets(tmp_path: Path) -> dict[str, str]:
    import tomllib

    return tomllib.loads((tmp_path / "data" / "secrets.toml").read_text())


async def test_startup_prints_urls_and_secret_location_never_secrets(tmp_path: Path) -> None:
    with serve(tmp_path) as (proc, port, banner):
        assert (await get(port, "/health")).code == 200
        secrets = read_secrets(tmp_path)
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    out = "".join(banner) + rest
    assert f"ws://127.0.0.1:{port}/connection/websocket" in out
    assert f"http://127.0.0.1:{port}/api/" in out
    assert "secrets.toml" in out
    for value in secrets.values():
        assert value not in out and value not in err


async def test_sigterm_drains(tmp_path: Path) -> None:
    drain = {"SQUALL_SERVER_DRAIN_DELAY": "0.5", "SQUALL_SERVER_DRAIN_GRACE": "5"}
    with serve(tmp_path, **drain) as (proc, port, _):
        secrets = read_secrets(tmp_path)
        from server.auth import mint_token
        from server.config import AuthSettings

        token = mint_token(AuthSettings(token_secret=secrets["token_secret"]), sub="alice")
        client = Client(f"ws://127.0.0.1:{port}/connection/websocket", token=token, reconnect=False)
        await client.connect()
        sub = await client.subscribe("news")
        api = ApiClient(f"http://127.0.0.1:{port}", secrets["api_key"])
        await api.publish("news", "before")
        assert (await sub.get()).data == "before"
        assert (await get(port, "/ready")).code == 200

        proc.send_signal(signal.SIGTERM)
        # /ready turns false first, so a load balancer stops sending traffic ...
        deadline = time.monotonic() + 5
        while (await get(port, "/ready")).code != 503:
            assert time.monotonic() < deadline, "/ready never turned false"
            await asyncio.sleep(0.02)
        # ... new connections are refused ...
        with pytest.raises(tornado.httpclient.HTTPClientError) as info:
            await tornado.websocket.websocket_connect(f"ws://127.0.0.1:{port}/connection/websocket")
        assert info.value.code == 503
        # ... connected clients are told to reconnect elsewhere ...
        with pytest.raises(ConnectionClosed):
            await sub.get(timeout=10)
        assert client.close_code == 3001
        # ... and the process exits within the grace period.
        assert proc.wait(timeout=10) == 0
        await client.close()


def test_bad_config_exits_2_with_one_message(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[limits]\nmax_connections = 'many'\n")
    proc = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 2
    assert "limits.max_connections" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def test_listens_with_room_for_a_reconnect_storm(tmp_path: Path) -> None:
    # With Tornado's default backlog of 128, a storm of reconnects overflows
    # the accept queue and each overflowing client waits 1-3 s to retry
    # (bench.storm: 2,000 clients took 6.4 s instead of 0.8 s). `ss` shows a
    # listening socket's backlog as its Send-Q; the kernel caps it at
    # net.core.somaxconn.
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    with serve(tmp_path) as (_, port, _):
        out = subprocess.run(
            ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=10
        ).stdout
        backlog = int(out.split()[2])
        assert backlog == min(4096, somaxconn) > 128
