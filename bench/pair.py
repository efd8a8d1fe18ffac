"""Two peers of the same server, compared in one run (``bench.sse``:
WebSocket and SSE; ``bench.pusher``: Squall's codec and Pusher's): the
arguments they share, the runs in turns, and the ratio table against a
target."""

from __future__ import annotations

import argparse
import statistics

import uvloop

from bench.run import Result, one_run

MODES = {"max": "as fast as accepted", "rate": "fixed rate"}


def publications(subscribers: int, mode: str, args: argparse.Namespace) -> int:
    """As fast as accepted: about ``--deliveries`` deliveries (30 to 1,000
    publications); at a rate: ``--seconds`` of it."""
    if mode == "max":
        return min(1000, max(30, args.deliveries // subscribers))
    return max(5, round(args.delivery_rate / subscribers * args.seconds))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subscribers", default="1000,10000")
    parser.add_argument(
        "--modes", default="rate,max", help="rate (fixed), max (as fast as accepted)"
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--delivery-rate",
        type=float,
        default=10000,
        help="deliveries/s of the fixed-rate mode (publications/s = this ÷ subscribers)",
    )
    parser.add_argument("--seconds", type=float, default=8, help="length of a fixed-rate run")
    parser.add_argument(
        "--deliveries",
        type=int,
        default=300000,
        help="as fast as accepted: publications enough for this many deliveries (30 to 1,000)",
    )
    parser.add_argument("--size", type=int, default=100, help="padding bytes per publication")


def run_in_turns(
    peers: tuple[str, str], args: argparse.Namespace, publish: str = "ws"
) -> tuple[list[Result], list[str]]:
    """Every size and mode, ``args.reps`` times, the two peers taking turns
    within each repetition so the machine's moods fall on both alike."""
    results: list[Result] = []
    failures: list[str] = []
    for n in [int(x) for x in args.subscribers.split(",")]:
        for mode in args.modes.split(","):
            rate = args.delivery_rate / n if mode == "rate" else 0.0
            count = publications(n, mode, args)
            for rep in range(args.reps):
                for peer in peers:
                    try:
                        r = uvloop.run(
                            one_run(peer, n, count, rate, args.size, scenario=mode, publish=publish)
                        )
                    except (RuntimeError, TimeoutError, OSError) as exc:
                        print(f"{peer:14} subs={n:6} {mode} rep={rep} FAILED: {exc!r}", flush=True)
                        failures.append(f"{peer}, {n:,} subscribers, {mode}: {exc!r}")
                        continue
                    print(
                        f"{peer:14} subs={n:6} {mode:4} rep={rep} {r.deliveries_per_s:10,.0f}/s "
                        f"{r.cpu_us_per_delivery:7.2f} µs/delivery p99={r.p99_ms:.1f}ms "
                        f"frames/delivery={r.frames_per_delivery:.3f} lost={r.lost} "
                        f"dup={r.duplicated}{' CLIENT-BOUND' if r.client_bound else ''}",
                        flush=True,
                    )
                    results.append(r)
    return results, failures


def ratio_table(
    results: list[Result],
    peers: tuple[str, str],
    labels: tuple[str, str],
    target: float,
    delivery_rate: float,
    *,
    judge_max: bool = True,
) -> str:
    """Median CPU per delivery of each peer and the second's ratio to the
    first, against ``target`` (as fast as accepted too, unless not
    ``judge_max``)."""
    base, other = peers
    groups: dict[tuple[int, str, str], list[float]] = {}
    for r in results:
        mode = "rate" if r.rate else "max"
        groups.setdefault((r.subscribers, mode, r.peer), []).append(r.cpu_us_per_delivery)
    a_label, b_label = labels
    lines = [
        f"| subscribers | publishing | runs | {a_label} µs/delivery | {b_label} µs/delivery "
        f"| {b_label} ÷ {a_label} | target ≤ {target}× |",
        "| ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for n in sorted({r.subscribers for r in results}):
        for mode, label in MODES.items():
            first = groups.get((n, mode, base))
            second = groups.get((n, mode, other))
            if not first or not second:
                continue
            a, b = statistics.median(first), statistics.median(second)
            if mode == "rate":
                label = f"{delivery_rate:,.0f} deliveries/s"
            verdict = "met" if b <= target * a else "MISSED"
            if mode == "max" and not judge_max:
                verdict = "–"
            runs = f"{len(first)}/{len(second)}"
            lines.append(
                f"| {n:,} | {label} | {runs} | {a:.2f} | {b:.2f} | {b / a:.2f} | {verdict} |"
            )
    return "\n".join(lines)
