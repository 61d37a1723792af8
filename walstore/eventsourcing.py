"""A persistence module for the Python library ``eventsourcing`` (9.5): an application
stores its events in a walstore cluster with ``PERSISTENCE_MODULE=walstore.eventsourcing``
and ``WALSTORE_URLS=http://node-0:8080,http://node-1:8080,...`` (docs/eventsourcing.md).

How the library's concepts map onto walstore's (each recorder talks to the cluster through
one ``walstore.client.Client``, which retries and fails over):

- An originator (aggregate) is the walstore aggregate ``<namespace>:<purpose>:<originator
  id>``: the namespace is the application's name (``WALSTORE_NAMESPACE`` overrides it), the
  purpose ``events`` (or ``snapshots``, ...), each part percent-escaped so that no part can
  contain the ``:`` that ends it (nor the ``/`` an aggregate id may not hold).
- A stored event is one walstore event: its topic is the event ``type``, its state the
  exact bytes of ``payload_base64``, and ``metadata`` holds the originator version and
  whether the originator id was a UUID or text.
- Notification ids are walstore's global log indexes. An application's notifications are
  the events under its ``<namespace>:events:`` prefix, selected on the server
  (``aggregate_prefix=``, ``types=`` for topics), so applications can share a cluster and
  no read scans the log on the client. Ids are increasing but, in a shared cluster, not
  contiguous.
- Versions: walstore numbers an aggregate's events 1, 2, 3, ... and an originator's first
  version (its base: 1 for eventsourcing's aggregates, 0 in some of the library's tests)
  fixes the rest, since eventsourcing's versions are gap-free too: an insert sends
  ``expected_version = originator_version - base`` with each originator's first event, so
  two writers of the same version cannot both succeed (IntegrityError for the second).
  A recorder learns a base from any event it reads and keeps it (it never changes); an
  originator it has not seen is taken to be new (``expected_version`` 0, the one guess that
  cannot succeed wrongly), and if it is not, the conflict makes it read the originator's
  first event and send the insert again.
- Snapshots (``aggregate_recorder("snapshots")``) have gappy versions: each originator's
  snapshots are one walstore aggregate in which versions only increase. A snapshot at or
  below the newest stored snapshot's version is not stored (a snapshot is only a shortcut:
  reads stay correct without it).
- Tracking: an upstream application's position is the walstore consumer
  ``<namespace>:tracking:<upstream name>``, committed in the same atomic batch as the
  events it produced; a position not above the stored one is an IntegrityError.

Errors: version and tracking conflicts are ``IntegrityError``; a write whose outcome the
client could not learn is ``WalstoreOutcomeUnknownError`` and a cluster that cannot be
reached ``WalstoreUnavailableError`` (both ``OperationalError``); a request the server
refuses as invalid (too big a batch, an over-long topic) is ``DataError``.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Final, TypeVar, cast
from uuid import UUID

import httpx
import orjson
from eventsourcing.persistence import (
    AggregateRecorder,
    ApplicationRecorder,
    DatabaseError,
    DataError,
    InfrastructureFactory,
    IntegrityError,
    InterfaceError,
    Notification,
    OperationalError,
    ProcessRecorder,
    ProgrammingError,
    Queue,
    ShutDown,
    StoredEvent,
    Subscription,
    Tracking,
    TrackingRecorder,
)
from eventsourcing.utils import Environment, EnvType, resolve_topic

from walstore.client import MAX_PAGE_EVENTS, Client
from walstore.client.errors import (
    BadRequest,
    DuplicateEventId,
    NotFound,
    OutcomeUnknown,
    ProtocolViolation,
    TrackingConflict,
    Unavailable,
    WalstoreClientError,
    WrongExpectedVersion,
)
from walstore.client.models import EventData, RecordedEvent
from walstore.client.models import Tracking as WalstoreTracking

# The metadata keys of a stored event (the rest of the event is walstore's own fields).
META_VERSION: Final = "originator_version"
META_ID_TYPE: Final = "originator_id_type"
# How many originators' bases a datastore remembers before it starts again (bases never
# change, so forgetting only costs a read).
MAX_CACHED_BASES: Final = 100_000
# A subscription's buffer between the stream and the iterating thread.
SUBSCRIPTION_BUFFER: Final = 1_000
# How often a snapshot insert looks again after another writer's snapshot came first.
SNAPSHOT_ATTEMPTS: Final = 10


class WalstoreOutcomeUnknownError(OperationalError):
    """The client retried a write until its deadline and at least one attempt may have been
    stored. ``event_ids`` are the walstore ids it was sent with: reading the originators
    back tells whether it landed. Raising it, nothing was decided: not retried here."""

    def __init__(self, message: str, event_ids: Sequence[str]) -> None:
        super().__init__(message)
        self.event_ids = list(event_ids)


class WalstoreUnavailableError(OperationalError):
    """No node could take the request before the client's deadline; nothing was stored."""


