"""Launch and stop real etcd server processes on local ports the OS hands out.

One job: run a throw-away etcd cluster (1 or 3 members, any size really) for the tests, the
fault scripts and ``walstore cluster up``. Every member listens on 127.0.0.1 only, on ports
found by binding port 0, in its own directory under ``base_dir``::

    base_dir/
      <name>.etcd/    the member's data directory (kept across stop/start: a restart
                      rejoins the cluster with its old identity and log)
      <name>.log      the member's stdout and stderr, appended on every start

Only processes this module started are ever signalled, always through their own
``Popen`` handle (by pid): another etcd on the machine, on 2379 or anywhere else, is never
touched. Blocking (plain ``subprocess``): from trio, call it through
``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from walstore.errors import ConfigError, ElectionError

HOST = "127.0.0.1"
# 10 ms heartbeats and a 100 ms election timeout make a fresh member ready in ~0.2 s and
# let a 3-member cluster re-elect within a few hundred ms after a kill; fine on loopback.
DEFAULT_HEARTBEAT_MS = 10
DEFAULT_ELECTION_TIMEOUT_MS = 100
# Generous: a loaded 2-core CI machine can take seconds to fsync etcd's first WAL.
DEFAULT_READY_TIMEOUT_S = 20.0
# etcd shuts down in milliseconds on SIGTERM; past this it gets SIGKILL.
DEFAULT_STOP_TIMEOUT_S = 5.0
# A port found free can be taken by another process before etcd binds it: retry the
# whole start with fresh ports this many times before giving up.
PORT_RACE_ATTEMPTS = 4
_POLL_INTERVAL_S = 0.02
_LAST_MEMBER_GRACE_S = 1.0
# A request that reaches etcd's listener before the member has joined its cluster can
# hang forever instead of being answered later: ask again soon rather than wait on it.
_HEALTH_REQUEST_TIMEOUT_S = 0.25
_LOG_TAIL_BYTES = 2000


def stop_child(process: subprocess.Popen[bytes], timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> None:
    """SIGTERM our child (by its Popen handle; a SIGSTOPped one is continued so that it sees
    it), SIGKILL if it has not exited within ``timeout_s``, then reap it."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.send_signal(signal.SIGCONT)
        reap_child(process, timeout_s)


