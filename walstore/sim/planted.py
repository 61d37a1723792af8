"""The fault profile each planted bug needs to be found (walstore.planted_bugs).

A bug class shows only under the faults that stage it: the lost-disk bug needs lost disks
and cut links, Raft's figure 8 needs its own aimed fault and frames small enough to split
a catch-up. ``walstore simulate --plant NAME`` without ``--faults`` runs the bug's profile,
and ``tests/test_simulator.py`` proves each is found within its CI budget under the same.
"""

from __future__ import annotations

import dataclasses

from walstore.sim.run import SimOptions

PROFILES: dict[str, SimOptions] = {
    "wiped_node_votes": SimOptions(
        faults=("lost_disk", "crash", "isolate", "blackhole", "partition"), mean_fault_gap_s=0.6
    ),
    "ack_before_fsync": SimOptions(
        faults=("crash", "torn", "restart", "slow_disk", "partition", "isolate"), mean_fault_gap_s=0.6
    ),
    "accept_lower_epoch": SimOptions(
        faults=("lease_expiry", "etcd_cut", "pause", "isolate", "partition"), mean_fault_gap_s=0.6
    ),
    # Raft's figure 8 (docs/simulation.md): the fault that stages it, and frames of one
    # record each, so that a follower acknowledges old entries before the new EPOCH_START.
    "commit_older_epoch": SimOptions(faults=("figure8",), mean_fault_gap_s=0.6, replication_frame_bytes=64),
}


def profile(bug: str, *, nodes: int | None = None, seconds: float | None = None) -> SimOptions:
    """The options that plant ``bug`` under its profile; ``nodes`` and ``seconds`` as given,
    else the profile's."""
    base = PROFILES[bug]
    return dataclasses.replace(
        base,
        plant=(bug,),
        nodes=base.nodes if nodes is None else nodes,
        seconds=base.seconds if seconds is None else seconds,
    )
