"""Client writes that reach a follower travel to the leader over the peer protocol.

The follower sends FORWARD(request_id, JSON of the validated events) on one connection it
keeps to the current leader (many requests in flight, answers matched by id); the leader
runs them through its normal append path and answers FORWARD_RESULT(status, JSON). Errors
keep their meaning end to end: a 409 stays a 409. A connection lost after the request was
sent is an *unknown outcome* (504): the leader may have appended it.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import orjson
import trio

from walstore.config import PeerSpec
from walstore.errors import (
    ConflictError,
    NotFoundError,
    OutcomeUnknown,
    ProtocolError,
    RequestError,
    UnavailableError,
    ValidationError,
    WalstoreError,
)
from walstore.event import EXISTS, AppendResult, ExpectedVersion, NewEvent, Tracking
from walstore.protocol import Forward, ForwardResult
from walstore.replication.transport import PeerChannel, PeerClosed, dial

log = logging.getLogger("walstore.forward")

# How often the follower looks whether it has promised a newer epoch than the one its
# forwarding connection was opened in. A new leader's PREPARE makes that promise, so from
# then on the old leader can commit nothing more: what waits on it is 504 at once, not at
# the end of its lease-long bound (the clients stuck there made a 2 s failover look like
# 3.5-4 s). Polled because the promise is only visible through the ``epoch`` callable:
# one timer per node, not one per request.
EPOCH_POLL_S = 0.05
# Of a forward's time, the share it may spend getting a connection (TCP and one HELLO round
# trip, milliseconds even to a busy leader). A leader that cannot shake hands in a quarter
# of a lease is stopped or cut off: 503 then, with nothing sent, lets the client retry at
# once elsewhere. A cut-off node held each client the whole bound (2 s) here, so a load
# whose workers landed on it saw the successor ~2 s after it was serving.
CONNECT_SHARE = 0.25
# Request ids a leader remembers per forwarding connection, to refuse a replayed FORWARD
# (TCP never replays a frame; a replay is a broken or hostile peer). Far more than the
# requests one follower has in flight, which its HTTP connection limit bounds.
REPLAY_WINDOW = 8192


def _event_item(e: NewEvent) -> dict[str, object]:
    item: dict[str, object] = {"id": e.id, "type": e.type, "aggregate_id": e.aggregate_id}
    if e.binary:
        item["payload_base64"] = base64.b64encode(e.payload).decode("ascii")
    else:
        # The client's JSON text as a string, not embedded JSON: the leader stores exactly
        # these bytes (decoding embedded JSON and encoding it again would lose key order
        # and the digits of numbers, which walstore.json_text keeps).
        item["payload_text"] = e.payload.decode()
    item["metadata_text"] = e.metadata.decode()
    item["expected_version"] = e.expected_version
    return item


def encode_events(events: Sequence[NewEvent], tracking: Tracking | None = None) -> bytes:
    """A JSON list of the events; with tracking, ``{"events": [...], "tracking": {...}}``
    (a leader of an older version refuses that as a bad request, never misreads it)."""
    items = [_event_item(e) for e in events]
    if tracking is None:
        return orjson.dumps(items)
    return orjson.dumps({"events": items, "tracking": {"consumer": tracking.consumer, "position": tracking.position}})


def _expected(value: object) -> ExpectedVersion:
    if value is None or value == EXISTS:
        return cast(ExpectedVersion, value)
    if type(value) is not int:
        raise ValueError(f"expected_version {value!r}")
    return value


def _text(value: object) -> bytes:
    # The follower validated the text (walstore.json_text); the leader trusts a peer's
    # validation as it trusts the rest of the event.
    if type(value) is not str:
        raise TypeError(f"JSON text must be a string, got {type(value).__name__}")
    return value.encode()


def _decode_event(i: dict[str, Any]) -> NewEvent:
    binary = "payload_base64" in i
    return NewEvent(
        id=str(i["id"]),
        type=str(i["type"]),
        aggregate_id=str(i["aggregate_id"]),
        payload=base64.b64decode(i["payload_base64"], validate=True) if binary else _text(i["payload_text"]),
        metadata=_text(i["metadata_text"]),
        expected_version=_expected(i["expected_version"]),
        binary=binary,
    )


def decode_events(body: bytes) -> list[NewEvent]:
    return decode_request(body)[0]


def decode_request(body: bytes) -> tuple[list[NewEvent], Tracking | None]:
    """The follower validated these already; a peer that sends junk is a protocol error."""
    try:
        data = orjson.loads(body)
        tracking = None
        if isinstance(data, dict):
            t = data["tracking"]
            position = t["position"]
            if type(position) is not int:
                raise ValueError(f"tracking position {position!r}")
            tracking = Tracking(str(t["consumer"]), position)
            data = data["events"]
        return [_decode_event(i) for i in data], tracking
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise ValidationError(f"forwarded request is not a valid event list: {exc}") from exc


def encode_outcome(outcome: list[AppendResult] | WalstoreError) -> tuple[int, bytes]:
    if isinstance(outcome, list):
        return 201, orjson.dumps([[r.event_id, r.index, r.version] for r in outcome])
    if isinstance(outcome, RequestError):
        error = {"code": outcome.code, "message": outcome.message, "details": outcome.details}
        return outcome.http_status, orjson.dumps(error, default=str)
    if isinstance(outcome, UnavailableError):
        unavailable = {
            "code": outcome.code,
            "message": outcome.message,
            "retry_after_s": outcome.retry_after_s,
            "leader_id": outcome.leader_id,
        }
        return outcome.http_status, orjson.dumps(unavailable)
    return 500, orjson.dumps({"code": "internal", "message": str(outcome)})


_REQUEST_ERRORS: dict[int, type[RequestError]] = {400: ValidationError, 404: NotFoundError, 409: ConflictError}


def decode_outcome(status: int, body: bytes) -> list[AppendResult]:
    data: Any = orjson.loads(body)
    if status == 201:
        return [AppendResult(str(e), int(i), int(v)) for e, i, v in data]
    if status == 504:
        raise OutcomeUnknown(data["message"], retry_after_s=data.get("retry_after_s", 1.0))
    if status == 503:
        raise UnavailableError(
            data["message"],
            code=data["code"],
            retry_after_s=data.get("retry_after_s", 1.0),
            leader_id=data.get("leader_id"),
        )
    cls = _REQUEST_ERRORS.get(status)
    if cls is None:
        raise OutcomeUnknown(f"leader answered {status}: {data.get('message')}")
    raise cls(data["message"], code=data["code"], **data.get("details", {}))


class Forwarder:
    """The follower's end: one multiplexed connection to the current leader."""

    def __init__(self, *, node_id: str, cluster_id: str, epoch: Callable[[], int]) -> None:
        self.node_id = node_id
        self.cluster_id = cluster_id
        self.epoch = epoch
        self._ids = itertools.count(1)
        self._channel: PeerChannel | None = None
        self._channel_peer: str | None = None
        self._channel_epoch = 0  # our promised epoch when the channel was opened
        # request id -> (set when answered or its connection ended, the answer, that connection)
        self._waiting: dict[int, tuple[trio.Event, list[ForwardResult], PeerChannel]] = {}
        self._connect_lock = trio.Lock()
        self._nursery: trio.Nursery | None = None

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                while True:
                    await trio.sleep(EPOCH_POLL_S)
                    channel = self._channel
                    if channel is not None and self.epoch() > self._channel_epoch:
                        log.info(
                            "promised epoch %d: dropping the forwarding link to %s", self.epoch(), self._channel_peer
                        )
                        self._channel = None
                        await channel.aclose()  # _read_answers wakes its waiters: 504
        finally:
            # The node is stopping (or its log failed): requests still being answered by
            # the HTTP nursery, which outlives this one, get a 503, not a RuntimeError (500)
            # from a closed nursery. Found by the simulator.
            self._nursery = None

    async def forward(
        self, leader: PeerSpec, events: Sequence[NewEvent], timeout_s: float, *, tracking: Tracking | None = None
    ) -> list[AppendResult]:
        """The leader's answer, within ``timeout_s`` in all: connecting (and waiting for
        another request's connect) counts against it too, and may take ``CONNECT_SHARE``
        of it, so a leader that accepts TCP but never answers (SIGSTOPped, blackholed) costs
        a client a fraction of ``timeout_s``, not the 5 s handshake timeout plus
        ``timeout_s``. UnavailableError (503) while nothing was written to the leader;
        OutcomeUnknown (504) once any of the FORWARD may have been."""
        started = trio.current_time()
        deadline = started + timeout_s
        connect_s = timeout_s * CONNECT_SHARE
        channel: PeerChannel | None = None
        with trio.move_on_at(started + connect_s):
            channel = await self._channel_to(leader)
        if channel is None:
            raise UnavailableError(f"no connection to leader {leader.node_id} within {connect_s:g}s", code="no_leader")
        request_id = next(self._ids)
        done, box = trio.Event(), list[ForwardResult]()
        self._waiting[request_id] = (done, box, channel)
        sent = False
        try:
            with trio.move_on_at(deadline):
                try:
                    await channel.send(Forward(request_id, encode_events(events, tracking)))
                except PeerClosed as exc:
                    raise OutcomeUnknown(f"connection to leader {leader.node_id} lost while forwarding") from exc
                sent = True
                await done.wait()
            if not sent:
                # Cancelled inside send: part of the frame may be on the wire, so the
                # stream is unusable, and the leader may yet read a whole FORWARD.
                if self._channel is channel:
                    self._channel = None  # no other request may pick it up meanwhile
                    await channel.aclose()
                raise OutcomeUnknown(f"forward to leader {leader.node_id} not sent within {timeout_s}s")
            if not box:
                raise OutcomeUnknown(f"no answer from leader {leader.node_id} within {timeout_s}s")
            return decode_outcome(box[0].status, bytes(box[0].body))
        finally:
            self._waiting.pop(request_id, None)

    async def _channel_to(self, leader: PeerSpec) -> PeerChannel:
        async with self._connect_lock:
            if self._channel is not None and self._channel_peer == leader.node_id:
                return self._channel
            await self._drop()
            self._check_running()
            try:
                channel = await dial(
                    leader.host, leader.port, cluster_id=self.cluster_id, node_id=self.node_id, epoch=self.epoch()
                )
            except (OSError, PeerClosed, WalstoreError, trio.TooSlowError) as exc:
                raise UnavailableError(f"leader {leader.node_id} unreachable: {exc!r}", code="no_leader") from exc
            if self._nursery is None:  # stopped while we dialled
                await channel.aclose()
                self._check_running()
            assert self._nursery is not None
            self._channel, self._channel_peer, self._channel_epoch = channel, leader.node_id, self.epoch()
            self._nursery.start_soon(self._read_answers, channel)
            return channel

    def _check_running(self) -> None:
        if self._nursery is None:
            raise UnavailableError("this node is stopping: it forwards no more writes", code="shutting_down")

    async def _read_answers(self, channel: PeerChannel) -> None:
        try:
            while True:
                message = await channel.receive()
                if isinstance(message, ForwardResult) and message.request_id in self._waiting:
                    done, box, _ = self._waiting[message.request_id]
                    box.append(message)
                    done.set()
        except (PeerClosed, WalstoreError) as exc:
            log.info("forwarding connection closed: %r", exc)
        finally:
            if self._channel is channel:
                self._channel = None
            # Wake everyone who waited on this connection (their outcome is unknown), and
            # only them: a request sent on a newer connection may still get its answer.
            for done, _, sent_on in list(self._waiting.values()):
                if sent_on is channel:
                    done.set()
            await channel.aclose()

    async def _drop(self) -> None:
        if self._channel is not None:
            await self._channel.aclose()
            self._channel = None


