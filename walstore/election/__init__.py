"""Leader election: who leads the cluster, and the epoch that fences every leadership.

``base`` holds the interface the replication layer codes against (``Election``,
``Leadership``, ``Candidate``, ``LeaderInfo``); ``memory`` an in-process backend for tests;
``etcd`` the real backend (import ``walstore.election.etcd`` explicitly: it loads grpc and
etcd3, which nothing else needs); ``etcd_process`` starts local etcd servers.
"""

from walstore.election.base import (
    DEFAULT_LEASE_TTL_S,
    Candidate,
    Election,
    LeaderInfo,
    Leadership,
    election_key,
)
from walstore.election.memory import MemoryElection, MemoryElectionHub

__all__ = [
    "DEFAULT_LEASE_TTL_S",
    "Candidate",
    "Election",
    "LeaderInfo",
    "Leadership",
    "MemoryElection",
    "MemoryElectionHub",
    "election_key",
]
