"""The fault kinds the simulator knows (a module of its own so that ``walstore --help``
does not import the whole node to list them)."""

from __future__ import annotations

KINDS = (
    "crash",  # kill -9, unsynced writes lost
    "cut_crash",  # silent to every peer for a moment (taking writes alone), then kill -9
    "figure8",  # cut_crash of the leader, then the next two leaders' EPOCH_STARTs are lost and they die
    "torn",  # crash during a write: the last sector garbled
    "restart",  # a clean crash and immediate restart
    "lost_disk",  # the data directory is gone; the node comes back empty
    "fsync_eio",  # the next fdatasync fails (the node must stop)
    "enospc",  # the disk fills for a while
    "slow_disk",  # write + fdatasync latency spikes
    "corrupt",  # a byte of a sealed segment rots (found on read or at start-up)
    "partition",  # two nodes cut apart, connections reset
    "blackhole",  # two nodes cut apart, connections silent
    "isolate",  # one node cut from every other
    "pause",  # a node stopped past its lease
    "lease_expiry",  # the leader's etcd lease ends now
    "etcd_cut",  # one node cannot reach etcd for a while
    "etcd_down",  # nobody can reach etcd for a while
)
# Per-frame network faults: enabled by rates, not by steps (network.NetworkFaults).
FRAME_KINDS = ("drop", "duplicate", "reorder", "epoch_start_drop")
DEFAULT_KINDS = KINDS
