"""``walstore cluster up|ps|stop|kill|start|restart --dir DIR``: a local cluster and its
description, DIR/cluster.json.

``LocalCluster`` runs one etcd (Debian's ``etcd`` from PATH, unless ``--etcd-endpoints``
names an existing one) and N nodes on free loopback ports, and writes down every process
it started. Each process is started, waited for and stopped by the one launcher,
``walstore.launcher`` (nodes) and ``walstore.election.etcd_process`` (etcd); this module
decides which processes a cluster has, where they live, and what cluster.json says.

Layout of ``DIR``::

    cluster.json      every process this cluster started: pid and start time, ports, URLs
    cluster.lock      flock for read-modify-write of cluster.json (up and start both write)
    etcd/             etcd0.etcd (its data) and etcd0.log
    node-<i>/wal/     each node's DATA_DIR
    node-<i>.log      each node's stdout and stderr, appended on every start

Only processes this cluster started are ever signalled, by pid, and only after checking
that the pid still names that process (``launcher.ProcessRecord``: its start time must be
the one recorded when it was started). A pid reused by another program is left alone.

``cluster up`` supervises: a node that exits is reported and the others keep running, so
a failover can be watched; ``cluster start NODE`` brings it back on its old ports (the
others' PEERS name them), and ``up`` notices. A second ``cluster up`` on the same DIR
resumes it: the same data directories, new ports for the nodes; etcd restarts on its
recorded ports because a member keeps its peer address in its data directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from walstore.config import ENV_VARS
from walstore.election.etcd_process import (
    DEFAULT_ELECTION_TIMEOUT_MS,
    DEFAULT_HEARTBEAT_MS,
    EtcdCluster,
    EtcdMember,
    find_etcd_binary,
    free_ports,
)
from walstore.errors import ConfigError, ElectionError
from walstore.launcher import (
    HOST,
    READY_TIMEOUT_S,
    STOP_TIMEOUT_S,
    LaunchError,
    ProcessRecord,
    http_answer,
    lost_port_race,
    node_env,
    running,
    spawn_server,
    stop_process,
    stop_processes,
    wait_live,
)

SUPERVISE_INTERVAL_S = 0.2
PORT_RACE_ATTEMPTS = 4
DESCRIPTION_VERSION = 1
# The node ids `cluster up` gives, in order.
NODE_PREFIX = "node-"


class ClusterError(LaunchError):
    """A ``walstore cluster`` request that cannot be done, saying why (one line)."""


class ClusterDescriptionError(ClusterError):
    """DIR/cluster.json is missing, unreadable, or describes another shape of cluster."""


# -- DIR/cluster.json ------------------------------------------------------------------------


def description_path(directory: Path) -> Path:
    """Where the cluster in ``directory`` is described."""
    return directory / "cluster.json"


def read_description(directory: Path) -> dict[str, Any]:
    """cluster.json, checked for shape and version; ClusterDescriptionError says what is wrong."""
    path = description_path(directory)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ClusterDescriptionError(f"no cluster in {directory}: {path.name} is missing") from None
    except (OSError, ValueError) as e:
        raise ClusterDescriptionError(f"{path} is unreadable: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
        raise ClusterDescriptionError(f"{path} does not describe a cluster")
    if data.get("version") != DESCRIPTION_VERSION:
        raise ClusterDescriptionError(
            f"{path} was written by another walstore version ({data.get('version')!r}); use a fresh --dir"
        )
    return data


def write_description(directory: Path, data: Mapping[str, Any]) -> None:
    """Atomically: a reader (``cluster ps``, the supervising ``up``) sees the old or the new
    file, never half of one."""
    path = description_path(directory)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Held around every read-modify-write of cluster.json."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "cluster.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def record_of(entry: Mapping[str, Any]) -> ProcessRecord | None:
    """The process a cluster.json entry names, or None if it names none (never started)."""
    pid, ticks = entry.get("pid"), entry.get("start_ticks")
    return ProcessRecord(int(pid), int(ticks)) if isinstance(pid, int) and isinstance(ticks, int) else None


# -- the local cluster ----------------------------------------------------------------------


class LocalCluster:
    """A local etcd and ``nodes`` walstore nodes in ``directory``; see the module docstring."""

    def __init__(
        self,
        directory: Path,
        nodes: int,
        *,
        etcd_endpoints: str | None = None,
        lease_ttl_s: float = 2.0,
        cluster_id: str = "walstore-local",
    ) -> None:
        self.directory = directory.resolve()
        self.size = nodes
        self.external_etcd = etcd_endpoints
        self.lease_ttl_s = lease_ttl_s
        self.cluster_id = cluster_id
        self.etcd_members: list[EtcdMember] = []
        self.etcd_endpoints: list[str] = []
        self.etcd_token = ""
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, tuple[int, int]] = {}
        self.resumed = False
        # Set once cluster.json names our processes: only then may stop() act on what it
        # lists. A refused start must never touch the cluster that refused it.
        self.owns_description = False

    @property
    def ids(self) -> list[str]:
        return [f"{NODE_PREFIX}{i}" for i in range(self.size)]

    # -- start, or resume --------------------------------------------------------------------

    def start(self) -> None:
        """Start everything, or resume the cluster DIR already describes. ClusterError says
        why not (one still runs, another shape, etcd's port is taken)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with locked(self.directory):
            previous = self._previous()
            try:
                self._start_etcd(previous)
                self._start_nodes()
            except BaseException:
                self.stop()
                raise
            self._write_description()
            self.owns_description = True

    def _previous(self) -> dict[str, Any] | None:
        if not description_path(self.directory).exists():
            if any(self.directory.glob(f"{NODE_PREFIX}*/wal")) or (self.directory / "etcd").exists():
                raise ClusterDescriptionError(
                    f"{self.directory} holds node or etcd data but no cluster.json; use a fresh --dir"
                )
            return None
        previous = read_description(self.directory)
        supervisor = record_of(previous.get("supervisor") or {})
        if supervisor is not None and supervisor.alive and supervisor.pid != os.getpid():
            raise ClusterError(
                f"a cluster is already running in {self.directory} (walstore cluster up, pid {supervisor.pid}); "
                f"see `walstore cluster ps --dir {self.directory}`"
            )
        entries = [*previous["nodes"], *previous.get("etcd", {}).get("members", [])]
        for entry in entries:
            record = record_of(entry)
            if record is not None and record.alive:
                name = entry.get("id") or entry.get("name")
                raise ClusterError(
                    f"{name} (pid {record.pid}) of the earlier run still runs; "
                    f"stop it first: walstore cluster stop {name} --dir {self.directory}"
                )
        recorded = len(previous["nodes"])
        if recorded != self.size:
            raise ClusterDescriptionError(
                f"{self.directory} holds a {recorded}-node cluster; pass --nodes {recorded} or use a fresh --dir"
            )
        etcd = previous.get("etcd", {})
        if bool(etcd.get("started_here")) == bool(self.external_etcd):
            raise ClusterDescriptionError(
                f"{self.directory} was started {'with its own' if etcd.get('started_here') else 'with an external'}"
                " etcd; resume it the same way or use a fresh --dir"
            )
        self.cluster_id = str(previous.get("cluster_id") or self.cluster_id)
        self.lease_ttl_s = float(previous.get("lease_ttl_s") or self.lease_ttl_s)
        self.resumed = True
        return previous

    def _start_etcd(self, previous: dict[str, Any] | None) -> None:
        if self.external_etcd:
            self.etcd_endpoints = [e.strip() for e in self.external_etcd.split(",") if e.strip()]
            return
        if previous is None:
            cluster = EtcdCluster(self.directory / "etcd", 1)
            cluster.start()
            self.etcd_members, self.etcd_token = cluster.members, cluster.token
        else:
            # A member's peer URL lives in its data directory: it comes back on its old ports.
            binary = find_etcd_binary()
            self.etcd_token = str(previous["etcd"].get("token", "walstore-local"))
            for spec in previous["etcd"]["members"]:
                member = EtcdMember(spec["name"], self.directory / "etcd", spec["client_port"], spec["peer_port"])
                self.etcd_members.append(member)
                member.spawn(
                    binary,
                    f"{member.name}={member.peer_url}",
                    self.etcd_token,
                    DEFAULT_HEARTBEAT_MS,
                    DEFAULT_ELECTION_TIMEOUT_MS,
                )
            for member in self.etcd_members:
                try:
                    member.wait_ready()
                except ElectionError:
                    if member.lost_port_race():
                        raise ClusterError(
                            f"cannot resume: etcd's recorded port {member.client_port} or {member.peer_port} is taken "
                            "by another process (etcd keeps its address in its data); free it or use a fresh --dir"
                        ) from None
                    raise
        self.etcd_endpoints = [m.endpoint for m in self.etcd_members]

    def _start_nodes(self) -> None:
        for attempt in range(1, PORT_RACE_ATTEMPTS + 1):
            ports = free_ports(2 * self.size, HOST)
            self.ports = {node_id: (ports[2 * i], ports[2 * i + 1]) for i, node_id in enumerate(self.ids)}
            for node_id in self.ids:
                self.procs[node_id] = spawn_server(
                    self._env(node_id), self._log(node_id), banner=f"=== walstore cluster: start of {node_id} ==="
                )
            try:
                for node_id in self.ids:
                    proc = self.procs[node_id]
                    wait_live(self.ports[node_id][0], running(proc), READY_TIMEOUT_S)
                return
            except TimeoutError:
                exited = [n for n, p in self.procs.items() if p.poll() is not None]
                raced = any(lost_port_race(self._log(n)) for n in exited)
                self._stop_nodes()
                if not raced or attempt == PORT_RACE_ATTEMPTS:
                    failed = exited[0] if exited else self.ids[0]
                    raise ClusterError(f"{failed} did not start; see {self._log(failed)}") from None

    def _log(self, node_id: str) -> Path:
        return self.directory / f"{node_id}.log"

    def _peers(self) -> str:
        if self.size == 1:
            return ""
        return ",".join(f"{n}={HOST}:{peer}" for n, (_, peer) in self.ports.items())

    def _env(self, node_id: str) -> dict[str, str]:
        http, peer = self.ports[node_id]
        return node_env(
            node_id=node_id,
            http_port=http,
            peer_port=peer,
            peers=self._peers(),
            data_dir=self.directory / node_id / "wal",
            cluster_id=self.cluster_id,
            etcd_endpoints=self.etcd_endpoints,
            lease_ttl_s=self.lease_ttl_s,
        )

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until every node says it is ready (a leader is known and it has caught up)."""
        deadline = time.monotonic() + timeout_s
        for node_id, (http, _) in self.ports.items():
            while True:
                proc = self.procs[node_id]
                if proc.poll() is not None:
                    raise ClusterError(f"{node_id} exited with {proc.returncode}; see {self._log(node_id)}")
                answer = http_answer(http, "/health/ready")
                if answer is not None and answer[0] == 200:
                    break
                if time.monotonic() > deadline:
                    raise ClusterError(f"{node_id} not ready after {timeout_s}s; see {self._log(node_id)}")
                time.sleep(0.1)

    def lines(self) -> list[str]:
        return [f"{node_id} http://{HOST}:{http}" for node_id, (http, _) in self.ports.items()]

    def _write_description(self) -> None:
        description = {
            "version": DESCRIPTION_VERSION,
            "cluster_id": self.cluster_id,
            "lease_ttl_s": self.lease_ttl_s,
            "supervisor": ProcessRecord.of(os.getpid()).to_json(),
            "nodes": [
                {
                    "id": node_id,
                    **ProcessRecord.of(self.procs[node_id].pid).to_json(),
                    "http": f"http://{HOST}:{http}",
                    "peer": f"{HOST}:{peer}",
                    "http_port": http,
                    "peer_port": peer,
                    "data_dir": str(self.directory / node_id / "wal"),
                    "log": str(self._log(node_id)),
                    "env": {k: v for k, v in self._env(node_id).items() if k in ENV_VARS},
                }
                for node_id, (http, peer) in self.ports.items()
            ],
            "etcd": {
                "endpoints": self.etcd_endpoints,
                "pids": [m.pid for m in self.etcd_members],
                "started_here": bool(self.etcd_members),
                "token": self.etcd_token,
                "members": [
                    {
                        "name": m.name,
                        **ProcessRecord.of(m.pid or 0).to_json(),
                        "client_port": m.client_port,
                        "peer_port": m.peer_port,
                        "log": str(m.log_path),
                    }
                    for m in self.etcd_members
                ],
            },
        }
        write_description(self.directory, description)

    # -- stop ----------------------------------------------------------------------------------

    def _stop_nodes(self) -> None:
        stop_processes(self.procs.values())

    def stop(self) -> None:
        """Stop every process of this cluster: our children, and any node ``cluster start``
        brought back meanwhile (found in cluster.json, checked by start time)."""
        self._stop_nodes()
        if self.owns_description:
            self._stop_restarted_nodes()
        for member in self.etcd_members:
            member.stop()

    def _stop_restarted_nodes(self) -> None:
        with contextlib.suppress(ClusterDescriptionError):
            for entry in read_description(self.directory)["nodes"]:
                record = record_of(entry)
                if record is not None and record.pid not in {p.pid for p in self.procs.values()}:
                    record.stop()


# -- `cluster up`: supervise ------------------------------------------------------------------


def run_until_signalled(cluster: LocalCluster, echo: Callable[[str], None]) -> None:
    """Start (or resume) the cluster, print where it is, and watch it until Ctrl-C or
    SIGTERM. A process that exits is reported, and the others keep running."""
    stop = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        cluster.start()
        cluster.wait_ready()
        for line in cluster.lines():
            echo(line)
        verb = "resumed" if cluster.resumed else "described"
        echo(f"# {verb} in {description_path(cluster.directory)}; Ctrl-C stops everything")
        echo(f"# break it: walstore cluster kill node-0 --dir {cluster.directory}   (see: walstore cluster --help)")
        watched: dict[str, ProcessRecord | None] = {}
        while not stop:
            _report_changes(cluster, watched, echo)
            time.sleep(SUPERVISE_INTERVAL_S)
    finally:
        cluster.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)


def _report_changes(
    cluster: LocalCluster, watched: dict[str, ProcessRecord | None], echo: Callable[[str], None]
) -> None:
    for proc in cluster.procs.values():
        proc.poll()  # reap our exited children, so that their pid reads as gone
    try:
        description = read_description(cluster.directory)
    except ClusterDescriptionError:
        return
    entries = [(n["id"], n) for n in description["nodes"]]
    entries += [(m["name"], m) for m in description.get("etcd", {}).get("members", [])]
    for name, entry in entries:
        record = record_of(entry)
        live = record if record is not None and record.alive else None
        before = watched.get(name, record)
        if name not in watched:
            watched[name] = live
            continue
        if before is not None and live is None:
            child = next((p for p in cluster.procs.values() if p.pid == before.pid), None)
            code = child.poll() if child is not None else None
            how = f"exited with code {code}" if code is not None else "exited"
            hint = f"walstore cluster start {name} --dir {cluster.directory}" if name.startswith(NODE_PREFIX) else ""
            echo(
                f"# {name} (pid {before.pid}) {how}; the others keep running"
                + (f"; bring it back: {hint}" if hint else "")
            )
        elif live is not None and before != live:
            echo(f"# {name} running again (pid {live.pid})")
        watched[name] = live


# -- ps, stop, kill, start, restart ----------------------------------------------------------


def _entry(description: Mapping[str, Any], name: str) -> tuple[str, dict[str, Any]]:
    """("node" | "etcd", its record) for a node id or an etcd member's name."""
    for entry in description["nodes"]:
        if entry["id"] == name:
            return "node", dict(entry)
    for member in description.get("etcd", {}).get("members", []):
        if member["name"] == name:
            return "etcd", dict(member)
    names = [n["id"] for n in description["nodes"]] + [
        m["name"] for m in description.get("etcd", {}).get("members", [])
    ]
    raise ConfigError(f"no node {name!r} in this cluster ({', '.join(names)})")


def process_rows(directory: Path) -> list[dict[str, Any]]:
    """``cluster ps``: one row per process of the cluster: name, pid, state, URL, role."""
    description = read_description(directory)
    rows = []
    for entry in description["nodes"]:
        record = record_of(entry)
        state = "exited" if record is None or not record.alive else "paused" if record.paused else "running"
        row: dict[str, Any] = {"name": entry["id"], "pid": entry.get("pid"), "state": state, "url": entry["http"]}
        answer = http_answer(int(entry["http_port"]), "/status", 0.5) if state == "running" else None
        status = answer[1] if answer is not None and isinstance(answer[1], dict) else {}
        row.update(role=status.get("role"), term=status.get("term"), applied=status.get("last_applied"))
        row["log"] = entry.get("log")
        rows.append(row)
    for member in description.get("etcd", {}).get("members", []):
        record = record_of(member)
        state = "exited" if record is None or not record.alive else "paused" if record.paused else "running"
        rows.append(
            {
                "name": member["name"],
                "pid": member.get("pid"),
                "state": state,
                "url": f"http://{HOST}:{member['client_port']}",
                "role": "etcd",
                "term": None,
                "applied": None,
                "log": member.get("log"),
            }
        )
    return rows


def signal_node(directory: Path, name: str, sig: int, timeout_s: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM (then SIGKILL after ``timeout_s``) or SIGKILL one node or etcd member of the
    cluster in DIR, and wait until it has gone; returns its pid. ClusterError if it is not
    running."""
    _, entry = _entry(read_description(directory), name)
    record = record_of(entry)
    if record is None or not record.alive:
        raise ClusterError(f"{name} is not running")
    if sig == signal.SIGKILL:
        record.signal(signal.SIGKILL)
        record.wait_gone(timeout_s)
    else:
        record.stop(timeout_s)
    return record.pid


def start_node(directory: Path, name: str, timeout_s: float = READY_TIMEOUT_S) -> tuple[int, str]:
    """Start a stopped node (or etcd member) of the cluster in DIR again: its ports, data
    directory and settings as recorded (the other nodes' PEERS name those ports). Returns
    (pid, URL)."""
    with locked(directory):
        description = read_description(directory)
        kind, entry = _entry(description, name)
        record = record_of(entry)
        if record is not None and record.alive:
            raise ClusterError(f"{name} is already running (pid {record.pid})")
        if kind == "etcd":
            pid, url = _start_etcd_member(directory, description, entry)
        else:
            pid, url = _start_node(entry, timeout_s)
        entry.update(ProcessRecord.of(pid).to_json())
        if kind == "etcd":
            etcd = description["etcd"]
            etcd["members"] = [entry if m["name"] == name else m for m in etcd["members"]]
            etcd["pids"] = [m["pid"] for m in etcd["members"]]
        else:
            description["nodes"] = [entry if n["id"] == name else n for n in description["nodes"]]
        write_description(directory, description)
        return pid, url


def _start_etcd_member(directory: Path, description: Mapping[str, Any], entry: Mapping[str, Any]) -> tuple[int, str]:
    member = EtcdMember(entry["name"], directory / "etcd", int(entry["client_port"]), int(entry["peer_port"]))
    member.spawn(
        find_etcd_binary(),
        f"{member.name}={member.peer_url}",
        str(description["etcd"].get("token", "walstore-local")),
        DEFAULT_HEARTBEAT_MS,
        DEFAULT_ELECTION_TIMEOUT_MS,
    )
    try:
        member.wait_ready()
    except ElectionError:
        member.stop()
        why = "its port is taken by another process" if member.lost_port_race() else "it exited"
        raise ClusterError(f"{member.name} did not start: {why}; see {member.log_path}") from None
    assert member.pid is not None  # spawned just now and healthy
    return member.pid, member.client_url


def _start_node(entry: Mapping[str, Any], timeout_s: float) -> tuple[int, str]:
    node_id = str(entry["id"])
    log = Path(entry["log"])
    env = node_env(
        node_id=node_id,
        http_port=int(entry["http_port"]),
        peer_port=int(entry["peer_port"]),
        peers="",
        data_dir=Path(entry["data_dir"]),
        cluster_id="",
        etcd_endpoints=(),
        lease_ttl_s=0,
        overrides=entry["env"],  # exactly what it ran with before
    )
    proc = spawn_server(env, log, banner=f"=== walstore cluster: start of {node_id} ===", new_session=True)
    try:
        wait_live(int(entry["http_port"]), running(proc), timeout_s)
    except TimeoutError:
        stop_process(proc)
        why = "its port is taken by another process" if lost_port_race(log) else "it exited"
        raise ClusterError(f"{node_id} did not start: {why}; see {log}") from None
    return proc.pid, str(entry["http"])
