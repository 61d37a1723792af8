"""``walstore bench http|cluster``: walstore over HTTP against PostgreSQL 15 and etcd 3.4.

Each row runs one workload for the same whole number of seconds, at the same concurrency,
first against walstore and then against its peer, and prints both with the ratio
walstore / peer (``report.py``). The systems run one at a time, never side by side, so
neither steals the other's CPU; the load generator (wrk, pgbench) does share the machine's
cores with the server it measures, and the output says so.

Single node (``run_http_bench``; peer: PostgreSQL, see ``peers.py``):

- ``POST /events``: one event per request, a fresh aggregate each time, at 1, 16 and 64
  connections: events/s, p50, p99. PostgreSQL: one INSERT per transaction.
- ``POST /events/batch``: 100 events per request (events/s). PostgreSQL: a 100-row INSERT
  in one transaction.
- ``GET /events/{id}``: one of N pre-populated aggregates of 10 events, at random (req/s).
  PostgreSQL: SELECT of those 10 rows by aggregate_id.

3-node cluster (``run_cluster_bench``; peer: a 3-member etcd, JSON gateway, driven by wrk):
``POST /events`` at 1, 16, 64 connections and the batch row, against a 3-member etcd taking
300-byte puts (a 100-put txn for the batch row). Requests go to the leader on both sides.
walstore elects through a 1-member etcd that is off the data path (a lease keep-alive
every TTL/3) and is stopped before the etcd peer starts.

Everything runs under a fresh ``walstore-bench-*`` directory below ``base_dir`` (default:
the current directory, because /tmp is often tmpfs, where fsync is free); it is removed at
the end. Servers are started on ports the OS handed out and stopped by pid in ``finally``.
After its rows, each system is checked to hold at least as many events as it acknowledged,
so a fast but broken run cannot print a good ratio.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from walstore import launcher
from walstore.bench import peers
from walstore.bench.report import Measurement, Row, print_table
from walstore.bench.wal_bench import describe_filesystem
from walstore.client import ClientError, WalstoreClient
from walstore.election.etcd_process import EtcdCluster, free_ports
from walstore.errors import BenchError, ConfigError

Out = Callable[[str], object]

DEFAULT_SECONDS_PER_ROW = 8.0  # 18 rows of both benches at 8 s: ~3 minutes with start-ups
DEFAULT_CONNECTIONS = (1, 16, 64)
DEFAULT_BATCH_CONNECTIONS = 16
DEFAULT_READ_CONNECTIONS = 16
DEFAULT_READ_AGGREGATES = 1000
# Untimed load before a system's first row: the first segment, page cache and connection
# pools fill here instead of inside the c=1 row.
DEFAULT_WARMUP_SECONDS = 1
# Issue 3: single-event writes at 64 connections at least as fast as PostgreSQL.
SINGLE_NODE_TARGET = (64, 1.0)
# Issue 4: the cluster at least 1.5x etcd at 16 and 64 connections.
CLUSTER_TARGET_CONNECTIONS = (16, 64)
CLUSTER_TARGET_RATIO = 1.5

_SERVER_READY_TIMEOUT_S = 60.0
_SERVER_STOP_TIMEOUT_S = 10.0  # node.py gives in-flight requests 5 s after SIGTERM
_POLL_INTERVAL_S = 0.1
_POPULATE_BATCH = 100
_LOG_TAIL_BYTES = 3000


@dataclass(frozen=True, slots=True)
class Workload:
    kind: str  # "append" | "batch" | "read"
    connections: int
    items_per_op: int = 1

    @property
    def name(self) -> str:
        return {
            "append": "POST /events",
            "batch": f"POST /events/batch ({self.items_per_op})",
            "read": "GET /events/{id}",
        }[self.kind]

    @property
    def unit(self) -> str:
        return "req/s" if self.kind == "read" else "events/s"

    @property
    def writes(self) -> bool:
        return self.kind != "read"


# ------------------------------------------------------------------ walstore servers

# Args: MODE TAG N. append: one event, aggregate TAG-thread-counter. batch: N events, each
# its own aggregate. read: GET one of the aggregates read-1 .. read-N at random.
_WALSTORE_LUA = r"""
local headers = {["Content-Type"] = "application/json"}
local head = @HEAD@
local tail = @TAIL@

function init(args)
  mode = args[1]
  tag = args[2]
  n = tonumber(args[3])
  counter = 0
  math.randomseed(thread_no * 7919)
end

