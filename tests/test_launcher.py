"""The one launcher (walstore.launcher) that `cluster up`, the benchmarks and the fault
harness share: a node's environment never inherits the caller's walstore settings,
overrides win, the log gets a banner before each start's output, a lost port race is
recognised from the words `walstore serve` prints, and no other module of walstore/
starts a server process of its own."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import walstore
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


def _popen_callers_and_launcher_imports() -> tuple[set[str], set[str]]:
    """(modules of walstore/ that call subprocess.Popen, walstore modules launcher.py imports)."""
    package = Path(walstore.__file__).parent
    callers: set[str] = set()
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "Popen":
                callers.add(path.relative_to(package).as_posix())
    launcher_tree = ast.parse((package / "launcher.py").read_text())
    imported = {n.module for n in ast.walk(launcher_tree) if isinstance(n, ast.ImportFrom) and n.module}
    return callers, {m for m in imported if m.startswith("walstore")}


def test_only_the_launchers_start_server_processes() -> None:
    callers, launcher_imports = _popen_callers_and_launcher_imports()
    # walstore nodes, etcd members, and the benchmarks' PostgreSQL: nothing else starts servers.
    assert callers == {"launcher.py", "election/etcd_process.py", "bench/peers.py"}
    assert not launcher_imports & {"walstore.local_cluster", "walstore.bench", "walstore.bench.http_bench"}
