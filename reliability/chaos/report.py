"""The campaign's report: JSON (everything) and markdown (for people), in
reliability/results/chaos-<timestamp>.{json,md}."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from .checker import CheckResult

MAX_MD_VIOLATIONS = 50
MAX_JSON_VIOLATIONS = 200


def write_report(
    out_dir: Path, stamp: str, meta: dict[str, Any], result: CheckResult, extra: dict[str, Any]
) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / f"chaos-{stamp}"
    data = {
        "ok": result.ok,
        "seed": meta.get("seed"),
        "meta": meta,
        "stats": result.stats,
        "violations": [v.as_dict() for v in result.violations],
        "warnings": [v.as_dict() for v in result.warnings],
        **extra,
    }
    md_path = base.with_suffix(".md")
    md_path.write_text(markdown(data))
    # Thousands of violations (a whole cluster gone deaf) would make a
    # report of many megabytes: the JSON keeps the first ones, the history
    # has every record (``--check`` finds them all again).
    if len(data["violations"]) > MAX_JSON_VIOLATIONS:
        data["violations_total"] = len(data["violations"])
        data["violations"] = data["violations"][:MAX_JSON_VIOLATIONS]
    json_path = base.with_suffix(".json")
    json_path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    return json_path, md_path


def markdown(data: dict[str, Any]) -> str:
    meta = data["meta"]
    lines = [
        f"# Chaos campaign {data.get('stamp', '')}: "
        + ("no violation" if data["ok"] else f"{len(data['violations'])} violation(s)"),
        "",
        f"Replay: `CHAOS_SEED={meta.get('seed')} CHAOS_SECONDS={meta.get('seconds')} "
        f"CHAOS_SUBSCRIBERS={meta.get('subscribers')} python -m reliability.chaos`",
        "",
        "| parameter | value |",
        "| --- | --- |",
    ]
    keys = (
        "seed",
        "seconds",
        "quiet",
        "subscribers",
        "publish_rate",
        "channels_per_namespace",
        "redis_persistence",
        "volatile_history",
        "max_concurrent",
        "durable_namespaces",
    )
    for key in keys:
        lines.append(f"| {key} | {meta.get(key)} |")
    lines += ["", "## Counts", "", "| count | value |", "| --- | --- |"]
    for key, value in sorted(data["stats"].items()):
        lines.append(f"| {key} | {value} |")
    if data.get("timings"):
        lines += ["", "## Timings (s)", ""]
        for key, value in data["timings"].items():
            lines.append(f"- {key}: {value}")
    lines += ["", "## Schedule", "", "| id | start (s) | lasts (s) | kind | target | params | ok |",
              "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    applied = data.get("fault_outcomes", {})
    for f in meta.get("schedule", []):
        lines.append(
            f"| {f['id']} | {f['start']} | {f['duration']} | {f['kind']} | {f['target']} "
            f"| {f.get('params') or ''} | {applied.get(str(f['id']), '')} |"
        )
    if data.get("campaign_errors"):
        lines += ["", "## The campaign itself failed", ""]
        lines += [f"- `{e}`" for e in data["campaign_errors"]]
    if data.get("fault_errors"):
        lines += ["", "## Faults that could not be applied or healed", ""]
        lines += [f"- {e}" for e in data["fault_errors"]]
    if data.get("faults_skipped"):
        lines += ["", f"Faults skipped (their component was still healing): "
                  f"{', '.join(str(f) for f in data['faults_skipped'])}."]  # fmt: skip
    if data.get("redis_restarted_in_place"):
        lines += ["", f"Redis kills no failover followed (the killed master was started "
                  f"again): {data['redis_restarted_in_place']}."]  # fmt: skip
    lines += ["", "## Violations", ""]
    if not data["violations"]:
        lines.append("None.")
    for v in data["violations"][:MAX_MD_VIOLATIONS]:
        who = ", ".join(x for x in (v.get("subscriber"), v.get("channel")) if x)
        hint = [f"Hint: {v['hint']}", ""] if v.get("hint") else []
        lines += [f"### {v['kind']} ({who})", "", v["detail"], "", *hint, "```json"]
        lines += [orjson.dumps(e).decode()[:1500] for e in v["evidence"]]
        lines += ["```", ""]
    if len(data["violations"]) > MAX_MD_VIOLATIONS:
        more = len(data["violations"]) - MAX_MD_VIOLATIONS
        lines.append(
            f"... and {more} more in the JSON (its first {MAX_JSON_VIOLATIONS}) and the history."
        )
    if data["warnings"]:
        lines += ["", "## Warnings", ""]
        for w in data["warnings"][:MAX_MD_VIOLATIONS]:
            lines.append(f"- {w['kind']}: {w['detail']}")
    if data.get("history"):
        lines += ["", f"History: `{data['history']}`"]
    return "\n".join(lines) + "\n"