function request()
  counter = counter + 1
  if mode == "append" then
    return wrk.format("POST", "/events", headers, head .. tag .. "-" .. thread_no .. "-" .. counter .. tail)
  elseif mode == "batch" then
    local prefix = head .. tag .. "-" .. thread_no .. "-" .. counter .. "-"
    local events = {}
    for i = 1, n do
      events[i] = prefix .. i .. tail
    end
    return wrk.format("POST", "/events/batch", headers, '{"events":[' .. table.concat(events, ",") .. "]}")
  end
  return wrk.format("GET", "/events/read-" .. math.random(1, n))
end
"""


def walstore_script() -> str:
    head = f'{{"type":"{peers.EVENT_TYPE}","aggregate_id":"'
    tail = f'","payload":{peers.EVENT_PAYLOAD_JSON},"metadata":{peers.EVENT_METADATA_JSON}}}'
    return _WALSTORE_LUA.replace("@HEAD@", peers.lua_long_string(head)).replace("@TAIL@", peers.lua_long_string(tail))


def bench_event(aggregate_id: str) -> dict[str, Any]:
    return {
        "type": peers.EVENT_TYPE,
        "aggregate_id": aggregate_id,
        "payload": peers.EVENT_PAYLOAD,
        "metadata": peers.EVENT_METADATA,
    }


class WalstoreNodeProcess:
    """One ``walstore serve`` process on loopback ports chosen by the caller, started and
    stopped by the one launcher (``walstore.launcher``) as ``walstore cluster up`` starts its."""

    def __init__(self, node_id: str, base_dir: Path, http_port: int, peer_port: int) -> None:
        self.node_id = node_id
        self.data_dir = base_dir / node_id
        self.log_path = base_dir / f"{node_id}.log"
        self.http_port = http_port
        self.peer_port = peer_port
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{launcher.HOST}:{self.http_port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def spawn(
        self, argv: Sequence[str], peers_text: str, etcd_endpoints: Sequence[str], cluster_id: str | None
    ) -> None:
        """Start it without waiting; ``peers_text`` empty (and no etcd) for a single node."""
        env = launcher.node_env(
            node_id=self.node_id,
            http_port=self.http_port,
            peer_port=self.peer_port,
            peers=peers_text,
            data_dir=self.data_dir,
            cluster_id=cluster_id,
            etcd_endpoints=etcd_endpoints,
            # per-request INFO lines would cost the server CPU the benchmark is measuring
            overrides={"LOG_LEVEL": "WARNING"},
        )
        self._process = launcher.spawn_server(env, self.log_path, command=argv)

    def log_tail(self) -> str:
        """The end of this node's log, for a BenchError."""
        return launcher.log_tail(self.log_path, _LOG_TAIL_BYTES)

    def lost_port_race(self) -> bool:
        """It exited because another process took its port: the start is retried."""
        return not self.running and launcher.lost_port_race(self.log_path)

    def check_running(self) -> None:
        """BenchError with its exit code and log tail if it has exited."""
        if not self.running:
            code = None if self._process is None else self._process.returncode
            raise BenchError(f"walstore {self.node_id}", f"exited with code {code}", self.log_tail())

    def stop(self) -> None:
        """SIGTERM our process (by pid), SIGKILL if it outlives the grace period. Idempotent."""
        if self._process is not None:
            launcher.stop_process(self._process, _SERVER_STOP_TIMEOUT_S)
        self._process = None


