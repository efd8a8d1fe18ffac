"""Squall's codecs side by side, with Centrifugo as a peer: one channel,
100 / 1,000 / 10,000 subscribers speaking Squall's own protocol, the
Centrifugo JSON protocol and the Centrifugo Protobuf protocol on Squall's
Centrifugo endpoint, and the Centrifugo JSON protocol on Centrifugo itself.

    python -m bench.codecs                     # what make bench-codecs runs
    python -m bench.codecs --subscribers 1000 --reps 1 --modes rate

Every peer runs on one core, pinned to CPU 0 (Centrifugo with
GOMAXPROCS=1), with history (100 publications, 600 s) and recovery on in
the channel's namespace, as in Squall's default namespace. Publications go
in through each server's HTTP API by default (``--publish ws``: over
WebSocket, Squall's own protocol for the Squall peers and Centrifugo's
client publish for Centrifugo), as fast as accepted and at a fixed 10,000
deliveries a second. Every subscriber checks its publications' offsets for
losses and duplicates. Results: bench/results/codecs-<time>.json and
codecs.md, with the comparison against the targets: each Centrifugo codec
within 1.15x of Squall's own CPU per delivery, and Squall at or below
Centrifugo's.
"""

from __future__ import annotations

import argparse
import os
import statistics

import uvloop

from bench.pair import MODES, add_arguments, publications
from bench.run import (
    CODEC_PEERS,
    PEERS,
    Result,
    one_run,
    raise_fd_limit,
    summarize,
    write_results,
)

CODEC_TARGET = 1.15  # each Centrifugo codec's CPU per delivery ÷ Squall's own


def comparison(results: list[Result], peers: list[str], delivery_rate: float) -> str:
    """The median CPU per delivery of every peer, each codec against Squall's
    own and Squall against Centrifugo, with the targets."""
    cpu: dict[tuple[int, str, str], float] = {}
    groups: dict[tuple[int, str, str], list[float]] = {}
    for r in results:
        mode = "rate" if r.rate else "max"
        groups.setdefault((r.subscribers, mode, r.peer), []).append(r.cpu_us_per_delivery)
    for key, values in groups.items():
        cpu[key] = statistics.median(values)
    codecs = [p for p in peers if p.startswith("squall_cf")]
    head = ["subscribers", "publishing", "squall"]
    for p in codecs:
        head += [p, f"{p} ÷ squall"]
    head += [
        "centrifugo",
        "squall ÷ centrifugo",
        f"codecs ≤ {CODEC_TARGET}×",
        "squall ≤ centrifugo",
    ]
    lines = ["| " + " | ".join(head) + " |", "| ---: | --- |" + " ---: |" * (len(head) - 2)]
    sizes = sorted({r.subscribers for r in results})
    for n in sizes:
        for mode in MODES:
            base = cpu.get((n, mode, "squall"))
            if base is None:
                continue
            label = MODES[mode]
            if mode == "rate":
                label = f"{delivery_rate:,.0f} deliveries/s"
            row = [f"{n:,}", label, f"{base:.2f}"]
            met = []
            for p in codecs:
                value = cpu.get((n, mode, p))
                if value is None:
                    row += ["–", "–"]
                    continue
                row += [f"{value:.2f}", f"{value / base:.2f}"]
                met.append(value / base <= CODEC_TARGET)
            peer = cpu.get((n, mode, "centrifugo"))
            if peer is None:
                row += ["–", "–"]
            else:
                row += [f"{peer:.2f}", f"{base / peer:.2f}"]
            row.append(("met" if all(met) else "not met") if met else "–")
            row.append(("met" if base <= peer else "not met") if peer is not None else "–")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", default=CODEC_PEERS, help=f"of: {', '.join(PEERS)}")
    add_arguments(parser)
    parser.set_defaults(subscribers="100,1000,10000", modes="max,rate", seconds=6)
    parser.add_argument(
        "--reps-large", type=int, default=3, help="repetitions at 10,000 subscribers and more"
    )
    parser.add_argument(
        "--publish",
        choices=("http", "ws"),
        default="http",
        help="the servers' HTTP API, or WebSocket (Squall's protocol / Centrifugo's client "
        "publish)",
    )
    parser.add_argument("--name", default="codecs", help="results: bench/results/<name>.md")
    args = parser.parse_args()
    peers = args.peers.split(",")
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        parser.error(f"unknown peers {unknown}; known: {', '.join(PEERS)}")
    sizes = [int(x) for x in args.subscribers.split(",")]
    raise_fd_limit(max(sizes) + 1000)
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})
    results: list[Result] = []
    failures: list[str] = []
    for n in sizes:
        for mode in args.modes.split(","):
            rate = args.delivery_rate / n if mode == "rate" else 0.0
            count = publications(n, mode, args)
            reps = args.reps if n < 10000 else args.reps_large
            for rep in range(reps):
                # Peers take turns within a repetition, so the machine's
                # moods fall on all of them alike.
                for peer in peers:
                    try:
                        r = uvloop.run(
                            one_run(
                                peer, n, count, rate, args.size, scenario=mode, publish=args.publish
                            )
                        )
                    except (RuntimeError, TimeoutError, OSError) as exc:
                        print(f"{peer:18} subs={n:6} {mode} rep={rep} FAILED: {exc!r}", flush=True)
                        failures.append(f"{peer}, {n:,} subscribers, {mode}: {exc!r}")
                        continue
                    print(
                        f"{peer:18} subs={n:6} {mode:4} rep={rep} {r.deliveries_per_s:10,.0f}/s "
                        f"{r.cpu_us_per_delivery:7.2f} µs/delivery p99={r.p99_ms:.1f}ms "
                        f"frames/delivery={r.frames_per_delivery:.3f} lost={r.lost} "
                        f"dup={r.duplicated}{' CLIENT-BOUND' if r.client_bound else ''}",
                        flush=True,
                    )
                    results.append(r)
    table = (
        "Server CPU µs per delivery (median of the repetitions), each codec against "
        "Squall's own and Squall against Centrifugo:\n\n"
        + comparison(results, peers, args.delivery_rate)
        + "\n\nEvery run:\n\n"
        + summarize(results)
    )
    if failures:
        table += "\n\nFailed runs:\n" + "\n".join(f"- {f}" for f in failures)
    title = "Codecs: Squall's own, Centrifugo JSON and Protobuf on Squall, and Centrifugo"
    print(write_results(args.name, title, vars(args), results, table))


if __name__ == "__main__":
    main()
