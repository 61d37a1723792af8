"""The log's metadata file, ``meta.json``, replaced atomically.

Format: one line of JSON, keys sorted, then a newline::

    {"commit_index":C,"crc32c":N,"epoch_history":[[epoch,first_index],...],"format":2,
     "incarnation":"32 hex digits","promised_epoch":E,"truncate_after":null}

``crc32c`` covers the same object serialised without the ``crc32c`` key (keys sorted, no
spaces), so bit rot or a hand edit is detected rather than trusted. ``promised_epoch`` is
the highest epoch this node promised at a takeover (PREPARE); it must survive restarts or
an old leader could collect a second promise. ``epoch_history`` lists where each epoch's
entries begin; it is written with every save as the log's records show it (the records
stay the truth: the log rebuilds the history from them at open).

``incarnation`` names this data directory: 128 random bits drawn when the directory is
created, never changed afterwards. The cluster records each member's incarnation in etcd
(``walstore.election.membership``): a directory whose incarnation is not the recorded one
is new, so the node holding it has forgotten every promise and acknowledgement and may
not vote until it has caught up. It lives in this file because it must be lost exactly
when the promises are: with the directory.

``commit_index`` is the highest log index this node has learned is committed (and holds
durably). It only grows. No truncation may cut at or below it (``CommittedTruncation``),
and a log that ends below it at start-up has lost acknowledged data: the node refuses to
start. It is saved with every promise and, lazily, as the commit index moves.

Format 1 files (before incarnations) are read as a directory that is intact but has no
incarnation yet; the log gives it one at its next open (an upgrade, not an amnesia).

``truncate_after`` is the intent record of a suffix truncation: while it is set, every
record with a higher index is garbage, whatever state it is in. The log sets it before it
starts zeroing valid records and clears it when the zeros are on disk, so a crash in the
middle (which can tear a sector of the zeroing write, leaving a damaged record with valid
old records after it) is finished at the next start instead of looking like corruption.

Replacement: write ``meta.json.tmp``, fdatasync it, rename it over ``meta.json``, fsync
the directory. A crash leaves either the old or the new file, never a mix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from walstore import runtime
from walstore._native import crc32c
from walstore.errors import CorruptionError, LogStateError
from walstore.wal.fs import FileSystem

META_FILE = "meta.json"
META_FORMAT = 2
_LEGACY_FORMAT = 1
INCARNATION_HEX_CHARS = 32
# Bigger than any real file (one line per epoch) but small enough to read without worry.
MAX_META_BYTES = 1 << 20


def new_incarnation() -> str:
    """A fresh data-directory identity: 128 random bits as 32 lowercase hex digits."""
    return runtime.current().token_hex(INCARNATION_HEX_CHARS // 2)


def is_incarnation(value: object) -> bool:
    return (
        isinstance(value, str) and len(value) == INCARNATION_HEX_CHARS and all(c in "0123456789abcdef" for c in value)
    )


@dataclass(frozen=True, slots=True)
class WalMeta:
    promised_epoch: int = 0
    epoch_history: tuple[tuple[int, int], ...] = ()
    truncate_after: int | None = None
    incarnation: str = ""  # "": a format-1 file, not given an identity yet
    commit_index: int = 0

    def __post_init__(self) -> None:
        if self.promised_epoch < 0:
            raise LogStateError("promised_epoch must be >= 0")
        if self.commit_index < 0:
            raise LogStateError("commit_index must be >= 0")
        if self.incarnation and not is_incarnation(self.incarnation):
            raise LogStateError(f"incarnation {self.incarnation!r} is not {INCARNATION_HEX_CHARS} hex digits")
        prev_epoch, prev_index = 0, 0
        for epoch, first_index in self.epoch_history:
            if epoch <= prev_epoch or first_index < max(prev_index, 1):
                raise LogStateError(f"epoch history is not increasing: {self.epoch_history}")
            prev_epoch, prev_index = epoch, first_index
        if self.truncate_after is not None and self.truncate_after < 0:
            raise LogStateError("truncate_after must be >= 0")


_LEGACY_KEYS = {"format", "promised_epoch", "epoch_history", "truncate_after", "crc32c"}
_KEYS = _LEGACY_KEYS | {"incarnation", "commit_index"}


def _canonical(obj: dict[str, object]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def encode_meta(meta: WalMeta) -> bytes:
    if not meta.incarnation:
        raise LogStateError("meta.json is only written with an incarnation")
    obj: dict[str, object] = {
        "format": META_FORMAT,
        "promised_epoch": meta.promised_epoch,
        "epoch_history": [list(pair) for pair in meta.epoch_history],
        "truncate_after": meta.truncate_after,
        "incarnation": meta.incarnation,
        "commit_index": meta.commit_index,
    }
    obj["crc32c"] = crc32c(_canonical(obj))
    return _canonical(obj) + b"\n"


def _is_u64(v: object) -> bool:
    return type(v) is int and 0 <= v < 1 << 64


def decode_meta(data: bytes, path: str = META_FILE) -> WalMeta:
    """Parse and verify; CorruptionError(path, 0, why) for anything but a valid file."""

    def bad(why: str) -> CorruptionError:
        return CorruptionError(path, 0, f"metadata file: {why}")

    if len(data) > MAX_META_BYTES:
        raise bad(f"{len(data)} bytes is over the limit {MAX_META_BYTES}")
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise bad(f"not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise bad("not a JSON object")
    legacy = obj.get("format") == _LEGACY_FORMAT
    if set(obj) != (_LEGACY_KEYS if legacy else _KEYS):
        raise bad("unexpected keys")
    stored = obj.pop("crc32c")
    if not _is_u64(stored) or crc32c(_canonical(obj)) != stored:
        raise bad("crc32c mismatch")
    if obj["format"] not in (META_FORMAT, _LEGACY_FORMAT):
        raise bad(f"unknown format {obj['format']!r}")
    incarnation = "" if legacy else obj["incarnation"]
    commit = 0 if legacy else obj["commit_index"]
    if not legacy and not (is_incarnation(incarnation) and _is_u64(commit)):
        raise bad("incarnation must be 32 hex digits and commit_index a u64")
    promised, history, cut = obj["promised_epoch"], obj["epoch_history"], obj["truncate_after"]
    if not _is_u64(promised) or not isinstance(history, list) or not (cut is None or _is_u64(cut)):
        raise bad("wrong field types")
    pairs: list[tuple[int, int]] = []
    for item in history:
        if not (isinstance(item, list) and len(item) == 2 and all(_is_u64(v) for v in item)):
            raise bad("epoch history entries must be [epoch, first_index]")
        pairs.append((item[0], item[1]))
    try:
        return WalMeta(promised, tuple(pairs), cut, incarnation, commit)
    except LogStateError as e:
        raise bad(str(e)) from None


def load_meta(fs: FileSystem, directory: Path) -> WalMeta | None:
    """The stored metadata, or None when the file does not exist."""
    path = directory / META_FILE
    if not fs.exists(path):
        return None
    return decode_meta(fs.read_file(path), str(path))


def save_meta(fs: FileSystem, directory: Path, meta: WalMeta) -> None:
    """Replace meta.json atomically and durably (see the module docstring)."""
    tmp = directory / (META_FILE + ".tmp")
    if fs.exists(tmp):
        fs.unlink(tmp)  # left by a crash between create and rename
    f = fs.create(tmp)
    try:
        f.pwritev([encode_meta(meta)], 0, sync=True)
    finally:
        f.close()
    fs.rename(tmp, directory / META_FILE)
    fs.fsync_dir(directory)
