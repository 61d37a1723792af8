"""walstore's Python clients.

- ``Client`` (sync, httpx) and ``AsyncClient`` (async, httpx, on trio or asyncio): the
  API for applications, with retries, failover, paging and resumable subscriptions
  (docs/clients.md). Loaded on first use, so the command line, which needs only the
  small client below, does not pay for importing httpx.
- ``errors`` and ``models``: what those two raise and return.
- ``simple``: the small stdlib client the command line and the tests build on
  (``WalstoreClient``, ``append_with_retry``, ``follow``, ``cluster_status``, ...),
  re-exported here under the names it always had.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from walstore.client.simple import (
    ATTEMPT_MARGIN_S,
    DEFINITE_UNAVAILABLE,
    FIRST_BACKOFF_S,
    MAX_BACKOFF_S,
    MAX_PAGE_EVENTS,
    MAX_RETRY_AFTER_S,
    SERVER_APPEND_TIMEOUT_S,
    Attempt,
    ClientError,
    OutcomeUnknownError,
    Response,
    SseMessage,
    UnreachableError,
    WalstoreClient,
    append_with_retry,
    cluster_status,
    discover,
    follow,
    iter_aggregate,
    iter_log,
    loads_exact,
    parse_sse,
    parse_url,
)

if TYPE_CHECKING:
    from walstore.client._async import AsyncClient, AsyncSubscription
    from walstore.client._sync import Client, Subscription

_LAZY = {
    "Client": "walstore.client._sync",
    "Subscription": "walstore.client._sync",
    "AsyncClient": "walstore.client._async",
    "AsyncSubscription": "walstore.client._async",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'walstore.client' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "ATTEMPT_MARGIN_S",
    "DEFINITE_UNAVAILABLE",
    "FIRST_BACKOFF_S",
    "MAX_BACKOFF_S",
    "MAX_PAGE_EVENTS",
    "MAX_RETRY_AFTER_S",
    "SERVER_APPEND_TIMEOUT_S",
    "AsyncClient",
    "AsyncSubscription",
    "Attempt",
    "Client",
    "ClientError",
    "OutcomeUnknownError",
    "Response",
    "SseMessage",
    "Subscription",
    "UnreachableError",
    "WalstoreClient",
    "append_with_retry",
    "cluster_status",
    "discover",
    "follow",
    "iter_aggregate",
    "iter_log",
    "loads_exact",
    "parse_sse",
    "parse_url",
]
