"""Offline inspection of a log directory: ``walstore wal verify`` and ``walstore wal dump``.

Both only read: files are opened read-only and nothing is repaired, so they are safe to run
against the directory of a stopped node (or a copy) before deciding what to do.

Exit codes of verify (``VerifyReport.exit_code``):

    0  clean: the node would start without changing anything
    1  corruption (or an unreadable directory): the node would refuse to start
    3  repairable crash leftovers (torn tail, incomplete batch, temporary files, an
       unfinished truncation): the node would repair them at start-up and run

3 rather than 2 because click already exits 2 for a usage error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from walstore.errors import CorruptionError, StorageError
from walstore.event import decode_event_body, decode_tracking_body
from walstore.wal.fs import FileSystem, RealFileSystem
from walstore.wal.record import (
    FLAG_BATCH_END,
    KIND_EVENT,
    KIND_NAMES,
    KIND_TRACKING,
    MAX_RECORD_BODY_BYTES,
    Record,
    decode_record,
)
from walstore.wal.recovery import LogScan, epoch_history, scan_log

EXIT_CLEAN = 0
EXIT_CORRUPT = 1
EXIT_REPAIRABLE = 3


@dataclass
class VerifyReport:
    directory: Path
    segments: int = 0
    first_index: int = 1
    last_index: int = 0
    epochs: list[tuple[int, int]] = field(default_factory=list)
    promised_epoch: int = 0
    repairable: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def exit_code(self) -> int:
        if self.error is not None:
            return EXIT_CORRUPT
        return EXIT_REPAIRABLE if self.repairable else EXIT_CLEAN

    def lines(self) -> list[str]:
        if self.error is not None:
            return [f"CORRUPT: {self.error}"]
        out = [
            f"{self.directory}: {self.segments} segment(s), records {self.first_index}..{self.last_index} "
            f"({max(0, self.last_index - self.first_index + 1)} records), promised epoch {self.promised_epoch}",
            "epochs: " + (", ".join(f"{e} from {i}" for e, i in self.epochs) or "none"),
        ]
        out += [f"REPAIRABLE: {p}" for p in self.repairable]
        out.append("OK" if not self.repairable else "repairable at start-up (exit 3)")
        return out


def _scan(directory: Path, fs: FileSystem | None, max_body: int) -> LogScan:
    fs = fs if fs is not None else RealFileSystem()
    if not fs.exists(directory):
        raise StorageError(f"{directory}: no such directory")
    return scan_log(fs, directory, max_body=max_body, writable=False)


def verify(directory: Path, *, fs: FileSystem | None = None, max_body: int = MAX_RECORD_BODY_BYTES) -> VerifyReport:
    """Check every segment, record CRC and event body; never raises for damage."""
    report = VerifyReport(directory)
    try:
        scan = _scan(directory, fs, max_body)
    except (CorruptionError, StorageError) as e:
        report.error = str(e)
        return report
    try:
        report.repairable = scan.problems()
        if scan.meta is None:
            report.repairable.append("no meta.json and no segments: not initialised yet")
            return report
        report.promised_epoch = scan.meta.promised_epoch
        report.segments = len(scan.segments)
        if scan.segments:
            report.first_index = scan.segments[0].first_index
            report.last_index = scan.keep_index
        report.epochs = epoch_history(scan.segments)
        for path, rec in _records(scan, report.first_index, max_body):
            if rec.kind == KIND_EVENT:
                try:
                    decode_event_body(rec.body, rec.index)
                except (CorruptionError, UnicodeDecodeError) as e:
                    report.error = f"{path} offset {rec.offset}: record {rec.index} has a bad event body: {e}"
                    break
            elif rec.kind == KIND_TRACKING:
                try:
                    decode_tracking_body(rec.body, rec.index)
                except CorruptionError as e:
                    report.error = f"{path} offset {rec.offset}: record {rec.index} has a bad tracking body: {e}"
                    break
    except CorruptionError as e:
        report.error = str(e)
    finally:
        scan.close()
    return report


def _records(scan: LogScan, from_index: int, max_body: int) -> Iterator[tuple[Path, Record]]:
    for seg in scan.segments:
        if seg.next_index <= from_index:
            continue
        view = seg.file.view()
        for i in range(max(0, from_index - seg.first_index), len(seg.offsets)):
            yield seg.path, decode_record(view, seg.offsets[i], max_body=max_body, path=str(seg.path))


@contextmanager
def dump_records(
    directory: Path, from_index: int = 1, *, fs: FileSystem | None = None, max_body: int = MAX_RECORD_BODY_BYTES
) -> Iterator[tuple[list[str], Iterator[tuple[Path, Record]]]]:
    """``with dump_records(d) as (notes, records)``: notes about repairable leftovers and
    the valid records from from_index. Raises CorruptionError/StorageError when the
    directory cannot be read as a log."""
    scan = _scan(directory, fs, max_body)
    try:
        yield scan.problems(), _records(scan, from_index, max_body)
    finally:
        scan.close()


def _flag_names(flags: int) -> list[str]:
    names = ["BATCH_END"] if flags & FLAG_BATCH_END else []
    if flags & ~FLAG_BATCH_END:
        names.append(f"{flags & ~FLAG_BATCH_END:#x}")
    return names


def record_json(path: Path, rec: Record) -> dict[str, object]:
    """One JSON-lines object of ``wal dump --json``."""
    out: dict[str, object] = {
        "index": rec.index,
        "epoch": rec.epoch,
        "kind": KIND_NAMES.get(rec.kind, str(rec.kind)),
        "flags": _flag_names(rec.flags),
        "size": rec.size,
        "segment": path.name,
        "offset": rec.offset,
    }
    if rec.kind == KIND_EVENT:
        try:
            ev = decode_event_body(rec.body, rec.index)
        except (CorruptionError, UnicodeDecodeError) as e:
            out["error"] = f"bad event body: {e}"
            out["body_hex"] = rec.body.hex()
        else:
            out["event"] = {
                "id": ev.id,
                "type": ev.type,
                "aggregate_id": ev.aggregate_id,
                "version": ev.version,
                "timestamp_us": ev.timestamp_us,
                "payload": _json_or_text(ev.payload),
                "metadata": _json_or_text(ev.metadata),
            }
    elif rec.kind == KIND_TRACKING:
        try:
            tracking = decode_tracking_body(rec.body, rec.index)
        except CorruptionError as e:
            out["error"] = f"bad tracking body: {e}"
            out["body_hex"] = rec.body.hex()
        else:
            out["tracking"] = {"consumer": tracking.consumer, "position": tracking.position}
    else:
        try:
            out["body_text"] = rec.body.decode()
        except UnicodeDecodeError:
            out["body_hex"] = rec.body.hex()
    return out


def _json_or_text(raw: bytes) -> object:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode(errors="replace")


def record_line(path: Path, rec: Record) -> str:
    """One line of ``wal dump`` (human form)."""
    flags = ",".join(_flag_names(rec.flags)) or "-"
    head = (
        f"{rec.index:>10} epoch={rec.epoch} kind={KIND_NAMES.get(rec.kind, rec.kind)} flags={flags} "
        f"size={rec.size} at={path.name}:{rec.offset}"
    )
    obj = record_json(path, rec)
    ev = obj.get("event")
    if isinstance(ev, dict):
        payload = orjson.dumps(ev["payload"]).decode()
        return (
            f"{head} id={ev['id']} type={ev['type']} aggregate={ev['aggregate_id']} version={ev['version']} {payload}"
        )
    tracking = obj.get("tracking")
    if isinstance(tracking, dict):
        return f"{head} consumer={tracking['consumer']} position={tracking['position']}"
    if "error" in obj:
        return f"{head} {obj['error']}"
    body = obj.get("body_text", obj.get("body_hex", ""))
    return f"{head} body={body!r}"