def escape(part: str) -> str:
    """A name part that holds no ``:`` (the separator), ``/`` (walstore refuses it in an
    aggregate id) or bare ``%``: reversible with ``urllib.parse.unquote``."""
    return part.replace("%", "%25").replace("/", "%2F").replace(":", "%3A")


@contextlib.contextmanager
def translated_errors(*, writing: bool) -> Iterator[None]:
    """walstore client errors as the exceptions of ``eventsourcing.persistence``."""
    try:
        yield
    except (WrongExpectedVersion, DuplicateEventId, TrackingConflict) as exc:
        raise IntegrityError(str(exc)) from exc
    except OutcomeUnknown as exc:
        raise WalstoreOutcomeUnknownError(str(exc), exc.event_ids) from exc
    except Unavailable as exc:
        raise WalstoreUnavailableError(str(exc)) from exc
    except BadRequest as exc:
        raise (DataError if writing else ProgrammingError)(str(exc)) from exc
    except NotFound as exc:
        raise ProgrammingError(f"{exc} (does the server have this feature?)") from exc
    except ProtocolViolation as exc:
        raise InterfaceError(str(exc)) from exc
    except WalstoreClientError as exc:
        raise DatabaseError(str(exc)) from exc
    except httpx.HTTPError as exc:  # what the client does not wrap (it should wrap all)
        raise OperationalError(str(exc)) from exc


class WalstoreDatastore:
    """The connection settings a factory's recorders share: one client (thread-safe, one
    pool of keep-alive connections) and the bases of the originators seen so far.
    ``transport`` is the recorders' httpx transport (default httpx's); subscriptions
    make their own."""

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        namespace: str = "",
        timeout: float = 10.0,
        retry_deadline: float = 35.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.urls = [u.strip() for u in urls.split(",")] if isinstance(urls, str) else list(urls)
        self.urls = [u for u in self.urls if u]
        if not self.urls:
            raise ValueError("walstore: no node URL given")
        self.namespace = namespace
        self.timeout = timeout
        self.retry_deadline = retry_deadline
        self.client = Client(self.urls, timeout=timeout, retry_deadline=retry_deadline, transport=transport)
        self._bases: dict[str, int] = {}
        self._bases_lock = threading.Lock()

    def new_client(self, transport: httpx.BaseTransport | None = None) -> Client:
        return Client(self.urls, timeout=self.timeout, retry_deadline=self.retry_deadline, transport=transport)

    def base(self, aggregate_id: str) -> int | None:
        with self._bases_lock:
            return self._bases.get(aggregate_id)

    def learn_base(self, aggregate_id: str, base: int) -> None:
        with self._bases_lock:
            if len(self._bases) >= MAX_CACHED_BASES:
                self._bases.clear()
            self._bases[aggregate_id] = base

    def close(self) -> None:
        self.client.close()


