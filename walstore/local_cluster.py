"""``walstore cluster up``: a local cluster for trying walstore out.

Starts one etcd (Debian's ``etcd`` from PATH, unless ``--etcd-endpoints`` names an
existing one) and N ``walstore serve`` processes on free loopback ports, prints one line
per node (``NODE_ID http://HOST:PORT``), writes ``DIR/cluster.json`` describing every
process it started, and on Ctrl-C or SIGTERM stops exactly those processes (by pid).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from walstore.client import WalstoreClient
from walstore.election.etcd_process import EtcdCluster, free_ports

HOST = "127.0.0.1"
READY_TIMEOUT_S = 30.0


class LocalCluster:
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
        self.etcd: EtcdCluster | None = None
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, tuple[int, int]] = {}

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.external_etcd:
            endpoints = self.external_etcd
        else:
            self.etcd = EtcdCluster(self.directory / "etcd", 1)
            self.etcd.start()
            endpoints = ",".join(self.etcd.endpoints)
        ports = free_ports(2 * self.size)
        ids = [f"node-{i}" for i in range(self.size)]
        self.ports = {node_id: (ports[2 * i], ports[2 * i + 1]) for i, node_id in enumerate(ids)}
        peers = ",".join(f"{n}={HOST}:{peer}" for n, (_, peer) in self.ports.items())
        for node_id, (http, peer) in self.ports.items():
            env = dict(
                os.environ,
                NODE_ID=node_id,
                HTTP_HOST=HOST,
                HTTP_PORT=str(http),
                PEER_HOST=HOST,
                PEER_PORT=str(peer),
                PEERS=peers if self.size > 1 else "",
                DATA_DIR=str(self.directory / node_id / "wal"),
                ETCD_ENDPOINTS=endpoints,
                CLUSTER_ID=self.cluster_id,
                LEASE_TTL_S=str(self.lease_ttl_s),
            )
            log = open(self.directory / f"{node_id}.log", "ab")  # noqa: SIM115 - owned by the child
            self.procs[node_id] = subprocess.Popen(
                [sys.executable, "-m", "walstore", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        self._write_description(endpoints)

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        for node_id, (http, _) in self.ports.items():
            while True:
                proc = self.procs[node_id]
                if proc.poll() is not None:
                    raise RuntimeError(f"{node_id} exited with {proc.returncode}; see {self.directory / node_id}.log")
                try:
                    with WalstoreClient(f"http://{HOST}:{http}", timeout_s=1) as client:
                        if client.request("GET", "/health/ready", check=False).status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{node_id} not ready after {timeout_s}s")
                time.sleep(0.1)

    def lines(self) -> list[str]:
        return [f"{node_id} http://{HOST}:{http}" for node_id, (http, _) in self.ports.items()]

    def _write_description(self, endpoints: str) -> None:
        description = {
            "nodes": [
                {
                    "id": node_id,
                    "pid": self.procs[node_id].pid,
                    "http": f"http://{HOST}:{http}",
                    "peer": f"{HOST}:{peer}",
                    "data_dir": str(self.directory / node_id / "wal"),
                }
                for node_id, (http, peer) in self.ports.items()
            ],
            "etcd": {
                "endpoints": endpoints.split(","),
                "pids": [m.pid for m in self.etcd.members] if self.etcd else [],
                "started_here": self.etcd is not None,
            },
        }
        (self.directory / "cluster.json").write_text(json.dumps(description, indent=2) + "\n")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.etcd is not None:
            self.etcd.stop()


def run_until_signalled(cluster: LocalCluster, echo: Callable[[str], None]) -> None:
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
        echo(f"# described in {cluster.directory / 'cluster.json'}; Ctrl-C stops everything")
        while not stop:
            for node_id, proc in cluster.procs.items():
                if proc.poll() is not None:
                    echo(f"# {node_id} exited with {proc.returncode}")
                    stop = True
            time.sleep(0.2)
    finally:
        cluster.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
