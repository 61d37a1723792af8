"""docs/openapi.yaml describes the HTTP API the server has (issue 12, item 6).

- The node serves the document at ``GET /openapi.json``, and what it serves is the YAML.
- Every route in the document answers its documented methods (neither 404 nor 405), and
  every route of the server, with every method it accepts (its ``Allow`` header), is in
  the document. HEAD is implied by GET.
- schemathesis, against a live ``walstore serve``, finds no 5xx, no undocumented status
  or content type, and no response that breaks the schema (bounded: well under a minute).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml  # type: ignore[import-untyped]
from fakes import FakeEventService, HttpTestClient, start_server
from served_node import ServedNode

from walstore.client import WalstoreClient
from walstore.http.app import HttpApp

REPO = Path(__file__).resolve().parent.parent
DOCUMENT: dict[str, Any] = yaml.safe_load((REPO / "docs" / "openapi.yaml").read_text())
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
EVENT = {"type": "T", "aggregate_id": "a", "payload": {"n": 1}}
# Cases per operation and phase: ~20 s for the whole run on the shared 2-core machine.
# (No --max-time: it is a budget fuzzing keeps spending, not a cap.)
MAX_EXAMPLES = 15


def documented() -> dict[str, set[str]]:
    return {
        path: {m.upper() for m in item if m in METHODS} for path, item in DOCUMENT["paths"].items()
    }  # fmt: skip


def concrete(path: str) -> str:
    return path.replace("{aggregate_id}", "some-aggregate").replace("{consumer}", "some-consumer")


def test_the_served_copy_is_the_yaml() -> None:
    served = json.loads((REPO / "walstore" / "http" / "openapi.json").read_text())
    assert served == DOCUMENT, "walstore/http/openapi.json is stale: run `make openapi`"
    assert DOCUMENT["openapi"].startswith("3.1.")


async def test_every_documented_route_exists_and_every_route_is_documented(nursery: trio.Nursery) -> None:
    app = HttpApp(FakeEventService())
    _, port = await start_server(nursery, app=app)
    client = await HttpTestClient.connect(port)
    spec = documented()
    for path, methods in spec.items():
        for method in sorted(methods):
            if path == "/subscribe":
                continue  # an endless stream: its route is checked through Allow below
            body = {"events": [EVENT]} if path == "/events/batch" else EVENT
            response = await client.request(method, concrete(path), json=body if method == "POST" else None)
            assert response.status not in (404, 405), f"{method} {path}: {response.status} {response.body!r}"
        # The methods the server accepts on this path are exactly the documented ones.
        probe = await client.request("DELETE", concrete(path))
        assert probe.status == 405, path
        allowed = set((probe.header("allow") or "").split(", "))
        assert allowed - {"HEAD"} == methods, f"{path}: the server allows {allowed}, the document {methods}"
        assert "HEAD" in allowed if "GET" in methods else "HEAD" not in allowed
    # The server's routing table (private, read on purpose: it is what we are checking).
    server_paths = set(app._routes) | {app._aggregate_route[0], app._consumer_route[0]}
    undocumented, unserved = server_paths - set(spec), set(spec) - server_paths
    assert not undocumented and not unserved, f"undocumented: {undocumented}; not served: {unserved}"
    assert (await client.request("GET", "/no-such-route")).status == 404


async def test_get_openapi_json_serves_the_document(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery)
    client = await HttpTestClient.connect(port)
    response = await client.request("GET", "/openapi.json")
    assert response.status == 200
    assert response.header("content-type") == "application/json"
    assert response.json() == DOCUMENT


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_schema_violation(tmp_path: Path) -> None:
    schemathesis = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert schemathesis, "schemathesis is not installed (pip install -e '.[test]')"
    with ServedNode([sys.executable, "-m", "walstore", "serve"], tmp_path) as node:
        with WalstoreClient(node.url) as client:
            client.append({**EVENT, "aggregate_id": "batch"})  # something to read, index 1 applied
        env = dict(os.environ, SCHEMATHESIS_HOOKS=str(REPO / "tests" / "schemathesis_hooks.py"))
        command = [
            schemathesis, "run", f"{node.url}/openapi.json",
            "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
            "response_schema_conformance",
            "--exclude-path", "/subscribe",  # an endless stream; its route is checked above
            "--phases", "examples,coverage,fuzzing",
            "--max-examples", str(MAX_EXAMPLES),
            "--seed", "12",
            "--workers", "1",
            "--request-timeout", "5",
            "--no-color",
        ]  # fmt: skip
        run = subprocess.run(
            command,
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        log = node.log_path.read_text()
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "Traceback" not in log, log[-4000:]
