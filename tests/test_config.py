"""Settings: the seed's variables and defaults, derived peers, and clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from walstore.config import ENV_VARS, Config, PeerSpec, from_env
from walstore.errors import ConfigError


def test_seed_defaults() -> None:
    c = from_env({})
    assert (c.node_id, c.http_port, c.data_dir, c.etcd_endpoints) == (
        "event-store-0",
        8080,
        Path("/data/wal"),
        ("localhost:2379",),
    )
    assert (c.service_name, c.namespace, c.clustered) == ("event-store", "default", False)


def test_every_variable_is_read() -> None:
    env = {
        "NODE_ID": "b",
        "HTTP_PORT": "81",
        "DATA_DIR": "/x",
        "ETCD_ENDPOINTS": "e1:1, e2:2",
        "SERVICE_NAME": "svc",
        "NAMESPACE": "ns",
        "PEER_PORT": "71",
        "PEERS": "a=h1:1,b=h2:2,c=[::1]:3",
        "CLUSTER_ID": "cid",
        "HTTP_HOST": "127.0.0.1",
        "PEER_HOST": "127.0.0.2",
        "LEASE_TTL_S": "3.5",
        "SEGMENT_SIZE_BYTES": str(8 << 20),
        "MAX_BODY_BYTES": "4096",
        "HTTP_HEADER_TIMEOUT_S": "2",
        "HTTP_IDLE_TIMEOUT_S": "3",
        "HTTP_MAX_CONNECTIONS": "7",
        "PROBE_PORT": "91",
        "LOG_LEVEL": "debug",
        "MAX_BATCH_EVENTS": "20000",
        "MAX_BATCH_BYTES": str(8 << 20),
        "REPLICATION_FRAME_BYTES": str(1 << 20),
    }
    assert set(env) == set(ENV_VARS) - {"CLUSTER_SIZE"}
    c = from_env(env)
    assert c.etcd_endpoints == ("e1:1", "e2:2")
    assert c.peers == (PeerSpec("a", "h1", 1), PeerSpec("b", "h2", 2), PeerSpec("c", "::1", 3))
    assert c.me == PeerSpec("b", "h2", 2) and c.clustered and c.cluster_size == 3
    assert (c.lease_ttl_s, c.max_body_bytes, c.http_max_connections, c.log_level) == (3.5, 4096, 7, "DEBUG")
    assert c.probe_port == 91
    assert (c.max_batch_events, c.max_batch_bytes) == (20_000, 8 << 20)
    assert c.replication_frame_bytes == 1 << 20


def test_replication_frames_are_4_mib_by_default_and_bounded() -> None:
    from walstore.protocol.messages import MAX_APPEND_ENTRIES_BYTES

    assert from_env({}).replication_frame_bytes == 4 << 20
    assert from_env({"REPLICATION_FRAME_BYTES": str(64 << 10)}).replication_frame_bytes == 64 << 10
    for bad in (64 << 10) - 1, MAX_APPEND_ENTRIES_BYTES + 1:
        with pytest.raises(ConfigError, match="REPLICATION_FRAME_BYTES"):
            from_env({"REPLICATION_FRAME_BYTES": str(bad)})


def test_batch_limits_default_to_10000_events_and_16_mib() -> None:
    c = from_env({})
    assert (c.max_batch_events, c.max_batch_bytes) == (10_000, 16 * 1024 * 1024)


def test_the_largest_batch_must_fit_one_peer_frame() -> None:
    from walstore.config import BATCH_EVENT_OVERHEAD_BYTES, BATCH_FRAME_SLACK_BYTES
    from walstore.protocol.frames import MAX_FRAME_BYTES

    events = 50_000
    fits = MAX_FRAME_BYTES - events * BATCH_EVENT_OVERHEAD_BYTES - BATCH_FRAME_SLACK_BYTES
    assert from_env({"MAX_BATCH_EVENTS": str(events), "MAX_BATCH_BYTES": str(fits)}).max_batch_bytes == fits
    with pytest.raises(ConfigError, match="would not fit one peer frame"):
        from_env({"MAX_BATCH_EVENTS": str(events), "MAX_BATCH_BYTES": str(fits + 1)})


def test_statefulset_peers_are_derived_from_dns_names() -> None:
    c = from_env({"CLUSTER_SIZE": "3", "NODE_ID": "event-store-2", "NAMESPACE": "prod"})
    assert [p.address for p in c.peers] == [
        f"event-store-{i}.event-store.prod.svc.cluster.local:7070" for i in range(3)
    ]


def test_flags_override_environment() -> None:
    c = from_env({"HTTP_PORT": "81"}, http_port=82, data_dir="/y", peers=None)
    assert c.http_port == 82 and c.data_dir == Path("/y")


@pytest.mark.parametrize(
    "env",
    [
        {"HTTP_PORT": "eighty"},
        {"HTTP_PORT": "70000"},
        {"NODE_ID": "bad id!"},
        {"PEERS": "a=h:1,a=h:2", "NODE_ID": "a"},
        {"PEERS": "a=h:1,b=h:2"},  # this node is not among them
        {"PEERS": "a=nohostport", "NODE_ID": "a"},
        {"LEASE_TTL_S": "0"},
        {"SEGMENT_SIZE_BYTES": "10"},
        {"MAX_BODY_BYTES": str(1 << 30)},
        {"CLUSTER_SIZE": "0"},
        {"HTTP_MAX_CONNECTIONS": "0"},
        {"LOG_LEVEL": "verbose"},
        {"LOG_LEVEL": "15"},
        {"MAX_BATCH_EVENTS": "0"},
        {"MAX_BATCH_EVENTS": "100001"},
        {"MAX_BATCH_EVENTS": "many"},
        {"MAX_BATCH_BYTES": "1023"},
        {"MAX_BATCH_BYTES": str(33 << 20)},
    ],
)
def test_bad_values_are_start_up_errors(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        from_env(env)


def test_log_level_names_the_levels_and_flags_are_case_insensitive() -> None:
    with pytest.raises(ConfigError, match="LOG_LEVEL 'LOUD': one of DEBUG, INFO, WARNING, ERROR, CRITICAL"):
        from_env({}, log_level="loud")
    assert from_env({}, log_level="warning").log_level == "WARNING"


def test_unknown_override_is_an_error() -> None:
    with pytest.raises(ConfigError):
        from_env({}, no_such_setting=1)


def test_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        Config().http_port = 1  # type: ignore[misc]


def test_serve_with_bad_configuration_exits_2_with_a_message(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "walstore", "serve", "--http-port", "99999", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "HTTP_PORT" in result.stderr and "99999" in result.stderr
