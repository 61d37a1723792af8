"""Start a real node with exactly the environment the StatefulSet gives pod event-store-0.

The pod's DNS names (its peers, the etcd members) are mapped to loopback addresses inside
a private network and mount namespace (``unshare``: its own loopback, so the manifest's
fixed ports 8080/7070/2379 are free there, and its own /etc/hosts), with a real etcd
answering for the etcd Service. Only DATA_DIR is pointed at a temp dir instead of the
PVC mount. The node must come up: live, answering on the manifest's ports, campaigning
in etcd, and (alone of three) not ready, because it has no quorum.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_k8s_manifests import event_store_pod_env

pytestmark = pytest.mark.slow

PROBE = r"""
import json, socket, sys, urllib.request, urllib.error
def get(path):
    try:
        with urllib.request.urlopen("http://127.0.0.1:8080" + path, timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
out = {p: get(p) for p in ("/health/live", "/health/ready", "/status", "/metrics")}
s = socket.create_connection(("127.0.0.1", 7070), timeout=2); s.close()
print(json.dumps(out))
"""


def _hosts(env: dict[str, str]) -> str:
    lines = ["127.0.0.1 localhost"]
    ns = env["NAMESPACE"]
    svc = env["SERVICE_NAME"]
    for i in range(int(env["CLUSTER_SIZE"])):
        # Pod 0 is us; the other two pods are absent (nothing listens at their address).
        lines.append(f"127.0.0.{1 + i} {svc}-{i}.{svc}.{ns}.svc.cluster.local")
    for endpoint in env["ETCD_ENDPOINTS"].split(","):
        lines.append(f"127.0.0.1 {endpoint.rsplit(':', 1)[0]}")
    return "\n".join(lines) + "\n"


def test_node_starts_with_the_statefulsets_environment(tmp_path: Path) -> None:
    env = event_store_pod_env(0)
    env["DATA_DIR"] = str(tmp_path / "data" / "wal")
    (tmp_path / "hosts").write_text(_hosts(env))
    etcd = shutil.which("etcd") or "/usr/bin/etcd"
    script = f"""
set -e
ip link set lo up
mount --bind {tmp_path / "hosts"} /etc/hosts
{etcd} --name e0 --data-dir {tmp_path / "etcd"} --listen-client-urls http://127.0.0.1:2379 \
  --advertise-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380 \
  --initial-advertise-peer-urls http://127.0.0.1:2380 --initial-cluster e0=http://127.0.0.1:2380 \
  --heartbeat-interval 10 --election-timeout 100 > {tmp_path / "etcd.log"} 2>&1 &
{sys.executable} -m walstore serve
"""
    full_env = {"PATH": os.environ["PATH"], **env}
    log = (tmp_path / "node.log").open("wb")
    proc = subprocess.Popen(
        ["unshare", "--net", "--mount", "--pid", "--fork", "--kill-child", "sh", "-c", script],
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        result = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "node.log").read_text()
            probe = subprocess.run(
                ["nsenter", "-t", str(proc.pid), "-n", sys.executable, "-c", PROBE],
                capture_output=True,
                text=True,
            )
            if probe.returncode == 0:
                result = json.loads(probe.stdout)
                status = json.loads(result["/status"][1])
                if status["term"] > 0:  # it has reached etcd and won an election there
                    break
            time.sleep(0.3)
        assert result is not None, (tmp_path / "node.log").read_text()
        assert result["/health/live"][0] == 200
        assert result["/health/ready"][0] == 503  # one node of three: no quorum, not ready
        assert result["/metrics"][0] == 200 and "walstore_elections_total" in result["/metrics"][1]
        status = json.loads(result["/status"][1])
        assert status["id"] == "event-store-0"
        assert status["term"] > 0, status
        assert status["is_leader"] is False
    finally:
        # unshare ignores SIGTERM while it waits; SIGKILL takes its child (PID 1 of the
        # namespace, and with it etcd) down through --kill-child.
        proc.kill()
        proc.wait()
