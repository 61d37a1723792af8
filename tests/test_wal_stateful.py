"""Model-based crash testing of the WAL on the simulated disk.

The model keeps every record appended (``written``) and how many of them are known to be
durable (``synced``). Rules append (synced or not, with rotation into tiny segments),
sync, truncate, reopen cleanly, inject fsync and disk-full failures, and crash (dropping
every unsynced write, sometimes tearing the sector being written). After a crash the
recovered log must be exactly ``written[:synced]``; only after a failed fdatasync, when
some segments of the failed call may have been synced before another failed, may it
hold more, and then only whole batches of ``written`` (a prefix ending at a batch end).
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from walstore.errors import DiskFullError, FsyncError, StorageError
from walstore.wal.log import WalOptions, WriteAheadLog
from walstore.wal.record import KIND_EVENT, decode_record, record_size
from walstore.wal.simfs import SimulatedFileSystem

D = Path("/wal")
# ~5 records per segment: rotation on almost every other append.
OPTIONS = WalOptions(segment_size_bytes=512, max_record_body_bytes=96)

Rec = tuple[int, int, bytes, bool]  # index, epoch, body, batch end


class WalMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.fs = SimulatedFileSystem(seed=0)
        self.log = WriteAheadLog.open(D, OPTIONS, self.fs)
        self.written: list[Rec] = []
        self.synced = 0
        self.maybe = 0  # up to here may be durable too (after a failed fdatasync)
        self.epoch = 1
        self.poisoned = False

    # -- helpers ------------------------------------------------------------------------------

    def _batch(self, sizes: list[int], epoch: int) -> tuple[bytes, list[Rec]]:
        first = len(self.written) + 1
        bodies = [bytes([(first + i) % 200 + 1]) * n for i, n in enumerate(sizes)]
        data = self.log.encode([(KIND_EVENT, 0, b) for b in bodies], epoch, first)
        recs = [(first + i, epoch, b, i == len(sizes) - 1) for i, b in enumerate(bodies)]
        return data, recs

    def _reopen(self) -> None:
        self.log = WriteAheadLog.open(D, OPTIONS, self.fs)
        self.poisoned = False

    # -- rules --------------------------------------------------------------------------------

    @precondition(lambda self: not self.poisoned)
    @rule(
        sizes=st.lists(st.integers(0, 96), min_size=1, max_size=6),
        sync=st.booleans(),
        new_epoch=st.booleans(),
    )
    def append(self, sizes: list[int], sync: bool, new_epoch: bool) -> None:
        if new_epoch:
            self.epoch += 1
        data, recs = self._batch(sizes, self.epoch)
        assert self.log.append(data, sync=sync) == recs[-1][0]
        self.written += recs
        if sync:
            self.synced = self.maybe = len(self.written)

    @precondition(lambda self: not self.poisoned)
    @rule()
    def sync(self) -> None:
        self.log.sync()
        self.synced = self.maybe = len(self.written)

    @precondition(lambda self: not self.poisoned and self.written)
    @rule(data=st.data())
    def truncate(self, data: st.DataObject) -> None:
        after = data.draw(st.integers(0, len(self.written)))
        self.log.truncate_suffix(after)
        if after < len(self.written):
            # a real truncation syncs everything it keeps
            del self.written[after:]
            self.synced = self.maybe = after

    @precondition(lambda self: not self.poisoned)
    @rule(sizes=st.lists(st.integers(0, 96), min_size=1, max_size=6), budget=st.integers(0, 400))
    def disk_full(self, sizes: list[int], budget: int) -> None:
        data, recs = self._batch(sizes, self.epoch)
        self.fs.fail_writes_after(budget)
        try:
            self.log.append(data)
        except DiskFullError:
            assert self.log.last_index == len(self.written)
        else:
            self.written += recs
            self.synced = self.maybe = len(self.written)
        finally:
            self.fs.clear_faults()

    @precondition(lambda self: not self.poisoned)
    @rule(sizes=st.lists(st.integers(0, 96), min_size=1, max_size=6))
    def fsync_fails(self, sizes: list[int]) -> None:
        data, recs = self._batch(sizes, self.epoch)
        self.fs.fail_next_fdatasync()
        try:
            self.log.append(data)
        except FsyncError:
            self.poisoned = True
            self.maybe = len(self.written) + len(recs)
            self.written += recs  # may or may not be durable: decided at the next crash
            try:
                self.log.append(b"")
            except FsyncError:
                pass
            else:
                raise AssertionError("a poisoned log accepted a call")
        finally:
            self.fs.clear_faults()

    @rule(garble=st.booleans())
    def crash(self, garble: bool) -> None:
        self.fs.crash(garble=garble)
        self._reopen()
        got = [(r.index, r.epoch, r.body, r.batch_end) for r in self.log.read(1)]
        n = len(got)
        # Recovery keeps whole batches: the synced prefix back to its last batch end (a
        # truncation can leave a batch's head at the end), and after a failed fdatasync
        # perhaps whole batches more.
        floor = max([r[0] for r in self.written[: self.synced] if r[3]], default=0)
        assert got == self.written[:n]
        assert floor <= n <= self.maybe, (floor, n, self.maybe)
        assert n == 0 or got[-1][3], "recovery must end at a batch end"
        if self.maybe == self.synced:
            assert n == floor
        self.written = got
        self.synced = self.maybe = n
        self.epoch = max(self.epoch, self.log.last_epoch)

    @precondition(lambda self: not self.poisoned)
    @rule()
    def clean_reopen(self) -> None:
        self.log.close()
        self._reopen()
        # Everything was synced at close, but recovery still ends the log at a batch end
        # (a truncation inside a batch leaves that batch's head after the last one).
        keep = max([r[0] for r in self.written if r[3]], default=0)
        del self.written[keep:]
        self.synced = self.maybe = keep

    # -- checks -------------------------------------------------------------------------------

    @invariant()
    def log_matches_model(self) -> None:
        if self.poisoned:
            return
        assert self.log.last_index == len(self.written)
        assert self.log.last_epoch == (self.written[-1][1] if self.written else 0)
        ends = [r[0] for r in self.written if r[3]]
        assert self.log.batch_end_index == (ends[-1] if ends else 0)

    @precondition(lambda self: not self.poisoned and self.written)
    @rule(data=st.data())
    def reads(self, data: st.DataObject) -> None:
        first = data.draw(st.integers(1, len(self.written)))
        got = [(r.index, r.epoch, r.body, r.batch_end) for r in self.log.read(first)]
        assert got == self.written[first - 1 :]
        max_bytes = data.draw(st.integers(1, 1500))
        raw = self.log.read_raw(first, max_bytes)
        recs: list[Rec] = []
        off = 0
        while off < len(raw):
            dec = decode_record(raw, off)
            recs.append((dec.index, dec.epoch, dec.body, dec.batch_end))
            off += dec.size
        assert recs == self.written[first - 1 : first - 1 + len(recs)]
        # whole batches when one fits, else whole records up to max_bytes, at least one
        total, fit = 0, 0
        for r in self.written[first - 1 :]:
            total += record_size(len(r[2]))
            if total > max_bytes:
                break
            fit += 1
        ends = [k for k in range(fit) if self.written[first - 1 + k][3]]
        assert len(recs) == (ends[-1] + 1 if ends else max(1, fit))

    def teardown(self) -> None:
        try:
            self.log.close()
        except StorageError:
            pass


WalMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestWalCrashes = WalMachine.TestCase
