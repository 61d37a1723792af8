"""``walstore wal verify`` / ``walstore wal dump`` against real directories."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from walstore.cli import main
from walstore.event import NewEvent, encode_event_body
from walstore.wal.log import WalOptions, WriteAheadLog
from walstore.wal.record import KIND_EPOCH_START, KIND_EVENT

OPTS = WalOptions(segment_size_bytes=4096, max_record_body_bytes=1000)


def make_log(d: Path, events: int = 12) -> list[tuple[Path, int, int]]:
    """A log with an epoch start and `events` events; returns (segment, index, offset)."""
    with WriteAheadLog.open(d, OPTS) as log:
        log.append(log.encode([(KIND_EPOCH_START, 0, b'{"solo":true}')], 1, 1))
        for i in range(events):
            ev = NewEvent(f"id-{i}", "Deposited", f"acct-{i % 3}", b'{"amount":%d}' % i, b"{}")
            log.append(
                log.encode([(KIND_EVENT, 0, encode_event_body(ev, i // 3 + 1, 1_700_000_000_000_000 + i))], 1, i + 2)
            )
        out = []
        for r in log.read(1):
            seg = next(p for p in reversed(log.segment_paths) if int(p.name[:20]) <= r.index)
            out.append((seg, r.index, r.offset))
        return out


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_verify_clean(tmp_path: Path) -> None:
    make_log(tmp_path / "wal")
    before = snapshot(tmp_path / "wal")
    res = CliRunner().invoke(main, ["wal", "verify", str(tmp_path / "wal")])
    assert res.exit_code == 0, res.output
    assert "records 1..13" in res.output and "OK" in res.output
    assert snapshot(tmp_path / "wal") == before


def test_verify_corruption_names_file_and_offset_and_changes_nothing(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    records = make_log(d)
    seg, _, offset = records[4]
    raw = bytearray(seg.read_bytes())
    raw[offset + 40] ^= 0x04
    seg.write_bytes(raw)
    before = snapshot(d)
    res = CliRunner().invoke(main, ["wal", "verify", str(d)])
    assert res.exit_code == 1
    assert f"{seg} at offset {offset}" in res.output
    assert snapshot(d) == before


def test_verify_torn_tail_is_repairable_exit_3(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    records = make_log(d)
    seg, _, offset = records[-1]
    raw = bytearray(seg.read_bytes())
    raw[offset + 50 : offset + 60] = bytes(10)
    seg.write_bytes(raw)
    before = snapshot(d)
    res = CliRunner().invoke(main, ["wal", "verify", str(d)])
    assert res.exit_code == 3, res.output
    assert f"torn tail at {seg} offset {offset} (" in res.output
    assert "would be truncated at start-up" in res.output
    assert snapshot(d) == before
    # the node's start-up repairs it, after which verify is clean
    with WriteAheadLog.open(d, OPTS) as log:
        assert log.last_index == len(records) - 1
    assert CliRunner().invoke(main, ["wal", "verify", str(d)]).exit_code == 0


def test_verify_missing_directory(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["wal", "verify", str(tmp_path / "nope")])
    assert res.exit_code == 1 and "no such directory" in res.output


def test_dump_json_lines(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    make_log(d, events=10)
    res = CliRunner().invoke(main, ["wal", "dump", str(d), "--json", "--from-index", "3"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in res.output.splitlines()]
    assert [o["index"] for o in lines] == list(range(3, 12))
    first = lines[0]
    assert first["kind"] == "EVENT" and first["flags"] == ["BATCH_END"] and first["epoch"] == 1
    assert first["event"]["id"] == "id-1" and first["event"]["payload"] == {"amount": 1}
    assert first["event"]["version"] == 1 and first["event"]["aggregate_id"] == "acct-1"


def test_dump_text_and_epoch_start(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    make_log(d, events=2)
    res = CliRunner().invoke(main, ["wal", "dump", str(d)])
    assert res.exit_code == 0
    lines = res.output.splitlines()
    assert "kind=EPOCH_START" in lines[0] and "solo" in lines[0]
    assert "kind=EVENT" in lines[1] and "id=id-0" in lines[1] and '{"amount":0}' in lines[1]


def test_dump_of_a_corrupt_log_fails(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    records = make_log(d)
    seg, _, offset = records[2]
    raw = bytearray(seg.read_bytes())
    raw[offset + 3] ^= 0x01
    seg.write_bytes(raw)
    res = CliRunner().invoke(main, ["wal", "dump", str(d)])
    assert res.exit_code == 1 and f"offset {offset}" in res.output


def test_console_entry_point_runs(tmp_path: Path) -> None:
    make_log(tmp_path / "wal", events=1)
    proc = subprocess.run(
        [sys.executable, "-m", "walstore.cli", "wal", "verify", str(tmp_path / "wal")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout
