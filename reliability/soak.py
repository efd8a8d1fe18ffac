"""Soak test: Squall under steady load with churn for a long time, watched
for leaks and stalls.

    python -m reliability.soak                      # 30 minutes, 10,000 connections
    SOAK_MINUTES=5 python -m reliability.soak
    python -m reliability.soak --minutes 1 --connections 500 --sample-seconds 2

Setup: a redis-server on a free loopback port and ``squall serve --workers 2
--worker-ports`` on Redis (worker i on port+i, so each worker's ``/status``
and ``/health`` can be asked directly; clients are spread over both), all on
127.0.0.1. One or two generator processes (reliability/soak_client.py; a
process here may hold at most 20,000 fds) open the connections: each
subscribes to one channel (100 ``bench:`` channels, 1 % of the connections
on 10 presence channels, 2 % on SSE).

Load, for ``SOAK_MINUTES`` (default 30) once every connection is subscribed:
churn (1 % of the connections a second close and reconnect: new JWT,
connect, subscribe with recovery from their last offset; SSE with
``last_event_id``), fan-out (20 publications a second over the HTTP API,
round robin over the channels), API calls every few seconds (history,
presence, channels, info). Every subscriber checks its offsets: lost,
duplicated and out-of-order publications (outside gaps announced with
``recovered: false``) are counted over the whole run.

Sampling every ``SOAK_SAMPLE_SECONDS`` (default 10):

- external (``/proc``): each worker's RSS, open fds, threads, CPU; the
  supervisor's and Redis's RSS; the generators' RSS.
- internal (each worker's ``/status``): connections, users, subscriptions,
  channels, slow disconnects; Redis ``INFO`` (used memory, keys).
- event-loop lag, external: Squall exposes no loop lag, asyncio task count
  or send-queue sizes, so the lag is measured from outside as the time a
  worker takes to answer ``GET /health`` on a kept-alive connection, probed
  4 times a second per worker. It is an upper bound of the loop's lag (it
  includes the probe's own scheduling and the machine's CPU contention).

Analysis (reliability/soak_analysis.py): a least-squares trend over the
second half of each series, the loop-lag p99 rule (50 ms) and the delivery
rule. Results: reliability/results/soak-<time>.json, .md and one PNG per
kind of series. Exit status 0 when every verdict passes, 1 when one fails.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import multiprocessing.connection
import os
import random
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
import uvloop

from bench.run import API_KEY, cpu_seconds, descendants, raise_fd_limit, start_peer, stop_peer
from bench.wsproto import HttpPublisher, until
from reliability.soak_analysis import Rule, Verdict, judge, lag_rule
from reliability.soak_client import generator
from server.broker.redis import POOL_SIZE

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "reliability" / "results"
WORKERS = 2
PROBE_INTERVAL = 0.25  # s between /health probes, per worker


@dataclass
class Config:
    minutes: float = 30.0
    connections: int = 10_000
    sample_seconds: float = 10.0
    channels: int = 100
    presence_channels: int = 10
    presence_share: float = 0.01  # of the connections, on presence channels
    sse_share: float = 0.02  # of the connections, on SSE
    churn: float = 0.01  # of the connections, each second
    rate: float = 20.0  # publications per second
    api_seconds: float = 3.0  # between rounds of API calls
    generators: int = 0  # 0: one per 5,000 connections, at most 2
    results: Path = RESULTS


# ---- A small keep-alive HTTP client (probes and API calls) -----------------


class Http:
    """One kept-alive HTTP/1.1 connection to a worker; requests in turn."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.lock = asyncio.Lock()

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: str = "", timeout: float = 10
    ) -> tuple[int, bytes]:
        async with self.lock:
            try:
                return await asyncio.wait_for(self._request(method, path, body, headers), timeout)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
                await self.close()
                raise

    async def _request(
        self, method: str, path: str, body: bytes, headers: str
    ) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n{headers}"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        data = await self.reader.readexactly(length) if length else b""
        return status, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None


async def api(http: Http, method: str, params: dict[str, Any]) -> dict[str, Any]:
    status, body = await http.request(
        "POST",
        f"/api/{method}",
        orjson.dumps(params),
        f"Authorization: apikey {API_KEY}\r\nContent-Type: application/json\r\n",
    )
    out: dict[str, Any] = orjson.loads(body) if body else {}
    if status != 200 or "error" in out:
        raise RuntimeError(f"/api/{method}: {status} {body[:200]!r}")
    return out


