"""Counters for ``/metrics`` (Prometheus) and the ``/status`` snapshot.

The hot path bumps plain integers; they are read into Prometheus families
only when scraped, so a delivery costs no lock and no label lookup.
"""

from __future__ import annotations

import asyncio
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
        self._sampler = asyncio.get_running_loop().create_task(self._sample_forever())

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with suppress(asyncio.CancelledError):
                await self._sampler

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
