"""One ``walstore serve`` process for tests that need a live node from the outside: the
installed-package smoke test runs the ``walstore`` script of a fresh venv, the schemathesis
run drives the dev install. Ports come from the OS; the process is stopped by its pid."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from walstore.client import WalstoreClient
from walstore.election.etcd_process import free_ports


class ServedNode:
    """A single embedded node (no peers, no etcd) started from ``command``."""

    def __init__(self, command: Sequence[str], workdir: Path, *, env: dict[str, str] | None = None) -> None:
        self.command = list(command)
        self.workdir = workdir
        self.env = env
        self.log_path = workdir / "server.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> None:
        http_port, peer_port = free_ports(2)
        self.port = http_port
        env = dict(
            self.env if self.env is not None else os.environ,
            NODE_ID="solo",
            HTTP_HOST="127.0.0.1",
            HTTP_PORT=str(http_port),
            PEER_HOST="127.0.0.1",
            PEER_PORT=str(peer_port),
            DATA_DIR=str(self.workdir / "data"),
            SEGMENT_SIZE_BYTES=str(1 << 20),
        )
        with self.log_path.open("ab") as log:
            # cwd is the test's own directory, so no source tree can shadow what is installed
            self.proc = subprocess.Popen(self.command, env=env, cwd=self.workdir, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.command} exited {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                with WalstoreClient(self.url, timeout_s=1) as client:
                    if client.request("GET", "/health/ready", check=False).status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"not ready within {timeout_s} s:\n{self.log_path.read_text()}")

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 10 s; the exit status (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> ServedNode:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
