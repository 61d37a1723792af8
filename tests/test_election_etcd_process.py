"""The etcd launcher (walstore.election.etcd_process) that the tests and `walstore cluster up`
share: free ports, readiness, the port-race retry, member faults, and clean stops."""

from __future__ import annotations

import random
import socket
import time
from pathlib import Path

import pytest

from walstore.election import etcd_process
from walstore.election.etcd_process import HOST, EtcdCluster, find_etcd_binary, free_ports
from walstore.errors import ConfigError, ElectionError


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def nothing_listens(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(8)
    assert len(set(ports)) == 8
    assert all(port_is_free(p) for p in ports)


def test_free_ports_avoid_the_range_outgoing_connections_take_source_ports_from() -> None:
    first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert all(10_000 <= p < first_ephemeral for p in free_ports(20))


def test_free_ports_skip_a_port_that_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind((HOST, 0))
        taken = squatter.getsockname()[1]
        other = free_ports(1)[0]
        # the taken port first in line, then one that is free
        monkeypatch.setattr(random, "sample", lambda pool, k: [taken, other])
        assert etcd_process.free_ports(1) == [other]


def test_one_member_starts_answers_and_stops(tmp_path: Path) -> None:
    with EtcdCluster(tmp_path, 1) as cluster:
        (member,) = cluster.members
        assert cluster.endpoints == [f"127.0.0.1:{member.client_port}"]
        assert member.running and member.pid is not None
        assert cluster.leader_index() == 0
        assert not nothing_listens(member.client_port)
    assert not member.running and member.pid is None
    assert nothing_listens(member.client_port)
    assert (tmp_path / "etcd0.log").exists() and (tmp_path / "etcd0.etcd").is_dir()
    cluster.stop()  # idempotent
    with pytest.raises(ElectionError, match="fresh base_dir"):
        EtcdCluster(tmp_path, 1).start()  # its data directory belongs to the old cluster


def test_a_port_taken_before_etcd_binds_it_is_retried(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind((HOST, 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        calls: list[list[int]] = []

        def allocator(count: int) -> list[int]:
            ports = free_ports(count)
            if not calls:
                ports[0] = taken  # the first member's client port is already in use
            calls.append(ports)
            return ports

        with EtcdCluster(tmp_path, 1, port_allocator=allocator) as cluster:
            assert len(calls) == 2
            assert cluster.members[0].client_port != taken
            assert cluster.leader_index() == 0


def test_a_member_that_cannot_start_is_reported(tmp_path: Path) -> None:
    cluster = EtcdCluster(tmp_path, 1, binary="/bin/false")
    with pytest.raises(ElectionError, match="exited"):
        cluster.start()
    assert cluster.members == []


def test_settings_are_validated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError):
        EtcdCluster(tmp_path, 0)
    with pytest.raises(ConfigError):
        EtcdCluster(tmp_path, 1, heartbeat_ms=50, election_timeout_ms=100)
    with pytest.raises(ConfigError):
        EtcdCluster(tmp_path, 1, binary=str(tmp_path / "no-such-etcd"))
    monkeypatch.setenv("WALSTORE_ETCD_BINARY", str(tmp_path))  # a directory
    with pytest.raises(ConfigError):
        find_etcd_binary()


def test_three_members_kill_restart_pause_and_stop(tmp_path: Path) -> None:
    cluster = EtcdCluster(tmp_path, 3)
    try:
        started = time.monotonic()
        cluster.start()
        print(f"\n3-member etcd ready in {time.monotonic() - started:.2f}s")
        assert len(set(cluster.endpoints)) == 3
        leader = cluster.leader_index()
        assert leader is not None

        cluster.kill_member(leader)
        assert not cluster.members[leader].running
        cluster.wait_ready()  # the other two re-elect and serve
        new_leader = cluster.leader_index()
        assert new_leader is not None and new_leader != leader

        cluster.start_member(leader)  # same ports and data: it rejoins
        assert cluster.members[leader].running

        cluster.pause_member(leader)
        assert cluster.members[leader].running  # stopped, not gone
        cluster.resume_member(leader)
        cluster.wait_ready(indexes=[leader])
    finally:
        stopping = time.monotonic()
        cluster.stop()
        stop_s = time.monotonic() - stopping
    print(f"3-member etcd stopped in {stop_s:.2f}s")
    assert not any(m.running for m in cluster.members)
    assert all(nothing_listens(m.client_port) for m in cluster.members)
