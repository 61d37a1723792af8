"""Start, wait for and stop one local ``walstore serve`` process: the one launcher.

``walstore cluster`` (``walstore.local_cluster``), the benchmarks' ``WalstoreServers``
(``walstore.bench.http_bench``) and the tests' process harnesses all start nodes through
here, so a fix to how a node is configured, started, waited for or stopped reaches every
one of them. etcd members are ``walstore.election.etcd_process``'s; this module uses its
``stop_child`` so both kinds of process stop the same way.

* ``node_env``: a node's environment, never inheriting the caller's walstore settings.
* ``spawn_server``: start it, its output appended to a log after a banner line.
* ``wait_live`` / ``http_answer``: poll its HTTP health until it serves (or exits).
* ``stop_process`` / ``stop_processes``: SIGTERM (once), SIGKILL after a timeout, reap.
* ``ProcessRecord``: a pid and its start time, so a process is recognised again by pid
  after we have lost its ``Popen`` handle, and a pid since reused by another program is
  never signalled.
* ``log_tail`` / ``lost_port_race``: why a node did not start.

Blocking (plain ``subprocess``): from trio, call it through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from walstore.config import ENV_VARS
from walstore.election.etcd_process import reap_child, stop_child
from walstore.errors import WalstoreError

HOST = "127.0.0.1"
# Python start-up, WAL recovery and an etcd session on a loaded 2-core machine.
READY_TIMEOUT_S = 30.0
# A node finishes its in-flight batch on SIGTERM (its SHUTDOWN_GRACE_S is 5 s); then SIGKILL.
STOP_TIMEOUT_S = 8.0
POLL_INTERVAL_S = 0.05
LOG_TAIL_BYTES = 4000


class LaunchError(WalstoreError):
    """A local process could not be started or is not the one we started (one line)."""


# -- processes by pid ------------------------------------------------------------------------


def process_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if no live process has
    that pid (a zombie counts as gone: it has exited, only its parent has not reaped it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself contain ") ".
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def process_state(pid: int) -> str | None:
    """``R``/``S``/``D``/``T`` (stopped)...; None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[0]


@dataclass(frozen=True, slots=True)
class ProcessRecord:
    """A process we started, as written down: its pid and when it started. Signalling goes
    through here so that a pid the kernel has since given to another program is never hit."""

    pid: int
    start_ticks: int

    @classmethod
    def of(cls, pid: int) -> ProcessRecord:
        """The record of a process we just started; LaunchError if it is already gone."""
        ticks = process_start_ticks(pid)
        if ticks is None:
            raise LaunchError(f"process {pid} exited as soon as it started")
        return cls(pid, ticks)

    @property
    def alive(self) -> bool:
        """The pid still names this process: running (or paused), not exited, not reused."""
        return process_start_ticks(self.pid) == self.start_ticks

    @property
    def paused(self) -> bool:
        """Alive and stopped by SIGSTOP (``cluster ps`` shows it as paused)."""
        return self.alive and process_state(self.pid) in ("T", "t")

    def signal(self, sig: int) -> bool:
        """Send ``sig`` if this is still our process; False if it is gone."""
        if not self.alive:
            return False
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def wait_gone(self, timeout_s: float) -> bool:
        """Until it has exited; False if it still runs after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self.alive:
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_INTERVAL_S)
        return True

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (and SIGCONT, so a paused process sees it); SIGKILL after ``timeout_s``."""
        if self.signal(signal.SIGTERM):
            self.signal(signal.SIGCONT)
            if not self.wait_gone(timeout_s):
                self.signal(signal.SIGKILL)
                self.wait_gone(timeout_s)

    def to_json(self) -> dict[str, int]:
        """As cluster.json keeps it (``local_cluster.record_of`` reads it back)."""
        return {"pid": self.pid, "start_ticks": self.start_ticks}


# -- one node: environment, start, wait --------------------------------------------------------


