"""Leader election on a real etcd cluster (v3 API, through the ``etcd3`` client package).

One job: implement ``walstore.election.base.Election`` on etcd. The algorithm is in
``base``'s docstring; this module adds how it meets etcd and trio:

* The campaign is one transaction on the election key ``/walstore/<cluster>/election``:
  ``if create_revision(key) == 0 then put(key, candidate JSON, lease); get(key) else
  get(key)``. The returned ``create_revision`` is the epoch. A retried transaction that
  finds the key bound to our own lease has won too (its first attempt landed).
* etcd3's calls block. They run in worker threads (``trio.to_thread.run_sync``) on a
  dedicated ``trio.CapacityLimiter``, abandoned on cancellation so a hung etcd can never
  delay ``Leadership.lost``. Each call tries the endpoints in turn, starting with the last
  one that worked, each with a short gRPC deadline (``rpc_timeout_s``).
* One observer task per election reads the key and then watches it from the next revision
  (our own watch stream on etcd3's generated stub, one response per worker-thread call,
  cancelled with the gRPC call itself). It feeds ``current_leader``/``watch_leader``, wakes
  waiting campaigns, and ends our leadership when the key it sees at a revision at or after
  our epoch is gone or was created by someone else.

etcd3 0.12 (its last release) with current protobuf and grpcio, and what is done about it:

* Its generated ``*_pb2`` modules predate protobuf 4 and fail to import ("Descriptors
  cannot be created directly") unless protobuf uses its pure-Python backend. We set
  ``PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python`` (if unset) before the first import of
  protobuf, and silence the import's deprecation warnings. Election traffic is a few small
  messages a second, so pure-Python parsing costs nothing that matters. If protobuf was
  already imported with its C backend, we say so (ElectionError) instead of crashing.
* Its own watcher thread reconnects in a tight loop when etcd is down and cannot be
  cancelled cleanly; we do not use it (see the observer above).
* grpcio's default reconnect backoff grows to 120 s, which would keep a channel to an etcd
  member that restarted useless for minutes; we cap it at 1 s.
* Errors it does not translate arrive as raw ``grpc.RpcError``; every etcd3 or gRPC error
  becomes ``ElectionError`` here, and nothing else escapes.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from walstore.election.base import (
    DEFAULT_LEASE_TTL_S,
    KEEP_ALIVES_PER_TTL,
    Candidate,
    ElectionBase,
    LeaderInfo,
    Leadership,
    election_key,
)
from walstore.election.membership import Member, decode_member, members_prefix
from walstore.errors import ConfigError, ElectionError

_log = logging.getLogger(__name__)

T = TypeVar("T")

# One RPC on one endpoint. A healthy etcd answers in milliseconds; a dead or hung member
# must cost little of the lease TTL before the next endpoint is tried.
DEFAULT_RPC_TIMEOUT_S = 0.5
# Worker threads for unary calls per election: a keep-alive, a campaign step, a revoke and
# a read of the key can be in flight together; abandoned calls hold a slot until their
# gRPC deadline ends them.
DEFAULT_RPC_THREADS = 4
# Pause between rounds of failed calls (each round already tried every endpoint).
_RETRY_MIN_S = 0.05
_RETRY_MAX_S = 1.0
_GRPC_OPTIONS = [
    # Find a silently dead connection (etcd SIGSTOPped, cable pulled). etcd rejects
    # client pings more often than every 5 s (--grpc-keepalive-min-time).
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # Default backoff grows to 120 s: far longer than any lease.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]


# ---- loading etcd3 -------------------------------------------------------------------


@functools.cache
def load_etcd3() -> Any:
    """Import and return the ``etcd3`` package (see the module docstring for why this
    is not a plain import). ElectionError if it cannot work in this process."""
    os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")
    try:
        with warnings.catch_warnings():
            # DeprecationWarnings from every descriptor its old generated code creates.
            warnings.simplefilter("ignore")
            etcd3 = importlib.import_module("etcd3")
            importlib.import_module("etcd3.exceptions")
    except TypeError as exc:
        implementation = importlib.import_module("google.protobuf.internal.api_implementation")
        raise ElectionError(
            f"the etcd3 client needs protobuf's pure-Python backend, but protobuf was already "
            f"loaded with the {implementation.Type()!r} backend; set "
            f"PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python before starting ({exc})"
        ) from None
    return etcd3


def _grpc() -> Any:
    return importlib.import_module("grpc")


def parse_endpoints(endpoints: str | Sequence[str]) -> list[tuple[str, int]]:
    """``"h1:2379,h2:2379"`` or a list of ``host:port`` / ``http://host:port`` ->
    ``[(host, port)]``. ConfigError for anything else (TLS is not supported yet)."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    parsed: list[tuple[str, int]] = []
    for raw in items:
        item = raw.strip()
        if item.startswith("https://"):
            raise ConfigError(f"etcd endpoint {item!r}: TLS is not supported")
        item = item.removeprefix("http://").rstrip("/")
        host, sep, port_text = item.rpartition(":")
        if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(f"etcd endpoint {raw!r} is not host:port")
        parsed.append((host, int(port_text)))
    if not parsed:
        raise ConfigError("no etcd endpoints given")
    return parsed


