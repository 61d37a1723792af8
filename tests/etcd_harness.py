"""pytest fixtures that run real etcd servers (Debian's etcd-server), thin over
``walstore.election.etcd_process``.

Each fixture starts its own cluster on ports the OS handed out, in the test's temporary
directory, and stops exactly the processes it started (by pid) when the test ends, pass or
fail. The value is the ``EtcdCluster``: ``.endpoints`` is the list of ``"127.0.0.1:PORT"``
strings to give a client; ``kill_member(i)``, ``pause_member(i)``, ``start_member(i)`` ...
inject faults. From trio code, call the blocking ones via ``trio.to_thread.run_sync``.

Use from a test module (until a conftest registers it as a plugin)::

    pytest_plugins = ["etcd_harness"]

and do not also import it: the plugin import is the one pytest can assert-rewrite.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from walstore.election.etcd_process import HOST, EtcdCluster


def start_cluster(base_dir: Path, size: int) -> EtcdCluster:
    cluster = EtcdCluster(base_dir, size)
    cluster.start()
    return cluster


@pytest.fixture
def etcd_server(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A one-member etcd, ready to serve."""
    cluster = start_cluster(tmp_path / "etcd", 1)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def etcd_cluster3(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A three-member etcd cluster, every member ready to serve."""
    cluster = start_cluster(tmp_path / "etcd3", 3)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def dead_etcd_endpoint() -> str:
    """``127.0.0.1:PORT`` where nothing listened a moment ago (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return f"{HOST}:{sock.getsockname()[1]}"