def node_env(
    *,
    node_id: str,
    http_port: int,
    peer_port: int,
    peers: str,
    data_dir: Path,
    cluster_id: str | None = None,
    etcd_endpoints: Sequence[str] = (),
    lease_ttl_s: float | None = None,
    overrides: Mapping[str, str] | None = None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of one ``walstore serve`` on loopback. The caller's own walstore
    settings (NODE_ID, PEERS, ...) are dropped first: a node must never pick up the shell's
    idea of which cluster it is in. ``cluster_id`` and ``lease_ttl_s`` left None keep
    walstore's defaults (a single node needs neither); ``overrides`` win over everything."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in ENV_VARS}
    env.update(
        NODE_ID=node_id,
        HTTP_HOST=HOST,
        HTTP_PORT=str(http_port),
        PEER_HOST=HOST,
        PEER_PORT=str(peer_port),
        PEERS=peers,
        DATA_DIR=str(data_dir),
        # Log lines reach the file as they happen, not when a buffer fills (or never, on SIGKILL).
        PYTHONUNBUFFERED="1",
    )
    if cluster_id is not None:
        env["CLUSTER_ID"] = cluster_id
    if lease_ttl_s is not None:
        env["LEASE_TTL_S"] = str(lease_ttl_s)
    if etcd_endpoints:
        env["ETCD_ENDPOINTS"] = ",".join(etcd_endpoints)
    env.update(overrides or {})
    return env


def server_command(prefix: Sequence[str] = ()) -> list[str]:
    """argv of a node; ``prefix`` (e.g. ``env LD_PRELOAD=...``) must exec it, not fork it:
    the pid we signal is the pid of the first program."""
    return [*prefix, sys.executable, "-m", "walstore", "serve"]


def spawn_server(
    env: Mapping[str, str],
    log_path: Path,
    *,
    prefix: Sequence[str] = (),
    command: Sequence[str] | None = None,
    banner: str | None = None,
    new_session: bool = False,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start one node, its output appended to ``log_path`` (after ``banner``, a line that
    marks where this start's output begins). ``command`` replaces the whole argv (the
    benchmarks' ``server_argv`` seam, an installed ``walstore`` script); ``new_session``
    keeps a Ctrl-C in the shell that ran ``walstore cluster start`` from reaching the node;
    ``cwd`` (default: ours) lets a test run it where no source tree shadows the install."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        if banner is not None:
            log.write(f"{banner}\n".encode())
            log.flush()
        return subprocess.Popen(
            list(command) if command is not None else server_command(prefix),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,
            cwd=cwd,
        )


def log_tail(path: Path, n_bytes: int = LOG_TAIL_BYTES) -> str:
    """The last ``n_bytes`` of a log, for an error message; empty if it cannot be read."""
    try:
        with open(path, "rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - n_bytes))
            return log.read().decode("utf-8", "replace")
    except OSError:
        return ""


def lost_port_race(log_path: Path) -> bool:
    """The node's last words say another process took its port (``walstore serve`` prints
    "address already in use" for that, whatever the errno's wording)."""
    return "address already in use" in log_tail(log_path).lower()


def http_answer(port: int, path: str, timeout_s: float = 1.0) -> tuple[int, Any] | None:
    """(status, decoded JSON or None) of ``GET path`` on a loopback node, or None when it
    does not answer in time."""
    import http.client

    conn = http.client.HTTPConnection(HOST, port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        raw = response.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()
    try:
        # orjson: the harness reads whole logs through here, page by page, and fast.
        return response.status, orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return response.status, None


def wait_live(
    port: int,
    running: Callable[[], bool],
    timeout_s: float,
    describe: Callable[[], str] = lambda: "",
    *,
    path: str = "/health/live",
) -> None:
    """Until the node on ``port`` answers 200 on ``path`` (/health/live: it serves HTTP;
    /health/ready: it also has a leader and has caught up). TimeoutError (with
    ``describe()``, e.g. a log tail) if it exits first or takes longer than ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if not running():
            raise TimeoutError(f"exited before serving HTTP; {describe()}")
        answer = http_answer(port, path)
        if answer is not None and answer[0] == 200:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"did not serve HTTP within {timeout_s}s; {describe()}")
        time.sleep(POLL_INTERVAL_S)


def running(process: subprocess.Popen[bytes]) -> Callable[[], bool]:
    """``wait_live``'s ``running`` for a child we hold the handle of."""
    return lambda: process.poll() is None


# -- stopping ----------------------------------------------------------------------------------


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM our child (by its Popen handle), SIGKILL after ``timeout_s``, then reap it:
    etcd_process.stop_child with a node's longer timeout (a node drains before it exits)."""
    stop_child(process, timeout_s)


def stop_processes(processes: Iterable[subprocess.Popen[bytes]], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """``stop_process`` for several children at once: SIGTERM (and SIGCONT, for a paused
    one) to every live one first, so that they drain side by side, then reap each within
    one shared ``timeout_s`` (SIGKILL past it; never a second SIGTERM)."""
    live = [p for p in processes if p.poll() is None]
    for process in live:
        process.send_signal(signal.SIGTERM)
        process.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + timeout_s
    for process in live:
        reap_child(process, max(0.1, deadline - time.monotonic()))
