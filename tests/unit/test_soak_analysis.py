"""The soak test's verdicts (reliability/soak_analysis.py): the trend
detector flags a leak and passes flat noise and a GC-like sawtooth; the
loop-lag and delivery rules; and the offset checks every soak subscriber
makes (reliability/soak_client.py)."""

from __future__ import annotations

import random

import pytest

from reliability.soak_analysis import (
    Rule,
    judge,
    lag_rule,
    percentile,
    second_half,
    trend,
)
from reliability.soak_client import Track

# A 30-minute run sampled every 10 s, as `make soak` does.
TIMES = [10.0 * i for i in range(181)]
LEVEL = 200_000.0  # KB: a worker's RSS


def noisy(level: float, spread: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [level + rng.gauss(0, spread) for _ in TIMES]


def test_a_leaking_series_fails() -> None:
    # 20 % an hour (40 MB/h on 200 MB) under 0.5 % noise.
    base = noisy(LEVEL, 0.005 * LEVEL, 1)
    values = [v + 0.20 * LEVEL * t / 3600 for v, t in zip(base, TIMES, strict=True)]
    t = trend("rss", TIMES, values, unit="KB", rule=Rule(min_rise=1024))
    assert t.verdict == "fail", t
    assert 15 < t.rel_per_hour_pct < 25
    assert t.t_stat > 3


def test_a_slow_leak_below_the_threshold_passes_and_one_above_fails() -> None:
    base = noisy(LEVEL, 0.001 * LEVEL, 2)
    slow = [v + 0.02 * LEVEL * t / 3600 for v, t in zip(base, TIMES, strict=True)]
    fast = [v + 0.08 * LEVEL * t / 3600 for v, t in zip(base, TIMES, strict=True)]
    assert trend("rss", TIMES, slow, rule=Rule(min_rise=1024)).verdict == "pass"
    assert trend("rss", TIMES, fast, rule=Rule(min_rise=1024)).verdict == "fail"


@pytest.mark.parametrize("seed", range(20))
def test_a_flat_noisy_series_passes(seed: int) -> None:
    # 3 % noise: far more than a steady RSS shows.
    values = noisy(LEVEL, 0.03 * LEVEL, seed)
    t = trend("rss", TIMES, values, unit="KB", rule=Rule(min_rise=1024))
    assert t.verdict == "pass", t


@pytest.mark.parametrize("period", [55.0, 90.0, 130.0, 240.0])
@pytest.mark.parametrize("phase", [0.0, 0.3, 0.7])
def test_a_gc_like_sawtooth_passes(period: float, phase: float) -> None:
    # Memory climbs by 10 % of the level, then a collection drops it back,
    # over and over: a big swing that is not a trend.
    rng = random.Random(int(period * 10 + phase * 100))
    values = [
        LEVEL + 0.10 * LEVEL * (((t / period) + phase) % 1.0) + rng.gauss(0, 200) for t in TIMES
    ]
    t = trend("rss", TIMES, values, unit="KB", rule=Rule(min_rise=1024))
    assert t.verdict == "pass", t


def test_a_sawtooth_on_a_leak_fails() -> None:
    # The same sawtooth, but every trough higher than the last.
    values = [LEVEL + 0.10 * LEVEL * ((t / 90.0) % 1.0) + 0.30 * LEVEL * t / 3600 for t in TIMES]
    assert trend("rss", TIMES, values, rule=Rule(min_rise=1024)).verdict == "fail"


def test_only_the_second_half_counts() -> None:
    # Warm-up: a steep climb in the first half, flat after it.
    values = [LEVEL * min(1.0, 0.5 + t / 1800) for t in TIMES]
    assert trend("rss", TIMES, values, rule=Rule(min_rise=1024)).verdict == "pass"
    assert second_half([0, 1, 2, 3, 4], [5, 6, 7, 8, 9]) == ([2, 3, 4], [7, 8, 9])


def test_one_step_of_an_integer_series_is_not_a_trend() -> None:
    # A thread pool starts one more thread half-way through the second half.
    values = [8.0 if t < 1350 else 9.0 for t in TIMES]
    assert trend("threads", TIMES, values, rule=Rule(min_rise=2)).verdict == "pass"
    # ... but a descriptor that leaks at every sample is.
    fds = [5000.0 + i for i, _ in enumerate(TIMES)]
    t = trend("fds", TIMES, fds, rule=Rule(min_rise=10))
    assert t.verdict == "fail"
    assert t.t_stat == float("inf")


def test_too_few_samples_give_no_verdict_and_unjudged_series_never_fail() -> None:
    assert trend("rss", [0, 10, 20], [1, 2, 3]).verdict == "short"
    leak = [LEVEL * (1 + t / 3600) for t in TIMES]
    t = trend("generator rss", TIMES, leak, rule=Rule(judged=False))
    assert t.verdict == "info"
    assert "would fail" in t.reason


def test_the_lag_rule() -> None:
    fine = [1.0] * 990 + [40.0] * 10
    assert lag_rule(fine).verdict == "pass"
    # 2 % of the probes waited 80 ms: the p99 is 80 ms.
    slow = [1.0] * 980 + [80.0] * 20
    lag = lag_rule(slow)
    assert lag.verdict == "fail"
    assert lag.p99_ms == 80.0
    assert lag_rule([]).verdict == "short"
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0


def test_judge_collects_every_failure() -> None:
    flat = noisy(LEVEL, 100, 7)
    leak = [LEVEL + 0.5 * LEVEL * t / 3600 for t in TIMES]
    rules = {"w0 rss": Rule(min_rise=1024), "w1 rss": Rule(min_rise=1024)}
    ok = judge({"w0 rss": (TIMES, flat)}, rules, {}, {"w0": [2.0] * 100}, {"lost": 0})
    assert ok.passed and not ok.failures
    bad = judge(
        {"w0 rss": (TIMES, flat), "w1 rss": (TIMES, leak)},
        rules,
        {"w1 rss": "KB"},
        {"w0": [2.0] * 50 + [90.0] * 50},
        {"lost": 3, "duplicated": 0},
    )
    assert not bad.passed
    assert [f.split(":")[0] for f in bad.failures] == ["w1 rss", "loop lag w0", "lost"]
    assert bad.as_dict()["lag"]["w0"]["verdict"] == "fail"


# ---- The subscribers' offset checks (reliability/soak_client.Track) --------


def track() -> Track:
    t = Track(index=0, channel="bench:c0", port=1)
    t.position(10, "E1", None)  # subscribed at offset 10
    return t


def test_a_track_counts_nothing_on_an_orderly_stream() -> None:
    t = track()
    for offset in range(11, 21):
        t.pub(offset, "E1")
    assert (t.delivered, len(t.missing), t.duplicated, t.out_of_order, t.gaps) == (10, 0, 0, 0, 0)


def test_a_track_counts_lost_duplicated_and_out_of_order() -> None:
    t = track()
    for offset in (11, 13, 14, 14, 12, 17):
        t.pub(offset, "E1")
    # 12 came late (out of order), 14 twice, 15 and 16 never.
    assert t.out_of_order == 1
    assert t.duplicated == 1
    assert sorted(t.missing) == [15, 16]


def test_recovery_fills_the_position_and_flags_what_it_did_not_return() -> None:
    t = track()
    t.pub(11, "E1")
    # Reconnected: the reply recovered 12..13 but says the channel is at 15.
    t.pub(12, "E1")
    t.pub(13, "E1")
    t.position(15, "E1", True)
    assert sorted(t.missing) == [14, 15]
    # Live publications after the reply follow on.
    t.pub(16, "E1")
    assert sorted(t.missing) == [14, 15]


def test_announced_gaps_are_not_losses() -> None:
    t = track()
    # recovered: false, the channel at 30, 25..30 still in history.
    t.gap_until = 30
    for offset in range(25, 31):
        t.pub(offset, "E1")
    t.position(30, "E1", False)
    assert t.gaps == 14  # 11..24
    assert not t.missing
    # The same on SSE: the subscribe push says recovered: false at 40 and
    # nothing is left; the next live publication is 41.
    t.gap_until = 40
    t.pub(41, "E1")
    assert t.gaps == 24 and not t.missing
    # A gap after the announced one is a loss again.
    t.pub(43, "E1")
    assert t.missing == {42}


def test_a_new_epoch_is_counted() -> None:
    t = track()
    t.pub(11, "E2")
    assert t.epoch_changes == 1
    assert (t.epoch, t.last) == ("E2", 11)
