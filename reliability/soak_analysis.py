"""The soak test's verdicts, as pure functions of what was sampled (no I/O):
a trend detector for each sampled series, the event-loop lag rule, and the
delivery rule (nothing lost, duplicated or out of order).

The trend detector (``trend``) answers one question per series: *does it
still grow once the run has settled?* It looks only at the second half of
the run (the first half is warm-up: allocator arenas, caches, connection
tables, Redis structures all fill up to their working size), fits a
least-squares line through it, and fails the series when **all** of these
hold:

1. **The growth is large relative to the series' level**: the slope exceeds
   ``max_rel_per_hour`` (default 5 %) of the second half's mean level per
   hour. Squall must run for weeks, so any sustained growth is a leak in
   the end, but a 30-minute run can only resolve growth that stands out of
   the sampling noise and the allocator's and GC's churn: 5 %/h is a rise
   of 1.25 % over the 15-minute half, several times the jitter of a steady
   CPython process's RSS (a few tenths of a percent once warm) and of a
   connection or fd count under 1 %/s churn. A leak that doubles memory in a
   day (about 3 %/h) needs a longer run (``SOAK_MINUTES``) to show: the
   detectable rate falls roughly as 1/duration, and the threshold is a
   parameter for that.
2. **The growth is more than quantisation**: the fitted rise over the
   window exceeds ``min_rise`` units (a file descriptor or a thread that
   appears once, 1 MB of RSS): integer series step, and one step is not a
   trend.
3. **The slope is statistically significant**: its t statistic exceeds
   ``t_crit`` (3), with the standard error corrected for autocorrelated
   residuals. Sampled series are not independent draws: a GC or allocator
   sawtooth, or plateaus between steps, leave long runs of residuals of one
   sign, and an ordinary t test then finds "significant" slopes in a series
   that only oscillates. The correction (the effective sample size
   ``n_eff = n (1 - r1) / (1 + r1)`` from the lag-1 autocorrelation ``r1``
   of the residuals, as used for trends in climate series) shrinks the
   evidence of such a series to what its few independent swings carry. A
   true leak keeps rising across the swings and stays significant; a flat
   series, however noisy, and a sawtooth whose teeth repeat do not. A
   one-sided t > 3 is a false alarm about once in 200 series (fewer
   effective samples make it rarer); with about twenty judged series a run,
   and a healthy series also having to pass conditions 1 and 2 by chance,
   a healthy run fails well under once in ten.

The event-loop lag rule fails when the 99th percentile of the lag samples
passes ``max_lag_p99_ms`` (50 ms). The delivery rule fails on any lost,
duplicated or out-of-order publication (outside gaps the server announced
with ``recovered: false``), on a subscriber that never caught up with its
channel, and on failed publishes or worker restarts.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

MAX_REL_PER_HOUR = 0.05
T_CRIT = 3.0
MAX_LAG_P99_MS = 50.0
MIN_SAMPLES = 6  # in the second half; fewer: no verdict ("short")


@dataclass(frozen=True)
class Rule:
    """How one kind of series is judged (see the module docstring)."""

    max_rel_per_hour: float = MAX_REL_PER_HOUR
    min_rise: float = 0.0  # in the series' unit
    judged: bool = True  # False: plotted and reported, never failed


@dataclass
class Trend:
    name: str
    unit: str
    verdict: str  # "pass", "fail", "short" (too few samples), "info" (not judged)
    n: int = 0  # samples in the second half
    level: float = 0.0  # their mean
    slope_per_hour: float = 0.0
    rel_per_hour_pct: float = 0.0  # slope as a percentage of the level, per hour
    rise: float = 0.0  # the fitted rise over the second half
    t_stat: float = 0.0  # autocorrelation-corrected
    r1: float = 0.0  # lag-1 autocorrelation of the residuals
    n_eff: float = 0.0
    threshold_per_hour: float = 0.0
    reason: str = ""


def second_half(times: Sequence[float], values: Sequence[float]) -> tuple[list[float], list[float]]:
    """The samples taken in the second half of the run's time span."""
    if not times:
        return [], []
    middle = times[0] + (times[-1] - times[0]) / 2
    pairs = [(t, v) for t, v in zip(times, values, strict=True) if t >= middle]
    return [t for t, _ in pairs], [v for _, v in pairs]