class WalstoreRecorder:
    """What every recorder has: the datastore and the names it writes under."""

    def __init__(self, datastore: WalstoreDatastore, *, purpose: str = "events") -> None:
        self.datastore = datastore
        self.purpose = purpose
        self.aggregate_prefix = f"{escape(datastore.namespace)}:{escape(purpose)}:"

    @property
    def client(self) -> Client:
        return self.datastore.client

    def aggregate_id(self, originator_id: UUID | str) -> str:
        return self.aggregate_prefix + escape(str(originator_id))

    def originator_id(self, event: RecordedEvent) -> UUID | str:
        text = urllib.parse.unquote(event.aggregate_id.removeprefix(self.aggregate_prefix))
        metadata = event.metadata if isinstance(event.metadata, dict) else {}
        return UUID(text) if metadata.get(META_ID_TYPE) == "uuid" else text

    def consumer(self, upstream_application_name: str) -> str:
        return f"{escape(self.datastore.namespace)}:tracking:{escape(upstream_application_name)}"

    def wal_tracking(self, tracking: Tracking | None) -> WalstoreTracking | None:
        if tracking is None:
            return None
        if tracking.notification_id < 1:
            raise DataError(f"walstore tracks notification ids >= 1, got {tracking}")
        return WalstoreTracking(self.consumer(tracking.application_name), tracking.notification_id)

    @staticmethod
    def originator_version(event: RecordedEvent) -> int:
        metadata = event.metadata if isinstance(event.metadata, dict) else {}
        version = metadata.get(META_VERSION)
        if type(version) is not int:
            raise InterfaceError(f"walstore event {event.id} ({event.aggregate_id!r}) has no {META_VERSION}")
        return version

    @staticmethod
    def state(event: RecordedEvent) -> bytes:
        if event.payload_bytes is not None:
            return event.payload_bytes
        # written by something else as JSON: its bytes are the JSON text
        return orjson.dumps(event.payload)

    def stored_event(self, event: RecordedEvent) -> StoredEvent:
        return StoredEvent(
            originator_id=self.originator_id(event),
            originator_version=self.originator_version(event),
            topic=event.type,
            state=self.state(event),
        )

    def notification(self, event: RecordedEvent) -> Notification:
        return Notification(
            id=event.index,
            originator_id=self.originator_id(event),
            originator_version=self.originator_version(event),
            topic=event.type,
            state=self.state(event),
        )

    @staticmethod
    def event_data(stored: StoredEvent, aggregate_id: str, expected_version: int | None) -> EventData:
        id_type = "uuid" if isinstance(stored.originator_id, UUID) else "text"
        return EventData(
            aggregate_id=aggregate_id,
            type=stored.topic,
            payload_bytes=bytes(stored.state),
            metadata={META_VERSION: stored.originator_version, META_ID_TYPE: id_type},
            expected_version=expected_version,
        )


def _runs(stored_events: Sequence[StoredEvent], aggregate_id: Any) -> dict[str, list[int]]:
    """Each aggregate id's positions in ``stored_events``, in order."""
    runs: dict[str, list[int]] = {}
    for i, stored in enumerate(stored_events):
        runs.setdefault(aggregate_id(stored.originator_id), []).append(i)
    return runs