async def serve_forwards(
    channel: PeerChannel,
    first: Forward,
    append: Callable[[list[NewEvent], Tracking | None], Awaitable[list[AppendResult]]],
) -> None:
    """The leader's end: run each forwarded append concurrently, answer by id. A request
    id seen before on this connection is a replay: acting on it would append a write
    whose client may already have been told it failed (a 503 not_leader sent while this
    node was still taking over), so the connection closes instead (found by the
    simulator, seed 7084)."""
    seen: set[int] = set()
    order: deque[int] = deque()

    def first_time(request_id: int) -> bool:
        if request_id in seen:
            return False
        seen.add(request_id)
        order.append(request_id)
        if len(order) > REPLAY_WINDOW:
            seen.discard(order.popleft())
        return True

    async def one(message: Forward) -> None:
        outcome: list[AppendResult] | WalstoreError
        try:
            outcome = await append(*decode_request(bytes(message.body)))
        except WalstoreError as exc:
            outcome = exc
        status, body = encode_outcome(outcome)
        try:
            await channel.send(ForwardResult(message.request_id, status, body))
        except PeerClosed:
            pass

    async with trio.open_nursery() as nursery:
        first_time(first.request_id)
        nursery.start_soon(one, first)
        while True:
            message = await channel.receive()
            if not isinstance(message, Forward):
                raise ProtocolError(f"expected FORWARD, got {type(message).__name__}")
            if not first_time(message.request_id):
                raise ProtocolError(f"FORWARD request {message.request_id} received twice on one connection (a replay)")
            nursery.start_soon(one, message)