# ---- Sampling --------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """RSS (KB), threads and open fds of ``pid`` from /proc (0 when gone)."""
    out = {"rss_kb": 0, "threads": 0, "fds": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_kb"] = int(line.split()[1])
            elif line.startswith("Threads:"):
                out["threads"] = int(line.split()[1])
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        pass
    return out


class Soak:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.samples: list[dict[str, Any]] = []
        self.lag: dict[str, list[tuple[float, float]]] = {}  # worker -> (t, ms)
        # The control: how late this process's own timer fires (its loop's
        # lag, and the machine's CPU contention), probed the same way.
        self.control: list[tuple[float, float]] = []
        self.probe_failures = 0
        self.api_calls = 0
        self.api_errors: list[str] = []
        self.api_ms: list[float] = []
        self.t0 = 0.0
        self.running = False
        self.worker_pids: list[int] = []
        self.worker_restarts = 0
        self.pipes: list[multiprocessing.connection.Connection] = []
        self.procs: list[Any] = []
        self.status_http: dict[int, Http] = {}
        # pid -> (CPU seconds, run-queue seconds, when)
        self.cpu: dict[int, tuple[float, float, float]] = {}

    def now(self) -> float:
        return time.monotonic() - self.t0

    # -- the generators --

    def plan(self, port: int) -> list[list[dict[str, Any]]]:
        cfg = self.cfg
        n = cfg.connections
        generators = cfg.generators or min(2, max(1, -(-n // 5000)))
        presence_every = round(1 / cfg.presence_share) if cfg.presence_share else 0
        sse_every = round(1 / cfg.sse_share) if cfg.sse_share else 0
        plans: list[list[dict[str, Any]]] = [[] for _ in range(generators)]
        for i in range(n):
            if presence_every and i % presence_every == 0:
                channel = f"pusher-1234:room{(i // presence_every) % cfg.presence_channels}"
            else:
                channel = f"bench:c{i % cfg.channels}"
            sse = bool(sse_every) and i % sse_every == 1 and channel.startswith("bench:")
            plans[i % generators].append(
                {"index": i, "channel": channel, "port": port + i % WORKERS, "sse": sse}
            )
        return plans

    def channel_names(self) -> list[str]:
        cfg = self.cfg
        names = [f"bench:c{c}" for c in range(cfg.channels)]
        if cfg.presence_share:
            names += [f"pusher-1234:room{r}" for r in range(cfg.presence_channels)]
        return names

    async def ask(self, msg: tuple[Any, ...], timeout: float = 30) -> list[Any]:
        """Send ``msg`` to every generator; their answers (in order)."""
        for p in self.pipes:
            p.send(msg)
        out = []
        for p in self.pipes:
            if not await until(p.poll, timeout, 0.02):
                raise TimeoutError(f"a generator did not answer {msg[0]!r}")
            out.append(p.recv())
        return out

    # -- the load --

    async def publish_forever(self, ports: list[int]) -> tuple[int, list[bytes]]:
        loop = asyncio.get_running_loop()
        publishers: list[HttpPublisher] = []
        header = f"Authorization: apikey {API_KEY}"
        for port in ports:
            host = f"127.0.0.1:{port}"

            def publisher(host: str = host) -> HttpPublisher:
                return HttpPublisher(host, "/api/publish", header, lambda: None)

            _, pub = await loop.create_connection(publisher, "127.0.0.1", port)
            publishers.append(pub)
        names = self.channel_names()
        pad = "x" * 64
        sent = 0
        start = time.monotonic()
        while self.running:
            channel = names[sent % len(names)]
            body = orjson.dumps(
                {"channel": channel, "data": {"n": sent, "t": time.time(), "pad": pad}}
            )
            publishers[sent % len(publishers)].publish(body)
            sent += 1
            await asyncio.sleep(max(0.0, start + sent / self.cfg.rate - time.monotonic()))
        await until(lambda: sum(p.answered for p in publishers) >= sent, 30, 0.05)
        errors = [e for p in publishers for e in p.errors]
        unanswered = sent - sum(p.answered for p in publishers)
        for p in publishers:
            if p.transport is not None:
                p.transport.close()
        if unanswered:
            errors.append(f"{unanswered} publishes unanswered".encode())
        return sent, errors

    async def api_forever(self, ports: list[int]) -> None:
        clients = [Http(p) for p in ports]
        names = self.channel_names()
        rooms = [n for n in names if n.startswith("pusher-1234:")]
        rng = random.Random(1)
        try:
            while self.running:
                http = rng.choice(clients)
                calls: list[tuple[str, dict[str, Any]]] = [
                    ("history", {"channel": rng.choice(names), "limit": 10}),
                    ("channels", {}),
                    ("info", {}),
                ]
                if rooms:
                    calls.append(("presence", {"channel": rng.choice(rooms)}))
                for method, params in calls:
                    t = time.perf_counter()
                    try:
                        await api(http, method, params)
                        self.api_ms.append((time.perf_counter() - t) * 1000)
                    except (
                        OSError,
                        RuntimeError,
                        TimeoutError,
                        asyncio.IncompleteReadError,
                    ) as exc:
                        if len(self.api_errors) < 20:
                            self.api_errors.append(f"{method}: {exc!r}"[:300])
                    self.api_calls += 1
                await asyncio.sleep(self.cfg.api_seconds)
        finally:
            for c in clients:
                await c.close()

    async def probe_forever(self, index: int, port: int) -> None:
        http = Http(port)
        out = self.lag.setdefault(f"w{index}", [])
        try:
            while self.running:
                t = time.perf_counter()
                try:
                    status, _ = await http.request("GET", "/health", timeout=5)
                    if status != 200:
                        raise RuntimeError(status)
                    out.append((self.now(), (time.perf_counter() - t) * 1000))
                except (OSError, RuntimeError, TimeoutError, asyncio.IncompleteReadError):
                    self.probe_failures += 1
                    out.append((self.now(), (time.perf_counter() - t) * 1000))
                await asyncio.sleep(PROBE_INTERVAL)
        finally:
            await http.close()

    async def control_forever(self) -> None:
        while self.running:
            t = time.perf_counter()
            await asyncio.sleep(PROBE_INTERVAL)
            late = (time.perf_counter() - t - PROBE_INTERVAL) * 1000
            self.control.append((self.now(), max(0.0, late)))

    # -- sampling --

    async def sample(self, sup: int, ports: list[int], redis: Any, redis_pid: int) -> None:
        t = round(self.now(), 2)
        row: dict[str, Any] = {"t": t}
        pids = descendants(sup)
        gone = set(self.worker_pids) - set(pids)
        if gone:
            self.worker_restarts += len(gone)
            self.worker_pids = [p for p in self.worker_pids if p not in gone]
        for i, port in enumerate(ports):
            status: dict[str, Any] = {}
            try:
                http = self.status_http.setdefault(port, Http(port))
                _, body = await http.request("GET", "/status", timeout=5)
                status = orjson.loads(body)
            except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
                pass
            pid = int(status.get("pid", 0))
            if pid and pid not in self.worker_pids:
                self.worker_pids.append(pid)
            w = f"w{i}"
            if pid:
                for k, v in proc_status(pid).items():
                    row[f"{w} {k}"] = v
                cpu, wait, then = cpu_seconds(pid), runqueue_seconds(pid), time.monotonic()
                before = self.cpu.get(pid)
                if before is not None:
                    span = then - before[2]
                    row[f"{w} cpu_pct"] = round(100 * (cpu - before[0]) / span, 1)
                    # Time the worker was ready to run but the machine ran
                    # something else: CPU contention, not Squall's own lag.
                    row[f"{w} runqueue_pct"] = round(100 * (wait - before[1]) / span, 1)
                self.cpu[pid] = (cpu, wait, then)
            for k in ("connections", "users", "subscriptions", "channels"):
                if k in status:
                    row[f"{w} {k}"] = status[k]
            if f"{w} fds" in row and "connections" in status:
                # Descriptors that are not client sockets: listening sockets,
                # Redis connections, files, the event loop's own.
                row[f"{w} fds_other"] = row[f"{w} fds"] - status["connections"]
            if "totals" in status:
                row[f"{w} slow_disconnects"] = status["totals"]["slow_disconnects"]
            if "loop_lag" in status:
                # The node's own lag probe (a 100 ms timer, last minute).
                row[f"{w} loop_lag_p99_ms"] = status["loop_lag"]["p99_ms"]
            try:
                _, text = await http.request("GET", "/metrics", timeout=5)
            except (OSError, TimeoutError, asyncio.IncompleteReadError):
                text = b""
            for line in text.decode(errors="replace").splitlines():
                name, _, value = line.partition(" ")
                kind = _INTERNAL.get(name)
                if kind is not None:
                    row[f"{w} {kind}"] = float(value)
            window = [ms for ts, ms in self.lag.get(w, []) if ts > t - self.cfg.sample_seconds]
            if window:
                ordered = sorted(window)
                row[f"{w} lag_p99_ms"] = round(ordered[int(0.99 * (len(ordered) - 1))], 2)
                row[f"{w} lag_max_ms"] = round(ordered[-1], 2)
        window = [ms for ts, ms in self.control if ts > t - self.cfg.sample_seconds]
        if window:
            row["control lag_p99_ms"] = round(sorted(window)[int(0.99 * (len(window) - 1))], 2)
        # What the machine ran meanwhile (it is shared): the 1-minute load average.
        row["machine load1"] = round(os.getloadavg()[0], 2)
        row["supervisor rss_kb"] = proc_status(sup)["rss_kb"]
        row["redis rss_kb"] = proc_status(redis_pid)["rss_kb"]
        try:
            info = await redis.info("memory")
            row["redis used_memory_kb"] = int(info["used_memory"]) // 1024
            row["redis keys"] = int(await redis.dbsize())
        except (OSError, ConnectionError, TimeoutError):
            pass
        for g, (_, stats) in enumerate(await self.ask(("stats",))):
            row[f"g{g} rss_kb"] = stats["rss_kb"]
            for k in ("subscribed", "churned", "drops", "delivered", "missing_now", "duplicated"):
                row[f"g{g} {k}"] = stats[k]
        self.samples.append(row)
        subscribed = sum(row.get(f"g{g} subscribed", 0) for g in range(len(self.pipes)))
        print(
            f"  t={t:7.1f}s subscribed={subscribed:,} "
            + " ".join(
                f"w{i}: {row.get(f'w{i} rss_kb', 0) / 1024:.0f}MB {row.get(f'w{i} fds', 0)}fd "
                f"{row.get(f'w{i} connections', 0)}c lag99={row.get(f'w{i} lag_p99_ms', 0)}ms"
                for i in range(len(ports))
            ),
            flush=True,
        )

    async def sample_forever(self, sup: int, ports: list[int], redis: Any, redis_pid: int) -> None:
        tick = 0
        start = time.monotonic()
        while self.running:
            await self.sample(sup, ports, redis, redis_pid)
            tick += 1
            await asyncio.sleep(max(0.0, start + tick * self.cfg.sample_seconds - time.monotonic()))

    # -- the run --

    async def run(self) -> dict[str, Any]:
        from redis.asyncio import Redis

        from tests.services import RedisServer

        cfg = self.cfg
        # Each worker holds about half the connections (and the server inherits this).
        raise_fd_limit(min(20_000, cfg.connections // WORKERS + 4000))
        redis_server = RedisServer().start()
        ctx = multiprocessing.get_context("spawn")
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with tempfile.TemporaryDirectory(prefix="squall-soak-") as tmp:
            port = free_port_pair()
            ports = [port + i for i in range(WORKERS)]
            proc = start_peer(
                "squall",
                port,
                Path(tmp),
                {"SQUALL_BROKER_URL": redis_server.url},
                ("--workers", str(WORKERS), "--worker-ports"),
            )
            redis = Redis.from_url(redis_server.url)
            try:
                if not await until(lambda: all(port_open(p) for p in ports), 30, 0.1):
                    raise RuntimeError("the workers did not listen")
                self.worker_pids = descendants(proc.pid)
                return await self._load(ctx, proc.pid, ports, redis, redis_server, started)
            finally:
                self.running = False
                for p in self.pipes:
                    try:
                        p.send(("close",))
                    except OSError:
                        pass
                for child in self.procs:
                    child.join(timeout=30)
                    if child.is_alive():
                        child.kill()
                        child.join(timeout=10)
                await redis.aclose()
                stop_peer(proc)
                redis_server.stop()

    async def _load(
        self, ctx: Any, sup: int, ports: list[int], redis: Any, redis_server: Any, started: str
    ) -> dict[str, Any]:
        cfg = self.cfg
        plans = self.plan(ports[0])
        t_connect = time.perf_counter()
        for plan in plans:
            ours, theirs = ctx.Pipe()
            child = ctx.Process(target=generator, args=(plan, theirs), daemon=True)
            child.start()
            theirs.close()
            self.procs.append(child)
            self.pipes.append(ours)
        subscribed = 0
        for p in self.pipes:
            if not await until(p.poll, 120 + cfg.connections / 50, 0.1):
                raise TimeoutError("a generator did not report its subscriptions")
            _, n, _ = p.recv()
            subscribed += n
        connect_seconds = round(time.perf_counter() - t_connect, 1)
        print(
            f"soak: {subscribed:,} of {cfg.connections:,} subscribed in {connect_seconds} s; "
            f"{cfg.minutes:g} min of load",
            flush=True,
        )
        redis_pid = redis_server.proc.pid if redis_server.proc else 0
        self.t0 = time.monotonic()
        self.running = True
        for p in self.pipes:
            p.send(("start", cfg.churn))
        loop = asyncio.get_running_loop()
        publisher = loop.create_task(self.publish_forever(ports))
        background = [
            loop.create_task(self.api_forever(ports)),
            *(loop.create_task(self.probe_forever(i, p)) for i, p in enumerate(ports)),
            loop.create_task(self.control_forever()),
        ]
        sampler = loop.create_task(self.sample_forever(sup, ports, redis, redis_pid))
        deadline = self.t0 + cfg.minutes * 60
        # The run ends at the deadline, or early if the publisher fails.
        await asyncio.wait([publisher], timeout=max(0.0, deadline - time.monotonic()))
        self.running = False
        await sampler
        for http in self.status_http.values():
            await http.close()
        sent, publish_errors = await publisher
        await asyncio.gather(*background)
        quiet = [stats for _, stats in await self.ask(("quiesce",), 90)]
        # Where every channel ended: what each subscriber must have reached.
        http = Http(ports[0])
        positions: dict[str, list[Any]] = {}
        try:
            for name in self.channel_names():
                r = (await api(http, "history", {"channel": name, "limit": 0}))["result"]
                positions[name] = [r["epoch"], r["offset"]]
        finally:
            await http.close()
        finals = [stats for _, stats in await self.ask(("final", positions, 60.0), 120)]
        metrics = {}
        for i, port in enumerate(ports):
            http = Http(port)
            try:
                _, body = await http.request("GET", "/metrics", timeout=10)
                metrics[f"w{i}"] = _counters(body.decode())
            except (OSError, TimeoutError, asyncio.IncompleteReadError):
                pass
            finally:
                await http.close()
        accepted = sum(off for _, off in positions.values())
        counts = {
            "lost": sum(f["lost"] for f in finals),
            "duplicated": sum(f["duplicated"] for f in finals),
            "out_of_order": sum(f["out_of_order"] for f in finals),
            "incomplete": sum(f["incomplete"] for f in finals),
            "publish_errors": len(publish_errors) + max(0, sent - accepted),
            "worker_restarts": self.worker_restarts,
            "announced_gaps": sum(f["gaps"] for f in finals),
            "epoch_changes": sum(f["epoch_changes"] for f in finals),
            "refused": sum(f["refused"] for f in finals),
            "drops": sum(f["drops"] for f in finals),
            "connect_failures": sum(f["connect_failures"] for f in finals),
            "churned": sum(f["churned"] for f in finals),
            "delivered": sum(f["delivered"] for f in finals),
            "publications": sent,
            "publications_accepted": accepted,
            "api_calls": self.api_calls,
            "api_errors": len(self.api_errors),
            "probe_failures": self.probe_failures,
            "sse_connections": sum(f["sse"] for f in finals),
        }
        return {
            "started": started,
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
            "workers": WORKERS,
            "generators": len(self.pipes),
            "subscribed": subscribed,
            "connect_seconds": connect_seconds,
            "seconds": round(self.now(), 1),
            "counts": counts,
            "api_ms_p99": round(_p(self.api_ms, 99), 2),
            "api_errors": self.api_errors,
            "publish_errors": [e.decode(errors="replace") for e in publish_errors[:10]],
            "client_errors": sorted({e for f in finals for e in f["errors"]})[:20],
            "quiesce": quiet,
            "server_counters": metrics,
            "samples": self.samples,
            "lag": {w: [[round(t, 2), round(ms, 2)] for t, ms in v] for w, v in self.lag.items()},
            "lag_control": [[round(t, 2), round(ms, 2)] for t, ms in self.control],
        }


def _p(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def _counters(text: str) -> dict[str, float]:
    """The Prometheus samples of disconnects, recoveries and connections."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(
            ("squall_disconnects_total", "squall_recoveries_total", "squall_connections_accepted")
        ):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def runqueue_seconds(pid: int) -> float:
    """How long the main thread of ``pid`` (a worker's event loop) has waited,
    runnable, for a CPU (``/proc/<pid>/schedstat``; 0 when unavailable)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def free_port_pair() -> int:
    """A port p with p + 1 .. p + WORKERS - 1 free too."""
    for _ in range(50):
        socks = []
        try:
            first = socket.socket()
            first.bind(("127.0.0.1", 0))
            socks.append(first)
            port = int(first.getsockname()[1])
            for i in range(1, WORKERS):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port + i))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free pair of ports")


# ---- Analysis and report ---------------------------------------------------

# How each kind of series is judged (soak_analysis.Rule); the key is the
# series name without its process prefix ("w0 rss_kb" -> "rss_kb").
RULES: dict[str, Rule] = {
    "rss_kb": Rule(min_rise=1024),
    # A worker opens Redis connections on demand, up to its pool's bound
    # (POOL_SIZE, 64), when a burst needs them, and keeps them: a 5-minute run
    # on a busy machine saw one worker's descriptors rise by 63 that way, in
    # steps, while the other's pool was already full. A rise within the
    # pool's bound is no evidence of a leak; a leak passes it in the end.
    "fds": Rule(min_rise=POOL_SIZE),
    "fds_other": Rule(min_rise=POOL_SIZE),
    "threads": Rule(min_rise=2),
    "connections": Rule(min_rise=10),
    "users": Rule(min_rise=10),
    "subscriptions": Rule(min_rise=10),
    "channels": Rule(min_rise=2),
    "used_memory_kb": Rule(min_rise=1024),
    "keys": Rule(min_rise=10),
    # Reported, not failed: CPU at constant load should stay flat, but it
    # moves with whatever else the machine runs.
    "cpu_pct": Rule(min_rise=5, judged=False),
    "runqueue_pct": Rule(min_rise=5, judged=False),
    # The node's own figures (/metrics): tasks (a task leaked per churned
    # connection would climb), bytes waiting for clients.
    "tasks": Rule(min_rise=20),
    "send_queue_bytes": Rule(min_rise=1024 * 1024),
    # Reported beside the outside probe; the lag rule judges the latter.
    "loop_lag_p99_ms": Rule(min_rise=5, judged=False),
}
# /metrics lines sampled, and the series each feeds.
_INTERNAL = {
    "squall_asyncio_tasks": "tasks",
    "squall_send_queue_bytes": "send_queue_bytes",
}
UNITS = {
    "tasks": "tasks",
    "send_queue_bytes": "bytes",
    "loop_lag_p99_ms": "ms",
    "rss_kb": "KB",
    "used_memory_kb": "KB",
    "fds": "fds",
    "fds_other": "fds",
    "threads": "threads",
    "cpu_pct": "%",
    "runqueue_pct": "%",
}
# Where each figure comes from.
SOURCES = {
    "rss_kb": "external (/proc)",
    "fds": "external (/proc)",
    "fds_other": "external fds - internal connections",
    "threads": "external (/proc)",
    "connections": "internal (/status)",
    "users": "internal (/status)",
    "subscriptions": "internal (/status)",
    "channels": "internal (/status)",
    "used_memory_kb": "internal (Redis INFO)",
    "keys": "internal (Redis DBSIZE)",
    "lag": "external (/health round trip)",
    "cpu_pct": "external (/proc)",
    "runqueue_pct": "external (/proc schedstat: waiting for a CPU)",
    "slow_disconnects": "internal (/status)",
    "loop_lag_p99_ms": "internal (/status loop_lag: the node's 100 ms timer probe)",
    "tasks": "internal (/metrics squall_asyncio_tasks)",
    "send_queue_bytes": "internal (/metrics squall_send_queue_bytes)",
    "lag_p99_ms": "external (/health round trip)",
    "lag_max_ms": "external (/health round trip)",
    "load1": "the machine (/proc/loadavg)",
}


def analyse(result: dict[str, Any]) -> Verdict:
    """The verdicts of a run's result (pure: reads only ``result``)."""
    samples = result["samples"]
    series: dict[str, tuple[list[float], list[float]]] = {}
    rules: dict[str, Rule] = {}
    units: dict[str, str] = {}
    names = sorted({k for row in samples for k in row if k != "t"})
    for name in names:
        process, _, kind = name.partition(" ")
        if kind not in RULES:
            continue
        points = [(row["t"], float(row[name])) for row in samples if name in row]
        series[name] = ([t for t, _ in points], [v for _, v in points])
        rule = RULES[kind]
        if process.startswith("g"):  # the load generator's own memory: not Squall's
            rule = Rule(rule.max_rel_per_hour, rule.min_rise, judged=False)
        rules[name] = rule
        units[name] = UNITS.get(kind, "")
    lag = {w: [ms for _, ms in v] for w, v in result["lag"].items()}
    return judge(series, rules, units, lag, result["counts"])


def plot(result: dict[str, Any], verdict: Verdict, stem: Path) -> list[Path]:
    """One PNG per kind of series (every process on it), with the fitted
    trend over the second half of each judged series."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return []
    samples = result["samples"]
    trends = {t.name: t for t in verdict.trends}
    kinds: dict[str, list[str]] = {}
    generator_kinds: dict[str, list[str]] = {}
    for name in sorted({k for row in samples for k in row if k != "t"}):
        process, _, kind = name.partition(" ")
        mine = process.startswith("g") and kind != "rss_kb"
        (generator_kinds if mine else kinds).setdefault(kind, []).append(name)
    written = []
    if generator_kinds:
        # The generators' own counters, one small chart each, on one PNG.
        fig, axes = plt.subplots(len(generator_kinds), 1, figsize=(8, 2 * len(generator_kinds)))
        for ax, (kind, names) in zip(np.atleast_1d(axes), generator_kinds.items(), strict=True):
            for name in names:
                points = [(row["t"] / 60, row[name]) for row in samples if name in row]
                ax.plot([p[0] for p in points], [p[1] for p in points], label=name)
            ax.set_ylabel(kind, fontsize=8)
            ax.legend(fontsize=7)
        fig.suptitle("soak: load generators (cumulative counters, subscribed now)")
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}-generators.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    for kind, names in kinds.items():
        # One chart per series (each on its own scale, so that a small
        # series' trend shows), with its fitted trend over the second half.
        fig, axes = plt.subplots(
            len(names), 1, figsize=(8, 1.2 + 1.8 * len(names)), sharex=True, squeeze=False
        )
        for ax, name in zip(axes[:, 0], names, strict=True):
            points = [(row["t"] / 60, row[name]) for row in samples if name in row]
            ax.plot([p[0] for p in points], [p[1] for p in points], linewidth=1)
            tr = trends.get(name)
            label = name
            if tr is not None and tr.verdict in ("pass", "fail", "info") and points:
                t_end = points[-1][0]
                t_mid = points[0][0] + (t_end - points[0][0]) / 2
                half = [t for t, _ in points if t >= t_mid]
                mean_t = sum(half) / len(half)
                slope = tr.slope_per_hour / 60  # per minute
                ax.plot(
                    [t_mid, t_end],
                    [tr.level + slope * (t_mid - mean_t), tr.level + slope * (t_end - mean_t)],
                    linestyle="--",
                    color="red" if tr.verdict == "fail" else "grey",
                )
                label += f": {tr.verdict}, {tr.rel_per_hour_pct:+.2f} %/h, t = {tr.t_stat}"
            ax.set_title(label, fontsize=8)
            ax.tick_params(labelsize=7)
        axes[-1, 0].set_xlabel("minutes of load")
        fig.suptitle(f"soak: {kind} ({SOURCES.get(kind, '')})", fontsize=10)
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}-{kind}.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    # The lag probes themselves, every one.
    fig, ax = plt.subplots(figsize=(8, 4))
    for w, points in result["lag"].items():
        ax.plot([t / 60 for t, _ in points], [ms for _, ms in points], ".", markersize=2, label=w)
    control = result.get("lag_control", [])
    ax.plot(
        [t / 60 for t, _ in control],
        [max(ms, 0.01) for _, ms in control],
        ".",
        markersize=2,
        color="grey",
        label="control: the prober's own timer lateness",
    )
    ax.axhline(50, color="red", linewidth=0.8, label="50 ms")
    ax.set_yscale("log")
    ax.set_xlabel("minutes of load")
    ax.set_ylabel("/health round trip, ms")
    ax.set_title("soak: event-loop lag (external probe)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = stem.with_name(f"{stem.name}-lag.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)
    return written


def markdown(result: dict[str, Any], verdict: Verdict, plots: list[Path]) -> str:
    c = result["counts"]
    cfg = result["config"]
    lines = [
        f"# Soak {result['started']}: {'PASS' if verdict.passed else 'FAIL'}",
        "",
        f"{result['subscribed']:,} connections subscribed (of {cfg['connections']:,}; "
        f"{c['sse_connections']} on SSE) in {result['connect_seconds']} s; "
        f"{result['seconds'] / 60:.1f} min of load on {result['workers']} workers (Redis), "
        f"{result['generators']} generator processes; churn {100 * cfg['churn']:g} %/s, "
        f"{cfg['rate']:g} publications/s over {cfg['channels']} channels"
        f"{' + presence channels' if cfg['presence_share'] else ''}, API calls every "
        f"{cfg['api_seconds']:g} s; samples every {cfg['sample_seconds']:g} s.",
        "",
    ]
    if verdict.failures:
        lines += ["Failures:", "", *(f"- {f}" for f in verdict.failures), ""]
    lines += [
        "## Deliveries",
        "",
        "| lost | duplicated | out of order | incomplete | announced gaps | publications "
        "(accepted) | deliveries | churned | server drops | refused | publish errors "
        "| worker restarts |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {c['lost']} | {c['duplicated']} | {c['out_of_order']} | {c['incomplete']} | "
        f"{c['announced_gaps']} | {c['publications']:,} ({c['publications_accepted']:,}) | "
        f"{c['delivered']:,} | {c['churned']:,} | {c['drops']} | {c['refused']} | "
        f"{c['publish_errors']} | {c['worker_restarts']} |",
        "",
        f"API calls: {c['api_calls']:,} ({c['api_errors']} errors, p99 "
        f"{result['api_ms_p99']} ms). Lag probes that failed: {c['probe_failures']}.",
        "",
        f"## Event-loop lag (external: /health round trip, every {PROBE_INTERVAL} s per worker)",
        "",
        "| worker | probes | p50 ms | p99 ms | max ms | limit | verdict | CPU % (mean) "
        "| waiting for a CPU, % of the time (mean, max) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]

    def mean_max(name: str) -> tuple[float, float]:
        values = [row[name] for row in result["samples"] if name in row]
        return (sum(values) / len(values), max(values)) if values else (0.0, 0.0)

    for w, lag in verdict.lag.items():
        cpu, _ = mean_max(f"{w} cpu_pct")
        wait, wait_max = mean_max(f"{w} runqueue_pct")
        lines.append(
            f"| {w} | {lag.samples:,} | {lag.p50_ms} | {lag.p99_ms} | {lag.max_ms} | "
            f"{lag.limit_ms:g} | {lag.verdict} | {cpu:.1f} | {wait:.1f}, {wait_max:.1f} |"
        )
    control = lag_rule([ms for _, ms in result.get("lag_control", [])])
    lines.append(
        f"| control | {control.samples:,} | {control.p50_ms} | {control.p99_ms} | "
        f"{control.max_ms} | – | not judged | | |"
    )
    loads = [row["machine load1"] for row in result["samples"] if "machine load1" in row]
    lines += [
        "",
        "The control is how late the probing process's own 0.25 s timer fired, and "
        "*waiting for a CPU* is the share of time a worker's event-loop thread was "
        "runnable but not running (/proc/<pid>/schedstat): when they are high, the "
        "lag is the machine's CPU contention (load average over the run: "
        f"{min(loads, default=0):.1f}–{max(loads, default=0):.1f} on "
        f"{os.cpu_count()} CPUs), not the worker's own loop.",
    ]
    lines += [
        "",
        "## Trends (second half of the run)",
        "",
        "| series | source | first | last | level | slope /h | %/h | t | n_eff | verdict | why |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    samples = result["samples"]
    for t in verdict.trends:
        values = [row[t.name] for row in samples if t.name in row]
        kind = t.name.partition(" ")[2]
        source = "generator (/proc)" if t.name.startswith("g") else SOURCES.get(kind, "")
        lines.append(
            f"| {t.name} | {source} | {values[0] if values else ''} | "
            f"{values[-1] if values else ''} | {t.level:,.1f} | {t.slope_per_hour:,.1f} | "
            f"{t.rel_per_hour_pct:+.2f} | {t.t_stat} | {t.n_eff} | {t.verdict} | {t.reason} |"
        )
    lines += [
        "",
        *(f"![{p.stem}]({p.name})" for p in plots),
        "",
    ]
    return "\n".join(lines)


def write_report(result: dict[str, Any], results_dir: Path) -> tuple[Verdict, Path]:
    """Analyse ``result`` and write soak-<time>.json, .md and the PNGs."""
    verdict = analyse(result)
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    stem = results_dir / f"soak-{stamp}"
    plots = plot(result, verdict, stem)
    out = {**result, "verdict": verdict.as_dict(), "plots": [p.name for p in plots]}
    stem.with_suffix(".json").write_text(
        orjson.dumps(out, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY).decode()
    )
    stem.with_suffix(".md").write_text(markdown(result, verdict, plots))
    return verdict, stem


def main(argv: list[str] | None = None) -> int:
    env = os.environ
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=float(env.get("SOAK_MINUTES", 30)))
    parser.add_argument("--connections", type=int, default=int(env.get("SOAK_CONNECTIONS", 10_000)))
    parser.add_argument(
        "--sample-seconds", type=float, default=float(env.get("SOAK_SAMPLE_SECONDS", 10))
    )
    parser.add_argument("--channels", type=int, default=100)
    parser.add_argument("--rate", type=float, default=20.0, help="publications per second")
    parser.add_argument("--churn", type=float, default=0.01, help="share of connections a second")
    parser.add_argument("--sse", type=float, default=0.02, help="share of connections on SSE")
    parser.add_argument("--generators", type=int, default=0, help="0: 1 per 5,000 connections")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    cfg = Config(
        minutes=args.minutes,
        connections=args.connections,
        sample_seconds=args.sample_seconds,
        channels=args.channels,
        rate=args.rate,
        churn=args.churn,
        sse_share=args.sse,
        generators=args.generators,
        results=args.results_dir,
    )
    result = uvloop.run(Soak(cfg).run())
    verdict, stem = write_report(result, cfg.results)
    print(stem.with_suffix(".md").read_text())
    print(f"soak: {'PASS' if verdict.passed else 'FAIL'}; {stem}.json", flush=True)
    return 0 if verdict.passed else 1


if __name__ == "__main__":
    sys.exit(main())
