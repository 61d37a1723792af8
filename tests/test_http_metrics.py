"""walstore.metrics: one registry per node, every metric named as others import it, state
derived from the node's status, lag in entries and seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import walstore
from walstore.metrics import APPEND_SAMPLE_WINDOW_S, ROLES, AppendTimes, Metrics, allocated_bytes
from walstore.service import NodeStatus, PeerStatus

EXPECTED = {
    "walstore_build_info": "gauge",
    "walstore_events_appended": "counter",
    "walstore_wal_entries_written": "counter",
    "walstore_wal_bytes_written": "counter",
    "walstore_wal_logical_bytes": "gauge",
    "walstore_wal_allocated_bytes": "gauge",
    "walstore_wal_fsync_seconds": "histogram",
    "walstore_wal_fsync_batch_events": "histogram",
    "walstore_http_request_seconds": "histogram",
    "walstore_elections": "counter",
    "walstore_elections_won": "counter",
    "walstore_leader_changes": "counter",
    "walstore_step_downs": "counter",
    "walstore_peer_connections_rejected": "counter",
    # state, from the status
    "walstore_term": "gauge",
    "walstore_is_leader": "gauge",
    "walstore_ready": "gauge",
    "walstore_role": "gauge",
    "walstore_leader_info": "gauge",
    "walstore_commit_index": "gauge",
    "walstore_last_applied": "gauge",
    "walstore_log_commit_index": "gauge",
    "walstore_log_last_applied": "gauge",
    "walstore_log_durable_index": "gauge",
    "walstore_known_commit_index": "gauge",
    "walstore_replication_match_index": "gauge",
    "walstore_replication_lag_entries": "gauge",
    "walstore_replication_lag_seconds": "gauge",
    "walstore_replication_peer_connected": "gauge",
    # the standard collectors
    "process_cpu_seconds": "counter",
    "process_resident_memory_bytes": "gauge",
    "python_info": "gauge",
    "python_gc_collections": "counter",
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def status(**overrides: object) -> NodeStatus:
    fields: dict[str, object] = {
        "id": "n1",
        "is_leader": False,
        "leader_id": "n0",
        "term": 7,
        "commit_index": 40,
        "last_applied": 41,
        "role": "follower",
        "extra": {"log_commit_index": 43, "log_last_applied": 44, "log_durable_index": 45, "known_commit_index": 42},
    }
    fields.update(overrides)
    return NodeStatus(**fields)  # type: ignore[arg-type]


def leader_status(peers: list[PeerStatus]) -> NodeStatus:
    return status(id="n0", is_leader=True, leader_id="n0", role="leader", peers=peers)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(metrics: Metrics, node_status: NodeStatus | None = None) -> Samples:
    state = metrics.state_families(node_status) if node_status is not None else []
    text = metrics.render(state).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): float(s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(metrics: Metrics, name: str, node_status: NodeStatus | None = None, /, **labels: str) -> float | None:
    return scrape(metrics, node_status).get((name, tuple(sorted(labels.items()))))


def test_every_metric_is_exported_with_its_type() -> None:
    metrics = Metrics()
    peers = [PeerStatus(id="n1", address="a:1", connected=True, match_index=3, lag=0)]
    text = metrics.render(metrics.state_families(leader_status(peers))).decode()
    exported = {f.name: f.type for f in text_string_to_metric_families(text)}
    for name, kind in EXPECTED.items():
        assert exported.get(name) == kind, name


def test_each_node_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.events_appended_total.inc(3)
    assert sample(first, "walstore_events_appended_total") == 3
    assert sample(second, "walstore_events_appended_total") == 0


def test_build_info_names_the_version() -> None:
    samples = scrape(Metrics())
    (info,) = [labels for name, labels in samples if name == "walstore_build_info"]
    assert dict(info)["version"] == walstore.__version__
    assert samples[("walstore_build_info", info)] == 1


def test_a_follower_reports_its_term_role_and_leader() -> None:
    """walstore_term used to be set only by a leader: a follower showed 0 forever."""
    metrics = Metrics()
    follower = status()
    assert sample(metrics, "walstore_term", follower) == 7
    assert sample(metrics, "walstore_is_leader", follower) == 0
    for role in ROLES:
        assert sample(metrics, "walstore_role", follower, role=role) == (1 if role == "follower" else 0), role
    assert sample(metrics, "walstore_leader_info", follower, leader="n0") == 1
    nobody = status(leader_id=None, role="candidate")
    assert sample(metrics, "walstore_leader_info", nobody, leader="") == 0
    assert sample(metrics, "walstore_role", nobody, role="candidate") == 1
    assert sample(metrics, "walstore_role", status(role="odd"), role="odd") == 1


def test_commit_and_applied_are_in_one_space_each() -> None:
    """Event-index gauges are /status's commit_index and last_applied; log-index gauges
    have log_ in their names. Before, commit was a log index and applied an event index."""
    metrics = Metrics()
    samples = scrape(metrics, status())
    assert samples[("walstore_commit_index", ())] == 40
    assert samples[("walstore_last_applied", ())] == 41
    assert samples[("walstore_log_commit_index", ())] == 43
    assert samples[("walstore_log_last_applied", ())] == 44
    assert samples[("walstore_log_durable_index", ())] == 45
    assert samples[("walstore_known_commit_index", ())] == 42


def test_per_follower_series_exist_only_while_leading() -> None:
    metrics = Metrics()
    peers = [
        PeerStatus(id="n1", address="a:1", connected=True, match_index=93, lag=7),
        PeerStatus(id="n2", address="a:2", connected=False, match_index=0, lag=-1),  # never heard from
    ]
    leading = scrape(metrics, leader_status(peers))
    assert leading[("walstore_replication_match_index", (("peer", "n1"),))] == 93
    assert leading[("walstore_replication_lag_entries", (("peer", "n1"),))] == 7
    assert leading[("walstore_replication_peer_connected", (("peer", "n1"),))] == 1
    assert leading[("walstore_replication_peer_connected", (("peer", "n2"),))] == 0
    assert ("walstore_replication_match_index", (("peer", "n2"),)) not in leading
    after = scrape(metrics, status())  # the same registry, once it follows
    assert not [key for key in after if key[0].startswith("walstore_replication_")]


def test_lag_seconds_is_the_age_of_the_oldest_entry_a_follower_lacks() -> None:
    clock = FakeClock()
    times = AppendTimes(clock)
    times.appended(1)  # EPOCH_START at t=100
    clock.now += 1.0
    times.appended(2)  # entries 2.. at t=101
    clock.now += APPEND_SAMPLE_WINDOW_S / 2
    times.appended(5)  # the same window: not sampled; its age reads as the window's first
    clock.now += 2.0
    times.appended(9)  # at ~103
    clock.now = 110.0
    assert times.seconds_behind(match_index=12, tail_index=12) == 0  # caught up
    assert times.seconds_behind(match_index=0, tail_index=12) == pytest.approx(10.0)  # lacks 1
    assert times.seconds_behind(match_index=1, tail_index=12) == pytest.approx(9.0)  # lacks 2
    assert times.seconds_behind(match_index=5, tail_index=12) == pytest.approx(9.0)  # lacks 6 (sampled at 2)
    sampled_at = 103.0 + APPEND_SAMPLE_WINDOW_S / 2
    assert times.seconds_behind(match_index=8, tail_index=12) == pytest.approx(110.0 - sampled_at)  # lacks 9
    times.clear()
    assert times.seconds_behind(match_index=0, tail_index=12) == 0  # a new term, nothing appended yet


def test_lag_seconds_on_the_leader_follows_its_append_times() -> None:
    clock = FakeClock()
    metrics = Metrics(clock=clock)
    metrics.append_times.appended(11)
    clock.now += 4.0
    peers = [
        PeerStatus(id="n1", address="a:1", connected=True, match_index=10, lag=3),
        PeerStatus(id="n2", address="a:2", connected=True, match_index=13, lag=0),
    ]
    samples = scrape(metrics, leader_status(peers))
    assert samples[("walstore_replication_lag_seconds", (("peer", "n1"),))] == pytest.approx(4.0)
    assert samples[("walstore_replication_lag_seconds", (("peer", "n2"),))] == 0


def test_elections_and_leader_changes_are_counted_as_seen() -> None:
    metrics = Metrics()
    for node_id, epoch in [("n0", 5), ("n0", 5), (None, 0), ("n0", 9), ("n1", 12), (None, 0), ("n1", 12)]:
        metrics.leader_observed(node_id, epoch)
    assert sample(metrics, "walstore_elections_total") == 3  # epochs 5, 9, 12
    assert sample(metrics, "walstore_leader_changes_total") == 2  # n0 (the first seen), then n1
    assert sample(metrics, "walstore_elections_won_total") == 0


def test_allocated_bytes_counts_preallocated_space(tmp_path: Path) -> None:
    segment = tmp_path / "00000000000000000001.wal"
    with segment.open("wb") as f:
        f.write(b"x" * 100)
        os.posix_fallocate(f.fileno(), 0, 1 << 20)
    (tmp_path / "meta.json").write_text("{}")
    metrics = Metrics()
    metrics.track_wal_directory(tmp_path)
    allocated = sample(metrics, "walstore_wal_allocated_bytes")
    assert allocated is not None and allocated >= 1 << 20
    assert allocated == allocated_bytes(tmp_path)
    assert allocated_bytes(tmp_path / "missing") == 0


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


def test_labelled_counters() -> None:
    metrics = Metrics()
    metrics.peer_connections_rejected_total.labels(reason="cluster_id").inc()
    assert sample(metrics, "walstore_peer_connections_rejected_total", reason="cluster_id") == 1


def test_fsync_histograms() -> None:
    metrics = Metrics()
    metrics.wal_fsync_seconds.observe(0.003)
    metrics.wal_fsync_batch_events.observe(17)
    assert sample(metrics, "walstore_wal_fsync_seconds_bucket", le="0.005") == 1
    assert sample(metrics, "walstore_wal_fsync_seconds_bucket", le="0.002") == 0
    assert sample(metrics, "walstore_wal_fsync_batch_events_bucket", le="32.0") == 1
    assert sample(metrics, "walstore_wal_fsync_batch_events_bucket", le="16.0") == 0


def test_the_readme_lists_every_metric() -> None:
    """The README's Metrics table is the reference: a metric added without a row fails here."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("`")[1] for line in section.splitlines() if line.startswith("| `walstore_")}
    metrics = Metrics()
    peers = [PeerStatus(id="n1", address="a:1", connected=True, match_index=3, lag=0)]
    text = metrics.render(metrics.state_families(leader_status(peers))).decode()
    exported = {
        f.name + ("_total" if f.type == "counter" else "")
        for f in text_string_to_metric_families(text)
        if f.name.startswith("walstore_") and not f.name.endswith("_created")  # a counter's start time
    }
    assert exported == rows