class WalstoreServers:
    """A single node (``size`` 1, no etcd) or a cluster of ``size`` nodes electing through
    the etcd at ``etcd_endpoints``. ``start()`` returns once the leader has committed a
    probe write; ``leader_url`` is where the load goes."""

    def __init__(
        self,
        base_dir: Path,
        size: int = 1,
        *,
        etcd_endpoints: Sequence[str] = (),
        server_argv: Sequence[str] | None = None,
    ) -> None:
        if size > 1 and not etcd_endpoints:
            raise ConfigError("a walstore cluster needs etcd endpoints")
        self.base_dir = base_dir
        self.size = size
        self.etcd_endpoints = tuple(etcd_endpoints)
        self.argv = list(server_argv) if server_argv is not None else launcher.server_command()
        self.nodes: list[WalstoreNodeProcess] = []
        self.leader_url = ""

    def start(self) -> None:
        for attempt in range(1, peers.PORT_RACE_ATTEMPTS + 1):
            ports = free_ports(2 * self.size)
            self.nodes = [
                WalstoreNodeProcess(f"n{i + 1}", self.base_dir, ports[2 * i], ports[2 * i + 1])
                for i in range(self.size)
            ]
            try:
                self._spawn_all()
                self.leader_url = self._wait_leader()
                return
            except BenchError:
                raced = any(node.lost_port_race() for node in self.nodes)
                self.stop()
                if not raced or attempt == peers.PORT_RACE_ATTEMPTS:
                    raise
                for node in self.nodes:
                    shutil.rmtree(node.data_dir, ignore_errors=True)

    def _spawn_all(self) -> None:
        peers_text, cluster_id = "", None
        if self.size > 1:
            peers_text = ",".join(f"{n.node_id}={launcher.HOST}:{n.peer_port}" for n in self.nodes)
            # distinct per run: a leftover election key of an earlier run cannot matter
            cluster_id = f"bench-{uuid.uuid4().hex[:12]}"
        for node in self.nodes:
            node.spawn(self.argv, peers_text, self.etcd_endpoints, cluster_id)

    def _wait_leader(self) -> str:
        """Poll until some node says it leads, then until a write through it commits (the
        new leader serves writes once its EPOCH_START entry is committed)."""
        deadline = time.monotonic() + _SERVER_READY_TIMEOUT_S
        probe = bench_event(f"probe-{uuid.uuid4().hex}")
        while True:
            for node in self.nodes:
                node.check_running()
            leader = self._find_leader()
            if leader is not None:
                with WalstoreClient(leader.url, timeout_s=5.0) as client, contextlib.suppress(ClientError, OSError):
                    client.append(probe)
                    return leader.url
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {n.node_id}\n{n.log_tail()}" for n in self.nodes)
                raise BenchError("walstore", f"no leader accepting writes after {_SERVER_READY_TIMEOUT_S:.0f}s", tails)
            time.sleep(_POLL_INTERVAL_S)

    def _find_leader(self) -> WalstoreNodeProcess | None:
        for node in self.nodes:
            try:
                with WalstoreClient(node.url, timeout_s=1.0) as client:
                    if client.status().get("is_leader") is True:
                        return node
            except (ClientError, OSError, ValueError):
                continue
        return None

    def committed_events(self) -> int:
        with WalstoreClient(self.leader_url) as client:
            return int(client.status()["commit_index"])

    def populate_reads(self, aggregates: int) -> int:
        """Aggregates read-1 .. read-N of READ_EVENTS_PER_AGGREGATE events each; returns
        the number of events written."""
        per = peers.READ_EVENTS_PER_AGGREGATE
        events = [bench_event(f"read-{a}") for a in range(1, aggregates + 1) for _ in range(per)]
        with WalstoreClient(self.leader_url, timeout_s=30.0) as client:
            for start in range(0, len(events), _POPULATE_BATCH):
                client.append_batch(events[start : start + _POPULATE_BATCH])
        return len(events)

    def stop(self) -> None:
        # followers first: a leader stopping first would make them campaign meanwhile
        for node in sorted(self.nodes, key=lambda n: n.url == self.leader_url):
            node.stop()

    def __enter__(self) -> WalstoreServers:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------ running rows


def _tag(workload: Workload) -> str:
    # unique per row and run: aggregate ids (and etcd keys) never collide across rows
    return f"{workload.kind}{workload.connections}x{uuid.uuid4().hex[:8]}"


def _progress(out: Out, system: str, workload: Workload, m: Measurement) -> None:
    rate = m.items_per_s if workload.unit == "events/s" else m.ops_per_s
    p50 = "-" if m.p50_ms is None else f"{m.p50_ms:.2f}"
    p99 = "-" if m.p99_ms is None else f"{m.p99_ms:.2f}"
    out(
        f"  {system:<10} {workload.name:<26} c={workload.connections:<3} {rate:>10,.0f} {workload.unit:<8} "
        f"p50 {p50} ms  p99 {p99} ms  errors {m.errors}"
    )


def _acked_events(results: dict[Workload, Measurement]) -> int:
    return sum(m.ops_ok * m.items_per_op for w, m in results.items() if w.writes)


def _check_stored(system: str, stored: int, acked: int) -> None:
    if stored < acked:
        raise BenchError(system, f"acknowledged {acked} events but holds only {stored}")


