"""A real, short chaos campaign (reliability/chaos): three `squall serve`
nodes behind HAProxy on a Sentinel-managed Redis (master, replica, three
sentinels), a shared FerretDB log and an OpenSearch node, Toxiproxy on every
link, ~100 subscribers and four publishers, a fixed-seed schedule of faults
of several kinds, two Redis failovers among them. The history checker must
find no violation, every acknowledged durable publication must be found by
search, and the faults must have been felt (clients disconnected and
recovered)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from reliability.chaos.campaign import Params, run_campaign
from reliability.chaos.checker import check
from reliability.chaos.history import read_history
from reliability.chaos.topology import DURABLE_NS, missing_services
from tests.services import require

# Seed 19 over 75 s, 14 faults of 9 kinds: the Redis master killed twice
# (two failovers), latency on the master's link, a store outage, a search
# node cut off, node kills and pauses, partitions, stalls and resets between
# HAProxy and the nodes.
SEED = 19


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
    # (With min_replicas_ack = 1, a publish the replica did not confirm in
    # 250 ms during a fault is answered "may still be delivered, or lost":
    # of 560 attempts, 472 acknowledged on a quiet machine.)
    assert stats["publish_attempted"] >= 400, report
    assert stats["publish_acked"] >= 0.6 * stats["publish_attempted"], report
    assert stats["deliveries"] >= 100 * stats["publish_acked"] * 0.4, report
    assert outcome.extra["caught_up"], report
    # Redis failed over, and search was read back after its outage.
    assert outcome.extra["faults_applied"].get("redis_kill", 0) >= 2, report
    assert outcome.extra["faults_applied"].get("search_outage", 0) >= 1, report
    durable_acked = {r["i"] for r in read_history(outcome.history_path)
                     if r["k"] == "pa" and r["c"].startswith(DURABLE_NS + ":")} & {
        r["i"] for r in read_history(outcome.history_path) if r["k"] == "pk"}  # fmt: skip
    assert stats["indexed_found"] == len(durable_acked) > 100, report
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
    # ... and a publication missing from the search index.
    unindexed = [dict(r) for r in records]
    index_read = next(r for r in unindexed if r["k"] == "ix" and set(r["ids"]) & acked)
    gone = sorted(set(index_read["ids"]) & acked)[0]
    index_read["ids"] = [i for i in index_read["ids"] if i != gone]
    kinds = {v.kind for v in check(unindexed, durable_namespaces=[DURABLE_NS]).violations}
    assert kinds == {"not_indexed"}
