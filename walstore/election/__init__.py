"""Leader election: who leads the cluster, and the epoch that fences every leadership.

``base`` holds the interface the replication layer codes against (``Election``,
``Leadership``, ``Candidate``, ``LeaderInfo``); ``memory`` an in-process backend for tests;
``etcd`` the real backend (import ``walstore.election.etcd`` explicitly: it loads grpc and
etcd3, which nothing else needs); ``etcd_process`` starts local etcd servers;
``membership`` the member records and who votes (sans-IO).

Import the modules, not the package: the package itself imports nothing, so that the
sans-IO replica core can read ``membership`` without loading trio.
"""
