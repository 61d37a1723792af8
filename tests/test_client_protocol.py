"""The client's sans-IO core (``walstore.client._protocol``), decision by decision, with
a hand-driven clock and no server: what each answer or transport failure makes a call do
next, when a write is ``OutcomeUnknown`` rather than ``Unavailable``, how leader hints
are followed, how paging ends (filters returning fewer events than asked), and how a
subscription's resume point moves (checkpoints, repeats, a skipped index)."""

from __future__ import annotations

import base64
import subprocess
import sys

import httpx
import orjson
import pytest

import walstore.client
from walstore.client import _protocol as p
from walstore.client.errors import (
    BadRequest,
    DuplicateEventId,
    NotFound,
    OutcomeUnknown,
    TrackingConflict,
    Unavailable,
    WrongExpectedVersion,
)
from walstore.client.models import EventData, LogPage, RecordedEvent, Tracking

URLS = ["http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"]
JSON = {"content-type": "application/json"}


def error(code: str, **details: object) -> bytes:
    return orjson.dumps({"success": False, "error": {"code": code, "message": code, **details}})


def write_call(deadline: float = 10.0, urls: list[str] = URLS) -> p.Call:
    request = p.append_request(EventData("a", "T", {"n": 1}))
    return p.Call(request, p.Router(urls), deadline=deadline, timeout=5.0)


def test_a_503_is_retried_after_its_retry_after_then_done() -> None:
    call = write_call()
    step = call.answered(503, {**JSON, "retry-after": "2"}, error("no_leader", retry_after_s=2), now=0.0)
    assert step == p.Retry(URLS[0], 2.0)
    done = call.answered(201, JSON, b'{"success":true,"event_id":"x","index":1,"version":1}', now=2.0)
    assert isinstance(done, p.Done) and p.decode_append(done.body).index == 1


def test_only_503s_until_the_deadline_is_unavailable_with_the_last_code() -> None:
    call = write_call(deadline=3.0)
    assert isinstance(call.answered(503, {"retry-after": "1"}, error("no_quorum"), now=0.0), p.Retry)
    step = call.answered(503, {**JSON, "retry-after": "5"}, error("no_quorum", retry_after_s=5), now=1.0)
    assert isinstance(step, p.Fail) and type(step.error) is Unavailable
    assert step.error.code == "no_quorum" and step.error.retry_after_s == 5


def test_a_504_then_time_running_out_is_outcome_unknown_with_the_ids() -> None:
    call = write_call(deadline=1.0)
    assert isinstance(call.answered(504, JSON, error("outcome_unknown"), now=0.0), p.Retry)
    # A later 503 does not make the first attempt's fate any less open.
    step = call.answered(503, {"retry-after": "1"}, error("no_leader"), now=0.5)
    assert isinstance(step, p.Fail) and isinstance(step.error, OutcomeUnknown)
    assert step.error.event_ids == list(call.request.event_ids) and len(step.error.event_ids) == 1


def test_a_lost_connection_moves_on_and_may_have_stored_the_write() -> None:
    call = write_call(deadline=0.15)
    step = call.failed(httpx.ReadError("connection reset"), now=0.0)
    assert isinstance(step, p.Retry) and step.url == URLS[1] and step.wait_s == p.FIRST_BACKOFF_S
    step = call.failed(httpx.ReadError("connection reset"), now=0.1)
    assert isinstance(step, p.Fail) and isinstance(step.error, OutcomeUnknown)


def test_refused_connections_try_every_url_at_once_then_back_off_and_are_unavailable() -> None:
    call = write_call(deadline=0.3)
    steps = [call.failed(httpx.ConnectError("refused"), now=0.0) for _ in range(3)]
    assert [(s.url, s.wait_s) for s in steps if isinstance(s, p.Retry)] == [
        (URLS[1], 0.0),
        (URLS[2], 0.0),
        (URLS[0], p.FIRST_BACKOFF_S),
    ]
    for _ in range(3):
        last = call.failed(httpx.ConnectError("refused"), now=0.29)
    assert isinstance(last, p.Fail) and type(last.error) is Unavailable  # nothing was ever sent