class WalstoreAggregateRecorder(WalstoreRecorder, AggregateRecorder):
    """An originator's events as one walstore aggregate, version for version (see the
    module's docstring). One insert is one atomic walstore batch, whatever its size up to
    the server's ``MAX_BATCH_EVENTS``/``MAX_BATCH_BYTES``."""

    def insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        self._insert(stored_events, None)
        return None

    def _insert(self, stored_events: Sequence[StoredEvent], tracking: Tracking | None) -> list[int]:
        wal_tracking = self.wal_tracking(tracking)
        if not stored_events:
            if wal_tracking is not None:
                with translated_errors(writing=True):
                    self.client.append_batch([], tracking=wal_tracking)
            return []
        runs = _runs(stored_events, self.aggregate_id)
        firsts: dict[str, int] = {}
        for aggregate_id, positions in runs.items():
            versions = [stored_events[i].originator_version for i in positions]
            if len(set(versions)) != len(versions):
                raise IntegrityError(f"the same originator version twice in one insert: {aggregate_id!r} {versions}")
            if versions != list(range(versions[0], versions[0] + len(versions))):
                raise ProgrammingError(
                    f"walstore stores an originator's versions gap-free and in order; "
                    f"{aggregate_id!r} has {versions[:10]} in one insert"
                )
            firsts[aggregate_id] = versions[0]
        # The base of each originator: known, or else taken to be a new originator (its
        # first version here is its base, expected_version 0), the one guess that can
        # never be wrong and succeed; a conflict then reads the true base.
        bases: dict[str, int] = {}
        guessed: set[str] = set()
        for aggregate_id, first in firsts.items():
            known = self.datastore.base(aggregate_id)
            if known is None:
                guessed.add(aggregate_id)
                known = first
            bases[aggregate_id] = known
        while True:
            events = []
            seen: set[str] = set()
            for stored in stored_events:
                aggregate_id = self.aggregate_id(stored.originator_id)
                expected = None
                if aggregate_id not in seen:
                    seen.add(aggregate_id)
                    expected = stored.originator_version - bases[aggregate_id]
                    if expected < 0:
                        raise IntegrityError(
                            f"{aggregate_id!r}: version {stored.originator_version} is below the "
                            f"originator's first version {bases[aggregate_id]}"
                        )
                events.append(self.event_data(stored, aggregate_id, expected))
            with translated_errors(writing=True):
                try:
                    result = self.client.append_batch(events, tracking=wal_tracking)
                except WrongExpectedVersion as conflict:
                    if not self._rebase(conflict, firsts, bases, guessed):
                        raise
                    continue
            for aggregate_id in guessed:
                self.datastore.learn_base(aggregate_id, bases[aggregate_id])
            return [r.index for r in result.events]

    def _rebase(
        self, conflict: WrongExpectedVersion, firsts: Mapping[str, int], bases: dict[str, int], guessed: set[str]
    ) -> bool:
        """After a version conflict: read the true base of the originators whose base was
        a guess (the one the server named, else all of them). True if any changed, so the
        insert is worth sending again; False if the conflict is real."""
        named = conflict.aggregate_id
        suspects = sorted(guessed)
        if named is not None and named in bases:
            suspects = [named] if named in guessed else []
        changed = False
        for aggregate_id in suspects:
            guessed.discard(aggregate_id)
            base = self._read_base(aggregate_id)
            if base is None:
                base = firsts[aggregate_id]  # still new: the insert's first version is it
            if base != bases[aggregate_id]:
                bases[aggregate_id] = base
                changed = True
        return changed

    def _read_base(self, aggregate_id: str) -> int | None:
        """The originator version of the aggregate's first event (None: no events)."""
        with translated_errors(writing=False):
            first = next(iter(self.client.read_aggregate(aggregate_id, from_version=1, limit=1)), None)
        if first is None:
            return None
        base = self.originator_version(first) - first.version + 1
        self.datastore.learn_base(aggregate_id, base)
        return base

    def _base(self, aggregate_id: str) -> int | None:
        known = self.datastore.base(aggregate_id)
        return known if known is not None else self._read_base(aggregate_id)

    def select_events(
        self,
        originator_id: UUID | str,
        *,
        gt: int | None = None,
        lte: int | None = None,
        desc: bool = False,
        limit: int | None = None,
    ) -> Sequence[StoredEvent]:
        aggregate_id = self.aggregate_id(originator_id)
        if (limit is not None and limit <= 0) or (gt is not None and lte is not None and lte <= gt):
            return []
        from_version: int | None = None
        count = limit
        if gt is not None or lte is not None:
            base = self._base(aggregate_id)
            if base is None:
                return []
            low = 1 if gt is None else max(1, gt + 1 - base + 1)  # walstore versions kept
            high = None if lte is None else lte - base + 1
            if high is not None and high < low:
                return []
            from_version = high if desc else low
            if high is not None:
                count = min(count, high - low + 1) if count is not None else high - low + 1
        out: list[StoredEvent] = []
        with translated_errors(writing=False):
            events = self.client.read_aggregate(
                aggregate_id, from_version=from_version, direction="backward" if desc else "forward", limit=count
            )
            for event in events:
                stored = self.stored_event(event)
                version = stored.originator_version
                if not out and self.datastore.base(aggregate_id) is None:
                    # any event says where version 1 is
                    self.datastore.learn_base(aggregate_id, version - event.version + 1)
                if gt is not None and version <= gt:
                    if desc:
                        break  # versions only fall from here
                    continue
                if lte is not None and version > lte:
                    if not desc:
                        break  # versions only rise from here
                    continue
                out.append(stored)
        return out


