"""Server-Sent Events against WebSocket on the same Squall, in one run: one
channel, 1,000 and 10,000 subscribers on ``/connection/sse`` (peer
``squall_sse``) and on ``/connection/websocket`` (peer ``squall``), the same
WebSocket publisher, at a fixed 10,000 deliveries a second and as fast as
accepted; then memory per idle subscribed connection of each.

    python -m bench.sse                          # what make bench-sse runs
    python -m bench.sse --subscribers 1000 --reps 1 --modes rate --idle 0

The server runs pinned to CPU 0, the load generator on CPU 1. Each
subscriber checks its publications' offsets (losses, duplicates); SSE
subscribers parse the chunked event stream as a browser does. Results:
bench/results/sse-<time>.json and sse.md, with SSE's CPU per delivery and
idle memory against WebSocket's and the targets (at most 1.3x per delivery
at 10,000 deliveries/s, at most 1.5x idle).
"""

from __future__ import annotations

import argparse
import os
import statistics

import uvloop

from bench import idle
from bench.pair import add_arguments, ratio_table, run_in_turns
from bench.run import raise_fd_limit, summarize, write_results

DELIVERY_TARGET = 1.3  # SSE CPU per delivery ÷ WebSocket's, at 10,000 deliveries/s
IDLE_TARGET = 1.5  # SSE memory per idle connection ÷ WebSocket's
PEERS = ("squall", "squall_sse")


def idle_comparison(results: list[idle.IdleResult]) -> str:
    groups: dict[tuple[int, str], list[float]] = {}
    for r in results:
        groups.setdefault((r.connections, r.peer), []).append(r.kb_per_connection)
    lines = [
        f"| connections | WebSocket KB | SSE KB | SSE ÷ WebSocket | target ≤ {IDLE_TARGET}× |",
        "| ---: | ---: | ---: | ---: | --- |",
    ]
    for n in sorted({r.connections for r in results}):
        ws, sse = groups.get((n, "squall")), groups.get((n, "squall_sse"))
        if not ws or not sse:
            continue
        a, b = statistics.median(ws), statistics.median(sse)
        verdict = "met" if b / a <= IDLE_TARGET else "MISSED"
        lines.append(f"| {n:,} | {a:.2f} | {b:.2f} | {b / a:.2f} | {verdict} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument(
        "--idle", type=int, default=5000, help="idle connections per memory run (0: none)"
    )
    parser.add_argument("--name", default="sse", help="results: bench/results/<name>.md")
    args = parser.parse_args()
    sizes = [int(x) for x in args.subscribers.split(",")]
    raise_fd_limit(max([*sizes, args.idle]) + 1000)
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})
    results, failures = run_in_turns(PEERS, args)
    idle_results: list[idle.IdleResult] = []
    if args.idle:
        for rep in range(args.reps):
            for peer in PEERS:
                m = uvloop.run(idle.one_run(peer, args.idle))
                print(
                    f"{peer:12} idle conns={args.idle} rep={rep} "
                    f"{m.kb_per_connection:8.2f} KB/conn",
                    flush=True,
                )
                idle_results.append(m)
    table = (
        "Server CPU µs per delivery (median of the repetitions), SSE against WebSocket:\n\n"
        + ratio_table(
            results,
            PEERS,
            ("WebSocket", "SSE"),
            DELIVERY_TARGET,
            args.delivery_rate,
            judge_max=False,
        )
    )
    if idle_results:
        table += (
            "\n\nMemory per idle subscribed connection (RSS growth ÷ connections, median):\n\n"
            + idle_comparison(idle_results)
        )
    table += "\n\nEvery run:\n\n" + summarize(results)
    if failures:
        table += "\n\nFailed runs:\n" + "\n".join(f"- {f}" for f in failures)
    rows: list[object] = [*results, *idle_results]
    title = "SSE against WebSocket on one Squall process"
    print(write_results(args.name, title, vars(args), rows, table))
    if any(r.lost or r.duplicated for r in results):
        raise SystemExit("lost or duplicated publications: see the table")


if __name__ == "__main__":
    main()
