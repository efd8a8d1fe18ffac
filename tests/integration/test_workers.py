"""`squall serve --workers N`: supervised worker processes."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.client import ApiClient
from tests.services import ROOT, free_port, port_open, stop_process, wait_until

API_KEY = "workers-api-key-0123456789"


def env(**extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("SQUALL_")}
    out.update(SQUALL_API_KEY=API_KEY, SQUALL_TOKEN_SECRET="w" * 40, SQUALL_LOG_LEVEL="warning",
               SQUALL_BROKER_NODE_REPORT_INTERVAL="0.2")  # fmt: skip
    out.update(extra)
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by the supervisor) counts as gone.
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


def test_more_workers_need_redis(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--workers", "2", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=30, env=env(), cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--workers" in proc.stderr and "Redis" in proc.stderr


@pytest.fixture
def supervisor(
    tmp_path: Path, redis_server: Any, prefix: str
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--workers", "2", "--port", "0",
         "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        env=env(SQUALL_BROKER_URL=redis_server.url, SQUALL_BROKER_PREFIX=prefix),
    )  # fmt: skip
    assert proc.stdout is not None
    port = 0
    deadline = time.monotonic() + 20
    while not port and time.monotonic() < deadline:
        match = re.search(r"serving on http://127\.0\.0\.1:(\d+)/", proc.stdout.readline())
        port = int(match.group(1)) if match else 0
    assert port, "supervisor did not start"
    try:
        yield proc, port
    finally:
        stop_process(proc, timeout=20)  # type: ignore[arg-type]


async def worker_pids(port: int, count: int, *, gone: int = 0) -> list[int]:
    """The pids of ``count`` live workers (``gone`` not among them: a worker
    just killed runs on until the kernel delivers the signal)."""
    api = ApiClient(f"http://127.0.0.1:{port}", API_KEY)
    nodes: list[dict[str, Any]] = []
    for _ in range(600):
        try:
            nodes = (await api.info())["nodes"]
        except Exception:
            nodes = []
        pids = sorted(n["pid"] for n in nodes if alive(n["pid"]))
        if len(pids) == count and gone not in pids:
            return pids
        await asyncio.sleep(0.05)
    raise AssertionError(f"expected {count} live workers, saw {nodes}")


async def test_workers_share_the_port_and_crashed_ones_come_back(
    supervisor: tuple[subprocess.Popen[str], int],
) -> None:
    proc, port = supervisor
    pids = await worker_pids(port, 2)
    assert proc.pid not in pids
    os.kill(pids[0], signal.SIGKILL)
    new = await worker_pids(port, 2, gone=pids[0])
    assert pids[1] in new
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    wait_until(lambda: not any(alive(p) for p in new), 10, "workers gone")
    assert not port_open(port)


async def test_workers_stop_when_the_supervisor_is_killed(
    supervisor: tuple[subprocess.Popen[str], int],
) -> None:
    # SIGKILL (or the OOM killer) gives the supervisor no chance to stop its
    # workers: they notice on their own, drain and free the port.
    proc, port = supervisor
    pids = await worker_pids(port, 2)
    proc.kill()
    proc.wait(timeout=10)
    wait_until(lambda: not any(alive(p) for p in pids), 15, "orphaned workers gone")
    assert not port_open(port)


def two_free_ports() -> int:
    """A port p with p + 1 free too (checked by binding both)."""
    for _ in range(50):
        base = free_port()
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", base))
                b.bind(("127.0.0.1", base + 1))
            except OSError:
                continue
        return base
    raise RuntimeError("no two consecutive free ports")


def test_worker_ports(tmp_path: Path, redis_server: Any, prefix: str) -> None:
    base = two_free_ports()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--workers", "2", "--worker-ports",
         "--port", str(base), "--data-dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
        env=env(SQUALL_BROKER_URL=redis_server.url, SQUALL_BROKER_PREFIX=prefix),
    )  # fmt: skip
    try:
        wait_until(lambda: port_open(base) and port_open(base + 1), 40, "both worker ports")
    finally:
        stop_process(proc, timeout=20)
    assert proc.returncode == 0
