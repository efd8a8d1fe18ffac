"""Many connections on one machine, with fan-out running: Squall as several
worker processes on Redis, every connection subscribed to one channel.

    python -m bench.scale                                  # 50,000 connections
    python -m bench.scale --connections 20000 --workers 2

A process here may hold at most its hard limit of open files (20,000 in the
sandbox this was written in, with no way to raise it), so neither one server
process nor one generator process can hold 50,000 sockets. Squall runs as
``--workers W`` on one port (they share the listening socket; Redis carries
each publication to every worker once), and the generator is G processes,
each with its share of the connections from loopback source addresses of its
own (127.0.0.<10+g>, so no address runs out of ephemeral ports).

Steps: start Redis and ``squall serve --workers W``; read the RSS of every
Squall process; open the connections (each connects with a JWT and
subscribes) and wait until every subscription is confirmed; read RSS again
once it settles (the difference over N is the memory of one idle subscribed
connection, summed over the workers); then publish P publications at R per
second from one more connection and wait until every subscriber has all P,
checked by offset (lost and duplicated counted per connection). CPU is user +
system time of every Squall process and of Redis over the publishing phase.
Results: bench/results/<name>.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import multiprocessing.connection
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop

from bench.idle import rss_kb
from bench.run import (
    PEERS,
    cpu_seconds,
    descendants,
    free_port,
    hello,
    message,
    publisher_hello,
    raise_fd_limit,
    start_peer,
    stop_peer,
    write_results,
)
from bench.wsproto import OFFSET, Subscriber, frame, until


@dataclass
class ScaleResult:
    connections: int
    workers: int
    generators: int
    connect_seconds: float
    rss_before_kb: int
    rss_after_kb: int
    kb_per_connection: float
    per_worker: list[int]  # connections each worker held (from its /proc fd count)
    publications: int
    rate: float
    deliveries: int
    publish_seconds: float
    cpu_us_per_delivery: float
    lost: int
    duplicated: int
    incomplete: int  # connections that did not get every publication in time
    dropped: int  # connections the server closed before the end
    refused: int  # subscriptions answered with an error


class Confirmed(Subscriber):
    """A subscriber that knows when its subscribe command was answered."""

    def __init__(self, *args: Any, confirmed: Any) -> None:
        super().__init__(*args)
        self.confirmed = confirmed
        self.subscribed = False
        self.refused = b""  # the error reply to subscribe, if any
        self.dropped = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.dropped = True

    def on_text(self, payload: bytes) -> None:
        if b'"id":' in payload:  # replies (the subscribe reply has an offset too)
            lines = payload.split(b"\n")
            for line in lines:
                if not self.subscribed and line.startswith(b'{"id":2,'):
                    self.subscribed = True
                    self.refused = line if b'"error"' in line else b""
                    self.confirmed()
            payload = b"\n".join(line for line in lines if not line.startswith(b'{"id":'))
        super().on_text(payload)


async def _generate(
    port: int, first: int, count: int, source: str, pipe: multiprocessing.connection.Connection
) -> None:
    loop = asyncio.get_running_loop()
    host = f"127.0.0.1:{port}"
    left = [count]
    done = asyncio.Event()

    def one_confirmed() -> None:
        left[0] -= 1
        if left[0] == 0:
            done.set()

    subs: list[Confirmed] = []
    for i in range(first, first + count):
        _, proto = await loop.create_connection(
            lambda i=i: Confirmed(
                PEERS["squall"].path,
                host,
                hello("squall", f"u{i}"),
                OFFSET,
                None,
                lambda: None,
                confirmed=one_confirmed,
            ),
            "127.0.0.1",
            port,
            local_addr=(source, 0),
        )
        subs.append(proto)
        if i % 100 == 0:
            await asyncio.sleep(0)  # let handshakes progress
    try:
        await asyncio.wait_for(done.wait(), 60 + count / 100)
    except TimeoutError:
        pass
    pipe.send(("subscribed", count - left[0]))
    # Wait for the parent: it publishes, then says how many to expect.
    if not await until(pipe.poll, 3600):
        raise TimeoutError("the parent never said how many publications to expect")
    _, publications, timeout = pipe.recv()
    await until(lambda: all(s.last >= publications for s in subs), timeout, 0.1)
    lost = sum(s.lost + max(0, publications - s.last) for s in subs)
    pipe.send(
        (
            "done",
            {
                "deliveries": sum(s.count for s in subs),
                "lost": lost,
                "duplicated": sum(s.dup for s in subs),
                "incomplete": sum(1 for s in subs if s.last < publications),
                "dropped": sum(1 for s in subs if s.dropped),
                "refused": sum(1 for s in subs if s.refused),
            },
        )
    )
    for s in subs:
        if s.transport is not None:
            s.transport.close()


def _generator(
    port: int,
    first: int,
    count: int,
    source: str,
    core: int,
    pipe: multiprocessing.connection.Connection,
) -> None:
    raise_fd_limit(count + 1000)
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {core})
    uvloop.run(_generate(port, first, count, source, pipe))


async def settle(pids: list[int], timeout: float = 20.0) -> int:
    """Total RSS of ``pids`` once it stops moving (two readings 1 s apart within 1 %)."""
    last = sum(rss_kb(p) for p in pids)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await asyncio.sleep(1.0)
        now = sum(rss_kb(p) for p in pids)
        if abs(now - last) <= max(256, last // 100):
            return now
        last = now
    return last


def open_sockets(pid: int) -> int:
    try:
        return sum(1 for link in Path(f"/proc/{pid}/fd").iterdir() if "socket" in os.readlink(link))
    except OSError:
        return 0


async def _publish(port: int, publications: int, rate: float) -> float:
    """Publish ``publications`` at ``rate`` per second from one connection;
    returns when every publish was answered."""
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    _, publisher = await loop.create_connection(
        lambda: Subscriber(
            PEERS["squall"].path,
            f"127.0.0.1:{port}",
            publisher_hello("squall"),
            OFFSET,
            None,
            ready.set,
        ),
        "127.0.0.1",
        port,
    )
    await asyncio.wait_for(ready.wait(), 30)
    if not await until(lambda: publisher.texts >= 1, 30, 0.01):  # the connect reply
        raise TimeoutError("the publisher's connect was not answered")
    assert publisher.transport is not None
    pad = "x" * 64
    t0 = time.perf_counter()
    for n in range(1, publications + 1):
        publisher.transport.write(frame(message("squall", n, pad)))
        pause = t0 + n / rate - time.perf_counter()
        if pause > 0:
            await asyncio.sleep(pause)
    # Every publish has its reply (a reply carries the offset too).
    await until(lambda: publisher.count >= publications, 60)
    took = time.perf_counter() - t0
    publisher.transport.close()
    return took


async def one_run(
    connections: int, workers: int, generators: int, publications: int, rate: float
) -> ScaleResult:
    from tests.services import RedisServer

    redis = RedisServer().start()
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        proc = start_peer(
            "squall", port, Path(tmp), {"SQUALL_BROKER_URL": redis.url}, ("--workers", str(workers))
        )
        children: list[Any] = []
        try:
            await until(lambda: len(descendants(proc.pid)) >= workers, 30, 0.1)
            squall = [proc.pid, *descendants(proc.pid)]
            before = await settle(squall)
            share = -(-connections // generators)
            pipes = []
            t0 = time.perf_counter()
            for g in range(generators):
                count = min(share, connections - g * share)
                ours, theirs = ctx.Pipe()
                core = 1 if g % 2 == 0 else 0
                child = ctx.Process(
                    target=_generator,
                    args=(port, g * share, count, f"127.0.0.{10 + g}", core, theirs),
                )
                child.start()
                children.append(child)
                pipes.append(ours)
            subscribed = 0
            for p in pipes:
                _, n = await asyncio.to_thread(p.recv)
                subscribed += n
            took = time.perf_counter() - t0
            print(f"  {subscribed:,} of {connections:,} subscribed in {took:.1f} s", flush=True)
            after = await settle(squall)
            per_worker = [open_sockets(pid) for pid in descendants(proc.pid)]
            redis_pid = redis.proc.pid if redis.proc else None
            measured = [*squall, *([redis_pid] if redis_pid else [])]
            cpu0 = sum(cpu_seconds(p) for p in measured)
            publish_took = await _publish(port, publications, rate)
            expect = publications
            for p in pipes:
                p.send(("expect", expect, 60.0))
            totals = {
                "deliveries": 0,
                "lost": 0,
                "duplicated": 0,
                "incomplete": 0,
                "dropped": 0,
                "refused": 0,
            }
            for p in pipes:
                _, got = await asyncio.to_thread(p.recv)
                for k in totals:
                    totals[k] += got[k]
            cpu = sum(cpu_seconds(p) for p in measured) - cpu0
            deliveries = totals["deliveries"]
            return ScaleResult(
                connections=subscribed,
                workers=workers,
                generators=generators,
                connect_seconds=round(took, 1),
                rss_before_kb=before,
                rss_after_kb=after,
                kb_per_connection=round((after - before) / max(1, subscribed), 2),
                per_worker=per_worker,
                publications=publications,
                rate=rate,
                deliveries=deliveries,
                publish_seconds=round(publish_took, 1),
                cpu_us_per_delivery=round(cpu / max(1, deliveries) * 1e6, 2),
                lost=totals["lost"],
                duplicated=totals["duplicated"],
                incomplete=totals["incomplete"],
                dropped=totals["dropped"],
                refused=totals["refused"],
            )
        finally:
            for child in children:
                child.join(timeout=30)
                if child.is_alive():
                    child.kill()
            t_stop = time.perf_counter()
            stop_peer(proc)
            print(f"  server stopped in {time.perf_counter() - t_stop:.1f} s", flush=True)
            redis.stop()


def summarize(results: list[ScaleResult]) -> str:
    lines = [
        "| connections | workers | generators | connect s | KB per idle connection"
        " | connections per worker | publications | deliveries | CPU µs/delivery | lost | dup"
        " | incomplete | dropped | refused |",
        "| ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r.connections:,} | {r.workers} | {r.generators} | {r.connect_seconds} | "
            f"{r.kb_per_connection:.2f} | {', '.join(f'{n:,}' for n in r.per_worker)} | "
            f"{r.publications:,} at {r.rate:g}/s | {r.deliveries:,} | {r.cpu_us_per_delivery} | "
            f"{r.lost} | {r.duplicated} | {r.incomplete} | {r.dropped} | {r.refused} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=50_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--generators", type=int, default=4)
    parser.add_argument("--publications", type=int, default=100)
    parser.add_argument("--rate", type=float, default=5.0, help="publications per second")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--name", default="scale-50k", help="results: bench/results/<name>.md")
    args = parser.parse_args()
    # The server inherits this limit; each worker holds about N / W sockets.
    raise_fd_limit(args.connections // args.workers + 5000)
    results = []
    for rep in range(args.reps):
        r = uvloop.run(
            one_run(args.connections, args.workers, args.generators, args.publications, args.rate)
        )
        print(f"rep={rep} {r}", flush=True)
        results.append(r)
    title = f"{args.connections:,} connections with fan-out (workers on Redis)"
    print(write_results(args.name, title, vars(args), results, summarize(results)))


if __name__ == "__main__":
    main()
