"""Counters for ``/metrics`` (Prometheus) and the ``/status`` snapshot.

The hot path bumps plain integers; they are read into Prometheus families
only when scraped, so a delivery costs no lock and no label lookup.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import time
from collections import deque
from collections.abc import Iterator
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from server.codecs.centrifuge import METHODS as CENTRIFUGE_METHODS
from server.errors import Disconnect
from server.protocol import METHODS

if TYPE_CHECKING:
    from server.node import Node
    from server.proxy import ProxyStats


class Metrics:
    def __init__(self, node: Node) -> None:
        self._node = node
        self.publications_in = 0
        self.deliveries = 0
        self.messages_out = 0
        self.slow_disconnects = 0
        self.searches = 0
        self.connections_accepted = 0
        self.connections_refused = 0
        self.commands: dict[str, int] = {}
        self.errors: dict[int, int] = {}
        self.disconnects: dict[int, int] = {}
        self.recoveries = {True: 0, False: 0}
        self.api_calls: dict[str, int] = {}
        self._samples: deque[tuple[float, int, int, int]] = deque(maxlen=61)
        self._sampler: asyncio.Task[None] | None = None
        # Event-loop lag: how late a LAG_INTERVAL timer fires. Cumulative
        # histogram counts, their sum, and the last minute's samples.
        self.lag_buckets = [0] * (len(LAG_BUCKETS) + 1)
        self.lag_sum = 0.0
        self.lag_recent: deque[float] = deque(maxlen=int(60 / LAG_INTERVAL))
        self._lag_probe: asyncio.Task[None] | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self, node))

    def count_command(self, method: str) -> None:
        key = method if method in _KNOWN_METHODS else "other"
        self.commands[key] = self.commands.get(key, 0) + 1

    def count_error(self, code: int) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def count_disconnect(self, disconnect: Disconnect) -> None:
        self.disconnects[disconnect.code] = self.disconnects.get(disconnect.code, 0) + 1

    def count_recovery(self, recovered: bool) -> None:
        self.recoveries[recovered] += 1

    def count_api(self, method: str) -> None:
        self.api_calls[method] = self.api_calls.get(method, 0) + 1

    def start(self) -> None:
        self.sample()
        loop = asyncio.get_running_loop()
        self._sampler = loop.create_task(self._sample_forever())
        self._lag_probe = loop.create_task(self._probe_lag())

    async def stop(self) -> None:
        for task in (self._sampler, self._lag_probe):
            if task is not None:
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task

    async def _probe_lag(self) -> None:
        """Ten times a second: how much later than asked a timer fired. Every
        callback, read and write of the loop delays it, so it is the wait a
        message or a request sees before the loop gets to it."""
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time() + LAG_INTERVAL
            await asyncio.sleep(LAG_INTERVAL)
            self.record_lag(max(0.0, loop.time() - asked))

    def record_lag(self, lag: float) -> None:
        self.lag_buckets[bisect.bisect_left(LAG_BUCKETS, lag)] += 1
        self.lag_sum += lag
        self.lag_recent.append(lag)

    def lag_summary(self) -> dict[str, float]:
        """Loop lag over the last minute, in ms: p50, p99 and max."""
        recent = sorted(self.lag_recent)
        if not recent:
            return {"p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}

        def pct(p: float) -> float:
            return round(1000 * recent[min(len(recent) - 1, int(p * len(recent)))], 2)

        return {"p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": round(1000 * recent[-1], 2)}

    def sample(self) -> None:
        self._samples.append(
            (time.monotonic(), self.publications_in, self.deliveries, self.messages_out)
        )

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.sample()

    def rates(self, window: int = 10) -> dict[str, float]:
        """Per-second rates over the last ``window`` seconds of samples."""
        if len(self._samples) < 2:
            return {"publications_in": 0.0, "deliveries": 0.0, "messages_out": 0.0}
        newest = self._samples[-1]
        oldest = self._samples[max(0, len(self._samples) - 1 - window)]
        span = max(newest[0] - oldest[0], 1e-9)
        return {
            "publications_in": round((newest[1] - oldest[1]) / span, 2),
            "deliveries": round((newest[2] - oldest[2]) / span, 2),
            "messages_out": round((newest[3] - oldest[3]) / span, 2),
        }

    def history(self) -> list[dict[str, Any]]:
        """Per-second rates for the last minute, oldest first (for charts)."""
        out = []
        samples = list(self._samples)
        for before, after in itertools.pairwise(samples):
            span = max(after[0] - before[0], 1e-9)
            out.append(
                {
                    "t": round(time.time() - (samples[-1][0] - after[0]), 1),
                    "publications_in": round((after[1] - before[1]) / span, 2),
                    "deliveries": round((after[2] - before[2]) / span, 2),
                }
            )
        return out


# The loop-lag probe's period and its histogram's bucket bounds (seconds).
LAG_INTERVAL = 0.1
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# Only known methods get their own label, so clients cannot grow it.
_KNOWN_METHODS = METHODS | CENTRIFUGE_METHODS


class _Collector:
    def __init__(self, metrics: Metrics, node: Node) -> None:
        self._m = metrics
        self._node = node

    def collect(self) -> Iterator[Metric]:
        m = self._m
        node = self._node
        yield GaugeMetricFamily(
            "squall_connections", "Open client connections", value=len(node.sessions)
        )
        by_protocol: dict[str, int] = {}
        for session in node.sessions.values():
            name = session.codec.name
            by_protocol[name] = by_protocol.get(name, 0) + 1
        protocols = GaugeMetricFamily(
            "squall_protocol_connections",
            "Open client connections by protocol",
            labels=["protocol"],
        )
        for name, n in sorted(by_protocol.items()):
            protocols.add_metric([name], n)
        yield protocols
        yield GaugeMetricFamily(
            "squall_subscriptions", "Local subscriptions", value=node.hub.subscription_count
        )
        yield GaugeMetricFamily(
            "squall_channels", "Channels with local subscribers", value=node.hub.channel_count
        )
        yield GaugeMetricFamily("squall_draining", "1 while draining", value=int(node.draining))
        yield CounterMetricFamily(
            "squall_publications", "Publications accepted by this node", value=m.publications_in
        )
        yield CounterMetricFamily(
            "squall_deliveries", "Publications handed to local subscribers", value=m.deliveries
        )
        yield CounterMetricFamily(
            "squall_messages_out", "Messages written to clients", value=m.messages_out
        )
        yield CounterMetricFamily(
            "squall_connections_accepted", "Connections accepted", value=m.connections_accepted
        )
        yield CounterMetricFamily(
            "squall_connections_refused",
            "Connections refused (limit or draining)",
            value=m.connections_refused,
        )
        commands = CounterMetricFamily("squall_commands", "Client commands", labels=["method"])
        for method, n in sorted(m.commands.items()):
            commands.add_metric([method], n)
        yield commands
        errs = CounterMetricFamily("squall_command_errors", "Error replies", labels=["code"])
        for code, n in sorted(m.errors.items()):
            errs.add_metric([str(code)], n)
        yield errs
        disc = CounterMetricFamily("squall_disconnects", "Server disconnects", labels=["code"])
        for code, n in sorted(m.disconnects.items()):
            disc.add_metric([str(code)], n)
        yield disc
        rec = CounterMetricFamily("squall_recoveries", "Recovery attempts", labels=["recovered"])
        for ok, n in m.recoveries.items():
            rec.add_metric([str(ok).lower()], n)
        yield rec
        yield CounterMetricFamily("squall_searches", "Searches answered", value=m.searches)
        indexer = node.indexer
        yield CounterMetricFamily(
            "squall_search_indexed",
            "Publications indexed for search by this node",
            value=indexer.indexed if indexer else 0,
        )
        yield CounterMetricFamily(
            "squall_search_index_failures",
            "Failed indexing tries (search or store unavailable)",
            value=indexer.failures if indexer else 0,
        )
        api = CounterMetricFamily("squall_api_calls", "Server API calls", labels=["method"])
        for method, n in sorted(m.api_calls.items()):
            api.add_metric([method], n)
        yield api
        if node.proxy is not None:
            yield from _proxy_families(node.proxy.stats)
        yield from _health_families(m, node)


def _health_families(m: Metrics, node: Node) -> Iterator[Metric]:
    """What a soak test watches for leaks and stalls: loop lag, tasks, and
    what the sessions hold for their clients."""
    lag = HistogramMetricFamily(
        "squall_event_loop_lag_seconds", "How late the event loop ran a 100 ms timer"
    )
    cumulative, buckets = 0, []
    for bound, n in zip((*LAG_BUCKETS, float("inf")), m.lag_buckets, strict=True):
        cumulative += n
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
    lag.add_metric([], buckets, sum_value=m.lag_sum)
    yield lag
    yield GaugeMetricFamily(
        "squall_event_loop_lag_max_seconds",
        "The longest loop lag of the last minute",
        value=max(m.lag_recent, default=0.0),
    )
    yield GaugeMetricFamily(
        "squall_asyncio_tasks",
        "asyncio tasks alive in this process",
        value=len(asyncio.all_tasks()),
    )
    queued = longest = 0
    for session in node.sessions.values():
        queued += session.queued_bytes
        longest = max(longest, session.queued_messages)
    yield GaugeMetricFamily(
        "squall_send_queue_bytes", "Bytes queued for clients, not yet written", value=queued
    )
    yield GaugeMetricFamily(
        "squall_send_queue_messages_max",
        "The longest send queue of a connection, in messages",
        value=longest,
    )


def _proxy_families(stats: ProxyStats) -> Iterator[Metric]:
    requests = CounterMetricFamily(
        "squall_proxy_requests",
        "Proxy hook calls by outcome (ok, error, disconnect: the back end's answer; failed)",
        labels=["hook", "result"],
    )
    for (hook, result), n in sorted(stats.requests.items()):
        requests.add_metric([hook, result], n)
    yield requests
    failures = CounterMetricFamily(
        "squall_proxy_failures",
        "Failed proxy hook calls by reason (timeout, connection, status, response)",
        labels=["hook", "reason"],
    )
    for (hook, reason), n in sorted(stats.failures.items()):
        failures.add_metric([hook, reason], n)
    yield failures
    durations = HistogramMetricFamily(
        "squall_proxy_request_duration_seconds",
        "Proxy hook call durations",
        labels=["hook"],
    )
    for hook in sorted(stats.counts):
        durations.add_metric([hook], stats.histogram(hook), sum_value=stats.sums[hook])
    yield durations
