"""Real-process walstore clusters for fault tests: start, kill, pause, restart and partition
``walstore serve`` processes and the etcd they elect through.

Layout under the test's ``base_dir``::

    etcd/               the etcd members (``walstore.election.etcd_process``)
    nodes/<id>/wal/     each node's DATA_DIR
    nodes/<id>.log      each node's stdout and stderr, appended on every (re)start

Every port comes from the OS (bind port 0, close, hand it over); a node that loses the race
for its port exits with "address already in use" and the whole start is retried with fresh
ports. Only processes this module started are ever signalled, through their own ``Popen``
handles (by pid), and ``stop_all()`` runs every step even when one fails.

Partitions: with ``proxied=True`` every ordered pair of nodes (A, B) gets its own
``FaultProxy`` listening on a fresh port and forwarding to B's peer port, and node A's PEERS
names that proxy as B's address. Each node gets its own PEERS string, so A->B can be cut
while C->B still works. Peer connections are used one way round (the dialler sends
requests, the other side answers on the same connection), so the A->B link carries
everything A asks of B; cutting both A->B and B->A separates the two completely.

How a node is configured, started, waited for and stopped is the one launcher,
``walstore.launcher``, shared with ``walstore cluster up`` and the benchmarks; this module
adds what only tests need (proxies, pauses, crash accounting, log reading).

Blocking (subprocess, threads): from a trio test, call it via ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson
import pytest

from walstore import launcher
from walstore.config import ENV_VARS
from walstore.election.etcd_process import EtcdCluster, free_ports, reap_child
from walstore.errors import ConfigError, StorageError, ValidationError

from .proxy import FaultProxy

HOST = launcher.HOST
PORT_RACE_ATTEMPTS = 4
# Python start-up, WAL recovery and an etcd session on a loaded 2-core machine.
START_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 30.0
# A node finishes its in-flight batch on SIGTERM (SHUTDOWN_GRACE_S is 5 s); then SIGKILL.
STOP_TIMEOUT_S = 8.0
STATUS_TIMEOUT_S = 1.0
POLL_INTERVAL_S = 0.05
# 4 MiB instead of 64: a node pre-allocates its first segment at start-up, and tests start
# many nodes; small segments also make the rotation paths run in short tests.
TEST_SEGMENT_SIZE_BYTES = 4 * 1024 * 1024
READ_PAGE_EVENTS = 10_000  # the server's MAX_READ_LIMIT
LOG_TAIL_BYTES = 4000


@dataclass
class NodeProcess:
    node_id: str
    http_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    paused: bool = False
    starts: int = 0
    # True from our start until we stop or kill it: an exit in between is a crash.
    expected_running: bool = False

    @property
    def running(self) -> bool:
        """Started by us and not exited (a paused node is running)."""
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def exit_code(self) -> int | None:
        """None while running (or never started); negative: killed by that signal."""
        return self.process.poll() if self.process is not None else None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    def log_tail(self, n_bytes: int = LOG_TAIL_BYTES) -> str:
        return launcher.log_tail(self.log_path, n_bytes)

    def lost_port_race(self) -> bool:
        return not self.running and launcher.lost_port_race(self.log_path)


class ProcessCluster:
    """``n`` walstore nodes (ids ``n0``...), with ``etcd_members`` etcd servers when n > 1.

    ``with ProcessCluster(tmp_path, n=3) as cluster:`` starts everything and waits for a
    leader; ``env_overrides`` (same for every node) win over the harness's settings."""

    def __init__(
        self,
        base_dir: Path,
        n: int = 3,
        etcd_members: int = 1,
        *,
        proxied: bool = False,
        lease_ttl_s: float = 2.0,
        env_overrides: dict[str, str] | None = None,
        cluster_id: str | None = None,
        log_level: str = "INFO",
        command_prefixes: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        if not 1 <= n <= 15:
            raise ConfigError(f"a cluster has 1 to 15 nodes, got {n}")
        if n > 1 and etcd_members < 1:
            raise ConfigError("a cluster of more than one node needs etcd")
        unknown = set(env_overrides or {}) - set(ENV_VARS)
        if unknown:
            raise ConfigError(f"env_overrides names variables walstore does not read: {sorted(unknown)}")
        self.base_dir = Path(base_dir)
        self.n = n
        self.etcd_members = etcd_members if n > 1 else 0
        self.proxied = proxied and n > 1
        self.lease_ttl_s = lease_ttl_s
        self.env_overrides = dict(env_overrides or {})
        # Unique per cluster: a stray node of another test can never join this one.
        self.cluster_id = cluster_id or f"test-{uuid.uuid4().hex[:12]}"
        self.log_level = log_level
        # node id -> argv put before ``python -m walstore serve`` (e.g. ``env LD_PRELOAD=...``
        # for libfaketime). It must exec the node, not fork it: the pid we signal is its pid.
        # Read at every (re)start, so a test may change it between restarts.
        self.command_prefixes = {k: list(v) for k, v in (command_prefixes or {}).items()}
        self.etcd: EtcdCluster | None = None
        self.nodes: dict[str, NodeProcess] = {}
        self.links: dict[tuple[str, str], FaultProxy] = {}
        self.ids = [f"n{i}" for i in range(n)]
        strangers = sorted(set(self.command_prefixes) - set(self.ids))
        if strangers:
            raise ConfigError(f"command_prefixes names nodes this cluster does not have: {strangers}")

    # -- life cycle ---------------------------------------------------------------------------

    def start(self, *, wait_ready: bool = True, timeout_s: float = READY_TIMEOUT_S) -> ProcessCluster:
        """Start etcd, the proxies and every node; by default wait for a leader."""
        if self.nodes:
            raise ConfigError("cluster already started; use start_node() or restart()")
        try:
            if self.etcd_members:
                self.etcd = EtcdCluster(self.base_dir / "etcd", self.etcd_members)
                self.etcd.start()
            for attempt in range(1, PORT_RACE_ATTEMPTS + 1):
                self._plan_nodes()
                for node in self.nodes.values():
                    self._spawn(node)
                try:
                    for node in self.nodes.values():
                        self._wait_http(node, START_TIMEOUT_S)
                    break
                except TimeoutError:
                    raced = any(node.lost_port_race() for node in self.nodes.values())
                    if not raced or attempt == PORT_RACE_ATTEMPTS:
                        raise
                    self._stop_nodes()
            if wait_ready:
                self.wait_ready(timeout_s)
        except BaseException:
            self.stop_all()
            raise
        return self

    def _plan_nodes(self) -> None:
        ports = free_ports(2 * self.n, HOST)
        self.nodes = {}
        for i, node_id in enumerate(self.ids):
            node_dir = self.base_dir / "nodes"
            self.nodes[node_id] = NodeProcess(
                node_id,
                http_port=ports[2 * i],
                peer_port=ports[2 * i + 1],
                data_dir=node_dir / node_id / "wal",
                log_path=node_dir / f"{node_id}.log",
            )
        if self.proxied:
            for a, b in itertools.permutations(self.ids, 2):
                target = (HOST, self.nodes[b].peer_port)
                link = self.links.get((a, b))
                if link is None:
                    self.links[(a, b)] = FaultProxy(target, name=f"link {a}->{b}").start()
                else:
                    link.retarget(target)  # a retried start: same proxy, the node's new port
        for node in self.nodes.values():
            node.env = self._env_for(node)

    def _peers_for(self, node_id: str) -> str:
        if self.n == 1:
            return ""
        parts = []
        for other in self.ids:
            if other != node_id and self.proxied:
                parts.append(f"{other}={HOST}:{self.links[(node_id, other)].port}")
            else:
                parts.append(f"{other}={HOST}:{self.nodes[other].peer_port}")
        return ",".join(parts)

    def _env_for(self, node: NodeProcess) -> dict[str, str]:
        # The launcher drops the caller's walstore settings: they must not leak into a test node.
        return launcher.node_env(
            node_id=node.node_id,
            http_port=node.http_port,
            peer_port=node.peer_port,
            peers=self._peers_for(node.node_id),
            data_dir=node.data_dir,
            cluster_id=self.cluster_id,
            etcd_endpoints=self.etcd.endpoints if self.etcd is not None else (),
            lease_ttl_s=self.lease_ttl_s,
            overrides={
                "SEGMENT_SIZE_BYTES": str(TEST_SEGMENT_SIZE_BYTES),
                "LOG_LEVEL": self.log_level,
                **self.env_overrides,
            },
        )

    def _spawn(self, node: NodeProcess) -> None:
        if node.running:
            raise ConfigError(f"{node.node_id} is already running (pid {node.pid})")
        node.data_dir.parent.mkdir(parents=True, exist_ok=True)
        node.starts += 1
        node.process = launcher.spawn_server(
            node.env,
            node.log_path,
            prefix=self.command_prefixes.get(node.node_id, ()),
            banner=f"=== harness: start #{node.starts} of {node.node_id} ===",
        )
        node.paused = False
        node.expected_running = True

    def _wait_http(self, node: NodeProcess, timeout_s: float) -> None:
        """Until the node answers /health/live. TimeoutError if it exits or takes too long."""
        launcher.wait_live(
            node.http_port,
            lambda: node.running,
            timeout_s,
            lambda: f"{node.node_id}, exit code {node.exit_code}; log tail:\n{node.log_tail()}",
        )

    def stop_all(self) -> None:
        """Stop every node, proxy and etcd member this cluster started. Runs every step and
        raises the first failure afterwards."""
        errors: list[BaseException] = []
        for step in (self._stop_nodes, self._stop_proxies, self._stop_etcd):
            try:
                step()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def _stop_nodes(self) -> None:
        for node in self.nodes.values():
            node.expected_running = False
        launcher.stop_processes([n.process for n in self.nodes.values() if n.process is not None], STOP_TIMEOUT_S)
        for node in self.nodes.values():
            node.paused = False

    def _stop_proxies(self) -> None:
        for link in self.links.values():
            link.stop()

    def _stop_etcd(self) -> None:
        if self.etcd is not None:
            self.etcd.stop()

    def __enter__(self) -> ProcessCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()

    # -- one node -----------------------------------------------------------------------------

    def node(self, node_id: str) -> NodeProcess:
        try:
            return self.nodes[node_id]
        except KeyError:
            raise ConfigError(f"no node {node_id!r} in this cluster ({', '.join(self.ids)})") from None

    def url(self, node_id: str) -> str:
        return self.node(node_id).url

    def urls(self, *, live_only: bool = False) -> dict[str, str]:
        """node id -> base URL (the shape ``harness.history`` takes)."""
        return {i: n.url for i, n in self.nodes.items() if not live_only or (n.running and not n.paused)}

    def data_dir(self, node_id: str) -> Path:
        return self.node(node_id).data_dir

    def pid(self, node_id: str) -> int | None:
        return self.node(node_id).pid

    def live_ids(self) -> list[str]:
        """Nodes that run and are not paused."""
        return [i for i, n in self.nodes.items() if n.running and not n.paused]

    def crashed(self) -> list[str]:
        """Nodes that exited although nobody here stopped or killed them."""
        return [i for i, n in self.nodes.items() if n.expected_running and not n.running]

    def check_no_crashes(self) -> None:
        """AssertionError naming every crashed node with its exit code and log tail. Every
        wait and ``final_logs`` call it: a crashed node must fail the test, not silently
        drop out of the set of live nodes that is checked."""
        crashed = [self.nodes[i] for i in self.crashed()]
        if crashed:
            details = "\n".join(f"----- {n.node_id} exited with {n.exit_code}:\n{n.log_tail()}" for n in crashed)
            raise AssertionError(f"walstore node(s) {[n.node_id for n in crashed]} crashed:\n{details}")

    def kill(self, node_id: str, sig: int = signal.SIGKILL, *, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Send ``sig`` to the node's process (ours, by pid). For SIGKILL/SIGTERM/SIGINT, wait
        until it has exited (SIGKILL after ``timeout_s`` for the polite ones)."""
        node = self.node(node_id)
        if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
            node.expected_running = False
        if not node.running:
            return
        self._signal(node, sig)
        if sig in (signal.SIGSTOP, signal.SIGCONT):
            node.paused = sig == signal.SIGSTOP
        elif sig in (signal.SIGTERM, signal.SIGINT):
            if node.paused:
                self._signal(node, signal.SIGCONT)
            self._reap(node, timeout_s)
        elif sig == signal.SIGKILL:
            self._reap(node, timeout_s)

    def stop(self, node_id: str) -> None:
        """Graceful: SIGTERM, wait, SIGKILL after the timeout."""
        self.kill(node_id, signal.SIGTERM)

    def pause(self, node_id: str) -> None:
        """SIGSTOP: sockets stay open, nothing answers (a GC pause or a hung VM)."""
        node = self.node(node_id)
        self._signal(node, signal.SIGSTOP)
        node.paused = True

    def resume(self, node_id: str) -> None:
        node = self.node(node_id)
        self._signal(node, signal.SIGCONT)
        node.paused = False

    def start_node(self, node_id: str, *, wait_http: bool = True, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start a stopped node again with its old ports, data directory and settings."""
        node = self.node(node_id)
        self._spawn(node)
        if wait_http:
            self._wait_http(node, timeout_s)

    def restart(self, node_id: str, sig: int = signal.SIGKILL, *, wait_http: bool = True) -> None:
        """Kill (by default: a crash) and start again."""
        self.kill(node_id, sig)
        self.start_node(node_id, wait_http=wait_http)

    def _signal(self, node: NodeProcess, sig: int) -> None:
        if node.process is not None and node.process.poll() is None:
            node.process.send_signal(sig)

    def _reap(self, node: NodeProcess, timeout_s: float) -> None:
        if node.process is not None:
            reap_child(node.process, timeout_s)
        node.paused = False

    # -- etcd ---------------------------------------------------------------------------------

    def _etcd(self) -> EtcdCluster:
        if self.etcd is None:
            raise ConfigError("this cluster runs without etcd")
        return self.etcd

    def kill_etcd(self, index: int) -> None:
        self._etcd().kill_member(index)

    def stop_etcd(self, index: int) -> None:
        self._etcd().stop_member(index)

    def start_etcd(self, index: int, *, wait: bool = True) -> None:
        self._etcd().start_member(index, wait=wait)

    def pause_etcd(self, index: int) -> None:
        self._etcd().pause_member(index)

    def resume_etcd(self, index: int) -> None:
        self._etcd().resume_member(index)

    # -- partitions ---------------------------------------------------------------------------

    def link(self, a: str, b: str) -> FaultProxy:
        """The proxy that carries what ``a`` sends to ``b`` (and ``b``'s answers)."""
        if not self.proxied:
            raise ConfigError("start the cluster with proxied=True to get links")
        try:
            return self.links[(a, b)]
        except KeyError:
            raise ConfigError(f"no link {a}->{b}") from None

    def partition(self, *groups: Collection[str]) -> None:
        """Cut (blackhole) every link between nodes of different groups; links inside a
        group and nodes in no group are left as they are."""
        group_of = {node_id: g for g, members in enumerate(groups) for node_id in members}
        for (a, b), proxy in self.links.items():
            if a in group_of and b in group_of and group_of[a] != group_of[b]:
                proxy.blackhole()

    def isolate(self, node_id: str) -> None:
        self.partition([node_id], [i for i in self.ids if i != node_id])

    def heal(self) -> None:
        for proxy in self.links.values():
            proxy.heal()

    # -- state --------------------------------------------------------------------------------

    def status(self, node_id: str) -> dict[str, Any] | None:
        """The node's /status, or None if it does not answer within a second."""
        answer = launcher.http_answer(self.node(node_id).http_port, "/status", STATUS_TIMEOUT_S)
        if answer is None or answer[0] != 200 or not isinstance(answer[1], dict):
            return None
        return answer[1]

    def leader(self) -> str | None:
        """The id of the live node that says it leads (the highest term if several do)."""
        leaders = [s for s in (self.status(i) for i in self.live_ids()) if s is not None and s.get("is_leader")]
        if not leaders:
            return None
        return str(max(leaders, key=lambda s: int(s.get("term") or 0))["id"])

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S, nodes: Iterable[str] | None = None) -> str:
        """Until one leader is known to every live node (or ``nodes``) and each says it is
        ready; returns the leader's id. TimeoutError shows the last statuses."""
        deadline = time.monotonic() + timeout_s
        statuses: dict[str, dict[str, Any] | None] = {}
        while True:
            self.check_no_crashes()
            chosen = list(nodes) if nodes is not None else self.live_ids()
            statuses = {i: self.status(i) for i in chosen}
            leaders = {str(s["id"]) for s in statuses.values() if s is not None and s.get("is_leader")}
            if chosen and len(leaders) == 1:
                (leader,) = leaders
                if all(s is not None and s.get("ready") and s.get("leader_id") == leader for s in statuses.values()):
                    return leader
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster not ready within {timeout_s}s: {statuses}")
            time.sleep(POLL_INTERVAL_S)

    def wait_caught_up(self, timeout_s: float = READY_TIMEOUT_S, nodes: Iterable[str] | None = None) -> int:
        """Until every live node (or ``nodes``) has applied the leader's commit index (call it
        once the load has stopped); returns that index."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.check_no_crashes()
            leader = self.leader()
            chosen = list(nodes) if nodes is not None else self.live_ids()
            target = self.status(leader) if leader is not None else None
            if target is not None:
                commit = int(target.get("commit_index") or 0)
                applied = {i: (s or {}).get("last_applied") for i, s in ((i, self.status(i)) for i in chosen)}
                if all(isinstance(a, int) and a >= commit for a in applied.values()):
                    return commit
            if time.monotonic() > deadline:
                states = {i: self.status(i) for i in chosen}
                raise TimeoutError(f"nodes not caught up within {timeout_s}s (leader {leader}): {states}")
            time.sleep(POLL_INTERVAL_S)

    def read_log(self, node_id: str, *, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """The node's whole applied log via ``GET /events``, page by page."""
        port = self.node(node_id).http_port
        events: list[dict[str, Any]] = []
        next_index = 1
        while True:
            answer = launcher.http_answer(port, f"/events?from_index={next_index}&limit={READ_PAGE_EVENTS}", timeout_s)
            if answer is None or answer[0] != 200 or not isinstance(answer[1], dict):
                raise TimeoutError(f"{node_id}: GET /events from {next_index} failed: {answer}")
            page = answer[1].get("events")
            if not isinstance(page, list):
                raise ValidationError(f"{node_id}: GET /events answered without events: {str(answer[1])[:200]}")
            if not page:
                return events
            events.extend(page)
            next_index = int(answer[1].get("next_index") or next_index + len(page))

    def final_logs(self, nodes: Iterable[str] | None = None) -> dict[str, list[dict[str, Any]]]:
        """node id -> whole log, for every live node (or ``nodes``): ``checker.check``'s input."""
        self.check_no_crashes()
        chosen = list(nodes) if nodes is not None else self.live_ids()
        return {node_id: self.read_log(node_id) for node_id in chosen}

    def dump_log(self, node_id: str) -> list[dict[str, Any]]:
        """The node's WAL records as ``walstore wal dump DIR --json`` prints them (read-only;
        safest on a stopped node). ``events_from_dump`` turns them into checker events."""
        directory = self.data_dir(node_id)
        result = subprocess.run(
            [sys.executable, "-m", "walstore", "wal", "dump", str(directory), "--json"],
            capture_output=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            stderr = result.stderr.decode(errors="replace")[-LOG_TAIL_BYTES:]
            raise StorageError(f"wal dump of {directory} exited {result.returncode}: {stderr}")
        return [orjson.loads(line) for line in result.stdout.splitlines() if line.strip()]

    def log_tails(self, n_bytes: int = LOG_TAIL_BYTES) -> str:
        parts = []
        for node in self.nodes.values():
            state = "running" if node.running else f"exited {node.exit_code}"
            parts.append(f"----- {node.node_id} (pid {node.pid}, {state}) {node.log_path}\n{node.log_tail(n_bytes)}")
        if self.etcd is not None:
            parts.extend(f"----- {m.name} {m.log_path}\n{m.log_tail()}" for m in self.etcd.members)
        return "\n".join(parts)


def events_from_dump(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """EVENT records of ``wal dump --json`` as API-shaped events. The API's event index
    counts events only (system records such as EPOCH_START take log indexes but no event
    index), so it is recomputed here in log order."""
    events: list[dict[str, Any]] = []
    for record in records:
        if record.get("kind") != "EVENT":
            continue
        body = record.get("event")
        if not isinstance(body, dict):
            raise StorageError(f"log index {record.get('index')}: EVENT record without a readable body: {record}")
        events.append(
            {
                "id": body["id"],
                "type": body["type"],
                "aggregate_id": body["aggregate_id"],
                "version": body["version"],
                "payload": body["payload"],
                "metadata": body["metadata"],
                "index": len(events) + 1,
                "log_index": record["index"],
                "epoch": record["epoch"],
            }
        )
    return events


# -- pytest fixtures (``pytest_plugins = ["harness.cluster"]`` in a test module) -------------------


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator[Callable[..., ProcessCluster]]:
    """``cluster_factory(n=3, etcd_members=1, proxied=False, ...)`` -> a started cluster,
    stopped at teardown. Node and etcd log tails are printed at teardown, so pytest shows
    them with a failing test."""
    clusters: list[ProcessCluster] = []

    def make(**kwargs: Any) -> ProcessCluster:
        cluster = ProcessCluster(tmp_path / f"cluster{len(clusters)}", **kwargs)
        clusters.append(cluster)
        return cluster.start()

    try:
        yield make
    finally:
        errors = stop_clusters(clusters)
        if errors:
            raise errors[0]


def stop_clusters(clusters: list[ProcessCluster]) -> list[BaseException]:
    """Teardown for fixtures: print each cluster's log tails (pytest shows them with a
    failing test) and stop every cluster, collecting errors instead of stopping early."""
    errors: list[BaseException] = []
    for cluster in clusters:
        print(cluster.log_tails())
        try:
            cluster.stop_all()
        except Exception as exc:  # stop the other clusters first, then report it
            errors.append(exc)
    return errors


@pytest.fixture
def process_cluster(cluster_factory: Callable[..., ProcessCluster]) -> ProcessCluster:
    """Three nodes and one etcd, a leader elected."""
    return cluster_factory()
