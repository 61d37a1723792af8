"""Known bug classes, planted back behind switches, to prove the simulator finds them.

A test (or ``walstore simulate --plant NAME``) turns one on for a run; production never
does, and every switch is off unless ``enable`` is called in this process. Each names a bug
the replication design exists to prevent (docs/simulation.md):

- ``wiped_node_votes``: the lost-disk bug as it was. A node that starts with an empty data
  directory registers as a voter, not a learner, so it can vote with promises it forgot.
- ``commit_older_epoch``: a leader commits entries of an older epoch by counting the
  replicas that hold them, before an entry of its own epoch is on a majority.
- ``ack_before_fsync``: a follower acknowledges an APPEND before its fdatasync.
- ``accept_lower_epoch``: a follower accepts frames of an epoch below the one it promised.
"""

from __future__ import annotations

BUGS = ("wiped_node_votes", "commit_older_epoch", "ack_before_fsync", "accept_lower_epoch")

# Read on hot paths as a plain attribute lookup; empty in production.
active: frozenset[str] = frozenset()


def enable(*names: str) -> None:
    """Turn on exactly ``names`` (none: all off)."""
    global active
    unknown = set(names) - set(BUGS)
    if unknown:
        raise ValueError(f"unknown planted bug(s) {sorted(unknown)}; known: {', '.join(BUGS)}")
    active = frozenset(names)
