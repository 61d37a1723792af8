"""walstore.metrics: one registry per node, every metric named as others import it."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from walstore.metrics import Metrics

EXPECTED = {
    "walstore_events_appended": "counter",
    "walstore_wal_bytes_written": "counter",
    "walstore_wal_size_bytes": "gauge",
    "walstore_wal_fsync_seconds": "histogram",
    "walstore_wal_fsync_batch_events": "histogram",
    "walstore_http_request_seconds": "histogram",
    "walstore_commit_index": "gauge",
    "walstore_last_applied": "gauge",
    "walstore_is_leader": "gauge",
    "walstore_term": "gauge",
    "walstore_replication_lag_entries": "gauge",
    "walstore_replication_match_index": "gauge",
    "walstore_elections": "counter",
    "walstore_step_downs": "counter",
    "walstore_peer_connections_rejected": "counter",
}


def families(metrics: Metrics) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(metrics.render().decode())}


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return None


def test_every_metric_is_exported_with_its_type() -> None:
    exported = families(Metrics())
    for name, kind in EXPECTED.items():
        assert exported.get(name) == kind, name


def test_each_node_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.events_appended_total.inc(3)
    first.commit_index.set(42)
    assert sample(first, "walstore_events_appended_total") == 3
    assert sample(second, "walstore_events_appended_total") == 0
    assert sample(second, "walstore_commit_index") == 0


def test_labelled_metrics() -> None:
    metrics = Metrics()
    metrics.replication_lag_entries.labels(peer="node-1").set(7)
    metrics.replication_match_index.labels(peer="node-1").set(93)
    metrics.peer_connections_rejected_total.labels(reason="cluster_id").inc()
    assert sample(metrics, "walstore_replication_lag_entries", peer="node-1") == 7
    assert sample(metrics, "walstore_replication_match_index", peer="node-1") == 93
    assert sample(metrics, "walstore_peer_connections_rejected_total", reason="cluster_id") == 1


@pytest.mark.parametrize("seconds", [0.0001, 0.3, 60.0])
def test_observe_http_counts_by_route_and_status(seconds: float) -> None:
    metrics = Metrics()
    for _ in range(2):
        metrics.observe_http("/events", 201, seconds)
    metrics.observe_http("/events", 409, seconds)
    labels = {"route": "/events", "status": "201"}
    assert sample(metrics, "walstore_http_request_seconds_count", **labels) == 2
    assert sample(metrics, "walstore_http_request_seconds_sum", **labels) == pytest.approx(2 * seconds)
    assert sample(metrics, "walstore_http_request_seconds_count", route="/events", status="409") == 1
    assert sample(metrics, "walstore_http_request_seconds_bucket", le="+Inf", **labels) == 2


def test_fsync_histograms() -> None:
    metrics = Metrics()
    metrics.wal_fsync_seconds.observe(0.003)
    metrics.wal_fsync_batch_events.observe(17)
    assert sample(metrics, "walstore_wal_fsync_seconds_bucket", le="0.005") == 1
    assert sample(metrics, "walstore_wal_fsync_seconds_bucket", le="0.002") == 0
    assert sample(metrics, "walstore_wal_fsync_batch_events_bucket", le="32.0") == 1
    assert sample(metrics, "walstore_wal_fsync_batch_events_bucket", le="16.0") == 0
