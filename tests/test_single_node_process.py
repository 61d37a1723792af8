"""The embedded single node as users run it: a real `walstore serve` process.

Crash safety (kill -9 under load from several clients: every acknowledged event is back
after a restart, at the same index and version, with no duplicate ids), torn-tail repair
at start-up, refusal to start on mid-log corruption (naming file and offset, like
`walstore wal verify`), and SIGTERM exiting 0.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from walstore import launcher
from walstore.client import ClientError, WalstoreClient
from walstore.election.etcd_process import free_ports

pytestmark = pytest.mark.slow


class Server:
    def __init__(self, data_dir: Path, log_path: Path) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait: bool = True, segment_size: int = 1 << 20) -> None:
        """Start ``walstore serve`` through the one launcher (``walstore.launcher``)."""
        self.port, peer_port = free_ports(2)
        env = launcher.node_env(
            node_id="solo",
            http_port=self.port,
            peer_port=peer_port,
            peers="",
            data_dir=self.data_dir,
            overrides={"SEGMENT_SIZE_BYTES": str(segment_size)},
        )
        self.proc = launcher.spawn_server(env, self.log_path)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout_s: float = 20.0) -> None:
        assert self.proc is not None
        try:
            launcher.wait_live(
                self.port, launcher.running(self.proc), timeout_s, self.log_path.read_text, path="/health/ready"
            )
        except TimeoutError as e:
            raise AssertionError(f"server not ready: {e}") from None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=20)


@pytest.fixture
def server(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = Server(tmp_path / "data", tmp_path / "server.log")
    yield s
    if s.proc is not None and s.proc.poll() is None:
        s.proc.kill()
        s.proc.wait()


def test_kill_9_under_load_loses_no_acknowledged_event(server: Server) -> None:
    server.start()
    acked: list[dict[str, object]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def writer(worker: int) -> None:
        with WalstoreClient(server.url, timeout_s=5) as client:
            n = 0
            while not stop.is_set():
                body = {"id": str(uuid.uuid4()), "type": "T", "aggregate_id": f"w{worker}-{n % 3}", "payload": {"n": n}}
                try:
                    r = client.append(body)
                except (OSError, ClientError):
                    return  # the server died under us: outcome unknown, not counted
                with lock:
                    acked.append({**r, "aggregate_id": body["aggregate_id"]})
                n += 1

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    server.kill(signal.SIGKILL)
    stop.set()
    for t in threads:
        t.join(10)
    assert len(acked) > 50, "the load did not get going"
    server.start()
    with WalstoreClient(server.url) as client:
        log = []
        next_index = 1
        while True:
            page = client.read_log(from_index=next_index, limit=1000)
            log += page["events"]
            if not page["events"]:
                break
            next_index = page["next_index"]
    by_id = {e["id"]: e for e in log}
    assert len(by_id) == len(log), "duplicate event ids after restart"
    assert [e["index"] for e in log] == list(range(1, len(log) + 1)), "global index not gap-free"
    for a in acked:
        e = by_id.get(a["event_id"])
        assert e is not None, f"acknowledged event {a['event_id']} lost"
        assert (e["index"], e["version"], e["aggregate_id"]) == (a["index"], a["version"], a["aggregate_id"])
    versions: dict[str, int] = {}
    for e in log:
        versions[e["aggregate_id"]] = versions.get(e["aggregate_id"], 0) + 1
        assert e["version"] == versions[e["aggregate_id"]], "aggregate versions not gap-free"


def _segment(data_dir: Path) -> Path:
    return sorted(data_dir.glob("*.wal"))[-1]


def _append_some(server: Server, n: int) -> list[dict[str, object]]:
    with WalstoreClient(server.url) as client:
        return [
            client.append({"type": "T", "aggregate_id": "a", "payload": {"i": i, "pad": "x" * 100}}) for i in range(n)
        ]


def test_torn_tail_is_repaired_at_start_up(server: Server) -> None:
    server.start()
    acked = _append_some(server, 20)
    server.kill()
    seg = _segment(server.data_dir)
    # A torn write: garbage where the next record would have started.
    data = seg.read_bytes()
    end = len(data.rstrip(b"\0"))
    end += -end % 8
    with seg.open("r+b") as f:
        f.seek(end)
        f.write(b"\x55" * 40)
    verify = subprocess.run(
        [sys.executable, "-m", "walstore", "wal", "verify", str(server.data_dir)], capture_output=True, text=True
    )
    assert verify.returncode == 3, verify.stdout + verify.stderr
    server.start()
    with WalstoreClient(server.url) as client:
        events = client.read("a", limit=100)["events"]
        assert [e["id"] for e in events] == [a["event_id"] for a in acked]
        r = client.append({"type": "T", "aggregate_id": "a", "payload": {}})
        assert r["version"] == 21
    assert list(server.data_dir.glob("*.broken")), "no .broken copy of the torn tail was kept"


def test_bit_flip_mid_log_refuses_to_start_naming_file_and_offset(server: Server) -> None:
    server.start()
    _append_some(server, 30)
    server.kill()
    seg = _segment(server.data_dir)
    data = bytearray(seg.read_bytes())
    offset = 32 + 8 * 40  # inside an early record; valid records follow it
    data[offset] ^= 0x04
    seg.write_bytes(bytes(data))
    verify = subprocess.run(
        [sys.executable, "-m", "walstore", "wal", "verify", str(server.data_dir)], capture_output=True, text=True
    )
    assert verify.returncode == 1
    assert seg.name in verify.stdout + verify.stderr
    server.start(wait=False)
    assert server.proc is not None
    assert server.proc.wait(timeout=20) == 1
    log = server.log_path.read_text()
    assert "CorruptionError" in log and seg.name in log
    # The damaged record is named: it starts at or before the flipped byte, within a record.
    reported = [int(m) for m in re.findall(r"offset (\d+)", log)]
    assert reported and offset - 400 < reported[0] <= offset, (reported, offset)
    assert re.findall(r"offset (\d+)", verify.stdout + verify.stderr)[0] == str(reported[0])


def test_sigterm_exits_zero_after_finishing_writes(server: Server) -> None:
    server.start()
    _append_some(server, 5)
    assert server.kill(signal.SIGTERM) == 0
    server.start()
    with WalstoreClient(server.url) as client:
        assert client.read("a")["version"] == 5


def test_readme_curl_examples_work_as_written(server: Server) -> None:
    """The README's curl commands, run by bash against a real server (only the port differs)."""
    import json
    import shutil

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    commands = [b for b in blocks if "curl" in b and "localhost:8080/events" in b]
    assert commands, "no curl examples found in the README"
    assert shutil.which("curl"), "curl is needed to run the README's examples"
    server.start()
    outputs = []
    for block in commands:
        script = block.replace("localhost:8080", f"127.0.0.1:{server.port}")
        # Each answer on a line of its own; the commands themselves run as written.
        prelude = 'set -e\ncurl() { command curl -sS "$@"; echo; }\n'
        result = subprocess.run(["bash", "-c", prelude + script], capture_output=True, text=True, timeout=20)
        assert result.returncode == 0, (script, result.stderr)
        outputs += [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    created, read, status, health = outputs[:4]
    assert created["success"] is True and created["index"] == 1
    assert read["events"][0]["payload"] == {"name": "John Doe", "email": "john@example.com"}
    assert status["is_leader"] is True and health["status"] == "healthy"