def reap_child(process: subprocess.Popen[bytes], timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> None:
    """Wait for a child that has been signalled already; SIGKILL it if it has not exited
    within ``timeout_s``. Never a second SIGTERM: a walstore node restores SIGTERM's default
    action once it has seen one, so another would kill it in the middle of its drain."""
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def find_etcd_binary(explicit: str | None = None) -> str:
    """The etcd server executable: ``explicit``, else ``$WALSTORE_ETCD_BINARY``, else ``etcd``
    on PATH, else Debian's ``/usr/bin/etcd``. ConfigError if it is not an executable file
    (``make test`` installs Debian's etcd-server)."""
    candidate = explicit or os.environ.get("WALSTORE_ETCD_BINARY") or shutil.which("etcd") or "/usr/bin/etcd"
    if not (os.path.isfile(candidate) and os.access(candidate, os.X_OK)):
        raise ConfigError(
            f"etcd server binary not found ({candidate}); install Debian's etcd-server "
            "(`make test-deps`) or set WALSTORE_ETCD_BINARY"
        )
    return candidate


# Ports below the kernel's ephemeral range are tried first, from here up.
_LOWEST_CHOSEN_PORT = 10_000
_DEFAULT_EPHEMERAL_FIRST = 32_768  # Linux's default ip_local_port_range starts here


def _ephemeral_first() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return _DEFAULT_EPHEMERAL_FIRST


def free_ports(count: int, host: str = HOST) -> list[int]:
    """``count`` distinct ports that were free a moment ago.

    Chosen at random below the kernel's ephemeral range when there is room: ``bind(0)``
    hands out ports from that range, and so does every outgoing ``connect`` for its source
    port, so a port found there can be taken by any client connection before our server
    binds it (a test saw "Address already in use" that way). Below the range only a server
    binding that very port can take it. Each port is checked by binding it, and all
    sockets are held open until every port is chosen, so the list has no duplicates;
    another process can still take one before it is used, which callers that start
    servers handle by retrying (see ``PORT_RACE_ATTEMPTS``)."""
    first_ephemeral = _ephemeral_first()
    pool = range(_LOWEST_CHOSEN_PORT, first_ephemeral)
    candidates = random.sample(pool, min(len(pool), 20 * count)) if len(pool) >= 4 * count else []
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for port in candidates:
            if len(ports) == count:
                break
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind((host, port))
            except OSError:
                sock.close()  # taken (or lingering in TIME_WAIT): try another
                continue
            stack.enter_context(sock)
            ports.append(port)
        while len(ports) < count:  # no room below the ephemeral range: the kernel's pick
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def _is_healthy(client_url: str, timeout_s: float) -> bool:
    """etcd's /health says true only when the member has a leader and serves a read."""
    try:
        with urllib.request.urlopen(f"{client_url}/health", timeout=timeout_s) as response:
            body = json.loads(response.read())
    except (OSError, ValueError):
        return False
    return isinstance(body, dict) and body.get("health") == "true"


class EtcdMember:
    """One etcd server process: its name, ports, directory and (while running) process."""

    def __init__(self, name: str, base_dir: Path, client_port: int, peer_port: int) -> None:
        self.name = name
        self.base_dir = base_dir
        self.client_port = client_port
        self.peer_port = peer_port
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        return self.base_dir / f"{self.name}.etcd"

    @property
    def log_path(self) -> Path:
        return self.base_dir / f"{self.name}.log"

    @property
    def endpoint(self) -> str:
        """``host:port`` of the client (gRPC) listener: the form ``ETCD_ENDPOINTS`` uses."""
        return f"{HOST}:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"http://{HOST}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{HOST}:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        """True while the process we started has not exited (a paused one is running)."""
        return self._process is not None and self._process.poll() is None

    def spawn(self, binary: str, initial_cluster: str, token: str, heartbeat_ms: int, election_timeout_ms: int) -> None:
        """Start the process without waiting for it to be ready."""
        if self.running:
            raise ElectionError(f"etcd member {self.name} is already running (pid {self.pid})")
        self.base_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            binary,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", initial_cluster,
            # Ignored by etcd when the data directory already holds a member: a restart
            # rejoins with the identity it has on disk.
            "--initial-cluster-state", "new",
            "--initial-cluster-token", token,
            "--heartbeat-interval", str(heartbeat_ms),
            "--election-timeout", str(election_timeout_ms),
            "--logger", "zap",
            "--log-outputs", "stderr",
            "--log-level", "warn",
        ]  # fmt: skip
        # ETCD_* variables from the caller's environment would override these flags.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
            )

    def log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - _LOG_TAIL_BYTES))
                return log.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def lost_port_race(self) -> bool:
        """The member exited because another process took one of its ports."""
        return not self.running and "address already in use" in self.log_tail()

    def wait_ready(self, timeout_s: float = DEFAULT_READY_TIMEOUT_S) -> None:
        """Block until the member reports healthy; ElectionError if it exits or times out."""
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.running:
                raise ElectionError(
                    f"etcd member {self.name} exited (code {self._returncode()}); log tail:\n{self.log_tail()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ElectionError(
                    f"etcd member {self.name} not healthy after {timeout_s:.1f}s; log tail:\n{self.log_tail()}"
                )
            if _is_healthy(self.client_url, min(_HEALTH_REQUEST_TIMEOUT_S, remaining)):
                return
            time.sleep(_POLL_INTERVAL_S)

    def _returncode(self) -> int | None:
        return self._process.returncode if self._process is not None else None

    def send_signal(self, signum: int) -> None:
        """Signal our own process (by its pid); a no-op once it has exited."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signum)

    def stop(self, timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout_s``; then reap it.
        A paused (SIGSTOPped) member is continued first so that it can see the SIGTERM."""
        process = self._process
        if process is None:
            return
        stop_child(process, timeout_s)
        self._process = None

    def kill(self) -> None:
        """SIGKILL (a crash: no clean shutdown) and reap."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait()
        self._process = None


class EtcdCluster:
    """A local etcd cluster of ``size`` members, started with ``start()`` and stopped
    with ``stop()`` (or used as a context manager). Members can be stopped, killed, paused
    and restarted one at a time for fault tests; ``endpoints`` lists every member's
    ``127.0.0.1:PORT`` whether it runs or not."""

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        size: int = 1,
        *,
        binary: str | None = None,
        heartbeat_ms: int = DEFAULT_HEARTBEAT_MS,
        election_timeout_ms: int = DEFAULT_ELECTION_TIMEOUT_MS,
        name_prefix: str = "etcd",
        port_allocator: Callable[[int], list[int]] = free_ports,
    ) -> None:
        if size < 1:
            raise ConfigError(f"an etcd cluster needs at least one member, got {size}")
        if heartbeat_ms < 1 or election_timeout_ms < 5 * heartbeat_ms:
            # etcd itself refuses an election timeout below 5 heartbeats.
            raise ConfigError(
                f"etcd election timeout ({election_timeout_ms} ms) must be >= 5 heartbeats ({heartbeat_ms} ms)"
            )
        self.base_dir = Path(base_dir)
        self.size = size
        self.binary = find_etcd_binary(binary)
        self.heartbeat_ms = heartbeat_ms
        self.election_timeout_ms = election_timeout_ms
        self.name_prefix = name_prefix
        # A seam for tests of the port-race retry; anything else wants free_ports.
        self._allocate_ports = port_allocator
        # Distinct per cluster so members of two test clusters can never join each other.
        self.token = f"walstore-{os.getpid()}-{time.monotonic_ns()}"
        self.members: list[EtcdMember] = []

    @property
    def endpoints(self) -> list[str]:
        return [member.endpoint for member in self.members]

    @property
    def initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    def start(self, timeout_s: float = DEFAULT_READY_TIMEOUT_S) -> None:
        """Start a new cluster: every member on fresh ports, in a fresh data directory; wait
        until each is healthy."""
        if self.members:
            raise ElectionError("etcd cluster already started; use start_member() to restart one")
        for i in range(self.size):
            stale = self.base_dir / f"{self.name_prefix}{i}.etcd"
            if stale.exists():
                # Its stored member identity names other ports: it could never rejoin.
                raise ElectionError(f"{stale} is left from another cluster; use a fresh base_dir")
        for attempt in range(1, PORT_RACE_ATTEMPTS + 1):
            ports = self._allocate_ports(2 * self.size)
            self.members = [
                EtcdMember(f"{self.name_prefix}{i}", self.base_dir, ports[2 * i], ports[2 * i + 1])
                for i in range(self.size)
            ]
            try:
                for member in self.members:
                    self._spawn(member)
                for member in self.members:
                    member.wait_ready(timeout_s)
                return
            except ElectionError:
                raced = any(member.lost_port_race() for member in self.members)
                self._stop_all()
                for member in self.members:
                    # A failed first start leaves half-initialised data directories that
                    # would pin the old ports; the next attempt starts clean.
                    shutil.rmtree(member.data_dir, ignore_errors=True)
                self.members = []
                if not raced or attempt == PORT_RACE_ATTEMPTS:
                    raise

    def _spawn(self, member: EtcdMember) -> None:
        member.spawn(self.binary, self.initial_cluster, self.token, self.heartbeat_ms, self.election_timeout_ms)

    def start_member(self, index: int, *, wait: bool = True, timeout_s: float = DEFAULT_READY_TIMEOUT_S) -> None:
        """(Re)start one member on its old ports and data directory. ``wait`` blocks until it
        is healthy, which needs a quorum of the cluster running."""
        member = self.members[index]
        self._spawn(member)
        if wait:
            member.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float = DEFAULT_READY_TIMEOUT_S, indexes: Sequence[int] | None = None) -> None:
        """Block until the given (default: every running) member is healthy."""
        chosen = range(len(self.members)) if indexes is None else indexes
        for i in chosen:
            if indexes is not None or self.members[i].running:
                self.members[i].wait_ready(timeout_s)

    def stop_member(self, index: int) -> None:
        self.members[index].stop()

    def kill_member(self, index: int) -> None:
        self.members[index].kill()

    def pause_member(self, index: int) -> None:
        """SIGSTOP: the process keeps its sockets but answers nothing (a hung node)."""
        self.members[index].send_signal(signal.SIGSTOP)

    def resume_member(self, index: int) -> None:
        self.members[index].send_signal(signal.SIGCONT)

    def leader_index(self, timeout_s: float = 1.0) -> int | None:
        """Index of the member etcd currently reports as its raft leader, if any answers."""
        for i, member in enumerate(self.members):
            if not member.running:
                continue
            try:
                request = urllib.request.Request(
                    f"{member.client_url}/v3/maintenance/status", data=b"{}", method="POST"
                )
                with urllib.request.urlopen(request, timeout=timeout_s) as response:
                    status = json.loads(response.read())
                header_member = status["header"]["member_id"]
                leader = status["leader"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if header_member == leader:
                return i
        return None

    def _stop_all(self) -> None:
        # A stopping raft leader first tries to hand leadership to a follower and can wait
        # ~5 s for that when the followers are stopping too. Followers go first, together;
        # the leader, alone by then, gets a short grace and then SIGKILL, which costs
        # nothing: etcd's log is fsynced, and nobody is left to lead.
        leader = self.leader_index(timeout_s=_HEALTH_REQUEST_TIMEOUT_S)
        followers = [m for i, m in enumerate(self.members) if i != leader]
        for member in followers:
            member.send_signal(signal.SIGTERM)
        for member in followers:
            member.stop()
        for member in self.members:
            member.stop(timeout_s=_LAST_MEMBER_GRACE_S)

    def stop(self) -> None:
        """Stop every member (SIGTERM, then SIGKILL after a timeout). Idempotent."""
        self._stop_all()

    def __enter__(self) -> EtcdCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
