"""A follower's log and shell without a disk or trio: the follower core's needs carried out
on an in-memory log, as follower.py carries them out on a ReplicaLog (for
tests/test_follower_core.py and tests/test_replica_core.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from epoch_log import EpochLog, records

from walstore.errors import CommittedTruncation, DiskFullError
from walstore.protocol import Append
from walstore.replication.follower_core import (
    Answer,
    CutAfter,
    DrainWriter,
    Handling,
    LeaderSeen,
    Need,
    PersistPromise,
    ReadRecords,
    VerifyLeader,
    WriteRecords,
    advance,
)
from walstore.wal.record import CheckedRecords, check_records, peek_header


class MemLog(EpochLog):
    """An EpochLog with what the core reads besides epochs."""

    def __init__(self, epochs: Sequence[int], *, promised: int = 0, in_flight: int = 0) -> None:
        super().__init__(epochs, in_flight)
        self.promised_epoch = promised
        self.durable_promise = promised
        self.halted: str | None = None

    @property
    def tail_epoch(self) -> int:
        return self.epochs[-1] if self.epochs else 0

    @property
    def written_index(self) -> int:
        return len(self.epochs) - self.in_flight

    def check_records(self, data: bytes, first_index: int, *, min_epoch: int) -> CheckedRecords:
        return check_records(data, first_index, min_epoch=min_epoch)


@dataclass
class Shell:
    """Carries out needs on a MemLog as follower.py does on a ReplicaLog, and records them."""

    log: MemLog
    election_confirms: bool = True
    promise_fails: bool = False
    cut_refused: bool = False
    during_verify: Callable[[], None] = lambda: None
    leader_seen: Callable[[int, str], None] = lambda epoch, leader_id: None
    needs: list[Need] = field(default_factory=list)

    def run(self, handling: Handling) -> Answer:
        step = advance(handling)  # driven as follower.py drives it
        while not isinstance(step, Answer):
            result, failure = self.carry_out(step)
            step = advance(handling, result, failure)
        return step

    def carry_out(self, need: Need) -> tuple[object, BaseException | None]:
        self.needs.append(need)
        result: object = None
        failure: BaseException | None = None
        if isinstance(need, VerifyLeader):
            self.during_verify()
            result = self.election_confirms
        elif isinstance(need, PersistPromise):
            self.log.promised_epoch = max(self.log.promised_epoch, need.epoch)  # memory first
            if self.promise_fails:
                failure = DiskFullError("no space for meta.json")
            else:
                self.log.durable_promise = self.log.promised_epoch
        elif isinstance(need, DrainWriter):
            self.log.in_flight = 0
        elif isinstance(need, CutAfter):
            if self.cut_refused or need.index < need.commit:
                failure = CommittedTruncation(need.index, need.commit, f"asked by {need.asked_by}")
            else:
                del self.log.epochs[need.index :]
        elif isinstance(need, WriteRecords):
            recs = need.records
            assert recs.first_index == self.log.tail_index + 1
            self.log.epochs += [peek_header(recs.data, o).epoch for o in recs.offsets]
        elif isinstance(need, LeaderSeen):
            self.leader_seen(need.epoch, need.leader_id)
        elif isinstance(need, ReadRecords):
            result = b"records from %d" % need.first
        return result, failure

    def kinds(self) -> list[str]:
        return [type(n).__name__ for n in self.needs]


def append(epoch: int, prev: int, prev_epoch: int, epochs: Sequence[int] = (), leader_commit: int = 0) -> Append:
    data = records(prev + 1, epochs).data if epochs else b""
    return Append(epoch, prev, prev_epoch, leader_commit, data)
