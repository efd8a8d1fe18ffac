"""The chaos campaign's history checker (reliability/chaos/checker.py) on
hand-written histories: it catches a duplicate, a reordering, a silent gap
and a lost durable publication, and passes a gap the client was told about."""

from __future__ import annotations

import itertools
from typing import Any

from reliability.chaos.checker import check
from reliability.chaos.faults import make_schedule

DURABLE = ["d"]


class H:
    """A history under construction; time advances by one per record."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.t = 0.0

    def add(self, k: str, **fields: Any) -> H:
        self.t += 1
        self.records.append({"k": k, "t": self.t, **fields})
        return self

    def publish(self, pub_id: str, channel: str, offset: int, epoch: str = "E1") -> H:
        self.add("pa", p="p0", i=pub_id, c=channel, via="http")
        return self.add("pk", i=pub_id, o=offset, e=epoch)

    def subscribe(self, sid: str, channel: str, offset: int, epoch: str = "E1", **kw: Any) -> H:
        fields = {"rc": False, "fo": None, "fe": None, "rd": None, "n": 0, **kw}
        return self.add("sr", s=sid, c=channel, o=offset, e=epoch, tq=self.t, **fields)

    def deliver(self, sid: str, channel: str, pub_id: str, offset: int, epoch: str = "E1") -> H:
        return self.add("dl", s=sid, c=channel, o=offset, e=epoch, i=pub_id, a=1)


def kinds(h: H) -> list[str]:
    return sorted(v.kind for v in check(h.records, durable_namespaces=DURABLE).violations)


def clean(channel: str = "v:c0") -> H:
    h = H().publish("before", channel, 1).subscribe("s0", channel, 1)
    for n in range(2, 6):
        h.publish(f"p{n}", channel, n).deliver("s0", channel, f"p{n}", n)
    return h


def test_a_clean_history_passes() -> None:
    result = check(clean().records, durable_namespaces=DURABLE)
    assert result.ok, result.violations
    assert result.stats["deliveries"] == 4
    assert result.stats["publish_acked"] == 5


def test_a_duplicate_delivery_is_caught() -> None:
    h = clean().deliver("s0", "v:c0", "p5", 6)  # the same publication again
    assert "duplicate" in kinds(h)


def test_a_reordering_is_caught() -> None:
    h = H().subscribe("s0", "v:c0", 0)
    h.publish("a", "v:c0", 1).publish("b", "v:c0", 2)
    h.deliver("s0", "v:c0", "b", 2).deliver("s0", "v:c0", "a", 1)
    assert kinds(h) == ["reorder"]


def test_a_silent_gap_is_caught() -> None:
    h = H().subscribe("s0", "v:c0", 0)
    h.publish("a", "v:c0", 1).deliver("s0", "v:c0", "a", 1)
    h.publish("b", "v:c0", 2)  # never delivered, nothing reported
    h.publish("c", "v:c0", 3).deliver("s0", "v:c0", "c", 3)
    result = check(h.records, durable_namespaces=DURABLE)
    assert [v.kind for v in result.violations] == ["silent_gap"]
    assert result.violations[0].evidence[0]["missing"][0]["id"] == "b"


def test_a_silent_gap_after_a_reconnect_that_claimed_recovery_is_caught() -> None:
    h = H().subscribe("s0", "v:c0", 0)
    h.publish("a", "v:c0", 1).deliver("s0", "v:c0", "a", 1)
    h.add("dc", s="s0", code=1006, reason=None)
    h.publish("b", "v:c0", 2)
    h.subscribe("s0", "v:c0", 2, rc=True, fo=1, fe="E1", rd=True)  # but b never replayed
    assert kinds(h) == ["silent_gap"]


def test_a_gap_reported_by_recovered_false_passes() -> None:
    h = H().subscribe("s0", "v:c0", 0)
    h.publish("a", "v:c0", 1).deliver("s0", "v:c0", "a", 1)
    h.add("dc", s="s0", code=1006, reason=None)
    for n in range(2, 40):  # more than the history holds
        h.publish(f"p{n}", "v:c0", n)
    h.subscribe("s0", "v:c0", 39, rc=True, fo=1, fe="E1", rd=False)
    h.publish("after", "v:c0", 40).deliver("s0", "v:c0", "after", 40)
    result = check(h.records, durable_namespaces=DURABLE)
    assert result.ok, result.violations
    assert result.stats["lost_with_reported_gap"] == 38
    assert result.stats["not_recovered"] == 1


def test_a_new_epoch_is_a_reported_gap() -> None:
    h = H().subscribe("s0", "v:c0", 0)
    h.publish("a", "v:c0", 1).deliver("s0", "v:c0", "a", 1)
    h.publish("b", "v:c0", 2)  # lost with the old epoch
    h.publish("c", "v:c0", 1, epoch="E2").deliver("s0", "v:c0", "c", 1, epoch="E2")
    assert check(h.records, durable_namespaces=DURABLE).ok


def test_a_lost_durable_publication_is_caught_even_with_a_reported_gap() -> None:
    h = H().subscribe("s0", "d:c0", 0)
    h.publish("a", "d:c0", 1).deliver("s0", "d:c0", "a", 1)
    h.publish("b", "d:c0", 2)
    h.subscribe("s0", "d:c0", 2, rc=True, fo=1, fe="E1", rd=False)
    assert kinds(h) == ["durable_not_recovered", "lost_durable"]


def test_a_lost_durable_publication_is_caught() -> None:
    h = H().subscribe("s0", "d:c0", 0)
    h.publish("a", "d:c0", 1)
    h.publish("b", "d:c0", 2).deliver("s0", "d:c0", "b", 2)
    assert kinds(h) == ["lost_durable"]


def test_publications_before_the_subscription_and_unknown_outcomes_are_not_expected() -> None:
    h = H().publish("old", "v:c0", 1).subscribe("s0", "v:c0", 1)
    h.add("pa", p="p0", i="maybe", c="v:c0", via="ws").add("pu", i="maybe", err="timeout")
    h.add("pa", p="p0", i="no", c="v:c0", via="ws").add("pf", i="no", err="503")
    assert check(h.records, durable_namespaces=DURABLE).ok


def test_a_client_that_gave_up_reported_its_gap() -> None:
    h = H().subscribe("s0", "v:c0", 0)
    h.publish("a", "v:c0", 1).deliver("s0", "v:c0", "a", 1)
    h.add("cl", s="s0", err="gave up reconnecting")
    h.publish("b", "v:c0", 2)
    assert check(h.records, durable_namespaces=DURABLE).ok


def test_a_duplicate_dropped_by_the_client_guard_is_no_violation() -> None:
    h = clean()
    h.add("dl", s="s0", c="v:c0", o=5, e="E1", i="p5", a=0)
    result = check(h.records, durable_namespaces=DURABLE)
    assert result.ok
    assert result.stats["wire_duplicates_dropped_by_client"] == 1


def test_two_publications_at_one_offset_are_caught() -> None:
    h = H().publish("a", "v:c0", 1).publish("b", "v:c0", 1)
    assert kinds(h) == ["offset_reused"]


def test_the_schedule_is_replayable_bounded_and_at_most_two_at_once() -> None:
    one = make_schedule(42, 120.0)
    assert one == make_schedule(42, 120.0)
    assert one != make_schedule(43, 120.0)
    assert len({f.kind for f in one}) >= 4
    for f in one:
        assert 0 < f.start and f.start + f.duration <= 120.0
        # Whenever a fault starts, at most two are active, on distinct components.
        active = [g for g in one if g.start <= f.start < g.start + g.duration]
        assert len(active) <= 2
        assert len({g.component for g in active}) == len(active)
    single = make_schedule(42, 120.0, max_concurrent=1)
    for a, b in itertools.pairwise(single):
        assert b.start >= a.start + a.duration


def test_a_failed_resubscribe_then_skipped_offsets_is_a_silent_gap_with_a_hint() -> None:
    # What a 300 s campaign found: the resubscribe timed out on the client,
    # the server completed it anyway, and live publications resumed past
    # the offsets its (discarded) reply would have replayed.
    h = H().subscribe("s0", "v:c0", 0)
    h.publish("a", "v:c0", 1).deliver("s0", "v:c0", "a", 1)
    h.add("dc", s="s0", code=None, reason=None).add("cn", s="s0", node="node0", n=2)
    h.publish("b", "v:c0", 2)
    h.add("sf", s="s0", c="v:c0", rc=True, err="TimeoutError()")
    h.publish("c", "v:c0", 3).deliver("s0", "v:c0", "c", 3)
    (violation,) = check(h.records, durable_namespaces=DURABLE).violations
    assert violation.kind == "silent_gap"
    assert "recovery the failed call carried was lost" in violation.hint


def test_an_acknowledged_publication_the_search_never_returned_is_caught() -> None:
    h = H().publish("a", "d:c0", 1).publish("b", "d:c0", 2).publish("c", "v:c0", 1)
    # Only durable channels are read back; one publication is missing there.
    h.add("ix", c="d:c0", ids=["a"])
    result = check(h.records, durable_namespaces=DURABLE)
    assert [v.kind for v in result.violations] == ["not_indexed"]
    assert [e["id"] for e in result.violations[0].evidence] == ["b"]
    assert result.stats["indexed_found"] == 1
    h.records[-1]["ids"] = ["a", "b"]
    assert check(h.records, durable_namespaces=DURABLE).ok


def test_sentinel_link_faults_follow_the_servers_and_never_overlap_on_redis() -> None:
    schedule = make_schedule(7, 600.0, redis="sentinel")
    targets = {f.target for f in schedule}
    assert targets & {"redis_master", "redis_replica"}
    assert not any(t.startswith("redis_n") for t in targets)
    assert "search" in targets
    for f in schedule:
        overlapping = [g for g in schedule if g is not f and g.start < f.start + f.duration
                       and f.start < g.start + g.duration]  # fmt: skip
        if f.component == "redis":
            assert all(g.component != "redis" for g in overlapping)
    single = make_schedule(7, 600.0, redis="single")
    assert any(f.target.startswith("redis_n") for f in single)
    assert not {f.target for f in single} & {"redis_master", "redis_replica"}
