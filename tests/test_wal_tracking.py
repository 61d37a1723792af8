"""TRACKING records (kind 4) in the write-ahead log: written in the same atomic batch as
the events (its last record), so a torn batch loses the events and the position together;
recovery, the store's rebuild and the offline tools all know the kind."""

from __future__ import annotations

from pathlib import Path

import pytest

from walstore.event import NewEvent, Tracking, encode_event_body, encode_tracking_body
from walstore.store import EventStore
from walstore.wal.log import WalOptions, WriteAheadLog
from walstore.wal.record import FLAG_BATCH_END, KIND_EVENT, KIND_TRACKING
from walstore.wal.simfs import SimulatedFileSystem
from walstore.wal.tools import record_json, record_line

D = Path("/wal")
OPTS = WalOptions(segment_size_bytes=1 << 20, max_record_body_bytes=4096)
TS = 1_700_000_000_000_000


def event_body(event_id: str, version: int) -> bytes:
    return encode_event_body(NewEvent(event_id, "T", "agg", b'{"n":1}', b"{}"), version, TS)


def batch(first_version: int, tracking: Tracking) -> list[tuple[int, int, bytes]]:
    return [
        (KIND_EVENT, 0, event_body(f"e{first_version}", first_version)),
        (KIND_EVENT, 0, event_body(f"e{first_version + 1}", first_version + 1)),
        (KIND_TRACKING, FLAG_BATCH_END, encode_tracking_body(tracking)),
    ]


class Bodies:
    def __init__(self, log: WriteAheadLog) -> None:
        self.log = log

    def body(self, log_index: int) -> bytes:
        return self.log.body(log_index)


def rebuilt(log: WriteAheadLog) -> EventStore:
    store = EventStore(Bodies(log))
    store.rebuild(log.read(1))
    return store


@pytest.mark.parametrize("tear", [None, 0, 4, 8, 31, 40])
def test_a_torn_batch_with_its_tracking_record_is_dropped_whole(tear: int | None) -> None:
    """``None``: the batch's events reached the disk, its tracking record did not; else
    the tracking record is there with one byte at ``tear`` damaged (a torn sector)."""
    fs = SimulatedFileSystem(seed=3)
    with WriteAheadLog.open(D, OPTS, fs) as log:
        log.append(log.encode(batch(1, Tracking("c", 1)), 1, 1))
        data = log.encode(batch(3, Tracking("c", 2)), 1, 4)
        last = log.encode([batch(3, Tracking("c", 2))[2]], 1, 6)
        log.append(data if tear is not None else data[: len(data) - len(last)])
        (segment,) = log.segment_paths
    if tear is not None:
        offset = 32 + len(log.encode(batch(1, Tracking("c", 1)), 1, 1)) + len(data) - len(last) + tear
        fs.damage(segment, offset, b"\xa5")
    fs.crash()
    with WriteAheadLog.open(D, OPTS, fs) as log:
        assert log.last_index == 3  # the second batch's events went with its tracking record
        store = rebuilt(log)
        assert store.consumer_position("c") == 1
        assert store.last_applied_event_index == 2
        assert store.lookup("e3") is None


def test_a_whole_batch_survives_with_its_position_and_the_tools_show_it() -> None:
    fs = SimulatedFileSystem(seed=3)
    with WriteAheadLog.open(D, OPTS, fs) as log:
        log.append(log.encode(batch(1, Tracking("c", 7)), 1, 1))
    fs.crash()
    with WriteAheadLog.open(D, OPTS, fs) as log:
        assert log.last_index == 3 and log.batch_end_index == 3
        assert rebuilt(log).consumer_position("c") == 7
        (record,) = log.read(3)
        assert record.kind == KIND_TRACKING and record.batch_end
        obj = record_json(Path("seg"), record)
        assert obj["kind"] == "TRACKING" and obj["tracking"] == {"consumer": "c", "position": 7}
        assert "consumer=c position=7" in record_line(Path("seg"), record)
