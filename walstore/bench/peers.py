"""The comparison peers of the HTTP benchmarks, and the load tools that drive them.

- **PostgreSQL 15** (single-node rows): a throw-away cluster made with ``initdb`` in the
  benchmark's directory, run as the ``postgres`` user (PostgreSQL refuses root), listening
  on 127.0.0.1 and a port the OS handed out, durability as shipped and then pinned:
  ``fsync=on``, ``synchronous_commit=on``, default ``wal_sync_method`` (fdatasync on
  Linux). The table models an event store the usual way (``EVENTS_DDL``): a global
  position, a unique event id, and a unique (aggregate_id, version) that doubles as the
  optimistic-concurrency check; payload and metadata are ``jsonb``.
  Driven by ``pgbench`` with custom scripts, ``-M prepared`` (the peer's best realistic
  client mode) with the event JSON bound as parameters (``PgScript``), ``-j 2`` (one
  client thread per core).
- **etcd 3.4** (cluster rows): three members on loopback with etcd's default timings
  (100 ms heartbeat, 1 s election timeout), taking 300-byte puts, or 100-put transactions
  for the batch row, through its JSON gateway (``POST /v3/kv/put``, ``/v3/kv/txn``).
- **wrk** drives walstore and etcd alike. Every script ends with ``WRK_COMMON_LUA``'s
  ``done()`` hook, which prints one ``WRK_RESULT {json}`` line with the request count,
  the error counts and p50/p99 straight from wrk's latency histogram (the same numbers
  ``--latency`` prints, without parsing its human-readable units).

Latency percentiles for pgbench come from its per-transaction log (``-l``): one line per
transaction with its latency in microseconds. They are exact nearest-rank percentiles over
every transaction of the run (``percentile``), which is what wrk's histogram approximates
for requests. Both tools are closed-loop: each connection waits for its answer before
sending the next request, so rates at equal concurrency are comparable.

Both load tools take whole seconds (``-d``/``-T``), so a row lasts ``max(1, round(s))``.
Every process here is started by us and stopped through its own handle (by pid) in
``finally``; nothing else on the machine is signalled.
"""

from __future__ import annotations

import base64
import json
import math
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson

from walstore.bench.report import Measurement
from walstore.election.etcd_process import EtcdCluster, free_ports
from walstore.errors import BenchError, ConfigError
from walstore.launcher import log_tail

HOST = "127.0.0.1"
BATCH_EVENTS = 100  # events per batch request / rows per batch transaction (the row)
READ_EVENTS_PER_AGGREGATE = 10  # the read row reads one aggregate of this many events
ETCD_VALUE_BYTES = 300  # the put size; walstore's event JSON is about the same
ETCD_MAX_TXN_OPS = 128  # etcd's default --max-txn-ops: a batch transaction must fit in it

# One event as both sides get it. The padding makes the POST body ~300 bytes, the size of
# an etcd value in the cluster rows and of wal_bench's event bodies.
EVENT_TYPE = "BenchEvent"
EVENT_PAYLOAD: dict[str, object] = {
    "account": "acc-000123",
    "amount_cents": 4200,
    "currency": "EUR",
    "note": "n" * 120,
}
EVENT_METADATA: dict[str, object] = {"source": "walstore-bench", "correlation_id": "6f1c2b9e-bench"}
EVENT_PAYLOAD_JSON = orjson.dumps(EVENT_PAYLOAD, option=orjson.OPT_SORT_KEYS).decode()
EVENT_METADATA_JSON = orjson.dumps(EVENT_METADATA, option=orjson.OPT_SORT_KEYS).decode()

# Whole-tool timeouts beyond the run itself: start-up, connecting 64 clients, writing logs.
_TOOL_GRACE_S = 60.0
_OUTPUT_TAIL_CHARS = 3000
_POSTGRES_BIN_DIRS = ("/usr/lib/postgresql/15/bin",)
_PG_READY_TIMEOUT_S = 60.0
_PG_STOP_TIMEOUT_S = 15.0
_POLL_INTERVAL_S = 0.1
PORT_RACE_ATTEMPTS = 3

INSTALL_HINT = "run `make bench` (installs postgresql-15, wrk and etcd-server) or install them with apt"


def whole_seconds(seconds: float) -> int:
    """wrk's -d and pgbench's -T take whole seconds."""
    return max(1, round(seconds))


def find_tool(name: str, extra_dirs: Sequence[str] = ()) -> str:
    """Path of an executable on PATH or in ``extra_dirs``; ConfigError naming the fix if absent."""
    for directory in extra_dirs:
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    if found is None:
        raise ConfigError(f"{name} not found: {INSTALL_HINT}")
    return found


def find_postgres_tool(name: str) -> str:
    # Debian keeps the server binaries off PATH, under /usr/lib/postgresql/<major>/bin.
    return find_tool(name, _POSTGRES_BIN_DIRS)


def percentile(sorted_values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile of already sorted values: the smallest value with at least
    ``pct`` percent of the values at or below it. None for no values."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(pct / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _tail(text: str) -> str:
    return text[-_OUTPUT_TAIL_CHARS:]


def _clean_env(prefixes: Sequence[str]) -> dict[str, str]:
    # Variables such as PGHOST or ETCD_* from the caller's shell would silently override
    # the flags we pass.
    return {k: v for k, v in os.environ.items() if not k.startswith(tuple(prefixes))}


# ----------------------------------------------------------------------------- wrk

# Shared by every wrk script: numbers the threads (ids unique across threads need it) and
# reports the run as one machine-readable line. ``summary.requests`` counts completed
# requests, non-2xx/3xx answers included (``errors.status``); timeouts never complete.
WRK_COMMON_LUA = r"""
local threads_numbered = 0
function setup(thread)
  threads_numbered = threads_numbered + 1
  thread:set("thread_no", threads_numbered)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRK_RESULT {\"requests\":%d,\"duration_us\":%d,\"status\":%d,\"connect\":%d," ..
    "\"read\":%d,\"write\":%d,\"timeout\":%d,\"p50_us\":%.1f,\"p99_us\":%.1f}\n",
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""

_WRK_RESULT = re.compile(r"^WRK_RESULT (\{.*\})\s*$", re.MULTILINE)


def lua_long_string(text: str) -> str:
    """``text`` as a Lua long-bracket literal (no escapes are interpreted inside it)."""
    level = 0
    while f"]{'=' * level}]" in text:
        level += 1
    eq = "=" * level
    # A newline right after the opening bracket would be dropped by Lua; we never start with one.
    return f"[{eq}[{text}]{eq}]"


def parse_wrk_result(output: str, items_per_op: int = 1) -> Measurement:
    """The ``WRK_RESULT`` line of a wrk run -> Measurement. BenchError if it is missing."""
    match = _WRK_RESULT.search(output)
    if match is None:
        raise BenchError("wrk", "no WRK_RESULT line in its output", _tail(output))
    try:
        r = json.loads(match.group(1))
        requests, status = int(r["requests"]), int(r["status"])
        socket_errors = sum(int(r[k]) for k in ("connect", "read", "write", "timeout"))
        seconds = int(r["duration_us"]) / 1e6
        p50, p99 = float(r["p50_us"]) / 1000.0, float(r["p99_us"]) / 1000.0
    except (ValueError, KeyError, TypeError) as e:
        raise BenchError("wrk", f"unreadable WRK_RESULT line: {e}", match.group(0)) from None
    ok = requests - status
    return Measurement(
        ops_ok=ok,
        errors=status + socket_errors,
        seconds=seconds,
        p50_ms=p50 if ok else None,
        p99_ms=p99 if ok else None,
        items_per_op=items_per_op,
    )


def run_wrk(
    url: str,
    script: str,
    *,
    connections: int,
    seconds: float,
    work_dir: Path,
    args: Sequence[str] = (),
    items_per_op: int = 1,
    timeout_s: float = 10.0,
) -> Measurement:
    """Run wrk with ``script`` (WRK_COMMON_LUA is appended) against ``url`` for whole seconds.

    Threads: min(2, connections), one per core of the target machine (wrk needs at least
    one connection per thread). ``timeout_s`` is wrk's per-request timeout: a request
    slower than that is an error, not a latency sample, so it is generous.
    """
    wrk = find_tool("wrk")
    work_dir.mkdir(parents=True, exist_ok=True)
    script_path = work_dir / "wrk_script.lua"
    script_path.write_text(script + "\n" + WRK_COMMON_LUA, encoding="utf-8")
    duration = whole_seconds(seconds)
    argv = [
        wrk,
        "-t", str(min(2, connections)),
        "-c", str(connections),
        "-d", f"{duration}s",
        "--timeout", f"{max(1, math.ceil(timeout_s))}s",
        "-s", str(script_path),
        url,
    ]  # fmt: skip
    if args:
        argv += ["--", *args]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + _TOOL_GRACE_S, check=False)
    except subprocess.TimeoutExpired as e:
        raise BenchError("wrk", f"did not finish within {duration + _TOOL_GRACE_S:.0f}s") from e
    if done.returncode != 0:
        raise BenchError("wrk", f"exit code {done.returncode}", _tail(done.stdout + done.stderr))
    return parse_wrk_result(done.stdout, items_per_op)


# ------------------------------------------------------------------------ PostgreSQL

EVENTS_DDL = """
CREATE TABLE events (
    index        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id           uuid NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    type         text NOT NULL,
    aggregate_id text NOT NULL,
    version      bigint NOT NULL,
    payload      jsonb NOT NULL,
    metadata     jsonb NOT NULL,
    "timestamp"  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (aggregate_id, version)
);
"""


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


@dataclass(frozen=True, slots=True)
class PgScript:
    """A pgbench script and the variables it reads (``-D name=value``). With ``-M prepared``
    every ``:name`` becomes a bound parameter, so the event JSON travels as parameter text
    and is parsed into jsonb on every execution, as walstore parses every request body and
    as a driver binding its parameters would make PostgreSQL do. (JSON literals in the SQL
    would be parsed once, at prepare time, and give PostgreSQL a free ride.)"""

    sql: str
    variables: dict[str, str] = field(default_factory=dict)


_EVENT_VARIABLES = {"type": EVENT_TYPE, "payload": EVENT_PAYLOAD_JSON, "metadata": EVENT_METADATA_JSON}
_PG_INSERT_HEAD = "INSERT INTO events (aggregate_id, version, type, payload, metadata) "


def pg_insert_script() -> PgScript:
    """One event per transaction, a fresh aggregate each time (version 1), returning what
    walstore's 201 returns (position and id)."""
    return PgScript(
        _PG_INSERT_HEAD
        + "VALUES (gen_random_uuid()::text, 1, :type, :payload::jsonb, :metadata::jsonb) RETURNING index, id;\n",
        dict(_EVENT_VARIABLES),
    )


def pg_batch_script(events: int = BATCH_EVENTS) -> PgScript:
    """One transaction inserting ``events`` rows, each a fresh aggregate, from one JSON array
    parameter (walstore's batch is one JSON body too); returns every row's position and id."""
    one = f'{{"type":"{EVENT_TYPE}","payload":{EVENT_PAYLOAD_JSON},"metadata":{EVENT_METADATA_JSON}}}'
    return PgScript(
        _PG_INSERT_HEAD + "SELECT gen_random_uuid()::text, 1, e->>'type', e->'payload', e->'metadata' "
        "FROM jsonb_array_elements(:batch::jsonb) AS e RETURNING index, id;\n",
        {"batch": "[" + ",".join([one] * events) + "]"},
    )


def pg_read_script(aggregates: int) -> PgScript:
    """Read one random pre-populated aggregate (READ_EVENTS_PER_AGGREGATE rows) in version
    order, all columns, as ``GET /events/{id}`` does."""
    return PgScript(
        f"\\set a random(1, {aggregates})\n"
        'SELECT index, id, type, aggregate_id, version, payload, metadata, "timestamp" FROM events '
        "WHERE aggregate_id = 'read-' || CAST(:a AS text) ORDER BY version;\n"
    )


def pg_populate_reads_sql(aggregates: int) -> str:
    return (
        f"{_PG_INSERT_HEAD}"
        f"SELECT 'read-' || a, v, {_sql_literal(EVENT_TYPE)}, {_sql_literal(EVENT_PAYLOAD_JSON)}::jsonb, "
        f"{_sql_literal(EVENT_METADATA_JSON)}::jsonb "
        f"FROM generate_series(1, {aggregates}) AS a, generate_series(1, {READ_EVENTS_PER_AGGREGATE}) AS v;\n"
        "VACUUM ANALYZE events;\n"
    )


def _postgres_user() -> pwd.struct_passwd | None:
    """The account to run PostgreSQL as: ``postgres`` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise ConfigError(f"PostgreSQL refuses to run as root and there is no postgres user: {INSTALL_HINT}") from None


def _check_reachable(path: Path, user: pwd.struct_passwd) -> None:
    """Every directory above ``path`` must let ``user`` through, or initdb fails obscurely."""
    for parent in [path, *path.parents]:
        if not parent.exists():
            continue  # created later, by us, with the right owner
        st = parent.stat()
        if st.st_uid == user.pw_uid or st.st_mode & stat.S_IXOTH:
            continue
        raise ConfigError(
            f"the postgres user cannot reach {path}: {parent} is not searchable by others; "
            "run the benchmark from a directory under a world-searchable path (e.g. --dir /var/tmp)"
        )


class PostgresServer:
    """One PostgreSQL 15 server in ``base_dir/postgres`` (data, unix socket, log).

    Started with ``subprocess.Popen(user=postgres)`` rather than through ``runuser``: same
    account, but the pid we hold is the postmaster's own, so stopping it signals exactly
    that process (SIGINT = fast shutdown, SIGQUIT, then SIGKILL)."""

    def __init__(self, base_dir: Path, *, clients: int = 64) -> None:
        self.dir = base_dir.resolve() / "postgres"
        # the benchmark's clients plus psql, pg_isready and the reserved superuser slots
        self.max_connections = max(100, clients + 10)
        self.data_dir = self.dir / "data"
        self.log_path = self.dir / "postgres.log"
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._user = _postgres_user()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def _as_postgres(self) -> dict[str, object]:
        if self._user is None:
            return {}
        return {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}

    def _run(self, argv: Sequence[str], *, as_postgres: bool, timeout_s: float = 120.0) -> str:
        kwargs = self._as_postgres() if as_postgres else {}
        try:
            done = subprocess.run(
                list(argv),
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
                cwd=self.dir,
                env=_clean_env(("PG",)),
                **kwargs,  # type: ignore[call-overload]
            )
        except subprocess.TimeoutExpired as e:
            raise BenchError(os.path.basename(argv[0]), f"did not finish within {timeout_s:.0f}s") from e
        if done.returncode != 0:
            raise BenchError(
                os.path.basename(argv[0]), f"exit code {done.returncode}", _tail(done.stdout + done.stderr)
            )
        return str(done.stdout)

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            _check_reachable(self.dir.parent, self._user)
            os.chown(self.dir, self._user.pw_uid, self._user.pw_gid)
        self.dir.chmod(0o700)
        # --no-sync: only the initial catalog skips fsync; every benchmark write still syncs.
        self._run(
            [find_postgres_tool("initdb"), "-D", str(self.data_dir), "-U", "postgres", "-A", "trust",
             "-E", "UTF8", "--no-sync", "--no-instructions"],
            as_postgres=True,
        )  # fmt: skip
        for attempt in range(1, PORT_RACE_ATTEMPTS + 1):
            self.port = free_ports(1)[0]
            self._spawn()
            try:
                self._wait_ready()
                return
            except BenchError:
                log = log_tail(self.log_path, _OUTPUT_TAIL_CHARS)
                self.stop()
                if "could not bind" not in log or attempt == PORT_RACE_ATTEMPTS:
                    raise

    def _spawn(self) -> None:
        settings = {
            "port": str(self.port),
            "listen_addresses": HOST,
            "unix_socket_directories": str(self.dir),
            "fsync": "on",
            "synchronous_commit": "on",
            "full_page_writes": "on",
            "max_connections": str(self.max_connections),
        }
        argv = [find_postgres_tool("postgres"), "-D", str(self.data_dir)]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(  # type: ignore[call-overload]
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                env=_clean_env(("PG",)),
                **self._as_postgres(),
            )

    def _wait_ready(self) -> None:
        pg_isready = find_postgres_tool("pg_isready")
        deadline = time.monotonic() + _PG_READY_TIMEOUT_S
        while True:
            process = self._process
            if process is None or process.poll() is not None:
                code = None if process is None else process.returncode
                raise BenchError("postgres", f"exited with code {code}", log_tail(self.log_path, _OUTPUT_TAIL_CHARS))
            probe = subprocess.run(
                [pg_isready, "-q", "-h", HOST, "-p", str(self.port), "-U", "postgres", "-t", "1"],
                capture_output=True,
                check=False,
                env=_clean_env(("PG",)),
            )
            if probe.returncode == 0:
                return
            if time.monotonic() > deadline:
                tail = log_tail(self.log_path, _OUTPUT_TAIL_CHARS)
                raise BenchError("postgres", f"not ready after {_PG_READY_TIMEOUT_S:.0f}s", tail)
            time.sleep(_POLL_INTERVAL_S)

    def psql(self, sql: str) -> str:
        script = self.dir / "psql_input.sql"
        script.write_text(sql, encoding="utf-8")
        return self._run(
            [find_postgres_tool("psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", HOST, "-p", str(self.port), "-U", "postgres", "-d", "postgres", "-f", str(script)],
            as_postgres=False,
        )  # fmt: skip

    def version(self) -> str:
        """``15.20 (Debian 15.20-0+deb12u1)``: the running server's own answer."""
        return self.psql("SHOW server_version;").strip()

    def stop(self) -> None:
        """Fast shutdown of our postmaster (by its pid); escalate if it hangs. Idempotent."""
        process = self._process
        if process is None:
            return
        for signum in (signal.SIGINT, signal.SIGQUIT):
            if process.poll() is not None:
                break
            process.send_signal(signum)
            try:
                process.wait(_PG_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                continue
        if process.poll() is None:
            process.kill()
            process.wait()
        self._process = None

    def __enter__(self) -> PostgresServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


_PGBENCH_TPS = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.MULTILINE)
_PGBENCH_PROCESSED = re.compile(r"^number of transactions actually processed: (\d+)", re.MULTILINE)
_PGBENCH_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.MULTILINE)


def read_pgbench_logs(paths: Sequence[Path]) -> tuple[list[float], int]:
    """(sorted latencies in ms of the transactions that succeeded, count of the others)
    from pgbench ``-l`` logs. Line format (PG 15): ``client_id transaction_no time
    script_no time_epoch time_us [...]`` with ``time`` the latency in microseconds, or
    ``failed``/``skipped``."""
    latencies: list[float] = []
    failed = 0
    for path in paths:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                if fields[2].isdigit():
                    latencies.append(int(fields[2]) / 1000.0)
                else:
                    failed += 1
    latencies.sort()
    return latencies, failed


def parse_pgbench_output(output: str) -> tuple[float, int, int]:
    """(tps, processed, failed) from pgbench's summary. BenchError if it has none."""
    tps = _PGBENCH_TPS.search(output)
    processed = _PGBENCH_PROCESSED.search(output)
    if tps is None or processed is None:
        raise BenchError("pgbench", "no tps/processed lines in its output", _tail(output))
    failed = _PGBENCH_FAILED.search(output)
    return float(tps.group(1)), int(processed.group(1)), int(failed.group(1)) if failed else 0


def run_pgbench(
    server: PostgresServer,
    script: PgScript,
    *,
    connections: int,
    seconds: float,
    work_dir: Path,
    items_per_op: int = 1,
) -> Measurement:
    """pgbench with a custom script: ``connections`` clients, min(2, connections) threads.

    The rate is pgbench's own tps ("without initial connection time", so 64 connection
    handshakes do not count against the peer); the latency percentiles come from the
    per-transaction log (see the module docstring)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    for old in work_dir.glob("pgbench_log*"):
        old.unlink()
    script_path = work_dir / "pgbench_script.sql"
    script_path.write_text(script.sql, encoding="utf-8")
    duration = whole_seconds(seconds)
    variables = [f"--define={name}={value}" for name, value in script.variables.items()]
    argv = [
        find_postgres_tool("pgbench"),
        "-n",  # no vacuum of pgbench's own tables, which do not exist here
        "-h", HOST, "-p", str(server.port), "-U", "postgres",
        "-M", "prepared",
        "-c", str(connections), "-j", str(min(2, connections)),
        "-T", str(duration),
        "-f", str(script_path),
        "-l", "--log-prefix", str(work_dir / "pgbench_log"),
        *variables,
        "postgres",
    ]  # fmt: skip
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=duration + _TOOL_GRACE_S,
            check=False,
            cwd=work_dir,
            env=_clean_env(("PG",)),
        )
    except subprocess.TimeoutExpired as e:
        raise BenchError("pgbench", f"did not finish within {duration + _TOOL_GRACE_S:.0f}s") from e
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise BenchError("pgbench", f"exit code {done.returncode}", _tail(output))
    tps, processed, failed = parse_pgbench_output(output)
    latencies, failed_in_log = read_pgbench_logs(sorted(work_dir.glob("pgbench_log*")))
    for log in work_dir.glob("pgbench_log*"):
        log.unlink()
    ok = processed - failed
    return Measurement(
        ops_ok=ok,
        errors=max(failed, failed_in_log),
        seconds=ok / tps if tps > 0 else float(duration),
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        items_per_op=items_per_op,
    )


# ----------------------------------------------------------------------------- etcd

ETCD_PEER_HEARTBEAT_MS = 100  # etcd's defaults: the peer runs as shipped
ETCD_PEER_ELECTION_TIMEOUT_MS = 1000

ETCD_VALUE = ("v" * ETCD_VALUE_BYTES).encode()

# Keys are unique per request (tag / thread / counter / item) and must be base64 in the
# JSON gateway, so the script carries a small base64 encoder; the value is constant and
# encoded once, here.
_ETCD_LUA = r"""
local headers = {["Content-Type"] = "application/json"}
local value_b64 = @VALUE@
local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

local function b64(s)
  local out = {}
  for i = 1, #s, 3 do
    local a, b, c = s:byte(i, i + 2)
    local n = a * 65536 + (b or 0) * 256 + (c or 0)
    local i1 = math.floor(n / 262144) % 64 + 1
    local i2 = math.floor(n / 4096) % 64 + 1
    local i3 = math.floor(n / 64) % 64 + 1
    local i4 = n % 64 + 1
    out[#out + 1] = alphabet:sub(i1, i1) .. alphabet:sub(i2, i2) ..
      (b and alphabet:sub(i3, i3) or "=") .. (c and alphabet:sub(i4, i4) or "=")
  end
  return table.concat(out)
end

local function put(key)
  return '{"key":"' .. b64(key) .. '","value":"' .. value_b64 .. '"}'
end

function init(args)
  tag = args[1]
  batch = tonumber(args[2])
  counter = 0
end

function request()
  counter = counter + 1
  local key = "bench/" .. tag .. "/" .. thread_no .. "/" .. counter
  if batch == 0 then
    return wrk.format("POST", "/v3/kv/put", headers, put(key))
  end
  local ops = {}
  for i = 1, batch do
    ops[i] = '{"requestPut":' .. put(key .. "/" .. i) .. '}'
  end
  return wrk.format("POST", "/v3/kv/txn", headers, '{"success":[' .. table.concat(ops, ",") .. ']}')
end
"""


def etcd_put_script() -> str:
    """wrk script: args ``TAG BATCH``; BATCH 0 = one put per request, N = a txn of N puts."""
    return _ETCD_LUA.replace("@VALUE@", lua_long_string(base64.b64encode(ETCD_VALUE).decode()))


def etcd_put_args(tag: str, batch: int = 0) -> list[str]:
    if not 0 <= batch <= ETCD_MAX_TXN_OPS:
        raise ConfigError(f"an etcd transaction takes at most {ETCD_MAX_TXN_OPS} operations, not {batch}")
    return [tag, str(batch)]


def start_etcd_peer(base_dir: Path, size: int = 3) -> EtcdCluster:
    """A ``size``-member etcd cluster with etcd's default timings, ready to take writes.
    The caller stops it (``cluster.stop()``) in ``finally``."""
    cluster = EtcdCluster(
        base_dir,
        size,
        heartbeat_ms=ETCD_PEER_HEARTBEAT_MS,
        election_timeout_ms=ETCD_PEER_ELECTION_TIMEOUT_MS,
        name_prefix="peer",
    )
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def etcd_leader_url(cluster: EtcdCluster, timeout_s: float = 20.0) -> str:
    """Client URL of the raft leader: writes sent there skip one forwarding hop, as
    walstore's rows send theirs to its leader."""
    deadline = time.monotonic() + timeout_s
    while True:
        index = cluster.leader_index()
        if index is not None:
            return cluster.members[index].client_url
        if time.monotonic() > deadline:
            raise BenchError("etcd", f"no leader after {timeout_s:.0f}s", cluster.members[0].log_tail())
        time.sleep(_POLL_INTERVAL_S)


def _etcd_call(url: str, path: str, body: dict[str, object] | None = None, timeout_s: float = 10.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}{path}", data=data, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except (OSError, ValueError) as e:
        raise BenchError("etcd", f"{path}: {e}") from None


def etcd_count_keys(url: str, prefix: str) -> int:
    """How many keys start with ``prefix`` (a count-only range over [prefix, prefix+1))."""
    raw = prefix.encode()
    end = raw[:-1] + bytes([raw[-1] + 1])
    answer = _etcd_call(
        url,
        "/v3/kv/range",
        {"key": base64.b64encode(raw).decode(), "range_end": base64.b64encode(end).decode(), "count_only": True},
    )
    try:
        # int64 fields are strings in the gateway's JSON; an absent count means zero
        return int(answer.get("count", 0))
    except (AttributeError, TypeError, ValueError):
        raise BenchError("etcd", f"unreadable range answer: {answer!r}") from None


def etcd_version(url: str) -> str:
    answer = _etcd_call(url, "/version")
    return str(answer.get("etcdserver", "?")) if isinstance(answer, dict) else "?"
