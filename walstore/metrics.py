"""The node's Prometheus metrics, in one registry per node.

Each ``Metrics`` owns its own ``CollectorRegistry`` instead of using the process-global
default, because tests (and ``walstore cluster``) run several nodes in one process and each
must expose only its own numbers. Every metric name starts with ``walstore_`` (besides the
standard ``process_``, ``python_`` collectors); the README's "Metrics" section lists them.

Two kinds of metric, kept apart on purpose:

- **Events** (counters, histograms, a few gauges of the disk): the part of the node where
  a thing happens counts it (``metrics.wal_fsync_seconds.observe(...)``). The WAL writer
  updates the ``wal_*`` metrics, the replicator the election counters and the append
  times behind ``walstore_replication_lag_seconds``, the peer transport
  ``peer_connections_rejected_total``, ``http/`` only ``http_request_seconds``.
- **State** (term, role, leader, commit and applied index, per-follower progress) is not
  pushed by anyone: ``state_families(status)`` derives it at scrape time from the same
  ``NodeStatus`` that ``/status`` answers. Pushed state went wrong in three ways: no
  follower ever set ``walstore_term``, commit and applied were set in different index
  spaces, and an ex-leader kept its per-follower series forever. Derived from one status,
  ``/metrics`` and ``/status`` agree by construction, and a series exists exactly while
  the state it describes does.

Index spaces: ``walstore_commit_index`` and ``walstore_last_applied`` are *event* indexes
(the API's ``index``, as in ``/status``); the ``walstore_log_*`` gauges are WAL *log*
indexes, which also count the EPOCH_START entry of every term. Never subtract one space
from the other.

``render`` may run in a worker thread (``/metrics`` renders off the event loop): every
prometheus_client metric takes a lock per child, the state families are an immutable
snapshot built on the loop, and the callback gauges read plain attributes or stat files.
"""

from __future__ import annotations

import os
import platform
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from walstore import __version__
from walstore.service import NodeStatus

# fdatasync takes ~50 us on tmpfs, 0.2-2 ms on NVMe, 5-20 ms on network disks and seconds
# when a disk misbehaves: the buckets span all of those.
FSYNC_SECONDS_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Group commit folds every pending append into one fsync; powers of two up to the batch cap.
FSYNC_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
# An append is one fsync plus a replication round trip (ms); reads are sub-ms; min_index
# waits and 503s after timeouts take seconds.
HTTP_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# The roles /status can report; walstore_role has one series per role so that a role a
# node is *not* in reads 0 rather than vanishing (a state set, as kube-state-metrics does).
ROLES = ("leader", "candidate", "follower", "stopped")

# Lag in seconds is the age of the oldest entry a follower lacks. The leader remembers the
# first batch appended in each window of this length: the lag is then overstated by less
# than one window, and one sample per window bounds the memory under any write rate.
APPEND_SAMPLE_WINDOW_S = 0.05
# 10 minutes of continuous writes (~1 MiB). A follower further behind than that reports
# the oldest sample's age, a lower bound, which is already far past any alert threshold.
APPEND_SAMPLES_MAX = 12_000


class AppendTimes:
    """When this leader appended its recent entries, for ``walstore_replication_lag_seconds``.

    Entries are appended in index order, so the entry after a follower's match index was
    appended at or after the last sample at or below it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._first_indexes: deque[int] = deque(maxlen=APPEND_SAMPLES_MAX)
        self._times: deque[float] = deque(maxlen=APPEND_SAMPLES_MAX)

    def clear(self) -> None:
        """A new term: the indexes of an older term of ours may have been replaced."""
        self._first_indexes.clear()
        self._times.clear()

    def appended(self, first_index: int) -> None:
        now = self._clock()
        if self._times and now - self._times[-1] < APPEND_SAMPLE_WINDOW_S:
            return
        self._first_indexes.append(first_index)
        self._times.append(now)

    def seconds_behind(self, match_index: int, tail_index: int) -> float:
        """How long the oldest entry a follower lacks has been in this leader's log."""
        if match_index >= tail_index or not self._times:
            return 0.0
        # Entries before the first sample (an older term's, or older than the samples kept)
        # are at least as old as it: the first sample's age is a lower bound for them.
        j = max(0, bisect_right(self._first_indexes, match_index + 1) - 1)
        return max(0.0, self._clock() - self._times[j])


