"""The history checker: a pure function from a run's records (see
history.py) to its violations.

Per subscriber and channel, over what the client library handed to the
application (deliveries with ``a == 1``):

- ``duplicate``: one publication (by id, or by epoch and offset) handed out twice;
- ``reorder``: within an epoch, an offset not above the last one handed out;
- ``silent_gap``: an acknowledged publication the subscriber should have had
  (published after it subscribed, while it held the subscription) that never
  came, with no gap reported for it. Reported gaps are: a (re)subscribe
  answered ``recovered: false`` (it covers what lies between the position the
  client recovered from and the one it was given), a publication of a new
  epoch (it covers the rest of the old epoch and what precedes it in the new
  one), and the client giving up (``cl``: the application is told);
- in durable namespaces there may be no gap at all: ``lost_durable`` (an
  acknowledged publication never delivered, reported or not) and
  ``durable_not_recovered`` (a recovery answered ``recovered: false``).

When the run read the search index back (``ix`` records, one per durable
channel): ``not_indexed``, an acknowledged publication of that channel the
search never returned.

Across the run: ``offset_reused`` (two acknowledged publications at one
epoch and offset of a channel), ``position_mismatch`` (delivered at another
position than acknowledged), ``phantom`` (a delivery of a publication nobody
attempted), and in durable namespaces ``failed_delivered`` (a publish the
server answered with an error was delivered; elsewhere only a warning).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

MAX_EVIDENCE = 12


@dataclass
class Violation:
    kind: str
    detail: str
    subscriber: str | None = None
    channel: str | None = None
    evidence: list[dict[str, Any]] = field(default_factory=list)
    hint: str = ""  # a first diagnosis, when the history suggests one

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CheckResult:
    violations: list[Violation]
    warnings: list[Violation]
    stats: dict[str, int]

    @property
    def ok(self) -> bool:
        return not self.violations


@dataclass
class _Pub:
    id: str
    channel: str
    status: str = "attempted"  # acked / failed / unknown
    offset: int | None = None
    epoch: str | None = None
    t_attempt: float = 0.0
    t_ack: float = 0.0


def namespace(channel: str) -> str:
    return channel.split(":", 1)[0] if ":" in channel else ""


@dataclass
class _Track:
    """What one subscriber's subscription to one channel went through."""

    first: dict[str, Any] | None = None  # the first subscribe answer
    seen_epochs: set[str] = field(default_factory=set)
    excused: list[tuple[str, float, float, dict[str, Any]]] = field(default_factory=list)
    gap_reports: list[dict[str, Any]] = field(default_factory=list)
    closed: dict[str, Any] | None = None
    closed_pos: tuple[str, int] | None = None
    delivered: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)  # sf records