def test_a_read_is_never_outcome_unknown() -> None:
    call = p.Call(p.STATUS_REQUEST, p.Router(URLS), deadline=0.05, timeout=1.0)
    step = call.failed(httpx.ReadTimeout("slow"), now=0.0)
    assert isinstance(step, p.Fail) and type(step.error) is Unavailable


def test_a_leader_hint_goes_to_the_leaders_url_at_once_or_asks_who_is_who() -> None:
    router = p.Router(URLS)
    call = p.Call(p.append_request(EventData("a", "T")), router, deadline=10.0, timeout=1.0)
    step = call.answered(503, {**JSON, "retry-after": "1"}, error("not_leader", leader_id="n2"), now=0.0)
    assert step == p.Retry(URLS[0], 0.0, probe=URLS)  # ids unknown: GET /status first
    # The probe learned nothing (the nodes did not answer): no second probe, wait as told.
    step = call.answered(503, {**JSON, "retry-after": "1"}, error("not_leader", leader_id="n2"), now=0.0)
    assert step == p.Retry(URLS[0], 1.0)
    for url, node_id in zip(URLS, ["n0", "n1", "n2"], strict=True):
        router.learn(url, {"id": node_id})
    step = call.answered(503, {**JSON, "retry-after": "1"}, error("not_leader", leader_id="n2"), now=0.0)
    assert step == p.Retry(URLS[2], 0.0)
    # The same hint again, from the hinted node itself: now wait as told.
    step = call.answered(503, {**JSON, "retry-after": "1"}, error("no_leader", leader_id="n2"), now=0.0)
    assert step == p.Retry(URLS[2], 1.0)


def test_a_node_local_503_moves_to_the_next_node() -> None:
    call = write_call()
    step = call.answered(503, {**JSON, "retry-after": "1"}, error("shutting_down"), now=0.0)
    assert step == p.Retry(URLS[1], 1.0)


@pytest.mark.parametrize(
    ("status", "body", "cls", "attribute", "value"),
    [
        (409, error("wrong_expected_version", current_version=4), WrongExpectedVersion, "current_version", 4),
        (409, error("duplicate_event_id", event_id="e1"), DuplicateEventId, "event_id", "e1"),
        (409, error("tracking_conflict", consumer="c", stored_position=7), TrackingConflict, "stored_position", 7),
        (400, error("invalid_field", field="type"), BadRequest, "code", "invalid_field"),
        (413, error("batch_too_large", limit=10), BadRequest, "details", {"limit": 10}),
        (404, error("not_found"), NotFound, "status", 404),
    ],
)
def test_a_4xx_is_its_typed_error_at_once(status: int, body: bytes, cls: type, attribute: str, value: object) -> None:
    step = write_call().answered(status, JSON, body, now=0.0)
    assert isinstance(step, p.Fail) and type(step.error) is cls
    assert getattr(step.error, attribute) == value


def test_requests_carry_client_made_ids_and_the_contracts_fields() -> None:
    req = p.batch_request(
        [
            EventData("a", "T", payload_bytes=b"\x00\xff", expected_version="exists"),
            EventData("b", "U", {"k": [1]}, metadata={"m": 1}, expected_version=0, id="mine"),
        ],
        Tracking("projector", 12),
    )
    body = orjson.loads(req.body or b"")
    first, second = body["events"]
    assert first["payload_base64"] == base64.b64encode(b"\x00\xff").decode() and "payload" not in first
    assert first["expected_version"] == "exists" and len(first["id"]) == 36
    assert second == {
        "id": "mine",
        "type": "U",
        "aggregate_id": "b",
        "payload": {"k": [1]},
        "metadata": {"m": 1},
        "expected_version": 0,
    }
    assert body["tracking"] == {"consumer": "projector", "position": 12}
    assert req.event_ids == (first["id"], "mine") and req.kind == "write"
    assert orjson.loads(p.batch_request([], Tracking("c", 1)).body or b"") == {
        "events": [],
        "tracking": {"consumer": "c", "position": 1},
    }
    with pytest.raises(ValueError):
        p.batch_request([], None)
    with pytest.raises(ValueError):
        p.event_body(EventData("a", "T", {"x": 1}, payload_bytes=b"x"), "id")
    with pytest.raises(ValueError):
        p.event_body(EventData("a", "T", expected_version=True), "id")
    log = p.log_page_request(from_index=None, limit=5, types=["A", "B"], aggregate_prefix="acct-", direction="backward")
    assert log.url("http://h:1") == "http://h:1/events?limit=5&types=A%2CB&aggregate_prefix=acct-&direction=backward"
    assert p.aggregate_page_request("a/b c", from_version=3, limit=2, direction="forward").path == "/events/a%2Fb%20c"


