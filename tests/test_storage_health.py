"""What a node says and answers when its own disk fails, fills up or stalls (in-process:
real nodes and sockets on a simulated disk, ``walstore.wal.simfs``).

- A failed fdatasync is fatal, and an expected outcome of a bad disk: every request in
  flight gets 504 (submitted: it may be on disk) or 503 ``storage_failed``, never a 500,
  and the node's log holds one line about it, no traceback. Rot found by a read, a
  broken invariant on the write path and a failed fdatasync of the takeover's promise
  stop the node the same way.
- A full disk on a follower makes it not ready, says so in the log (not once per frame)
  and in ``walstore_disk_full``, and does not make writes forwarded through it wait for a
  local apply that cannot happen.
- With every disk full the answer is 503 ``disk_full``, not ``no_leader``.
- A leader whose fdatasync stalls stays the leader but is not ready (``slow_disk``).
"""

from __future__ import annotations

import http.client
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from exception_groups import leaves

from tests.cluster_inprocess import in_process_cluster, replicator
from walstore.config import from_env
from walstore.errors import FsyncError, LogStateError, UnavailableError
from walstore.event import NewEvent
from walstore.node import Node
from walstore.wal.fs import Buffer, WalFile
from walstore.wal.log import WalOptions, WriteAheadLog
from walstore.wal.record import KIND_EVENT
from walstore.wal.simfs import SimulatedFileSystem
from walstore.wal.writer import GroupCommitWriter


def event(aggregate: str = "agg", n: int = 0) -> NewEvent:
    return NewEvent(str(uuid.uuid4()), "T", aggregate, orjson.dumps({"n": n}), b"{}", None)


def http_get(port: int, path: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5.0)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    return response.status, (orjson.loads(raw) if path != "/metrics" else raw.decode())


