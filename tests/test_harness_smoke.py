"""The fault-test harness end to end against real ``walstore serve`` processes and etcd:
a loaded cluster's recorded history checks clean, the offline WAL dump agrees with what the
nodes serve, a partition through the peer-link proxies replaces the leader, and a single
node survives kill -9. Numbers (start-up, failover) are printed; run with -s to see them.

First, without processes: the load client files every kind of answer under the right
outcome (ok / fail / info) against a scripted fake server."""

from __future__ import annotations

import http.server
import json
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness.cluster import ProcessCluster, events_from_dump
from harness.history import LoadClient, classify, load_history, run_load

from walstore.checker import check
from walstore.errors import ConfigError, ValidationError

pytest_plugins = ["harness.cluster"]  # cluster_factory, process_cluster

Factory = Callable[..., ProcessCluster]

# What the fake server does with the n-th append (one worker: a fixed order).
SCRIPT = ["201", "409", "503", "504", "500", "hang", "close", "400"]
EXPECTED = [
    ("ok", None),
    ("fail", "wrong_expected_version"),
    ("fail", "unavailable"),
    ("info", "outcome_unknown"),
    ("info", "http_500"),
    ("info", "timeout"),
    ("info", "connection_lost:RemoteDisconnected"),
    ("fail", "invalid_request"),
]


class ScriptedServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ScriptedHandler)
        self.calls = 0
        self.release = threading.Event()  # ends a "hang" at teardown instead of a sleep
        self.bodies: list[dict[str, Any]] = []


class ScriptedHandler(http.server.BaseHTTPRequestHandler):
    server: ScriptedServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.bodies.append(body)
        step = SCRIPT[self.server.calls % len(SCRIPT)]
        self.server.calls += 1
        if step == "hang":
            self.server.release.wait(10)
            self.close_connection = True
            return
        if step == "close":
            self.close_connection = True
            return
        status = int(step)
        codes = {409: "wrong_expected_version", 503: "unavailable", 504: "outcome_unknown", 400: "invalid_request"}
        answer: dict[str, Any] = (
            {"success": True, "event_id": body.get("id", "server-id"), "index": 1, "version": 1}
            if status == 201
            else {"success": False, "error": {"code": codes[status], "message": "x"}}
            if status in codes
            else {"oops": True}
        )
        raw = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


@pytest.fixture
def scripted() -> Iterator[ScriptedServer]:
    server = ScriptedServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_load_client_files_each_answer_under_the_right_outcome(scripted: ScriptedServer, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{scripted.server_address[1]}"
    path = tmp_path / "h.jsonl"
    history = run_load(
        {"fake": url},
        history_path=path,
        workers=1,
        max_ops=len(SCRIPT),
        duration_s=30,
        read_ratio=0,
        client_id_ratio=0,
        request_timeout_s=0.5,
        seed=1,
    )
    assert [(r["status"], r["error_code"]) for r in history] == EXPECTED
    first = history[0]
    assert (first["index"], first["version"], first["id"], first["node"]) == (1, 1, "server-id", "fake")
    assert all(r["index"] is None for r in history[1:])
    assert all(r["start"] <= r["end"] for r in history)
    assert load_history(path) == history
    # Every append carries its key in the payload, where the checker finds it.
    assert [b["payload"]["history_key"] for b in scripted.bodies] == [r["key"] for r in history]


def test_info_append_with_client_id_is_retried_with_the_same_body(scripted: ScriptedServer) -> None:
    scripted.calls = SCRIPT.index("504")  # first answer 504 (info), the retry gets 500 (info)
    history = run_load(
        [f"http://127.0.0.1:{scripted.server_address[1]}"],
        workers=1,
        max_ops=1,
        read_ratio=0,
        client_id_ratio=1,
        retry_info_ratio=1,
        seed=2,
    )
    assert [r["status"] for r in history] == ["info", "info"]
    assert history[0]["key"] == history[1]["key"] and history[0]["id"] == history[1]["id"] is not None
    assert scripted.bodies[0] == scripted.bodies[1]


def test_refused_connection_is_a_definite_failure() -> None:
    with socket.create_server(("127.0.0.1", 0)) as gone:
        port = gone.getsockname()[1]
    (record,) = run_load([f"http://127.0.0.1:{port}"], workers=1, max_ops=1, read_ratio=0)
    assert record["status"] == "fail" and record["error_code"].startswith("connect_failed")


def test_classify_and_bad_settings() -> None:
    assert [classify(s) for s in (200, 201, 400, 404, 409, 413, 503, 500, 502, 504)] == [
        "ok", "ok", "fail", "fail", "fail", "fail", "fail", "info", "info", "info",
    ]  # fmt: skip
    with pytest.raises(ConfigError):
        LoadClient(["http://127.0.0.1:1"], workers=0)
    with pytest.raises(ConfigError):
        LoadClient(["ftp://x"])
    with pytest.raises(ConfigError):
        LoadClient([])


def test_load_history_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"op": "append"}\n\nnot json\n')
    with pytest.raises(ValidationError, match=":3:"):
        load_history(path)
    path.write_bytes(b"[1, 2]\n")
    with pytest.raises(ValidationError, match="not a JSON object"):
        load_history(path)


