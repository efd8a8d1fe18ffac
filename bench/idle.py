"""Memory per idle subscribed WebSocket connection, Squall against its peers
in the same run on the same machine.

    python -m bench.idle                              # 1,000 and 5,000, 3 repetitions
    python -m bench.idle --connections 50000 --reps 1 --peers squall

For each peer: start the server (pinned to CPU 0), open one connection and
let it settle, read the server's RSS from /proc, then open N connections that
each complete the handshake and subscribe (Squall: connect with a JWT, then
subscribe; the peers: their one "sub" message), wait until every one has its
reply, let the server settle again, and read RSS once more. The difference
divided by N is the cost of one idle subscribed connection. Results:
bench/results/idle-<time>.json and bench/results/idle.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import uvloop

from bench.run import PEERS, free_port, hello, raise_fd_limit, start_peer, stop_peer, write_results
from bench.wsproto import OFFSET, SEQ, Subscriber


@dataclass
class IdleResult:
    peer: str
    connections: int
    rss_before_kb: int
    rss_after_kb: int
    kb_per_connection: float
    connect_seconds: float


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def open_subscribed(peer: str, port: int, count: int, first: int) -> list[Subscriber]:
    loop = asyncio.get_running_loop()
    host = f"127.0.0.1:{port}"
    left = [count]
    done = asyncio.Event()

    def one_ready() -> None:
        left[0] -= 1
        if left[0] == 0:
            done.set()

    seq = OFFSET if peer.startswith("squall") else SEQ
    subs: list[Subscriber] = []

    def make(i: int) -> Subscriber:
        path = PEERS[peer].path
        return PEERS[peer].client(
            path,
            host,
            hello(peer, f"u{i}"),
            seq,
            None,
            one_ready,
            bool(PEERS[peer].hello),
            PEERS[peer].protocol,
        )

    for i in range(first, first + count):
        # One source address has ~28,000 ephemeral ports: past that, connect
        # from further loopback addresses (127.0.0.2, ...; still this machine).
        source = (f"127.0.0.{2 + i // 20000}", 0)
        _, proto = await loop.create_connection(
            lambda i=i: make(i), "127.0.0.1", port, local_addr=source
        )
        subs.append(proto)
        if i % 200 == 0:
            await asyncio.sleep(0)  # let handshakes progress
    await asyncio.wait_for(done.wait(), 60 + count / 200)
    return subs


async def settle(pid: int, timeout: float = 10.0) -> int:
    """RSS once it stops moving (two readings 0.5 s apart within 1 %)."""
    last = rss_kb(pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now = rss_kb(pid)
        if abs(now - last) <= max(64, last // 100):
            return now
        last = now
    return last


async def one_run(peer: str, connections: int) -> IdleResult:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        proc = start_peer(peer, port, Path(tmp))
        try:
            warm = await open_subscribed(peer, port, 1, 0)
            before = await settle(proc.pid)
            t0 = time.perf_counter()
            subs = await open_subscribed(peer, port, connections, 1)
            took = time.perf_counter() - t0
            after = await settle(proc.pid)
            for s in [*warm, *subs]:
                if s.transport is not None:
                    s.transport.close()
            return IdleResult(
                peer,
                connections,
                before,
                after,
                round((after - before) / connections, 2),
                round(took, 2),
            )
        finally:
            stop_peer(proc)


def summarize(results: list[IdleResult]) -> str:
    groups: dict[tuple[str, int], list[IdleResult]] = {}
    for r in results:
        groups.setdefault((r.peer, r.connections), []).append(r)
    raw = {
        n: statistics.median(x.kb_per_connection for x in rs)
        for (p, n), rs in groups.items()
        if p == "raw_asyncio"
    }
    lines = [
        "| peer | connections | KB per idle subscribed connection (median) | range | x raw"
        " | connect s |",
        "| --- | ---: | ---: | --- | ---: | ---: |",
    ]
    for (peer, n), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        per = [r.kb_per_connection for r in rs]
        med = statistics.median(per)
        ratio = f"{med / raw[n]:.1f}" if raw.get(n) else "—"
        lines.append(
            f"| {peer} | {n:,} | {med:.2f} | {min(per):.2f} to {max(per):.2f} | {ratio} | "
            f"{statistics.median(r.connect_seconds for r in rs):.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", default="raw_asyncio,plain_tornado,squall")
    parser.add_argument("--connections", default="1000,5000")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--name", default="idle", help="results file: bench/results/<name>.md")
    args = parser.parse_args()
    counts = [int(x) for x in args.connections.split(",")]
    # Each connection is a socket here and in the server (which inherits it).
    # The generator and the server (which inherits the limit) each hold N.
    raise_fd_limit(max(counts) + 1000)
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})
    results: list[IdleResult] = []
    for n in counts:
        for rep in range(args.reps):
            for peer in args.peers.split(","):
                r = uvloop.run(one_run(peer, n))
                print(
                    f"{peer:14} conns={n:6} rep={rep} {r.kb_per_connection:8.2f} KB/conn "
                    f"(RSS {r.rss_before_kb:,} -> {r.rss_after_kb:,} KB)",
                    flush=True,
                )
                results.append(r)
    table = summarize(results)
    title = "Memory per idle subscribed connection"
    print(write_results(args.name, title, vars(args), results, table))


if __name__ == "__main__":
    main()