def _measure_walstore(
    servers: WalstoreServers,
    workloads: Sequence[Workload],
    *,
    seconds: float,
    warmup_seconds: int,
    read_aggregates: int,
    work_dir: Path,
    out: Out,
) -> dict[Workload, Measurement]:
    script = walstore_script()
    acked = 1 + (servers.populate_reads(read_aggregates) if any(w.kind == "read" for w in workloads) else 0)
    if warmup_seconds > 0:
        warm = peers.run_wrk(
            servers.leader_url,
            script,
            connections=DEFAULT_BATCH_CONNECTIONS,
            seconds=warmup_seconds,
            work_dir=work_dir,
            args=["append", "warmup", "1"],
        )
        acked += warm.ops_ok
    results: dict[Workload, Measurement] = {}
    for w in workloads:
        n = read_aggregates if w.kind == "read" else w.items_per_op
        m = peers.run_wrk(
            servers.leader_url,
            script,
            connections=w.connections,
            seconds=seconds,
            work_dir=work_dir,
            args=[w.kind, _tag(w), str(n)],
            items_per_op=w.items_per_op,
        )
        _progress(out, "walstore", w, m)
        results[w] = m
    _check_stored("walstore", servers.committed_events(), acked + _acked_events(results))
    return results


def _measure_postgres(
    workloads: Sequence[Workload],
    *,
    seconds: float,
    warmup_seconds: int,
    read_aggregates: int,
    work_dir: Path,
    out: Out,
) -> tuple[dict[Workload, Measurement], str]:
    with peers.PostgresServer(work_dir, clients=max(w.connections for w in workloads)) as pg:
        version = pg.version()
        pg.psql(peers.EVENTS_DDL)
        acked = 0
        if any(w.kind == "read" for w in workloads):
            pg.psql(peers.pg_populate_reads_sql(read_aggregates))
            acked += read_aggregates * peers.READ_EVENTS_PER_AGGREGATE
        pgbench_dir = work_dir / "pgbench"
        if warmup_seconds > 0:
            warm = peers.run_pgbench(
                pg,
                peers.pg_insert_script(),
                connections=DEFAULT_BATCH_CONNECTIONS,
                seconds=warmup_seconds,
                work_dir=pgbench_dir,
            )
            acked += warm.ops_ok
        results: dict[Workload, Measurement] = {}
        for w in workloads:
            if w.kind == "append":
                script = peers.pg_insert_script()
            elif w.kind == "batch":
                script = peers.pg_batch_script(w.items_per_op)
            else:
                script = peers.pg_read_script(read_aggregates)
            m = peers.run_pgbench(
                pg,
                script,
                connections=w.connections,
                seconds=seconds,
                work_dir=pgbench_dir,
                items_per_op=w.items_per_op,
            )
            _progress(out, "postgres", w, m)
            results[w] = m
        stored = int(pg.psql("SELECT count(*) FROM events;").strip())
        _check_stored("postgres", stored, acked + _acked_events(results))
        return results, version


def _measure_etcd(
    workloads: Sequence[Workload], *, seconds: float, warmup_seconds: int, work_dir: Path, out: Out
) -> tuple[dict[Workload, Measurement], str]:
    cluster = peers.start_etcd_peer(work_dir / "etcd-peer")
    try:
        url = peers.etcd_leader_url(cluster)
        script = peers.etcd_put_script()
        acked = 0
        if warmup_seconds > 0:
            warm = peers.run_wrk(
                url,
                script,
                connections=DEFAULT_BATCH_CONNECTIONS,
                seconds=warmup_seconds,
                work_dir=work_dir,
                args=peers.etcd_put_args("warmup"),
            )
            acked += warm.ops_ok
        results: dict[Workload, Measurement] = {}
        for w in workloads:
            batch = w.items_per_op if w.kind == "batch" else 0
            m = peers.run_wrk(
                url,
                script,
                connections=w.connections,
                seconds=seconds,
                work_dir=work_dir,
                args=peers.etcd_put_args(_tag(w), batch),
                items_per_op=w.items_per_op,
            )
            _progress(out, "etcd", w, m)
            results[w] = m
        _check_stored("etcd", peers.etcd_count_keys(url, "bench/"), acked + _acked_events(results))
        return results, peers.etcd_version(url)
    finally:
        cluster.stop()


