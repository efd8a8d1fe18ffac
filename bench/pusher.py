"""The Pusher codec against Squall's own on the same Squall, in one run: one
channel, 1,000 and 10,000 subscribers speaking the Pusher protocol on
``/app/<key>`` (peer ``squall_pusher``: a public channel of the bench's
app, the Squall channel ``pusher-1234:fanout``) or Squall's own protocol on
``/connection/websocket`` (peer ``squall``: ``bench:fanout``), the same
publisher speaking Squall's protocol, at a fixed 10,000 deliveries a second
and as fast as accepted.

    python -m bench.pusher                       # what make bench-pusher runs
    python -m bench.pusher --subscribers 1000 --reps 1 --modes rate

The server runs pinned to CPU 0, the load generator on CPU 1; the two
peers take turns within every repetition. Both channels' namespaces keep
history (100 publications, 600 s) with recovery on; the app's namespace
also has presence and join/leave, as an app's default namespace does.
Squall subscribers check their publications' offsets, Pusher subscribers
(whose events carry none) the numbers in the data, for losses and
duplicates. Results: bench/results/pusher-<time>.json and pusher.md, with
the Pusher codec's CPU per delivery against Squall's own and the target
(at most 1.15x).
"""

from __future__ import annotations

import argparse
import os

from bench import run as fanout
from bench.pair import add_arguments, ratio_table, run_in_turns
from bench.run import raise_fd_limit, summarize, write_results

TARGET = 1.15  # the Pusher codec's CPU per delivery ÷ Squall's own
PEERS = ("squall", "squall_pusher")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument(
        "--publish",
        choices=("ws", "http"),
        default="ws",
        help="Squall's own protocol over WebSocket, or Squall's HTTP API (POST /api/publish)",
    )
    parser.add_argument("--name", default="pusher", help="results: bench/results/<name>.md")
    parser.add_argument("--profile", default="", help="run Squall under py-spy: flame-NAME.svg")
    args = parser.parse_args()
    # Each run writes the flame graph again: profile one size, mode and
    # repetition (the last run's stays).
    fanout.PROFILE = args.profile
    raise_fd_limit(max(int(x) for x in args.subscribers.split(",")) + 1000)
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})
    results, failures = run_in_turns(PEERS, args, args.publish)
    table = (
        "Server CPU µs per delivery (median of the repetitions), the Pusher codec against "
        "Squall's own:\n\n"
        + ratio_table(results, PEERS, ("Squall", "Pusher"), TARGET, args.delivery_rate)
    )
    table += "\n\nEvery run:\n\n" + summarize(results)
    if failures:
        table += "\n\nFailed runs:\n" + "\n".join(f"- {f}" for f in failures)
    title = "The Pusher codec against Squall's own on one Squall process"
    print(write_results(args.name, title, vars(args), results, table))
    if failures or any(r.lost or r.duplicated for r in results):
        raise SystemExit("failed runs, or lost or duplicated publications: see the table")


if __name__ == "__main__":
    main()
