"""A large ``POST /events/batch`` body is checked as it arrives (walstore.http.batch_stream):
any way of cutting a body into pieces gives what the whole-body parser gives, a bad event
is refused before the rest of the body is sent, and the server streams such bodies with the
body's own deadline and 100-continue."""

from __future__ import annotations

import json
import random
from typing import Any

import orjson
import pytest
import trio
from fakes import HttpTestClient, start_server
from hypothesis import given, settings
from hypothesis import strategies as st
from test_data_fidelity import json_documents

from walstore.errors import ValidationError
from walstore.event import NewEvent, Tracking
from walstore.http import batch_stream
from walstore.http.batch_stream import MIN_RETRY_BYTES, BatchStreamParser
from walstore.http.server import HttpLimits
from walstore.http.validation import parse_batch_with_tracking

Parsed = tuple[list[NewEvent], Tracking | None]


def streamed(body: bytes, cuts: list[int], *, max_events: int = 10_000) -> Parsed:
    parser = BatchStreamParser(max_events=max_events)
    start = 0
    for cut in sorted(cuts):
        parser.feed(body[start:cut])
        start = cut
    parser.feed(body[start:])
    return parser.finish()


def whole(body: bytes, *, max_events: int = 10_000) -> Parsed:
    return parse_batch_with_tracking(body, "application/json", max_events=max_events)


def outcome(parse: Any, *args: Any, **kwargs: Any) -> Parsed | tuple[str, str]:
    try:
        result: Parsed = parse(*args, **kwargs)
        return result
    except ValidationError as exc:
        return ("refused", exc.code)


def event_text(i: int, payload: str, metadata: str, ws: str) -> str:
    sep = f",{ws}"
    return (
        f'{{"id":{ws}"e-{i}"{sep}"type":"T"{sep}"aggregate_id":"a-{i % 3}"{sep}'
        f'"payload":{ws}{payload}{sep}"metadata":{metadata}}}'
    )


@settings(max_examples=150, deadline=None)
@given(
    docs=st.lists(st.tuples(json_documents(), json_documents()), min_size=1, max_size=6),
    ws=st.sampled_from(["", " ", "\n\t "]),
    tracking=st.booleans(),
    data=st.data(),
)
def test_any_cut_of_a_body_gives_what_the_whole_body_gives(
    docs: list[tuple[str, str]], ws: str, tracking: bool, data: st.DataObject
) -> None:
    events = f",{ws}".join(event_text(i, p, m, ws) for i, (p, m) in enumerate(docs))
    track = f',{ws}"tracking":{ws}{{"consumer":"c","position":7}}' if tracking else ""
    body = f'{ws}{{{ws}"events":{ws}[{ws}{events}{ws}]{track}{ws}}}{ws}'.encode()
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=8))
    expected = whole(body)
    assert streamed(body, cuts) == expected
    assert [json.loads(e.payload) for e in expected[0]] == [json.loads(p) for p, _ in docs]


def test_byte_by_byte_feeding_keeps_every_number_and_key_as_sent() -> None:
    body = (
        b'{"events":[{"id":"x","type":"T","aggregate_id":"a",'
        b'"payload":{"z":18446744073709551616,"a":1.10,"e":1E+400,"s":"\\u00e9"}}]}'
    )
    (event,), tracking = streamed(body, list(range(len(body))))
    assert event.payload == b'{"z":18446744073709551616,"a":1.10,"e":1E+400,"s":"\\u00e9"}'
    assert tracking is None


def test_a_character_cut_between_pieces_is_decoded_whole() -> None:
    body = '{"events":[{"id":"x","type":"T","aggregate_id":"a","payload":{"s":"é€😀"}}]}'.encode()
    for cut in range(len(body)):
        ((event,), _) = streamed(body, [cut])
        assert orjson.loads(event.payload) == {"s": "é€😀"}