class WalstoreSnapshotRecorder(WalstoreRecorder, AggregateRecorder):
    """Snapshots: each originator's as one walstore aggregate in which originator versions
    only increase. A snapshot at or below the newest stored one's version is not stored
    (that one is newer, and a snapshot is only a shortcut); so reads can stop early."""

    def __init__(self, datastore: WalstoreDatastore, *, purpose: str = "snapshots") -> None:
        super().__init__(datastore, purpose=purpose)

    def insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        if not stored_events:
            return None
        runs = _runs(stored_events, self.aggregate_id)
        for _attempt in range(SNAPSHOT_ATTEMPTS):
            events: list[EventData] = []
            for aggregate_id, positions in runs.items():
                newest = self._newest(aggregate_id)
                wal_version, version = newest if newest is not None else (0, None)
                expected: int | None = wal_version
                for i in positions:
                    stored = stored_events[i]
                    if version is not None and stored.originator_version <= version:
                        continue
                    version = stored.originator_version
                    events.append(self.event_data(stored, aggregate_id, expected))
                    expected = None  # the rest follow in the same atomic batch
            if not events:
                return None
            with translated_errors(writing=True):
                try:
                    self.client.append_batch(events)
                except WrongExpectedVersion:
                    continue  # another writer's snapshot came first: look again
            return None
        raise IntegrityError(f"snapshots of {sorted(runs)[:3]}: other writers kept coming first")

    def _newest(self, aggregate_id: str) -> tuple[int, int] | None:
        with translated_errors(writing=False):
            event = next(iter(self.client.read_aggregate(aggregate_id, direction="backward", limit=1)), None)
        return None if event is None else (event.version, self.originator_version(event))

    def select_events(
        self,
        originator_id: UUID | str,
        *,
        gt: int | None = None,
        lte: int | None = None,
        desc: bool = False,
        limit: int | None = None,
    ) -> Sequence[StoredEvent]:
        aggregate_id = self.aggregate_id(originator_id)
        if (limit is not None and limit <= 0) or (gt is not None and lte is not None and lte <= gt):
            return []
        out: list[StoredEvent] = []
        with translated_errors(writing=False):
            if desc or gt is not None:
                # newest first, down to gt: versions only fall on the way
                for event in self.client.read_aggregate(aggregate_id, direction="backward"):
                    stored = self.stored_event(event)
                    if gt is not None and stored.originator_version <= gt:
                        break
                    if lte is not None and stored.originator_version > lte:
                        continue
                    out.append(stored)
                    if desc and limit is not None and len(out) >= limit:
                        break
                if not desc:
                    out.reverse()
            else:
                for event in self.client.read_aggregate(aggregate_id):
                    stored = self.stored_event(event)
                    if lte is not None and stored.originator_version > lte:
                        break
                    out.append(stored)
                    if limit is not None and len(out) >= limit:
                        break
        return out if limit is None else out[:limit]


