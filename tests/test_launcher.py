"""The one launcher (walstore.launcher) that `cluster up` and the fault harness share:
a node's environment never inherits the caller's walstore settings, overrides win, the log
gets a banner before each start's output, and a lost port race is recognised from the
words `walstore serve` prints."""

from __future__ import annotations

import sys
from pathlib import Path

from walstore.launcher import lost_port_race, node_env, spawn_server, stop_process, wait_live


def test_node_env_drops_the_callers_walstore_settings_and_overrides_win(tmp_path: Path) -> None:
    caller = {"PEERS": "x=evil:1", "LOG_LEVEL": "DEBUG", "CLUSTER_ID": "prod", "HOME": "/root"}
    env = node_env(
        node_id="n0",
        http_port=1,
        peer_port=2,
        peers="",
        data_dir=tmp_path,
        cluster_id="test",
        etcd_endpoints=(),
        lease_ttl_s=2.0,
        overrides={"LOG_LEVEL": "WARNING"},
        base=caller,
    )
    assert env["HOME"] == "/root" and env["PEERS"] == "" and env["CLUSTER_ID"] == "test"
    assert env["LOG_LEVEL"] == "WARNING" and "ETCD_ENDPOINTS" not in env
    assert env["PYTHONUNBUFFERED"] == "1"
    with_etcd = node_env(
        node_id="n0",
        http_port=1,
        peer_port=2,
        peers="",
        data_dir=tmp_path,
        cluster_id="t",
        etcd_endpoints=["127.0.0.1:5", "127.0.0.1:6"],
        lease_ttl_s=2.0,
        base={},
    )
    assert with_etcd["ETCD_ENDPOINTS"] == "127.0.0.1:5,127.0.0.1:6"


def test_spawn_writes_a_banner_then_the_output_and_a_dead_node_is_reported(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "n0.log"
    script = "import sys; print('walstore: cannot listen: Address already in use [EADDRINUSE]'); sys.exit(1)"
    proc = spawn_server({}, log, command=[sys.executable, "-c", script], banner="=== start #1 ===")
    try:
        try:
            wait_live(1, lambda: proc.poll() is None, 10, lambda: "see the log")
        except TimeoutError as e:
            assert "exited before serving HTTP; see the log" in str(e)
        else:
            raise AssertionError("wait_live returned for a process that exited")
    finally:
        stop_process(proc)
    assert log.read_text().splitlines()[0] == "=== start #1 ==="
    assert lost_port_race(log)
