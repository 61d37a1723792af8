"""``walstore bench wal`` runs end to end (tiny sizes) and reports every number."""

from __future__ import annotations

from pathlib import Path

import pytest

from walstore.bench.wal_bench import WRITER_COUNTS, describe_filesystem, run_wal_bench


@pytest.mark.slow
def test_wal_bench_smoke(tmp_path: Path) -> None:
    lines: list[str] = []
    result = run_wal_bench(tmp_path, replay_records=3000, seconds=0.2, out=lines.append)
    assert result.raw_4k_sync_ops > 0 and result.raw_seq_mb_s > 0
    assert set(result.writers) == set(WRITER_COUNTS)
    assert all(rate > 0 for rate, _, _ in result.writers.values())
    # more writers, more appends per fsync: group commit at work
    assert result.writers[256][2] > result.writers[1][2]
    # the time is accounted for: loop time per append and thread time per round, both > 0
    assert set(result.writer_costs) == set(WRITER_COUNTS)
    assert all(loop_us > 0 and thread_ms > 0 for loop_us, thread_ms in result.writer_costs.values())
    assert result.replay_records == 3000 and result.replay_warm_records_s > 0
    text = "\n".join(lines)
    assert "raw ceiling" in text and "replay" in text and result.filesystem in text
    assert list(tmp_path.iterdir()) == []  # cleaned up


def test_describe_filesystem_names_the_mount(tmp_path: Path) -> None:
    text = describe_filesystem(tmp_path)
    assert " on " in text and "mounted at /" in text
