"""Simulated clients: appends with ids and expected versions, and reads, written down as the
history ``walstore.checker`` takes.

A client calls a node's ``EventService`` methods, the same ones the HTTP layer calls. Each
outcome is classified as the HTTP API would answer it: a definite failure (4xx, 503) is
``fail``, an unknown outcome (504, or the node died under the call) is ``info``, and the
client retries an ``info`` append with the same id, as a careful client does (promise 2:
a retry never duplicates). Anything that is not a ``WalstoreError`` would have been a 500:
it is reported, not classified.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import trio

from walstore import runtime
from walstore.checker import KEY_FIELD
from walstore.errors import (
    ConflictError,
    OutcomeUnknown,
    RequestError,
    UnavailableError,
    WalstoreError,
)
from walstore.event import NewEvent
from walstore.node import Node
from walstore.sim.cluster import SimCluster
from walstore.sim.trace import Trace


class Workload:
    def __init__(
        self,
        cluster: SimCluster,
        rng: random.Random,
        trace: Trace,
        *,
        clients: int,
        aggregates: int,
        on_unexpected: Callable[[str, BaseException], None],
    ) -> None:
        self.cluster = cluster
        self.rng = rng
        self.trace = trace
        self.clients = clients
        self.aggregates = [f"agg-{i}" for i in range(aggregates)]
        self.on_unexpected = on_unexpected
        self.history: list[dict[str, Any]] = []
        self.acked = 0
        self.failed = 0
        self.unknown = 0
        self._versions: dict[str, int] = {}  # highest version seen per aggregate
        self._next = 0

    async def run(self, until: float) -> None:
        async with trio.open_nursery() as nursery:
            for c in range(self.clients):
                nursery.start_soon(self._client, c, until)

    async def _client(self, c: int, until: float) -> None:
        rng = random.Random(self.rng.getrandbits(64))
        while trio.current_time() < until:
            if rng.random() < 0.8:
                await self._append(c, rng, until)
            else:
                await self._read(c, rng)
            await trio.sleep(rng.uniform(0.0, 0.04))

    def _node(self, rng: random.Random) -> tuple[str, Node] | None:
        running = [
            (s.node_id, s.node) for s in self.cluster.nodes.values() if s.node is not None and s.node.started.is_set()
        ]
        return rng.choice(running) if running else None

    async def _append(self, c: int, rng: random.Random, until: float) -> None:
        self._next += 1
        key = f"c{c}-{self._next}"
        aggregate = rng.choice(self.aggregates)
        expected: int | None = None
        if rng.random() < 0.3:
            expected = self._versions.get(aggregate, 0)
        event_id = f"{rng.getrandbits(128):032x}"
        payload = f'{{"{KEY_FIELD}":"{key}","n":{self._next}}}'.encode()
        event = NewEvent(
            id=event_id,
            type="sim",
            aggregate_id=aggregate,
            payload=payload,
            metadata=b"{}",
            expected_version=expected,
        )
        # Retry an unknown outcome with the same id, up to a few times (promise 2).
        for _attempt in range(4):
            picked = self._node(rng)
            if picked is None:
                await trio.sleep(0.2)
                continue
            node_id, node = picked
            record: dict[str, Any] = {
                "op": "append",
                "key": key,
                "aggregate": aggregate,
                "id": event_id,
                "expected_version": expected,
                "node": node_id,
                "start": trio.current_time(),
            }
            status, code = await self._call_append(node, event, record)
            record["end"] = trio.current_time()
            record["status"] = status
            record["error_code"] = code
            self.history.append(record)
            self.trace.note(
                f"c{c}",
                f"append {key} {aggregate} id={event_id[:8]} ev={expected} via {node_id}: {status}"
                + (f" #{record.get('index')} v{record.get('version')}" if status == "ok" else f" {code}"),
            )
            if status == "fail" and code not in ("wrong_expected_version", "duplicate_event_id"):
                await trio.sleep(rng.uniform(0.05, 0.25))  # unavailable: back off, as Retry-After says
            if status != "info" or trio.current_time() >= until:
                return
            await trio.sleep(rng.uniform(0.05, 0.5))

    async def _call_append(self, node: Node, event: NewEvent, record: dict[str, Any]) -> tuple[str, str | None]:
        # The call runs in this client's task, as an HTTP request runs in a task of the
        # node's: with the node's runtime current (its forwards dial through its network).
        token = runtime.use(node.runtime)
        try:
            with trio.fail_after(self.cluster.append_timeout_s + 2 * self.cluster.lease_ttl_s):
                results = await node.append([event])
        except trio.TooSlowError:
            self.unknown += 1
            return "info", "client_timeout"
        except OutcomeUnknown as exc:
            self.unknown += 1
            return "info", exc.code or "outcome_unknown"
        except (RequestError, UnavailableError) as exc:
            if isinstance(exc, ConflictError):
                current = exc.details.get("current_version")
                if isinstance(current, int):
                    self._versions[event.aggregate_id] = max(self._versions.get(event.aggregate_id, 0), current)
            self.failed += 1
            return "fail", getattr(exc, "code", None) or type(exc).__name__
        except WalstoreError as exc:  # a storage error under the call: the node is going down
            self.unknown += 1
            return "info", type(exc).__name__
        except trio.Cancelled:
            raise
        except Exception as exc:
            self.on_unexpected(f"append via {record['node']}", exc)
            self.unknown += 1
            return "info", "server_error"
        finally:
            runtime.reset(token)
        result = results[0]
        record["index"], record["version"] = result.index, result.version
        self._versions[event.aggregate_id] = max(self._versions.get(event.aggregate_id, 0), result.version)
        self.acked += 1
        return "ok", None

    async def _read(self, c: int, rng: random.Random) -> None:
        picked = self._node(rng)
        if picked is None:
            return
        node_id, node = picked
        aggregate = rng.choice(self.aggregates)
        record: dict[str, Any] = {
            "op": "read",
            "aggregate": aggregate,
            "from_version": 1,
            "limit": 10_000,
            "min_index": None,
            "node": node_id,
            "start": trio.current_time(),
        }
        token = runtime.use(node.runtime)
        try:
            with trio.fail_after(self.cluster.append_timeout_s):
                read = await node.read_aggregate(
                    aggregate, from_version=1, limit=10_000, direction="forward", min_index=None
                )
        except trio.TooSlowError:
            return
        except WalstoreError:
            return  # a read that fails changes nothing and proves nothing
        except trio.Cancelled:
            raise
        except Exception as exc:
            self.on_unexpected(f"read via {node_id}", exc)
            return
        finally:
            runtime.reset(token)
        record["end"] = trio.current_time()
        record["status"] = "ok"
        record["events"] = [[e.id, e.index, e.version] for e in read.events]
        self.history.append(record)
