"""The client commands a person types: user errors are one line and a documented exit code
(never a traceback), and ``append`` retries safely against a scripted server: the same id
every time, Retry-After honoured, 1 only when the event is surely not stored, 75 when its
fate is open. The real-node paths (paging past 1000, tail across a restart) are in
test_cli_process.py."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from walstore.cli import EXIT_FAILED, EXIT_OUTCOME_UNKNOWN, EXIT_USAGE
from walstore.client import (
    OutcomeUnknownError,
    UnreachableError,
    append_with_retry,
    loads_exact,
    parse_sse,
    parse_url,
)
from walstore.election.etcd_process import free_ports


def walstore(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "WALSTORE_URL"}
    return subprocess.run(
        [sys.executable, "-m", "walstore", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**base, **(env or {})},
    )


def one_line_error(done: subprocess.CompletedProcess[str], code: int) -> str:
    assert done.returncode == code, done
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("walstore: "), done.stderr
    return lines[0]


def dead_url() -> str:
    (port,) = free_ports(1)
    return f"http://127.0.0.1:{port}"


# -- one line, the right code ------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("https://127.0.0.1:8080", "https is not supported"),
        ("ftp://x:1", "expected http://host:port"),
        ("127.0.0.1:notaport", "is not a URL"),
        ("http://127.0.0.1:8080/events", "without a path"),
    ],
)
def test_a_bad_url_is_usage_for_every_client_command(url: str, says: str) -> None:
    for args in (["status"], ["read"], ["tail"], ["append", "--type", "T", "--aggregate", "a"]):
        line = one_line_error(walstore(*args, "--url", url), EXIT_USAGE)
        assert says in line
    # the same from the environment
    assert says in one_line_error(walstore("status", env={"WALSTORE_URL": url}), EXIT_USAGE)


def test_a_node_that_is_down_is_exit_1() -> None:
    url = dead_url()
    for args in (["status"], ["read"], ["read", "agg"], ["tail"]):
        line = one_line_error(walstore(*args, "--url", url), EXIT_FAILED)
        assert "Connection refused" in line or "ConnectionRefused" in line, line


def test_status_cluster_prints_the_rows_it_has_and_exits_1_for_a_dead_node() -> None:
    done = walstore("status", "--cluster", "--url", dead_url(), "--url", dead_url())
    assert done.returncode == EXIT_FAILED and "Traceback" not in done.stderr
    assert done.stdout.count("ConnectionRefusedError") == 2 and done.stdout.startswith("+--")


def test_an_append_that_reaches_nobody_is_not_stored_and_exits_1() -> None:
    done = walstore("append", "--type", "T", "--aggregate", "a", "--url", dead_url(), "--timeout", "0.5")
    assert done.returncode == EXIT_FAILED and "Traceback" not in done.stderr
    assert "not stored: no server reachable" in done.stderr.splitlines()[-1]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["read", "agg", "--from-index", "2"], "--from-index reads the global log"),
        (["read", "--from-version", "2"], "need an AGGREGATE_ID"),
        (["read", "--direction", "backward"], "need an AGGREGATE_ID"),
        (["status", "--dir", "/tmp"], "--dir needs --cluster"),
        (["status", "--cluster", "--dir", "/tmp", "--url", "http://127.0.0.1:1"], "give one of them"),
        (["status", "--url", "http://127.0.0.1:1", "--url", "http://127.0.0.1:2"], "talks to one node"),
        (["append", "--type", "T", "--aggregate", "a", "--payload", "[1]"], "must be a JSON object"),
        (["append", "--type", "T", "--aggregate", "a", "--metadata", "{bad"], "--metadata is not JSON"),
    ],
)
def test_flags_that_do_not_apply_are_refused(args: list[str], says: str) -> None:
    assert says in one_line_error(walstore(*args), EXIT_USAGE)


def test_click_usage_errors_are_exit_2_without_a_traceback() -> None:
    done = walstore("read", "--limit", "0")
    assert done.returncode == EXIT_USAGE and "Traceback" not in done.stderr and "--limit" in done.stderr


def test_a_bad_log_level_is_one_line_and_exit_2(tmp_path: Path) -> None:
    for args, env in ((["--log-level", "loud"], {}), ([], {"LOG_LEVEL": "verbose"})):
        done = walstore("serve", "--data-dir", str(tmp_path), "--http-port", "0", *args, env=env)
        line = one_line_error(done, EXIT_USAGE)
        assert "LOG_LEVEL" in line and "DEBUG, INFO, WARNING, ERROR, CRITICAL" in line


def test_a_port_in_use_is_one_line_and_exit_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = walstore(
            "serve",
            "--data-dir",
            str(tmp_path),
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(port),
            "--peer-port",
            "0",
        )
    assert done.returncode == EXIT_FAILED and "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    # the launchers retry with fresh ports when they see these words
    assert f"127.0.0.1:{port}" in last and "address already in use" in last.lower()


def test_version_help_and_the_documented_conventions() -> None:
    from walstore import __version__

    assert walstore("--version").stdout.strip() == f"walstore, version {__version__}"
    short, long = walstore("-h"), walstore("--help")
    assert short.returncode == 0 and short.stdout == long.stdout
    for needle in ("WALSTORE_URL", "Exit codes", f"{EXIT_OUTCOME_UNKNOWN}  outcome unknown", "usage"):
        assert needle in short.stdout
    for command in ("status", "append", "read", "tail"):
        assert "WALSTORE_URL" in walstore(command, "-h").stdout
    assert "--timeout" in walstore("append", "-h").stdout


# -- the client's building blocks ----------------------------------------------------------


def test_parse_url() -> None:
    assert parse_url("http://127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_url("localhost:9") == ("localhost", 9)
    assert parse_url("http://[::1]:7/") == ("::1", 7)
    with pytest.raises(ValueError, match="https"):
        parse_url("https://h:1")


def test_loads_exact_keeps_every_number_and_key_order() -> None:
    text = '{"z":18446744073709551616,"a":-123456789012345678901234567890,"d":1.10,"e":1E+2,"i":7}'
    value = loads_exact(text)
    assert list(value) == ["z", "a", "d", "e", "i"]
    assert orjson.dumps(value).decode() == text
    assert value["i"] == 7 and isinstance(value["i"], int)


def test_parse_sse_messages_ids_and_comments() -> None:
    raw = [
        b"id: 1\n",
        b'data: {"a":1}\n',
        b"\n",
        b": heartbeat\n",
        b"\n",
        b"id: 2\r\n",
        b"data: x\n",
        b"data: y\n",
        b"\n",
    ]
    messages = list(parse_sse(raw))
    assert [(m.id, m.data) for m in messages] == [("1", '{"a":1}'), ("2", "x\ny")]


# -- append against a scripted server -----------------------------------------------------------


class Script:
    """What a fake node answers to the n-th POST /events (``close``: drop the connection
    after reading the request), and the bodies it was sent."""

    def __init__(self, answers: list[str], retry_after: str | None = None) -> None:
        self.answers = answers
        self.retry_after = retry_after
        self.bodies: list[dict[str, Any]] = []
        self.raw: list[bytes] = []
        self.times: list[float] = []


@pytest.fixture
def fake_node() -> Iterator[tuple[str, Script]]:
    script = Script([])

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            script.raw.append(raw)
            body = json.loads(raw)
            script.bodies.append(body)
            script.times.append(time.monotonic())
            answer = script.answers[min(len(script.bodies), len(script.answers)) - 1]
            if answer == "close":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            status = int(answer)
            payload: dict[str, Any] = (
                {"success": True, "event_id": body["id"], "index": 1, "version": 1}
                if status == 201
                else {"success": False, "error": {"code": f"code_{status}", "message": "scripted"}}
            )
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status >= 500 and script.retry_after is not None:
                self.send_header("Retry-After", script.retry_after)
            self.end_headers()
            self.wfile.write(data)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", script
    finally:
        server.shutdown()
        server.server_close()


EVENT = {"id": "evt-1", "type": "T", "aggregate_id": "a", "payload": {}, "metadata": {}}


def test_append_retries_503_504_and_lost_connections_with_the_same_id(fake_node: tuple[str, Script]) -> None:
    url, script = fake_node
    script.answers = ["503", "504", "close", "500", "201"]
    result = append_with_retry([url], dict(EVENT), timeout_s=20, sleep=lambda s: None)
    assert result["event_id"] == "evt-1"
    assert [b["id"] for b in script.bodies] == ["evt-1"] * 5


def test_append_honours_retry_after(fake_node: tuple[str, Script]) -> None:
    url, script = fake_node
    script.answers, script.retry_after = ["503", "201"], "1"
    waits: list[float] = []
    append_with_retry([url], dict(EVENT), timeout_s=20, sleep=waits.append)
    assert waits == [1.0]


def test_a_4xx_is_final_and_not_retried(fake_node: tuple[str, Script]) -> None:
    from walstore.client import ClientError

    url, script = fake_node
    script.answers = ["409", "201"]
    with pytest.raises(ClientError) as info:
        append_with_retry([url], dict(EVENT), timeout_s=20, sleep=lambda s: None)
    assert info.value.status == 409 and len(script.bodies) == 1


def test_only_503s_mean_not_stored_anything_else_is_unknown(fake_node: tuple[str, Script]) -> None:
    from walstore.client import ClientError

    url, script = fake_node
    script.answers = ["503"]
    with pytest.raises(ClientError):
        append_with_retry([url], dict(EVENT), timeout_s=0.5)
    script.bodies.clear()
    script.answers = ["504", "503"]  # once maybe delivered, always maybe delivered
    with pytest.raises(OutcomeUnknownError) as info:
        append_with_retry([url], dict(EVENT), timeout_s=0.5)
    assert info.value.event_id == "evt-1" and "--id evt-1" in str(info.value)


def test_a_down_node_moves_the_retry_to_the_next_url(fake_node: tuple[str, Script]) -> None:
    url, script = fake_node
    script.answers = ["201"]
    append_with_retry([dead_url(), url], dict(EVENT), timeout_s=5, sleep=lambda s: None)
    assert len(script.bodies) == 1
    with pytest.raises(UnreachableError):
        append_with_retry([dead_url()], dict(EVENT), timeout_s=0.3)


def test_cli_append_exit_75_prints_the_id_and_sends_it_every_time(fake_node: tuple[str, Script]) -> None:
    url, script = fake_node
    script.answers = ["504"]
    done = walstore("append", "--type", "T", "--aggregate", "a", "--url", url, "--timeout", "1.5")
    assert done.returncode == EXIT_OUTCOME_UNKNOWN and "Traceback" not in done.stderr
    ids = {b["id"] for b in script.bodies}
    assert len(script.bodies) >= 2 and len(ids) == 1
    (event_id,) = ids
    assert f"retry with --id {event_id}" in done.stderr.splitlines()[-1]
    # running it again with that id sends that id
    script.answers = ["201"]
    done = walstore("append", "--type", "T", "--aggregate", "a", "--url", url, "--id", event_id)
    assert done.returncode == 0 and script.bodies[-1]["id"] == event_id and event_id in done.stdout


def test_cli_append_sends_the_payload_text_exactly(fake_node: tuple[str, Script]) -> None:
    url, script = fake_node
    script.answers = ["201"]
    payload = '{"big":18446744073709551616,"d":1.10}'
    done = walstore("append", "--type", "T", "--aggregate", "a", "--url", url, "--payload", payload)
    assert done.returncode == 0, done.stderr
    assert b'"payload":' + payload.encode() in script.raw[0]