def allocated_bytes(directory: Path) -> int:
    """Bytes the file system has allocated to the files in ``directory`` (st_blocks x 512):
    pre-allocated segments count in full, which is what fills a disk."""
    total = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0  # not created yet, or gone: nothing of ours is on that disk
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_blocks * 512
        except OSError:
            continue  # removed between the listing and the stat
    return total


class _Exposition(Collector):
    """The registry's families followed by a snapshot of state families, as one collector
    ``generate_latest`` can render (the snapshot is never registered, so two scrapes in
    flight never share or clear each other's series)."""

    def __init__(self, registry: CollectorRegistry, state: Sequence[Metric]) -> None:
        self._registry = registry
        self._state = state

    def collect(self) -> Iterable[Metric]:
        yield from self._registry.collect()
        yield from self._state


class Metrics:
    """Every metric walstore exports, registered in ``self.registry``."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        standard_collectors: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        if standard_collectors:
            # Per registry, so each node of a multi-node test process shows them once.
            # They describe the process, which all such nodes share.
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        self.build_info = Gauge(
            "walstore_build_info",
            "Always 1; the labels say which walstore and Python this node runs.",
            labelnames=("version", "python"),
            registry=r,
        )
        self.build_info.labels(version=__version__, python=platform.python_version()).set(1)
        self.events_appended_total = Counter(
            "walstore_events_appended_total",
            "Client events this node, as leader, submitted to its log (counted when submitted).",
            registry=r,
        )
        self.wal_entries_written_total = Counter(
            "walstore_wal_entries_written_total",
            "WAL entries (events, EPOCH_START and every other record) written and fdatasynced "
            "by this node, as leader or follower.",
            registry=r,
        )
        self.wal_bytes_written_total = Counter(
            "walstore_wal_bytes_written_total", "Bytes written to WAL segments.", registry=r
        )
        self.wal_logical_bytes = Gauge(
            "walstore_wal_logical_bytes",
            "Bytes of records held in the WAL segments (segment headers and pre-allocated space excluded).",
            registry=r,
        )
        self.wal_allocated_bytes = Gauge(
            "walstore_wal_allocated_bytes",
            "Bytes the file system has allocated to the WAL directory's files (st_blocks x 512; "
            "pre-allocated segments count in full): what the WAL takes of the disk.",
            registry=r,
        )
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
        self.elections_total = Counter(
            "walstore_elections_total",
            "Leadership epochs this node has seen begin (each is an election someone won); counted on every node.",
            registry=r,
        )
        self.elections_won_total = Counter(
            "walstore_elections_won_total", "Elections this node won (it then takes over).", registry=r
        )
        self.leader_changes_total = Counter(
            "walstore_leader_changes_total",
            "Times the leader this node sees became another node (the first leader seen counts, "
            "as in etcd's leader_changes_seen); counted on every node.",
            registry=r,
        )
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
        self.append_times = AppendTimes(clock)
        self._last_epoch_seen = 0
        self._last_leader_seen: str | None = None
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

    def leader_observed(self, node_id: str | None, epoch: int) -> None:
        """The election says ``node_id`` leads ``epoch`` (None: nobody leads now)."""
        if node_id is None:
            return
        if epoch > self._last_epoch_seen:
            self._last_epoch_seen = epoch
            self.elections_total.inc()
        if node_id != self._last_leader_seen:
            self._last_leader_seen = node_id
            self.leader_changes_total.inc()

    def track_wal_directory(self, directory: Path) -> None:
        """Report ``walstore_wal_allocated_bytes`` for ``directory``, measured at each scrape."""
        self.wal_allocated_bytes.set_function(lambda: float(allocated_bytes(directory)))

    def state_families(self, status: NodeStatus) -> list[Metric]:
        """The state gauges for one ``/status`` answer. Call it on the event loop (it reads
        the leader's append times); render the result anywhere."""
        extra = status.extra

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        families: list[Metric] = [
            gauge("walstore_term", "Current leadership epoch, as /status term (on every node).", status.term),
            gauge(
                "walstore_is_leader",
                "1 while this node leads and takes writes (/status is_leader).",
                status.is_leader,
            ),
            gauge("walstore_ready", "1 while /health/ready answers 200.", status.ready),
            gauge(
                "walstore_commit_index",
                "Highest event index committed and applied here (/status commit_index; event-index space).",
                status.commit_index,
            ),
            gauge(
                "walstore_last_applied",
                "Highest event index applied to this node's store (/status last_applied; event-index space).",
                status.last_applied,
            ),
            gauge(
                "walstore_log_commit_index",
                "Highest WAL log index known committed (/status log_commit_index; log-index space).",
                _int(extra, "log_commit_index"),
            ),
            gauge(
                "walstore_log_last_applied",
                "Highest WAL log index applied (/status log_last_applied; log-index space).",
                _int(extra, "log_last_applied"),
            ),
            gauge(
                "walstore_log_durable_index",
                "Highest WAL log index fdatasynced on this node (/status log_durable_index; log-index space).",
                _int(extra, "log_durable_index"),
            ),
            gauge(
                "walstore_known_commit_index",
                "Highest WAL log index recorded in meta.json as committed, never truncated "
                "(/status known_commit_index; log-index space).",
                _int(extra, "known_commit_index"),
            ),
        ]
        role = GaugeMetricFamily(
            "walstore_role", "1 for the role this node is in (/status role), 0 for the others.", labels=("role",)
        )
        for name in ROLES if status.role in ROLES else (*ROLES, status.role):
            role.add_metric((name,), 1.0 if name == status.role else 0.0)
        families.append(role)
        leader = GaugeMetricFamily(
            "walstore_leader_info",
            'The leader this node sees (/status leader_id): 1 with its id, or 0 with leader="" when none.',
            labels=("leader",),
        )
        leader.add_metric((status.leader_id or "",), 1.0 if status.leader_id else 0.0)
        families.append(leader)
        families.extend(self._peer_families(status))
        return families

    def _peer_families(self, status: NodeStatus) -> Iterator[Metric]:
        # Only a leader lists peers: on any other node these families have no series at all.
        match = GaugeMetricFamily(
            "walstore_replication_match_index",
            "Leader only: highest log index a follower has acknowledged as durable.",
            labels=("peer",),
        )
        lag = GaugeMetricFamily(
            "walstore_replication_lag_entries",
            "Leader only: log entries a follower is behind the leader's log.",
            labels=("peer",),
        )
        lag_s = GaugeMetricFamily(
            "walstore_replication_lag_seconds",
            "Leader only: how long the oldest entry a follower lacks has been in the leader's log (0 when caught up).",
            labels=("peer",),
        )
        connected = GaugeMetricFamily(
            "walstore_replication_peer_connected",
            "Leader only: 1 while the leader's stream to a follower is connected.",
            labels=("peer",),
        )
        for peer in status.peers:
            connected.add_metric((peer.id,), float(peer.connected))
            if peer.lag < 0:
                continue  # never heard from in this term: no progress to report
            match.add_metric((peer.id,), peer.match_index)
            lag.add_metric((peer.id,), peer.lag)
            behind_s = self.append_times.seconds_behind(peer.match_index, peer.match_index + peer.lag)
            lag_s.add_metric((peer.id,), behind_s)
        yield from (match, lag, lag_s, connected)

    def render(self, state: Sequence[Metric] = ()) -> bytes:
        """The Prometheus text exposition of this node's registry, followed by ``state``
        (from ``state_families``). Safe to call from a worker thread."""
        return generate_latest(_Exposition(self.registry, state))


def _int(extra: dict[str, object], key: str) -> int:
    value = extra.get(key)
    return value if isinstance(value, int) else 0
