"""``walstore.client.Client`` against one real ``walstore serve`` process: appends and
batches come back typed, conflicts raise their own errors carrying the server's details,
a repeated id is answered with the first result (and stored once), reads page past the
server's page size in both directions, and a subscription catches up and then goes live."""

from __future__ import annotations

import threading
import uuid

import pytest
from client_fixtures import fresh
from served_node import ServedNode

from walstore.client import Client
from walstore.client.errors import BadRequest, DuplicateEventId, WrongExpectedVersion
from walstore.client.models import EventData, RecordedEvent

pytestmark = pytest.mark.slow


def test_append_and_read_back(client: Client) -> None:
    agg = fresh("user")
    first = client.append(agg, "Created", {"name": "Ada"}, metadata={"source": "test"})
    second = client.append(agg, "Renamed", {"name": "Ada L."}, expected_version=1)
    assert (first.version, second.version) == (1, 2)
    assert second.index == first.index + 1
    uuid.UUID(first.event_id)  # made by the client
    events = list(client.read_aggregate(agg))
    assert [(e.id, e.type, e.version, e.index) for e in events] == [
        (first.event_id, "Created", 1, first.index),
        (second.event_id, "Renamed", 2, second.index),
    ]
    assert events[0].payload == {"name": "Ada"} and events[0].metadata == {"source": "test"}
    assert events[0].payload_bytes is None and events[0].aggregate_id == agg
    assert events[0].recorded_at is not None and events[0].raw["id"] == first.event_id
    assert list(client.read_aggregate(fresh("nobody"))) == []


def test_wrong_expected_version_is_typed_and_carries_the_current_version(client: Client) -> None:
    agg = fresh("acct")
    client.append(agg, "Opened", {})
    with pytest.raises(WrongExpectedVersion) as caught:
        client.append(agg, "Deposited", {"n": 1}, expected_version=0)
    assert caught.value.current_version == 1
    assert caught.value.status == 409 and caught.value.code == "wrong_expected_version"
    assert caught.value.aggregate_id == agg
    assert [e.version for e in client.read_aggregate(agg)] == [1]


def test_a_repeated_id_answers_the_first_result_and_other_content_is_a_duplicate(client: Client) -> None:
    agg = fresh("order")
    event_id = str(uuid.uuid4())
    first = client.append(agg, "Placed", {"n": 1}, event_id=event_id)
    again = client.append(agg, "Placed", {"n": 1}, event_id=event_id)
    assert again == first
    with pytest.raises(DuplicateEventId) as caught:
        client.append(agg, "Placed", {"n": 2}, event_id=event_id)
    assert caught.value.event_id == event_id and caught.value.status == 409
    assert [e.id for e in client.read_aggregate(agg)] == [event_id]


def test_batch_is_all_or_nothing_and_idempotent(client: Client) -> None:
    a, b = fresh("a"), fresh("b")
    events = [EventData(a, "T", {"i": i}) for i in range(3)] + [EventData(b, "U", {"i": 9}, expected_version=0)]
    result = client.append_batch(events)
    assert [r.version for r in result.events] == [1, 2, 3, 1]
    assert result.first_index is not None and result.last_index == result.first_index + 3
    assert [r.index for r in result.events] == list(range(result.first_index, result.first_index + 4))
    # The same batch with the ids it got: the same answer, nothing new stored.
    ids = [r.event_id for r in result.events]
    repeat = client.append_batch(
        [
            EventData(e.aggregate_id, e.type, e.payload, expected_version=e.expected_version, id=i)
            for e, i in zip(events, ids, strict=True)
        ]
    )
    assert repeat.events == result.events
    # One conflicting event fails the whole batch: the other event is not stored either.
    with pytest.raises(WrongExpectedVersion) as caught:
        client.append_batch([EventData(a, "T", {"i": 3}), EventData(b, "U", {}, expected_version=0)])
    assert caught.value.current_version == 1
    assert [e.version for e in client.read_aggregate(a)] == [1, 2, 3]


def test_bad_requests_are_typed(client: Client) -> None:
    with pytest.raises(BadRequest) as caught:
        client.append(fresh("x"), "", {})
    assert caught.value.status == 400 and caught.value.code == "invalid_field"
    with pytest.raises(ValueError):
        client.append(fresh("x"), "T", {}, expected_version=-1)


def test_reads_page_past_the_server_page_in_both_directions(client: Client) -> None:
    agg = fresh("big")
    total = 2300
    for start in range(0, total, 1000):
        client.append_batch([EventData(agg, "T", {"i": i}) for i in range(start, min(total, start + 1000))])
    assert [e.version for e in client.read_aggregate(agg)] == list(range(1, total + 1))
    assert [e.version for e in client.read_aggregate(agg, page_size=700)] == list(range(1, total + 1))
    backward = [e.version for e in client.read_aggregate(agg, direction="backward", page_size=1000)]
    assert backward == list(range(total, 0, -1))
    assert [e.version for e in client.read_aggregate(agg, from_version=2250, limit=10)] == list(range(2250, 2260))
    assert [e.payload["i"] for e in client.read_aggregate(agg, from_version=1001, limit=1500)] == list(
        range(1000, 2300)
    )

    log = list(client.read_log(page_size=999))
    assert [e.index for e in log] == list(range(1, len(log) + 1))  # the whole log, no gap, no repeat
    mine = [e for e in log if e.aggregate_id == agg]
    assert [e.version for e in mine] == list(range(1, total + 1))
    start = mine[0].index
    assert [e.index for e in client.read_log(from_index=start, limit=1500)] == list(range(start, start + 1500))
    page = client.read_log_page(from_index=start, limit=5)
    assert [e.index for e in page.events] == list(range(start, start + 5))
    assert page.next_index == start + 5 and page.last_index >= start + total - 1


def test_subscription_catches_up_then_goes_live(client: Client, node: ServedNode) -> None:
    agg = fresh("live")
    before = [client.append(agg, "T", {"i": i}) for i in range(3)]
    got: list[RecordedEvent] = []
    wanted = 6
    with Client(node.url) as writer, client.subscribe(from_index=before[0].index) as subscription:
        later: list[int] = []

        def write_more() -> None:
            later.extend(writer.append(agg, "T", {"i": i}).index for i in range(3, wanted))

        thread: threading.Thread | None = None
        for event in subscription:
            if event.aggregate_id != agg:
                continue
            got.append(event)
            if len(got) == len(before):
                # Caught up: everything from here on is written after the subscription opened.
                thread = threading.Thread(target=write_more)
                thread.start()
            if len(got) == wanted:
                break
        assert thread is not None
        thread.join()
        assert subscription.position == got[-1].index
    assert [e.payload["i"] for e in got] == list(range(wanted))
    assert [e.index for e in got[3:]] == later
