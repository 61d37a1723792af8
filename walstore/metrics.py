"""The node's Prometheus metrics, in one registry per node.

Each ``Metrics`` owns its own ``CollectorRegistry`` instead of using the process-global
default, because tests (and ``walstore cluster``) run several nodes in one process and each
must expose only its own numbers. Every metric name starts with ``walstore_``. The parts of
the node update the attributes directly (``metrics.commit_index.set(n)``); ``/metrics``
serves ``render()``.

Who updates what: the WAL writer the ``wal_*`` metrics, the leader/follower the commit,
apply and replication metrics, the election the leadership metrics, the peer transport
``peer_connections_rejected_total``, and ``http/`` only ``http_request_seconds``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# fdatasync takes ~50 us on tmpfs, 0.2-2 ms on NVMe, 5-20 ms on network disks and seconds
# when a disk misbehaves: the buckets span all of those.
FSYNC_SECONDS_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Group commit folds every pending append into one fsync; powers of two up to the batch cap.
FSYNC_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
# An append is one fsync plus a replication round trip (ms); reads are sub-ms; min_index
# waits and 503s after timeouts take seconds.
HTTP_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Every metric walstore exports, registered in ``self.registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.events_appended_total = Counter(
            "walstore_events_appended_total", "Events appended to the log by this node.", registry=r
        )
        self.wal_bytes_written_total = Counter(
            "walstore_wal_bytes_written_total", "Bytes written to WAL segments.", registry=r
        )
        self.wal_size_bytes = Gauge("walstore_wal_size_bytes", "Bytes held in WAL segments.", registry=r)
        self.wal_fsync_seconds = Histogram(
            "walstore_wal_fsync_seconds",
            "Duration of one WAL write + fdatasync.",
            buckets=FSYNC_SECONDS_BUCKETS,
            registry=r,
        )
        self.wal_fsync_batch_events = Histogram(
            "walstore_wal_fsync_batch_events",
            "Entries made durable by one fdatasync (group commit size).",
            buckets=FSYNC_BATCH_BUCKETS,
            registry=r,
        )
        # What the disk is doing wrong right now, for alerts: a full disk is not an error in
        # any request's log line (the node answers 503 and carries on), so say it here.
        self.wal_disk_full = Gauge(
            "walstore_disk_full",
            "1 while the last WAL write failed for space (ENOSPC) and none has succeeded since.",
            registry=r,
        )
        self.wal_write_errors_total = Counter(
            "walstore_wal_write_errors_total",
            "WAL rounds that failed, by kind (disk_full, fsync, other).",
            labelnames=("kind",),
            registry=r,
        )
        self.wal_slow_rounds_total = Counter(
            "walstore_wal_slow_rounds_total",
            "WAL rounds (write + fdatasync) slower than the node's slow-disk threshold.",
            registry=r,
        )
        self.wal_round_in_flight_seconds = Gauge(
            "walstore_wal_round_in_flight_seconds",
            "Age of the WAL round being written and synced now (0 when none): a stuck fsync "
            "shows here before it shows in walstore_wal_fsync_seconds, which counts it only once it returns.",
            registry=r,
        )
        self.http_request_seconds = Histogram(
            "walstore_http_request_seconds",
            "HTTP request handling time by route template and status code.",
            labelnames=("route", "status"),
            buckets=HTTP_SECONDS_BUCKETS,
            registry=r,
        )
        self.commit_index = Gauge("walstore_commit_index", "Highest index durable on a majority.", registry=r)
        self.last_applied = Gauge("walstore_last_applied", "Highest index applied to the state machine.", registry=r)
        self.is_leader = Gauge("walstore_is_leader", "1 while this node leads, else 0.", registry=r)
        self.term = Gauge("walstore_term", "Current epoch (the etcd create_revision of the leader).", registry=r)
        self.replication_lag_entries = Gauge(
            "walstore_replication_lag_entries",
            "Entries a follower is behind the leader's log.",
            labelnames=("peer",),
            registry=r,
        )
        self.replication_match_index = Gauge(
            "walstore_replication_match_index",
            "Highest index a follower has acknowledged as durable.",
            labelnames=("peer",),
            registry=r,
        )
        self.elections_total = Counter("walstore_elections_total", "Elections this node has won.", registry=r)
        self.step_downs_total = Counter("walstore_step_downs_total", "Times this node stopped leading.", registry=r)
        self.peer_connections_rejected_total = Counter(
            "walstore_peer_connections_rejected_total",
            "Peer connections closed at the handshake or on a protocol error, by reason.",
            labelnames=("reason",),
            registry=r,
        )
        self.voter = Gauge(
            "walstore_voter",
            "1 while this node's data directory is recorded as a voter, 0 while it is a learner.",
            registry=r,
        )
        self.learner_promotions_total = Counter(
            "walstore_learner_promotions_total",
            "Learners this node, as leader, promoted to voters after they caught up.",
            registry=r,
        )
        self.safety_halted = Gauge(
            "walstore_safety_halted",
            "1 once this node refused to break a safety invariant (e.g. truncate committed entries) "
            "and stopped taking writes.",
            registry=r,
        )
        self.known_commit_index = Gauge(
            "walstore_known_commit_index",
            "Highest log index recorded in meta.json as committed: never truncated.",
            registry=r,
        )
        # labels() takes a lock and builds a tuple on every call; the HTTP hot path calls
        # it once per request, so the children are cached by (route, status).
        self._http_children: dict[tuple[str, int], Histogram] = {}

    def observe_http(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        child = self._http_children.get(key)
        if child is None:
            child = self.http_request_seconds.labels(route=route, status=str(status))
            self._http_children[key] = child
        child.observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition of this node's registry."""
        return generate_latest(self.registry)
