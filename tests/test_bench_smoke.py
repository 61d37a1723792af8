"""The HTTP benchmarks must keep working: parsers and the table on known inputs (fast), and
each side of both benches for real for ~1 s per row with a tiny configuration (slow).

The slow tests run PostgreSQL, etcd, wrk, pgbench and ``python -m walstore serve`` for real;
they need the Debian packages that ``make bench`` installs.
"""

from __future__ import annotations

import math
import os
import pwd
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from walstore.bench import peers
from walstore.bench.http_bench import WalstoreServers, run_cluster_bench, run_http_bench, walstore_script
from walstore.bench.report import Measurement, Row, format_table, rows_json
from walstore.errors import BenchError, ConfigError

# ------------------------------------------------------------------ parsers (fast)

WRK_OUTPUT = """Running 1s test @ http://127.0.0.1:1234/
  2 threads and 16 connections
  1500 requests in 1.00s, 300.00KB read
  Non-2xx or 3xx responses: 12
Requests/sec:   1500.00
WRK_RESULT {"requests":1500,"duration_us":1002000,"status":12,"connect":0,"read":1,"write":0,"timeout":2,\
"p50_us":850.0,"p99_us":4100.5}
"""


def test_wrk_result_counts_only_2xx_as_ok_and_every_failure_as_error() -> None:
    m = peers.parse_wrk_result(WRK_OUTPUT, items_per_op=100)
    assert m.ops_ok == 1488
    assert m.errors == 12 + 1 + 2
    assert m.seconds == pytest.approx(1.002)
    assert m.p50_ms == pytest.approx(0.85)
    assert m.p99_ms == pytest.approx(4.1005)
    assert m.items_per_s == pytest.approx(1488 / 1.002 * 100)


@pytest.mark.parametrize(
    "output",
    ["Running 1s test\nRequests/sec: 10\n", 'WRK_RESULT {"requests": 3}\n', "WRK_RESULT {not json}\n"],
)
def test_wrk_output_without_a_usable_result_line_is_a_bench_error(output: str) -> None:
    with pytest.raises(BenchError) as info:
        peers.parse_wrk_result(output)
    assert info.value.tool == "wrk"


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1 .. 100
    assert peers.percentile(values, 50) == 50.0
    assert peers.percentile(values, 99) == 99.0
    assert peers.percentile(values, 100) == 100.0
    assert peers.percentile([7.0], 99) == 7.0
    assert peers.percentile([1.0, 2.0, 3.0], 0) == 1.0
    assert peers.percentile([], 50) is None


PGBENCH_OUTPUT = """pgbench (15.20 (Debian 15.20-0+deb12u1))
transaction type: /x/pgbench_script.sql
number of clients: 4
number of threads: 2
duration: 1 s
number of transactions actually processed: 400
number of failed transactions: 3 (0.744%)
latency average = 9.100 ms
initial connection time = 5.012 ms
tps = 410.000000 (without initial connection time)
"""


def test_pgbench_summary_and_per_transaction_logs(tmp_path: Path) -> None:
    assert peers.parse_pgbench_output(PGBENCH_OUTPUT) == (410.0, 400, 3)
    # client_id transaction_no time(us) script_no time_epoch time_us
    (tmp_path / "pgbench_log.77").write_text("0 0 1500 0 1700000000 1\n0 1 900 0 1700000000 2\n0 2 failed 0 1 3\n")
    (tmp_path / "pgbench_log.77.1").write_text("1 0 3000 0 1700000000 4\n\n")
    latencies, failed = peers.read_pgbench_logs(sorted(tmp_path.glob("pgbench_log*")))
    assert latencies == [0.9, 1.5, 3.0]
    assert failed == 1
    with pytest.raises(BenchError):
        peers.parse_pgbench_output("connection to server failed\n")


def test_lua_long_string_never_closes_early() -> None:
    assert peers.lua_long_string("abc") == "[[abc]]"
    assert peers.lua_long_string('x]]"y') == '[=[x]]"y]=]'
    assert peers.lua_long_string("]]]=]") == "[==[]]]=]]==]"


def test_scripts_carry_the_shared_event_and_value() -> None:
    script = walstore_script()
    assert peers.EVENT_PAYLOAD_JSON in script and peers.EVENT_METADATA_JSON in script
    assert "@HEAD@" not in script and "@TAIL@" not in script
    etcd = peers.etcd_put_script()
    assert "@VALUE@" not in etcd and "dnZ2" in etcd  # base64 of "vvv"
    assert peers.etcd_put_args("t", 100) == ["t", "100"]
    with pytest.raises(ConfigError):
        peers.etcd_put_args("t", peers.ETCD_MAX_TXN_OPS + 1)