def check(
    records: Iterable[Mapping[str, Any]], *, durable_namespaces: Collection[str] = ()
) -> CheckResult:
    durable = set(durable_namespaces)
    pubs: dict[str, _Pub] = {}
    per_sub: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    sub_channels: dict[str, set[str]] = defaultdict(set)
    client_events: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    indexed: dict[str, set[str]] = {}
    stats: Counter[str] = Counter()
    violations: list[Violation] = []
    warnings: list[Violation] = []

    for r in records:
        k = r.get("k")
        if k == "meta" and not durable:
            durable = set(r.get("durable_namespaces", ()))
        elif k == "pa":
            pubs[r["i"]] = _Pub(r["i"], r["c"], t_attempt=r["t"])
            stats["publish_attempted"] += 1
        elif k in ("pk", "pf", "pu"):
            pub = pubs.get(r["i"])
            if pub is None:
                continue
            pub.status = {"pk": "acked", "pf": "failed", "pu": "unknown"}[k]
            stats["publish_" + pub.status] += 1
            if k == "pk":
                pub.offset, pub.epoch, pub.t_ack = r["o"], r["e"], r["t"]
        elif k in ("sr", "sf", "dl"):
            per_sub[(r["s"], r["c"])].append(r)
            sub_channels[r["s"]].add(r["c"])
            if k == "dl":
                stats["deliveries" if r.get("a", 1) else "wire_duplicates_dropped_by_client"] += 1
            elif k == "sr":
                if r.get("rc"):
                    stats["recoveries"] += 1
                    stats["recovered" if r.get("rd") else "not_recovered"] += 1
                else:
                    stats["subscribes"] += 1
            else:
                stats["subscribe_failures"] += 1
        elif k in ("cn", "dc", "cl"):
            client_events[r["s"]].append(r)
            stats[{"cn": "connects", "dc": "disconnects", "cl": "clients_gave_up"}[k]] += 1
        elif k == "fs":
            if r.get("skipped"):
                stats["faults_skipped"] += 1
            else:
                stats["faults_failed_to_apply" if r.get("err") else "faults_injected"] += 1
        elif k == "ix":
            indexed[r["c"]] = set(r["ids"])

    # ---- across the run --------------------------------------------------
    by_position: dict[tuple[str, str, int], list[_Pub]] = defaultdict(list)
    acked_by_channel: dict[str, list[_Pub]] = defaultdict(list)
    for pub in pubs.values():
        if pub.status == "acked":
            assert pub.epoch is not None and pub.offset is not None
            by_position[(pub.channel, pub.epoch, pub.offset)].append(pub)
            acked_by_channel[pub.channel].append(pub)
    for (channel, epoch, offset), same in by_position.items():
        if len(same) > 1:
            violations.append(Violation(
                "offset_reused",
                f"{len(same)} acknowledged publications at {channel} epoch {epoch} offset {offset}",
                channel=channel,
                evidence=[{"id": p.id, "t_ack": p.t_ack} for p in same],
            ))  # fmt: skip
    for channel_pubs in acked_by_channel.values():
        channel_pubs.sort(key=lambda p: (p.t_ack, p.offset or 0))

    for channel, ids in indexed.items():
        acked_ids = acked_by_channel.get(channel, [])
        stats["indexed_found"] += sum(1 for p in acked_ids if p.id in ids)
        missing = [p for p in acked_ids if p.id not in ids]
        if missing:
            violations.append(Violation(
                "not_indexed",
                f"{len(missing)} acknowledged publication(s) of {channel} never found by search",
                channel=channel,
                evidence=[{"id": p.id, "epoch": p.epoch, "offset": p.offset, "t_ack": p.t_ack}
                          for p in missing[:MAX_EVIDENCE]],
            ))  # fmt: skip

    reported_phantoms: set[str] = set()
    failed_delivered: dict[str, list[Mapping[str, Any]]] = defaultdict(list)

    # ---- per subscriber and channel ---------------------------------------
    for (sid, channel), events in per_sub.items():
        is_durable = namespace(channel) in durable
        track = _Track()
        pos: tuple[str, int] | None = None
        last_offset: dict[str, int] = {}
        seen_ids: dict[str, Mapping[str, Any]] = {}
        seen_positions: dict[tuple[str, int], Mapping[str, Any]] = {}
        cl_events = [c for c in client_events.get(sid, []) if c["k"] == "cl"]
        for r in events:
            k = r["k"]
            if k == "sf":
                track.failures.append(dict(r))
                continue
            if k == "sr":
                epoch, offset = r["e"], r["o"]
                if track.first is None:
                    track.first = dict(r)
                if r.get("rc") and not r.get("rd"):
                    from_epoch, from_offset = r.get("fe"), r.get("fo") or 0
                    track.gap_reports.append(dict(r))
                    if from_epoch == epoch:
                        track.excused.append((epoch, from_offset + 1, offset, dict(r)))
                    else:
                        if from_epoch is not None:
                            track.excused.append((from_epoch, from_offset + 1, math.inf, dict(r)))
                        track.excused.append((epoch, 0, offset, dict(r)))
                    if is_durable:
                        violations.append(Violation(
                            "durable_not_recovered",
                            f"recovery in durable {channel} answered recovered:false "
                            f"(from epoch {from_epoch} offset {from_offset} to epoch {epoch} "
                            f"offset {offset})",
                            sid, channel, [dict(r)],
                        ))  # fmt: skip
                track.seen_epochs.add(epoch)
                if pos is not None and pos[0] == epoch:
                    pos = (epoch, max(pos[1], offset))
                else:
                    pos = (epoch, offset)
                continue
            # a delivery
            if not r.get("a", 1):
                continue
            pub_id, epoch, offset = r.get("i"), r["e"], r["o"]
            if pub_id is not None and pub_id in seen_ids:
                violations.append(Violation(
                    "duplicate", f"publication {pub_id} handed out twice on {channel}",
                    sid, channel, [dict(seen_ids[pub_id]), dict(r)],
                ))  # fmt: skip
            elif (epoch, offset) in seen_positions:
                violations.append(Violation(
                    "duplicate", f"epoch {epoch} offset {offset} handed out twice on {channel}",
                    sid, channel, [dict(seen_positions[(epoch, offset)]), dict(r)],
                ))  # fmt: skip
            if epoch in last_offset and offset <= last_offset[epoch]:
                violations.append(Violation(
                    "reorder",
                    f"offset {offset} after {last_offset[epoch]} in epoch {epoch} on {channel}",
                    sid, channel, [dict(r)],
                ))  # fmt: skip
            last_offset[epoch] = max(offset, last_offset.get(epoch, 0))
            if pos is not None and pos[0] != epoch:
                # A new epoch, seen live: a reported gap.
                track.gap_reports.append(dict(r))
                track.excused.append((pos[0], pos[1] + 1, math.inf, dict(r)))
                track.excused.append((epoch, 0, offset - 1, dict(r)))
            track.seen_epochs.add(epoch)
            pos = (epoch, offset)
            if pub_id is not None:
                seen_ids[pub_id] = r
                track.delivered[pub_id] = dict(r)
            seen_positions[(epoch, offset)] = r
            pub = pubs.get(pub_id) if pub_id is not None else None
            if pub is None:
                if pub_id not in reported_phantoms:
                    reported_phantoms.add(str(pub_id))
                    violations.append(Violation(
                        "phantom", f"delivered publication {pub_id!r} was never published",
                        sid, channel, [dict(r)],
                    ))  # fmt: skip
            elif pub.status == "acked" and (pub.epoch, pub.offset) != (epoch, offset):
                violations.append(Violation(
                    "position_mismatch",
                    f"{pub_id} acknowledged at {pub.epoch}/{pub.offset}, delivered at "
                    f"{epoch}/{offset}",
                    sid, channel, [dict(r)],
                ))  # fmt: skip
            elif pub.status == "failed":
                failed_delivered[pub.id].append(r)
        if cl_events:
            track.closed = dict(cl_events[0])
            track.closed_pos = pos
        _check_coverage(sid, channel, track, acked_by_channel.get(channel, []),
                        is_durable, violations, stats)  # fmt: skip

    for pub_id, deliveries in failed_delivered.items():
        pub = pubs[pub_id]
        v = Violation(
            "failed_delivered",
            f"{pub_id} was answered with an error yet delivered to {len(deliveries)} subscriber(s)",
            None, pub.channel, [dict(d) for d in deliveries[:3]],
        )  # fmt: skip
        (violations if namespace(pub.channel) in durable else warnings).append(v)
    stats["subscribers"] = len(sub_channels)
    stats["subscriptions"] = len(per_sub)
    stats["violations"] = len(violations)
    return CheckResult(violations, warnings, dict(stats))