def ev(index: int, type_: str = "T", aggregate_id: str = "a", version: int = 1) -> dict[str, object]:
    return {
        "id": f"e{index}",
        "type": type_,
        "aggregate_id": aggregate_id,
        "version": version,
        "index": index,
        "timestamp": 1,
        "payload": {},
        "metadata": {},
    }


def recorded(*events: dict[str, object]) -> list[RecordedEvent]:
    return [p.decode_event(e) for e in events]


def test_a_filtered_forward_read_pages_until_the_scan_passes_the_last_index() -> None:
    pager = p.LogPager(from_index=1, types=["A"], aggregate_prefix=None, direction="forward", limit=None, page_size=2)
    # The server's scan budget returns fewer than asked, even none, but next_index moves on.
    assert [e.index for e in pager.feed(LogPage(recorded(ev(3, "A")), next_index=4000, last_index=9000))] == [3]
    assert not pager.done and "from_index=4000" in pager.request().url("")
    assert pager.feed(LogPage([], next_index=8000, last_index=9000)) == [] and not pager.done
    assert [e.index for e in pager.feed(LogPage(recorded(ev(8500, "A")), 9001, 9000))] == [8500]
    assert pager.done


def test_a_read_stops_at_its_limit_at_the_start_and_when_stuck() -> None:
    pager = p.LogPager(
        from_index=None, types=None, aggregate_prefix=None, direction="backward", limit=None, page_size=2
    )
    assert "from_index" not in pager.request().url("")  # backward from the last index
    pager.feed(LogPage(recorded(ev(5), ev(4)), next_index=3, last_index=5))
    assert not pager.done
    pager.feed(LogPage(recorded(ev(3), ev(2)), next_index=1, last_index=5))
    pager.feed(LogPage(recorded(ev(1)), next_index=0, last_index=5))
    assert pager.done
    limited = p.LogPager(from_index=1, types=None, aggregate_prefix=None, direction="forward", limit=3, page_size=2)
    assert "limit=2" in limited.request().url("")
    limited.feed(LogPage(recorded(ev(1), ev(2)), 3, 10))
    assert "limit=1" in limited.request().url("")
    assert len(limited.feed(LogPage(recorded(ev(3), ev(4)), 5, 10))) == 1 and limited.done
    # An old server answering a page without progress cannot make the read loop forever.
    stuck = p.LogPager(from_index=7, types=None, aggregate_prefix=None, direction="forward", limit=None, page_size=2)
    stuck.feed(LogPage([], next_index=7, last_index=9))
    assert stuck.done


def test_an_aggregate_read_ends_at_the_aggregates_version_or_version_1() -> None:
    forward = p.AggregatePager("a", from_version=None, direction="forward", limit=None, page_size=2)
    forward.feed(p.AggregatePage(recorded(ev(1, version=1), ev(2, version=2)), version=3))
    assert not forward.done and "from_version=3" in forward.request().url("")
    forward.feed(p.AggregatePage(recorded(ev(3, version=3)), version=3))
    assert forward.done
    backward = p.AggregatePager("a", from_version=None, direction="backward", limit=None, page_size=2)
    backward.feed(p.AggregatePage(recorded(ev(2, version=2), ev(1, version=1)), version=2))
    assert backward.done


def sse(*lines: str) -> list[p.SseMessage]:
    parser = p.SseParser()
    return [m for m in (parser.feed(line) for line in lines) if m is not None]


def test_sse_messages_comments_and_checkpoints() -> None:
    messages = sse(
        ": heartbeat",
        "",
        "id: 7",
        'data: {"a":',
        "data: 1}",
        "",
        "id: 9\r",
        "event: checkpoint",
        'data: {"index": 9}',
        "",
    )
    assert messages == [p.SseMessage("7", None, '{"a":\n1}'), p.SseMessage("9", "checkpoint", '{"index": 9}')]


