"""A log as the replication rules see it, without a disk: one epoch per entry (for
tests/test_replication_rules.py and tests/test_replication_progress.py)."""

from __future__ import annotations

from collections.abc import Sequence

from walstore.wal.record import FLAG_BATCH_END, KIND_EVENT, CheckedRecords, check_records, encode_record


class EpochLog:
    """A log of ``epochs[i]`` at index i + 1; the last ``in_flight`` entries are submitted
    but not written, so their epoch is not known yet (as ReplicaLog.epoch_at says)."""

    def __init__(self, epochs: Sequence[int], in_flight: int = 0) -> None:
        self.epochs = list(epochs)
        self.in_flight = in_flight

    @property
    def tail_index(self) -> int:
        return len(self.epochs)

    def epoch_at(self, index: int) -> int | None:
        if index == 0:
            return 0
        if index > len(self.epochs) - self.in_flight:
            return None
        return self.epochs[index - 1]

    def epoch_history(self) -> list[tuple[int, int]]:
        history: list[tuple[int, int]] = []
        for i, epoch in enumerate(self.epochs, start=1):
            if not history or history[-1][0] != epoch:
                history.append((epoch, i))
        return history


def records(first: int, epochs: Sequence[int], *, batch_end: bool = True) -> CheckedRecords:
    """Records first.. with these epochs, checked as a follower checks an APPEND's; one
    batch, its last record marked BATCH_END unless ``batch_end`` is False."""
    data = b"".join(
        encode_record(KIND_EVENT, FLAG_BATCH_END if batch_end and i == len(epochs) - 1 else 0, e, first + i, b"x")
        for i, e in enumerate(epochs)
    )
    return check_records(data, first, min_epoch=1)
