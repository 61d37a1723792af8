"""Peak memory of a node that takes one big batch: ``python -m walstore.bench.batch_memory``.

Starts ``walstore serve`` alone (no etcd) in a temporary data directory, reads its peak
resident set (``VmHWM`` in /proc) once it serves, POSTs one batch of MAX_BATCH_EVENTS
events whose JSON body is just under MAX_BATCH_BYTES, and reads the peak again. The
difference is what one batch costs the server at its worst moment: the body as read, the
parsed JSON, the validated events, the encoded records, the group-commit round, the
answer. It prints both peaks and the ratio to the body size.
"""

from __future__ import annotations

import argparse
import http.client
import sys
import tempfile
import time
from pathlib import Path

import orjson

from walstore.election.etcd_process import free_ports
from walstore.launcher import node_env, spawn_server, stop_process, wait_live

MIB = 1024 * 1024


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc status")


def batch_body(events: int, max_bytes: int) -> bytes:
    """``events`` events of equal size whose batch body is at most ``max_bytes``."""
    overhead = len(
        orjson.dumps({"events": [{"id": "e-0", "type": "Big", "aggregate_id": "a-0", "payload": {"s": ""}}]})
    )
    per_event = (max_bytes - 64) // events - (overhead - 12)
    fill = max(per_event - 24, 0)
    sizes = [fill] * events

    def encode() -> bytes:
        items = [
            {"id": f"e-{i}", "type": "Big", "aggregate_id": f"a-{i % 100}", "payload": {"s": "x" * n}}
            for i, n in enumerate(sizes)
        ]
        return orjson.dumps({"events": items})

    body = encode()
    while len(body) > max_bytes and sizes[-1]:  # trim the last payload until it fits
        sizes[-1] = max(sizes[-1] - (len(body) - max_bytes), 0)
        body = encode()
    return body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--bytes", type=int, default=16 * MIB)
    args = parser.parse_args(argv)
    body = batch_body(args.events, args.bytes)
    with tempfile.TemporaryDirectory(prefix="walstore-batch-memory-") as tmp:
        http_port, peer_port = free_ports(2)
        env = node_env(
            node_id="batch-memory",
            http_port=http_port,
            peer_port=peer_port,
            peers="",
            data_dir=Path(tmp) / "wal",
            overrides={
                "MAX_BATCH_EVENTS": str(args.events),
                "MAX_BATCH_BYTES": str(args.bytes),
                "LOG_LEVEL": "WARNING",
            },
        )
        server = spawn_server(env, Path(tmp) / "server.log")
        try:
            wait_live(http_port, lambda: server.poll() is None, 30.0)
            before = peak_rss_bytes(server.pid)
            conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=120)
            started = time.perf_counter()
            conn.request("POST", "/events/batch", body, {"content-type": "application/json"})
            response = conn.getresponse()
            answer = response.read()
            elapsed = time.perf_counter() - started
            if response.status != 201:
                print(f"batch answered {response.status}: {answer[:300]!r}", file=sys.stderr)
                return 1
            after = peak_rss_bytes(server.pid)
        finally:
            stop_process(server)
    print(
        f"batch: {args.events} events, body {len(body)} bytes ({len(body) / MIB:.1f} MiB), answered in {elapsed:.2f} s"
    )
    print(f"server peak RSS: {before / MIB:.0f} MiB serving, {after / MIB:.0f} MiB after the batch")
    print(f"one batch added {(after - before) / MIB:.0f} MiB at peak, {(after - before) / len(body):.1f}x its body")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