class WalstoreApplicationRecorder(WalstoreAggregateRecorder, ApplicationRecorder):
    """Also the application's notification log: its events in walstore's global order,
    read with the server's filters (``aggregate_prefix`` of the application, ``types``)."""

    def insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        return self._insert(stored_events, None)

    def select_notifications(
        self,
        start: int | None,
        limit: int,
        stop: int | None = None,
        topics: Sequence[str] = (),
        *,
        inclusive_of_start: bool = True,
    ) -> Sequence[Notification]:
        first = 1 if start is None else (start if inclusive_of_start else start + 1)
        first = max(first, 1)
        if limit <= 0 or (stop is not None and stop < first):
            return []
        types = self._types(topics)
        out: list[Notification] = []
        from_index = first
        with translated_errors(writing=False):
            while len(out) < limit:
                page = self.client.read_log_page(
                    from_index=from_index,
                    limit=min(limit - len(out), MAX_PAGE_EVENTS),
                    types=types,
                    aggregate_prefix=self.aggregate_prefix,
                )
                for event in page.events:
                    if stop is not None and event.index > stop:
                        return out
                    out.append(self.notification(event))
                # the scan's end: the log's end, past stop, or a server that went nowhere
                if page.next_index > page.last_index or page.next_index <= from_index:
                    break
                if stop is not None and page.next_index > stop:
                    break
                from_index = page.next_index
        return out[:limit]

    def max_notification_id(self) -> int | None:
        from_index: int | None = None
        with translated_errors(writing=False):
            while True:
                page = self.client.read_log_page(
                    from_index=from_index, limit=1, aggregate_prefix=self.aggregate_prefix, direction="backward"
                )
                if page.events:
                    return max(e.index for e in page.events)
                if page.next_index < 1 or (from_index is not None and page.next_index >= from_index):
                    return None
                from_index = page.next_index

    def subscribe(self, gt: int | None = None, topics: Sequence[str] = ()) -> Subscription[ApplicationRecorder]:
        return WalstoreSubscription(self, gt=gt, topics=topics)

    @staticmethod
    def _types(topics: Iterable[str]) -> list[str] | None:
        types = list(topics)
        for topic in types:
            if not topic or "," in topic:
                raise ProgrammingError(f"walstore filters by topics without commas, got {topic!r}")
        return types or None


class _Stopped(Exception):
    """Raised inside a subscription's stream once it was stopped (not an httpx error, so
    the client does not reconnect: it ends the stream)."""


class _StoppableStream(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, transport: _StoppableTransport) -> None:
        self._inner = inner
        self._transport = transport

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self._inner:
                if self._transport.stopped:
                    raise _Stopped
                yield chunk
        except _Stopped:
            raise
        except Exception:
            if self._transport.stopped:
                raise _Stopped from None
            raise

    def close(self) -> None:
        self._inner.close()


class _StoppableTransport(httpx.BaseTransport):
    """httpx's transport, with a ``stop()`` any thread may call: it shuts the sockets of
    the open streams (waking a read blocked on a silent stream) and refuses new requests."""

    def __init__(self) -> None:
        self._inner = httpx.HTTPTransport()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.stopped = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.stopped:
            raise _Stopped
        response = self._inner.handle_request(request)
        stream = response.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        with self._lock:
            if isinstance(sock, socket.socket):
                self._sockets.append(sock)
            stopped = self.stopped
        if stopped:
            response.close()
            raise _Stopped
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_StoppableStream(cast(httpx.SyncByteStream, response.stream), self),
            extensions=response.extensions,
        )

    def stop(self) -> None:
        with self._lock:
            self.stopped = True
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._inner.close()