def test_postgres_scripts_bind_the_same_event_as_parameters() -> None:
    insert = peers.pg_insert_script()
    assert ":payload::jsonb" in insert.sql and peers.EVENT_PAYLOAD_JSON not in insert.sql
    assert insert.variables == {
        "type": peers.EVENT_TYPE,
        "payload": peers.EVENT_PAYLOAD_JSON,
        "metadata": peers.EVENT_METADATA_JSON,
    }
    batch = peers.pg_batch_script(7)
    events = orjson.loads(batch.variables["batch"])
    assert len(events) == 7
    assert events[0] == {"type": peers.EVENT_TYPE, "payload": peers.EVENT_PAYLOAD, "metadata": peers.EVENT_METADATA}
    assert "random(1, 33)" in peers.pg_read_script(33).sql
    populate = peers.pg_populate_reads_sql(5)
    assert "generate_series(1, 5)" in populate and f"generate_series(1, {peers.READ_EVENTS_PER_AGGREGATE})" in populate


def test_postgres_data_dir_must_be_reachable_by_the_postgres_user(tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    stranger = pwd.struct_passwd(("pg", "x", 54321, 54321, "", "/", "/bin/false"))
    with pytest.raises(ConfigError, match=f"cannot reach .*: {closed} is not searchable"):
        peers._check_reachable(closed / "not-yet-created", stranger)
    # the owner of every private directory on the way gets through
    me = pwd.struct_passwd(("me", "x", os.getuid(), os.getgid(), "", "/", "/bin/false"))
    peers._check_reachable(closed / "not-yet-created", me)


def _m(ok: int, seconds: float = 2.0, items: int = 1, p50: float | None = 1.0) -> Measurement:
    return Measurement(
        ops_ok=ok, errors=0, seconds=seconds, p50_ms=p50, p99_ms=None if p50 is None else 9.5, items_per_op=items
    )


def test_table_prints_rates_ratios_and_targets() -> None:
    rows = [
        Row("single node", "POST /events", 64, "events/s", _m(3000), "PostgreSQL", "INSERT", _m(2000), 1.0),
        Row(
            "single node",
            "POST /events/batch (100)",
            16,
            "events/s",
            _m(10, items=100),
            "PostgreSQL",
            "INSERT 100",
            _m(20, items=100),
            1.0,
        ),
        Row("single node", "GET /events/{id}", 16, "req/s", _m(500, p50=None), "PostgreSQL", "SELECT", _m(0)),
    ]
    assert rows[0].ratio == pytest.approx(1.5) and rows[0].target_met is True
    assert rows[1].rate(rows[1].walstore) == pytest.approx(500.0) and rows[1].target_met is False
    assert math.isinf(rows[2].ratio) and rows[2].target_met is None
    text = format_table("walstore vs PostgreSQL", rows, ["machine: 2 cores " + "word " * 40])
    lines = text.splitlines()
    assert lines[0] == "walstore vs PostgreSQL"
    row64 = next(line for line in lines if line.startswith("POST /events "))
    assert "1,500" in row64 and "1,000" in row64 and "1.50" in row64 and ">=1 met" in row64
    assert "MISSED" in next(line for line in lines if line.startswith("POST /events/batch"))
    assert " inf " in next(line for line in lines if line.startswith("GET"))
    assert "  GET /events/{id}: PostgreSQL runs SELECT" in lines
    assert all(len(line) <= 112 for line in lines if "machine" in line or line.startswith("    word"))
    data = rows_json(rows)
    assert data[0]["ratio"] == pytest.approx(1.5) and data[0]["target_met"] is True


def test_a_server_that_dies_at_start_is_a_bench_error_with_its_output(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import sys; print('boom from the server'); sys.exit(3)"]
    servers = WalstoreServers(tmp_path, 1, server_argv=argv)
    with pytest.raises(BenchError) as info:
        servers.start()
    assert "exited with code 3" in str(info.value)
    assert "boom from the server" in info.value.output
    assert not any(node.running for node in servers.nodes)


# ------------------------------------------------------------ real runs (slow)


@pytest.fixture
def bench_base() -> Iterator[Path]:
    # Not pytest's tmp_path: its 0700 parents keep the postgres user out. /var/tmp is on
    # disk (not tmpfs) on Debian and world-searchable.
    base = Path(tempfile.mkdtemp(prefix="test-bench-", dir="/var/tmp"))
    base.chmod(0o711)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _processes_mentioning(path: Path) -> list[int]:
    """Pids whose command line or environment names ``path``: servers left running."""
    needle = str(path).encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        for part in ("cmdline", "environ"):
            try:
                with open(f"/proc/{entry}/{part}", "rb") as f:
                    if needle in f.read():
                        found.append(int(entry))
                        break
            except OSError:
                continue
    return found


def _assert_measured(m: Measurement, items_per_op: int) -> None:
    assert m.ops_ok > 0 and m.errors == 0
    assert m.items_per_op == items_per_op
    assert m.items_per_s > 0 and m.seconds > 0.5
    assert m.p50_ms is not None and m.p99_ms is not None
    assert 0 < m.p50_ms <= m.p99_ms


@pytest.mark.slow
def test_http_bench_runs_walstore_and_postgres(bench_base: Path) -> None:
    lines: list[str] = []
    rows = run_http_bench(
        1,
        lines.append,
        base_dir=bench_base,
        connections=(1, 4),
        batch_connections=2,
        read_connections=2,
        read_aggregates=20,
        batch_events=10,
        warmup_seconds=0,
    )
    assert [(r.workload, r.connections) for r in rows] == [
        ("POST /events", 1),
        ("POST /events", 4),
        ("POST /events/batch (10)", 2),
        ("GET /events/{id}", 2),
    ]
    for row in rows:
        items = 10 if "batch" in row.workload else 1
        _assert_measured(row.walstore, items)
        _assert_measured(row.peer, items)
        assert row.peer_name == "PostgreSQL" and 0 < row.ratio < math.inf
    assert [r.target_ratio for r in rows] == [None, None, None, None]  # the target is at 64
    table = lines[-1]
    assert "walstore (1 node) vs PostgreSQL 15" in table and "ratio" in table
    assert "same cores" in table and "fsync=on" in table
    assert sum(line.startswith(("  walstore ", "  postgres ")) for line in lines[:-1]) == 8
    assert list(bench_base.iterdir()) == []
    assert _processes_mentioning(bench_base) == []


@pytest.mark.slow
def test_cluster_bench_runs_three_walstore_nodes_and_three_etcd_members(bench_base: Path) -> None:
    lines: list[str] = []
    rows = run_cluster_bench(
        1,
        lines.append,
        base_dir=bench_base,
        connections=(1, 16),
        batch_connections=2,
        batch_events=10,
        warmup_seconds=0,
    )
    assert [(r.workload, r.connections) for r in rows] == [
        ("POST /events", 1),
        ("POST /events", 16),
        ("POST /events/batch (10)", 2),
    ]
    for row in rows:
        items = 10 if "batch" in row.workload else 1
        _assert_measured(row.walstore, items)
        _assert_measured(row.peer, items)
        assert row.peer_name == "etcd"
    assert [r.target_ratio for r in rows] == [None, 1.5, None]
    table = lines[-1]
    assert "walstore (3 nodes) vs etcd 3.4 (3 members)" in table and "/v3/kv/put" in table
    assert list(bench_base.iterdir()) == []
    assert _processes_mentioning(bench_base) == []


@pytest.mark.slow
def test_eventsourcing_bench_runs_the_bank_and_catch_up_on_both(bench_base: Path) -> None:
    from walstore.bench.es_bench import run_es_bench

    lines: list[str] = []
    rows = run_es_bench(lines.append, base_dir=bench_base, threads=2, seconds=1, accounts=20, notifications=2_500)
    assert [r.workload for r in rows] == ["bank commands", "catch-up select", "catch-up subscribe"]
    bank, select, subscribe = rows
    for m in (bank.walstore, bank.peer):  # money was conserved, or run_bank raised
        assert m.ops_ok > 0 and m.errors == 0 and m.p50_ms is not None and m.p99_ms is not None
    for row in (select, subscribe):
        # every inserted notification was read back, in order, on both systems
        assert row.walstore.ops_ok == row.peer.ops_ok == 2_500
        assert row.walstore.errors == row.peer.errors == 0
    assert bank.target_ratio == 1.0 and all(r.peer_name == "PostgreSQL" for r in rows)
    assert "eventsourcing application: walstore vs PostgreSQL" in lines[-1]
    assert list(bench_base.iterdir()) == []
    assert _processes_mentioning(bench_base) == []
