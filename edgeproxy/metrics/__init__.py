"""Metrics: per-worker counters in a shared memory region (`region`) and
their sum across workers, as Prometheus text and as the status JSON
(`exposition`)."""

from edgeproxy.metrics.exposition import Snapshot, Totals, render_prometheus
from edgeproxy.metrics.region import MetricsRegion, WorkerSlot, route_labels

__all__ = ["MetricsRegion", "WorkerSlot", "route_labels", "Snapshot", "Totals",
           "render_prometheus"]
