"""The write-ahead log: segment files of CRC-checked records, recovery, group commit.

Import map: ``record`` (format and decoder), ``segment`` (files and headers), ``fs`` (the
file-system seam), ``simfs`` (a simulated disk for tests), ``meta`` (meta.json),
``recovery`` (torn tail vs. corruption), ``log`` (``WriteAheadLog``), ``tools`` (verify and
dump). ``writer`` (``GroupCommitWriter``) is the only module that imports trio, so it is
not imported here: ``import walstore.wal`` stays free of trio (a test checks).
"""

from walstore.wal.fs import FileSystem, RealFileSystem, WalFile
from walstore.wal.log import WalOptions, WriteAheadLog
from walstore.wal.meta import WalMeta
from walstore.wal.record import (
    FLAG_BATCH_END,
    KIND_EPOCH_START,
    KIND_EVENT,
    KIND_NOOP,
    MAX_RECORD_BODY_BYTES,
    Record,
    decode_record,
    record_size,
)

__all__ = [
    "FLAG_BATCH_END",
    "KIND_EPOCH_START",
    "KIND_EVENT",
    "KIND_NOOP",
    "MAX_RECORD_BODY_BYTES",
    "FileSystem",
    "RealFileSystem",
    "Record",
    "WalFile",
    "WalMeta",
    "WalOptions",
    "WriteAheadLog",
    "decode_record",
    "record_size",
]
