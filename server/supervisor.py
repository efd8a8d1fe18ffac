"""``squall serve --workers N``: one worker process per core, supervised.

Two ways to listen:

- shared (default): the supervisor binds the port once and every worker
  accepts on that socket; the kernel spreads new connections over them.
- ``--worker-ports``: worker *i* listens on ``port + i`` on its own, so a load
  balancer (HAProxy) sees each worker as a server with its own health check
  and drains it on its own.

A worker that dies is started again (with a growing pause if it keeps dying
at once). SIGTERM or SIGINT is passed to every worker, which drains; the
supervisor exits when they have, or kills what is left after the grace
period.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import tornado.netutil

from server.config import Settings

log = logging.getLogger("squall.supervisor")


@dataclass
class _Worker:
    index: int
    args: list[str]
    pass_fds: tuple[int, ...]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    pause: float = 0.0
    restarts: int = 0
    due: float = field(default=0.0)

    def spawn(self) -> None:
        self.proc = subprocess.Popen(  # noqa: S603 - our interpreter, our arguments
            [sys.executable, "-m", "server", *self.args], pass_fds=self.pass_fds
        )
        self.started = time.monotonic()
        log.info("worker %d started (pid %d)", self.index, self.proc.pid)


# Connections waiting to be accepted. Tornado's default (128) overflows in a
# reconnect storm, and every client that overflows waits 1-3 s for its SYN to
# be sent again. The kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 4096


def worker_count(text: str) -> int:
    if text == "auto":
        return max(1, os.cpu_count() or 1)
    count = int(text)
    if count < 1:
        raise ValueError("--workers must be at least 1, or auto")
    return count


def supervise(
    settings: Settings,
    argv: Sequence[str],
    workers: int,
    *,
    separate_ports: bool,
    on_listening: Callable[[int, int], None] | None = None,
) -> int:
    """Run ``workers`` copies of ``squall serve`` (``argv`` without
    ``--workers``) until SIGTERM/SIGINT; returns the exit code."""
    host, port = settings.server.host, settings.server.port
    sockets: list[socket.socket] = []
    if separate_ports:
        if port == 0:
            print("squall: --worker-ports needs a fixed --port", file=sys.stderr)
            return 2
        ports = [port + i for i in range(workers)]
    else:
        sockets = tornado.netutil.bind_sockets(port, host, backlog=LISTEN_BACKLOG)
        for sock in sockets:
            sock.set_inheritable(True)
        port = sockets[0].getsockname()[1]
        ports = [port] * workers
    fds = tuple(s.fileno() for s in sockets)
    pool = []
    for i in range(workers):
        args = [*argv, "--worker-index", str(i)]
        if separate_ports:
            args += ["--port", str(ports[i])]
        else:
            args += ["--listen-fds", ",".join(map(str, fds))]
        pool.append(_Worker(i, args, fds))

    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if on_listening is not None:
        on_listening(ports[0], os.getpid())
    for worker in pool:
        worker.spawn()

    while not stopping:
        time.sleep(0.1)
        now = time.monotonic()
        for worker in pool:
            if worker.proc is None:
                if now >= worker.due and not stopping:
                    worker.spawn()
                continue
            code = worker.proc.poll()
            if code is None or stopping:
                continue
            # Died on its own: start it again, pausing longer if it dies fast.
            lived = now - worker.started
            worker.pause = 0.0 if lived > 10 else min(30.0, max(0.5, worker.pause * 2))
            worker.restarts += 1
            log.warning("worker %d (pid %d) exited with %s; restarting in %.1fs",
                        worker.index, worker.proc.pid, code, worker.pause)  # fmt: skip
            worker.proc = None
            worker.due = now + worker.pause

    for worker in pool:
        if worker.proc is not None and worker.proc.poll() is None:
            worker.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + settings.server.drain_grace + 5
    for worker in pool:
        if worker.proc is None:
            continue
        try:
            worker.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("worker %d did not stop in time; killing it", worker.index)
            worker.proc.kill()
            worker.proc.wait()
    for sock in sockets:
        sock.close()
    return 0
