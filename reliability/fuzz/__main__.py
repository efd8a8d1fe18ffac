"""``python -m reliability.fuzz`` (``make fuzz``): every target under every
engine that applies, then a report (JSON and markdown) in
``reliability/results/``. Exit status 1 when a property failed."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from reliability.fuzz import engine
from reliability.fuzz.engine import ROOT, Run

TARGETS = ("frames", "squall", "centrifuge-json", "centrifuge-protobuf", "pusher", "http")
ENGINES = ("hypothesis", "atheris")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").replace(",", "").replace("_", "")
    return int(value) if value else default


def run_target(
    target: str,
    engine_name: str,
    *,
    examples: int,
    seconds: float,
    seed: int,
    coverage: bool = True,
    progress: Callable[[str], None] = engine._stderr,
) -> Run:
    """One target under one engine."""
    if engine_name == "atheris":
        return engine.run_atheris(
            target,
            examples=examples,
            seconds=seconds,
            base_seed=seed,
            coverage=coverage,
            progress=progress,
        )
    if target == "http":
        from reliability.fuzz import http

        return engine.run_hypothesis(
            target,
            http.cases,
            fixture=http.HttpTarget,
            examples=examples,
            seconds=seconds,
            base_seed=seed,
            coverage=coverage,
            progress=progress,
            chunk=500,
        )
    if target == "frames":
        from reliability.fuzz import frames

        return engine.run_hypothesis(
            target,
            frames.cases,
            frames.check,
            examples=examples,
            seconds=seconds,
            base_seed=seed,
            coverage=coverage,
            progress=progress,
        )
    from reliability.fuzz import decoders

    def check(frame: bytes) -> None:
        decoders.check(target, frame)

    return engine.run_hypothesis(
        target,
        decoders.STRATEGIES[target],
        check,
        examples=examples,
        seconds=seconds,
        base_seed=seed,
        coverage=coverage,
        progress=progress,
    )


def atheris_available() -> bool:
    try:
        import atheris  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return False
    return True


# ---- the report --------------------------------------------------------------


def coverage_by_engine(runs: list[Run]) -> dict[str, Any]:
    """Per target and module: lines each engine ran, and what each adds."""
    out: dict[str, Any] = {}
    for target in dict.fromkeys(r.target for r in runs):
        mine = [r for r in runs if r.target == target]
        modules: dict[str, Any] = {}
        for module in engine.MODULES[target]:
            by = {r.engine: set(r.lines.get(module, [])) for r in mine}
            total = max((r.statements.get(module, 0) for r in mine), default=0)
            union = set().union(*by.values()) if by else set()
            entry: dict[str, Any] = {"statements": total, "union": len(union)}
            for name, lines in by.items():
                others = set().union(*(v for k, v in by.items() if k != name))
                entry[name] = len(lines)
                entry[f"only_{name}"] = sorted(lines - others)
            modules[module] = entry
        out[target] = modules
    return out


def estimate(runs: list[Run], examples: int) -> dict[str, float]:
    """Seconds each (target, engine) would take for ``examples``, at the
    throughput measured."""
    return {
        f"{r.target}/{r.engine}": round(examples / r.rate, 0) if r.rate else float("inf")
        for r in runs
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Fuzzing report {report['name']}",
        "",
        f"Started {report['started']}, {report['seconds']:.0f} s in all; seed {report['seed']}; "
        f"asked for {report['examples']:,} examples per target and engine, at most "
        f"{report['seconds_per_run']:.0f} s per atheris run and "
        f"{report['seconds_per_hypothesis_run']:.0f} s per hypothesis run; "
        f"Python {report['python']}, {report['cpus']} CPUs; "
        f"hang bound {report['hang_seconds']} s per input; memory bound "
        f"{report['memory_bound_mb']:.0f} MB of RSS growth over the second half of a "
        f"hypothesis run, {report['atheris_rss_limit_mb']} MB of RSS for an atheris run "
        "(libFuzzer -rss_limit_mb).",
        "",
        "| target | engine | examples | stopped by | time (s) | examples/s | crashes "
        "| peak RSS (MB) | RSS growth (MB) | line coverage | ok |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in report["runs"]:
        cov = ", ".join(
            f"{Path(m).name} {c['lines']}/{c['statements']} ({c['percent']}%)"
            for m, c in r["coverage"].items()
        )
        growth = f"{r['rss_growth_mb']:.1f}" if r["engine"] == "hypothesis" else "–"
        lines.append(
            f"| {r['target']} | {r['engine']} | {r['examples']:,} | {r['stopped_by']} "
            f"| {r['seconds']:.0f} | {r['rate_per_s']:,.0f} | {len(r['crashes'])} "
            f"| {r['peak_rss_mb']:.0f} | {growth} | {cov} | {'yes' if r['ok'] else '**no**'} |"
        )
    lines += ["", "## What each engine adds (lines of the target's modules)", ""]
    lines += [
        "| target | module | statements | hypothesis | atheris | both engines "
        "| only hypothesis | only atheris |"
    ]
    lines += ["| --- | --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for target, modules in report["coverage_by_engine"].items():
        for module, c in modules.items():
            lines.append(
                f"| {target} | {module} | {c['statements']} | {c.get('hypothesis', '–')} "
                f"| {c.get('atheris', '–')} | {c['union']} "
                f"| {_spans(c.get('only_hypothesis', []))} | {_spans(c.get('only_atheris', []))} |"
            )
    lines += ["", "## Time for the full size", ""]
    lines += [
        f"At the throughput measured, {report['estimate_examples']:,} examples would take:",
        "",
    ]
    for key, secs in report["estimate_seconds"].items():
        lines.append(f"- {key}: {_duration(secs)}")
    lines += ["", "## Crashes", ""]
    crashes = [c for r in report["runs"] for c in r["crashes"]]
    if not crashes:
        lines.append("None.")
    for c in crashes:
        lines += [
            f"### {c['target']} / {c['engine']}: {c['kind']} at {c['where']}",
            "",
            "```",
            c["message"][:1500],
            "",
            c["example"][:3000],
            "```",
            "",
        ]
    return "\n".join(lines) + "\n"


def _spans(lines: list[int]) -> str:
    if not lines:
        return "–"
    spans: list[str] = []
    start = prev = lines[0]
    for n in [*lines[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        spans.append(f"{start}" if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(spans)


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "unknown (no throughput)"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reliability.fuzz", description=__doc__)
    parser.add_argument("--targets", default=os.environ.get("FUZZ_TARGETS", ",".join(TARGETS)))
    parser.add_argument("--engines", default=os.environ.get("FUZZ_ENGINES", ",".join(ENGINES)))
    parser.add_argument(
        "--examples", type=int, default=_env_int("FUZZ_EXAMPLES", 1_000_000),
        help="examples per target and engine (FUZZ_EXAMPLES; default 1,000,000)",
    )  # fmt: skip
    parser.add_argument(
        "--seconds", type=float, default=float(_env_int("FUZZ_SECONDS", 600)),
        help="time bound per target and engine (FUZZ_SECONDS; default 600)",
    )  # fmt: skip
    parser.add_argument(
        "--hypothesis-seconds", type=float, default=None,
        help="time bound per hypothesis run (FUZZ_HYPOTHESIS_SECONDS; default --seconds)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=_env_int("FUZZ_SEED", 0))
    parser.add_argument("--no-coverage", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "reliability" / "results")
    parser.add_argument("--name", default="")
    args = parser.parse_args(argv)

    hyp_seconds = args.hypothesis_seconds
    if hyp_seconds is None:
        hyp_seconds = float(_env_int("FUZZ_HYPOTHESIS_SECONDS", int(args.seconds)))
    targets = [t for t in args.targets.split(",") if t]
    engines = [e for e in args.engines.split(",") if e]
    for t in targets:
        if t not in TARGETS:
            parser.error(f"unknown target {t!r}; one of {', '.join(TARGETS)}")
    notes: list[str] = []
    if "atheris" in engines and not atheris_available():
        notes.append("atheris is not installed (pip install -e '.[fuzz]'): hypothesis only")
        engines = [e for e in engines if e != "atheris"]
    started = datetime.now(UTC)
    name = args.name or "fuzz-" + started.strftime("%Y%m%d-%H%M%S")
    t0 = time.monotonic()
    runs: list[Run] = []
    for target in targets:
        for engine_name in engines:
            engine._stderr(f"== {target} / {engine_name}")
            runs.append(
                run_target(
                    target,
                    engine_name,
                    examples=args.examples,
                    seconds=hyp_seconds if engine_name == "hypothesis" else args.seconds,
                    seed=args.seed,
                    coverage=not args.no_coverage,
                )
            )
    report = {
        "name": name,
        "started": started.isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - t0, 1),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "seed": args.seed,
        "examples": args.examples,
        "seconds_per_run": args.seconds,
        "seconds_per_hypothesis_run": hyp_seconds,
        "hang_seconds": engine.HANG_SECONDS,
        "memory_bound_mb": engine.MEMORY_BOUND_MB,
        "atheris_rss_limit_mb": engine.ATHERIS_RSS_LIMIT_MB,
        "notes": notes,
        "runs": [r.to_json() for r in runs],
        "coverage_by_engine": coverage_by_engine(runs),
        "estimate_examples": 1_000_000,
        "estimate_seconds": estimate(runs, 1_000_000),
        "ok": all(r.ok for r in runs),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    import orjson

    (args.out / f"{name}.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    (args.out / f"{name}.md").write_text(markdown(report))
    engine._stderr(f"report: {args.out / name}.json, .md; ok: {report['ok']}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
