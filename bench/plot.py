"""Plots (PNG, matplotlib) of a benchmark's results, next to its table in
bench/results/: one bar group per setting, one bar per peer, medians with
the range as an error bar."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).resolve().parent / "results"

# (field, axis label, log scale) per kind of result.
METRICS: dict[str, list[tuple[str, str, bool]]] = {
    "cpu_us_per_delivery": [("cpu_us_per_delivery", "server CPU µs per delivery", True)],
    "p99_ms": [("p99_ms", "publish-to-deliver p99, ms", True)],
    "kb_per_connection": [("kb_per_connection", "KB RSS per idle subscribed connection", False)],
    "requests_per_s": [("requests_per_s", "requests per second", False)],
}


def _setting(row: dict[str, Any]) -> str:
    if "connections" in row:
        return f"{row['connections']:,} conns"
    if "endpoint" in row:
        return str(row["endpoint"])
    rate = f"{row['rate']:g}/s" if row.get("rate") else "max"
    return f"{row['subscribers']:,} subs, {rate}"


def plot(kind: str, title: str, rows: list[dict[str, Any]]) -> list[Path]:
    """Write <kind>-<metric>.png for every metric the rows carry."""
    written: list[Path] = []
    if not rows or "peer" not in rows[0]:
        return written
    all_rows = rows
    for key, specs in METRICS.items():
        # A run may mix kinds of result (fan-out and idle memory): each
        # metric is plotted from the rows that carry it.
        rows = [r for r in all_rows if key in r]
        if not rows:
            continue
        peers = list(dict.fromkeys(r["peer"] for r in rows))
        settings = list(dict.fromkeys(_setting(r) for r in rows))
        for field, label, log in specs:
            fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(settings) * len(peers) / 3), 4))
            width = 0.8 / len(peers)
            for i, peer in enumerate(peers):
                xs, meds, lo, hi = [], [], [], []
                for j, setting in enumerate(settings):
                    vals = [r[field] for r in rows if r["peer"] == peer and _setting(r) == setting]
                    if not vals:
                        continue
                    m = statistics.median(vals)
                    xs.append(j + i * width - 0.4 + width / 2)
                    meds.append(m)
                    lo.append(m - min(vals))
                    hi.append(max(vals) - m)
                ax.bar(xs, meds, width, yerr=[lo, hi], label=peer, capsize=2)
            ax.set_xticks(range(len(settings)), settings)
            ax.set_ylabel(label)
            if log:
                ax.set_yscale("log")
            ax.set_title(title)
            ax.legend(fontsize="small")
            fig.tight_layout()
            path = RESULTS / f"{kind}-{field.replace('_', '-')}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            written.append(path)
    return written