def _check_coverage(
    sid: str,
    channel: str,
    track: _Track,
    acked: list[_Pub],
    is_durable: bool,
    violations: list[Violation],
    stats: Counter[str],
) -> None:
    """Every acknowledged publication the subscriber should have had: delivered,
    or (outside durable namespaces) covered by a reported gap."""
    first = track.first
    if first is None:
        if acked:
            stats["subscriptions_never_made"] += 1
        return
    e0, o0, t0 = first["e"], first["o"], first.get("tq", first["t"])
    silent: list[_Pub] = []
    lost_reported: list[_Pub] = []
    for pub in acked:
        if pub.id in track.delivered:
            continue
        assert pub.epoch is not None and pub.offset is not None
        if pub.epoch == e0:
            expected = pub.offset > o0
        elif pub.epoch in track.seen_epochs:
            expected = True
        else:
            expected = pub.t_ack >= t0
        if not expected:
            continue
        if _excused(pub, track):
            lost_reported.append(pub)
        else:
            silent.append(pub)
    stats["lost_with_reported_gap"] += len(lost_reported)
    if silent:
        kind = "lost_durable" if is_durable else "silent_gap"
        violations.append(Violation(
            kind,
            f"{len(silent)} acknowledged publication(s) on {channel} never delivered to {sid} "
            "and no gap reported",
            sid, channel, _evidence(silent, track), _hint(silent, track),
        ))  # fmt: skip
    if lost_reported and is_durable:
        violations.append(Violation(
            "lost_durable",
            f"{len(lost_reported)} acknowledged publication(s) on durable {channel} never "
            f"delivered to {sid} (a gap was reported)",
            sid, channel, _evidence(lost_reported, track),
        ))  # fmt: skip


def _hint(missing: list[_Pub], track: _Track) -> str:
    after = [r["t"] for r in track.delivered.values() if r["t"] > missing[-1].t_ack]
    until = min(after) if after else math.inf
    failed = [f for f in track.failures if f["t"] <= until]
    if not failed:
        return ""
    resumed = [r for r in track.delivered.values() if r["t"] > failed[-1]["t"]]
    if not resumed:
        return (
            "a (re)subscribe failed (resubscribe_failures) and nothing was delivered after it: "
            "the subscription stayed dead and the application was not told"
        )
    return (
        "a (re)subscribe failed (resubscribe_failures), yet deliveries resumed after it with "
        "the missing offsets skipped: the recovery the failed call carried was lost"
    )


def _excused(pub: _Pub, track: _Track) -> bool:
    assert pub.epoch is not None and pub.offset is not None
    for epoch, lo, hi, _ in track.excused:
        if epoch == pub.epoch and lo <= pub.offset <= hi:
            return True
    if pub.epoch not in track.seen_epochs and any(g["t"] >= pub.t_ack for g in track.gap_reports):
        return True  # an epoch that came and went while the subscriber was away
    if track.closed is not None:
        pos = track.closed_pos
        if pos is None or pub.epoch != pos[0] or pub.offset > pos[1]:
            return True
    return False


def _evidence(missing: list[_Pub], track: _Track) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {"missing": [
            {"id": p.id, "epoch": p.epoch, "offset": p.offset, "t_ack": p.t_ack}
            for p in missing[:MAX_EVIDENCE]
        ], "missing_total": len(missing)},
    ]  # fmt: skip
    if track.first is not None:
        out.append({"first_subscribe": track.first})
    if track.gap_reports:
        out.append({"gap_reports": track.gap_reports[-3:]})
    if track.failures:
        out.append({"resubscribe_failures": track.failures[-3:]})
    last = sorted(track.delivered.values(), key=lambda r: r["t"])[-3:]
    if last:
        out.append({"last_deliveries": last})
    return out


def summarize(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The meta record of a history (first line), if any."""
    for r in records:
        if r.get("k") == "meta":
            return dict(r)
    return {}