class WalstoreSubscription(Subscription[ApplicationRecorder]):
    """The application's notifications after ``gt``, then new ones as they are recorded:
    the client's ``subscribe`` (server-filtered SSE, resumed after failover) read by a
    thread into a bounded queue. ``stop()`` ends it from any thread, at once."""

    def __init__(
        self, recorder: WalstoreApplicationRecorder, gt: int | None = None, topics: Sequence[str] = ()
    ) -> None:
        super().__init__(recorder=recorder, gt=gt, topics=topics)
        self._walstore_recorder = recorder
        self._types = recorder._types(topics)
        self._queue: Queue[Notification] = Queue(maxsize=SUBSCRIPTION_BUFFER)
        self._error: BaseException | None = None
        self._transport = _StoppableTransport()
        self._client = recorder.datastore.new_client(self._transport)
        self._thread = threading.Thread(target=self._run, name="walstore-subscription", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        recorder = self._walstore_recorder
        try:
            with translated_errors(writing=False):
                subscription = self._client.subscribe(
                    from_index=(self._last_notification_id or 0) + 1,
                    types=self._types,
                    aggregate_prefix=recorder.aggregate_prefix,
                )
                for event in subscription:
                    self._queue.put(recorder.notification(event))
                    if self._has_been_stopped:
                        break
        except (ShutDown, _Stopped):
            pass
        except BaseException as exc:
            if not self._has_been_stopped:
                self._error = exc
        finally:
            # the iterating thread takes what is queued, then the error or the end
            self._queue.shutdown()
            self._client.close()

    def stop(self) -> None:
        super().stop()
        self._queue.shutdown(immediate=True)
        self._transport.stop()

    def __exit__(self, *args: object, **kwargs: Any) -> None:
        try:
            super().__exit__(*args, **kwargs)
        finally:
            self._thread.join(timeout=5)

    def __next__(self) -> Notification:
        if self._has_been_stopped:
            if self._error is not None:
                raise self._error
            raise StopIteration
        try:
            notification = self._queue.get()
        except ShutDown:
            if self._error is not None:
                raise self._error from None
            raise StopIteration from None
        self._last_notification_id = notification.id
        return notification


class WalstoreTrackingRecorder(WalstoreRecorder, TrackingRecorder):
    """Tracking positions as walstore consumer positions (``GET /consumers/{name}``)."""

    def __init__(self, datastore: WalstoreDatastore, *, purpose: str = "events") -> None:
        super().__init__(datastore, purpose=purpose)

    def insert_tracking(self, tracking: Tracking) -> None:
        wal_tracking = self.wal_tracking(tracking)
        with translated_errors(writing=True):
            self.client.append_batch([], tracking=wal_tracking)

    def max_tracking_id(self, application_name: str) -> int | None:
        with translated_errors(writing=False):
            return self.client.consumer_position(self.consumer(application_name))


class WalstoreProcessRecorder(WalstoreTrackingRecorder, WalstoreApplicationRecorder, ProcessRecorder):
    """Events and the tracking position they were made from, in one atomic batch."""

    def insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        tracking = kwargs.get("tracking")
        if tracking is not None and not isinstance(tracking, Tracking):
            raise ProgrammingError(f"tracking must be an eventsourcing Tracking, got {tracking!r}")
        return self._insert(stored_events, tracking)


_TRecorder = TypeVar("_TRecorder")


class WalstoreFactory(InfrastructureFactory[WalstoreTrackingRecorder]):
    """``PERSISTENCE_MODULE=walstore.eventsourcing``. Environment (each may also be given
    with the application's name as prefix, e.g. ``BANKACCOUNTS_WALSTORE_URLS``):

    - ``WALSTORE_URLS`` (required): the nodes' URLs, comma-separated;
    - ``WALSTORE_NAMESPACE``: the first part of the application's aggregate ids and
      consumer names (default: the application's name);
    - ``WALSTORE_TIMEOUT``: seconds one HTTP attempt may take (default 10);
    - ``WALSTORE_RETRY_DEADLINE``: seconds a call may spend retrying and failing over
      before it raises (default 35).
    """

    WALSTORE_URLS: Final = "WALSTORE_URLS"
    WALSTORE_NAMESPACE: Final = "WALSTORE_NAMESPACE"
    WALSTORE_TIMEOUT: Final = "WALSTORE_TIMEOUT"
    WALSTORE_RETRY_DEADLINE: Final = "WALSTORE_RETRY_DEADLINE"

    aggregate_recorder_class: type[WalstoreAggregateRecorder] = WalstoreAggregateRecorder
    snapshot_recorder_class: type[WalstoreSnapshotRecorder] = WalstoreSnapshotRecorder
    application_recorder_class: type[WalstoreApplicationRecorder] = WalstoreApplicationRecorder
    tracking_recorder_class: type[WalstoreTrackingRecorder] = WalstoreTrackingRecorder
    process_recorder_class: type[WalstoreProcessRecorder] = WalstoreProcessRecorder

    def __init__(self, env: Environment | EnvType | None) -> None:
        super().__init__(env)
        urls = self.env.get(self.WALSTORE_URLS)
        if not urls or not urls.strip(" ,"):
            keys = ", ".join(self.env.create_keys(self.WALSTORE_URLS))
            raise OSError(f"walstore node URLs not found in environment with keys: {keys}")
        namespace = self.env.get(self.WALSTORE_NAMESPACE)
        self.datastore = WalstoreDatastore(
            urls,
            namespace=namespace if namespace is not None else self.env.name,
            timeout=self._seconds(self.WALSTORE_TIMEOUT, 10.0),
            retry_deadline=self._seconds(self.WALSTORE_RETRY_DEADLINE, 35.0),
        )

    def _seconds(self, key: str, default: float) -> float:
        text = self.env.get(key)
        if not text:
            return default
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise OSError(f"walstore environment value for key {key!r} is invalid: expected seconds > 0, got {text!r}")
        return value

    def _resolve(self, key: str, default: type[_TRecorder]) -> type[_TRecorder]:
        topic = self.env.get(key)
        if not topic:
            return default
        cls = resolve_topic(topic)
        if not (isinstance(cls, type) and issubclass(cls, default)):
            raise ProgrammingError(f"{key}={topic!r} is not a subclass of {default.__name__}")
        return cls

    def aggregate_recorder(self, purpose: str = "events") -> AggregateRecorder:
        if purpose == "snapshots":
            return type(self).snapshot_recorder_class(self.datastore, purpose=purpose)
        return type(self).aggregate_recorder_class(self.datastore, purpose=purpose)

    def application_recorder(self) -> ApplicationRecorder:
        cls = self._resolve(self.APPLICATION_RECORDER_TOPIC, type(self).application_recorder_class)
        return cls(self.datastore)

    def tracking_recorder(
        self, tracking_recorder_class: type[WalstoreTrackingRecorder] | None = None
    ) -> WalstoreTrackingRecorder:
        if tracking_recorder_class is None:
            tracking_recorder_class = self._resolve(self.TRACKING_RECORDER_TOPIC, type(self).tracking_recorder_class)
        if not issubclass(tracking_recorder_class, WalstoreTrackingRecorder):
            raise ProgrammingError(f"{tracking_recorder_class} is not a WalstoreTrackingRecorder")
        return tracking_recorder_class(self.datastore)

    def process_recorder(self) -> ProcessRecorder:
        cls = self._resolve(self.PROCESS_RECORDER_TOPIC, type(self).process_recorder_class)
        return cls(self.datastore)

    def close(self) -> None:
        with contextlib.suppress(AttributeError):
            self.datastore.close()


Factory = WalstoreFactory

__all__ = [
    "Factory",
    "WalstoreAggregateRecorder",
    "WalstoreApplicationRecorder",
    "WalstoreDatastore",
    "WalstoreFactory",
    "WalstoreOutcomeUnknownError",
    "WalstoreProcessRecorder",
    "WalstoreSnapshotRecorder",
    "WalstoreSubscription",
    "WalstoreTrackingRecorder",
    "WalstoreUnavailableError",
    "escape",
    "translated_errors",
]