def same_log(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    return [(e["id"], e["index"], e["version"]) for e in a] == [(e["id"], e["index"], e["version"]) for e in b]


@pytest.mark.slow
def test_three_nodes_under_load_record_a_clean_history(cluster_factory: Factory, tmp_path: Path) -> None:
    started = time.monotonic()
    cluster = cluster_factory(n=3, etcd_members=1)
    print(f"3 nodes + 1 etcd ready in {time.monotonic() - started:.1f}s, leader {cluster.leader()}")
    history_path = tmp_path / "history.jsonl"
    history = run_load(cluster.urls(), duration_s=3.0, workers=4, history_path=history_path)
    assert load_history(history_path) == history  # the JSON lines are the same history
    cluster.wait_caught_up()
    logs = cluster.final_logs()
    report = check(history, logs)
    print(report.summary())
    report.assert_ok()
    assert report.acknowledged > 0, "the load did not get a single append through"
    assert set(logs) == {"n0", "n1", "n2"}
    # Offline, from the stopped nodes' disks: the same events at the same indexes.
    for node_id in cluster.ids:
        cluster.stop(node_id)
    for node_id in cluster.ids:
        dumped = events_from_dump(cluster.dump_log(node_id))
        assert same_log(dumped, logs[node_id]), node_id
    assert check(history, {n: events_from_dump(cluster.dump_log(n)) for n in cluster.ids}).ok


@pytest.mark.slow
def test_partitioned_leader_is_replaced_and_history_stays_clean(cluster_factory: Factory) -> None:
    cluster = cluster_factory(n=3, etcd_members=1, proxied=True, lease_ttl_s=1.0)
    old = cluster.wait_ready()
    majority = [i for i in cluster.ids if i != old]
    with LoadClient(cluster.urls(), duration_s=6.0, workers=4, request_timeout_s=3.0) as load:
        load_started = time.monotonic()
        while not any(r["status"] == "ok" for r in load.history):
            assert time.monotonic() - load_started < 10, "no append succeeded before the partition"
            time.sleep(0.05)
        cut = time.monotonic()
        cluster.isolate(old)
        new = cluster.wait_ready(nodes=majority)
        print(f"isolated {old}; {new} leads the majority after {time.monotonic() - cut:.2f}s")
        assert new != old
        cluster.heal()
    history = load.history
    cluster.wait_ready()
    cluster.wait_caught_up()
    report = check(history, cluster.final_logs())
    print(report.summary())
    report.assert_ok()
    stats = cluster.link(old, majority[0]).stats()
    assert stats.forwarded_a_to_b > 0  # peer traffic really went through the proxies


@pytest.mark.slow
def test_single_node_survives_kill_9_without_etcd(cluster_factory: Factory) -> None:
    cluster = cluster_factory(n=1)
    assert cluster.etcd is None
    assert cluster.leader() == "n0"
    history = run_load(cluster.urls(), duration_s=1.0, workers=2)
    before = cluster.read_log("n0")
    assert check(history, {"n0": before}).ok
    pid = cluster.pid("n0")
    cluster.kill("n0", signal.SIGKILL)
    assert not cluster.node("n0").running
    assert cluster.leader() is None
    cluster.start_node("n0")
    assert cluster.pid("n0") != pid
    assert cluster.wait_ready() == "n0"
    after = cluster.read_log("n0")
    assert same_log(after, before)
    report = check(history, {"n0": after})
    report.assert_ok()
    # Pause/resume: a stopped process answers nothing, then carries on.
    cluster.pause("n0")
    assert cluster.status("n0") is None
    assert cluster.live_ids() == []
    cluster.resume("n0")
    assert cluster.wait_ready() == "n0"
