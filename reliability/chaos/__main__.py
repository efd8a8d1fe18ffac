"""python -m reliability.chaos [--seconds S] [--seed N] [--subscribers N] ...

Runs a campaign (or, with --check HISTORY.jsonl, only checks a recorded
history), writes reliability/results/chaos-<timestamp>.{json,md} and exits
1 on any violation (2 when the campaign could not run)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from .campaign import RESULTS, Params, run_campaign
from .checker import check
from .faults import ALL_KINDS
from .history import read_history
from .report import write_report
from .topology import DURABLE_NS, REDIS_BACKENDS, missing_services


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reliability.chaos", description=__doc__)
    parser.add_argument("--seconds", type=float, help="campaign length (CHAOS_SECONDS, 300)")
    parser.add_argument("--seed", type=int, help="fault schedule seed (CHAOS_SEED, random)")
    parser.add_argument("--subscribers", type=int, help="CHAOS_SUBSCRIBERS, 1000")
    parser.add_argument("--rate", type=float, dest="publish_rate",
                        help="publications per second (CHAOS_PUBLISH_RATE, 10)")  # fmt: skip
    parser.add_argument("--max-concurrent", type=int, choices=(1, 2))
    parser.add_argument("--kinds", help=f"comma-separated fault kinds (of {','.join(ALL_KINDS)})")
    parser.add_argument("--redis-persistence", choices=("aof-always", "aof-everysec", "none"))
    parser.add_argument("--redis", dest="redis_kind", choices=REDIS_BACKENDS,
                        help="sentinel (default) or single (CHAOS_REDIS)")  # fmt: skip
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--check", type=Path, metavar="HISTORY", help="only check this history")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)

    if args.check is not None:
        meta = next(iter(read_history(args.check)), {})
        result = check(read_history(args.check), durable_namespaces=[DURABLE_NS])
        stamp = str(meta.get("stamp", "recheck")) + "-recheck"
        _json, md_path = write_report(args.out_dir, stamp, meta, result,
                                          {"history": str(args.check)})  # fmt: skip
        print(f"{'OK' if result.ok else 'VIOLATIONS'}: {md_path}")
        return 0 if result.ok else 1

    kinds = tuple(k.strip() for k in args.kinds.split(",")) if args.kinds else None
    if kinds and not set(kinds) <= set(ALL_KINDS):
        parser.error(f"unknown fault kind in {args.kinds}")
    params = Params.from_env(
        seconds=args.seconds,
        seed=args.seed,
        subscribers=args.subscribers,
        publish_rate=args.publish_rate,
        max_concurrent=args.max_concurrent,
        kinds=kinds,
        redis_persistence=args.redis_persistence,
        redis_kind=args.redis_kind,
        out_dir=args.out_dir,
    )
    missing = missing_services()
    if missing:
        for what, how in missing:
            print(f"chaos: SERVICE MISSING: {what} ({how})", file=sys.stderr)
        return 2
    print(f"chaos: seed {params.seed}, {params.seconds:.0f} s, {params.subscribers} subscribers",
          flush=True)  # fmt: skip
    outcome = asyncio.run(run_campaign(params))
    stats = outcome.result.stats
    print(
        f"chaos: seed {params.seed}: {len(outcome.result.violations)} violation(s); "
        f"{stats.get('faults_injected', 0)} faults, {stats.get('publish_acked', 0)} acked, "
        f"{stats.get('deliveries', 0)} deliveries, {stats.get('disconnects', 0)} disconnects"
    )
    print(f"chaos: report {outcome.md_path}")
    if outcome.extra.get("campaign_errors"):
        print(f"chaos: the campaign itself failed: {outcome.extra['campaign_errors']}")
        return 2 if outcome.result.ok else 1
    return 0 if outcome.result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
