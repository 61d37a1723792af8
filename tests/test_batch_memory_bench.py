"""``python -m walstore.bench.batch_memory`` runs end to end on a small batch (the numbers it
prints are measurements, not assertions)."""

from __future__ import annotations

import orjson
import pytest

from walstore.bench.batch_memory import batch_body, main


def test_batch_body_fills_but_never_exceeds_the_limit() -> None:
    body = batch_body(100, 64 * 1024)
    assert 60 * 1024 < len(body) <= 64 * 1024
    assert len(orjson.loads(body)["events"]) == 100


def test_the_bench_measures_a_served_batch(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--events", "200", "--bytes", str(256 * 1024)]) == 0
    out = capsys.readouterr().out
    assert "server peak RSS" in out and "200 events" in out