# ---- blocking etcd calls (worker threads only) -----------------------------------------


class _TryNextEndpoint(Exception):
    """Inside a worker thread: this endpoint did not give a usable answer."""


@dataclass(frozen=True, slots=True)
class _KeyValue:
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


@dataclass(frozen=True, slots=True)
class _TxnResult:
    won: bool
    kv: _KeyValue
    revision: int


def _describe(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    if callable(code) and callable(details):
        with contextlib.suppress(Exception):
            return f"{code().name}: {details()}"
    return f"{type(exc).__name__}: {exc}"


class _Endpoints:
    """etcd3 clients (one gRPC channel each), created on first use, and failover."""

    def __init__(self, endpoints: list[tuple[str, int]], rpc_timeout_s: float) -> None:
        self._etcd3 = load_etcd3()
        self._errors: tuple[type[BaseException], ...] = (
            self._etcd3.exceptions.Etcd3Exception,
            _grpc().RpcError,
            _TryNextEndpoint,
        )
        self.endpoints = endpoints
        self.rpc_timeout_s = rpc_timeout_s
        self._clients: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._preferred = 0
        self._closed = False

    def name(self, index: int) -> str:
        host, port = self.endpoints[index]
        return f"{host}:{port}"

    def client(self, index: int) -> Any:
        with self._lock:
            if self._closed:
                raise ElectionError("etcd election closed")
            client = self._clients.get(index)
            if client is None:
                host, port = self.endpoints[index]
                client = self._etcd3.client(
                    host=host, port=port, timeout=self.rpc_timeout_s, grpc_options=_GRPC_OPTIONS
                )
                self._clients[index] = client
            return client

    def call(self, what: str, fn: Callable[[Any], T]) -> tuple[int, T]:
        """Run ``fn(client)`` on each endpoint in turn until one answers; return the index
        of that endpoint and the answer. ElectionError naming every failure otherwise."""
        failures = []
        start = self._preferred
        for k in range(len(self.endpoints)):
            index = (start + k) % len(self.endpoints)
            try:
                result = fn(self.client(index))
            except self._errors as exc:
                failures.append(f"{self.name(index)}: {_describe(exc)}")
                continue
            self._preferred = index
            return index, result
        raise ElectionError(f"{what} failed on every etcd endpoint ({'; '.join(failures)})")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            with contextlib.suppress(Exception):
                client.close()


def _kv_from(kv: Any) -> _KeyValue:
    return _KeyValue(bytes(kv.value), int(kv.create_revision), int(kv.mod_revision), int(kv.lease))


def _grant(ttl_s: int, client: Any) -> tuple[int, int]:
    lease = client.lease(ttl_s)
    return int(lease.id), int(lease.ttl)


def _campaign_txn(key: str, value: bytes, lease_id: int, client: Any) -> _TxnResult:
    t = client.transactions
    won, responses = client.transaction(
        compare=[t.create(key) == 0],
        success=[t.put(key, value, lease=lease_id), t.get(key)],
        failure=[t.get(key)],
    )
    found = responses[-1] if responses else []
    if not found:
        raise _TryNextEndpoint("campaign transaction returned no key")
    _, meta = found[0]
    kv = _KeyValue(bytes(found[0][0]), int(meta.create_revision), int(meta.mod_revision), int(meta.lease_id))
    return _TxnResult(bool(won), kv, int(meta.response_header.revision))


def _refresh(lease_id: int, client: Any) -> int:
    """Remaining TTL etcd reports after the keep-alive (<= 0: the lease is gone)."""
    responses = list(client.refresh_lease(lease_id))
    if not responses:
        raise _TryNextEndpoint("keep-alive stream closed without an answer")
    return int(responses[-1].TTL)


def _revoke(lease_id: int, client: Any) -> None:
    try:
        client.revoke_lease(lease_id)
    except _grpc().RpcError as exc:
        if exc.code() != _grpc().StatusCode.NOT_FOUND:  # already expired: done
            raise


def _read_prefix(prefix: str, client: Any) -> list[tuple[str, _KeyValue]]:
    out = []
    for value, meta in client.get_prefix(prefix):
        key = bytes(meta.key).decode("utf-8", "replace")
        out.append((key, _KeyValue(bytes(value), int(meta.create_revision), int(meta.mod_revision), 0)))
    return out


def _compare_and_put(
    key: str, value: bytes, expect_revision: int, guard_key: str, guard_create: int | None, client: Any
) -> bool:
    t = client.transactions
    compare = [t.create(key) == 0] if expect_revision == 0 else [t.mod(key) == expect_revision]
    if guard_create is not None:
        compare.append(t.create(guard_key) == guard_create)
    won, _ = client.transaction(compare=compare, success=[t.put(key, value)], failure=[])
    return bool(won)


def _read_key(key: str, client: Any) -> tuple[_KeyValue | None, int]:
    response = client.get_response(key)
    kv = _kv_from(response.kvs[0]) if response.kvs else None
    return kv, int(response.header.revision)


class _WatchStream:
    """One etcd watch on one key, read one response per ``next_events`` call (blocking).
    ``cancel`` may be called from any thread and ends a blocked ``next_events``."""

    def __init__(self, client: Any, key: str, start_revision: int) -> None:
        rpc = load_etcd3().etcdrpc
        self._delete_type = importlib.import_module("etcd3.etcdrpc.kv_pb2").Event.DELETE
        self._stop = threading.Event()
        create = rpc.WatchRequest(
            create_request=rpc.WatchCreateRequest(key=key.encode(), start_revision=start_revision)
        )

        def requests() -> Any:
            yield create
            # The request side must stay open for the stream to live; gRPC's thread that
            # drains this iterator parks here until cancel().
            self._stop.wait()

        try:
            self._call = rpc.WatchStub(client.channel).Watch(
                requests(), metadata=client.metadata, credentials=client.call_credentials
            )
        except (ValueError, _grpc().RpcError) as exc:
            # ValueError: the channel was closed under us (aclose while this thread was on
            # its way here); like any other failed call, ElectionError and nothing else.
            self._stop.set()
            raise ElectionError(f"etcd watch could not start: {_describe(exc)}") from None

    def next_events(self) -> list[tuple[_KeyValue | None, int]]:
        """The next batch of changes as ``(kv or None if deleted, revision)``."""
        grpc = _grpc()
        try:
            response = next(self._call)
        except StopIteration:
            raise ElectionError("etcd ended the watch stream") from None
        except grpc.RpcError as exc:
            raise ElectionError(f"etcd watch failed: {_describe(exc)}") from None
        if response.canceled or response.compact_revision:
            raise ElectionError(
                f"etcd cancelled the watch (compacted at {response.compact_revision}): {response.cancel_reason}"
            )
        return [
            (None if event.type == self._delete_type else _kv_from(event.kv),
             int(event.kv.mod_revision))
            for event in response.events
        ]  # fmt: skip

    def cancel(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            self._call.cancel()


# ---- the election ---------------------------------------------------------------------


class EtcdElection(ElectionBase):
    """``Election`` on etcd. Use with ``async with EtcdElection(endpoints, cluster_id)``.

    ``ttl_s`` is whole seconds (etcd leases are); ``safety_margin_s`` defaults to a quarter
    of it. Constructing it loads etcd3 and validates settings (ConfigError/ElectionError);
    it does not contact etcd."""

    def __init__(
        self,
        endpoints: str | Sequence[str],
        cluster_id: str,
        *,
        ttl_s: int = int(DEFAULT_LEASE_TTL_S),
        safety_margin_s: float | None = None,
        rpc_timeout_s: float = DEFAULT_RPC_TIMEOUT_S,
        rpc_threads: int = DEFAULT_RPC_THREADS,
    ) -> None:
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or ttl_s < 1:
            raise ConfigError(f"etcd lease TTL must be a whole number of seconds >= 1, got {ttl_s!r}")
        if not rpc_timeout_s > 0:
            raise ConfigError(f"rpc_timeout_s must be positive, got {rpc_timeout_s!r}")
        super().__init__(ttl_s, safety_margin_s)
        self._lease_ttl_s = ttl_s  # etcd leases are whole seconds
        self.key = election_key(cluster_id)
        self.members_prefix = members_prefix(cluster_id)
        self._endpoints = _Endpoints(parse_endpoints(endpoints), rpc_timeout_s)
        self._limiter = trio.CapacityLimiter(rpc_threads)
        # Watch reads block for as long as nothing changes: keep them off the RPC slots.
        self._watch_limiter = trio.CapacityLimiter(2)
        self._observed_revision = 0
        self._key_present = False
        self._lease_id: int | None = None
        self._keep_alive_suspended = False

    @property
    def endpoints(self) -> list[str]:
        return [self._endpoints.name(i) for i in range(len(self._endpoints.endpoints))]

    # ---- Election ----------------------------------------------------------------------

    async def _campaign(self, candidate: Candidate) -> Leadership:
        value = candidate.to_json()
        retry_s = _RETRY_MIN_S
        while True:
            if self._closed:
                raise ElectionError("election closed while campaigning")
            lease_id: int | None = None
            sent_at = trio.current_time()
            try:
                _, (lease_id, granted_s) = await self._rpc("lease grant", functools.partial(_grant, self._lease_ttl_s))
                _, result = await self._rpc(
                    "campaign transaction",
                    functools.partial(_campaign_txn, self.key, value, lease_id),
                )
            except ElectionError as exc:
                if self._closed:
                    raise ElectionError("election closed while campaigning") from None
                _log.warning("campaign for %s: %s; retrying", self.key, exc)
                if lease_id is not None:
                    self._revoke_in_background(lease_id)
                await self._wait_for_change(retry_s)
                retry_s = min(_RETRY_MAX_S, retry_s * 2)
                continue
            except BaseException:
                # Cancelled between grant and answer: the transaction may have landed.
                if lease_id is not None:
                    await self._revoke_now(lease_id)
                raise
            retry_s = _RETRY_MIN_S
            if result.won or result.kv.lease == lease_id:
                if self._closed:  # closed while the transaction was in flight
                    await self._revoke_now(lease_id)
                    raise ElectionError("election closed while campaigning")
                return self._start_leading(candidate, lease_id, granted_s, sent_at, result)
            self._revoke_in_background(lease_id)
            self._observe(result.kv, result.revision)
            # Retry when the observer sees the key go, or after a TTL in any case (the
            # watch may be down while etcd itself is fine).
            deadline = trio.current_time() + self.ttl_s
            while trio.current_time() < deadline and not self._closed:
                if self._observed_revision > result.revision and not self._key_present:
                    break
                await self._wait_for_change(deadline - trio.current_time())

    def _start_leading(
        self, candidate: Candidate, lease_id: int, granted_s: int, sent_at: float,
        result: _TxnResult,
    ) -> Leadership:  # fmt: skip
        ttl_s = min(self._lease_ttl_s, granted_s)
        leadership = Leadership(candidate.with_epoch(result.kv.create_revision), sent_at + ttl_s - self.safety_margin_s)
        self._leadership, self._lease_id = leadership, lease_id
        self._observe(result.kv, result.revision)
        assert self._nursery is not None
        self._nursery.start_soon(self._keep_alive, leadership, lease_id, ttl_s, sent_at)
        _log.info("%s leads %s with epoch %d", candidate.node_id, self.key, leadership.epoch)
        return leadership

    async def resign(self, leadership: Leadership) -> None:
        leadership.mark_lost("resigned")
        if leadership is self._leadership and self._lease_id is not None:
            lease_id, self._lease_id = self._lease_id, None
            await self._revoke_now(lease_id)

    async def aclose(self) -> None:
        if self._closed:
            return
        if self._leadership is not None:
            self._leadership.mark_lost("election closed")
            await self.resign(self._leadership)
        self._closed = True
        self._observer.close()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        # Ends abandoned calls still blocked in worker threads.
        self._endpoints.close()

    # ---- member records (walstore.election.membership) ----------------------------------

    async def read_members(self) -> dict[str, Member]:
        _, rows = await self._rpc("read members", functools.partial(_read_prefix, self.members_prefix))
        members: dict[str, Member] = {}
        for key, kv in rows:
            node_id = key.removeprefix(self.members_prefix)
            try:
                members[node_id] = decode_member(node_id, kv.value, kv.mod_revision)
            except ElectionError as exc:
                _log.warning("ignoring member record %s: %s", key, exc)
        return members

    async def write_member(
        self, node_id: str, record: bytes, *, expect_revision: int, leader_epoch: int | None = None
    ) -> bool:
        _, won = await self._rpc(
            "write member",
            functools.partial(
                _compare_and_put, self.members_prefix + node_id, record, expect_revision, self.key, leader_epoch
            ),
        )
        return won

    # ---- fault injection -----------------------------------------------------------------

    def suspend_keep_alive(self, suspended: bool = True) -> None:
        """Test seam: stop (or resume) sending keep-alives, as if they were all lost on the
        way. The leadership then ends at its deadline and etcd expires the lease."""
        self._keep_alive_suspended = suspended

    # ---- internals -------------------------------------------------------------------

    async def _rpc(self, what: str, fn: Callable[[Any], T]) -> tuple[int, T]:
        return await trio.to_thread.run_sync(
            self._endpoints.call, what, fn, limiter=self._limiter, abandon_on_cancel=True
        )

    async def _wait_for_change(self, timeout_s: float) -> None:
        changed = self._observer.changed_event()
        with trio.move_on_after(max(0.0, timeout_s)):
            await changed.wait()

    async def _revoke_now(self, lease_id: int) -> None:
        """Revoke, bounded by one round over the endpoints, even inside a cancelled scope."""
        budget = self._endpoints.rpc_timeout_s * len(self._endpoints.endpoints) + 0.1
        with trio.CancelScope(shield=True), trio.move_on_after(budget):
            try:
                await self._rpc("lease revoke", functools.partial(_revoke, lease_id))
            except ElectionError as exc:
                level = logging.DEBUG if self._closed else logging.WARNING
                _log.log(level, "could not revoke lease %x (it will expire): %s", lease_id, exc)

    def _revoke_in_background(self, lease_id: int) -> None:
        if self._nursery is not None and not self._closed:
            self._nursery.start_soon(self._revoke_now, lease_id)

    async def _keep_alive(self, leadership: Leadership, lease_id: int, ttl_s: int, sent_at: float) -> None:
        interval = ttl_s / KEEP_ALIVES_PER_TTL
        retry_s = min(_RETRY_MIN_S * 2, interval / 4)
        with trio.CancelScope(deadline=leadership.deadline()) as scope:
            next_send = sent_at + interval
            while True:
                with trio.move_on_at(next_send):
                    await leadership.lost.wait()
                if leadership.lost.is_set():
                    break
                if self._keep_alive_suspended:
                    next_send = trio.current_time() + retry_s
                    continue
                sent_at = trio.current_time()
                try:
                    _, remaining_s = await self._rpc("lease keep-alive", functools.partial(_refresh, lease_id))
                except ElectionError as exc:
                    _log.warning("keep-alive for epoch %d: %s", leadership.epoch, exc)
                    next_send = trio.current_time() + retry_s
                    continue
                if remaining_s <= 0:
                    leadership.mark_lost("etcd says the lease expired")
                    break
                leadership.extend_deadline(sent_at + min(ttl_s, remaining_s) - self.safety_margin_s)
                scope.deadline = leadership.deadline()
                next_send = sent_at + interval
        if scope.cancelled_caught:
            leadership.mark_lost("no successful keep-alive before the deadline")
        level = logging.INFO if leadership.lost_reason in ("resigned", "election closed") else logging.WARNING
        _log.log(level, "leadership epoch %d ended: %s", leadership.epoch, leadership.lost_reason)
        if self._lease_id == lease_id:
            # Free the key for the others now rather than after the TTL.
            self._lease_id = None
            await self._revoke_now(lease_id)

    def _observe(self, kv: _KeyValue | None, revision: int) -> None:
        """Record what the key looked like at ``revision`` (older news is ignored)."""
        if revision < self._observed_revision:
            return
        self._observed_revision = revision
        self._key_present = kv is not None
        leader = None
        if kv is not None:
            try:
                leader = LeaderInfo.from_json(kv.value, kv.create_revision)
            except ElectionError as exc:
                _log.warning("election key %s holds no valid candidate: %s", self.key, exc)
        self._observer.update(leader)
        mine = self._leadership
        if mine is not None and revision >= mine.epoch and (kv is None or kv.create_revision != mine.epoch):
            mine.mark_lost("election key deleted or taken over")

    async def _observe_forever(self) -> None:
        retry_s = _RETRY_MIN_S
        while True:
            started = trio.current_time()
            try:
                await self._observe_once()
            except ElectionError as exc:
                _log.info("watching %s: %s; resyncing", self.key, exc)
            if trio.current_time() - started > _RETRY_MAX_S:
                retry_s = _RETRY_MIN_S  # it worked for a while: this is a new failure
            await trio.sleep(retry_s)
            retry_s = min(_RETRY_MAX_S, retry_s * 2)

    async def _observe_once(self) -> None:
        index, (kv, revision) = await self._rpc("read election key", functools.partial(_read_key, self.key))
        self._observe(kv, revision)
        client = self._endpoints.client(index)
        stream = await trio.to_thread.run_sync(_WatchStream, client, self.key, revision + 1, limiter=self._limiter)
        try:
            while True:
                changes = await trio.to_thread.run_sync(
                    stream.next_events, limiter=self._watch_limiter, abandon_on_cancel=True
                )
                for changed_kv, changed_revision in changes:
                    self._observe(changed_kv, changed_revision)
        finally:
            stream.cancel()
