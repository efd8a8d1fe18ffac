"""A real, short chaos campaign (reliability/chaos): three `squall serve`
nodes behind HAProxy on one Redis and a shared FerretDB log, Toxiproxy on
every link, ~100 subscribers and four publishers, a fixed-seed schedule of
faults of several kinds. The history checker must find no violation, and the
faults must have been felt (clients disconnected and recovered)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from reliability.chaos.campaign import Params, run_campaign
from reliability.chaos.checker import check
from reliability.chaos.history import read_history
from reliability.chaos.topology import DURABLE_NS, missing_services
from tests.services import require

# Seed 7 over 75 s: node pause and kill, store outage, Redis kill -9, latency,
# a partition, reset_peer and a bandwidth limit, on nodes, links and Redis.
SEED = 7


@pytest.mark.timeout(420)
async def test_short_campaign_loses_nothing_silently(tmp_path: Path) -> None:
    for what, how in missing_services():
        require(what, False, how)
    params = Params(
        seed=SEED,
        seconds=75.0,
        subscribers=100,
        publish_rate=10.0,
        settle_timeout=45.0,
        out_dir=tmp_path,
        workdir=tmp_path / "topology",
    )
    outcome = await run_campaign(params)
    stats = outcome.result.stats
    report = outcome.md_path.read_text()
    assert outcome.result.violations == [], report
    assert outcome.extra["fault_errors"] == [], report
    assert "campaign_errors" not in outcome.extra, report
    # The faults happened and were felt.
    assert stats["faults_injected"] >= 8, report
    assert len(outcome.extra["faults_applied"]) >= 6, report
    assert stats["disconnects"] >= 20, report
    assert stats["recoveries"] >= 20, report
    # Publishing and delivery went on.
    assert stats["publish_acked"] >= 500, report
    assert stats["deliveries"] >= 100 * stats["publish_acked"] * 0.4, report
    assert outcome.extra["caught_up"], report
    assert outcome.json_path.exists() and outcome.history_path.exists()

    # The checker would have seen a loss in this very history: drop a few
    # deliveries of durable channels and it must complain.
    records = list(read_history(outcome.history_path))
    acked = {r["i"] for r in records if r["k"] == "pk"}
    delivered = [i for i, r in enumerate(records) if r["k"] == "dl" and r["a"]
                 and r["i"] in acked and r["c"].startswith(DURABLE_NS + ":")]  # fmt: skip
    dropped = set(random.Random(SEED).sample(delivered, 5))
    tampered = [r for i, r in enumerate(records) if i not in dropped]
    kinds = {v.kind for v in check(tampered, durable_namespaces=[DURABLE_NS]).violations}
    assert kinds == {"lost_durable"}
