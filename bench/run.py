"""Fan-out benchmark: one channel, N subscribers, Squall against its peers in
the same run on the same machine, with the same load generator.

    python -m bench.run                        # default scenarios, 3 repetitions
    python -m bench.run --subscribers 1000 --peers squall,raw --reps 1

The server runs pinned to CPU 0, this load generator to CPU 1 (when the
machine has two). Measured per run: deliveries per second, server CPU
microseconds per delivery (user+sys of the server process from /proc, which
stays true when the generator is the bottleneck), publish-to-deliver
latency (the send time travels in the payload), lost and duplicated
publications, and whether the generator itself was the bottleneck.
Results: bench/results/fanout-<time>.json and bench/results/fanout.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import uvloop

from bench.wsproto import OFFSET, SEQ, Subscriber, frame

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SECRET = "bench-secret-0123456789abcdef-0123456789"

SQUALL_CONFIG = """
[limits]
commands_per_second = 1000000.0
command_burst = 1000000
max_connections = 100000
[namespaces.bench]
allow_publish = true
history_size = 100
"""


@dataclass
class Result:
    peer: str
    subscribers: int
    publications: int
    rate: float  # target publications per second (0: as fast as accepted)
    deliveries: int
    seconds: float
    deliveries_per_s: float
    cpu_us_per_delivery: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    lost: int
    duplicated: int
    client_bound: bool


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_peer(peer: str, port: int, workdir: Path) -> subprocess.Popen[bytes]:
    pin = ["taskset", "-c", "0"] if (os.cpu_count() or 1) > 1 else []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if peer == "squall":
        config = workdir / "bench.toml"
        config.write_text(SQUALL_CONFIG)
        env.update(SQUALL_TOKEN_SECRET=SECRET, SQUALL_API_KEY="bench-api-key-0123456789",
                   SQUALL_LOG_LEVEL="warning")  # fmt: skip
        cmd = [sys.executable, "-m", "server", "serve", "--port", str(port), "--config",
               str(config), "--data-dir", str(workdir / "data")]  # fmt: skip
    else:
        cmd = [sys.executable, str(ROOT / "bench" / "peers" / f"{peer}.py"), str(port)]
    proc = subprocess.Popen([*pin, *cmd], env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    import socket

    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{peer} did not start")


def hello(peer: str, user: str) -> list[bytes]:
    if peer != "squall":
        return [b"sub"]
    from server.auth import mint_token
    from server.config import AuthSettings

    token = mint_token(AuthSettings(token_secret=SECRET), sub=user, ttl=3600)
    return [
        json.dumps({"id": 1, "method": "connect", "params": {"token": token}}).encode(),
        b'{"id":2,"method":"subscribe","params":{"channel":"bench:fanout"}}',
    ]


def message(peer: str, n: int, pad: str) -> bytes:
    data = {"n": n, "t": time.time(), "pad": pad} if n else {"w": 1, "t": time.time()}
    if peer == "squall":
        body = {"id": n + 10, "method": "publish", "params": {"channel": "bench:fanout", "data": data}}
        return json.dumps(body, separators=(",", ":")).encode()
    return json.dumps(data, separators=(",", ":")).encode()


async def one_run(peer: str, subscribers: int, publications: int, rate: float, size: int) -> Result:
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        proc = start_peer(peer, port, Path(tmp))
        try:
            return await _measure(loop, peer, port, proc.pid, subscribers, publications, rate, size)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _measure(loop: asyncio.AbstractEventLoop, peer: str, port: int, pid: int,
                   subscribers: int, publications: int, rate: float, size: int) -> Result:  # fmt: skip
    host = f"127.0.0.1:{port}"
    ready = asyncio.Event()
    waiting = [subscribers]

    def one_ready() -> None:
        waiting[0] -= 1
        if waiting[0] == 0:
            ready.set()

    latencies: list[float] = []
    seq = OFFSET if peer == "squall" else SEQ
    subs: list[Subscriber] = []
    for i in range(subscribers):
        lat = latencies if i == 0 else None
        _, protocol = await loop.create_connection(
            lambda i=i, lat=lat: Subscriber("/connection/websocket", host, hello(peer, f"u{i}"),
                                            seq, lat, one_ready),  # fmt: skip
            "127.0.0.1", port,
        )
        subs.append(protocol)
    await asyncio.wait_for(ready.wait(), 60)
    pub_ready = asyncio.Event()
    _, publisher = await loop.create_connection(
        lambda: Subscriber("/connection/websocket", host, hello(peer, "publisher")[:1], SEQ, None,
                           pub_ready.set),  # fmt: skip
        "127.0.0.1", port,
    )
    await asyncio.wait_for(pub_ready.wait(), 10)
    assert publisher.transport is not None
    # Warm up: Squall counts what arrives (its pushes carry offsets), so wait
    # until every subscriber heard something; the simple peers need a moment.
    for _ in range(5):
        publisher.transport.write(frame(message(peer, 0, "")))
    for _ in range(200):
        await asyncio.sleep(0.05)
        if peer != "squall" or all(s.count for s in subs):
            break
    await asyncio.sleep(0.3)
    for s in subs:
        # Measured publications continue from the last offset seen (Squall
        # numbers the warm-ups too); the simple peers count from 1.
        s.count = s.lost = s.dup = 0
    latencies.clear()
    pad = "x" * size
    cpu0 = cpu_seconds(pid)
    own0 = sum(os.times()[:2])
    t0 = time.perf_counter()
    interval = 1.0 / rate if rate else 0.0
    for n in range(1, publications + 1):
        publisher.transport.write(frame(message(peer, n, pad)))
        if interval:
            delay = t0 + n * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        elif n % 50 == 0:
            await asyncio.sleep(0)
    expected = publications * subscribers
    deadline = time.perf_counter() + 60
    while sum(s.count for s in subs) < expected and time.perf_counter() < deadline:
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - t0
    cpu = cpu_seconds(pid) - cpu0
    own = sum(os.times()[:2]) - own0
    delivered = sum(s.count for s in subs)
    lost = sum(max(0, publications - (s.count - s.dup)) for s in subs)
    for s in [*subs, publisher]:
        if s.transport is not None:
            s.transport.close()
    lat = sorted(latencies) or [0.0]

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 3)

    return Result(
        peer=peer, subscribers=subscribers, publications=publications, rate=rate,
        deliveries=delivered, seconds=round(elapsed, 3),
        deliveries_per_s=round(delivered / elapsed, 1),
        cpu_us_per_delivery=round(cpu * 1e6 / max(delivered, 1), 3),
        p50_ms=pct(0.5), p99_ms=pct(0.99), p999_ms=pct(0.999),
        lost=lost, duplicated=sum(s.dup for s in subs), client_bound=own > 0.9 * elapsed,
    )  # fmt: skip


def summarize(results: list[Result]) -> str:
    groups: dict[tuple[str, int, float], list[Result]] = {}
    for r in results:
        groups.setdefault((r.peer, r.subscribers, r.rate), []).append(r)
    raw: dict[tuple[int, float], float] = {}
    for (peer, n, rate), rs in groups.items():
        if peer == "raw_asyncio":
            raw[(n, rate)] = statistics.median(x.cpu_us_per_delivery for x in rs)
    lines = [
        "| peer | subscribers | rate | deliveries/s (median, range) | CPU µs/delivery | × raw | p50 ms | p99 ms | lost | dup | client-bound |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (peer, n, rate), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        dps = [x.deliveries_per_s for x in rs]
        cpu = statistics.median(x.cpu_us_per_delivery for x in rs)
        ratio = f"{cpu / raw[(n, rate)]:.2f}" if raw.get((n, rate)) else "–"
        lines.append(
            f"| {peer} | {n} | {rate or 'max'} | {statistics.median(dps):,.0f} ({min(dps):,.0f}–{max(dps):,.0f}) "
            f"| {cpu:.2f} | {ratio} | {statistics.median(x.p50_ms for x in rs):.2f} "
            f"| {statistics.median(x.p99_ms for x in rs):.2f} | {sum(x.lost for x in rs)} "
            f"| {sum(x.duplicated for x in rs)} | {any(x.client_bound for x in rs)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", default="raw_asyncio,plain_tornado,squall")
    parser.add_argument("--subscribers", default="100,1000")
    parser.add_argument("--publications", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=0, help="publications/s; 0: as fast as accepted")
    parser.add_argument("--size", type=int, default=100, help="padding bytes per publication")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})
    results: list[Result] = []
    for n in [int(x) for x in args.subscribers.split(",")]:
        for rep in range(args.reps):
            for peer in args.peers.split(","):
                r = uvloop.run(one_run(peer, n, args.publications, args.rate, args.size))
                print(f"{peer:14} subs={n:6} rep={rep} {r.deliveries_per_s:12,.0f}/s "
                      f"{r.cpu_us_per_delivery:7.2f} µs/delivery lost={r.lost} dup={r.duplicated}"
                      f"{' CLIENT-BOUND' if r.client_bound else ''}", flush=True)  # fmt: skip
                results.append(r)
    print(write_results("fanout", "Fan-out, one channel", vars(args), results, summarize(results)))


def write_results(kind: str, title: str, args: dict[str, Any], results: list[Any],
                  table: str) -> str:  # fmt: skip
    """bench/results/<kind>-<time>.json (every run) and <kind>.md (the table)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    meta: dict[str, Any] = {
        "time": stamp, "python": platform.python_version(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "args": args,
    }  # fmt: skip
    (RESULTS / f"{kind}-{stamp}.json").write_text(
        json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=2)
    )
    (RESULTS / f"{kind}.md").write_text(f"# {title}\n\n{json.dumps(meta)}\n\n{table}\n")
    return table


if __name__ == "__main__":
    main()