REFUSED = [
    (b"", "invalid_json"),
    (b"   ", "invalid_json"),
    (b"\xff", "invalid_json"),
    (b"[1]", "invalid_body"),
    (b'{"events":5}', "invalid_field"),
    (b'{"events":[1]}', "invalid_field"),
    (b'{"evil":1}', "unknown_field"),
    (b'{"events":[]}', "empty_batch"),
    (b'{"tracking":{"consumer":"c","position":1}}', "missing_field"),
    (b'{"events":[{"type":"T","aggregate_id":"a","payload":{}}],"events":[]}', "duplicate_key"),
    (b'{"events":[{"type":"T","aggregate_id":"a","payload":{"k":1,"k":2}}]}', "duplicate_key"),
    (b'{"events":[{"type":"T","aggregate_id":"a","payload":{"s":"\\ud800"}}]}', "invalid_json"),
    (b'{"events":[{"type":"T","aggregate_id":"a","payload":{"n":NaN}}]}', "invalid_json"),
    (b'{"events":[{"type":"T","aggregate_id":"a","payload":{}}] } x', "invalid_json"),
    (b'{"events":[{"type":"T","aggregate_id":"a","payload":{}}', "invalid_json"),
    (b'{"events":[{"type":"T","aggregate_id":"a","payload":{}},]}', "invalid_json"),
    (b'{"events":[{"type":"T","aggregate_id":"a","payload":{}}]', "invalid_json"),
    (b'{"events" [] }', "invalid_json"),
    (b'{events:[]}', "invalid_json"),
    (b'{"events":[{"type":"T","aggregate_id":"..","payload":{}}]}', "invalid_field"),
    (b'{"events":[{"type":"T","aggregate_id":"a","payload":{}}],"tracking":{"consumer":"c","position":0}}',
     "invalid_field"),
    (b'{"events":[{"id":"1","type":"T","aggregate_id":"a","payload":{}},'
     b'{"id":"1","type":"T","aggregate_id":"a","payload":{}}]}', "duplicate_id"),
    (b'{"events":[{"type":"T","aggregate_id":"a","payload":{"n":1' + b"1" * 5000 + b"}}]}", "invalid_json"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "code"), REFUSED)
def test_a_refused_body_has_the_whole_body_code_however_it_is_cut(body: bytes, code: str) -> None:
    assert outcome(whole, body) == ("refused", code)
    rng = random.Random(body)
    for cuts in ([], [1], list(range(len(body))), rng.sample(range(len(body) + 1), min(3, len(body) + 1))):
        assert outcome(streamed, body, cuts) == ("refused", code), cuts


def big_event(i: int, size: int = 1000) -> bytes:
    return orjson.dumps({"id": f"e-{i}", "type": "T", "aggregate_id": "a", "payload": {"pad": "x" * size}})


def test_a_bad_event_is_refused_as_it_arrives_not_at_the_end() -> None:
    parser = BatchStreamParser(max_events=10_000)
    parser.feed(b'{"events":[' + big_event(0) + b',{"type":"","aggregate_id"')
    assert parser.events_checked == 1
    parser.feed(b':"a","payload":{}},')  # a piece this small waits for more
    with pytest.raises(ValidationError) as refused:
        parser.feed(big_event(2, size=MIN_RETRY_BYTES))  # then the walk goes on, and stops at it
    assert (refused.value.code, refused.value.details["event_index"]) == ("invalid_field", 1)
    with pytest.raises(RuntimeError):
        parser.feed(big_event(2) + b"]}")


def test_the_event_past_max_events_is_refused_before_it_is_read() -> None:
    parser = BatchStreamParser(max_events=3)
    parser.feed(b'{"events":[' + b",".join(big_event(i) for i in range(3)) + b",")
    assert parser.events_checked == 3
    with pytest.raises(ValidationError) as refused:
        parser.feed(b"{")
    assert refused.value.code == "too_many_events"


def test_an_event_in_many_pieces_is_scanned_a_bounded_number_of_times(monkeypatch: pytest.MonkeyPatch) -> None:
    scanned: list[int] = []
    real = batch_stream._SCANNER

    class CountingScanner:
        def raw_decode(self, text: str, start: int) -> tuple[Any, int]:
            scanned.append(len(text) - start)
            return real.raw_decode(text, start)

    monkeypatch.setattr(batch_stream, "_SCANNER", CountingScanner())
    event = big_event(0, size=3 << 20)
    body = b'{"events":[' + event + b"]}"
    streamed(body, list(range(0, len(body), 1024)))  # 3,100 pieces of 1 KiB
    # Retries double what they scan: a 3 MiB value is scanned a few times its size, and
    # far fewer times than there are pieces.
    assert len(scanned) < 20
    assert sum(scanned) < 4 * len(event) + 20 * MIN_RETRY_BYTES


# ------------------------------------------------------------------ through the server


SMALL_BODY_LIMIT = 64 * 1024  # batches over it are streamed


def batch_body(count: int, size: int = 1000) -> bytes:
    return b'{"events":[' + b",".join(big_event(i, size) for i in range(count)) + b"]}"


def head(length: int | None, *extra: bytes) -> bytes:
    framing = b"transfer-encoding: chunked\r\n" if length is None else b"content-length: %d\r\n" % length
    return (
        b"POST /events/batch HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n" + framing + b"".join(extra)
        + b"\r\n"
    )  # fmt: skip


