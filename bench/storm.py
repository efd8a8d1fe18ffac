"""Reconnect storm: N clients, all subscribed to one channel, drop at once
(as when a load balancer or a node restarts), publications go on while they
are away, then all N reconnect at the same moment and recover from history.

    python -m bench.storm                       # 10,000 clients, 3 repetitions
    python -m bench.storm --clients 2000 --reps 1

Measured: seconds from the first reconnect until every client has its
subscribe reply and every missed publication; server CPU for the storm
(µs per client); clients that recovered completely; missed publications lost
or duplicated (by offset). Squall only: none of the peers has history to
recover from. Results: bench/results/storm-<time>.json and storm.md.
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

import orjson
import uvloop

from bench.run import (
    cpu_seconds,
    free_port,
    raise_fd_limit,
    squall_token,
    start_peer,
    stop_peer,
    write_results,
)
from bench.wsproto import SEQ, Subscriber, frame

CHANNEL = "bench:storm"


class Client(Subscriber):
    """Connects, subscribes (recovering when it knows a position), and keeps
    the offsets it got."""

    def __init__(
        self,
        host: str,
        user: str,
        since: tuple[int, str] | None,
        done: asyncio.Event,
        left: list[int],
        want: int,
    ) -> None:
        params: dict[str, object] = {"channel": CHANNEL}
        if since is not None:
            params.update(recover=True, offset=since[0], epoch=since[1])
        hello = [
            orjson.dumps({"id": 1, "method": "connect", "params": {"token": squall_token(user)}}),
            orjson.dumps({"id": 2, "method": "subscribe", "params": params}),
        ]
        super().__init__("/connection/websocket", host, hello, SEQ, None, lambda: None)
        self.done, self.left, self.want = done, left, want
        self.offsets: list[int] = []
        self.epoch = ""
        self.position = 0
        self.recovered: bool | None = None
        self.finished = False

    def on_text(self, payload: bytes) -> None:
        for line in payload.split(b"\n"):
            msg = orjson.loads(line)
            if msg.get("id") == 2:
                result = msg["result"]
                self.epoch = result["epoch"]
                self.position = result["offset"]
                self.recovered = result.get("recovered")
                # Recovered publications come in the reply, live ones as pushes.
                self.offsets += [p["offset"] for p in result.get("publications", [])]
            elif msg.get("push") == "pub":
                self.offsets.append(msg["pub"]["offset"])
        if not self.finished and self.epoch and len(self.offsets) >= self.want:
            self.finished = True
            self.left[0] -= 1
            if self.left[0] == 0:
                self.done.set()


@dataclass
class StormResult:
    clients: int
    missed: int
    seconds: float
    cpu_us_per_client: float
    recovered: int
    lost: int
    duplicated: int


async def connect_all(
    port: int, count: int, since: list[tuple[int, str] | None], want: int
) -> tuple[list[Client], asyncio.Event]:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    left = [count]
    clients: list[Client] = []
    # All at once, as a storm comes: 200 connection attempts in flight.
    for start in range(0, count, 200):
        made = await asyncio.gather(
            *(
                loop.create_connection(
                    lambda i=i: Client(f"127.0.0.1:{port}", f"u{i}", since[i], done, left, want),
                    "127.0.0.1",
                    port,
                )
                for i in range(start, min(count, start + 200))
            )
        )
        clients += [c for _, c in made]
    return clients, done


async def one_run(count: int, missed: int) -> StormResult:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        proc = start_peer("squall", port, Path(tmp))
        try:
            loop = asyncio.get_running_loop()
            pub_done = asyncio.Event()
            _, publisher = await loop.create_connection(
                lambda: Subscriber(
                    "/connection/websocket",
                    f"127.0.0.1:{port}",
                    [
                        orjson.dumps(
                            {"id": 1, "method": "connect", "params": {"token": squall_token("pub")}}
                        )
                    ],
                    SEQ,
                    None,
                    pub_done.set,
                ),
                "127.0.0.1",
                port,
            )
            await asyncio.wait_for(pub_done.wait(), 10)

            def publish(n: int) -> None:
                for k in range(n):
                    body = {
                        "id": 100 + k,
                        "method": "publish",
                        "params": {"channel": CHANNEL, "data": {"k": k, "pad": "x" * 100}},
                    }
                    publisher.transport.write(frame(orjson.dumps(body)))  # type: ignore[union-attr]

            # Everyone subscribed, knowing the channel's position.
            publish(3)
            first, ready = await connect_all(port, count, [None] * count, 0)
            await asyncio.wait_for(ready.wait(), 60 + count / 100)
            positions = [(c.position, c.epoch) for c in first]
            for c in first:
                c.transport.close()  # type: ignore[union-attr]
            # Publications they miss while away.
            await asyncio.sleep(0.5)
            publish(missed)
            await asyncio.sleep(0.5)
            cpu0 = cpu_seconds(proc.pid)
            t0 = time.perf_counter()
            again, done = await connect_all(port, count, list(positions), missed)
            await asyncio.wait_for(done.wait(), 120 + count / 50)
            took = time.perf_counter() - t0
            cpu = cpu_seconds(proc.pid) - cpu0
            lost = dup = 0
            for c, (offset, _) in zip(again, positions, strict=True):
                expected = list(range(offset + 1, offset + missed + 1))
                got = c.offsets[:missed]
                dup += len(got) - len(set(got))
                lost += len(set(expected) - set(got))
            for c in again:
                c.transport.close()  # type: ignore[union-attr]
            publisher.transport.close()  # type: ignore[union-attr]
            return StormResult(
                count,
                missed,
                round(took, 2),
                round(cpu * 1e6 / count, 1),
                sum(1 for c in again if c.recovered),
                lost,
                dup,
            )
        finally:
            stop_peer(proc)


def summarize(results: list[StormResult]) -> str:
    secs = [r.seconds for r in results]
    cpu = [r.cpu_us_per_client for r in results]
    r0 = results[0]
    return "\n".join(
        [
            "| clients | missed publications | seconds to recover all (median, range) "
            "| server CPU µs per client | recovered | lost | duplicated |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| {r0.clients:,} | {r0.missed} "
            f"| {statistics.median(secs):.2f} ({min(secs):.2f}–{max(secs):.2f}) "
            f"| {statistics.median(cpu):.0f} | {min(r.recovered for r in results):,} "
            f"| {sum(r.lost for r in results)} | {sum(r.duplicated for r in results)} |",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10000)
    parser.add_argument(
        "--missed", type=int, default=50, help="publications while away (≤ history)"
    )
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    raise_fd_limit(args.clients + 1000)
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})
    results = []
    for rep in range(args.reps):
        r = uvloop.run(one_run(args.clients, args.missed))
        print(
            f"storm clients={r.clients} rep={rep} {r.seconds:.2f}s {r.cpu_us_per_client:.0f} "
            f"µs/client recovered={r.recovered} lost={r.lost} dup={r.duplicated}",
            flush=True,
        )
        results.append(r)
    print(write_results("storm", "Reconnect storm", vars(args), results, summarize(results)))


if __name__ == "__main__":
    main()
