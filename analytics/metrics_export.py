"""Prometheus metrics of the central service, from the counters the components keep.

A collector reads :meth:`IngestWorker.stats` (and the upkeep's) at scrape time, so
nothing is counted twice and the hot path does no extra work. Served at ``/metrics`` by
the API when ingest runs in-process (the demo), and by ``civicmesh ingest run
--metrics-port`` for a stand-alone worker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

StatsProvider = Callable[[], dict[str, Any]]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# stats key -> (metric name without the civicmesh_ingest_ prefix, help)
_COUNTERS = {
    "received": ("received", "Messages received from the broker"),
    "verified": ("verified", "Messages whose gateway and device signatures verified"),
    "written_batches": ("written_batches", "Batches newly written to the store"),
    "written_readings": ("written_readings", "Readings newly written to the store"),
    "duplicates": ("duplicates", "Batches the store held already (redeliveries, replays)"),
    "conflicts": ("conflicts", "Batches whose (device, seq) was stored with another hash"),
    "quarantined": ("quarantined", "Quarantine records written"),
    "acked": ("acked", "Messages acknowledged to the broker after commit"),
    "store_errors": ("store_errors", "Failed store writes (retried)"),
}


class IngestCollector(Collector):
    def __init__(self, provider: StatsProvider) -> None:
        self.provider = provider

    def collect(self) -> Iterator[Metric]:
        stats = self.provider()
        worker = str(stats.get("worker_id", ""))
        for key, (name, text) in _COUNTERS.items():
            family = CounterMetricFamily(f"civicmesh_ingest_{name}", text, labels=["worker"])
            family.add_metric([worker], float(stats.get(key, 0)))
            yield family
        by_reason = CounterMetricFamily(
            "civicmesh_ingest_quarantined_by_reason",
            "Quarantine records by reason",
            labels=["worker", "reason"],
        )
        for reason, count in sorted(stats.get("quarantined_by_reason", {}).items()):
            by_reason.add_metric([worker, reason], float(count))
        yield by_reason
        lag = stats.get("last_lag_ms")
        gauge = GaugeMetricFamily(
            "civicmesh_ingest_lag_seconds",
            "Gateway receive time to store write, of the newest written group",
            labels=["worker"],
        )
        if lag is not None:
            gauge.add_metric([worker], lag / 1000)
        yield gauge
        queued = GaugeMetricFamily(
            "civicmesh_ingest_queued_messages", "Received, not yet written", labels=["worker"]
        )
        queued.add_metric([worker], float(stats.get("queued", 0)))
        yield queued
        ok = GaugeMetricFamily(
            "civicmesh_ingest_store_up", "1 while the store accepts writes", labels=["worker"]
        )
        ok.add_metric([worker], 1.0 if stats.get("store_ok", True) else 0.0)
        yield ok


def metrics_registry(provider: StatsProvider) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(IngestCollector(provider))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