@contextlib.contextmanager
def _bench_dir(base_dir: Path | None) -> Iterator[Path]:
    base = Path(".") if base_dir is None else base_dir
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="walstore-bench-", dir=base)).resolve()
    # mkdtemp's 0700 would keep the postgres user out of its data directory's parent
    tmp.chmod(0o711)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _machine_notes(
    work: Path,
    seconds: float,
    tools: str,
    extra: Sequence[str],
    *,
    latency_source: str = "p50/p99 from wrk's latency histogram",
) -> list[str]:
    cores = os.cpu_count() or 0
    fs = describe_filesystem(work)
    notes = [
        f"machine: {cores} cores; the load generator ({tools}) runs on the same cores as the "
        "server it measures, so every number is a shared-CPU number",
        f"data on {fs}; {peers.whole_seconds(seconds)} s per row and system, one system running at a time",
        f"walstore: every append acknowledged after fdatasync (group commit); {latency_source}",
        *extra,
    ]
    if fs.startswith("tmpfs"):
        notes.append("WARNING: tmpfs makes fsync free; pass a directory on a real disk")
    return notes


def _rows(
    section: str,
    workloads: Sequence[Workload],
    ours: dict[Workload, Measurement],
    theirs: dict[Workload, Measurement],
    peer_name: str,
    describe_peer: Callable[[Workload], str],
    target: Callable[[Workload], float | None],
) -> list[Row]:
    return [
        Row(
            section=section,
            workload=w.name,
            connections=w.connections,
            unit=w.unit,
            walstore=ours[w],
            peer_name=peer_name,
            peer_workload=describe_peer(w),
            peer=theirs[w],
            target_ratio=target(w),
        )
        for w in workloads
    ]


def _single_node_workloads(
    connections: Sequence[int], batch_connections: int, read_connections: int, batch_events: int
) -> list[Workload]:
    return [
        *(Workload("append", c) for c in connections),
        Workload("batch", batch_connections, batch_events),
        Workload("read", read_connections),
    ]


def _check_args(connections: Sequence[int], batch_events: int, seconds_per_row: float) -> None:
    if not connections or any(c < 1 for c in connections):
        raise ConfigError(f"connections must be positive, got {list(connections)}")
    if not 1 <= batch_events <= peers.ETCD_MAX_TXN_OPS:
        raise ConfigError(f"batch size must be 1..{peers.ETCD_MAX_TXN_OPS}, got {batch_events}")
    if seconds_per_row <= 0:
        raise ConfigError(f"seconds per row must be positive, got {seconds_per_row}")


def run_http_bench(
    seconds_per_row: float = DEFAULT_SECONDS_PER_ROW,
    out: Out = print,
    *,
    base_dir: Path | None = None,
    connections: Sequence[int] = DEFAULT_CONNECTIONS,
    batch_connections: int = DEFAULT_BATCH_CONNECTIONS,
    read_connections: int = DEFAULT_READ_CONNECTIONS,
    read_aggregates: int = DEFAULT_READ_AGGREGATES,
    batch_events: int = peers.BATCH_EVENTS,
    warmup_seconds: int = DEFAULT_WARMUP_SECONDS,
    server_argv: Sequence[str] | None = None,
) -> list[Row]:
    """Single-node walstore vs PostgreSQL 15: prints progress and the table, returns the rows."""
    _check_args([*connections, batch_connections, read_connections], batch_events, seconds_per_row)
    if read_aggregates < 1:
        raise ConfigError(f"read aggregates must be positive, got {read_aggregates}")
    for tool in ("wrk",):
        peers.find_tool(tool)
    for tool in ("initdb", "postgres", "pg_isready", "psql", "pgbench"):
        peers.find_postgres_tool(tool)
    workloads = _single_node_workloads(connections, batch_connections, read_connections, batch_events)
    with _bench_dir(base_dir) as work:
        secs = peers.whole_seconds(seconds_per_row)
        out(f"walstore bench http: single node vs PostgreSQL, {secs} s per row, in {work}")
        with WalstoreServers(work / "walstore", 1, server_argv=server_argv) as servers:
            ours = _measure_walstore(
                servers,
                workloads,
                seconds=seconds_per_row,
                warmup_seconds=warmup_seconds,
                read_aggregates=read_aggregates,
                work_dir=work / "wrk",
                out=out,
            )
        theirs, version = _measure_postgres(
            workloads,
            seconds=seconds_per_row,
            warmup_seconds=warmup_seconds,
            read_aggregates=read_aggregates,
            work_dir=work,
            out=out,
        )
        notes = _machine_notes(
            work,
            seconds_per_row,
            "wrk for walstore, pgbench for PostgreSQL, up to 2 threads",
            [
                f"PostgreSQL {version}: fsync=on, synchronous_commit=on; pgbench -M prepared, "
                "-j 2; p50/p99 nearest-rank over pgbench's per-transaction log (-l); tps excludes connection set-up",
                f"reads: {read_aggregates} aggregates of {peers.READ_EVENTS_PER_AGGREGATE} events, one at random "
                "per request",
            ],
        )

    def describe(w: Workload) -> str:
        return {
            "append": "INSERT of 1 event per transaction (payload bound as a parameter; unique "
            "(aggregate_id, version) and unique id)",
            "batch": f"INSERT of {w.items_per_op} rows in one transaction (from one jsonb array parameter)",
            "read": f"SELECT of the {peers.READ_EVENTS_PER_AGGREGATE} rows of one aggregate by aggregate_id",
        }[w.kind]

    def target(w: Workload) -> float | None:
        conns, ratio = SINGLE_NODE_TARGET
        return ratio if w.writes and w.connections == conns else None

    rows = _rows("single node", workloads, ours, theirs, "PostgreSQL", describe, target)
    print_table("walstore (1 node) vs PostgreSQL 15", rows, notes, out)
    return rows


