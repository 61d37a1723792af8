"""Replication: leader and follower sides, takeover, forwarding, and the peer transport."""
