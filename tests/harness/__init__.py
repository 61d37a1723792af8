"""Test tooling that runs walstore for real and hurts it on purpose.

- ``cluster``: start, stop, kill, pause and restart real ``walstore serve`` processes and the
  etcd they elect through, each node's peer links optionally through fault proxies.
- ``proxy``: a TCP fault proxy (delay, drop, blackhole, reset, corrupt) with its own trio loop.
- ``history``: a load client that records every operation as a JSON line.
- ``checker``: checks a recorded history against the nodes' final logs (promises 1-4 of
  docs/fault-model.md).
"""

import pytest

# Before any submodule is imported: their asserts get pytest's rewriting, and a test module
# that imports them and also names ``harness.cluster`` in ``pytest_plugins`` gets no
# "already imported" warning.
pytest.register_assert_rewrite("harness.cluster", "harness.history", "harness.proxy")