def message(event: dict[str, object]) -> p.SseMessage:
    return p.SseMessage(str(event["index"]), None, orjson.dumps(event).decode())


def test_the_resume_point_moves_with_events_and_checkpoints_and_repeats_are_dropped() -> None:
    state = p.SubscriptionState(5, None, None)
    assert "from_index=5" in state.request().url("")
    assert state.accept(message(ev(5))) is not None and state.position == 5
    assert state.accept(message(ev(5))) is None  # a repeat after a reconnect
    with pytest.raises(p.StreamBroken):
        state.accept(message(ev(7)))  # 6 skipped: reopen from 6 rather than deliver a gap
    assert state.position == 5 and "from_index=6" in state.request().url("")

    filtered = p.SubscriptionState(1, ["A"], "acct-")
    assert filtered.accept(message(ev(3, "A", "acct-1"))) is not None  # gaps are what filters do
    assert filtered.accept(p.SseMessage("40", "checkpoint", '{"index": 40}')) is None
    assert filtered.position == 40 and "from_index=41" in filtered.request().url("")
    assert "types=A" in filtered.request().url("") and "aggregate_prefix=acct-" in filtered.request().url("")
    # An event the server should have filtered out (an older server ignores the filters).
    assert filtered.accept(message(ev(41, "B", "acct-1"))) is None and filtered.position == 41


def test_reconnects_go_round_the_nodes_and_give_up_after_the_deadline() -> None:
    reconnects = p.Reconnects(p.Router(URLS), deadline_s=5.0, now=0.0)
    assert reconnects.broken("reset", now=1.0) == 0.0 and reconnects.url == URLS[1]
    assert reconnects.broken("refused", now=1.0) == p.FIRST_BACKOFF_S and reconnects.url == URLS[2]
    reconnects.answered(now=4.0)
    reconnects.receiving(now=100.0)  # a stream that ran long: the deadline counts from its last line
    assert reconnects.broken("reset", now=101.0) == 0.0 and reconnects.count == 3
    assert reconnects.broken("refused", now=104.0) == p.FIRST_BACKOFF_S
    with pytest.raises(Unavailable):
        reconnects.broken("refused", now=105.5)


def test_event_reads_ask_for_the_clients_own_writes_and_nothing_else_does() -> None:
    read = p.log_page_request(from_index=1, limit=10)
    assert p.at_least(read, 42).params[-1] == ("min_index", "42")
    assert p.at_least(read, 0) == read  # nothing written yet: nothing to wait for
    aggregate = p.aggregate_page_request("a", from_version=None, limit=1, direction="backward")
    assert ("min_index", "7") in p.at_least(aggregate, 7).params
    assert p.at_least(p.STATUS_REQUEST, 42) == p.STATUS_REQUEST
    assert p.at_least(p.consumer_request("c"), 42).params == ()


def test_the_command_lines_client_names_do_not_import_httpx() -> None:
    # httpx takes ~0.2 s to import: ``walstore.client`` loads it only when Client or
    # AsyncClient is first used, so every CLI command that needs only the small client starts fast.
    code = (
        "import sys, walstore.client as c; from walstore.client import WalstoreClient, follow;"
        "assert 'httpx' not in sys.modules; c.AsyncClient; assert 'httpx' in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    with pytest.raises(AttributeError):
        _ = walstore.client.NoSuchName


def test_a_client_refuses_bad_urls_and_durations_before_sending_anything() -> None:
    from walstore.client import Client

    for bad in ([], ["https://h:1"], ["http://h:1/path"], ["not a url:x"]):
        with pytest.raises(ValueError):
            Client(bad)
    with pytest.raises(ValueError, match="retry_deadline"):
        Client("http://h:1", retry_deadline=0)
    with pytest.raises(ValueError, match="timeout"):
        Client("http://h:1", timeout=float("nan"))
    assert p.Router(["h:1", "http://h:1/", "http://[::1]:2"]).urls == ["http://h:1", "http://[::1]:2"]
