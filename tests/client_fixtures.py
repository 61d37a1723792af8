"""Fixtures of the client tests (tests/test_client_*.py): one real ``walstore serve`` per
test module, a ``Client`` on it per test, and fresh aggregate names so tests sharing the
node never see each other's events. Loaded by conftest.py's ``pytest_plugins``."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator

import pytest
from served_node import ServedNode

from walstore.client import Client


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedNode]:
    with ServedNode([sys.executable, "-m", "walstore", "serve"], tmp_path_factory.mktemp("node")) as served:
        yield served


@pytest.fixture
def client(node: ServedNode) -> Iterator[Client]:
    with Client(node.url, retry_deadline=10.0) as c:
        yield c


def fresh(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"