def run_cluster_bench(
    seconds_per_row: float = DEFAULT_SECONDS_PER_ROW,
    out: Out = print,
    *,
    base_dir: Path | None = None,
    connections: Sequence[int] = DEFAULT_CONNECTIONS,
    batch_connections: int = DEFAULT_BATCH_CONNECTIONS,
    batch_events: int = peers.BATCH_EVENTS,
    warmup_seconds: int = DEFAULT_WARMUP_SECONDS,
    server_argv: Sequence[str] | None = None,
) -> list[Row]:
    """A 3-node walstore cluster vs a 3-member etcd (JSON gateway, 300-byte puts)."""
    _check_args([*connections, batch_connections], batch_events, seconds_per_row)
    peers.find_tool("wrk")
    from walstore.election.etcd_process import find_etcd_binary

    find_etcd_binary()
    workloads = [*(Workload("append", c) for c in connections), Workload("batch", batch_connections, batch_events)]
    with _bench_dir(base_dir) as work:
        secs = peers.whole_seconds(seconds_per_row)
        out(f"walstore bench cluster: 3 nodes vs a 3-member etcd, {secs} s per row, in {work}")
        election = EtcdCluster(work / "election-etcd", 1, name_prefix="election")
        try:
            election.start()
            with WalstoreServers(
                work / "walstore", 3, etcd_endpoints=election.endpoints, server_argv=server_argv
            ) as servers:
                ours = _measure_walstore(
                    servers,
                    workloads,
                    seconds=seconds_per_row,
                    warmup_seconds=warmup_seconds,
                    read_aggregates=0,
                    work_dir=work / "wrk",
                    out=out,
                )
        finally:
            election.stop()
        theirs, version = _measure_etcd(
            workloads, seconds=seconds_per_row, warmup_seconds=warmup_seconds, work_dir=work, out=out
        )
        notes = _machine_notes(
            work,
            seconds_per_row,
            "wrk for both, up to 2 threads",
            [
                "walstore: 3 processes on this machine, one data directory each on the same disk; a majority "
                "(2 of 3) fdatasyncs before the 201; load sent to the leader; it elects through a 1-member etcd "
                "(a lease keep-alive, off the data path), stopped before etcd's own rows",
                f"etcd {version}: 3 members on this machine, default timings (100 ms heartbeat, 1 s election), "
                "load sent to the raft leader's JSON gateway; keys unique per request",
            ],
        )

    def describe(w: Workload) -> str:
        if w.kind == "batch":
            return f"a txn of {w.items_per_op} puts of {peers.ETCD_VALUE_BYTES} B (POST /v3/kv/txn)"
        return f"a put of {peers.ETCD_VALUE_BYTES} B (POST /v3/kv/put)"

    def target(w: Workload) -> float | None:
        return CLUSTER_TARGET_RATIO if w.connections in CLUSTER_TARGET_CONNECTIONS else None

    rows = _rows("3-node cluster", workloads, ours, theirs, "etcd", describe, target)
    print_table("walstore (3 nodes) vs etcd 3.4 (3 members)", rows, notes, out)
    return rows


def run_all_benches(
    seconds_per_row: float = DEFAULT_SECONDS_PER_ROW, out: Out = print, *, base_dir: Path | None = None
) -> list[Row]:
    """Both tables, one after the other (``walstore bench all`` adds the WAL bench)."""
    rows = run_http_bench(seconds_per_row, out, base_dir=base_dir)
    return rows + run_cluster_bench(seconds_per_row, out, base_dir=base_dir)
