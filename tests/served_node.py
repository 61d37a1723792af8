"""One ``walstore serve`` process for tests that need a live node from the outside: the
installed-package smoke test runs the ``walstore`` script of a fresh venv, the schemathesis
run drives the dev install. Ports come from the OS; the process is started, waited for and
stopped (by its pid) by the one launcher, ``walstore.launcher``."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from walstore import launcher
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
        """Start it through the one launcher (``walstore.launcher``) and wait until ready."""
        http_port, peer_port = free_ports(2)
        self.port = http_port
        env = launcher.node_env(
            node_id="solo",
            http_port=http_port,
            peer_port=peer_port,
            peers="",
            data_dir=self.workdir / "data",
            overrides={"SEGMENT_SIZE_BYTES": str(1 << 20)},
            base=self.env,
        )
        # cwd is the test's own directory, so no source tree can shadow what is installed
        self.proc = launcher.spawn_server(env, self.log_path, command=self.command, cwd=self.workdir)
        try:
            launcher.wait_live(
                http_port, launcher.running(self.proc), timeout_s, self.log_path.read_text, path="/health/ready"
            )
        except TimeoutError as e:
            raise AssertionError(f"{self.command}: {e}") from None

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 10 s; the exit status (None if never started)."""
        if self.proc is None:
            return None
        launcher.stop_process(self.proc, 10)
        return self.proc.returncode

    def __enter__(self) -> ServedNode:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
