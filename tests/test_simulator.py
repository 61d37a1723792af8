"""The deterministic simulator (docs/simulation.md): a seed replays exactly, a budget of seeds
under every fault kind finds no violation, and each planted bug class is found.

This file is the simulator's CI budget (about two minutes on two cores). A long run is
``make simulate SEEDS=100000``.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from walstore import planted_bugs
from walstore.sim import planted
from walstore.sim.kinds import FRAME_KINDS, KINDS
from walstore.sim.many import run_seeds
from walstore.sim.run import SeedResult, SimOptions, _BusyLoopWatchdog, simulate

# Seeds that once failed, with the options of their run and what they found. Code changes
# move a seed's path, so each fix also has a unit test of its own (named here); the seed
# stays as one more run that must be green.
# The segment size these seeds were found with (the default is smaller now), so that they
# replay the history they were added for as closely as the simulator still allows; each
# also has a test of its own that does not depend on the simulator.
FOUND_WITH = 64 * 1024
REGRESSION_SEEDS: dict[int, tuple[SimOptions, str]] = {
    5: (
        SimOptions(seconds=20, lease_ttl_s=2.0, append_timeout_s=4.0, mean_fault_gap_s=1.5, segment_bytes=FOUND_WITH),
        "a forward on a stopping follower hit a closed nursery, a 500 (tests/test_forward_stopping.py)",
    ),
    9: (
        SimOptions(segment_bytes=FOUND_WITH),
        "a restart after a failed fdatasync built on records never on disk; a crash then left a hole "
        "(tests/test_wal_log.py::test_after_a_failed_fsync_the_next_process_does_not_build_on_what_never_"
        "reached_the_disk)",
    ),
    107: (
        SimOptions(segment_bytes=FOUND_WITH),
        "a leader's resend overlapping records still in flight on a follower stopped it with LogStateError, "
        "which the simulator took for an expected storage exit until broken invariants became violations "
        "(tests/test_replication.py::test_a_resend_overlapping_records_still_in_flight_is_taken_not_a_crash)",
    ),
    1175: (
        SimOptions(seconds=20),
        "rot in a sealed record found by a FETCH stopped the node as a broken invariant (LogStateError), "
        "not as the storage fault it is (tests/test_wal_log.py::test_damage_after_open_is_corruption_to_a_raw_"
        "read_too)",
    ),
    2039: (
        SimOptions(),
        "the fdatasync of a takeover's own promise failed; the node resigned and campaigned on with a poisoned "
        "log, and the simulator's own check then read it and stopped (tests/test_storage_health.py::test_a_"
        "failed_fdatasync_of_the_takeovers_own_promise_stops_the_node)",
    ),
    2185: (
        SimOptions(),
        "rot in a length field of the leader's sealed segment read as a record running past the end; the "
        "leader streamed the rotten bytes and its follower refused them for ever: never converged "
        "(tests/test_wal_log.py::test_rot_that_looks_like_an_end_is_corruption_to_a_raw_read)",
    ),
    2313: (
        SimOptions(),
        "rot found streaming the leader's log stopped that stream for the whole term, not the node "
        "(tests/test_replication.py::test_rot_found_reading_the_leaders_log_for_a_follower_stops_the_term)",
    ),
    2492: (
        SimOptions(),
        "the nemesis did not count a node with a lost disk as an amnesiac before it registered its new "
        "incarnation, and rotted a second voter's disk: two of three voters without their data, stuck",
    ),
    5258: (
        SimOptions(nodes=5, seconds=30),
        "a takeover's Superseded left its nursery inside an ExceptionGroup that the role machine's "
        "`except Superseded` missed, and stopped the node (tests/test_replication.py::test_a_peer_that_"
        "promised_a_newer_epoch_supersedes_the_takeover)",
    ),
    7084: (
        SimOptions(seconds=30),
        "a replayed FORWARD was appended after its first copy had been answered 503 not_leader: a write "
        "in the log whose client was told it failed (tests/test_replication.py::test_a_replayed_forward_is_"
        "refused_not_appended_again)",
    ),
}
# The clean budget: this many seeds of every fault kind, 10 virtual seconds each.
CLEAN_SEEDS = range(100, 112)
FIVE_NODE_SEEDS = range(300, 304)
# Each planted bug runs under its profile (walstore/sim/planted.py, which the CLI's --plant
# uses too); the test stops at the first seed that finds it and may spend PLANTED_SEEDS.
PLANTED_SEEDS = range(1, 41)


def test_a_seed_replays_exactly() -> None:
    options = SimOptions(seconds=8)
    first, second = simulate(7, options), simulate(7, options)
    assert first.trace.lines == second.trace.lines
    assert first.digest == second.digest and first.violations == second.violations
    assert first.acked > 0 and sum(first.faults.values()) > 0  # it did something
    assert simulate(8, options).digest != first.digest


def test_five_node_clusters_under_every_fault_find_nothing() -> None:
    """Five voters under every fault kind, with the same checks as the 3-node budget."""
    summary = run_seeds(FIVE_NODE_SEEDS, SimOptions(nodes=5))
    failing = {r.seed: r.violations[:5] for r in summary.failed}
    assert not failing, f"{failing}\n" + "\n\n".join(r.trace.tail(80) for r in summary.failed[:1])
    assert summary.acked > 100 * len(FIVE_NODE_SEEDS)
    assert summary.faults["crash"] + summary.faults["lost_disk"] > len(FIVE_NODE_SEEDS)


def test_a_budget_of_seeds_under_every_fault_finds_nothing() -> None:
    summary = run_seeds(CLEAN_SEEDS, SimOptions())
    failing = {r.seed: r.violations[:5] for r in summary.failed}
    assert not failing, f"{failing}\n" + "\n\n".join(r.trace.tail(80) for r in summary.failed[:1])
    assert summary.acked > 100 * len(CLEAN_SEEDS)
    # The budget really injects faults of every kind, not a quiet cluster. (It allowed two
    # kinds missing once, and read corruption went uninjected unnoticed: too few sealed
    # segments.) A change that makes a kind miss here needs the budget or the kind fixed.
    assert set(KINDS) <= set(summary.faults), f"never injected: {sorted(set(KINDS) - set(summary.faults))}"
    print(summary.report())


@pytest.mark.parametrize("seed", sorted(REGRESSION_SEEDS))
def test_regression_seed(seed: int) -> None:
    options, found = REGRESSION_SEEDS[seed]
    result = simulate(seed, options)
    assert result.ok, f"{found}: {result.violations}\n{result.trace.tail(80)}"


@pytest.mark.parametrize("bug", sorted(planted_bugs.BUGS))
def test_each_planted_bug_is_found_within_the_budget(bug: str) -> None:
    summary = run_seeds(PLANTED_SEEDS, planted.profile(bug), stop_at_first_failure=True)
    assert summary.failed, f"{bug} not found in {summary.seeds_run} seeds: {summary.report()}"
    print(f"{bug}: found by seed {summary.failed[0].seed}: {summary.failed[0].violations[:3]}")
    assert planted_bugs.active == frozenset()  # switched off again after the run


def test_every_planted_bug_has_a_profile() -> None:
    assert set(planted.PROFILES) == set(planted_bugs.BUGS)
    assert planted.profile("commit_older_epoch", seconds=5.0) == SimOptions(
        seconds=5.0,
        faults=("figure8",),
        mean_fault_gap_s=0.6,
        replication_frame_bytes=64,
        plant=("commit_older_epoch",),
    )


def test_frame_faults_are_injected_and_counted() -> None:
    result = simulate(4, SimOptions(seconds=10, faults=FRAME_KINDS, frame_fault_rate=0.01))
    assert result.ok, result.violations
    lines = "\n".join(result.trace.lines)
    assert "drop a frame" in lines and "duplicate a frame" in lines and "carrying an EPOCH_START" in lines
    assert all(result.faults[kind] > 0 for kind in FRAME_KINDS), result.faults
    assert result.acked > 0  # EPOCH_STARTs lost half the time still let leaders through


def test_unknown_fault_kinds_and_bugs_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        SimOptions(faults=("crash", "meteor"))
    with pytest.raises(ValueError, match="unknown planted bug"):
        planted_bugs.enable("no_such_bug")


def test_a_task_that_never_lets_the_clock_move_ends_the_seed_as_a_violation() -> None:
    """What the replicator's quorum loop once did (sleeping until a moment already past, by
    a floating-point hair): a busy loop that froze the virtual clock for good."""
    result = SeedResult(0)
    watchdog = _BusyLoopWatchdog(result)

    async def spin() -> None:
        with trio.CancelScope() as scope:
            watchdog.scope = scope
            while True:  # noqa: ASYNC110 (the busy loop under test)
                await trio.sleep_until(trio.current_time())

    trio.run(spin, clock=trio.testing.MockClock(autojump_threshold=0), instruments=[watchdog])
    assert len(result.violations) == 1 and result.violations[0].startswith("busy_loop: ")


def test_the_network_knows_an_append_that_carries_an_epoch_start() -> None:
    """The aimed frame fault (``epoch_start_drop``, ``figure8``) picks these frames out."""
    from walstore.protocol import Append, Heartbeat
    from walstore.protocol.messages import encode_message
    from walstore.sim.network import _carries_epoch_start
    from walstore.wal.record import FLAG_BATCH_END, KIND_EPOCH_START, KIND_EVENT, encode_record

    events = encode_record(KIND_EVENT, 0, 3, 7, b"x" * 13) + encode_record(KIND_EVENT, FLAG_BATCH_END, 3, 8, b"")
    start = encode_record(KIND_EPOCH_START, FLAG_BATCH_END, 4, 9, b'{"epoch":4}')

    def append(entries: bytes) -> bytes:
        return encode_message(Append(4, 6, 3, 5, entries))

    assert _carries_epoch_start(append(events + start))
    assert _carries_epoch_start(append(start))
    assert not _carries_epoch_start(append(events))
    assert not _carries_epoch_start(append(b""))  # an empty APPEND: the commit index only
    assert not _carries_epoch_start(encode_message(Heartbeat(4, 5, 0)))