async def send_in_pieces(client: HttpTestClient, data: bytes, piece: int) -> None:
    for start in range(0, len(data), piece):
        await client.send_raw(data[start : start + piece])
        await trio.lowlevel.checkpoint()


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_large_batch_streams_in_and_reads_back_exactly(nursery: trio.Nursery, chunked: bool) -> None:
    _, port = await start_server(nursery, limits=HttpLimits(max_body_bytes=SMALL_BODY_LIMIT))
    client = await HttpTestClient.connect(port)
    body = batch_body(300)  # ~310 KB
    if chunked:
        framed = b"".join(
            b"%x\r\n%b\r\n" % (len(body[i : i + 7000]), body[i : i + 7000]) for i in range(0, len(body), 7000)
        )
        await send_in_pieces(client, head(None) + framed + b"0\r\n\r\n", 5000)
    else:
        await send_in_pieces(client, head(len(body)) + body, 5000)
    response = await client.read_response()
    assert response.status == 201, response.body
    assert [e["index"] for e in response.json()["events"]] == list(range(1, 301))
    assert response.header("connection") is None  # the whole body was read: keep-alive
    read = await client.request("GET", "/events/a?limit=1000")
    assert [e["payload"] for e in read.json()["events"]] == [{"pad": "x" * 1000}] * 300


async def test_a_bad_event_early_in_a_large_body_is_answered_before_the_rest_is_sent(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery, limits=HttpLimits(max_body_bytes=SMALL_BODY_LIMIT))
    client = await HttpTestClient.connect(port)
    first = b'{"events":[{"type":"T","aggregate_id":"a","payload":{},"colour":"red"},' + big_event(1)
    await client.send_raw(head(8 << 20) + first)  # 8 MiB announced, 1 KB sent
    response = await client.read_response()  # would wait for 8 MiB if the body were read whole
    assert response.status == 400
    assert response.json()["error"]["code"] == "unknown_field"
    assert response.header("connection") == "close"
    assert await client.read_until_closed() == b""
    check = await HttpTestClient.connect(port)
    assert (await check.request("GET", "/events?limit=10")).json()["count"] == 0  # nothing appended


async def test_a_streamed_body_has_the_body_deadline(nursery: trio.Nursery) -> None:
    limits = HttpLimits(max_body_bytes=SMALL_BODY_LIMIT, body_timeout_s=0.3, request_timeout_s=5.0)
    _, port = await start_server(nursery, limits=limits)
    client = await HttpTestClient.connect(port)
    body = batch_body(100)
    await client.send_raw(head(len(body)) + body[: len(body) // 2])  # and then nothing
    response = await client.read_response()
    assert (response.status, response.json()["error"]["code"]) == (408, "body_timeout")


async def test_a_streamed_body_gets_its_100_continue(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery, limits=HttpLimits(max_body_bytes=SMALL_BODY_LIMIT))
    client = await HttpTestClient.connect(port)
    body = batch_body(100)
    await client.send_raw(head(len(body), b"expect: 100-continue\r\n"))
    interim = await client.read_head()
    assert interim.status == 100
    await send_in_pieces(client, body, 20_000)
    response = await client.read_response()
    assert response.status == 201
    assert len(response.json()["events"]) == 100


async def test_a_client_gone_mid_body_appends_nothing(nursery: trio.Nursery) -> None:
    _, port = await start_server(nursery, limits=HttpLimits(max_body_bytes=SMALL_BODY_LIMIT))
    client = await HttpTestClient.connect(port)
    body = batch_body(100)
    await client.send_raw(head(len(body)) + body[:-10])
    await client.aclose()
    check = await HttpTestClient.connect(port)
    await trio.sleep(0.2)  # the server notices the close on its next read
    assert (await check.request("GET", "/events?limit=10")).json()["count"] == 0
    assert (await check.request("POST", "/events/batch", batch_body(2))).status == 201


@settings(max_examples=300, deadline=None)
@given(
    body=st.one_of(
        st.binary(max_size=200),
        st.builds(lambda b, junk: b[: len(b) // 2] + junk + b[len(b) // 2 :], st.sampled_from([r[0] for r in REFUSED]),
                  st.binary(max_size=8)),
    ),
    data=st.data(),
)  # fmt: skip
def test_nothing_but_a_validation_error_escapes(body: bytes, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=6))
    got = outcome(streamed, body, cuts)
    if got[0] != "refused":  # accepted: then the whole-body parser accepts it too
        assert got == whole(body)