def trend(
    name: str,
    times: Sequence[float],
    values: Sequence[float],
    *,
    unit: str = "",
    rule: Rule | None = None,
    t_crit: float = T_CRIT,
) -> Trend:
    """Least-squares slope over the second half of one series (``times`` in
    seconds) and its verdict; see the module docstring for the rule."""
    rule = rule or Rule()
    ts, vs = second_half(times, values)
    n = len(ts)
    if n < MIN_SAMPLES:
        return Trend(name, unit, "short", n=n, reason=f"{n} samples in the second half")
    t_mean = sum(ts) / n
    v_mean = sum(vs) / n
    sxx = sum((t - t_mean) ** 2 for t in ts)
    if sxx == 0:
        return Trend(name, unit, "short", n=n, reason="no time span")
    slope = sum((t - t_mean) * (v - v_mean) for t, v in zip(ts, vs, strict=True)) / sxx
    residuals = [v - (v_mean + slope * (t - t_mean)) for t, v in zip(ts, vs, strict=True)]
    sse = sum(e * e for e in residuals)
    r1 = 0.0
    if sse > 0:
        r1 = sum(a * b for a, b in itertools.pairwise(residuals)) / sse
    r1 = min(max(r1, 0.0), 0.99)
    n_eff = n * (1 - r1) / (1 + r1)
    if sse == 0:
        t_stat = math.inf if slope > 0 else (-math.inf if slope < 0 else 0.0)
    elif n_eff <= 2.0:
        t_stat = 0.0  # one or two independent swings: no evidence either way
    else:
        se = math.sqrt(sse / (n_eff - 2) / sxx)
        t_stat = slope / se
    span = ts[-1] - ts[0]
    level = abs(v_mean)
    per_hour = slope * 3600
    rise = slope * span
    threshold = rule.max_rel_per_hour * level
    out = Trend(
        name,
        unit,
        "pass",
        n=n,
        level=round(v_mean, 3),
        slope_per_hour=round(per_hour, 3),
        rel_per_hour_pct=round(100 * per_hour / level, 3) if level else 0.0,
        rise=round(rise, 3),
        t_stat=round(t_stat, 2) if math.isfinite(t_stat) else t_stat,
        r1=round(r1, 3),
        n_eff=round(n_eff, 1),
        threshold_per_hour=round(threshold, 3),
    )
    grows = per_hour > threshold and rise > rule.min_rise and t_stat > t_crit
    if not rule.judged:
        out.verdict = "info"
        out.reason = "not judged" + (" (would fail)" if grows else "")
    elif grows:
        out.verdict = "fail"
        out.reason = (
            f"grows {per_hour:.4g} {unit}/h (> {threshold:.4g} = "
            f"{100 * rule.max_rel_per_hour:g} % of {level:.4g}), rise {rise:.4g} > "
            f"{rule.min_rise:g}, t = {t_stat:.3g} > {t_crit:g}"
        )
    else:
        why = []
        if per_hour <= threshold:
            why.append(f"slope {per_hour:.4g}/h <= {threshold:.4g}/h")
        if rise <= rule.min_rise:
            why.append(f"rise {rise:.4g} <= {rule.min_rise:g}")
        if t_stat <= t_crit:
            why.append(f"t = {t_stat:.3g} <= {t_crit:g}")
        out.reason = "; ".join(why)
    return out


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank ``p`` percentile (0-100) of ``values``; 0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return float(ordered[rank - 1])


@dataclass
class LagVerdict:
    samples: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    limit_ms: float
    verdict: str  # "pass" or "fail" ("short": no samples)


def lag_rule(lag_ms: Sequence[float], limit_ms: float = MAX_LAG_P99_MS) -> LagVerdict:
    """Fails when the 99th percentile of the loop-lag samples passes ``limit_ms``."""
    p99 = percentile(lag_ms, 99)
    verdict = "short" if not lag_ms else ("fail" if p99 > limit_ms else "pass")
    return LagVerdict(
        samples=len(lag_ms),
        p50_ms=round(percentile(lag_ms, 50), 3),
        p99_ms=round(p99, 3),
        max_ms=round(max(lag_ms, default=0.0), 3),
        limit_ms=limit_ms,
        verdict=verdict,
    )


# Counts that must all be zero (the delivery rule).
MUST_BE_ZERO = (
    "lost",
    "duplicated",
    "out_of_order",
    "incomplete",
    "publish_errors",
    "worker_restarts",
)


@dataclass
class Verdict:
    passed: bool
    failures: list[str] = field(default_factory=list)
    trends: list[Trend] = field(default_factory=list)
    lag: dict[str, LagVerdict] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def judge(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    rules: Mapping[str, Rule],
    units: Mapping[str, str],
    lag_ms: Mapping[str, Sequence[float]],
    counts: Mapping[str, int],
    *,
    max_lag_p99_ms: float = MAX_LAG_P99_MS,
) -> Verdict:
    """Every verdict of a run: a trend per series (``series[name] = (times,
    values)``, judged by ``rules[name]``), the lag rule per lag source, and
    the delivery rule on ``counts`` (see ``MUST_BE_ZERO``)."""
    verdict = Verdict(passed=True)
    for name, (times, values) in series.items():
        t = trend(name, times, values, unit=units.get(name, ""), rule=rules.get(name))
        verdict.trends.append(t)
        if t.verdict == "fail":
            verdict.failures.append(f"{name}: {t.reason}")
    for source, samples in lag_ms.items():
        lag = lag_rule(samples, max_lag_p99_ms)
        verdict.lag[source] = lag
        if lag.verdict == "fail":
            verdict.failures.append(
                f"loop lag {source}: p99 {lag.p99_ms:.1f} ms > {max_lag_p99_ms:g} ms"
            )
    for key in MUST_BE_ZERO:
        if counts.get(key, 0):
            verdict.failures.append(f"{key}: {counts[key]}")
    verdict.passed = not verdict.failures
    return verdict