def post_event(port: int, n: int) -> tuple[int | str, str | None]:
    """(HTTP status or how the connection failed, error code)."""
    body = orjson.dumps({"type": "T", "aggregate_id": f"eio-{n}", "payload": {"n": n}})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10.0)
    try:
        try:
            conn.connect()
        except OSError:
            return "refused", None  # nothing was sent: definite
        conn.request("POST", "/events", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        answer = orjson.loads(response.read())
    except (OSError, http.client.HTTPException) as exc:
        return f"lost:{type(exc).__name__}", None
    finally:
        conn.close()
    return response.status, (answer.get("error") or {}).get("code")


async def until(predicate: Callable[[], bool], timeout_s: float) -> None:
    with trio.fail_after(timeout_s):
        while True:
            if predicate():
                return
            await trio.sleep(0.02)


def metric(text: str, name: str) -> float:
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert values, f"{name} not in /metrics"
    return values[0]


def single_node(tmp_path: Path, fs: SimulatedFileSystem) -> Node:
    """A single node (not started) on ``fs``, its HTTP port chosen by the OS."""
    return Node(from_env({"DATA_DIR": str(tmp_path / "wal"), "HTTP_HOST": "127.0.0.1", "HTTP_PORT": "0"}), fs=fs)


@asynccontextmanager
async def node_that_may_stop(node: Node, stopped_by: list[BaseException]) -> AsyncIterator[None]:
    """Run ``node`` for the block and until it stops; why it stopped goes in ``stopped_by``
    (these nodes stop on purpose), for the asserts after the block."""

    async def run(task_status: trio.TaskStatus[Node]) -> None:
        try:
            await node.run(task_status=task_status)
        except BaseException as exc:
            stopped_by.append(exc)

    async with trio.open_nursery() as nursery:
        await nursery.start(run)
        yield


# -- a failed fdatasync ---------------------------------------------------------------------


async def test_fdatasync_eio_answers_every_request_in_flight_then_stops(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    fs = SimulatedFileSystem()
    node = single_node(tmp_path, fs)
    stopped_by: list[BaseException] = []
    async with node_that_may_stop(node, stopped_by):
        assert (await trio.to_thread.run_sync(post_event, node.http_port, 0))[0] == 201
        fs.fail_next_fdatasync(1)
        answers: list[tuple[int | str, str | None]] = []

        async def client(n: int) -> None:
            answers.append(await trio.to_thread.run_sync(post_event, node.http_port, n))

        async with trio.open_nursery() as clients:
            for n in range(1, 9):
                clients.start_soon(client, n)
    assert stopped_by, "the node kept running after a failed fdatasync"
    # Every answer is definite or says the outcome is unknown; none is a 500.
    unexpected = [a for a in answers if a not in {(504, "outcome_unknown"), (503, "storage_failed"), ("refused", None)}]
    assert not unexpected, f"{unexpected} among {answers}"
    assert (504, "outcome_unknown") in answers, answers
    # Between the failure and the exit a request is refused with the reason, and the node
    # says it is neither ready nor healthy.
    with pytest.raises(UnavailableError) as refused:
        await node.append([event()])
    assert refused.value.code == "storage_failed" and refused.value.http_status == 503
    status = node.status()
    assert not status.ready and not status.healthy and status.extra["not_ready"] == ["storage_failed"]
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]
    failed = [r for r in caplog.records if "write-ahead log failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].levelno == logging.CRITICAL


async def test_rot_found_by_a_read_answers_503_and_stops_the_node(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Not a 500 and carrying on: the read that finds a record rotted since start-up gets
    503 storage_failed, the node says so (not ready, one critical line) and stops, as on a
    failed fdatasync; it will not start on that disk again."""
    caplog.set_level(logging.INFO)
    fs = SimulatedFileSystem()
    node = single_node(tmp_path, fs)
    stopped_by: list[BaseException] = []
    async with node_that_may_stop(node, stopped_by):
        for n in range(3):
            assert (await trio.to_thread.run_sync(post_event, node.http_port, n))[0] == 201
        index = node.rlog.tail_index  # the last event's record
        wal = node.rlog.wal
        segment = [p for p in wal.segment_paths if int(p.name.split(".")[0]) <= index][-1]
        record = wal.record(index)
        fs.damage(segment, record.offset + 32, bytes([record.body[0] ^ 0x01]))
        status, body = await trio.to_thread.run_sync(http_get, node.http_port, "/events/eio-2")
        assert (status, body["error"]["code"]) == (503, "storage_failed"), body
        assert node.status().extra["not_ready"] == ["storage_failed"]
    assert stopped_by, "the node kept running with a rotten log"
    failed = [r for r in caplog.records if "write-ahead log failed" in r.getMessage()]
    assert len(failed) == 1 and "CorruptionError" in failed[0].getMessage()


async def test_a_broken_invariant_on_the_write_path_stops_the_node(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug, not an outcome: the write that meets it is answered 504 (it may have been
    submitted), and the node stops through the writer, saying so once, instead of
    answering 500 and taking the next write."""
    caplog.set_level(logging.INFO)
    node = single_node(tmp_path, SimulatedFileSystem())
    stopped_by: list[BaseException] = []
    async with node_that_may_stop(node, stopped_by):
        assert (await trio.to_thread.run_sync(post_event, node.http_port, 0))[0] == 201

        def broken(*args: object, **kwargs: object) -> object:
            raise LogStateError("pending batch at log index 3, at or below 4")

        monkeypatch.setattr(node.store, "prepare", broken)
        assert await trio.to_thread.run_sync(post_event, node.http_port, 1) == (504, "outcome_unknown")
        assert node.status().extra["not_ready"] == ["storage_failed"]
    assert stopped_by, "the node kept running after a broken invariant"
    failed = [r for r in caplog.records if "write-ahead log failed" in r.getMessage()]
    assert len(failed) == 1 and "LogStateError" in failed[0].getMessage()


class _FailingPromiseDisk(SimulatedFileSystem):
    """A disk whose next fdatasync of a new meta.json fails once ``armed``: the write of a
    promise (meta.json is replaced through meta.json.tmp)."""

    armed = False

    def create(self, path: Path) -> WalFile:
        f = super().create(path)
        if self.armed and path.name == "meta.json.tmp":
            self.armed = False
            self.fail_next_fdatasync(1)
        return f


async def test_a_failed_fdatasync_of_the_takeovers_own_promise_stops_the_node(tmp_path: Path) -> None:
    """Not a failed takeover to resign from and retry: the log is poisoned and a failed
    fdatasync is never retried (found by the simulator, seed 2039: the node resigned and
    campaigned on with a poisoned log)."""
    fs = _FailingPromiseDisk()
    node = single_node(tmp_path, fs)
    WriteAheadLog.open(node.config.data_dir, WalOptions(segment_size_bytes=node.config.segment_size_bytes), fs).close()
    fs.armed = True  # the node's first new meta.json is its takeover's promise
    with trio.fail_after(15):  # before the fix: it resigned and campaigned on, for ever
        with pytest.raises(BaseExceptionGroup) as raised:
            await node.run()
    assert not fs.armed  # the failure was injected where meta.json is replaced
    # The writer stops with the failure and the takeover raises it too: one error, from
    # one or both tasks (whichever the nursery hears first), and no other.
    reasons = leaves(raised.value)
    assert reasons and all(isinstance(e, FsyncError) and "meta.json.tmp" in str(e) for e in reasons), reasons
    assert len({id(e) for e in reasons}) == 1, reasons


# -- a full disk ----------------------------------------------------------------------------


async def test_a_follower_with_a_full_disk_says_so_and_does_not_slow_writes_through_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    disks = {k: SimulatedFileSystem(seed=i) for i, k in enumerate(["n0", "n1", "n2"])}
    # The production append timeout: a forward used to wait half of it (5 s) on the full disk.
    async with in_process_cluster(tmp_path, append_timeout_s=10.0) as cluster:
        await cluster.start_all(fs=disks)
        leader = await cluster.leader()
        full_id = next(k for k in cluster.nodes if k != leader.config.node_id)
        full = cluster.nodes[full_id]
        await full.append([event("f", 0)])
        await until(lambda: full.status().ready, 5.0)
        disks[full_id].fail_writes_after(0)
        started = trio.current_time()
        latencies = []
        for i in range(1, 11):
            t0 = trio.current_time()
            await full.append([event("f", i)])
            latencies.append(trio.current_time() - t0)
        elapsed = trio.current_time() - started
        assert full.writer.disk_full
        status, body = await trio.to_thread.run_sync(http_get, cluster.http_ports[full_id], "/health/ready")
        assert status == 503 and "disk_full" in body["reasons"], body
        _, metrics = await trio.to_thread.run_sync(http_get, cluster.http_ports[full_id], "/metrics")
        assert metric(metrics, "walstore_disk_full") == 1
        assert metric(metrics, 'walstore_wal_write_errors_total{kind="disk_full"}') >= 1
        assert max(latencies) < 1.0, latencies
        # The leader goes on resending to the full follower: many failed rounds, few lines.
        rounds = full.writer._disk_full_rounds
        lines = [r for r in caplog.records if r.name == "walstore.wal.writer" and "disk full" in r.getMessage()]
        assert rounds > len(lines) >= 1, (rounds, len(lines))
        # Space again: it catches up on its own and says so.
        disks[full_id].clear_faults()
        await until(lambda: full.status().ready and full.applied_events.value >= leader.applied_events.value, 10.0)
        assert not full.writer.disk_full
        _, metrics = await trio.to_thread.run_sync(http_get, cluster.http_ports[full_id], "/metrics")
        assert metric(metrics, "walstore_disk_full") == 0
        assert any("disk has space again" in r.getMessage() for r in caplog.records)
        print(f"10 forwarded appends through a full follower: {elapsed:.3f}s, max {max(latencies):.3f}s")


async def test_every_disk_full_answers_disk_full_not_no_leader(tmp_path: Path) -> None:
    disks = {k: SimulatedFileSystem(seed=i) for i, k in enumerate(["n0", "n1", "n2"])}
    async with in_process_cluster(tmp_path, append_timeout_s=2.0) as cluster:
        await cluster.start_all(fs=disks)
        leader = await cluster.leader()
        await leader.append([event("x", 0)])
        for disk in disks.values():
            disk.fail_writes_after(0)
        codes: dict[str, list[str]] = {k: [] for k in cluster.nodes}
        # The leader's first failure steps it down; from then on no takeover can write its
        # EPOCH_START. Keep asking every node until each has answered for a few seconds.
        deadline = trio.current_time() + 6.0
        while trio.current_time() < deadline:
            for node_id, node in cluster.nodes.items():
                try:
                    await node.append([event("x", 1)])
                    codes[node_id].append("ok")
                except UnavailableError as exc:
                    codes[node_id].append(exc.code)
            await trio.sleep(0.1)
        for node_id, seen in codes.items():
            tail = seen[-10:]
            assert tail and set(tail) == {"disk_full"}, (node_id, seen[-20:])
        for disk in disks.values():
            disk.clear_faults()
        recovered = await cluster.leader(timeout_s=20.0)
        await recovered.append([event("x", 2)])


# -- a slow disk ---------------------------------------------------------------------------


class _SlowFile:
    """A WalFile whose fdatasync takes ``disk.delay_s`` longer (the writer thread sleeps)."""

    def __init__(self, disk: SlowDisk, inner: WalFile) -> None:
        self._disk = disk
        self._inner = inner

    def pwritev(self, buffers: Sequence[Buffer], offset: int, *, sync: bool) -> None:
        if sync:
            self._disk.stall()
        self._inner.pwritev(buffers, offset, sync=sync)

    def fdatasync(self) -> None:
        self._disk.stall()
        self._inner.fdatasync()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class SlowDisk(SimulatedFileSystem):
    """The simulated disk with a settable fdatasync delay, for the slow-disk rows."""

    def __init__(self, *, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.delay_s = 0.0
        self.stalls = 0
        self._lock = threading.Lock()

    def stall(self) -> None:
        delay = self.delay_s
        if delay:
            with self._lock:
                self.stalls += 1
            time.sleep(delay)

    def open(self, path: Path, *, writable: bool = True) -> WalFile:
        return _SlowFile(self, super().open(path, writable=writable))

    def create(self, path: Path) -> WalFile:
        return _SlowFile(self, super().create(path))


async def test_a_leader_with_a_stalled_fsync_leads_on_but_is_not_ready(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    disks = {k: SlowDisk(seed=i) for i, k in enumerate(["n0", "n1", "n2"])}
    async with in_process_cluster(tmp_path, lease_ttl_s=2.0, append_timeout_s=5.0) as cluster:
        await cluster.start_all(fs=disks)
        leader = await cluster.leader()
        leader.slow_disk_s = leader.writer.slow_round_s = 0.3
        await leader.append([event("s", 0)])
        assert leader.status().ready
        disks[leader.config.node_id].delay_s = 0.8
        not_ready_while_leading = False
        async with trio.open_nursery() as nursery:
            # A majority of the followers' fsyncs commits it: the append itself is fast.
            nursery.start_soon(leader.append, [event("s", 1)])
            with trio.fail_after(5):
                while not not_ready_while_leading:
                    status = leader.status()
                    reasons = status.extra["not_ready"]
                    assert isinstance(reasons, list)
                    not_ready_while_leading = status.is_leader and "slow_disk" in reasons
                    await trio.sleep(0.02)
        port = cluster.http_ports[leader.config.node_id]
        status_code, body = await trio.to_thread.run_sync(http_get, port, "/health/ready")
        assert status_code == 503 and body["is_leader"] and body["reasons"] == ["slow_disk"], body
        _, metrics = await trio.to_thread.run_sync(http_get, port, "/metrics")
        assert metric(metrics, "walstore_wal_slow_rounds_total") >= 1
        assert any("slow disk" in r.getMessage() for r in caplog.records)
        assert replicator(leader).writable, "a slow disk cost the leader its leadership"
        # Fast again: ready once the slow round is SLOW_DISK_HOLD_S behind (shortened here).
        disks[leader.config.node_id].delay_s = 0.0
        await leader.append([event("s", 2)])
        leader.writer.last_round_ended_at -= 60
        assert leader.status().ready


async def test_round_in_flight_counts_from_the_start_of_its_write() -> None:
    disk = SlowDisk()
    wal = WriteAheadLog.open(Path("/wal"), WalOptions(segment_size_bytes=1 << 16, max_record_body_bytes=256), disk)
    writer = GroupCommitWriter(wal)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        assert writer.round_in_flight_s() == 0.0
        disk.delay_s = 0.5
        pending = writer.submit([(KIND_EVENT, 0, b"x")], 1)
        await trio.sleep(0.3)
        assert 0.2 < writer.round_in_flight_s() < 0.5
        await pending.wait_durable()
        assert writer.round_in_flight_s() == 0.0 and writer.last_round_s >= 0.5
        nursery.cancel_scope.cancel()
